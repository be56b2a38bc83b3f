"""The paper's training loss (Eq. 1-4), summed over ALGNet's four output scales.

    L = sum_{i=1..4} L_char(I_i, T_i) + delta * L_edge(I_i, T_i) + lambda * L_freq(I_i, T_i)

with delta = 0.05, lambda = 0.1 and eps = 1e-3 "as in [8, 47]" (FSNet, MPRNet). The paper writes the
terms as norms; the reductions follow the cited code and are fixed here:

* Charbonnier (Eq. 2): ``mean(sqrt(d**2 + eps**2))`` over every element (batch, channel, pixel) of
  d = I - T, as MPRNet's ``CharbonnierLoss``.
* Edge (Eq. 3): the Charbonnier loss above between the Laplacian responses of I and T. The Laplacian is
  MPRNet's band-pass ``Delta(x) = x - g(up(down(g(x))))``: g is the separable 5-tap binomial filter
  [0.05, 0.25, 0.4, 0.25, 0.05] applied per channel with replicate padding, ``down`` keeps every second
  pixel (``[..., ::2, ::2]``) and ``up`` puts them back in a zero image scaled by 4.
* Frequency (Eq. 4): ``mean(|Re(F(I) - F(T))|, |Im(F(I) - F(T))|)`` with ``F = torch.fft.fft2`` over the
  last two dimensions (unnormalised, full spectrum), i.e. an L1 loss on the stacked real and imaginary
  parts, as FSNet/MIMO-UNet compute it.

Targets for the coarse outputs are the sharp image downsampled exactly as ALGNet downsamples its input:
nearest, ``t[..., ::2, ::2]`` repeatedly (so a h x w target gives ceil(h/2) x ceil(w/2), matching the
model's output sizes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-3
EDGE_WEIGHT = 0.05
FREQ_WEIGHT = 0.1
BINOMIAL_5 = (0.05, 0.25, 0.4, 0.25, 0.05)


def charbonnier(pred: Tensor, target: Tensor, eps: float = EPS) -> Tensor:
    """Eq. 2: mean over all elements of sqrt((pred - target)^2 + eps^2)."""
    diff = pred - target
    return torch.sqrt(diff * diff + eps * eps).mean()


def _gauss(x: Tensor) -> Tensor:
    k1 = torch.tensor(BINOMIAL_5, dtype=x.dtype, device=x.device)
    k2 = torch.outer(k1, k1).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k2, groups=x.shape[1])


def laplacian(x: Tensor) -> Tensor:
    """MPRNet's Laplacian (band-pass) response of a (b, c, h, w) image: ``x - g(up(down(g(x))))``."""
    filtered = _gauss(x)
    upsampled = torch.zeros_like(filtered)
    upsampled[..., ::2, ::2] = 4 * filtered[..., ::2, ::2]
    return x - _gauss(upsampled)


def edge_loss(pred: Tensor, target: Tensor, eps: float = EPS) -> Tensor:
    """Eq. 3: Charbonnier between the Laplacian responses."""
    return charbonnier(laplacian(pred), laplacian(target), eps)


def frequency_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Eq. 4: mean absolute difference of the real and imaginary parts of the 2-D FFTs."""
    diff = torch.fft.fft2(pred.float()) - torch.fft.fft2(target.float())
    return torch.stack((diff.real, diff.imag), dim=-1).abs().mean()


def target_pyramid(target: Tensor, levels: int = 4) -> list[Tensor]:
    """[1/8, 1/4, 1/2, full] targets for ``levels=4``: nearest ``[..., ::2, ::2]`` repeatedly."""
    pyramid = [target]
    for _ in range(levels - 1):
        pyramid.append(pyramid[-1][..., ::2, ::2])
    return pyramid[::-1]


class MultiScaleLoss(nn.Module):
    """Eq. 1 over the outputs of ``model(x, return_all_scales=True)`` (coarsest first).

    ``forward`` returns the total loss; ``terms`` returns the three sums separately for logging.
    """

    def __init__(self, eps: float = EPS, edge_weight: float = EDGE_WEIGHT, freq_weight: float = FREQ_WEIGHT):
        super().__init__()
        self.eps, self.edge_weight, self.freq_weight = eps, edge_weight, freq_weight

    def terms(self, outputs: Sequence[Tensor], target: Tensor) -> dict[str, Tensor]:
        """The summed Charbonnier, edge and frequency terms (unweighted) and the weighted total."""
        char = edge = freq = outputs[0].new_zeros((), dtype=torch.float32)
        for out, tgt in zip(outputs, target_pyramid(target, len(outputs)), strict=True):
            if out.shape != tgt.shape:
                raise ValueError(f"output {tuple(out.shape)} does not match its target {tuple(tgt.shape)}")
            out = out.float()
            char = char + charbonnier(out, tgt, self.eps)
            edge = edge + edge_loss(out, tgt, self.eps)
            freq = freq + frequency_loss(out, tgt)
        total = char + self.edge_weight * edge + self.freq_weight * freq
        return {"loss": total, "char": char, "edge": edge, "freq": freq}

    def forward(self, outputs: Sequence[Tensor], target: Tensor) -> Tensor:
        return self.terms(outputs, target)["loss"]
