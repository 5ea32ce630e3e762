"""Print ``bf16`` or ``fp32``: the precision the example scripts use under ``PRECISION=auto``.

bf16 is chosen when this machine multiplies bf16 matrices at least 1.3× faster than fp32, measured now (CPUs
with AMX do, CPUs with only AVX512-BF16 or AVX2 do not); on a CUDA GPU always bf16. The measurement goes to
stderr, the choice alone to stdout::

    PRECISION=$(python tools/choose_precision.py)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from posttrain.cpu_backend import choose_precision  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-speedup", type=float, default=1.3,
                        help="bf16 must run this many times faster than fp32 to be chosen (default 1.3)")
    args = parser.parse_args()
    choice, speedup = choose_precision(args.min_speedup)
    print(f"precision: {choice} (bf16 matmul {speedup:.2f}x fp32's speed on this machine)", file=sys.stderr)
    print(choice)


if __name__ == "__main__":
    main()
