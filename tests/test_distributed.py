"""posttrain.distributed: parallel layout validation and the launcher's environment."""
import pytest


@pytest.mark.parametrize("sizes, flag", [
    ((3, 1, 1, 4), "--tensor-model-parallel-size 3"),
    ((1, 0, 1, 4), "--pipeline-model-parallel-size must be >= 1"),
    ((2, 1, 4, 4), "--expert-model-parallel-size 4"),
])
def test_parallel_size_validation_names_the_flag(sizes, flag):
    from posttrain.distributed import DistributedSetupError, validate_parallel_sizes

    tp, pp, ep, world = sizes
    with pytest.raises(DistributedSetupError, match=flag):
        validate_parallel_sizes(world, tp, pp, ep)


def test_missing_torchrun_variable_is_named(monkeypatch):
    from posttrain.distributed import DistributedSetupError, _read_launcher_env

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "0")
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(DistributedSetupError, match="MASTER_PORT"):
        _read_launcher_env()
