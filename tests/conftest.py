"""Fixtures: the read-only reference data beside the repository, and a tiny random model."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SHARED, TINY
from safetensors.torch import load_file

from algnet_core import ALGNet


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"reference data not found at {SHARED} (expected ../shared beside the repository)")
    return SHARED


@pytest.fixture
def tiny_model(shared: Path) -> ALGNet:
    """The tiny configuration with the official golden weights (random, all non-zero)."""
    model = ALGNet(**TINY).eval()
    weights = shared / "reference" / "golden_tiny" / "official_weights.safetensors"
    model.load_state_dict(load_file(weights), strict=True)
    return model
