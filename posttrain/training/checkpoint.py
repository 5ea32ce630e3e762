"""Training checkpoints: one directory layout for every stage, one atomic commit, retention, safe loading.

Layout under ``--save`` (Megatron-LM's ``iter_XXXXXXX`` naming and tracker file)::

    <save>/latest_checkpointed_iteration.txt   the last complete iteration, e.g. "20"
    <save>/iter_0000020/<slot>/                 each model (actor, critic, ... ; the RM stage's "model") as a
                                                posttrain model checkpoint: --ref-model, --reward-model and
                                                convert_ckpt.py take it as it is
    <save>/iter_0000020/optimizer/<slot>/       optimiser + LR scheduler state of trained slots (dist_checkpointing)
    <save>/iter_0000020/rng/rank<k>.pt          RNG states of rank k (tensors, lists and numbers only)
    <save>/iter_0000020/trainer_state.json      iteration, data position and the stage's own state

An iteration directory is written as ``.iter_0000020.tmp`` and renamed when every rank has finished
(:class:`posttrain.atomic.AtomicDirectory`); the tracker file is replaced in one rename after that, so a crash at
any point leaves the previous checkpoint and tracker intact. Temporaries of dead runs are removed at start-up.
With ``--ckpt-keep-last K`` only the newest ``K`` iteration directories are kept.

What this module reads itself it reads as data: RNG files with ``torch.load(weights_only=True)``, the trainer state
and tracker as JSON / text; models and optimiser state go through ``dist_checkpointing``, whose tensors load with
``weights_only=True`` but whose ``.metadata`` index torch unpickles (docs/security.md: load trusted checkpoints).
Checkpoints of earlier posttrain versions load too: PPO's ``<slot>_optim/`` and ``rng_rank00000.pt``, the RM
stage's ``optimizer/`` (whose NumPy RNG state is read with NumPy's array reconstruction as the only allowed
non-tensor type).
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from megatron.core import dist_checkpointing, tensor_parallel

from posttrain.atomic import (
    AtomicDirectory,
    remove_stale_temporaries,
    write_text_atomic,
)
from posttrain.models.checkpoint import (
    CheckpointError,
    load_model_checkpoint,
    save_model_checkpoint,
)
from posttrain.processes import bind_checkpoint_writer_manager
from posttrain.training.slots import ModelSlot

TRACKER_FILE = "latest_checkpointed_iteration.txt"
STATE_FILE = "trainer_state.json"
OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def iteration_dir(root: str | Path, iteration: int) -> Path:
    """``<root>/iter_0000010`` (Megatron's naming)."""
    return Path(root) / f"iter_{iteration:07d}"


def read_latest_iteration(root: str | Path) -> Optional[int]:
    """The iteration in ``<root>/latest_checkpointed_iteration.txt``, or None when there is none.

    Raises:
        CheckpointError: the tracker file does not hold an integer.
    """
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}") from None


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


# ----------------------------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This rank's Python, NumPy, torch, CUDA and megatron RNG-tracker states as tensors, lists and numbers only
    (so it loads with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": list(random.getstate()), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                          int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (or an earlier version's pickled form)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, (list, tuple)) and torch.is_tensor(numpy_state[1]):
        kind, keys, pos, has_gauss, cached = numpy_state
        numpy_state = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng_file(path: Path) -> dict:
    """Read an RNG file with ``weights_only=True``; NumPy's array reconstruction is the one extra type allowed
    (files of earlier versions hold the NumPy state as an array).

    Raises:
        CheckpointError: the file holds anything else (it is not loaded).
    """
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np._core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal means "not a plain RNG file"
        raise CheckpointError(f"{path}: not a plain RNG state file, refusing to unpickle it "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                              "resume with --no-load-rng to skip it") from None


# ----------------------------------------------------------------------------------------------------------------
# Optimiser state
# ----------------------------------------------------------------------------------------------------------------


def save_optimizer_state(directory: Path, slot: ModelSlot) -> None:
    """Save a trained slot's optimiser (sharded, dist_checkpointing) and scheduler state (collective)."""
    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    model_sd = slot.ddp.sharded_state_dict()
    state = {"optimizer": slot.optimizer.sharded_state_dict(model_sd, metadata=_OPTIMIZER_METADATA),
             "scheduler": slot.scheduler.state_dict()}
    bind_checkpoint_writer_manager()
    dist_checkpointing.save(state, str(directory))


def load_optimizer_state(directory: Path, slot: ModelSlot) -> None:
    """Load what :func:`save_optimizer_state` wrote (at any data-parallel size)."""
    with torch.no_grad():
        model_sd = slot.ddp.sharded_state_dict()
        template = {"optimizer": slot.optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                                   metadata=_OPTIMIZER_METADATA),
                    "scheduler": slot.scheduler.state_dict()}
        state = dist_checkpointing.load(template, str(directory))
        slot.optimizer.load_state_dict(state["optimizer"])
        slot.scheduler.load_state_dict(state["scheduler"])


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint
# ----------------------------------------------------------------------------------------------------------------


class TrainingCheckpoint:
    """Saves and loads a stage's training state under one ``--save`` / ``--load`` directory (see the module
    docstring for the layout).

    Args:
        root: the ``--save`` directory (None: saving disabled; loading takes explicit directories).
        tokenizer_dir: tokenizer files copied into every saved model (None: none).
        keep_last: keep only the newest this many iteration directories (None: all).
        save_optim: write optimiser state (``--no-save-optim`` turns it off: export-only checkpoints).
        save_rng: write RNG states (``--no-save-rng``).
    """

    def __init__(self, root: Optional[str | Path], tokenizer_dir: Optional[str | Path] = None,
                 keep_last: Optional[int] = None, save_optim: bool = True, save_rng: bool = True):
        self.root = Path(root) if root else None
        self.tokenizer_dir = tokenizer_dir
        self.keep_last = keep_last
        self.save_optim = save_optim
        self.save_rng = save_rng

    # ------------------------------------------------------------------ saving
    def remove_stale(self) -> list[Path]:
        """Remove ``.iter_*.tmp`` directories left under ``root`` by runs that died while saving (rank 0)."""
        if self.root is None:
            return []
        return remove_stale_temporaries(self.root, r"^\.iter_\d+\.tmp$")

    def save(self, iteration: int, slots: Sequence[ModelSlot], trainer_state: dict,
             extra_writers: Mapping[str, Callable[[Path], None]] = ()) -> Path:
        """Write ``<root>/iter_XXXXXXX`` atomically, update the tracker, apply retention (collective).

        Args:
            iteration: the completed iteration.
            slots: the models to save (trained ones with their optimiser state).
            trainer_state: the stage's JSON-serialisable state (iteration, sampler, controllers, ...).
            extra_writers: ``name -> write(directory)`` for further model directories (e.g. the EMA actor).

        Returns:
            The iteration directory.

        Raises:
            DiskFullError: the disk filled up (the partial directory is removed, the previous checkpoint kept).
        """
        final = iteration_dir(self.root, iteration)
        with AtomicDirectory(final, what=f"checkpoint iteration {iteration}") as tmp:
            for slot in slots:
                save_model_checkpoint(slot.model, tmp / slot.name, hf_config=slot.hf_config,
                                      tokenizer_dir=self.tokenizer_dir, iteration=iteration,
                                      extra_meta=slot.save_meta, atomic=False)
                if slot.trained and self.save_optim:
                    save_optimizer_state(tmp / OPTIMIZER_DIR / slot.name, slot)
            for name, write in dict(extra_writers).items():
                write(tmp / name)
            if self.save_rng:
                if _rank() == 0:
                    (tmp / RNG_DIR).mkdir(exist_ok=True)
                if torch.distributed.is_initialized():
                    torch.distributed.barrier()
                torch.save(rng_state(), tmp / RNG_DIR / f"rank{_rank()}.pt")
            if _rank() == 0:
                state = dict(trainer_state, iteration=iteration, has_optimizer_state=self.save_optim)
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str) + "\n")
        if _rank() == 0:
            write_text_atomic(self.root / TRACKER_FILE, str(iteration))
            self._apply_retention(iteration)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return final

    def _apply_retention(self, newest: int) -> None:
        if not self.keep_last:
            return
        iterations = sorted(int(m.group(1)) for p in self.root.iterdir()
                            if p.is_dir() and (m := re.fullmatch(r"iter_(\d{7})", p.name)))
        for old in iterations[:-self.keep_last]:
            if old != newest:
                shutil.rmtree(iteration_dir(self.root, old), ignore_errors=True)

    # ------------------------------------------------------------------ loading
    @staticmethod
    def latest(root: str | Path) -> Optional[Path]:
        """The iteration directory named by ``<root>``'s tracker file, or None when there is no tracker.

        Raises:
            CheckpointError: the tracker names a directory that is missing or has no trainer state.
        """
        iteration = read_latest_iteration(root)
        if iteration is None:
            return None
        directory = iteration_dir(root, iteration)
        if not (directory / STATE_FILE).is_file():
            raise CheckpointError(f"{directory}: missing or incomplete (no {STATE_FILE})")
        return directory

    @staticmethod
    def read_state(directory: Path) -> dict:
        """The ``trainer_state.json`` of an iteration directory."""
        try:
            return json.loads((Path(directory) / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{directory / STATE_FILE}: unreadable ({exc})") from None

    @staticmethod
    def _optimizer_dir(directory: Path, slot: ModelSlot, n_trained: int) -> Optional[Path]:
        for candidate in (directory / OPTIMIZER_DIR / slot.name, directory / f"{slot.name}_optim"):
            if (candidate / "metadata.json").is_file():
                return candidate
        legacy = directory / OPTIMIZER_DIR  # one trained model: the RM stage's earlier layout
        if n_trained == 1 and (legacy / "metadata.json").is_file():
            return legacy
        return None

    def load(self, directory: Path, slots: Sequence[ModelSlot], load_optim: bool = True,
             load_rng: bool = True, steps_per_iteration: int = 1, load_models: bool = True) -> dict:
        """Load models, optimiser / scheduler states and this rank's RNG state from ``directory`` (collective).

        Without optimiser state (``load_optim`` False, or a ``--no-save-optim`` checkpoint) the optimisers start
        fresh and each LR schedule is advanced by ``iteration x steps_per_iteration`` steps, so the learning rate
        continues where the run left off. ``load_models=False`` skips the model weights (for slots that were built
        from this checkpoint's model directories already).

        Returns:
            The trainer state (``trainer_state.json``).

        Raises:
            CheckpointError: a model directory is missing or does not fit, or the RNG file is not plain data.
        """
        directory = Path(directory)
        state = self.read_state(directory)
        n_trained = sum(slot.trained for slot in slots)
        for slot in slots:
            if not (directory / slot.name).is_dir():
                raise CheckpointError(f"{directory}: no {slot.name}/ model directory")
            if load_models:
                load_model_checkpoint(slot.model, directory / slot.name)
            if not slot.trained:
                continue
            if load_optim and state.get("has_optimizer_state", True):
                optim_dir = self._optimizer_dir(directory, slot, n_trained)
                if optim_dir is None:
                    raise CheckpointError(f"{directory}: no optimiser state for {slot.name} (resume with "
                                          "--no-load-optim to start fresh optimisers)")
                load_optimizer_state(optim_dir, slot)
            else:
                slot.scheduler.step(increment=int(state["iteration"]) * steps_per_iteration)
        if load_rng:
            for path in (directory / RNG_DIR / f"rank{_rank()}.pt", directory / f"rng_rank{_rank():05d}.pt"):
                if path.is_file():
                    set_rng_state(load_rng_file(path))
                    break
        return state
