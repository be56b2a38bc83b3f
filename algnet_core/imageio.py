"""Image files for the command line: PNG and TIFF (8- and 16-bit, TIFF stacks) and JPEG, bit depth kept.

Every file is read as a :class:`Stack` of pages, each HxW or HxWxC (C = samples per pixel); a PNG or
JPEG is a stack of one page. TIFF pages are all the leading axes of the file's one series (Z, T, C,
...), so a multi-channel microscopy stack is deblurred plane by plane. 16-bit and low-bit-depth PNGs, and
palette or colour-key PNGs, go through ``pypng`` (Pillow reduces 16-bit RGB PNGs to 8 bits); plain 8-bit
PNGs and JPEGs through Pillow, TIFFs through ``tifffile``. BMP and WebP files (:data:`READ_ONLY_SUFFIXES`,
8-bit, via ``imageio``) can be read, not written: training reads its photos here too.

What a file holds beyond its pixels is kept when the stack is written back in the same format
(:attr:`Stack.metadata`):

* PNG: the colour space (gAMA, cHRM, sRGB, iCCP), significant bits (sBIT: 12-bit data in a 16-bit PNG stays
  as stored), background, pixel size (pHYs), text and EXIF chunks, unchanged.
* JPEG: the EXIF block (orientation included) and ICC profile, unchanged, the quantisation tables (the
  input's quality: quality 92 re-encoded at 95 cost 1.7 dB on a sharp photo) and the chroma subsampling; the
  pixels stay in the stored orientation, so the output displays like the input. CMYK JPEGs stay CMYK.
* TIFF: the photometric interpretation (grey, white-is-zero, RGB, CMYK), extra samples (alpha), planar
  configuration, resolution and its unit, ImageJ metadata (axes, spacing, unit, ranges, labels ...), OME-XML,
  tifffile's shaped metadata (axes) or a plain file's own description, the software tag, and compression
  (lossless deflate if the input was compressed). Files that cannot be kept are refused, naming the problem:
  more than one image series (e.g. a thumbnail), pyramids, palette and other colour spaces.

Errors name the file: :class:`ImageFileError`, whatever the decoder raised (truncated files, bad chunks,
Pillow's decompression-bomb guard).
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import png
import tifffile
from PIL import Image, JpegImagePlugin

PNG_SUFFIXES = {".png"}
JPEG_SUFFIXES = {".jpg", ".jpeg"}
TIFF_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = PNG_SUFFIXES | JPEG_SUFFIXES | TIFF_SUFFIXES
"""What :func:`read_image` reads and :func:`write_image` writes."""
READ_ONLY_SUFFIXES = {".bmp", ".webp"}
SAMPLE_IMAGE = Path(__file__).resolve().parent / "samples" / "motion_blurred_astronaut.png"
"""256x256 sample: scikit-image's ``astronaut`` (NASA, public domain) resized, blurred by a 17-pixel linear
motion kernel at 30 degrees, plus Gaussian noise of sigma 0.005, saved as 8-bit RGB."""
KEPT_PHOTOMETRIC = ("MINISBLACK", "MINISWHITE", "RGB", "SEPARATED")
"""The TIFF colour interpretations that are read and written back (SEPARATED: CMYK and other inks)."""
_ALPHA = (tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA)
_IMAGEJ_COUNTS = ("ImageJ", "images", "channels", "slices", "frames", "hyperstack")
"""ImageJ description entries that tifffile computes when writing."""
_PNG_LAYOUT_CHUNKS = (b"sBIT", b"bKGD")
_PNG_KEPT_CHUNKS = (b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"pHYs", b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"sBIT", b"bKGD")
"""The ancillary PNG chunks written back: colour space, significant bits, background, pixel size, text, EXIF
(not tIME, the time of the last change, nor a palette's chunks, as palettes are expanded)."""
_DECODER_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    SyntaxError,
    KeyError,
    IndexError,
    struct.error,
    zlib.error,
    png.Error,
    Image.DecompressionBombError,
)
"""What Pillow, pypng, tifffile and imageio raise for files they cannot decode."""


class ImageFileError(ValueError):
    """An image file cannot be read or written as asked; the message names the file and the problem."""


@dataclass(frozen=True)
class Stack:
    """Pages (P, H, W) or (P, H, W, C) of one file, the array shape the file stores them in (channels last),
    what its channels are, and the format's metadata that :func:`write_image` writes back."""

    pages: np.ndarray
    shape: tuple[int, ...]
    rgb: bool = False
    """The channels (but alpha) are red, green and blue; else each channel is an image of its own (grey,
    CMYK inks, microscopy channels)."""
    alpha: bool = False
    """The last channel is alpha (opacity), not image data."""
    format: str | None = None
    """``"png"``, ``"jpeg"`` or ``"tiff"`` for a stack read from a file, else None."""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """What keeps the file's layout: writer keyword arguments (Pillow's for JPEG, ``tifffile.imwrite``'s for
    TIFF), a PNG's ancillary chunks, bit depth and colour type."""

    def with_pages(self, pages: np.ndarray) -> Stack:
        """The same file layout and metadata holding new pages of the same shape and dtype."""
        if pages.shape != self.pages.shape or pages.dtype != self.pages.dtype:
            raise ValueError(f"pages {pages.shape} {pages.dtype} do not fit {self.pages.shape} {self.pages.dtype}")
        return replace(self, pages=pages)


def format_of(path: str | Path) -> str | None:
    """``"png"``, ``"jpeg"`` or ``"tiff"`` for a path :func:`write_image` can write, else None."""
    suffix = Path(path).suffix.lower()
    formats = {"png": PNG_SUFFIXES, "jpeg": JPEG_SUFFIXES, "tiff": TIFF_SUFFIXES}
    return next((name for name, suffixes in formats.items() if suffix in suffixes), None)


def _read_png(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The pixels as stored (palette and colour key expanded, an ``sBIT`` chunk not applied) and the
    ancillary chunks that :func:`_write_png` writes back, with the file's bit depth and colour type."""
    raw = path.read_bytes()
    chunks = list(png.Reader(bytes=raw).chunks())
    header = chunks[0][1]  # IHDR, always the first chunk: bit depth at byte 8, colour type at 9
    keep = {"chunks": [(k, d) for k, d in chunks if k in _PNG_KEPT_CHUNKS], "layout": header[8:10]}
    with Image.open(io.BytesIO(raw)) as img:  # reads the header chunks only
        if header[8] == 8 and img.mode in ("L", "LA", "RGB", "RGBA") and "transparency" not in img.info:
            return np.array(img), keep
    reader = png.Reader(bytes=raw)
    reader.preamble()
    reader.sbit = None  # asDirect would scale the values down to sBIT's depth (12-bit data in 16 bits: / 16)
    width, height, rows, info = reader.asDirect()
    depth, planes = info["bitdepth"], info["planes"]
    data = np.vstack([np.asarray(row, dtype=np.uint16 if depth > 8 else np.uint8) for row in rows])
    if depth < 8:  # 1, 2 or 4-bit grey: stretch to 8 bits
        data = (data * (255 // (2**depth - 1))).astype(np.uint8)
    data = data.reshape(height, width, planes)
    return (data[..., 0] if planes == 1 else data), keep


def _write_png(file, image: np.ndarray, keep: Mapping[str, Any]) -> None:
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
    encoded = io.BytesIO()
    writer.write(encoded, image.reshape(image.shape[0], -1))
    chunks = list(png.Reader(bytes=encoded.getvalue()).chunks())
    # sBIT and bKGD depend on bit depth and colour type: kept where these are the file's (not for an expanded
    # palette or low-bit grey stretched to 8 bits)
    same_layout = keep.get("layout") == chunks[0][1][8:10]
    kept = [(k, d) for k, d in keep.get("chunks", ()) if same_layout or k not in _PNG_LAYOUT_CHUNKS]
    png.write_chunks(file, [chunks[0], *kept, *chunks[1:]])


def _read_jpeg(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    with Image.open(path) as img:
        if img.mode not in ("L", "RGB", "CMYK"):
            raise ImageFileError(f"{path}: {img.mode} JPEGs are not supported (only greyscale, RGB and CMYK)")
        keep = {key: img.info[key] for key in ("exif", "icc_profile") if img.info.get(key)}
        if img.quantization:  # the input's own quality: a sharp JPEG is not re-encoded coarser or finer
            keep["qtables"] = img.quantization
        if img.mode != "CMYK":  # Pillow's CMYK encoder takes no subsampling
            keep["subsampling"] = JpegImagePlugin.get_sampling(img)
        return np.array(img), {"mode": img.mode, **keep}


def _read_tiff(path: Path) -> tuple[np.ndarray, bool, bool, dict[str, Any]]:
    """The series' array (samples last), whether it has samples, whether the last is alpha, the writer's args
    (the photometric interpretation among them)."""
    with tifffile.TiffFile(path) as tif:
        if len(tif.series) != 1:
            raise ImageFileError(
                f"{path} holds {len(tif.series)} image series (e.g. a thumbnail or several images); only "
                "single-series TIFFs are supported: save each series as a file of its own"
            )
        series = tif.series[0]
        if len(series.levels) > 1:
            raise ImageFileError(f"{path} is a pyramid of {len(series.levels)} levels; only flat TIFFs are supported")
        page = series.keyframe
        photometric = tifffile.PHOTOMETRIC(page.photometric)
        if photometric.name not in KEPT_PHOTOMETRIC:
            raise ImageFileError(
                f"{path}: {photometric.name} TIFFs are not supported; save it as grey, RGB or CMYK "
                f"({', '.join(KEPT_PHOTOMETRIC)})"
            )
        data, axes = series.asarray(), series.axes
        if "S" in axes and not axes.endswith("S"):  # planar configuration "separate": samples last, as pages want
            data = np.moveaxis(data, axes.index("S"), -1)
        keep: dict[str, Any] = {
            "photometric": photometric,
            "planarconfig": tifffile.PLANARCONFIG(page.planarconfig),
            "extrasamples": tuple(page.extrasamples),
            "resolution": page.resolution,
            "resolutionunit": page.resolutionunit,
            "compression": None if page.compression == tifffile.COMPRESSION.NONE else "zlib",
        }
        if tif.is_imagej:
            ij = {k: v for k, v in (tif.imagej_metadata or {}).items() if k not in _IMAGEJ_COUNTS}
            keep |= {"imagej": True, "metadata": {**ij, "axes": axes}}
        elif tif.is_ome:
            keep |= {"description": page.description, "metadata": None}
        elif tif.is_shaped:
            shaped = {k: v for k, v in tif.shaped_metadata[0].items() if k != "shape"}
            keep["metadata"] = shaped if "Q" in axes else {**shaped, "axes": axes}
        else:  # a plain TIFF: its own description (often acquisition notes), if any
            keep |= {"description": page.description or None, "metadata": None}
        keep["software"] = page.software or None
        alpha = len(page.extrasamples) == 1 and page.extrasamples[0] in _ALPHA
        return data, "S" in axes, alpha, keep


def read_image(path: str | Path) -> Stack:
    """Read a PNG, JPEG, TIFF, BMP or WebP file as a :class:`Stack` of its pages, in the file's dtype.

    Raises :class:`ImageFileError` (a ``ValueError``) naming the file for anything that cannot be read.
    """
    path = Path(path)
    suffix, kind = path.suffix.lower(), format_of(path)
    if suffix not in IMAGE_SUFFIXES | READ_ONLY_SUFFIXES:
        known = sorted(IMAGE_SUFFIXES | READ_ONLY_SUFFIXES)
        raise ImageFileError(f"{path}: unsupported image type {suffix!r}; use one of {known}")
    keep = {}
    try:
        if kind == "tiff":
            data, channels_last, alpha, keep = _read_tiff(path)
            rgb = keep["photometric"] == tifffile.PHOTOMETRIC.RGB
        else:  # PNG, JPEG, BMP, WebP: grey, grey + alpha, RGB, RGB + alpha or (JPEG) CMYK
            if kind == "jpeg":
                data, keep = _read_jpeg(path)
            else:
                data, keep = _read_png(path) if kind == "png" else (iio.imread(path), {})
            channels_last = data.ndim == 3
            cmyk = keep.get("mode") == "CMYK"
            alpha = channels_last and not cmyk and data.shape[2] in (2, 4)
            rgb = channels_last and not cmyk and data.shape[2] in (3, 4)
    except ImageFileError:
        raise
    except _DECODER_ERRORS as err:
        raise ImageFileError(f"{path}: cannot read this {suffix[1:].upper()} file: {err}") from err
    page_shape = data.shape[data.ndim - 2 - channels_last :]
    pages = data.reshape(math.prod(data.shape[: data.ndim - len(page_shape)]), *page_shape)
    return Stack(pages=pages, shape=data.shape, rgb=rgb, alpha=alpha, format=kind, metadata=keep)


def significant_bits(stack: Stack) -> int | None:
    """The bits per sample that an OME-TIFF declares its integer data use (``SignificantBits``, e.g. 12 for a
    12-bit camera's uint16 file), when fewer than the dtype's; else None. (A PNG's sBIT is another matter:
    12-bit data in a 16-bit PNG are stored shifted to the top bits, so the whole 16-bit range is theirs.)"""
    found = re.search(r'SignificantBits="(\d+)"', stack.metadata.get("description") or "")
    bits = int(found.group(1)) if found else None
    return bits if bits is not None and stack.pages.dtype.kind == "u" and bits < 8 * stack.pages.itemsize else None


def _write_jpeg(file, page: np.ndarray, keep: Mapping[str, Any]) -> None:
    channels = 1 if page.ndim == 2 else page.shape[2]
    mode = keep.get("mode", {1: "L", 3: "RGB"}.get(channels))
    if mode is None or Image.getmodebands(mode) != channels:
        raise ValueError(f"JPEG stores greyscale, RGB or (as read from a CMYK JPEG) CMYK, not {channels} channels")
    image = Image.frombytes(mode, (page.shape[1], page.shape[0]), np.ascontiguousarray(page).tobytes())
    quality = {} if "qtables" in keep else {"quality": 95}
    image.save(file, format="JPEG", **quality, **{k: v for k, v in keep.items() if k != "mode"})


def _write_tiff(file, data: np.ndarray, samples: bool, keep: Mapping[str, Any]) -> None:
    """``samples``: the pages have a channel axis (last; moved there from a planar file's (..., S, Y, X))."""
    if not keep:
        rgb = samples and data.shape[-1] in (3, 4)
        tifffile.imwrite(file, data, photometric="rgb" if rgb else "minisblack")
        return
    if samples and keep["planarconfig"] == tifffile.PLANARCONFIG.SEPARATE:
        data = np.moveaxis(data, -1, -3)  # back to the file's (..., S, Y, X)
    tifffile.imwrite(file, data, **keep)


def _is_cmyk(stack: Stack) -> bool:
    return stack.metadata.get("mode") == "CMYK" or stack.metadata.get("photometric") == tifffile.PHOTOMETRIC.SEPARATED


def write_image(path: str | Path, stack: Stack, overwrite: bool = False) -> None:
    """Write ``stack`` in the format of ``path``'s suffix, same dtype; never replaces a file unless asked.

    The stack's :attr:`~Stack.metadata` is written back when ``path`` has the format it was read from. Raises
    ``FileExistsError`` when ``path`` exists and ``overwrite`` is False, :class:`ImageFileError` naming
    ``path`` when the format cannot store the stack. The file is encoded into a hidden temporary beside it and
    then put in place, so a failed write leaves nothing behind (nor an interrupted one, when the interruption
    is an exception: the ``algnet`` command turns SIGTERM into one).
    """
    path = Path(path)
    suffix, kind = path.suffix.lower(), format_of(path)
    data = stack.pages.reshape(stack.shape)
    if kind is None:
        raise ImageFileError(f"{path}: unsupported image type {suffix!r}; use one of {sorted(IMAGE_SUFFIXES)}")
    if kind != "tiff" and len(stack.pages) != 1:
        raise ImageFileError(f"{path}: a stack of {len(stack.pages)} pages can only be written as TIFF")
    if kind == "jpeg" and data.dtype != np.uint8:
        raise ImageFileError(f"{path}: JPEG stores 8-bit images only, not {data.dtype}")
    if kind != stack.format and _is_cmyk(stack):
        raise ImageFileError(f"{path}: a CMYK {stack.format.upper()} image can only be written as {stack.format}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists")
    keep = stack.metadata if kind == stack.format else {}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "xb") as file:
            try:
                if kind == "png":
                    _write_png(file, stack.pages[0], keep)
                elif kind == "jpeg":
                    _write_jpeg(file, stack.pages[0], keep)
                else:
                    _write_tiff(file, data, stack.pages.ndim == 4, keep)
            except (OSError, ValueError, TypeError, KeyError, png.Error) as err:
                raise ImageFileError(f"{path}: cannot write this {kind.upper()} file: {err}") from err
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
