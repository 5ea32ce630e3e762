"""Throughput of offline preprocessing against the tokenizer's own batch encoder.

Measures, in one run and on the same prompts:

* ``raw``: ``tokenizer(texts, add_special_tokens=False)`` in one call on the already-templated texts (a fast
  tokenizer batch-encodes on all cores);
* ``preprocess``: :func:`posttrain.data.preprocess.run_preprocess` on a parquet file holding the same rows, from
  reading the file to the renamed, re-opened datasets (templating, tokenizing, writing included; the one-time
  tokenizer load excluded, as for ``raw``).

The rows are those of ``--input`` repeated until ``--num-docs`` rows (written to a temporary parquet file).
Prints documents/s and tokens/s of both, and ``ratio = preprocess docs/s / raw docs/s``. The measurements are
taken in turns, best of ``--repeats`` each.

Usage::

    python bench/preprocess.py [--workers 2] [--prompt-type qwen] [--num-docs 40000]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=str(REPO.parent / "shared" / "data" / "alpaca_en_800.parquet"))
    parser.add_argument("--tokenizer-name-or-path", default=None,
                        help="default: the example model (SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt-type", default="qwen")
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--num-docs", type=int, default=40000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import pyarrow as pa
    import pyarrow.parquet as pq

    from posttrain.data.preprocess import PreprocessConfig, run_preprocess
    from posttrain.data.templates import get_template
    from posttrain.data.tokenizer import HFTokenizer

    if args.tokenizer_name_or_path is None:
        from posttrain.example_model import prepare_example_model

        args.tokenizer_name_or_path = str(prepare_example_model(verbose=False))
    logging.getLogger("posttrain.data").setLevel(logging.WARNING)

    table = pq.read_table(args.input, columns=["instruction", "input"])
    copies = -(-args.num_docs // table.num_rows)
    table = pa.concat_tables([table] * copies).slice(0, args.num_docs)
    tokenizer = HFTokenizer(args.tokenizer_name_or_path)
    template = get_template(args.prompt_type).bind(tokenizer)
    texts = []
    for instruction, query in zip(table.column("instruction").to_pylist(), table.column("input").to_pylist()):
        prompt = instruction + ("\n" + query if query else "")
        texts.append(template.render_prompt([{"role": "user", "content": prompt}]))

    print(f"input {args.input} x{copies} -> {len(texts)} prompts, prompt type {args.prompt_type}, "
          f"{os.cpu_count()} CPUs")
    # Raw encoding and each --workers setting are timed in turns, best of --repeats each, so that a change of
    # machine load during the run affects all of them alike.
    raw_s, best = float("inf"), {w: float("inf") for w in args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "bench.parquet")
        pq.write_table(table, data)
        for _ in range(args.repeats):
            start = time.perf_counter()
            ids = tokenizer.hf(texts, add_special_tokens=False)["input_ids"]
            raw_s = min(raw_s, time.perf_counter() - start)
            tokens = sum(len(x) for x in ids)
            for workers in args.workers:
                config = PreprocessConfig(input=data, output_prefix=os.path.join(tmp, f"out{workers}"),
                                          tokenizer_name_or_path=args.tokenizer_name_or_path,
                                          prompt_type=args.prompt_type, workers=workers, progress_bar=False)
                result = run_preprocess(config)
                if result.tokens != tokens or result.documents != len(texts):
                    raise SystemExit(f"preprocess wrote {result.documents} docs / {result.tokens} tokens, "
                                     f"expected {len(texts)} / {tokens}")
                best[workers] = min(best[workers], result.process_s)
    raw_docs = len(texts) / raw_s
    print(f"raw batch encode : {raw_docs:10,.0f} docs/s {tokens / raw_s:12,.0f} tokens/s ({raw_s:.3f} s)")
    for workers, seconds in best.items():
        docs = len(texts) / seconds
        print(f"preprocess -w {workers:<2}: {docs:10,.0f} docs/s {tokens / seconds:12,.0f} tokens/s ({seconds:.3f} s) "
              f"ratio to raw {docs / raw_docs:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
