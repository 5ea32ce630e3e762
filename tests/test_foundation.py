"""Foundation: megatron-core training machinery on CPU, parallel layouts, distributed set-up, example model."""
import json
import subprocess
import sys
from unittest import mock

import pytest
import torch

from tests.torchrun_utils import REPO, run_torchrun


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """World size 1: fwd + bwd + megatron optimizer step, with the weights saved by dist_checkpointing."""
    out = tmp_path_factory.mktemp("ref")
    ckpt = out / "ckpt"
    [result] = run_torchrun("foundation_worker.py", ["--mode", "ref", "--ckpt", str(ckpt)], out / "res", nproc=1)
    return ckpt, result


def test_world_size_one_trains_and_checkpoints(reference_run):
    ckpt, result = reference_run
    assert result["backend"] == "gloo" and result["cpu_backend"] and result["world_size"] == 1
    # a real optimizer step on real gradients lowers the loss on the same batch
    assert torch.isfinite(torch.tensor(result["loss_before"]))
    assert result["loss_after"] < result["loss_before"] - 1e-3
    assert (ckpt / "metadata.json").is_file()


@pytest.mark.parametrize("mode", ["tp2", "pp2", "dp2"])
def test_parallel_layouts_match_world_size_one(reference_run, mode, tmp_path):
    ckpt, ref = reference_run
    results = run_torchrun("foundation_worker.py", ["--mode", mode, "--ckpt", str(ckpt)], tmp_path, nproc=2)
    for result in results:
        assert result["loss_before"] == pytest.approx(ref["loss_before"], abs=1e-5)
        assert result["loss_after"] == pytest.approx(ref["loss_after"], abs=1e-5)


def test_checkpoint_round_trip_is_exact(tmp_path):
    """dist_checkpointing save/load restores every weight bit for bit (run as a script: the writer re-imports __main__)."""
    script = tmp_path / "roundtrip.py"
    script.write_text(f'''
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from tests.dist.foundation_worker import build
def main():
    from posttrain.distributed import initialize_distributed
    initialize_distributed(seed=3)
    from megatron.core import dist_checkpointing
    _, a = build({{}})
    import os; os.makedirs({str(tmp_path / "ck")!r})
    dist_checkpointing.save(a.sharded_state_dict(), {str(tmp_path / "ck")!r})
    torch.manual_seed(99)
    _, b = build({{}})
    b.load_state_dict(dist_checkpointing.load(b.sharded_state_dict(), {str(tmp_path / "ck")!r}))
    sa, sb = a.state_dict(), b.state_dict()
    differ = [k for k in sa if isinstance(sa[k], torch.Tensor) and not torch.equal(sa[k], sb[k])]
    print("DIFFER", len(differ), "OF", sum(isinstance(v, torch.Tensor) for v in sa.values()))
if __name__ == "__main__":
    main()
''')
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("DIFFER")][0]
    differ, total = int(line.split()[1]), int(line.split()[3])
    assert differ == 0 and total > 10


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


@pytest.mark.parametrize("sizes, flag", [
    ((3, 1, 1, 4), "--tensor-model-parallel-size 3"),
    ((1, 0, 1, 4), "--pipeline-model-parallel-size must be >= 1"),
    ((2, 1, 4, 4), "--expert-model-parallel-size 4"),
])
def test_parallel_size_validation_names_the_flag(sizes, flag):
    from posttrain.distributed import DistributedSetupError, validate_parallel_sizes

    tp, pp, ep, world = sizes
    with pytest.raises(DistributedSetupError, match=flag):
        validate_parallel_sizes(world, tp, pp, ep)


def test_missing_torchrun_variable_is_named(monkeypatch):
    from posttrain.distributed import DistributedSetupError, _read_launcher_env

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "0")
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(DistributedSetupError, match="MASTER_PORT"):
        _read_launcher_env()


def test_example_model_loads_and_answers(example_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((example_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    tokenizer = AutoTokenizer.from_pretrained(example_model_dir)
    model = AutoModelForCausalLM.from_pretrained(example_model_dir, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_example_model_tool_is_idempotent_and_rejects_bad_paths(example_model_dir, tmp_path):
    tool = [sys.executable, str(REPO / "tools" / "prepare_example_model.py")]
    again = subprocess.run(tool + ["--output-dir", str(example_model_dir)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == str(example_model_dir) and "ready" in again.stderr
    a_file = tmp_path / "file"
    a_file.write_text("x")
    bad = subprocess.run(tool + ["--output-dir", str(a_file / "model")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and str(a_file) in bad.stderr and "Traceback" not in bad.stderr
    bad_gguf = subprocess.run(tool + ["--output-dir", str(tmp_path / "m"), "--gguf", str(tmp_path / "none.gguf")],
                              capture_output=True, text=True, timeout=120)
    assert bad_gguf.returncode != 0 and "none.gguf" in bad_gguf.stderr
    assert not (tmp_path / "m").exists()
