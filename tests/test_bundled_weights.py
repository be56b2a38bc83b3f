"""The weights the wheel ships do what their cards say, on real photos blurred by the benchmark's recipe."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.io
from helpers import SHARED

from algnet_core import deblur, load_model, metrics

benchmark = pytest.importorskip("train.benchmark")


def test_bundled_defocus_model_sharpens_disk_blurred_photos(tmp_path) -> None:
    # Two 224 px crops of a McMaster photo (an evaluation image, never trained on) through the disk
    # benchmark's recipe: disk radius 3 then 5 px, Gaussian noise sigma 0.01, 8-bit.
    photo = skimage.io.imread(SHARED / "data" / "natural" / "mcmaster" / "1.tif")
    source = tmp_path / "source"
    source.mkdir()
    for k, (y, x) in enumerate([(0, 0), (240, 240)]):
        skimage.io.imsave(source / f"{k}.png", photo[y : y + 224, x : x + 224], check_contrast=False)
    manifest = benchmark.make_benchmark("disk", tmp_path / "disk", source=source)
    assert [item["kernel"] for item in manifest["images"]] == ["r3", "r5"]

    assert load_model("defocus").provenance["trained"] is True
    gains = []
    for item in manifest["images"]:
        blurry = skimage.io.imread(tmp_path / "disk" / "blur" / item["name"])
        sharp = skimage.io.imread(tmp_path / "disk" / "sharp" / item["name"])
        restored = deblur(blurry, model="defocus")
        assert restored.shape == blurry.shape and restored.dtype == np.uint8
        gains.append(metrics.psnr(restored, sharp) - metrics.psnr(blurry, sharp))
    print("PSNR gains (dB):", gains)
    assert min(gains) > 0.45, gains  # the shipped file: +0.59 and +0.60 dB (the first one, 851 steps: +0.38)
