"""Convert checkpoints between Hugging Face and posttrain (megatron-core) formats; see docs/checkpoint.md.

    python convert_ckpt.py --direction hf2mcore --load-dir HF_DIR --save-dir CKPT_DIR
    python convert_ckpt.py --direction mcore2hf --load-dir CKPT_DIR --save-dir HF_DIR
"""
import sys

from posttrain.models.convert import main

if __name__ == "__main__":
    sys.exit(main())
