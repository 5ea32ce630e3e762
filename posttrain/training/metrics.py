"""Metrics of the stages: typed accumulation over micro-batches and data-parallel ranks, and their outputs.

* :class:`MetricAccumulator` collects weighted means, totals and maxima over micro-batches, then reduces them
  over the data-parallel group in one collective per kind (the reduction functions are injected, so the class is
  plain torch).
* :class:`MetricsLogger` writes what rank 0 sees: console lines, ``<save>/metrics.jsonl`` (one JSON object per
  iteration), ``<save>/samples.jsonl`` (text samples), TensorBoard scalars and text, and optionally Weights &
  Biases (``--wandb-project``; ``WANDB_MODE=offline`` works without a network).
* :class:`Timer`: wall-clock seconds per named phase (CUDA work included: it synchronises at phase boundaries).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch.utils.tensorboard import SummaryWriter

from posttrain.arguments import ArgumentError, LoggingArgs

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _float(value) -> float:
    return float(value.detach()) if torch.is_tensor(value) else float(value)


class MetricAccumulator:
    """Named metrics accumulated over micro-batches and reduced over data-parallel ranks.

    Three kinds, each reduced in one collective:

    * means: ``sum(value * weight) / sum(weight)`` (:meth:`mean`), or ``sum(total) / sum(count)``
      (:meth:`sum_mean`, for per-sequence sums divided by the number of sequences);
    * totals: plain sums (:meth:`total`);
    * maxima (:meth:`max`).
    """

    def __init__(self):
        self._num: dict[str, float] = {}
        self._den: dict[str, float] = {}
        self._totals: dict[str, float] = {}
        self._maxima: dict[str, float] = {}

    def mean(self, name: str, value, weight: float = 1.0) -> None:
        """Add ``value`` (a mean over ``weight`` items: tokens or sequences) to the weighted mean ``name``."""
        self.sum_mean(name, _float(value) * weight, weight)

    def means(self, values: Mapping[str, object], weight: float) -> None:
        """:meth:`mean` for every entry of ``values`` with one weight."""
        for name, value in values.items():
            self.mean(name, value, weight)

    def sum_mean(self, name: str, total, count: float) -> None:
        """Add ``total`` over ``count`` items to the mean ``name`` (``sum(total) / sum(count)`` after reduction)."""
        self._num[name] = self._num.get(name, 0.0) + _float(total)
        self._den[name] = self._den.get(name, 0.0) + float(count)

    def total(self, name: str, value) -> None:
        """Add ``value`` to the total ``name``."""
        self._totals[name] = self._totals.get(name, 0.0) + _float(value)

    def max(self, name: str, value) -> None:
        """Keep the maximum of ``value`` and what ``name`` holds."""
        self._maxima[name] = max(self._maxima.get(name, -math.inf), _float(value))

    def reduce(self, sum_fn: Optional[Reduce] = None, max_fn: Optional[Reduce] = None) -> dict[str, float]:
        """Global values: means, totals and maxima over every rank (``sum_fn`` / ``max_fn`` all-reduce a float64
        vector in place and return it; None: this rank only). Every rank must call it with the same names.

        Returns:
            ``name -> float``; a mean whose weights sum to 0 is ``nan``.
        """
        out: dict[str, float] = {}
        names = sorted(self._num)
        totals = sorted(self._totals)
        vector = torch.tensor([self._num[k] for k in names] + [self._den[k] for k in names]
                              + [self._totals[k] for k in totals], dtype=torch.float64, device="cpu")
        if sum_fn is not None and vector.numel():
            vector = sum_fn(vector)
        values = vector.tolist()
        n = len(names)
        for i, name in enumerate(names):
            out[name] = values[i] / values[n + i] if values[n + i] else float("nan")
        for i, name in enumerate(totals):
            out[name] = values[2 * n + i]
        maxima = sorted(self._maxima)
        if maxima:
            vector = torch.tensor([self._maxima[k] for k in maxima], dtype=torch.float64, device="cpu")
            if max_fn is not None:
                vector = max_fn(vector)
            out.update(zip(maxima, vector.tolist()))
        return out


class MetricsLogger:
    """Console lines, ``metrics.jsonl``, ``samples.jsonl``, TensorBoard and W&B for one run (rank 0 writes).

    Args:
        save_dir: where ``metrics.jsonl`` and ``samples.jsonl`` go (None: no files).
        logging_args: ``--tensorboard-dir`` and the ``--wandb-*`` flags.
        resume_iteration: when resuming, lines past this iteration are dropped from the JSONL files, so each
            holds one line per iteration.
        config: the run's flags, recorded by W&B.
        enabled: this process writes (rank 0 of the run).

    Raises:
        ArgumentError: ``--wandb-project`` without the ``wandb`` package.
    """

    def __init__(self, save_dir: Optional[str], logging_args: LoggingArgs, resume_iteration: int = 0,
                 config: Optional[dict] = None, enabled: bool = True):
        self.enabled = enabled
        self.jsonl = self.samples_file = self.writer = self.wandb_run = None
        if not enabled:
            return
        if save_dir:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = self._open_truncated(Path(save_dir) / "metrics.jsonl", resume_iteration)
            self.samples_file = self._open_truncated(Path(save_dir) / "samples.jsonl", resume_iteration)
        if logging_args.tensorboard_dir:
            self.writer = SummaryWriter(log_dir=logging_args.tensorboard_dir)
        if logging_args.wandb_project:
            try:
                import wandb  # optional dependency, imported only when asked for
            except ImportError:
                raise ArgumentError("--wandb-project needs the wandb package (pip install wandb)") from None
            save = logging_args.wandb_save_dir or (str(Path(save_dir) / "wandb") if save_dir else None)
            if save:
                Path(save).mkdir(parents=True, exist_ok=True)
            name = logging_args.wandb_exp_name or (Path(save_dir).name if save_dir else None)
            self.wandb_run = wandb.init(project=logging_args.wandb_project, name=name, dir=save,
                                        config=config or {}, resume="allow")

    @staticmethod
    def _open_truncated(path: Path, resume_iteration: int):
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration", 0) <= resume_iteration]
            path.write_text("".join(line + "\n" for line in kept))
        return open(path, "a", encoding="utf-8")

    def log(self, iteration: int, metrics: Mapping[str, float], console_lines: Iterable[str] = ()) -> None:
        """Record one iteration's metrics (floats; non-finite ones are written as strings) and print lines."""
        if not self.enabled:
            return
        for line in console_lines:
            print(line, flush=True)
        if self.jsonl is not None:
            record = {"iteration": iteration}
            record.update({k: (v if math.isfinite(v) else str(v)) if isinstance(v, float) else v
                           for k, v in metrics.items()})
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, iteration)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=iteration)

    def samples(self, iteration: int, tag: str, rows: list[dict]) -> None:
        """Record text samples (e.g. prompt, response, score, reward): ``samples.jsonl``, TensorBoard text, W&B."""
        if not self.enabled or not rows:
            return
        if self.samples_file is not None:
            for row in rows:
                self.samples_file.write(json.dumps({"iteration": iteration, "split": tag, **row}) + "\n")
            self.samples_file.flush()
        if self.writer is not None:
            header = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
            body = "".join("| " + " | ".join(_cell(v) for v in row.values()) + " |\n" for row in rows)
            self.writer.add_text(tag, header + body, iteration)
        if self.wandb_run is not None:
            import wandb  # optional dependency (present: the run was created with it)

            table = wandb.Table(columns=list(rows[0]), data=[list(row.values()) for row in rows])
            self.wandb_run.log({f"samples/{tag}": table}, step=iteration)

    def close(self) -> None:
        for handle in (self.jsonl, self.samples_file):
            if handle is not None:
                handle.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _cell(value) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def synchronize_cuda() -> None:
    """Wait for every queued CUDA kernel of this process's current device; a no-op when CUDA is not in use
    (absent, or never initialised by this process)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Timer:
    """Wall-clock seconds per named phase: ``with timer("generate"): ...``; :meth:`pop` returns and resets.

    CUDA kernels run asynchronously: the clock is read only after :func:`synchronize_cuda` at the start and at the
    end of every phase, so a phase is charged for the GPU work it queued, not for that of the phase before it.
    """

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        return _Phase(self, name)

    def pop(self) -> dict[str, float]:
        times, self.times = self.times, {}
        return times


class _Phase:
    def __init__(self, timer: Timer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        synchronize_cuda()
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        synchronize_cuda()
        self.timer.times[self.name] = self.timer.times.get(self.name, 0.0) + time.perf_counter() - self.start
        return False
