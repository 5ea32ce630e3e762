"""Rollout speed: posttrain's KV-cached ``generate`` against Hugging Face ``generate`` on the same model and prompts.

Both sides run SmolLM2-135M-Instruct (the actor of workload P, ``bench/ppo_step.py``) in one process, in the
same dtype (fp32 by default), on the same 8 real Alpaca prompts (the rows posttrain's PPO trains on, prepared
exactly as ``bench/ppo_step.py`` prepares them), left-padded into one batch, and are forced to produce exactly
``--new-tokens`` tokens per sequence:

* **posttrain**: :func:`posttrain.trl_ppo.rollout.generate` on the megatron-core model built from the converted
  checkpoint (``SamplingParams(..., ignore_eos=True)``), in a single process set up by
  :func:`posttrain.distributed.initialize_distributed` (so on a CPU-only torch the CPU backend is active, as in
  training);
* **HF**: ``model.generate(..., min_new_tokens=N, max_new_tokens=N)`` (``min_new_tokens`` masks EOS until the
  budget is spent), ``top_k=0, top_p=1.0`` so sampling is plain ``softmax(logits / temperature)`` as on
  posttrain's side. HF runs with the CPU backend's ``TorchFunctionMode`` suspended, as it would in its own process.

Both run in one process, with the host allocator ``pretrain_gpt.py`` uses (:mod:`posttrain.allocator`).
``--modes`` chooses sampled (temperature ``--temperature``) and/or greedy decoding. The two systems alternate,
``--reps`` timed repetitions each after one untimed warm-up of each, so slow phases of a shared machine hit both.
It prints generated tokens per second of each (median over the repetitions, and the spread), the ratio
posttrain / HF, CPU seconds per repetition, the load average, and for greedy decoding whether the tokens agree
(per row: the number of leading tokens identical between the two; fp32 kernels differ in rounding, so a near-tie
may flip a token and the continuation diverges after it).

Usage (after ``bash scripts/install.sh``)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/generate.py                    # sampled and greedy, 5 reps
    .venv/bin/python bench/generate.py --modes greedy --reps 3 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

if __name__ == "__main__":  # the host allocator pretrain_gpt.py runs with (posttrain.allocator), before torch
    from posttrain.allocator import use_tcmalloc

    use_tcmalloc()


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def _suspended_cpu_mode():
    """A context that pops the CPU backend's TorchFunctionMode for its duration (a null context without it)."""
    import contextlib

    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    from posttrain import cpu_backend

    if isinstance(_get_current_function_mode(), cpu_backend.CudaToCpuMode):
        return _pop_mode_temporarily()
    return contextlib.nullcontext()


def build_posttrain_actor(actor_dir: str, bf16: bool):
    from posttrain.models.checkpoint import load_model_checkpoint, read_checkpoint_meta
    from posttrain.models.provider import build_model

    meta = read_checkpoint_meta(actor_dir)
    model = build_model(meta["hf_config"], "causal_lm", bf16=bf16)
    load_model_checkpoint(model, actor_dir)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, meta["hf_config"]["vocab_size"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="posttrain rollout vs HF generate, tokens per second")
    parser.add_argument("--modes", default="sample,greedy", help="comma-separated: sample, greedy")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per system and mode")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="prompts (the first rows of the prepared set)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench" / "ppo_step",
                        help="checkpoints and prompts (shared with bench/ppo_step.py)")
    parser.add_argument("--data", type=Path, default=None, help="Alpaca prompts (parquet); default as ppo_step.py")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("sample", "greedy") for m in modes):
        parser.error("--modes takes sample and/or greedy")
    if args.reps < 1:
        parser.error("--reps must be >= 1")

    import ppo_step

    prep = ppo_step.prepare(args.workdir.resolve(), (args.data or ppo_step.DEFAULT_DATA).resolve(), sys.executable,
                            REPO)
    if args.batch > len(prep["prompt_lengths"]):
        parser.error(f"--batch {args.batch}: only {len(prep['prompt_lengths'])} prompts are prepared")

    import warnings

    # megatron-core's notices about optional GPU libraries say nothing actionable here (as in pretrain_gpt.py)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(megatron|torch)\..*")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    from posttrain.data.prompt_dataset import pad_sequences
    from posttrain.distributed import destroy_distributed, initialize_distributed
    from posttrain.trl_ppo.rollout import SamplingParams, generate

    state = initialize_distributed()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    actor, vocab_size = build_posttrain_actor(prep["actor"], args.dtype == "bf16")
    tokenizer = AutoTokenizer.from_pretrained(prep["hf_dir"])
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    with _suspended_cpu_mode():
        hf = AutoModelForCausalLM.from_pretrained(prep["hf_dir"], dtype=dtype).eval()
    prompts = [torch.tensor(p) for p in json.loads(Path(prep["prompts_json"]).read_text())[:args.batch]]
    ids, mask = pad_sequences(prompts, pad, side="left")
    n = args.new_tokens
    generated = ids.shape[0] * n

    def run_posttrain(mode: str, seed: int) -> torch.Tensor:
        params = SamplingParams(max_new_tokens=n, do_sample=mode == "sample", temperature=args.temperature,
                                stop_token_ids=[eos], pad_token_id=pad, ignore_eos=True)
        out = generate(actor, ids, mask, params, vocab_size, torch.Generator().manual_seed(seed))
        assert out.responses.shape == (ids.shape[0], n), out.responses.shape
        return out.responses

    def run_hf(mode: str, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        kwargs = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0) if mode == "sample" else \
            dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        with _suspended_cpu_mode(), torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              pad_token_id=pad, eos_token_id=eos, use_cache=True, **kwargs)
        responses = out[:, ids.shape[1]:]
        assert responses.shape == (ids.shape[0], n), responses.shape
        return responses

    systems = {"posttrain": run_posttrain, "hf": run_hf}
    load_before = os.getloadavg()
    log(f"{ids.shape[0]} prompts, lengths {prep['prompt_lengths'][:args.batch]} (left-padded to {ids.shape[1]}), "
        f"{n} new tokens, {args.dtype}, {torch.get_num_threads()} threads, CPU backend "
        f"{'on' if state.cpu_backend else 'off'}; load average {load_before[0]:.2f}")
    results: dict = {}
    for mode in modes:
        times = {name: [] for name in systems}
        cpu = {name: [] for name in systems}
        outputs = {}
        for rep in range(args.reps + 1):  # rep 0: warm-up of each
            order = list(systems) if rep % 2 == 0 else list(reversed(systems))
            for name in order:
                c0, t0 = time.process_time(), time.perf_counter()
                outputs[name] = systems[name](mode, seed=1000 + rep)
                t1, c1 = time.perf_counter(), time.process_time()
                if rep:
                    times[name].append(t1 - t0)
                    cpu[name].append(c1 - c0)
        row = {name: {"seconds": times[name], "cpu_seconds": cpu[name],
                      "tokens_per_s": generated / statistics.median(times[name]),
                      "ms_per_step": 1000 * statistics.median(times[name]) / n} for name in systems}
        row["ratio"] = row["posttrain"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
        if mode == "greedy":
            same = outputs["posttrain"] == outputs["hf"]
            prefix = [int(r.long().cumprod(0).sum()) for r in same]
            row["greedy_agreement"] = {"identical_rows": sum(p == n for p in prefix), "rows": len(prefix),
                                       "leading_tokens_equal": prefix,
                                       "token_fraction_equal": float(same.float().mean())}
        results[mode] = row
    load_after = os.getloadavg()
    destroy_distributed()

    print()
    print(f"rollout: batch {ids.shape[0]} x {n} new tokens, {args.dtype}, {torch.get_num_threads()} threads, median "
          f"of {args.reps} interleaved repetitions; load average {load_before[0]:.2f} before, {load_after[0]:.2f} "
          f"after")
    header = f"{'mode':<7} {'system':<10} {'tokens/s':>9} {'ms/step':>8} {'spread s':>15} {'cpu-s/rep':>9}"
    print(header)
    print("-" * len(header))
    for mode, row in results.items():
        for name in systems:
            m = row[name]
            spread = f"{min(m['seconds']):.2f}-{max(m['seconds']):.2f}"
            print(f"{mode:<7} {name:<10} {m['tokens_per_s']:>9.1f} {m['ms_per_step']:>8.1f} {spread:>15} "
                  f"{statistics.median(m['cpu_seconds']):>9.2f}")
        print(f"{mode:<7} ratio posttrain/HF tokens/s: {row['ratio']:.2f} (target >= 1.5: "
              f"{'met' if row['ratio'] >= 1.5 else 'NOT met'})")
        if "greedy_agreement" in row:
            g = row["greedy_agreement"]
            print(f"{mode:<7} greedy tokens agree: {g['identical_rows']}/{g['rows']} rows identical, "
                  f"{g['token_fraction_equal']:.1%} of tokens equal; leading equal tokens per row "
                  f"{g['leading_tokens_equal']}")
    if args.json:
        args.json.write_text(json.dumps({"load_before": load_before, "load_after": load_after, "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
