"""posttrain.cpu_backend: megatron-core on CPU-only torch, switched on only without CUDA."""
from unittest import mock

import torch


def test_cpu_backend_stays_off_when_cuda_is_available():
    from posttrain import cpu_backend

    calls = []
    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(cpu_backend, "_install_stubs", side_effect=lambda: calls.append(1)):
        assert cpu_backend.activate() is False
    assert calls == []


def test_cpu_backend_mode_rewrites_cuda_placement():
    from posttrain.cpu_backend import CudaToCpuMode

    with CudaToCpuMode():
        x = torch.zeros(3, device="cuda")
        y = torch.ones(2).to("cuda:0")
        z = torch.ones(2).cuda()
        name = torch.ones(1).type()
    assert x.device.type == y.device.type == z.device.type == "cpu"
    assert name == "torch.cuda.FloatTensor"


def test_the_precision_tool_prints_the_choice_its_measurement_implies():
    """tools/choose_precision.py: stdout is exactly ``bf16`` or ``fp32``; stderr reports the measured speed ratio,
    and the choice follows it (bf16 at 1.3x or more)."""
    import re
    import subprocess
    import sys

    from tests.torchrun_utils import REPO

    proc = subprocess.run([sys.executable, "tools/choose_precision.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    choice = proc.stdout.strip()
    speedup = float(re.search(r"bf16 matmul ([0-9.]+)x", proc.stderr).group(1))
    assert choice == ("bf16" if speedup >= 1.3 else "fp32"), proc.stderr
    forced = subprocess.run([sys.executable, "tools/choose_precision.py", "--min-speedup", "0"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert forced.stdout.strip() == "bf16"
