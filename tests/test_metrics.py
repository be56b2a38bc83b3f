"""algnet_core.metrics: the published numbers, the data range of every dtype, hand-computed values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from algnet_core.imageio import read_image
from algnet_core.metrics import data_range_of, image_metrics, mae, psnr, ssim


@pytest.fixture(scope="module")
def pair(shared: Path) -> tuple[np.ndarray, np.ndarray]:
    """The real RealBlur crop (50x125 RGB, uint8): blurry, sharp."""
    folder = shared / "data" / "realblur_crop"
    return tuple(read_image(folder / kind / "scene050-6.png").pages[0] for kind in ("blur", "sharp"))


def test_uint8_pair_gives_the_numbers_published_before_the_merge(pair) -> None:
    blurry, sharp = pair  # values of algnet eval / train.benchmark before metrics.py (22.46 dB in SOURCES.md)
    scores = image_metrics(blurry, sharp)
    assert scores == pytest.approx({"psnr": 22.457200576913014, "ssim": 0.5926288792630664, "mae": 0.0488775947})


def test_the_same_pixels_score_the_same_in_every_dtype(pair) -> None:
    blurry, sharp = pair
    want = image_metrics(blurry, sharp)
    as_unit = image_metrics(blurry / 255.0, sharp / 255.0)  # float in [0, 1]: R = 1
    as_16bit = image_metrics(blurry.astype(np.uint16) * 257, sharp.astype(np.uint16) * 257)  # R = 65535
    for scores in (as_unit, as_16bit):
        assert scores == pytest.approx(want, rel=1e-9)
    span = float(int(sharp.max()) - int(sharp.min()))  # float outside [0, 1]: R = the sharp image's max - min
    as_other = image_metrics(blurry * 4.0, sharp * 4.0)  # 0..928
    assert as_other == pytest.approx(image_metrics(blurry, sharp, data_range=span), rel=1e-9)
    assert as_other["psnr"] < want["psnr"] - 0.1  # span < 255 here: not the uint8 numbers


def test_hand_computed_values() -> None:
    ref = np.full((8, 8), 100, np.uint8)
    off_by_one = ref + np.uint8(1)
    assert psnr(off_by_one, ref) == pytest.approx(20 * math.log10(255))  # MSE 1: 48.13 dB
    assert mae(off_by_one, ref) == pytest.approx(1 / 255)
    assert psnr(ref, ref) == math.inf and ssim(ref, ref) == 1.0
    floats = np.array([[-2.0, 2.0], [0.0, 1.0]])
    assert psnr(floats + 0.5, floats) == pytest.approx(10 * math.log10(4.0**2 / 0.25))  # R = 2 - (-2)


def test_data_range_by_dtype_and_clear_errors() -> None:
    assert data_range_of(np.zeros(3, np.uint8)) == 255.0
    assert data_range_of(np.zeros(3, np.uint16)) == 65535.0
    assert data_range_of(np.array([0.0, 0.5, 1.0], np.float32)) == 1.0
    assert data_range_of(np.array([-5.0, 300.0])) == 305.0
    with pytest.raises(TypeError, match="int16"):
        data_range_of(np.zeros(3, np.int16))
    with pytest.raises(ValueError, match="constant"):
        data_range_of(np.full(3, 5.0))
    with pytest.raises(ValueError, match="dtype"):
        psnr(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint16))
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((8, 8)), np.zeros((8, 9)))
