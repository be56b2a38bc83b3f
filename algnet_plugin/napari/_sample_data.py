"""Sample data: a photo blurred here on the fly, with its sharp original as the reference.

The photo is scikit-image's ``astronaut`` (NASA, public domain), which ships inside scikit-image, so
nothing is downloaded and the package redistributes no image file.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import data
from skimage.draw import disk, line_aa

from ._compute import LayerDataTuple

CROP = (slice(0, 320), slice(96, 416))
"""The astronaut's head and shoulders: 320x320 keeps a first try quick on a CPU."""


def _blur(sharp: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    kernel = kernel / kernel.sum()
    out = ndimage.convolve(sharp.astype(np.float32), kernel[..., None], mode="reflect")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _pair(kind: str, kernel: np.ndarray) -> list[LayerDataTuple]:
    sharp = data.astronaut()[CROP]
    return [
        (sharp, {"name": "astronaut (sharp reference)", "visible": False}, "image"),
        (_blur(sharp, kernel), {"name": f"astronaut ({kind} blur)"}, "image"),
    ]


def motion_blur_sample() -> list[LayerDataTuple]:
    """A 320x320 RGB photo with a 17-pixel linear motion blur at 30 degrees, and its sharp original."""
    kernel = np.zeros((17, 17), np.float32)
    dy, dx = np.round(8 * np.sin(np.radians(30))), np.round(8 * np.cos(np.radians(30)))
    rows, cols, values = line_aa(int(8 - dy), int(8 - dx), int(8 + dy), int(8 + dx))
    kernel[rows, cols] = values
    return _pair("motion", kernel)


def defocus_blur_sample() -> list[LayerDataTuple]:
    """A 320x320 RGB photo with a defocus (disk, radius 5) blur, and its sharp original."""
    kernel = np.zeros((11, 11), np.float32)
    kernel[disk((5, 5), 5.5, shape=kernel.shape)] = 1
    return _pair("defocus", kernel)
