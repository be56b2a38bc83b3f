"""Fixtures: the read-only reference data beside the repository, and tiny models with active blocks.

Tests that need ``../shared`` take the ``shared`` fixture (directly or through ``tiny_model``): without the
data they are skipped with one reason, except under CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from helpers import TINY, active_tiny, require_shared
from safetensors.torch import load_file

from algnet_core import ALGNet

# The tests' tensors are tiny: one intra-op thread is as fast, and on a busy 2-core machine OpenMP's
# waiting threads make a small convolution ~100x slower (a 4-step tiny training run: 38 s instead of 2 s).
torch.set_num_threads(1)
with contextlib.suppress(ImportError):
    import numba

    # numba's OpenMP layer resets the OpenMP thread count, i.e. torch's, at its first parallel kernel; its
    # work queue leaves torch at one thread (and the cpu scan kernels still run in parallel).
    numba.config.THREADING_LAYER = "workqueue"


@pytest.fixture(scope="session")
def shared() -> Path:
    """The reference data folder ``../shared`` (see :func:`helpers.require_shared`)."""
    return require_shared()


@pytest.fixture
def tiny_model(shared: Path) -> ALGNet:
    """The tiny configuration with the official golden weights (random, all non-zero)."""
    model = ALGNet(**TINY).eval()
    weights = shared / "reference" / "golden_tiny" / "official_weights.safetensors"
    model.load_state_dict(load_file(weights), strict=True)
    return model


@pytest.fixture(scope="module")
def active_model() -> ALGNet:
    """:func:`helpers.active_tiny`: every block active, output within a few percent of the input."""
    return active_tiny()


@pytest.fixture(scope="session")
def active_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A save_pretrained folder of :func:`helpers.active_tiny` (every block active), read by the CLI and napari
    tests as a local model folder."""
    folder = tmp_path_factory.mktemp("active") / "tiny"
    active_tiny().save_pretrained(folder)
    return folder
