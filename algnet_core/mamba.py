"""A Mamba (v1) block with the parameters, names and initialisation of ``mamba_ssm.Mamba``.

Only the math of the module's slow path (``../shared/reference/MAMBA_LAYOUT.md``), written in plain
PyTorch; the scan is :func:`algnet_core.scan.selective_scan`, so ``mamba_ssm`` is never needed but its CUDA
kernel is used when it imports. An official checkpoint loads with ``strict=True`` and no renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scan import selective_scan


class Mamba(nn.Module):
    """Selective state-space block (Gu & Dao, 2023): in_proj -> causal conv + SiLU -> S6 -> gate -> out_proj.

    Input and output are channel-major token sequences (batch, d_model, L): the layout of the causal conv
    and of the scan, so the projections are matmuls ``W @ x`` and no activation is ever transposed.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 32,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.d_state = d_state
        self.d_inner = d_inner = expand * d_model
        self.dt_rank = dt_rank = math.ceil(d_model / 16)
        # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel; D = 1.
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
            # Step sizes log-uniform in [dt_min, dt_max]; the bias stores their inverse softplus.
            log_dt = torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
            dt = torch.exp(log_dt).clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, hidden: Tensor) -> Tensor:
        length = hidden.shape[-1]
        xz = _project(self.in_proj.weight, hidden)  # (b, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :length])  # causal depthwise conv: keep the first L outputs
        dt_low, B, C = _project(self.x_proj.weight, x).split([self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = _project(self.dt_proj.weight, dt_low)  # (b, d_inner, L); the bias goes to the scan
        y = selective_scan(
            x,
            delta,
            -torch.exp(self.A_log.float()),
            B,
            C,
            D=self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return _project(self.out_proj.weight, y)  # (b, d_model, L)


def _project(weight: Tensor, x: Tensor) -> Tensor:
    """``weight @ x`` for channel-major x: (out, in) @ (b, in, L) -> (b, out, L), one batched matmul.

    ``torch.matmul`` would fold the batch into a transposed matmul and copy the result back (for weights
    that require grad), which costs as much as the matmul itself.
    """
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)
