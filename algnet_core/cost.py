"""What ALGNet costs, counted honestly, next to the paper-style count (``../shared/reference/COSTS.md``).

The network runs on the ``meta`` device (shapes only, no arithmetic) under
:class:`torch.utils.flop_counter.FlopCounterMode`, which sees every convolution and matrix product; the
selective scan does nothing there (whichever backend is chosen), and forward hooks on the global branches
record its size: B*L*d_inner*d_state (position, channel, state) elements, each costing
:data:`SCAN_FLOPS_PER_ELEMENT` FLOPs (dA = exp(delta*A): 2, B*(delta*u): 1, state update: 2, C readout: 2).

The paper-style figure is what module-hook counters (thop, ptflops) report when Mamba runs its fused
CUDA path: only the Conv2d layers. It misses Mamba's projections and the scan altogether, which is how
the authors' first configuration came out at "17 G" (MACs, not FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .clgf import GlobalBranch
from .model import PRESETS, ALGNet

SCAN_FLOPS_PER_ELEMENT = 7


@dataclass(frozen=True)
class Cost:
    """Cost of one forward pass. MACs are multiply-accumulates (1 MAC = 2 FLOPs)."""

    params: int
    conv_macs: int
    matmul_macs: int
    scan_elements: int
    hook_macs: int

    @property
    def scan_flops(self) -> int:
        return SCAN_FLOPS_PER_ELEMENT * self.scan_elements

    @property
    def total_flops(self) -> int:
        return 2 * (self.conv_macs + self.matmul_macs) + self.scan_flops


def count_cost(config: dict, height: int = 256, width: int = 256) -> Cost:
    """Count parameters and the cost of a (1, 3, height, width) forward of ``ALGNet(**config)``."""
    with torch.device("meta"):
        model = ALGNet(**config)
    scan_elements = 0

    def record_scan(branch: nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal scan_elements
        b, _, h, w = args[0].shape
        scan_elements += b * h * w * branch.mamba.d_inner * branch.mamba.d_state

    for module in model.modules():
        if isinstance(module, GlobalBranch):
            module.register_forward_hook(record_scan)
    counter = FlopCounterMode(display=False, depth=None)
    with counter, torch.no_grad():
        model(torch.empty(1, model.intro.in_channels, height, width, device="meta"))
    counts = counter.get_flop_counts()
    ops = counts["Global"]
    aten = torch.ops.aten
    conv = ops.get(aten.convolution, 0)
    # Matrix products: Mamba's projections (bmm) and any Linear; none from the scan (empty on ``meta``).
    matmul = ops.get(aten.mm, 0) + ops.get(aten.addmm, 0) + ops.get(aten.bmm, 0)
    mamba_conv = sum(c.get(aten.convolution, 0) for name, c in counts.items() if name.endswith(".mamba"))
    return Cost(
        params=sum(p.numel() for p in model.parameters()),
        conv_macs=conv // 2,
        matmul_macs=matmul // 2,
        scan_elements=scan_elements,
        hook_macs=(conv - mamba_conv) // 2,
    )


def describe(preset: str = "ALGNet", height: int = 256, width: int = 256) -> str:
    """A human-readable cost report of a preset, as printed by ``algnet info``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    config = PRESETS[preset]
    c = count_cost(config, height, width)
    g = 1e9
    enc, dec = list(config["enc_blk_nums"]), list(config["dec_blk_nums"])
    blocks = f"middle {config['middle_blk_num']}, enc {enc}, dec {dec}"
    return "\n".join(
        [
            f"{preset}: width {config['width']}, {blocks}",
            f"parameters            {c.params:,} ({c.params * 4 / 1e6:.1f} MB in float32)",
            f"cost of one 1x3x{height}x{width} forward, counted honestly:",
            f"  convolutions        {c.conv_macs / g:8.2f} GMACs",
            f"  matrix products     {c.matmul_macs / g:8.2f} GMACs",
            f"  selective scan      {c.scan_elements / g:8.3f} G elements x {SCAN_FLOPS_PER_ELEMENT} FLOPs"
            f" = {c.scan_flops / g:.2f} GFLOPs",
            f"  total               {c.total_flops / g:8.2f} GFLOPs = {c.total_flops / 2 / g:.2f} GMACs",
            f"paper-style hook count {c.hook_macs / g:7.2f} GMACs (Conv2d layers only: what thop/ptflops"
            " report when Mamba runs fused; misses the projections and the scan)",
        ]
    )
