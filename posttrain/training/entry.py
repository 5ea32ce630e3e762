"""The one way a stage starts and fails: parse flags, run, turn the user's mistakes into one line.

:func:`run_stage` is every stage's ``main``: flags are parsed (argparse exits 2 on malformed ones), rank 0 prints
one line naming the implementations in use (:func:`posttrain.environment.startup_line`: device, backend, precision,
layer implementation, fused kernels or their fall-backs), the stage runs, and

* an :class:`posttrain.errors.InputError` (bad flag, file, checkpoint, data, reward function, full disk) is
  printed by rank 0 as one ``error: <message>`` line on stderr, exit status 1;
* a :class:`posttrain.errors.TrainingDivergedError` (NaN/inf loss, score or gradient) likewise, saying the last
  saved checkpoint is kept;
* anything else is a bug and keeps its traceback.

The process groups are torn down in every case.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

import torch

from posttrain.distributed import destroy_distributed
from posttrain.environment import launcher_world, startup_line
from posttrain.errors import InputError, TrainingDivergedError, one_line


def is_rank0() -> bool:
    """True on global rank 0 (and without ``torch.distributed``)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def print_rank0(text: str) -> None:
    """Print one line on rank 0 (flushed, so it interleaves correctly with torchrun's output)."""
    if is_rank0():
        print(text, flush=True)


def run_stage(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], None],
              argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` with ``parser`` and call ``run(args)``; see the module docstring for the exit codes.

    The stage's name in the start-up line is the last word of ``parser.prog`` (``pretrain_gpt.py --stage rm``:
    ``rm``); its precision and layer implementation come from ``args.bf16`` and ``args.transformer_impl``.

    Returns:
        0 on success, 1 on an input error or a diverged run.
    """
    args = parser.parse_args(argv)
    rank, world_size = launcher_world()
    try:
        if rank == 0:
            print(startup_line(parser.prog.split()[-1], bf16=bool(getattr(args, "bf16", False)),
                               transformer_impl=getattr(args, "transformer_impl", "auto"), world_size=world_size),
                  flush=True)
        run(args)
    except InputError as exc:
        if is_rank0():
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    except TrainingDivergedError as exc:
        if is_rank0():
            print(f"error: {one_line(exc)}; stopping (the last saved checkpoint is kept)", file=sys.stderr,
                  flush=True)
        return 1
    finally:
        destroy_distributed()
    return 0
