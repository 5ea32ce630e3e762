"""Offline preprocessing command line: see ``python preprocess_data.py --help`` and docs/preprocessing.md."""
import sys

from posttrain.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
