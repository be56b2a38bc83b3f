"""CLGF, the module that Captures Local and Global Features (paper Section 3.2, Fig. 2c).

Both branches read the same spatial features X^s = SG(DWConv3x3(Conv1x1(LN(X)))), which the ALGBlock
computes. The official names (``Glayer`` -> ``g_layer``, ``Llayer`` -> ``l_layer``) live on as the
attribute names in :class:`~algnet_core.algblock.ALGBlock`, so checkpoints load unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import layer_norm_channels
from .mamba import Mamba


class GlobalBranch(nn.Module):
    """F_G = Mamba(LN(tokens)): the H*W map as one raster-order sequence (row-major, one direction).

    Runs in float32 even under autocast, as the official ``Glayer`` does; no residual inside.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        # nn.LayerNorm's parameters and eps 1e-5 (the official code), applied over the channels of the map
        self.norm = nn.LayerNorm(channels)
        self.mamba = Mamba(channels, d_state=32, d_conv=4, expand=2)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2)  # (b, c, h*w), channel-major as Mamba takes it; token t = i*w + j
        tokens = tokens.to(torch.promote_types(tokens.dtype, torch.float32))
        with _autocast_off(x.device.type):
            out = self.mamba(layer_norm_channels(tokens, self.norm.weight, self.norm.bias, self.norm.eps))
        return out.reshape(b, c, h, w).to(x.dtype)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    if not torch.amp.is_autocast_available(device_type):  # e.g. "meta", used for cost counting
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


class LocalBranch(nn.Module):
    """F_L = Conv1x1(X^s * Conv1x1(GAP(X^s))): simplified channel attention (paper Eq. 10).

    ``pool_size`` (set by :meth:`ALGNet.use_local_pooling`) replaces the global average pool by a
    ``pool_size`` box average, the test-time "local" mode of the authors' ``ALGNetLocal`` (NAFNet's TLC).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.conv2 = nn.Conv2d(channels, channels, 1)
        self.pool_size: int | None = None

    def pool(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self.pool_size is None or (h <= self.pool_size and w <= self.pool_size):
            return x.mean(dim=(2, 3), keepdim=True)
        return box_average(x, self.pool_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(x * self.conv1(self.pool(x)))


def box_average(x: Tensor, size: int) -> Tensor:
    """Mean over every ``size`` x ``size`` window (clipped to the map), replicate-padded back to x's size.

    Uses an integral image, so the cost does not grow with ``size``.
    """
    h, w = x.shape[-2:]
    kh, kw = min(h, size), min(w, size)
    s = F.pad(x.float().cumsum(-1).cumsum(-2), (1, 0, 1, 0))
    sums = s[..., kh:, kw:] - s[..., :-kh, kw:] - s[..., kh:, :-kw] + s[..., :-kh, :-kw]
    out = sums / (kh * kw)
    dh, dw = h - out.shape[-2], w - out.shape[-1]
    return F.pad(out, (dw // 2, (dw + 1) // 2, dh // 2, (dh + 1) // 2), mode="replicate").to(x.dtype)
