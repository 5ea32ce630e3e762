"""tools/plot_metrics.py on the metrics.jsonl of a real PPO run.

The run is a short ``pretrain_gpt.py --stage trl_ppo`` (3 iterations, validation every iteration) on the tiny Llama
with SmolLM2's tokenizer and the real Alpaca prompts, built by the fixtures of tests/trl_ppo/test_trainer.py.
"""
import importlib.util
import json
import math
import struct
import sys

import pytest

from posttrain.rm.loss import METRIC_NAMES
from tests.torchrun_utils import REPO
from tests.trl_ppo.test_trainer import _run, assets, ppo  # noqa: F401  (assets is a fixture used below)

TOOL = REPO / "tools" / "plot_metrics.py"
_spec = importlib.util.spec_from_file_location("plot_metrics", TOOL)
plot_metrics_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = plot_metrics_module  # tools/ is not a package; dataclasses look the module up
_spec.loader.exec_module(plot_metrics_module)
plot_metrics = plot_metrics_module.plot_metrics

PPO_TITLES = ["Score", "Held-out score gain", "Reward", "KL to reference", "KL coefficient", "Policy loss", "Value loss", "Clip fraction",
              "Entropy", "Response length", "EOS fraction", "Seconds per iteration"]
RM_TITLES = ["Loss", "Accuracy", "Reward margin", "Chosen / rejected reward", "Grad norm", "Learning rate",
             "Seconds per iteration"]
# training metrics per PPO panel (the lines each run contributes)
PPO_TRAIN_KEYS = {"Score": ["score_mean"], "Reward": ["reward_mean"], "KL to reference": ["kl"],
                  "KL coefficient": ["kl_coef"], "Policy loss": ["pg_loss"], "Value loss": ["vf_loss"],
                  "Clip fraction": ["pg_clipfrac", "vf_clipfrac"], "Entropy": ["entropy"],
                  "Response length": ["response_length"], "EOS fraction": ["eos_frac"],
                  "Seconds per iteration": ["time/iteration", "time/generate", "time/experience", "time/train"]}


@pytest.fixture(scope="module")
def ppo_run(assets, tmp_path_factory):  # noqa: F811
    """``--save`` directory of a 3-iteration PPO run validated before the first update and after every iteration,
    its training records and its iteration-0 validation record."""
    out = tmp_path_factory.mktemp("plot_ppo_run")
    extra = ["--do-sample", "--eval-data-path", str(assets / "alpaca"), "--eval-samples", "4", "--eval-interval", "1"]
    proc, records = ppo(assets, out, extra=extra, iters=3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    assert all("eval/score_mean" in r and "eval/score_stderr" in r for r in records)
    assert all(not k.startswith(("time/", "pg_", "vf_")) for k in records[0])  # validation only
    # the paired gain over the iteration-0 validation: from the second validation on
    assert "eval/score_gain" not in records[0]
    assert all("eval/score_gain" in r and "eval/score_gain_stderr" in r for r in records[1:])
    return out, records[1:], records[0]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def lines_by_gid(ax, prefix):
    return {line.get_gid(): line for line in ax.get_lines() if (line.get_gid() or "").startswith(prefix)}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_command_plots_a_ppo_run(ppo_run, tmp_path):
    out, _, _ = ppo_run
    png = tmp_path / "curves.png"
    proc = _run([sys.executable, str(TOOL), str(out), "--output", str(png), "--title", "tiny PPO"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(png), "panels: " + ", ".join(PPO_TITLES)]
    # 12 panels: 4 columns x 3 rows of 4.2 x 3.0 inches at 100 dpi, plus the title and legend strip
    assert png_size(png) == (1680, 980)
    assert png.stat().st_size < 200_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


def test_panels_hold_the_run_metrics(ppo_run, tmp_path):
    out, records, start = ppo_run
    result = plot_metrics([out], tmp_path / "curves.png")
    assert result.stage == "ppo"
    assert result.panels == PPO_TITLES
    assert [ax.get_title() for ax in result.figure.axes] == PPO_TITLES
    axes = {ax.get_title(): ax for ax in result.figure.axes}
    label = out.name
    for title, keys in PPO_TRAIN_KEYS.items():
        lines = lines_by_gid(axes[title], "train:")
        assert sorted(lines) == sorted(f"train:{label}:{k}" for k in keys), title
        for key in keys:
            line = lines[f"train:{label}:{key}"]
            assert list(line.get_xdata()) == [1, 2, 3]
            assert list(line.get_ydata()) == pytest.approx([r[key] for r in records]), key
    # validation as points at the iterations it ran, iteration 0 included
    for title, key in (("Score", "eval/score_mean"), ("Response length", "eval/response_length")):
        point = lines_by_gid(axes[title], "eval:")[f"eval:{label}:{key}"]
        assert point.get_linestyle() == "None"
        assert list(point.get_xdata()) == [0, 1, 2, 3]
        assert list(point.get_ydata()) == pytest.approx([r[key] for r in [start] + records])
    legend = [t.get_text() for t in axes["Score"].get_legend().get_texts()]
    assert legend == ["score_mean", "eval/score_mean (±1 s.e.)"]
    assert [t.get_text() for t in result.figure.legends[0].get_texts()] == [label]


def test_two_runs_give_one_line_each_per_training_panel(ppo_run, tmp_path):
    out, records, _ = ppo_run
    shorter = write_jsonl(tmp_path / "first_two.jsonl", records[:2])  # the same run stopped after 2 iterations
    result = plot_metrics([out / "metrics.jsonl", shorter], tmp_path / "both.png", labels=["full", "stopped"])
    axes = {ax.get_title(): ax for ax in result.figure.axes}
    assert list(axes) == PPO_TITLES
    for title, keys in PPO_TRAIN_KEYS.items():
        lines = lines_by_gid(axes[title], "train:")
        assert len(lines) == 2 * len(keys), title
        for key in keys:
            full, stopped = lines[f"train:full:{key}"], lines[f"train:stopped:{key}"]
            assert list(full.get_xdata()) == [1, 2, 3] and list(stopped.get_xdata()) == [1, 2]
            assert full.get_color() != stopped.get_color()
    assert [t.get_text() for t in result.figure.legends[0].get_texts()] == ["full", "stopped"]


def test_validation_at_iteration_0_with_standard_error_bars(ppo_run, tmp_path):
    # the validation before the first update (a record holding only eval/* keys) and the standard error of the
    # mean score of every evaluation, as the trainer wrote them
    out, records, start = ppo_run
    result = plot_metrics([out], tmp_path / "curves.png", labels=["run"])
    axes = {ax.get_title(): ax for ax in result.figure.axes}
    score = axes["Score"]
    (bars,) = score.containers
    point = bars.lines[0]
    assert point.get_gid() == "eval:run:eval/score_mean"
    assert list(point.get_xdata()) == [0, 1, 2, 3]
    (segments,) = [c.get_segments() for c in bars.lines[2]]
    evaluations = [start] + records
    for (bottom, top), r in zip(segments, evaluations):
        y, e = r["eval/score_mean"], r["eval/score_stderr"]
        assert bottom[1] == pytest.approx(y - e) and top[1] == pytest.approx(y + e)
    # training lines start at the first update; the iteration-0 record adds no training point
    assert list(lines_by_gid(score, "train:")["train:run:score_mean"].get_xdata()) == [1, 2, 3]
    assert "eval/score_mean (±1 s.e.)" in [t.get_text() for t in score.get_legend().get_texts()]
    kl_points = lines_by_gid(axes["KL to reference"], "eval:")["eval:run:eval/kl"]
    assert list(kl_points.get_xdata()) == [0, 1, 2, 3]


def test_held_out_gain_with_two_standard_error_bars_and_a_zero_line(ppo_run, tmp_path):
    out, records, _ = ppo_run
    result = plot_metrics([out], tmp_path / "curves.png", labels=["run"])
    gain = {ax.get_title(): ax for ax in result.figure.axes}["Held-out score gain"]
    (bars,) = gain.containers
    point = bars.lines[0]
    assert point.get_gid() == "eval:run:eval/score_gain"
    assert list(point.get_xdata()) == [1, 2, 3]  # none at iteration 0: that validation is the baseline
    assert list(point.get_ydata()) == pytest.approx([r["eval/score_gain"] for r in records])
    (segments,) = [c.get_segments() for c in bars.lines[2]]
    for (bottom, top), r in zip(segments, records):
        y, e = r["eval/score_gain"], r["eval/score_gain_stderr"]
        assert bottom[1] == pytest.approx(y - 2 * e) and top[1] == pytest.approx(y + 2 * e)
    assert [t.get_text() for t in gain.get_legend().get_texts()] == ["eval/score_gain (±2 s.e.)"]
    (zero,) = [line for line in gain.get_lines() if line.get_gid() == "zero"]
    assert list(zero.get_ydata()) == [0, 0]


def test_smoothing_draws_a_moving_average_beside_the_raw_points(ppo_run, tmp_path):
    out, records, _ = ppo_run
    result = plot_metrics([out], tmp_path / "curves.png", labels=["run"], smooth=2)
    kl = {ax.get_title(): ax for ax in result.figure.axes}["KL to reference"]
    raw = [r["kl"] for r in records]
    assert list(lines_by_gid(kl, "train:")["train:run:kl"].get_ydata()) == pytest.approx(raw)
    smoothed = lines_by_gid(kl, "smooth:")["smooth:run:kl"].get_ydata()
    assert list(smoothed) == pytest.approx([raw[0], (raw[0] + raw[1]) / 2, (raw[1] + raw[2]) / 2])


def test_moving_average_skips_non_finite_values():
    values = [1.0, math.nan, 3.0, 5.0, math.nan, math.nan]
    got = plot_metrics_module.moving_average(values, 2)
    assert list(got[:5]) == [1.0, 1.0, 3.0, 4.0, 5.0] and math.isnan(got[5])


def test_reward_model_metrics_give_the_rm_panels(tmp_path):
    # the keys of a --stage rm run: the pairwise statistics, optimiser and timing values, eval/* at the last one
    records = []
    for it in range(1, 5):
        stats = dict(zip(METRIC_NAMES, (0.7 - 0.05 * it, 0.5 + 0.1 * it, 0.1 * it, 0.05 * it, -0.05 * it)))
        record = {"iteration": it, **stats, "num_pairs": 8, "grad_norm": 2.0 / it, "lr": 1e-5 + (it % 2) * 1e-17, "tokens": 900.0,
                  "step_skipped": 0.0, "iteration_time_s": 0.5, "tokens_per_s": 1800.0, "epoch": 0,
                  "consumed_pairs": 8 * it}
        if it == 4:
            record.update({f"eval/{k}": v for k, v in stats.items()})
        records.append(record)
    path = write_jsonl(tmp_path / "rm_metrics.jsonl", records)
    result = plot_metrics([path], tmp_path / "rm.png", smooth=3)
    assert result.stage == "rm"
    assert [ax.get_title() for ax in result.figure.axes] == RM_TITLES
    axes = {ax.get_title(): ax for ax in result.figure.axes}
    rewards = axes["Chosen / rejected reward"]
    assert sorted(lines_by_gid(rewards, "train:")) == ["train:rm_metrics:chosen_reward_mean",
                                                      "train:rm_metrics:rejected_reward_mean"]
    assert sorted(lines_by_gid(rewards, "eval:")) == ["eval:rm_metrics:eval/chosen_reward_mean",
                                                     "eval:rm_metrics:eval/rejected_reward_mean"]
    assert png_size(tmp_path / "rm.png") == (1680, 680)
    # a learning rate constant but for float rounding gets a readable +-5 % range, not one of 1e-17
    assert axes["Learning rate"].get_ylim() == pytest.approx((0.95e-5, 1.05e-5))


def test_malformed_line_is_a_one_line_error_and_no_png(ppo_run, tmp_path):
    out, _, _ = ppo_run
    lines = (out / "metrics.jsonl").read_text().splitlines()
    bad = tmp_path / "metrics.jsonl"
    bad.write_text("\n".join([lines[0], lines[1][: len(lines[1]) // 2], lines[2]]) + "\n")
    png = tmp_path / "curves.png"
    proc = _run([sys.executable, str(TOOL), str(bad), "--output", str(png)])
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith(f"error: {bad}:2: not valid JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("content, message", [
    ('{"iteration": 1, "kl": 0.1}\n\n{"iteration": 2, "kl": 0.2}\n', "{path}:2: empty line"),
    ('{"iteration": 1, "kl": 0.1}\n[1, 2]\n', "{path}:2: expected a JSON object"),
    ('{"kl": 0.1}\n', "{path}:1: missing or bad 'iteration'"),
    ('{"iteration": 1, "kl": "high"}\n', "{path}:1: metric 'kl' is not a number"),
    ('{"iteration": 1, "tokens": 5.0}\n', "{path}: no known metric"),
    ("", "{path}: empty file"),
], ids=["empty-line", "not-an-object", "no-iteration", "non-numeric-metric", "no-known-metric", "empty-file"])
def test_bad_jsonl_is_a_one_line_error(tmp_path, capsys, content, message):
    path = tmp_path / "metrics.jsonl"
    path.write_text(content)
    assert plot_metrics_module.main([str(path), "--output", str(tmp_path / "out.png")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: " + message.format(path=path)) and captured.err.count("\n") == 1
    assert not (tmp_path / "out.png").exists()


def test_missing_run_and_mixed_stages_are_errors(ppo_run, tmp_path, capsys):
    out, _, _ = ppo_run
    assert plot_metrics_module.main([str(tmp_path / "nowhere"), "--output", str(tmp_path / "a.png")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: no such file or directory\n"
    rm = write_jsonl(tmp_path / "rm.jsonl", [{"iteration": 1, "loss": 0.7, "accuracy": 0.5}])
    assert plot_metrics_module.main([str(out), str(rm), "--output", str(tmp_path / "a.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: runs of different stages:") and f"{rm} (rm)" in err and err.count("\n") == 1
    assert not (tmp_path / "a.png").exists()
