"""posttrain.training.entry: the user's mistakes and diverged runs end in one line and exit 1; bugs keep their
traceback."""
import argparse

import pytest

from posttrain.arguments import ArgumentError
from posttrain.errors import TrainingDivergedError
from posttrain.training.entry import run_stage


def parser():
    result = argparse.ArgumentParser(prog="stage")
    result.add_argument("--value", type=int, default=1)
    return result


def test_an_input_error_is_one_error_line_and_exit_1(capsys):
    def run(args):
        raise ArgumentError(f"--value must be >= 2, got {args.value}\n(a second line is not printed)")

    assert run_stage(parser(), run, ["--value", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: --value must be >= 2, got 1\n"
    # stdout holds the start-up line only (device, precision, implementations), printed before the stage runs
    assert [line.split(" ")[0] for line in captured.out.splitlines()] == ["[stage]"]


def test_a_diverged_run_says_the_last_checkpoint_is_kept(capsys):
    def run(args):
        raise TrainingDivergedError("iteration 3: kl, score_mean is not finite")

    assert run_stage(parser(), run, []) == 1
    assert capsys.readouterr().err == ("error: iteration 3: kl, score_mean is not finite; stopping (the last saved "
                                       "checkpoint is kept)\n")


def test_a_bug_keeps_its_exception():
    def run(args):
        raise KeyError("internal")

    with pytest.raises(KeyError, match="internal"):
        run_stage(parser(), run, [])


def test_a_malformed_command_line_exits_2_from_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        run_stage(parser(), lambda args: None, ["--value", "x"])
    assert info.value.code == 2 and "--value: invalid int value: 'x'" in capsys.readouterr().err
