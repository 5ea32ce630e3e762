"""Convert checkpoints between Hugging Face and posttrain (megatron-core) formats; see docs/checkpoint.md.

    python convert_ckpt.py --direction hf2mcore --load-dir HF_DIR --save-dir CKPT_DIR
    python convert_ckpt.py --direction mcore2hf --load-dir CKPT_DIR --save-dir HF_DIR
"""
import sys

from posttrain.environment import silence_known_warnings

silence_known_warnings()  # before megatron-core is imported (by posttrain.models.convert)

from posttrain.models.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
