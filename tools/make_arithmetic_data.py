#!/usr/bin/env python
"""Write small-integer arithmetic problems as Alpaca-style prompt files: a training and a held-out split.

    python tools/make_arithmetic_data.py --output-dir DIR [--max-operand 20] [--operations +-] [--eval-size 128]

Writes ``DIR/arithmetic_train.parquet`` and ``DIR/arithmetic_eval.parquet`` with the columns ``instruction`` (the
prompt text, asking for ``Answer: <number>``), ``answer`` (the exact result) and ``problem`` (``a + b``). Every
problem with operands in ``[0, max_operand]`` appears exactly once, on one side; ``a + b`` and ``b + a`` go to
the same side. The files feed ``preprocess_data.py --handler-name PPOAlpacaStyleInstructionHandler`` and the
reward ``posttrain.rewards.arithmetic:reward`` (see that module). Prints the two paths and their sizes.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from posttrain.rewards.arithmetic import OPERATIONS, all_problems, split_problems  # noqa: E402


def write(problems, path: Path) -> None:
    table = pa.table({"instruction": [p.instruction for p in problems],
                      "answer": pa.array([p.answer for p in problems], type=pa.int64()),
                      "problem": [p.text for p in problems]})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, help="where the two parquet files are written")
    parser.add_argument("--max-operand", type=int, default=20, help="largest operand (default 20)")
    parser.add_argument("--operations", default="+-", help="operations to draw from, a subset of '+-' (default +-)")
    parser.add_argument("--eval-size", type=int, default=128, help="held-out problems (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed of the split (default 0)")
    args = parser.parse_args(argv)
    ops = list(dict.fromkeys(args.operations))
    if not ops or any(op not in OPERATIONS for op in ops):
        parser.error(f"--operations {args.operations!r}: use characters of {''.join(OPERATIONS)!r}")
    try:
        train, held_out = split_problems(all_problems(args.max_operand, ops), args.eval_size, args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, problems in (("arithmetic_train", train), ("arithmetic_eval", held_out)):
        write(problems, out / f"{name}.parquet")
        print(f"{out / name}.parquet: {len(problems)} problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
