"""TRL's ``PPOTrainer`` (``trl.experimental.ppo``, trl 0.29.1) on the workload of ``bench/ppo_step.py``.

Runs in its own virtual environment (``.venv-trl``, created by ``bench/ppo_step.py``), never in the project's:
it imports only torch, transformers, datasets and trl. Not meant to be called by hand except for debugging::

    .venv-trl/bin/python bench/trl_ppo_reference.py --model HF_DIR --prompts prompts.json --precision bf16 \
        --iters 4 --warmup 1 --output-dir /tmp/trl_out --result result.json

Settings (the same as posttrain's side): the HF SmolLM2 directory is the policy and the reference policy;
``AutoModelForSequenceClassification`` (``num_labels=1``, fresh score head) made from the same weights is the
reward and the value model; the prompts are the token ids that posttrain's preprocessing produced (the same
rows posttrain trains on), batch 8 (``per_device_train_batch_size=8``, one mini-batch, one PPO epoch),
``response_length`` new tokens with ``temperature`` 1.0 and no stop token (TRL's default, so every response has
exactly ``response_length`` tokens). ``--precision bf16`` is ``PPOConfig(bf16=True)``, exactly as a TRL user
sets it. Note that with trl 0.29.1 and transformers 5.x this alone does **not** enable mixed precision:
``PPOTrainer`` builds its own ``Accelerator()`` without passing ``args.mixed_precision``, so the run computes in
fp32 (the result records accelerate's ``mixed_precision``). ``--autocast`` also sets
``ACCELERATE_MIXED_PRECISION=bf16`` (what ``accelerate launch --mixed_precision bf16`` does): accelerate's bf16
autocast over fp32 weights. Models are loaded in fp32 as TRL's own ``examples/scripts/ppo/ppo.py`` does. TRL's PPO
loop never enables gradient checkpointing (``PPOConfig.gradient_checkpointing`` is not read by it), like
posttrain's default.

Each iteration's wall time is taken between consecutive ``on_step_end`` callbacks (the first from
``on_train_begin``), with the process's CPU seconds over the same spans. Writes ``--result`` as JSON:
``iteration_s`` and ``iteration_cpu_s`` (every iteration), ``phases_s`` (generation; the experience's no-grad
forwards of reference, value and reward models; the rest: the PPO update), ``response_lengths``,
versions, threads.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model directory (SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", required=True, help="JSON list of prompt token-id lists")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--autocast", action="store_true",
                        help="with --precision bf16: ACCELERATE_MIXED_PRECISION=bf16 (accelerate launch --mixed_precision)")
    parser.add_argument("--iters", type=int, default=4, help="timed iterations (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    transformers.logging.set_verbosity_error()
    if args.precision == "bf16" and args.autocast:
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    else:
        os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    prompts = json.loads(open(args.prompts).read())
    if len(prompts) < args.batch_size:
        raise SystemExit(f"error: {args.prompts} holds {len(prompts)} prompts, fewer than the batch")
    prompts = prompts[:args.batch_size]

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.float32  # TRL's bf16 is autocast over fp32 weights (PPOConfig.bf16)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    ref_policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    torch.manual_seed(args.seed)
    value_model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=dtype)
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=dtype)
    for m in (policy, ref_policy, value_model, reward_model):
        m.config.pad_token_id = tokenizer.pad_token_id
    dataset = Dataset.from_dict({"input_ids": prompts})

    total_iters = args.warmup + args.iters
    config = PPOConfig(
        output_dir=args.output_dir, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, num_mini_batches=1,
        num_ppo_epochs=1, total_episodes=args.batch_size * total_iters, local_rollout_forward_batch_size=args.batch_size,
        response_length=args.response_length, temperature=args.temperature, stop_token=None,
        num_sample_generations=0, bf16=args.precision == "bf16", fp16=False, use_cpu=not torch.cuda.is_available(),
        seed=args.seed, dataloader_num_workers=0,
    )

    # phase times (TRL has no timers): generation, the no-grad forwards of the experience (reference, value and
    # reward models), the rest is the PPO update; and the generated lengths (every response is response_length)
    response_lengths: list[int] = []
    phase = {"generate": 0.0, "experience": 0.0}
    original_batch_generation = ppo_module.batch_generation
    original_forward = ppo_module.forward
    original_get_reward = ppo_module.get_reward

    def batch_generation(model, queries, *rest, **kwargs):
        start = time.perf_counter()
        out = original_batch_generation(model, queries, *rest, **kwargs)
        phase["generate"] += time.perf_counter() - start
        response_lengths.append(int(out[0].shape[1] - queries.shape[1]))
        return out

    def timed_no_grad(fn):
        def wrapper(*a, **k):
            if torch.is_grad_enabled():
                return fn(*a, **k)
            start = time.perf_counter()
            out = fn(*a, **k)
            phase["experience"] += time.perf_counter() - start
            return out
        return wrapper

    ppo_module.batch_generation = batch_generation
    ppo_module.forward = timed_no_grad(original_forward)
    ppo_module.get_reward = timed_no_grad(original_get_reward)
    phases: list[dict] = []

    marks: list[float] = []
    cpu_marks: list[float] = []

    class IterationTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())
            cpu_marks.append(time.process_time())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())
            cpu_marks.append(time.process_time())
            total = marks[-1] - marks[-2]
            phases.append({"generate": phase["generate"], "experience": phase["experience"],
                           "train": total - phase["generate"] - phase["experience"]})
            phase.update(generate=0.0, experience=0.0)
            print(f"[trl] iteration {len(marks) - 1}: {marks[-1] - marks[-2]:.3f} s", flush=True)

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, value_model=value_model, train_dataset=dataset,
                         eval_dataset=dataset, callbacks=[IterationTimer()])
    mixed_precision = str(trainer.accelerator.mixed_precision)
    print(f"[trl] accelerator mixed_precision={mixed_precision}, threads={torch.get_num_threads()}", flush=True)
    trainer.train()
    times = [b - a for a, b in zip(marks, marks[1:])]
    cpu = [b - a for a, b in zip(cpu_marks, cpu_marks[1:])]
    result = {"iteration_s": times, "iteration_cpu_s": cpu, "phases_s": phases, "warmup": args.warmup, "response_lengths": response_lengths,
              "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
              "threads": torch.get_num_threads(), "precision": args.precision, "mixed_precision": mixed_precision}
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
