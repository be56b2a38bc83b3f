"""ALGBlock: CLGF + FA + a gated feed-forward network (paper Section 3, Fig. 2b).

The official code (``BasicBlock`` in the authors' ``algnet.py``), which this follows so that checkpoints
are interchangeable, differs from the paper text in ways listed in ``../shared/reference/
OFFICIAL_CODE_NOTES.md``:

* FA (Eq. 11, F_A = F_G + W F_L with W initialised to 1) is, in the code, a per-channel recalibration
  F_A = (1 + inside_all) * lamb_g * F_G + lamb_l * F_L with ``inside_all``, ``lamb_g`` and ``lamb_l``
  all initialised to 0: the learnable factor with effective value 1 at init sits on the global branch,
  and both branches carry zero-initialised per-channel scales, so every block starts as the identity.
* The block output is X_l = Y + beta * FFN(Y) with Y = X_{l-1} + F_A (Eq. 12 adds F_A again instead).
* ``gamma`` and ``conv3_2`` exist in official checkpoints but are never used by its forward; they are
  kept (only in the official configuration) so that ``load_state_dict(strict=True)`` works.

Ablations of the paper (Tables 4 and 5) are configuration: ``branches`` = ``"both"`` (CLGF),
``"global"`` (CLGF without the local branch) or ``"local"`` (CLGF without the global branch: the local
branch is NAFNet's simplified channel attention, so this *is* the NAFNet block, the paper's Baseline),
and ``aggregation`` = ``"fa"`` (official), ``"sum"`` (lamb_g F_G + lamb_l F_L, i.e. FA without its factor)
or ``"concat"`` (lamb_g Conv1x1([F_G, F_L]), using the 2C->C 1x1 conv that the official code leaves unused).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .clgf import GlobalBranch, LocalBranch
from .layers import LayerNorm2d, SimpleGate

Branches = Literal["both", "global", "local"]
Aggregation = Literal["fa", "sum", "concat"]


class ALGBlock(nn.Module):
    """Aggregate Local and Global features block on a (b, c, h, w) map; output has the same shape."""

    def __init__(self, channels: int, branches: Branches = "both", aggregation: Aggregation = "fa") -> None:
        super().__init__()
        if branches not in ("both", "global", "local"):
            raise ValueError(f"branches must be 'both', 'global' or 'local', not {branches!r}")
        if aggregation not in ("fa", "sum", "concat"):
            raise ValueError(f"aggregation must be 'fa', 'sum' or 'concat', not {aggregation!r}")
        c = channels
        self.branches, self.aggregation = branches, aggregation
        official = branches == "both" and aggregation == "fa"
        concat = branches == "both" and aggregation == "concat"
        uses_global = branches != "local"
        uses_local = branches != "global"
        # Per-channel scales; parameter order is the official state_dict order.
        if official:
            self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))  # unused by the official forward
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        if official:
            self.inside_all = nn.Parameter(torch.zeros(c, 1, 1))  # FA's learnable factor W = 1 + inside_all
        if uses_global:
            self.lamb_g = nn.Parameter(torch.zeros(c))
        if uses_local and not concat:
            self.lamb_l = nn.Parameter(torch.zeros(c))
        # Spatial features X^s = SG(DWConv3x3(Conv1x1(LN(X)))): (b, c, h, w) -> (b, 2c) -> (b, c)
        self.conv1 = nn.Conv2d(c, 2 * c, 1)
        self.conv2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        if official or concat:
            self.conv3_2 = nn.Conv2d(2 * c, c, 1)  # the concat aggregation; unused by the official forward
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        # Gated feed-forward network: Conv1x1(SG(Conv1x1(LN(Y)))).
        self.conv4 = nn.Conv2d(c, 2 * c, 1)
        self.conv5 = nn.Conv2d(c, c, 1)
        self.sg = SimpleGate()
        if uses_global:
            self.g_layer = GlobalBranch(c)
        if uses_local:
            self.l_layer = LocalBranch(c)

    def aggregate(self, s: Tensor) -> Tensor:
        """F_A from the spatial features X^s (FA, or the ablation's aggregation)."""
        if self.branches == "global":
            return self.lamb_g[:, None, None] * self.g_layer(s)
        if self.branches == "local":
            return self.lamb_l[:, None, None] * self.l_layer(s)
        f_g, f_l = self.g_layer(s), self.l_layer(s)
        if self.aggregation == "concat":
            return self.lamb_g[:, None, None] * self.conv3_2(torch.cat([f_g, f_l], dim=1))
        w = self.inside_all + 1 if self.aggregation == "fa" else 1
        return w * self.lamb_g[:, None, None] * f_g + self.lamb_l[:, None, None] * f_l

    def forward(self, x: Tensor) -> Tensor:
        s = self.sg(self.conv2(self.conv1(self.norm1(x))))
        y = x + self.aggregate(s)
        return y + self.beta * self.conv5(self.sg(self.conv4(self.norm2(y))))
