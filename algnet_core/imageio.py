"""Image files for the command line: PNG and TIFF (8- and 16-bit, TIFF stacks) and JPEG, bit depth kept.

Every file is read as a :class:`Stack` of pages, each HxW or HxWxC (C = samples per pixel); a PNG or
JPEG is a stack of one page. TIFF pages are all the leading axes of the file's first series (Z, T, C,
...), so a multi-channel microscopy stack is deblurred plane by plane. 16-bit and low-bit-depth PNGs, and
palette or colour-key PNGs, go through ``pypng`` (Pillow reduces 16-bit RGB PNGs to 8 bits); plain 8-bit
PNGs through Pillow (the same pixels, ~20x faster), TIFFs through ``tifffile`` and JPEGs through
``imageio``. BMP and WebP files (:data:`READ_ONLY_SUFFIXES`, 8-bit, via ``imageio``) can be read, not
written: training reads its photos here too.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import png
import tifffile
from PIL import Image

PNG_SUFFIXES = {".png"}
JPEG_SUFFIXES = {".jpg", ".jpeg"}
TIFF_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = PNG_SUFFIXES | JPEG_SUFFIXES | TIFF_SUFFIXES
"""What :func:`read_image` reads and :func:`write_image` writes."""
READ_ONLY_SUFFIXES = {".bmp", ".webp"}
SAMPLE_IMAGE = Path(__file__).resolve().parent / "samples" / "motion_blurred_astronaut.png"
"""256x256 sample: scikit-image's ``astronaut`` (NASA, public domain) resized, blurred by a 17-pixel linear
motion kernel at 30 degrees, plus Gaussian noise of sigma 0.005, saved as 8-bit RGB."""


@dataclass(frozen=True)
class Stack:
    """Pages (P, H, W) or (P, H, W, C) of one file, and the array shape the file stores them in."""

    pages: np.ndarray
    shape: tuple[int, ...]

    def with_pages(self, pages: np.ndarray) -> Stack:
        """The same file layout holding new pages of the same shape and dtype."""
        if pages.shape != self.pages.shape or pages.dtype != self.pages.dtype:
            raise ValueError(f"pages {pages.shape} {pages.dtype} do not fit {self.pages.shape} {self.pages.dtype}")
        return replace(self, pages=pages)


def _read_png(path: Path) -> np.ndarray:
    with open(path, "rb") as file:
        depth = file.read(25)[24:]  # IHDR, always the first chunk: bit depth at byte 24
    with Image.open(path) as img:  # reads the header chunks only
        if depth == b"\x08" and img.mode in ("L", "LA", "RGB", "RGBA") and "transparency" not in img.info:
            return np.array(img)
    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    depth, planes = info["bitdepth"], info["planes"]
    data = np.vstack([np.asarray(row, dtype=np.uint16 if depth > 8 else np.uint8) for row in rows])
    if depth < 8:  # 1, 2 or 4-bit grey: stretch to 8 bits
        data = (data * (255 // (2**depth - 1))).astype(np.uint8)
    data = data.reshape(height, width, planes)
    return data[..., 0] if planes == 1 else data


def _write_png(file, image: np.ndarray) -> None:
    planes = 1 if image.ndim == 2 else image.shape[2]
    if image.dtype not in (np.uint8, np.uint16) or planes not in (1, 2, 3, 4):
        raise ValueError(f"PNG stores 1 to 4 channels of uint8 or uint16, not {image.shape} {image.dtype}")
    writer = png.Writer(
        width=image.shape[1],
        height=image.shape[0],
        greyscale=planes < 3,
        alpha=planes in (2, 4),
        bitdepth=8 * image.dtype.itemsize,
    )
    writer.write(file, image.reshape(image.shape[0], -1))


def read_image(path: str | Path) -> Stack:
    """Read a PNG, JPEG, TIFF, BMP or WebP file as a :class:`Stack` of its pages, in the file's dtype."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PNG_SUFFIXES:
        data, channel_axes = _read_png(path), None
    elif suffix in JPEG_SUFFIXES | READ_ONLY_SUFFIXES:
        data, channel_axes = iio.imread(path), None
    elif suffix in TIFF_SUFFIXES:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            data = series.asarray()
            channel_axes = 1 if series.axes.endswith("S") else 0
    else:
        known = sorted(IMAGE_SUFFIXES | READ_ONLY_SUFFIXES)
        raise ValueError(f"{path}: unsupported image type {suffix!r}; use one of {known}")
    if channel_axes is None:
        channel_axes = 1 if data.ndim == 3 else 0
    page_shape = data.shape[data.ndim - 2 - channel_axes :]
    pages = data.reshape(math.prod(data.shape[: data.ndim - len(page_shape)]), *page_shape)
    return Stack(pages=pages, shape=data.shape)


def write_image(path: str | Path, stack: Stack, overwrite: bool = False) -> None:
    """Write ``stack`` in the format of ``path``'s suffix, same dtype; never replaces a file unless asked.

    Raises ``FileExistsError`` when ``path`` exists and ``overwrite`` is False. The file is encoded into a
    hidden temporary beside it and then put in place, so a failed or interrupted write leaves nothing behind.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    data = stack.pages.reshape(stack.shape)
    if suffix not in TIFF_SUFFIXES and len(stack.pages) != 1:
        raise ValueError(f"{path}: a stack of {len(stack.pages)} pages can only be written as TIFF")
    if suffix in JPEG_SUFFIXES and data.dtype != np.uint8:
        raise ValueError(f"{path}: JPEG stores 8-bit images only, not {data.dtype}")
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: unsupported image type {suffix!r}; use one of {sorted(IMAGE_SUFFIXES)}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "xb") as file:
            if suffix in PNG_SUFFIXES:
                _write_png(file, stack.pages[0])
            elif suffix in JPEG_SUFFIXES:
                iio.imwrite(file, stack.pages[0], extension=suffix, quality=95)
            else:
                rgb = stack.pages.ndim == 4 and stack.pages.shape[-1] in (3, 4)
                tifffile.imwrite(file, data, photometric="rgb" if rgb else "minisblack")
        if not overwrite:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: never replaces a file
                return
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: check, then move
                if path.exists():
                    raise FileExistsError(f"{path} exists") from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
