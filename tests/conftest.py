"""Shared fixtures: the real example model and the real data in ../shared/data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("POSTTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real Alpaca prompts and preference pairs); never copied into the project."""
    if not (SHARED_DATA / "alpaca_en_800.parquet").is_file():
        raise FileNotFoundError(f"{SHARED_DATA}: real data not found (expected ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def example_model_dir() -> Path:
    """HF directory of SmolLM2-135M-Instruct, prepared once and cached (see posttrain.example_model)."""
    from posttrain.example_model import prepare_example_model

    return prepare_example_model(verbose=False)
