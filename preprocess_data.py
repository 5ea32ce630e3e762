"""Offline preprocessing command line: see ``python preprocess_data.py --help`` and docs/preprocessing.md."""
import sys

from posttrain.environment import silence_known_warnings

silence_known_warnings()  # before megatron-core is imported

from posttrain.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
