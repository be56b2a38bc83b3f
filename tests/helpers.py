"""Helpers shared by the tests: where the reference data is, and tiny models whose blocks are active."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from algnet_core import ALGNet

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINY = dict(width=8, middle_blk_num=1, enc_blk_nums=(1, 1, 1, 1), dec_blk_nums=(1, 1, 1, 1))
"""The configuration of the official golden vectors (635,276 parameters)."""


def require_shared(path: Path = SHARED) -> Path:
    """``path`` if the reference data is there; else skip the test, or fail it under CI (``CI=true``)."""
    if not path.is_dir():
        reason = f"reference data not found at {path} (expected ../shared beside the repository)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must have it")
        pytest.skip(reason)
    return path


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random non-zero value (the official init zeroes the branch scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 16, generator=g).log())
            elif p.dim() > 1:  # conv and linear weights: N(0, 1/sqrt(fan_in)), as the golden weights
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def active_tiny(seed: int = 0, **kwargs: object) -> ALGNet:
    """A tiny ALGNet in eval mode whose every block is active (:func:`randomise`, so no ALGBlock is the
    identity), with the full-resolution output conv scaled down: the restoration differs from the input by
    about 4% of the value range (mean), so clipping to [0, 1] leaves nearly every pixel as computed."""
    model = randomise(ALGNet(**{**TINY, **kwargs}), seed).eval()
    with torch.no_grad():
        model.ending.weight.mul_(0.05)
        model.ending.bias.mul_(0.05)
    return model


def mamba_inputs(batch, d_inner, d_state, length, dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    """Mamba-like selective-scan inputs: delta around softplus(-2), A = -exp(A_log) in [-16, -0.5]."""
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, d_inner, length, generator=g, dtype=dtype),
        "delta": torch.randn(batch, d_inner, length, generator=g, dtype=dtype) * 0.5 - 2.0,
        "A": -torch.exp(torch.empty(d_inner, d_state, dtype=dtype).uniform_(-0.69, 2.77, generator=g)),
        "B": torch.randn(batch, d_state, length, generator=g, dtype=dtype),
        "C": torch.randn(batch, d_state, length, generator=g, dtype=dtype),
        "D": torch.randn(d_inner, generator=g, dtype=dtype),
        "z": torch.randn(batch, d_inner, length, generator=g, dtype=dtype),
        "delta_bias": torch.randn(d_inner, generator=g, dtype=dtype) * 0.1,
    }
