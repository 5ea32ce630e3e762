"""posttrain.parallel: vocabulary-parallel log-probs and entropy, pipeline broadcasts and DP reductions.

Expected values are float64 formulas over the full (unsharded) logits. Single-process checks run in this process;
TP = 2, PP = 2 and DP = 2 run under torchrun (tests/dist/parallel_worker.py).
"""
import pytest
import torch

from posttrain import parallel
from tests.torchrun_utils import run_torchrun


@pytest.fixture(scope="module")
def single_rank():
    from posttrain.distributed import destroy_distributed, initialize_distributed

    initialize_distributed(1, 1, 1, seed=3)
    yield
    destroy_distributed()


def reference_entropy(logits):
    log_softmax = torch.log_softmax(logits.double(), -1)
    return -(log_softmax.exp() * log_softmax).sum(-1)


@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["plain", "peaked"])
def test_entropy_matches_float64_within_rounding(single_rank, scale):
    """Also on very peaked logits (x 30), where a naive softmax-weighted sum loses precision."""
    logits = torch.randn(4, 7, 49152, generator=torch.Generator().manual_seed(0)) * scale
    got = parallel.vocab_parallel_entropy(logits)
    assert got.dtype == torch.float32
    assert (got.double() - reference_entropy(logits)).abs().max().item() < 1e-6


def test_entropy_without_autograd_in_row_chunks_equals_the_differentiable_path(single_rank):
    """The metric path (no gradient) works on [chunk_rows, V] slices; a row's value is the same either way, and
    the differentiable path's gradient is the float64 one."""
    logits = torch.randn(3, 11, 4096, generator=torch.Generator().manual_seed(5)) * 4
    metric = parallel.vocab_parallel_entropy(logits, chunk_rows=5)  # 33 rows: 7 chunks, the last one short
    leaf = logits.clone().requires_grad_()
    differentiable = parallel.vocab_parallel_entropy(leaf)
    assert differentiable.requires_grad and not metric.requires_grad
    torch.testing.assert_close(metric, differentiable.detach(), rtol=0, atol=2e-6)
    assert (metric.double() - reference_entropy(logits)).abs().max().item() < 1e-6
    differentiable.sum().backward()
    reference = logits.double().requires_grad_()
    reference_entropy(reference).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), reference.grad, rtol=0, atol=1e-6)


def test_log_probs_match_log_softmax_and_bf16_is_upcast(single_rank):
    g = torch.Generator().manual_seed(1)
    logits = (8 * torch.randn(2, 5, 300, generator=g)).bfloat16()
    labels = torch.randint(0, 300, (2, 5), generator=g)
    got = parallel.vocab_parallel_log_probs(logits, labels)
    assert got.dtype == torch.float32
    expected = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None])[..., 0]
    assert (got.double() - expected).abs().max().item() < 1e-5


def test_padded_vocabulary_is_never_chosen_and_leaves_entropy_finite(single_rank):
    logits = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(2))
    masked = parallel.mask_padded_vocab(logits, 7)
    assert torch.equal(masked[..., :7], logits[..., :7]) and (masked[..., 7:] < -1e30).all()
    assert parallel.mask_padded_vocab(logits, 10) is logits  # nothing padded: no copy
    entropy = parallel.vocab_parallel_entropy(masked)
    assert torch.isfinite(entropy).all()
    torch.testing.assert_close(entropy.double(), reference_entropy(logits[..., :7]), rtol=0, atol=1e-6)


def test_single_rank_reductions_are_identities(single_rank):
    t = torch.tensor([1.0, 2.0])
    assert parallel.dp_all_reduce(t) is t and t.tolist() == [1.0, 2.0]
    assert parallel.dp_world_size() == 1 and parallel.dp_rank() == 0 and parallel.is_last_stage()
    assert parallel.broadcast_from_last_stage(t, (2,), torch.float32) is t
    assert parallel.comm_device() == torch.device("cpu")


@pytest.mark.parametrize("mode", ["tp2", "pp2", "dp2"])
def test_layouts_under_torchrun(mode, tmp_path):
    results = run_torchrun("parallel_worker.py", ["--mode", mode], tmp_path, nproc=2)
    for r in results:
        assert r["entropy_err"] < 5e-5 and r["log_prob_err"] < 5e-5 and r["grad_err"] < 1e-5
        assert r["broadcast"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        assert r["broadcast_object"] == {"from_last": True}
    assert [r["dp_sum"] for r in results] == ([3.0, 3.0] if mode == "dp2" else [1.0, 1.0])
    assert [r["dp_max"] for r in results] == ([1.0, 1.0] if mode == "dp2" else [0.0, 0.0])
