"""posttrain.arguments: flags generated from dataclasses, range checks at parse time, and the entry points' help."""
import argparse
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional

import pytest

from posttrain.arguments import (
    ArgumentError,
    CheckpointArgs,
    LoggingArgs,
    ModelArgs,
    OptimizerArgs,
    add_dataclass_args,
    arg,
    check_range,
    dataclass_from_args,
)
from tests.torchrun_utils import REPO


@dataclass
class Example:
    micro_batch_size: int = arg(1, "sequences per micro-batch")
    lr: Optional[float] = arg(None, "learning rate")
    do_sample: bool = arg(False, "sample")
    overlap: bool = arg(True, "overlap communication")
    stop_token_ids: List[int] = arg(default_factory=list, help="stop tokens")
    mode: str = arg("a", "a mode", choices=["a", "b"])
    renamed: int = arg(3, "a field whose flag differs", flag="--other-name", aliases=("--alias",))

    def __post_init__(self):
        check_range("--micro-batch-size", self.micro_batch_size, ge=1)


def parse(argv):
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Example, "example")
    return dataclass_from_args(Example, parser.parse_args(argv)), parser


def test_one_flag_per_field_with_megatron_names_and_types():
    ex, parser = parse(["--micro-batch-size", "4", "--lr", "1e-5", "--do-sample", "--no-overlap",
                        "--stop-token-ids", "2", "7", "--mode", "b", "--alias", "9"])
    assert ex == Example(micro_batch_size=4, lr=1e-5, do_sample=True, overlap=False, stop_token_ids=[2, 7], mode="b",
                         renamed=9)
    assert parse([])[0] == Example()
    help_text = parser.format_help()
    assert "--micro-batch-size" in help_text and "(default: 1)" in help_text and "--other-name" in help_text
    with pytest.raises(SystemExit):
        parse(["--mode", "c"])


def test_range_checks_name_the_flag():
    with pytest.raises(ArgumentError, match="--micro-batch-size must be >= 1, got 0"):
        parse(["--micro-batch-size", "0"])
    for flag, value, kwargs in (("--clip-ratio", -1, {"gt": 0.0}), ("--top-p", 1.5, {"gt": 0.0, "le": 1.0}),
                                ("--gamma", float("nan"), {"ge": 0.0})):
        with pytest.raises(ArgumentError, match=flag):
            check_range(flag, value, **kwargs)
    check_range("--kl-target", None, gt=0.0)  # an unset optional flag is fine


@pytest.mark.parametrize("cls, kwargs, flag", [
    (OptimizerArgs, {"lr": -1.0}, "--lr"), (OptimizerArgs, {"adam_beta2": 1.0}, "--adam-beta2"),
    (OptimizerArgs, {"clip_grad": -0.5}, "--clip-grad"), (ModelArgs, {"recompute_num_layers": 0},
                                                           "--recompute-num-layers"),
    (CheckpointArgs, {"ckpt_keep_last": 0}, "--ckpt-keep-last"), (LoggingArgs, {"log_interval": 0}, "--log-interval"),
    (LoggingArgs, {"wandb_exp_name": "x"}, "--wandb-project"),
])
def test_shared_flag_groups_validate_their_values(cls, kwargs, flag):
    with pytest.raises(ArgumentError, match=flag):
        cls(**kwargs)


def run(*argv):
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_pretrain_gpt_help_lists_the_stages_and_how_to_get_their_flags():
    proc = run("pretrain_gpt.py", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "trl_ppo" in proc.stdout and "rm" in proc.stdout and "--stage STAGE --help" in proc.stdout
    missing = run("pretrain_gpt.py", "--lr", "1e-6")
    assert missing.returncode == 2 and "error: --stage must be one of trl_ppo, rm" in missing.stderr
    assert "stages:" in missing.stderr


@pytest.mark.parametrize("stage, flags", [
    ("trl_ppo", ["--ref-model", "--policy-loss", "--transformer-impl", "--ckpt-keep-last", "--wandb-project",
                 "--dynamic-sampling", "--rollout-correction"]),
    ("rm", ["--pretrained-checkpoint", "--score-pooling", "--transformer-impl", "--no-save-optim"]),
])
def test_each_stage_lists_its_flags_with_defaults(stage, flags):
    proc = run("pretrain_gpt.py", "--stage", stage, "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in flags:
        assert flag in proc.stdout, flag
    assert "(default: " in proc.stdout
