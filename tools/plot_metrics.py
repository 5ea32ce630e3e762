#!/usr/bin/env python
"""Plot the training curves of PPO or reward-model runs from their ``metrics.jsonl``.

    python tools/plot_metrics.py RUN_DIR_OR_JSONL [MORE ...] --output curves.png
        [--labels A B ...] [--title TEXT] [--smooth N] [--dpi 100]

Each argument is a ``--save`` directory of ``pretrain_gpt.py --stage trl_ppo`` or ``--stage rm`` (its
``metrics.jsonl`` is read) or a JSONL file of the same layout: one JSON object per line with an integer
``iteration`` and numeric metrics (non-finite values written as the strings ``"nan"``, ``"inf"``, ``"-inf"``).
The stage is detected from the keys. One PNG is written with a grid of panels; a panel is drawn when at least one
run has one of its metrics. Several runs are compared in one figure, one colour per run (legend on top).

Training metrics are lines (with ``--smooth N``: faint raw points and a trailing moving average over N logged
iterations); validation metrics (``eval/*``) are points, with +-1 standard error bars where the run logs
``eval/score_stderr``. A validation record before the first update (``iteration: 0``) is drawn at x = 0. The
held-out score gain (``eval/score_gain``, paired difference to the run's first validation) has its own panel, with
+-2 standard error bars (``eval/score_gain_stderr``) and a line at 0: a bar wholly above it is a gain beyond the noise.

Prints the PNG path and the titles of the panels drawn. Bad input (a missing file, an empty or malformed line, a
file without any known metric) is a one-line ``error: ...`` naming the file and line, exit status 1; no PNG is
written then.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from PIL import Image  # a matplotlib dependency

PathLike = Union[str, os.PathLike]


class MetricsError(ValueError):
    """Bad input; the message is one line naming the file (and line) at fault."""


# ----------------------------------------------------------------------------------------------------------------
# Panels
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Series:
    """One metric in a panel: a training line (``kind="train"``) or validation points (``kind="eval"``)."""

    key: str
    kind: str = "train"
    stderr: Optional[str] = None  # metric holding the standard error of ``key`` (drawn as error bars)
    stderr_scale: float = 1.0  # the error bars are +- stderr_scale standard errors


@dataclass(frozen=True)
class Panel:
    """One subplot: a title, the metrics drawn in it and the y-axis label."""

    title: str
    series: tuple[Series, ...]
    ylabel: str = ""
    zero_line: bool = False  # a horizontal line at y = 0


def _train(key: str) -> Series:
    return Series(key, "train")


def _eval(key: str, stderr: Optional[str] = None, stderr_scale: float = 1.0) -> Series:
    return Series(key, "eval", stderr, stderr_scale)


PPO_PANELS = (
    Panel("Score", (_train("score_mean"), _eval("eval/score_mean", stderr="eval/score_stderr")), "mean score"),
    Panel("Held-out score gain", (_eval("eval/score_gain", stderr="eval/score_gain_stderr", stderr_scale=2.0),),
          "paired gain over first validation", zero_line=True),
    Panel("Reward", (_train("reward_mean"),), "score - KL penalty"),
    Panel("KL to reference", (_train("kl"), _eval("eval/kl")), "nats / response"),
    Panel("KL coefficient", (_train("kl_coef"),)),
    Panel("Policy loss", (_train("pg_loss"),)),
    Panel("Value loss", (_train("vf_loss"),)),
    Panel("Clip fraction", (_train("pg_clipfrac"), _train("vf_clipfrac")), "fraction of tokens"),
    Panel("Entropy", (_train("entropy"),), "nats / token"),
    Panel("Response length", (_train("response_length"), _eval("eval/response_length")), "tokens"),
    Panel("EOS fraction", (_train("eos_frac"), _eval("eval/eos_frac")), "fraction of responses"),
    Panel("Seconds per iteration", (_train("time/iteration"), _train("time/generate"), _train("time/experience"),
                                    _train("time/train")), "s"),
)

RM_PANELS = (
    Panel("Loss", (_train("loss"), _eval("eval/loss"))),
    Panel("Accuracy", (_train("accuracy"), _eval("eval/accuracy")), "fraction of pairs"),
    Panel("Reward margin", (_train("reward_margin_mean"), _eval("eval/reward_margin_mean")), "chosen - rejected"),
    Panel("Chosen / rejected reward", (_train("chosen_reward_mean"), _train("rejected_reward_mean"),
                                       _eval("eval/chosen_reward_mean"), _eval("eval/rejected_reward_mean"))),
    Panel("Grad norm", (_train("grad_norm"),)),
    Panel("Learning rate", (_train("lr"),)),
    Panel("Seconds per iteration", (_train("iteration_time_s"),), "s"),
)

STAGES = {"ppo": PPO_PANELS, "rm": RM_PANELS}
STAGE_TITLES = {"ppo": "PPO training curves", "rm": "Reward-model training curves"}
# keys that only one stage writes (``lr`` and the timings are not decisive)
STAGE_MARKERS = {
    "ppo": ("score_mean", "reward_mean", "kl", "pg_loss", "vf_loss", "pg_clipfrac", "entropy", "response_length",
            "eval/score_mean"),
    "rm": ("loss", "accuracy", "reward_margin_mean", "chosen_reward_mean", "rejected_reward_mean", "eval/loss",
           "eval/accuracy"),
}
KNOWN_METRICS = frozenset(s.key for panels in STAGES.values() for p in panels for s in p.series) | frozenset(
    s.stderr for panels in STAGES.values() for p in panels for s in p.series if s.stderr)

LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")
MAX_COLUMNS = 4
PANEL_SIZE = (4.2, 3.0)  # inches per panel
RC = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
      "legend.fontsize": 8, "figure.titlesize": 13}


# ----------------------------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """The metrics of one run: ``series[key] = (iterations, values)``, sorted by iteration (float arrays)."""

    label: str
    path: Path
    series: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def has(self, key: str) -> bool:
        """Whether the run has at least one finite value of ``key``."""
        return key in self.series and bool(np.isfinite(self.series[key][1]).any())

    @property
    def stage(self) -> str:
        """``"ppo"`` or ``"rm"``, from the keys (raises :class:`MetricsError` when no known metric is present)."""
        hits = {stage: sum(self.has(k) for k in keys) for stage, keys in STAGE_MARKERS.items()}
        best = max(hits, key=hits.get)
        if not hits[best]:
            raise MetricsError(f"{self.path}: no known metric (expected PPO keys such as score_mean, kl, pg_loss or "
                               f"reward-model keys such as loss, accuracy)")
        if list(hits.values()).count(hits[best]) > 1:
            raise MetricsError(f"{self.path}: holds both PPO and reward-model metrics; cannot tell the stage")
        return best


def _number(value) -> Optional[float]:
    """A metric value as a float: numbers, and strings such as ``"nan"``/``"inf"``; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def resolve_metrics_file(path: PathLike) -> Path:
    """``path`` itself for a file, ``path/metrics.jsonl`` for a directory; :class:`MetricsError` if missing."""
    path = Path(path)
    if path.is_dir():
        if not (path / "metrics.jsonl").is_file():
            raise MetricsError(f"{path}: no metrics.jsonl in this directory")
        return path / "metrics.jsonl"
    if not path.is_file():
        raise MetricsError(f"{path}: no such file or directory")
    return path


def default_label(path: PathLike) -> str:
    """Legend name of a run: the directory name (also for ``DIR/metrics.jsonl``), else the file's stem."""
    path = Path(path)
    if path.is_dir() or path.name == "metrics.jsonl":
        directory = path if path.is_dir() else path.parent
        return directory.resolve().name or str(directory)
    return path.stem


def load_run(path: PathLike, label: Optional[str] = None) -> Run:
    """Read a run directory or a ``metrics.jsonl`` file.

    Every line must be a JSON object with a non-negative integer ``iteration``. Numeric values (and the strings
    ``"nan"``, ``"inf"``, ``"-inf"``) become float series; other values are ignored, except for the metrics this
    tool plots, which must be numeric. When an iteration appears twice (a resumed run), the later line wins.

    Raises:
        MetricsError: a missing file, an empty, non-JSON or non-object line, a bad ``iteration``, a non-numeric
            plotted metric, or a file without records (the message names the file and line).
    """
    file = resolve_metrics_file(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MetricsError(f"{file}: cannot be read ({exc.__class__.__name__}: {exc})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last record
    if not lines:
        raise MetricsError(f"{file}: empty file (no records)")
    values: dict[str, dict[int, float]] = {}
    for lineno, line in enumerate(lines, 1):
        where = f"{file}:{lineno}"
        line = line.rstrip("\r")
        if not line.strip():
            raise MetricsError(f"{where}: empty line")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MetricsError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise MetricsError(f"{where}: expected a JSON object, got {type(record).__name__}")
        iteration = record.get("iteration")
        if isinstance(iteration, float) and iteration.is_integer():
            iteration = int(iteration)
        if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
            raise MetricsError(f"{where}: missing or bad 'iteration' ({iteration!r}); expected an integer >= 0")
        for key, raw in record.items():
            if key == "iteration":
                continue
            value = _number(raw)
            if value is None:
                if key in KNOWN_METRICS:
                    raise MetricsError(f"{where}: metric {key!r} is not a number ({raw!r})")
                continue
            values.setdefault(key, {})[iteration] = value
    run = Run(label or default_label(path), file)
    for key, by_iteration in values.items():
        its = sorted(by_iteration)
        run.series[key] = (np.asarray(its, dtype=float), np.asarray([by_iteration[i] for i in its], dtype=float))
    return run


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------

def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` points (fewer at the start), skipping non-finite values.

    NaN where the window holds no finite value.
    """
    v = np.asarray(values, dtype=float)
    if window <= 1 or v.size == 0:
        return v.copy()
    padded = np.concatenate([np.full(window - 1, np.nan), v])
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    finite = np.isfinite(windows)
    count = finite.sum(axis=1)
    total = np.where(finite, windows, 0.0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _plottable(values: np.ndarray) -> np.ndarray:
    # +-inf would break the autoscaling; like NaN it is left as a gap
    return np.where(np.isfinite(values), values, np.nan)


@dataclass
class PlotResult:
    """What :func:`plot_metrics` drew: the figure, the panel titles in order, the stage and the PNG path."""

    figure: Figure
    panels: list[str]
    stage: str
    output: Path
    runs: list[Run]


def _labels_for(paths: Sequence[PathLike], labels: Optional[Sequence[str]]) -> list[str]:
    if labels is not None:
        if len(labels) != len(paths):
            raise MetricsError(f"--labels: {len(labels)} label(s) for {len(paths)} run(s)")
        return list(labels)
    names = [default_label(p) for p in paths]
    if len(set(names)) < len(names):  # e.g. a/out and b/out: the paths as given tell them apart
        names = [str(p) for p in paths]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return unique


def _draw_panel(ax, panel: Panel, runs: list[Run], colours: list, smooth: int) -> None:
    present = [s for s in panel.series if any(run.has(s.key) for run in runs)]
    train = [s for s in present if s.kind == "train"]
    evals = [s for s in present if s.kind == "eval"]
    style = {s.key: LINESTYLES[i % len(LINESTYLES)] for i, s in enumerate(train)}
    marker = {s.key: MARKERS[i % len(MARKERS)] for i, s in enumerate(evals)}
    with_stderr = set()
    drawn = []  # every finite y value (and error-bar end) drawn, for _fix_flat_range
    for run, colour in zip(runs, colours):
        for s in train:
            if not run.has(s.key):
                continue
            xs, ys = run.series[s.key]
            ys = _plottable(ys)
            drawn.append(ys)
            gid = f"{run.label}:{s.key}"
            if smooth > 1:
                ax.plot(xs, ys, linestyle=style[s.key], color=colour, alpha=0.3, linewidth=1.0,
                        marker="." if len(xs) <= 200 else None, markersize=3, gid="train:" + gid)
                ax.plot(xs, moving_average(ys, smooth), linestyle=style[s.key], color=colour, linewidth=1.8,
                        gid="smooth:" + gid)
            else:
                ax.plot(xs, ys, linestyle=style[s.key], color=colour, linewidth=1.5,
                        marker="." if len(xs) <= 50 else None, markersize=4, gid="train:" + gid)
        for s in evals:
            if not run.has(s.key):
                continue
            xs, ys = run.series[s.key]
            yerr = None
            if s.stderr and run.has(s.stderr):
                err_its, err = run.series[s.stderr]
                by_it = dict(zip(err_its.tolist(), err.tolist()))
                yerr = np.asarray([by_it.get(x, math.nan) for x in xs.tolist()], dtype=float)
                yerr = np.where(np.isfinite(yerr) & (yerr >= 0), yerr, 0.0) * s.stderr_scale
                with_stderr.add(s.key)
                drawn += [ys - yerr, ys + yerr]
            drawn.append(ys)
            bars = ax.errorbar(xs, _plottable(ys), yerr=yerr, fmt=marker[s.key], color=colour, markersize=5,
                               markeredgecolor="black", markeredgewidth=0.5, capsize=3, elinewidth=1.0,
                               linestyle="none", zorder=3)
            bars.lines[0].set_gid(f"eval:{run.label}:{s.key}")
    handles = [Line2D([], [], color="0.3", linestyle=style[s.key], label=s.key) for s in train]
    handles += [Line2D([], [], color="0.3", linestyle="none", marker=marker[s.key], markersize=5,
                       label=s.key + (f" (±{s.stderr_scale:g} s.e.)" if s.key in with_stderr else ""))
                for s in evals]
    ax.legend(handles=handles, loc="best", frameon=False, handlelength=2.2)
    ax.set_title(panel.title)
    ax.set_xlabel("iteration")
    if panel.ylabel:
        ax.set_ylabel(panel.ylabel)
    if panel.zero_line:
        ax.axhline(0.0, color="0.4", linewidth=0.8, zorder=1, gid="zero")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)
    _fix_flat_range(ax, drawn)
    ax.grid(True, alpha=0.3, linewidth=0.6)


def _fix_flat_range(ax, drawn: list) -> None:
    """A constant non-zero curve (e.g. a fixed learning rate) gets a +-5 % y range instead of a rounding-noise one."""
    values = np.concatenate([np.ravel(v) for v in drawn]) if drawn else np.array([])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    low, high = float(values.min()), float(values.max())
    centre = (low + high) / 2
    if centre != 0 and high - low <= 1e-9 * abs(centre):
        ax.set_ylim(centre - 0.05 * abs(centre), centre + 0.05 * abs(centre))


def _save_png(figure: Figure, output: Path, dpi: int) -> None:
    """Write the PNG next to ``output`` under a temporary name, then rename: no half-written file.

    The image is stored with a 256-colour palette (line plots need no more; the file is about a third of the
    size of the RGBA one).
    """
    directory = output.parent
    if not directory.is_dir():
        raise MetricsError(f"{output}: directory {directory} does not exist")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, facecolor="white", metadata={"Software": None})
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                dither=Image.Dither.NONE)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions of a file opened for writing (mkstemp makes it 0600)
        with os.fdopen(fd, "wb") as handle:
            palette.save(handle, format="PNG", optimize=True)
        os.replace(tmp, output)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise MetricsError(f"{output}: cannot be written ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_metrics(runs: Sequence[PathLike], output: PathLike, labels: Optional[Sequence[str]] = None,
                 title: Optional[str] = None, smooth: int = 0, dpi: int = 100) -> PlotResult:
    """Draw the curves of one or more runs of the same stage into one PNG.

    Args:
        runs: run directories (``--save``) or ``metrics.jsonl`` files.
        output: the PNG to write (replaced atomically).
        labels: legend names, one per run (default: the run directory names).
        title: figure title (default: "PPO training curves" or "Reward-model training curves").
        smooth: with N > 1, training lines are drawn faint with a trailing N-point moving average over them.
        dpi: resolution; the figure is 4.2 x 3.0 inches per panel, up to 4 panels a row.

    Returns:
        :class:`PlotResult`; ``result.figure.axes`` are the panels, titled as ``result.panels``.

    Raises:
        MetricsError: bad input (see :func:`load_run`), runs of different stages, a label count that does not
            match, or an output that cannot be written. Nothing is written then.
    """
    if not runs:
        raise MetricsError("no run given")
    if smooth < 0:
        raise MetricsError(f"--smooth {smooth}: must be >= 0")
    if dpi <= 0:
        raise MetricsError(f"--dpi {dpi}: must be > 0")
    names = _labels_for(runs, labels)
    loaded = [load_run(path, name) for path, name in zip(runs, names)]
    stages = [run.stage for run in loaded]
    if len(set(stages)) > 1:
        raise MetricsError("runs of different stages: " + ", ".join(f"{r.path} ({s})" for r, s in zip(loaded, stages)))
    stage = stages[0]
    panels = [p for p in STAGES[stage] if any(run.has(s.key) for s in p.series for run in loaded)]
    output = Path(output)

    ncols = min(MAX_COLUMNS, len(panels))
    nrows = -(-len(panels) // ncols)
    palette = colormaps["tab10"]
    colours = [palette(i % 10) for i in range(len(loaded))]
    with rc_context(RC):
        figure = Figure(figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows + 0.8), layout="constrained")
        FigureCanvasAgg(figure)
        for index, panel in enumerate(panels):
            _draw_panel(figure.add_subplot(nrows, ncols, index + 1), panel, loaded, colours, smooth)
        figure.suptitle(title if title is not None else STAGE_TITLES[stage])
        run_handles = [Line2D([], [], color=c, linewidth=2.5, label=r.label) for r, c in zip(loaded, colours)]
        figure.legend(handles=run_handles, loc="outside lower center", ncols=min(len(loaded), 4), frameon=False,
                      fontsize=10)
        _save_png(figure, output, dpi)
    return PlotResult(figure, [p.title for p in panels], stage, output, loaded)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (1 with a one-line ``error: ...`` on bad input)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_JSONL",
                        help="a --save directory holding metrics.jsonl, or a metrics JSONL file")
    parser.add_argument("--output", "-o", required=True, help="PNG file to write")
    parser.add_argument("--labels", nargs="+", default=None, help="legend names, one per run (default: directory names)")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--smooth", type=int, default=0, metavar="N",
                        help="also draw a trailing N-iteration moving average of the training curves")
    parser.add_argument("--dpi", type=int, default=100, help="resolution (default: 100)")
    args = parser.parse_args(argv)
    try:
        result = plot_metrics(args.runs, args.output, labels=args.labels, title=args.title, smooth=args.smooth,
                              dpi=args.dpi)
    except MetricsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.output)
    print("panels: " + ", ".join(result.panels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
