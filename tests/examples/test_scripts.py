"""The shell scripts: every one parses, and the GPU examples print (DRY_RUN=1) the commands they document.

A dry run needs neither GPUs nor models: each GPU script's torchrun command line is parsed and checked against its
header (GPU count, TP / PP layout) and against the flags ``pretrain_gpt.py --stage ... --help`` really has.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from tests.torchrun_utils import REPO

SHELL_SCRIPTS = sorted(str(p.relative_to(REPO)) for d in ("examples", "scripts") for p in (REPO / d).rglob("*.sh"))

# script, the stage its torchrun runs, the inputs it requires (fake paths are enough for a dry run)
GPU_SCRIPTS = {
    "examples/mcore/qwen25/trl_ppo_qwen25_0.5b.sh": ("trl_ppo", {"HF_ACTOR": "/m/actor", "HF_RM": "/m/rm"}),
    "examples/mcore/qwen25/trl_ppo_qwen25_7b.sh": ("trl_ppo", {"HF_ACTOR": "/m/actor", "HF_RM": "/m/rm"}),
    "examples/mcore/llama32/trl_ppo_llama32_1b.sh": ("trl_ppo", {"HF_ACTOR": "/m/actor", "HF_RM": "/m/rm"}),
    "examples/mcore/qwen25/rm_qwen25_0.5b.sh": ("rm", {"HF_MODEL": "/m/sft", "EVAL_DATA": "/d/eval.parquet"}),
    "examples/mcore/qwen25/rm_qwen25_7b.sh": ("rm", {"HF_MODEL": "/m/sft", "EVAL_DATA": "/d/eval.parquet"}),
    "examples/mcore/llama32/rm_llama32_1b.sh": ("rm", {"HF_MODEL": "/m/sft", "EVAL_DATA": "/d/eval.parquet"}),
}


def test_every_gpu_example_is_listed_here():
    found = {s for s in SHELL_SCRIPTS if s.startswith("examples/mcore/") and "/smollm2/" not in s
             and not s.endswith("common.sh")}
    assert found == set(GPU_SCRIPTS)


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_script_parses_and_is_strict(script):
    proc = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if not script.endswith("common.sh"):  # sourced by the examples, which set the options themselves
        assert "set -euo pipefail" in (REPO / script).read_text(), script


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

# settings the scripts read from the environment: the tests set the ones they mean and inherit none
LAYOUT_VARS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_BACKEND", "RDZV_ID", "NPROC", "TP", "PP",
               "GBS", "MBS", "PYTHON", "REWARD_MODEL", "HF_RM", "RM_FRESH", "TRANSFORMER_IMPL", "EVAL_DATA", "RM")

def dry_run(script: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in LAYOUT_VARS}
    full.update(DRY_RUN="1", OUT=str(tmp_path / "out"), DATA="/d/train.parquet", POSTTRAIN_VENV=str(tmp_path / "venv"),
                **env)
    return subprocess.run(["bash", script], cwd=REPO, env=full, capture_output=True, text=True, timeout=60)


def commands(stdout: str) -> list[list[str]]:
    """The commands a dry run printed (lines ``+ cmd args``), split as the shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def torchrun_command(cmds: list[list[str]]) -> list[str]:
    found = [c for c in cmds if "torch.distributed.run" in c or Path(c[0]).name == "torchrun"]
    assert len(found) == 1, cmds
    return found[0]


def flag_values(argv: list[str]) -> dict[str, list[str]]:
    """``--flag v1 v2`` -> {"--flag": ["v1", "v2"]} (flags without values map to [])."""
    out: dict[str, list[str]] = {}
    current = None
    for item in argv:
        if item.startswith("--"):
            current = item.split("=", 1)[0]
            out[current] = [item.split("=", 1)[1]] if "=" in item else []
        elif current is not None:
            out[current].append(item)
    return out


@lru_cache(maxsize=None)
def help_flags(*argv: str) -> frozenset:
    """Every ``--flag`` that ``python <argv> --help`` mentions."""
    proc = subprocess.run([sys.executable, *argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return frozenset(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", proc.stdout))


def header(script: str) -> str:
    lines = (REPO / script).read_text().splitlines()
    return "\n".join(line for line in lines[1:] if line.startswith("#"))


# ----------------------------------------------------------------------------------------------------------------
# GPU examples
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", sorted(GPU_SCRIPTS))
def test_gpu_example_dry_run_prints_the_documented_torchrun_command(script, tmp_path):
    stage, inputs = GPU_SCRIPTS[script]
    proc = dry_run(script, tmp_path, **inputs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmds = commands(proc.stdout)
    launch = torchrun_command(cmds)
    assert launch[0] == str(tmp_path / "venv" / "bin" / "python")  # POSTTRAIN_VENV
    entry = launch.index("pretrain_gpt.py")
    launcher, train = flag_values(launch[:entry]), flag_values(launch[entry + 1:])
    assert "--standalone" in launcher

    # the header states the hardware and the layout, and the command runs exactly that
    text = header(script)
    gpus = re.search(r"(\d+) NVIDIA GPUs with >= (\d+) GB each", text)
    layout = re.search(r"Layout: TP=(\d+), PP=(\d+), DP=(\d+) \((\d+) GPUs\)", text)
    assert gpus and layout, text[:600]
    tp, pp, dp, world = map(int, layout.groups())
    assert tp * pp * dp == world == int(gpus.group(1))
    assert launcher["--nproc_per_node"] == [str(world)]
    assert train["--stage"] == [stage]
    assert train["--tensor-model-parallel-size"] == [str(tp)]
    assert train["--pipeline-model-parallel-size"] == [str(pp)]
    assert "--bf16" in train
    assert "Memory per GPU" in text and re.search(r"=> about \d+ GB", text)
    assert f"layout: {world} GPUs = TP {tp} x PP {pp} x DP {dp}" in proc.stdout

    # every flag it passes exists
    unknown = sorted(set(train) - {"--stage"} - help_flags("pretrain_gpt.py", "--stage", stage))
    assert not unknown, unknown
    # the batch divides over the data-parallel ranks
    assert int(train["--global-batch-size"][0]) % (dp * int(train["--micro-batch-size"][0])) == 0

    # conversion, preprocessing and export are printed too, with flags their tools have
    tools = {}
    for cmd in cmds:
        for tool in ("convert_ckpt.py", "preprocess_data.py"):
            if tool in cmd:
                flags = flag_values(cmd[cmd.index(tool) + 1:])
                assert not set(flags) - help_flags(tool), (tool, sorted(set(flags) - help_flags(tool)))
                tools.setdefault(tool, []).append(flags)
    directions = [f["--direction"][0] for f in tools["convert_ckpt.py"]]
    assert directions[0] == "hf2mcore" and directions[-1] == "mcore2hf"
    assert tools["preprocess_data.py"]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_gpu_example_rejects_a_tensor_parallel_size_that_does_not_divide_the_heads(tmp_path):
    proc = dry_run("examples/mcore/qwen25/trl_ppo_qwen25_0.5b.sh", tmp_path, HF_ACTOR="/m/a", HF_RM="/m/r",
                   NPROC="6", TP="3")
    assert proc.returncode == 1
    assert "TP 3 does not divide the 14 attention heads" in proc.stderr
    assert not commands(proc.stdout)


def test_gpu_example_rejects_a_pipeline_size_that_does_not_divide_the_layers(tmp_path):
    proc = dry_run("examples/mcore/llama32/trl_ppo_llama32_1b.sh", tmp_path, HF_ACTOR="/m/a", HF_RM="/m/r",
                   NPROC="6", TP="2", PP="3")
    assert proc.returncode == 1
    assert "PP 3 does not divide the 16 layers" in proc.stderr


def test_gpu_example_reads_the_model_shape_from_its_config(tmp_path):
    # a real run reads heads and layers from the model's config.json, before it needs a GPU
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"num_attention_heads": 12, "num_key_value_heads": 3, '
                                       '"num_hidden_layers": 6}')
    env = {k: v for k, v in os.environ.items() if k not in ("POSTTRAIN_VENV", "DRY_RUN", *LAYOUT_VARS)}
    env.update(HF_ACTOR=str(model), HF_RM=str(model), DATA="/d.parquet", PYTHON=sys.executable,
               OUT=str(tmp_path / "out"), TP="2")
    proc = subprocess.run(["bash", "examples/mcore/qwen25/trl_ppo_qwen25_0.5b.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "TP 2 does not divide the 3 key/value heads" in proc.stderr  # 12 heads would have allowed it
    assert not (tmp_path / "out").exists()


def test_gpu_example_multi_node_launch(tmp_path):
    proc = dry_run("examples/mcore/qwen25/trl_ppo_qwen25_7b.sh", tmp_path, HF_ACTOR="/m/a", HF_RM="/m/r",
                   NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", RDZV_ID="job7")
    assert proc.returncode == 0, proc.stderr
    launch = torchrun_command(commands(proc.stdout))
    launcher = flag_values(launch[:launch.index("pretrain_gpt.py")])
    assert "--standalone" not in launcher
    assert launcher["--nnodes"] == ["2"] and launcher["--node-rank"] == ["1"]
    assert launcher["--nproc_per_node"] == ["8"]
    assert launcher["--rdzv-backend"] == ["c10d"]
    assert launcher["--rdzv-endpoint"] == ["node0:29500"] and launcher["--rdzv-id"] == ["job7"]
    assert "layout: 16 GPUs = TP 4 x PP 2 x DP 2" in proc.stdout


def test_gpu_example_multi_node_needs_the_master_address(tmp_path):
    proc = dry_run("examples/mcore/qwen25/trl_ppo_qwen25_7b.sh", tmp_path, HF_ACTOR="/m/a", HF_RM="/m/r",
                   NNODES="2")
    assert proc.returncode != 0
    assert "MASTER_ADDR" in proc.stderr


def test_ppo_example_takes_a_posttrain_reward_model_without_converting_one(tmp_path):
    proc = dry_run("examples/mcore/qwen25/trl_ppo_qwen25_0.5b.sh", tmp_path, HF_ACTOR="/m/a",
                   REWARD_MODEL="/ckpt/rm/iter_0000100/model")
    assert proc.returncode == 0, proc.stderr
    cmds = commands(proc.stdout)
    assert [c[c.index("--direction") + 1] for c in cmds if "convert_ckpt.py" in c] == ["hf2mcore", "mcore2hf"]
    assert flag_values(torchrun_command(cmds))["--reward-model"] == ["/ckpt/rm/iter_0000100/model"]


def test_transformer_impl_is_passed_through_when_asked(tmp_path):
    proc = dry_run("examples/mcore/llama32/rm_llama32_1b.sh", tmp_path, HF_MODEL="/m/sft",
                   TRANSFORMER_IMPL="local")
    assert proc.returncode == 0, proc.stderr
    assert flag_values(torchrun_command(commands(proc.stdout)))["--transformer-impl"] == ["local"]


# ----------------------------------------------------------------------------------------------------------------
# CPU examples
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["examples/mcore/smollm2/trl_ppo_smollm2_135m.sh",
                                    "examples/mcore/smollm2/rm_smollm2_135m.sh"])
def test_cpu_example_dry_run_installs_nothing_and_uses_the_chosen_environment(script, tmp_path):
    env = dict(RM="train") if "trl_ppo" in script else {}
    proc = dry_run(script, tmp_path, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmds = commands(proc.stdout)
    assert cmds[0] == ["bash", "scripts/install.sh"]  # printed, not run
    python = str(tmp_path / "venv" / "bin" / "python")
    pythons = {c[0] for c in cmds if any(part.endswith(".py") for part in c)}
    assert pythons == {python}
    launch = torchrun_command(cmds) if "rm_" in script else [c for c in cmds if "trl_ppo" in c][0]
    assert flag_values(launch[:launch.index("pretrain_gpt.py")])["--nproc_per_node"] == ["2"]
    if "trl_ppo" in script:
        # the reward model is trained first, then PPO, then the export
        stages = [c[c.index("--stage") + 1] for c in cmds if "--stage" in c]
        assert stages == ["rm", "trl_ppo"]
        assert cmds[-1][cmds[-1].index("--direction") + 1] == "mcore2hf"
    assert not (tmp_path / "out").exists() and not (tmp_path / "venv").exists()


# ----------------------------------------------------------------------------------------------------------------
# docs
# ----------------------------------------------------------------------------------------------------------------

def _marked_blocks():
    for doc in sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")]):
        lines = doc.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() == "<!-- runnable -->":
                assert i + 1 < len(lines) and lines[i + 1].startswith("```bash"), f"{doc.name}:{i + 1}"
                end = lines.index("```", i + 2)
                yield f"{doc.name}:{i + 1}", "\n".join(lines[i + 2:end])


def test_docs_mark_runnable_shell_blocks_and_they_parse():
    blocks = list(_marked_blocks())
    assert len(blocks) >= 3
    for where, block in blocks:
        proc = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert proc.returncode == 0, (where, proc.stderr)


def test_docs_dry_run_of_a_gpu_example_runs_here(tmp_path):
    blocks = [b for _, b in _marked_blocks() if b.startswith("DRY_RUN=1") and "examples/mcore/" in b]
    assert blocks
    for block in blocks:
        env = {k: v for k, v in os.environ.items() if k not in LAYOUT_VARS}
        proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block], cwd=REPO, env=dict(env, OUT=str(tmp_path)),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert torchrun_command(commands(proc.stdout))
