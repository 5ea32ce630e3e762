"""megatron-core training machinery on CPU: one optimiser step, TP / PP / DP against one process, exact
dist_checkpointing round trip (tests/dist/foundation_worker.py)."""
import subprocess
import sys

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
