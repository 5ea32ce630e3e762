"""Profile PPO iterations of workload P (``bench/ppo_step.py``) phase by phase, in one process.

Builds the same ``PPOTrainer`` as ``pretrain_gpt.py --stage trl_ppo`` with workload P's flags (actor/reference
SmolLM2-135M-Instruct, critic/reward the same weights with a fresh value head, 8 prompts x 64 new tokens sampled
at temperature 1 with ``--ignore-eos``, micro and global batch 8, one PPO epoch), runs ``--warmup`` iterations,
then one more iteration phase by phase (generate, experience, train) under the chosen instruments:

* ``--profile``: ``torch.profiler`` per phase, with labelled regions (``R.*`` rollout functions, ``M.*`` model
  parts: embedding, each layer's ``linear_qkv`` / ``core_attention`` / ``linear_proj`` / ``mlp`` / norms, the LM
  head, ``T.*`` optimiser step, ``zero_grad``, gradient reduction); prints the top ops by self time and the
  labelled regions, and writes a Chrome trace per phase into ``--out``;
* ``--mode-calls``: counts the torch calls that go through the CPU backend's ``TorchFunctionMode`` per phase and
  lists the calls it actually rewrites (CUDA device arguments, ``.cuda()``, ``Tensor.type()``) with the source
  line that made them — what megatron-core needs the mode for once the models are built;
* always (with the host allocator ``pretrain_gpt.py`` would use, :mod:`posttrain.allocator`): wall and CPU
  seconds per phase (cores busy = CPU / wall), RSS at the end of each phase and its peak
  (sampled every 5 ms), and the static memory: parameters of the four models, DDP gradient buffers and optimiser
  states.

Usage (after ``bash scripts/install.sh`` and one ``bench/ppo_step.py`` or ``bench/generate.py`` run, which prepare
the checkpoints and prompts)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/profile_ppo.py --profile --mode-calls
    OMP_NUM_THREADS=2 .venv/bin/python bench/profile_ppo.py --iters 3      # phase times and memory only
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GIB = 1024 ** 3

if __name__ == "__main__":  # the host allocator pretrain_gpt.py runs with (posttrain.allocator), before torch
    from posttrain.allocator import use_tcmalloc

    use_tcmalloc()


def workload_argv(workdir: Path) -> list[str]:
    """``pretrain_gpt.py --stage trl_ppo`` flags of workload P (as ``bench/ppo_step.py`` passes them)."""
    return ["--ref-model", str(workdir / "actor_mcore"), "--reward-model", str(workdir / "value_mcore"),
            "--data-path", str(workdir / "data" / "alpaca"), "--max-samples", "8", "--micro-batch-size", "8",
            "--global-batch-size", "8", "--train-iters", "1000", "--max-new-tokens", "64", "--do-sample",
            "--temperature", "1.0", "--top-p", "1.0", "--log-interval", "1", "--sample-interval", "0",
            "--ignore-eos"]


def build_trainer(workdir: Path):
    from posttrain.arguments import dataclass_from_args
    from posttrain.trl_ppo.trainer import ARG_GROUPS, PPOTrainer, build_parser

    args = build_parser().parse_args(workload_argv(workdir))
    return PPOTrainer(*(dataclass_from_args(cls, args) for cls, _ in ARG_GROUPS))


class RssSampler:
    """Peak resident memory per label, sampled every ``interval`` seconds in a daemon thread."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.proc = psutil.Process()
        self.label = "set-up"
        self.peaks: dict[str, float] = collections.defaultdict(float)
        self.interval = interval
        threading.Thread(target=self._run, daemon=True).start()

    def rss(self) -> float:
        return self.proc.memory_info().rss / GIB

    def _run(self):
        while True:
            value = self.rss()
            if value > self.peaks[self.label]:
                self.peaks[self.label] = value
            time.sleep(self.interval)


def _storage_gib(tensors) -> float:
    """GiB of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()) / GIB


def static_memory(trainer) -> list[tuple[str, float]]:
    """(what, GiB) of the tensors that live for the whole run."""
    import torch

    rows = []
    for slot in (trainer.actor, trainer.reference, trainer.critic, trainer.reward):
        if slot is None:
            continue
        rows.append((f"{slot.name} parameters", _storage_gib(slot.model.parameters())))
        if slot.ddp is not None:
            rows.append((f"{slot.name} DDP gradient buffers",
                         _storage_gib(b.grad_data for b in slot.ddp.buffers)))
            inner = getattr(slot.optimizer, "optimizer", slot.optimizer)
            rows.append((f"{slot.name} optimiser state",
                         _storage_gib(v for s in inner.state.values() for v in s.values() if torch.is_tensor(v))))
    return rows


def install_labels(trainer) -> None:
    """``record_function`` labels on the rollout functions, model parts and optimiser calls (profiling only)."""
    from torch.profiler import record_function

    import posttrain.training as training
    from posttrain.trl_ppo import rollout
    from posttrain.training import unwrap_model

    def label(owner, attr, name):
        original = getattr(owner, attr)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            with record_function(name):
                return original(*args, **kwargs)

        setattr(owner, attr, wrapped)

    def label_module(module, name):
        def enter(mod, args):
            mod._profile_region = record_function(name)
            mod._profile_region.__enter__()

        def leave(mod, args, output):
            mod._profile_region.__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)

    label(rollout, "_forward_last_logits", "R.forward_through_schedule")
    label(rollout, "sample_tokens", "R.sample_tokens")
    label(training, "optimizer_step", "T.optimizer_step")
    label(training, "zero_grad", "T.zero_grad")
    for slot in (trainer.actor, trainer.reference, trainer.critic, trainer.reward):
        if slot is None:
            continue
        model = unwrap_model(slot.model)
        label_module(model, f"M.{slot.name}_forward")
        label_module(model.embedding, "M.embedding")
        label_module(model.decoder.final_layernorm, "M.final_norm")
        if getattr(model, "output_layer", None) is not None:
            label_module(model.output_layer, "M.lm_head")
        for layer in model.decoder.layers:
            label_module(layer.input_layernorm, "M.input_norm")
            label_module(layer.self_attention.linear_qkv, "M.linear_qkv")
            label_module(layer.self_attention.core_attention, "M.core_attention")
            label_module(layer.self_attention.linear_proj, "M.linear_proj")
            label_module(layer.pre_mlp_layernorm, "M.pre_mlp_norm")
            label_module(layer.mlp, "M.mlp")
        if slot.ddp is not None:
            config = model.config
            label(config, "finalize_model_grads_func", "T.finalize_model_grads")


class ModeCallRecorder:
    """Replaces the CPU backend's TorchFunctionMode by a subclass that counts calls and records rewrites."""

    def __init__(self):
        from torch.overrides import _get_current_function_mode, _pop_mode

        from posttrain import cpu_backend

        self.phase = "set-up"
        self.calls: collections.Counter = collections.Counter()
        self.rewrites: collections.Counter = collections.Counter()
        if not isinstance(_get_current_function_mode(), cpu_backend.CudaToCpuMode):
            raise SystemExit("--mode-calls: the CPU backend's TorchFunctionMode is not active (CUDA present?)")
        _pop_mode()
        recorder = self

        class Recording(cpu_backend.CudaToCpuMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                recorder.calls[recorder.phase] += 1
                why = recorder.rewrite_reason(func, args, kwargs or {})
                if why:
                    recorder.rewrites[(recorder.phase, why, recorder.call_site())] += 1
                return super().__torch_function__(func, types, args, kwargs)

        Recording().__enter__()

    @staticmethod
    def rewrite_reason(func, args, kwargs):
        import torch

        from posttrain import cpu_backend

        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return f"Tensor.{func.__name__}()"
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return "Tensor.type()"
        if func is torch.Tensor.is_pinned:
            return "Tensor.is_pinned()"
        if "device" in kwargs and cpu_backend._is_cuda_device(kwargs["device"]):
            return f"{getattr(func, '__name__', func)}(device={kwargs['device']!r})"
        if func is torch.Tensor.to and len(args) > 1 and cpu_backend._is_cuda_device(args[1]):
            return "Tensor.to(cuda)"
        return None

    @staticmethod
    def call_site() -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/torch/" in frame.filename and "megatron" not in frame.filename:
                continue
            name = frame.filename.split("site-packages/")[-1].replace(str(REPO) + "/", "")
            return f"{name}:{frame.lineno} ({frame.name})"
        return "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="profile workload P phase by phase")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--iters", type=int, default=1, help="measured iterations (phase by phase)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of the last iteration")
    parser.add_argument("--mode-calls", action="store_true", help="record the TorchFunctionMode's rewrites")
    parser.add_argument("--rows", type=int, default=25, help="rows of each profiler table")
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench" / "ppo_step",
                        help="checkpoints and prompts prepared by bench/ppo_step.py")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "profile",
                        help="Chrome traces and profile tables (JSON) go here")
    args = parser.parse_args(argv)
    if not (args.workdir / "actor_mcore").is_dir():
        sys.path.insert(0, str(REPO / "bench"))
        import ppo_step

        ppo_step.prepare(args.workdir.resolve(), ppo_step.DEFAULT_DATA, sys.executable, REPO)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(megatron|torch)\..*")
    import torch
    from torch.profiler import ProfilerActivity, profile

    sampler = RssSampler()
    trainer = build_trainer(args.workdir)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, RSS after set-up "
          f"{sampler.rss():.2f} GiB")
    for _ in range(args.warmup):
        sampler.label = "warm-up"
        trainer.step()
    for what, gib in static_memory(trainer):
        print(f"  static: {what:<32} {gib:6.3f} GiB")
    if args.profile:
        install_labels(trainer)
    recorder = ModeCallRecorder() if args.mode_calls else None
    args.out.mkdir(parents=True, exist_ok=True)

    for it in range(args.iters):
        last = it == args.iters - 1
        iteration = trainer.iteration
        state: dict = {}
        phases = {
            "generate": lambda: state.update(batch=trainer.generate_phase(*trainer._prompts_for_iteration(iteration),
                                                                           iteration)),
            "experience": lambda: trainer.experience_phase(state["batch"], iteration),
            "train": lambda: trainer.train_phase(state["batch"], iteration),
        }
        for name, run in phases.items():
            sampler.label = name
            if recorder is not None:
                recorder.phase = name
            prof = profile(activities=[ProfilerActivity.CPU]) if args.profile and last else None
            load = os.getloadavg()[0]
            if prof is not None:
                prof.__enter__()
            c0, t0 = time.process_time(), time.perf_counter()
            run()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if prof is not None:
                prof.__exit__(None, None, None)
            print(f"iteration {iteration + 1} {name:<10} wall {wall:7.2f} s  cpu {cpu:7.2f} s  cores busy "
                  f"{cpu / wall:4.2f}  RSS {sampler.rss():5.2f} GiB (peak {sampler.peaks[name]:5.2f})  load {load:.2f}"
                  + ("  [profiled]" if prof is not None else ""), flush=True)
            if prof is not None:
                averages = prof.key_averages()
                prof.export_chrome_trace(str(args.out / f"trace_{name}.json"))
                rows = {e.key: [e.count, e.cpu_time_total / 1e3, e.self_cpu_time_total / 1e3] for e in averages}
                (args.out / f"ops_{name}.json").write_text(json.dumps(rows))
                print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=55))
                total = sum(v[2] for v in rows.values())  # self times add up to the profiled time
                print(f"labelled regions of {name} (inclusive ms, share of the phase's profiled time "
                      f"{total / 1e3:.2f} s):")
                for key in sorted(k for k in rows if k[:2] in ("R.", "M.", "T.")):
                    count, inclusive, _ = rows[key]
                    print(f"  {key:<30} x{count:<6} {inclusive:10.1f} ms  {inclusive / total:6.1%}")
        trainer.iteration += 1
    if recorder is not None:
        print("torch calls through the TorchFunctionMode per phase (measured iterations):", dict(recorder.calls))
        print("calls it rewrote (phase, count, what, where):")
        for (phase, why, where), count in sorted(recorder.rewrites.items()):
            print(f"  {phase:<10} {count:6d}  {why:<32} {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
