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
