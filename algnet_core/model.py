"""ALGNet: a U-Net of ALGBlocks with multi-scale inputs and outputs (paper Section 3.1, Fig. 2a).

Four encoder levels (channels w, 2w, 4w, 8w), a middle of 16w channels at 1/16 resolution, four decoder
levels. The blurry image also enters at 1/2, 1/4 and 1/8 resolution: a shallow feature extractor (SFE)
turns each into features that a feature-attention merge (FAM) fuses after each of the first three
downsamplings. The three coarsest decoder levels and the last each output a restored image at their
scale (1/8, 1/4, 1/2, full), which the paper's loss (Eq. 1) supervises.

Follows the authors' code so that official checkpoints load with ``strict=True``: multi-scale inputs are
nearest-neighbour downsamplings (``x[..., ::2, ::2]``), the input is zero-padded to a multiple of 16.
Unlike the official forward, which returns the padded size, outputs are cropped back to the input's size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from .algblock import Aggregation, ALGBlock, Branches

PRESETS: dict[str, dict] = {
    # The paper's ALGNet and ALGNet-B (Table 1), the default configuration of the authors' code.
    "ALGNet": dict(width=32, middle_blk_num=8, enc_blk_nums=(2, 2, 4, 8), dec_blk_nums=(8, 4, 2, 2)),
    "ALGNet-B": dict(width=64, middle_blk_num=8, enc_blk_nums=(2, 2, 4, 8), dec_blk_nums=(8, 4, 2, 2)),
    # The authors' first published configuration, the only one whose hook-counted cost is the paper's "17 G".
    "ALGNet-v1": dict(width=32, middle_blk_num=1, enc_blk_nums=(1, 1, 1, 28), dec_blk_nums=(1, 1, 1, 1)),
    # Ours: compact enough to train and run on a laptop CPU (see README for its cost).
    "ALGNet-S": dict(width=16, middle_blk_num=2, enc_blk_nums=(1, 1, 2, 2), dec_blk_nums=(2, 2, 1, 1)),
    # Table 4's Baseline: the same U-Net with NAFNet blocks (CLGF's local branch alone *is* NAFNet's SCA).
    "Baseline": dict(
        width=32, middle_blk_num=8, enc_blk_nums=(2, 2, 4, 8), dec_blk_nums=(8, 4, 2, 2), branches="local"
    ),
}
MULTIPLE = 16
"""Height and width are padded to a multiple of this (four 2x downsamplings)."""


class BasicConv(nn.Module):
    """Conv (same padding, bias) optionally followed by GELU; ``main`` keeps the official key names."""

    def __init__(self, cin: int, cout: int, kernel: int, act: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2)]
        if act:
            layers.append(nn.GELU())
        self.main = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


class SFE(nn.Module):
    """Shallow feature extractor of a downsampled image: 3 -> c/4 -> c/2 -> c/2 -> c, then InstanceNorm."""

    def __init__(self, channels: int, img_channel: int = 3) -> None:
        super().__init__()
        c = channels
        self.main = nn.Sequential(
            BasicConv(img_channel, c // 4, 3, act=True),
            BasicConv(c // 4, c // 2, 1, act=True),
            BasicConv(c // 2, c // 2, 3, act=True),
            BasicConv(c // 2, c, 1, act=False),
            nn.InstanceNorm2d(c, affine=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


class FAM(nn.Module):
    """Merge encoder features with SFE features of the same scale: Conv1x1([x, sfe]) (2c -> c)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.merge = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x: Tensor, sfe: Tensor) -> Tensor:
        return self.merge(torch.cat([x, sfe], dim=1))


class ALGNet(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="algnet",
    repo_url="https://github.com/algnet/algnet",
    paper_url="https://doi.org/10.1145/3664647.3681009",
    pipeline_tag="image-to-image",
    license="mit",
    tags=["image-deblurring", "image-restoration", "mamba", "algnet"],
):
    """ALGNet. Defaults are the paper's ALGNet preset (54,642,252 parameters); see :data:`PRESETS`.

    ``model(x)`` maps a (b, img_channel, h, w) image to its restoration of the same size;
    ``model(x, return_all_scales=True)`` returns the four outputs [1/8, 1/4, 1/2, full] (sizes
    ceil(h/s) x ceil(w/s)), as the official forward does.
    """

    def __init__(
        self,
        img_channel: int = 3,
        width: int = 32,
        middle_blk_num: int = 8,
        enc_blk_nums: Sequence[int] = (2, 2, 4, 8),
        dec_blk_nums: Sequence[int] = (8, 4, 2, 2),
        branches: Branches = "both",
        aggregation: Aggregation = "fa",
    ) -> None:
        super().__init__()
        if len(enc_blk_nums) != 4 or len(dec_blk_nums) != 4:
            raise ValueError("ALGNet has four encoder and four decoder levels: give four block counts each")

        def stage(channels: int, n: int) -> nn.Sequential:
            return nn.Sequential(*(ALGBlock(channels, branches, aggregation) for _ in range(n)))

        w = width
        self.intro = nn.Conv2d(img_channel, w, 3, padding=1)
        self.ending = nn.Conv2d(w, img_channel, 3, padding=1)
        self.encoders = nn.ModuleList(stage(w * 2**i, n) for i, n in enumerate(enc_blk_nums))
        self.decoders = nn.ModuleList(stage(w * 2 ** (3 - i), n) for i, n in enumerate(dec_blk_nums))
        self.middle_blks = stage(w * 16, middle_blk_num)
        # Up: Conv1x1 (c -> 2c, no bias) + PixelShuffle(2) -> c/2 channels at twice the size.
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w * 2 ** (4 - i), w * 2 ** (5 - i), 1, bias=False), nn.PixelShuffle(2))
            for i in range(4)
        )
        self.downs = nn.ModuleList(nn.Conv2d(w * 2**i, w * 2 ** (i + 1), 2, stride=2) for i in range(4))
        self.SFE2, self.SFE4, self.SFE8 = (SFE(w * 2**i, img_channel) for i in (1, 2, 3))
        self.FAM2, self.FAM4, self.FAM8 = (FAM(w * 2**i) for i in (1, 2, 3))
        # After concatenating the skip: Conv1x1 (2c -> c), one per decoder level.
        self.Convs = nn.ModuleList(nn.Conv2d(w * 2 ** (4 - i), w * 2 ** (3 - i), 1) for i in range(4))
        self.ConvsOut = nn.ModuleList(nn.Conv2d(w * 2 ** (3 - i), img_channel, 3, padding=1) for i in range(3))

    def forward(self, x: Tensor, return_all_scales: bool = False) -> Tensor | list[Tensor]:
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % MULTIPLE, (-w) % MULTIPLE
        inp = F.pad(x, (0, pad_w, 0, pad_h))
        x_2 = inp[..., ::2, ::2]  # = F.interpolate(scale_factor=0.5), nearest, as the official code
        x_4 = x_2[..., ::2, ::2]
        x_8 = x_4[..., ::2, ::2]
        sfe = (self.SFE2(x_2), self.SFE4(x_4), self.SFE8(x_8))
        fams = (self.FAM2, self.FAM4, self.FAM8)

        feat = self.intro(inp)
        skips = []
        for i, (encoder, down) in enumerate(zip(self.encoders, self.downs, strict=True)):
            feat = encoder(feat)
            skips.append(feat)
            feat = down(feat)
            if i < 3:
                feat = fams[i](feat, sfe[i])
        feat = self.middle_blks(feat)

        outputs = []
        coarse_inputs = (x_8, x_4, x_2)
        for i, (decoder, up, skip) in enumerate(zip(self.decoders, self.ups, reversed(skips), strict=True)):
            feat = decoder(self.Convs[i](torch.cat([up(feat), skip], dim=1)))
            if i < 3:
                outputs.append(self.ConvsOut[i](feat) + coarse_inputs[i])
        outputs.append(self.ending(feat) + inp)

        if not return_all_scales:
            return outputs[-1][..., :h, :w]
        factors = (8, 4, 2, 1)
        return [out[..., : math.ceil(h / s), : math.ceil(w / s)] for out, s in zip(outputs, factors, strict=True)]

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str | os.PathLike, *, revision: str | None = None, **kwargs
    ) -> ALGNet:
        """Load strictly from a folder, a registered name (``"motion"``) or a Hub repo id.

        Delegates to :func:`algnet_core.hub.from_pretrained`, the one registry and loader: ``kwargs`` are its
        ``strict`` (True only), ``map_location`` and ``hub_kwargs`` (``cache_dir``, ``token``,
        ``local_files_only``, ``force_download``, for ``hf_hub_download``).
        """
        from .hub import from_pretrained

        return from_pretrained(pretrained_model_name_or_path, revision=revision, **kwargs)

    def use_local_pooling(self, train_size: int | None = 256) -> ALGNet:
        """Test-time local mode (the authors' ``ALGNetLocal``, NAFNet's TLC), or back to global with None.

        The local branch's global average pool becomes a box average 1.5x the feature size that a
        ``train_size`` patch has at each level (384, 192, 96, 48, 24 for 256), so statistics on large test
        images match those seen in training. Returns the model.
        """
        levels = [*zip(self.encoders, (1, 2, 4, 8), strict=True), (self.middle_blks, 16)]
        levels += zip(self.decoders, (8, 4, 2, 1), strict=True)
        for stage, factor in levels:
            for block in stage:
                if hasattr(block, "l_layer"):
                    block.l_layer.pool_size = None if train_size is None else int(1.5 * train_size) // factor
        return self
