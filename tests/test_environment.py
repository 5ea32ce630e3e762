"""posttrain.environment: the known-harmless library notices are silenced (and nothing else), and the start-up
line names what megatron-core really selected on this machine."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.torchrun_utils import REPO

# the notices megatron-core 0.16.1 and torch 2.13 print on this machine kind, raised for real: imports that fall
# back without Transformer Engine / apex, a TransformerConfig with its default cuda_graph_scope, and a notice of
# our own that must survive the filters
RAISE_NOTICES = """
import warnings
{silence}
import megatron.core.optimizer, megatron.core.models.backends
from megatron.core.transformer import TransformerConfig
TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
warnings.warn("an unrelated notice stays visible", UserWarning)
"""


def _notices(silence: bool) -> str:
    code = RAISE_NOTICES.format(silence="from posttrain.environment import silence_known_warnings\n"
                                        "silence_known_warnings()" if silence else "")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fall-back notices appear only without TE / apex")
def test_known_notices_are_silenced_and_others_are_not():
    loud = _notices(silence=False)  # the library really prints them here (else the next check proves nothing)
    assert "Transformer Engine and Apex are not installed" in loud and "Apex is not installed" in loud
    assert "full scope is deprecated" in loud
    quiet = _notices(silence=True)
    assert "not installed" not in quiet and "full scope is deprecated" not in quiet
    assert "an unrelated notice stays visible" in quiet
    assert quiet.count("Warning") == 1, quiet


def test_silenced_messages_and_modules_are_narrow():
    import warnings

    from posttrain.environment import silence_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        # torch's weights-only unpickler notice (torch/_weights_only_unpickler.py), raised from torch.serialization
        warnings.warn_explicit("Detected pickle protocol 4 in the checkpoint, which was not the default pickle "
                               "protocol used by `torch.load` (2).", UserWarning, "serialization.py", 1,
                               module="torch.serialization")
        # the same fall-back text from outside megatron-core, and a made-up other megatron-core notice: both kept
        warnings.warn_explicit("Transformer Engine and Apex are not installed.", UserWarning, "x.py", 1,
                               module="someone_else")
        warnings.warn_explicit("overlap_grad_reduce needs a bucket size", UserWarning, "x.py", 1,
                               module="megatron.core.distributed")
    assert [str(w.message) for w in caught] == ["Transformer Engine and Apex are not installed.",
                                                "overlap_grad_reduce needs a bucket size"]


def test_startup_line_names_what_megatron_selected():
    from posttrain.environment import startup_line

    line = startup_line("trl_ppo", bf16=False, transformer_impl="local", world_size=2)
    assert line.startswith("[trl_ppo] ") and "\n" not in line
    assert " 2 processes " in line and "| layers local, attention torch SDPA |" in line
    if torch.cuda.is_available():
        assert "| fp32 |" in line
    else:  # the precision, then the fp32 product kernel this process chose (posttrain.cpu_matmul)
        assert re.search(r"\| fp32, fp32 products (oneDNN|default BLAS) \((oneDNN measured at \d+\.\d\dx the default "
                         r"BLAS at start-up|POSTTRAIN_CPU_MATMUL=\w+)\) \|", line), line
    has_te = importlib.util.find_spec("transformer_engine") is not None
    has_apex = importlib.util.find_spec("apex") is not None
    if not torch.cuda.is_available():
        assert "cpu, gloo," in line
    if not has_te and not has_apex:
        assert "optimizer torch AdamW (fused)" in line and "norm torch (WrappedTorchNorm)" in line
        assert "multi-tensor ops torch fallback" in line
    bf16 = startup_line("rm", bf16=True, transformer_impl="local")
    assert "1 process |" in bf16 and "| bf16 (fp32 master weights" in bf16


@pytest.mark.skipif(torch.cuda.is_available(), reason="the bf16 note is about CPUs")
def test_startup_line_with_bf16_on_a_cpu_reports_the_measured_bf16_speed():
    from posttrain.environment import startup_line

    line = startup_line("rm", bf16=True, transformer_impl="local")
    match = re.search(r"\| bf16 \(fp32 master weights and gradient reduction\); this CPU \(([^)]*)\) multiplies bf16 "
                      r"at (\d+\.\d\d)x fp32's speed(: fp32 is faster here)?", line)
    assert match, line
    # the verdict follows the measured ratio
    assert (match.group(3) is not None) == (float(match.group(2)) < 1.0)
