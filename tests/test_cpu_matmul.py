"""posttrain.cpu_matmul: fp32 ``aten::mm`` through oneDNN where it is faster, chosen per process.

Each case runs in a fresh interpreter (the kernel registration is process-wide) with ``POSTTRAIN_CPU_MATMUL``
forcing the choice; the reference is torch's own ``aten::mm.out`` kernel, which the registration leaves alone.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.torchrun_utils import REPO

CHECK = r"""
import json, torch
from posttrain import cpu_matmul
choice = cpu_matmul.install()
g = torch.Generator().manual_seed(0)
out = {"choice": choice, "describe": cpu_matmul.describe()}
def reference(a, b):
    return torch.ops.aten.mm.out(a, b, out=torch.empty(a.shape[0], b.shape[1]))
# a linear layer's three products at a transformer's shape: forward, input gradient, weight gradient
x = torch.randn(1016, 576, generator=g, requires_grad=True)
w = torch.randn(1536, 576, generator=g, requires_grad=True)
grad = torch.randn(1016, 1536, generator=g)
y = torch.nn.functional.linear(x, w)
y.backward(grad)
xd, wd = x.detach(), w.detach()
expected = [reference(xd, wd.t()), reference(grad, wd), reference(grad.t(), xd)]
got = [y.detach(), x.grad, w.grad]
out["max_rel_err"] = [float(((a - b).abs().max() / b.abs().max())) for a, b in zip(got, expected)]
out["bitwise"] = [bool(torch.equal(a, b)) for a, b in zip(got, expected)]
# small products, non-fp32 products and broadcast (stride-0) operands stay with the default kernel
small_a, small_b = torch.randn(8, 64, generator=g), torch.randn(64, 32, generator=g)
wide = torch.randn(1, 576, generator=g).expand(1016, 576)
out["fallback_bitwise"] = [bool(torch.equal(small_a @ small_b, reference(small_a, small_b))),
                           bool(torch.equal(wide @ wd.t(), reference(wide, wd.t()))),
                           bool(torch.equal(xd.double() @ wd.t().double(),
                                            torch.ops.aten.mm.out(xd.double(), wd.t().double(),
                                                                  out=torch.empty(1016, 1536, dtype=torch.float64))))]
print(json.dumps(out))
"""


def run_check(choice):
    env = dict(os.environ, POSTTRAIN_CPU_MATMUL=choice, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_onednn_products_equal_the_default_kernel_up_to_summation_order():
    result = run_check("onednn")
    assert result["choice"] == "onednn"
    assert result["describe"] == "oneDNN (POSTTRAIN_CPU_MATMUL=onednn)"
    # fp32 sums of 576-1536 terms in another order: a few units in the last place of the largest entry
    assert all(err < 1e-5 for err in result["max_rel_err"]), result
    assert result["fallback_bitwise"] == [True, True, True]


def test_blas_keeps_torch_default_kernel_bit_for_bit():
    result = run_check("blas")
    assert result["choice"] == "blas"
    assert result["bitwise"] == [True, True, True]
    assert result["fallback_bitwise"] == [True, True, True]


def test_auto_reports_its_measurement():
    result = run_check("auto")
    assert result["choice"] in ("onednn", "blas")
    assert "measured at" in result["describe"] and "x the default BLAS" in result["describe"]


def test_an_unknown_choice_is_one_error_line_naming_the_variable():
    """A stage started with a bad ``POSTTRAIN_CPU_MATMUL`` stops with one line and exit status 1 (the start-up line,
    which names the kernel in use, is where the choice is made)."""
    code = ("import argparse, sys; from posttrain.training.entry import run_stage; "
            "sys.exit(run_stage(argparse.ArgumentParser(prog='stage'), lambda args: None, []))")
    env = dict(os.environ, POSTTRAIN_CPU_MATMUL="fastest", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # (megatron-core's import-time warnings come first here; pretrain_gpt.py filters them)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == ("error: environment variable POSTTRAIN_CPU_MATMUL='fastest': expected one "
                                            "of auto, onednn, blas")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("choices", ["onednn,blas", "blas,onednn"])
def test_every_rank_uses_rank_0s_kernel(choices, tmp_path):
    from tests.torchrun_utils import run_torchrun

    results = run_torchrun("matmul_worker.py", ["--choices", choices], tmp_path, nproc=2)
    rank0 = choices.split(",")[0]
    assert [r["choice"] for r in results] == [rank0, rank0]
    # the default kernel bit for bit exactly where blas is in use; the same product on both ranks
    assert [r["equals_default_kernel"] for r in results] == [rank0 == "blas"] * 2
    assert results[0]["checksum"] == results[1]["checksum"]
