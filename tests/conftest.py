"""Fixtures: the read-only reference data beside the repository, and tiny models with active blocks.

Tests that need ``../shared`` take the ``shared`` fixture (directly or through ``tiny_model``): without the
data they are skipped with one reason, except under CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import os

# numba's OpenMP threading layer resets the OpenMP thread count, i.e. torch's, at its first parallel kernel;
# its own work queue leaves torch's setting below alone (and the cpu scan kernels still run in parallel).
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import TINY, active_tiny, require_shared  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from algnet_core import ALGNet  # noqa: E402

# The tests' tensors are tiny: one intra-op thread is as fast, and on a busy 2-core machine OpenMP's
# waiting threads make a small convolution ~100x slower (a 4-step tiny training run: 38 s instead of 2 s).
torch.set_num_threads(1)


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
