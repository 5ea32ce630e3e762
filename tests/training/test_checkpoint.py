"""posttrain.training.checkpoint: one layout, retention, and loading that never runs code from a checkpoint."""
import pickle
import random

import numpy as np
import pytest
import torch

from posttrain.models.checkpoint import CheckpointError
from posttrain.training.checkpoint import (
    TrainingCheckpoint,
    load_rng_file,
    read_latest_iteration,
    rng_state,
    set_rng_state,
)


@pytest.fixture(scope="module")
def single_rank():
    from posttrain.distributed import destroy_distributed, initialize_distributed

    initialize_distributed(1, 1, 1, seed=3)
    yield
    destroy_distributed()


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_state_round_trips_through_a_weights_only_file(single_rank, tmp_path):
    torch.save(rng_state(), tmp_path / "rank0.pt")
    expected = draws()
    draws()
    set_rng_state(load_rng_file(tmp_path / "rank0.pt"))
    assert draws() == expected
    torch.load(tmp_path / "rank0.pt", weights_only=True)  # plain tensors, lists and numbers only


def test_rng_file_of_an_earlier_version_loads(single_rank, tmp_path):
    """Earlier versions pickled NumPy's state as an array; NumPy's array reconstruction is the one type allowed."""
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "tracker": rng_state()["tracker"], "cuda": None}
    torch.save(legacy, tmp_path / "rng_rank00000.pt")
    expected = draws()
    set_rng_state(load_rng_file(tmp_path / "rng_rank00000.pt"))
    assert draws() == expected


class Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_an_rng_file_that_would_run_code_is_refused(tmp_path, capsys):
    with open(tmp_path / "rank0.pt", "wb") as handle:
        pickle.dump({"python": Payload()}, handle)
    with pytest.raises(CheckpointError, match="refusing to unpickle.*--no-load-rng"):
        load_rng_file(tmp_path / "rank0.pt")
    assert "this ran" not in capsys.readouterr().out


def test_layout_tracker_and_retention(single_rank, tmp_path):
    checkpoint = TrainingCheckpoint(tmp_path, keep_last=2)
    for it in (1, 2, 3):
        checkpoint.save(it, [], {"sampler": {"consumed": it}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "iter_0000003",
                                                          "latest_checkpointed_iteration.txt"]
    assert read_latest_iteration(tmp_path) == 3
    latest = TrainingCheckpoint.latest(tmp_path)
    assert latest == tmp_path / "iter_0000003" and (latest / "rng" / "rank0.pt").is_file()
    state = TrainingCheckpoint.read_state(latest)
    assert state["iteration"] == 3 and state["sampler"] == {"consumed": 3} and state["has_optimizer_state"]


def test_stale_temporary_of_a_dead_run_is_removed_at_start_up(tmp_path):
    (tmp_path / ".iter_0000005.tmp").mkdir()
    (tmp_path / ".iter_0000005.tmp" / "WRITER").write_text("nowhere:1")  # another host: not ours to remove
    (tmp_path / ".iter_0000006.tmp").mkdir()
    import socket
    (tmp_path / ".iter_0000006.tmp" / "WRITER").write_text(f"{socket.gethostname()}:999999999")
    assert TrainingCheckpoint(tmp_path).remove_stale() == [tmp_path / ".iter_0000006.tmp"]


def test_a_tracker_without_its_directory_is_a_checkpoint_error(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(CheckpointError, match="iter_0000007"):
        TrainingCheckpoint.latest(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("seven")
    with pytest.raises(CheckpointError, match="expected an iteration number"):
        TrainingCheckpoint.latest(tmp_path)
