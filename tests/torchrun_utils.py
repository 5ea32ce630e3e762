"""Launch a worker script under ``torchrun --nproc_per_node N`` from a test and collect its JSON results.

Workers live in ``tests/dist/``; each writes ``<out_dir>/rank<k>.json`` (see :func:`write_rank_result`) so the
test can compare numbers across ranks and layouts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIST_DIR = Path(__file__).resolve().parent / "dist"


def run_torchrun(script: str, args: list[str], out_dir: Path, nproc: int = 2, timeout: float = 600) -> list[dict]:
    """Run ``tests/dist/<script>`` on ``nproc`` local gloo ranks; return the per-rank JSON results.

    Raises:
        AssertionError: the run failed (its output is in the message) or a rank wrote no result.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(DIST_DIR / script), "--out-dir", str(out_dir), *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    results = []
    for rank in range(nproc):
        path = out_dir / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no result:\n{proc.stderr[-4000:]}"
        results.append(json.loads(path.read_text()))
    return results


def write_rank_result(out_dir: str | Path, payload: dict) -> None:
    """Write this rank's result as ``<out_dir>/rank<RANK>.json`` (called from a worker)."""
    rank = int(os.environ.get("RANK", "0"))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(payload))
