"""The docs' commands run as written: every shell block of README.md and docs/*.md marked ``<!-- runnable -->``.

A marked block is a ```` ```bash ```` fence on the line after the marker. Each document's blocks run in order, with
``bash -c "set -euo pipefail; <block>"``, in one fresh workspace laid out as a checkout after
``bash scripts/install.sh``:

* ``<tmp>/checkout/``: symbolic links to the repository's tracked top-level entries, and ``.venv`` linked to the
  environment running the tests (so ``source .venv/bin/activate``, ``.venv/bin/python`` and ``torchrun`` work as
  written); ``<tmp>/shared`` links to the real data directory, so ``../shared/data/...`` is the real data;
* what the quick start (``examples/mcore/smollm2/trl_ppo_smollm2_135m.sh``) would have written under
  ``outputs/smollm2/``, which the README and docs/trl_ppo.md build on: here from a tiny model (2 layers, hidden 64,
  SmolLM2's tokenizer and 49,152-token vocabulary), since those blocks need *a* checkpoint, not a good one:
  ``actor_mcore/``, ``rm/final_checkpoint.txt`` (naming a value checkpoint), ``data/alpaca`` (64 real Alpaca
  prompts, ``--prompt-type hf``) and ``ppo/`` (one PPO iteration's ``metrics.jsonl``).

Documented substitutions (:data:`SUBSTITUTIONS`; each must occur in its document's blocks, so a doc edit that
removes one fails here instead of silently running the full-size command):

* iterations, epochs, held-out prompts and response tokens shrink (``--train-iters 20`` -> ``1``,
  ``--num-epochs 1`` -> ``--train-iters 3``, the fewest steps its 2 warm-up steps allow, ``--max-new-tokens 64``
  -> ``4``, ``--eval-samples 32`` -> ``4``);
* blocks that convert or train a model take the tiny HF model (``$TINY_HF``) instead of SmolLM2-135M
  (``HF_DIR=$(python tools/prepare_example_model.py)``): docs/checkpoint.md and docs/reward_model.md. The other
  blocks run that command as written (it prints the cached example model), for its tokenizer;
* the full example scripts (15 minutes and more) run with ``DRY_RUN=1``: they parse their settings and print every
  command instead of running it; tests/examples/test_scripts.py checks those commands' flags against ``--help``.

``<!-- runnable: needs network -->`` marks a block that runs on a CPU but downloads (docs/gpu.md's wheel bundle):
it is only parsed (``bash -n``). Unmarked blocks need GPUs, a network (``scripts/install.sh``) or are the test
suite itself (``scripts/test.sh``).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED_DATA
from tests.examples.test_scripts import LAYOUT_VARS, commands, flag_values, torchrun_command

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_MARK = "<!-- runnable -->"
NETWORK_MARK = "<!-- runnable: needs network -->"
TINY_CHECKPOINT = "HF_DIR=$TINY_HF  # the tiny model: these commands need a checkpoint, not SmolLM2 itself"
EXAMPLE_MODEL = "HF_DIR=$(python tools/prepare_example_model.py)"

SUBSTITUTIONS: dict[str, list[tuple[str, str]]] = {
    "README.md": [
        ("bash examples/mcore/smollm2/trl_ppo_smollm2_135m.sh",
         "DRY_RUN=1 bash examples/mcore/smollm2/trl_ppo_smollm2_135m.sh"),
        ("--train-iters 20", "--train-iters 1"),
        ("--max-new-tokens 64", "--max-new-tokens 4"),
    ],
    "checkpoint.md": [(EXAMPLE_MODEL, TINY_CHECKPOINT)],
    "reward_model.md": [
        ("bash examples/mcore/smollm2/rm_smollm2_135m.sh", "DRY_RUN=1 bash examples/mcore/smollm2/rm_smollm2_135m.sh"),
        (EXAMPLE_MODEL, TINY_CHECKPOINT),
        ("--num-epochs 1", "--train-iters 3"),  # 3 > the 2 warm-up steps
    ],
    "trl_ppo.md": [
        ("--train-iters 20", "--train-iters 1"),
        ("--max-new-tokens 64", "--max-new-tokens 4"),
        ("--eval-samples 32", "--eval-samples 4"),
    ],
}


def marked_blocks(doc: Path, mark: str = RUN_MARK) -> list[tuple[int, str]]:
    """``(line, text)`` of every ```bash block right after ``mark`` in ``doc`` (line of the marker, from 1)."""
    lines = doc.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.strip() == mark:
            assert i + 1 < len(lines) and lines[i + 1].strip() == "```bash", f"{doc.name}:{i + 1}: no ```bash fence"
            end = lines.index("```", i + 2)
            found.append((i + 1, "\n".join(lines[i + 2:end])))
    return found


def shell_lines(block: str) -> list[list[str]]:
    """The block's commands as the shell splits them (continuation lines joined, comments dropped)."""
    text = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if shlex.split(line, comments=True)]


def _tracked_top_level() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        names = {line.split("/", 1)[0] for line in out.splitlines() if line}
    except (OSError, subprocess.CalledProcessError):  # a copy without git: everything but outputs and caches
        names = {n for n in os.listdir(REPO) if n not in {".git", ".venv", "outputs", ".pytest_cache", ".whl"}}
    return sorted(n for n in names if (REPO / n).exists())


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, example_model_dir, shared_data):
    """``(checkout, env)``: the fresh checkout described in the module docstring and the environment to run in."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("docs")
    checkout = root / "checkout"
    checkout.mkdir()
    for name in _tracked_top_level():
        (checkout / name).symlink_to(REPO / name)
    assert (Path(sys.prefix) / "bin" / "activate").is_file(), "the tests must run inside a virtual environment"
    (checkout / ".venv").symlink_to(Path(sys.prefix))
    (root / "shared").symlink_to(SHARED_DATA.parent)
    env = {k: v for k, v in os.environ.items() if k not in (*LAYOUT_VARS, "DRY_RUN", "POSTTRAIN_VENV", "OUT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TINY_HF=str(root / "tiny_hf"))

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(root / "tiny_hf")
    AutoTokenizer.from_pretrained(example_model_dir).save_pretrained(root / "tiny_hf")
    out = checkout / "outputs" / "smollm2"
    py = sys.executable
    setup = [
        [py, "convert_ckpt.py", "--direction", "hf2mcore", "--load-dir", str(root / "tiny_hf"), "--save-dir",
         str(out / "actor_mcore")],
        [py, "convert_ckpt.py", "--direction", "hf2mcore", "--load-dir", str(root / "tiny_hf"), "--save-dir",
         str(out / "rm" / "iter_0000001" / "model"), "--model-kind", "value", "--init-value-head"],
        [py, "preprocess_data.py", "--input", str(shared_data / "alpaca_en_800.parquet"), "--tokenizer-name-or-path",
         str(example_model_dir), "--output-prefix", str(out / "data" / "alpaca"), "--prompt-type", "hf",
         "--seq-length", "256", "--max-samples", "64"],
        [py, "pretrain_gpt.py", "--stage", "trl_ppo", "--ref-model", str(out / "actor_mcore"), "--reward-model",
         str(out / "rm" / "iter_0000001" / "model"), "--data-path", str(out / "data" / "alpaca"),
         "--global-batch-size", "4", "--micro-batch-size", "2", "--train-iters", "1", "--max-new-tokens", "4",
         "--save", str(out / "ppo"), "--sample-interval", "0"],
    ]
    for cmd in setup:
        proc = _run(cmd, REPO, env)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-3000:]}"
    (out / "rm" / "final_checkpoint.txt").write_text(str(out / "rm" / "iter_0000001" / "model") + "\n")
    return checkout, env


def _substituted(doc: Path, blocks: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The blocks with :data:`SUBSTITUTIONS` applied; each substitution must apply somewhere."""
    subs = SUBSTITUTIONS.get(doc.name, [])
    for old, _ in subs:
        assert any(old in text for _, text in blocks), f"{doc.name}: substitution {old!r} matches no runnable block"
    out = []
    for line, text in blocks:
        for old, new in subs:
            text = text.replace(old, new)
        out.append((line, text))
    return out


RUNNABLE_DOCS = [doc for doc in DOCS if marked_blocks(doc)]


def test_every_document_with_commands_has_runnable_blocks():
    names = {doc.name for doc in RUNNABLE_DOCS}
    assert {"README.md", "checkpoint.md", "gpu.md", "preprocessing.md", "reward_model.md", "trl_ppo.md"} <= names
    assert set(SUBSTITUTIONS) <= names


@pytest.mark.parametrize("doc", RUNNABLE_DOCS, ids=[doc.name for doc in RUNNABLE_DOCS])
def test_runnable_blocks_run(doc, workspace):
    checkout, env = workspace
    for line, block in _substituted(doc, marked_blocks(doc)):
        proc = _run(["bash", "-c", "set -euo pipefail\n" + block], checkout, env)
        where = f"{doc.name}:{line}"
        assert proc.returncode == 0, f"{where} failed ({proc.returncode}):\n{block}\n{proc.stdout[-2000:]}\n" \
                                     f"{proc.stderr[-4000:]}"
        if "DRY_RUN=1" in block:
            assert commands(proc.stdout), f"{where}: the dry run printed no command"
        # the stages and tools print no library notices (posttrain/environment.py silences the harmless ones)
        noise = [l for l in proc.stderr.splitlines() if re.search(r"\b\w*Warning: ", l) and "pytest" not in l]
        assert not noise, f"{where}: {noise[:5]}"
    if doc.name == "trl_ppo.md":  # the plots of the documented runs exist
        assert (checkout / "curves.png").stat().st_size > 0 and (checkout / "compare.png").stat().st_size > 0


def test_blocks_that_need_a_network_parse():
    blocks = [(doc, b) for doc in DOCS for b in marked_blocks(doc, NETWORK_MARK)]
    assert blocks
    for doc, (line, block) in blocks:
        proc = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert proc.returncode == 0, (f"{doc.name}:{line}", proc.stderr)


def test_reward_model_recipe_uses_the_example_settings(tmp_path):
    """docs/reward_model.md quotes the example's held-out accuracy: its hand recipe must run the example's settings
    (paths aside), which the example prints under DRY_RUN=1."""
    recipe = [b for _, b in marked_blocks(REPO / "docs" / "reward_model.md") if "--stage rm" in b]
    assert len(recipe) == 1
    doc_cmds = shell_lines(recipe[0])
    env = {k: v for k, v in os.environ.items() if k not in LAYOUT_VARS}
    env.update(DRY_RUN="1", OUT=str(tmp_path / "out"), POSTTRAIN_VENV=str(tmp_path / "venv"))
    proc = subprocess.run(["bash", "examples/mcore/smollm2/rm_smollm2_135m.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    script_cmds = commands(proc.stdout)
    paths = {"--load-dir", "--save-dir", "--input", "--output-prefix", "--tokenizer-name-or-path",
             "--pretrained-checkpoint", "--load", "--save", "--data-path", "--eval-data-path", "--tensorboard-dir"}

    def number(text: str):
        try:
            return float(text)  # 5e-6 and awk's 5e-06 are the same setting
        except ValueError:
            return text

    def settings(cmd: list[str], tool: str) -> dict:
        flags = flag_values(cmd[cmd.index(tool) + 1:])
        return {k: [number(v) for v in values] for k, values in flags.items()
                if k not in paths and k != "--overwrite"}  # --overwrite: the script may rerun over its outputs

    def pick(cmds, tool, needle=""):
        return [c for c in cmds if tool in c and needle in " ".join(c)]

    train_doc = settings(pick(doc_cmds, "pretrain_gpt.py")[0], "pretrain_gpt.py")
    train_script = settings(torchrun_command(script_cmds), "pretrain_gpt.py")
    assert train_doc == train_script
    assert settings(pick(doc_cmds, "convert_ckpt.py")[0], "convert_ckpt.py") == \
           settings(pick(script_cmds, "convert_ckpt.py")[0], "convert_ckpt.py")
    for split in ("dpo_en_250", "dpo_en_50_eval"):
        doc_pre = settings(pick(doc_cmds, "preprocess_data.py", split)[0], "preprocess_data.py")
        script_pre = settings(pick(script_cmds, "preprocess_data.py", split)[0], "preprocess_data.py")
        script_pre.pop("--log-interval", None)  # progress lines only
        assert doc_pre == script_pre, split
