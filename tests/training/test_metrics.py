"""posttrain.training.metrics: accumulation over micro-batches and DP ranks, and what the logger writes."""
import json
import math
import threading

import pytest
import torch

from posttrain.arguments import LoggingArgs
from posttrain.training.metrics import MetricAccumulator, MetricsLogger, Timer


class TwoRankSum:
    """An all-reduce between two threads, each standing for one data-parallel rank."""

    def __init__(self, op="sum"):
        self.barrier = threading.Barrier(2, timeout=30)
        self.slots = [None, None]
        self.op = op

    def fn(self, rank):
        def reduce(vector):
            self.slots[rank] = vector.clone()
            self.barrier.wait()
            a, b = self.slots
            out = a + b if self.op == "sum" else torch.maximum(a, b)
            self.barrier.wait()
            return out
        return reduce


def test_means_totals_and_maxima_over_micro_batches_and_two_ranks():
    # rank 0: two micro-batches; rank 1: one. Token-weighted means, sequence sums, totals and maxima.
    ranks = [[({"loss": 2.0, "ratio": 1.0}, 3.0), ({"loss": 4.0, "ratio": 1.5}, 1.0)],
             [({"loss": 1.0, "ratio": 0.5}, 4.0)]]
    kl_sums, seqs, maxima = [6.0, 1.5], [4, 2], [0.25, 0.75]
    accs = []
    for rank, micro in enumerate(ranks):
        acc = MetricAccumulator()
        for metrics, weight in micro:
            acc.means({k: torch.tensor(v) for k, v in metrics.items()}, weight)
        acc.sum_mean("kl", torch.tensor(kl_sums[rank]), seqs[rank])
        acc.total("num_sequences", seqs[rank])
        acc.max("gap_max", maxima[rank])
        accs.append(acc)
    sums, maxes = TwoRankSum("sum"), TwoRankSum("max")
    out = [None, None]
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, accs[r].reduce(sums.fn(r), maxes.fn(r))))
               for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert out[0] == out[1]
    got = out[0]
    assert got["loss"] == pytest.approx((2 * 3 + 4 * 1 + 1 * 4) / 8)
    assert got["ratio"] == pytest.approx((1 * 3 + 1.5 * 1 + 0.5 * 4) / 8)
    assert got["kl"] == pytest.approx(7.5 / 6)
    assert got["num_sequences"] == 6 and got["gap_max"] == 0.75


def test_a_mean_without_weight_is_nan_and_a_single_rank_needs_no_reduction():
    acc = MetricAccumulator()
    acc.mean("pg_loss", 1.0, 0.0)
    acc.mean("entropy", 2.0, 2.0)
    got = acc.reduce()
    assert math.isnan(got["pg_loss"]) and got["entropy"] == 2.0


def test_logger_writes_jsonl_and_samples_and_truncates_on_resume(tmp_path):
    args = LoggingArgs(tensorboard_dir=str(tmp_path / "tb"))
    logger = MetricsLogger(str(tmp_path), args)
    for it in (1, 2, 3):
        logger.log(it, {"loss": float(it), "bad": float("nan")}, [f"line {it}"])
        logger.samples(it, "train", [{"prompt": "p|q", "response": f"r{it}", "score": 0.5}])
    logger.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3] and records[0]["bad"] == "nan"
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples[1] == {"iteration": 2, "split": "train", "prompt": "p|q", "response": "r2", "score": 0.5}
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    # a resumed run at iteration 2 drops the lines of iterations it will redo
    MetricsLogger(str(tmp_path), LoggingArgs(), resume_iteration=2).close()
    assert [json.loads(x)["iteration"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert [json.loads(x)["iteration"] for x in (tmp_path / "samples.jsonl").read_text().splitlines()] == [1, 2]


def test_other_ranks_write_nothing(tmp_path):
    logger = MetricsLogger(str(tmp_path / "out"), LoggingArgs(), enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "out").exists()


def test_wandb_offline_run_records_scalars_and_samples(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is an optional dependency")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = LoggingArgs(wandb_project="posttrain-test", wandb_exp_name="unit")
    logger = MetricsLogger(str(tmp_path / "save"), args, config={"ppo": {"lr": 1e-6}})
    logger.log(1, {"loss": 0.5})
    logger.samples(1, "train", [{"prompt": "p", "response": "r", "score": 1.0}])
    run_dir = logger.wandb_run.dir
    logger.close()
    assert str(tmp_path / "save" / "wandb") in run_dir
    summary = json.loads((tmp_path / "save" / "wandb").glob("offline-run-*/files/wandb-summary.json").__next__()
                         .read_text())
    assert summary["loss"] == 0.5 and wandb.__version__


def test_timer_accumulates_named_phases():
    timer = Timer()
    with timer("a"):
        pass
    with timer("a"):
        pass
    with timer("b"):
        pass
    times = timer.pop()
    assert set(times) == {"a", "b"} and all(v >= 0 for v in times.values()) and timer.pop() == {}


def test_timer_synchronises_cuda_at_both_phase_boundaries_when_cuda_is_in_use(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: events.append("synchronize"))
    timer = Timer()
    with timer("generate"):
        events.append("work")
    assert events == ["synchronize", "work", "synchronize"]


@pytest.mark.parametrize("available, initialized", [(False, False), (True, False)], ids=["no-cuda", "cuda-unused"])
def test_timer_does_not_touch_cuda_when_it_is_not_in_use(monkeypatch, available, initialized):
    def synchronize(*args, **kwargs):
        raise AssertionError("synchronize called")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    timer = Timer()
    with timer("train"):
        pass
    assert set(timer.pop()) == {"train"}
