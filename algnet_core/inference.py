"""One call to deblur any image: :func:`deblur` (numpy, torch, dask) and the tiled engine :func:`deblur_tensor`.

Tiling: the image is cut into ``tile`` x ``tile`` tiles that overlap by ``overlap`` pixels; each output
pixel is the weighted mean of the tiles that cover it, with weights that rise along a raised cosine over
the overlap (and stay 1 at the image border), so tile borders leave no seam. Tiles go through the network
several at a time; the network's memory depends on the tile size only. ``tile="auto"`` picks the largest
multiple of 16 whose estimated working memory fits in half the free memory of the device (capped at
:data:`CPU_MEMORY_BUDGET` on the CPU), between :data:`MIN_AUTO_TILE` and :data:`MAX_AUTO_TILE`.

Normalisation (explicit and invertible; ``normalize=``): the image's values are mapped linearly from a
(low, high) pair to 0..1, restored, mapped back, clipped and rounded for integer images, so the result keeps
the input's dtype. The clip is the dtype's own range (0..255, 0..65535; 0..1 for a float image within it), not
the blurry image's: deblurring gathers spread light back into peaks, so a 12-bit image's spots may come back
brighter than any pixel of its blurry input. Float images normalised by their own statistics are clipped only
to their dtype's finite range.

* ``"dtype"``: ``uint8`` / 255, ``uint16`` / 65535; float images already within [0, 1] as they are, any other
  float image from its [min, max].
* ``"range"``: the image's own [min, max] (a 12-bit camera's 58..2336 becomes 0..1).
* ``"percentile"``: the ``percentiles`` (default 1 and 99.8, as CSBDeep and StarDist) map to 0 and 1; values
  beyond them reach the network as they are.
* ``"auto"`` (default): ``"range"`` for ``uint16`` images that use at most :data:`AUTO_RANGE_BITS` bits
  (microscopy cameras: 12- and 14-bit data), else ``"dtype"``.

The mapping is computed in float64 (so 1e6 + [0, 1] keeps its detail), the network computes in float32 (or
under float16/bfloat16 autocast). For a dask array the statistics are computed once, eagerly, over the whole
array, so every chunk shares one mapping (dask's percentiles are approximate); so are a stack's (``pages``).

Stacks (``pages=N``): the first N axes index pages (planes of a volume, time points), each deblurred as an
image of its own, all with one mapping computed over the whole stack. A dask stack is computed chunk by
chunk with ``map_overlap`` (margins on the two image axes only), on whatever scheduler dask uses: under a
``dask.distributed`` client its workers. A model given by name, folder or Hub id then travels in the task
graph as that name and is loaded once per worker process (and cached), on the worker's own device
(``device="auto"``); an ALGNet instance is pickled into the graph (see :mod:`algnet_core.distributed`).

Channels (last axis): HxW and HxWx1 run through the RGB network as grey RGB and come back as the channel
mean; HxWx3 is RGB; HxWx4 is RGB plus an alpha channel returned untouched; any other channel count is
deblurred channel by channel, each as grey RGB; an RGB image whose channels are all equal comes back grey
(a dask array's chunks are restored as they are, so that no chunk decides on its own). The input is never
modified (a big-endian array comes back in native byte order).

Each tile is padded by reflection to a multiple of 16 (as spandrel does), so image sides that are not
multiples of 16 leave no seam. ``ensemble=True`` averages the restorations of the 8 flips and transposes of
each tile (the scan then also runs along the other directions): 8x the time. ``progress(done, total)`` is
called after every ALGBlock of every tile (and ``cancel()`` checked there), so both answer within a fraction
of a tile.

Rejected with ``ValueError``: empty images, images smaller than 16x16 (one network tile), NaN or Inf
values, more than three dimensions besides the ``pages`` axes, a tile or overlap out of range. Unsupported
dtypes (bool, signed integers) and inputs that are not arrays raise ``TypeError``; a network output with NaN
or Inf values (broken weights, or float16 overflow) raises ``RuntimeError``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .algblock import ALGBlock
from .hub import CONFIG_NAME, WEIGHTS_NAME, load_model
from .model import MULTIPLE, ALGNet

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]

DEFAULT_OVERLAP = 32
MIN_AUTO_TILE = 128
MAX_AUTO_TILE = 1024
CPU_MEMORY_BUDGET = 3 << 29
"""At most this many bytes (1.5 GiB) of network working memory on the CPU, so peak RSS stays < 3 GiB."""
BYTES_PER_PIXEL_PER_WIDTH = 192
"""Peak float32 working memory of an ALGNet forward per input pixel and unit of ``width`` (measured:
ALGNet-S, width 16, a 512x512 tile: 782 MiB above the loaded model, 3.1 KB per pixel)."""
MAX_TILES_PER_BATCH = 8
NORMALIZE_MODES = ("auto", "dtype", "range", "percentile")
DEFAULT_PERCENTILES = (1.0, 99.8)
AUTO_RANGE_BITS = 14
"""``normalize="auto"`` maps a uint16 image by its own range when its maximum is below 2**14."""
ENSEMBLE_SIZE = 8


class DeblurCancelled(RuntimeError):
    """Raised by :func:`deblur` when its ``cancel()`` callback returned True; no partial result exists."""


def available_devices() -> list[str]:
    """Devices this machine can run on, fastest first, e.g. ``["cuda", "cpu"]``."""
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    if torch.backends.mps.is_available():
        devices.append("mps")
    return [*devices, "cpu"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA, then MPS, then CPU; any other name must be available here."""
    if str(device) == "auto":
        return torch.device(available_devices()[0])
    dev = torch.device(device)
    if dev.type not in available_devices():
        raise RuntimeError(f"device {str(device)!r} is not available here; available: {available_devices()}")
    return dev


def free_memory(device: torch.device) -> int:
    """Bytes of memory free on ``device`` now (CUDA: the driver's figure; CPU: available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def choose_tile(width: int, device: torch.device) -> int:
    """The ``tile="auto"`` size for a model of ``width`` on ``device`` (see the module docs)."""
    budget = free_memory(device) // 2
    if device.type == "cpu":
        budget = min(budget, CPU_MEMORY_BUDGET)
    side = math.isqrt(max(budget // (BYTES_PER_PIXEL_PER_WIDTH * width), 1))
    return max(MIN_AUTO_TILE, min(MAX_AUTO_TILE, side // MULTIPLE * MULTIPLE))


@functools.lru_cache(maxsize=2)
def _cached_model(name: str, device: str, stamp: tuple) -> ALGNet:
    """``load_model(name, device)``, cached; ``stamp`` (:func:`weights_stamp`) is only part of the key."""
    return load_model(name, device)


def weights_stamp(name: str) -> tuple:
    """What identifies a local model folder's weights on disk: the resolved path, ``st_mtime_ns`` and size of
    its config and weights files (empty for a registered name or Hub repo id). Part of the model cache key,
    so that a folder re-exported in place is loaded afresh."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return ()
    files = [(folder / n).resolve() for n in (CONFIG_NAME, WEIGHTS_NAME)]
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else (str(f),) for f in files)


def _resolve_model(model: str | os.PathLike | ALGNet, device: str | torch.device) -> ALGNet:
    if isinstance(model, ALGNet):
        return load_model(model, device)
    name = os.fspath(model)
    return _cached_model(name, str(resolve_device(device)), weights_stamp(name))


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    choices = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if precision not in choices:
        raise ValueError(f"precision must be 'auto' or one of {list(choices)}, got {precision!r}")
    return choices[precision]


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    return [*range(0, length - tile, tile - overlap), length - tile]


def _window(size: int, start: int, length: int, overlap: int) -> Tensor:
    """1-D blending weights of a tile: a raised-cosine ramp over the overlap on sides inside the image."""
    weights = torch.ones(size)
    ramp_len = min(overlap, size // 2)
    if ramp_len > 0:
        ramp = 0.5 - 0.5 * torch.cos(torch.pi * (torch.arange(ramp_len) + 0.5) / ramp_len)
        if start > 0:
            weights[:ramp_len] = ramp
        if start + size < length:
            weights[size - ramp_len :] = ramp.flip(0)
    return weights


def _dihedral(x: Tensor, k: int, inverse: bool = False) -> Tensor:
    """The k-th of the 8 flips/transposes of (..., H, W) (bit 0: flip W, bit 1: flip H, bit 2: transpose)."""
    if inverse and k & 4:
        x = x.transpose(-1, -2)
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    if not inverse and k & 4:
        x = x.transpose(-1, -2)
    return x


def _restore(net: ALGNet, crops: Tensor, ensemble: bool) -> Tensor:
    """The network on reflection-padded crops (one pass, or the mean over the 8 dihedral transforms)."""
    out = torch.zeros_like(crops)
    passes = ENSEMBLE_SIZE if ensemble else 1
    for k in range(passes):
        x = _dihedral(crops, k)
        h, w = x.shape[-2:]
        padded = F.pad(x, (0, (-w) % MULTIPLE, 0, (-h) % MULTIPLE), mode="reflect")
        out += _dihedral(net(padded)[..., :h, :w].float(), k, inverse=True)
    return out / passes


_block_callback: ContextVar[Callable[[], None] | None] = ContextVar("algnet_block_callback", default=None)
_hooks_lock = threading.Lock()
_hooks: dict[int, list] = {}  # id(net) -> [hook handles, number of calls using them]


def _after_block(_module: torch.nn.Module, _args: object, _output: object) -> None:
    callback = _block_callback.get()
    if callback is not None:
        callback()


@contextlib.contextmanager
def _each_block(net: ALGNet, callback: Callable[[], None]) -> Iterator[int]:
    """Call ``callback`` after every ALGBlock of ``net`` in this thread (other threads are not affected), while
    the context lasts; yields the number of ALGBlocks. The hooks are removed when the last user leaves."""
    with _hooks_lock:
        entry = _hooks.get(id(net))
        if entry is None:
            blocks = [m for m in net.modules() if isinstance(m, ALGBlock)]
            entry = _hooks[id(net)] = [[b.register_forward_hook(_after_block) for b in blocks], 0]
        entry[1] += 1
    token = _block_callback.set(callback)
    try:
        yield len(entry[0])
    finally:
        _block_callback.reset(token)
        with _hooks_lock:
            entry[1] -= 1
            if entry[1] == 0:
                for handle in entry[0]:
                    handle.remove()
                del _hooks[id(net)]


def _tiled_one(
    net: ALGNet,
    image: Tensor,
    tile: int,
    overlap: int,
    per_batch: int,
    amp: torch.dtype | None,
    ensemble: bool,
    cancel: CancelFn | None,
) -> Tensor:
    """Restore one (C, H, W) float32 image by blended overlapping tiles."""
    device = next(net.parameters()).device
    _, h, w = image.shape
    th, tw = min(tile, h), min(tile, w)
    boxes = [(y, x) for y in _tile_starts(h, th, overlap) for x in _tile_starts(w, tw, overlap)]
    out = torch.zeros_like(image)
    norm = torch.zeros((1, h, w), dtype=image.dtype, device=image.device)
    for i in range(0, len(boxes), per_batch):
        if cancel is not None and cancel():
            raise DeblurCancelled("deblur was cancelled")
        group = boxes[i : i + per_batch]
        crops = torch.stack([image[:, y : y + th, x : x + tw] for y, x in group]).to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            restored = _restore(net, crops, ensemble).to(image.device)
        if not bool(torch.isfinite(restored).all()):
            hint = " (float16 overflow? try precision='float32')" if amp is torch.float16 else ""
            source = getattr(net, "provenance", {}).get("path", "the given model")
            raise RuntimeError(f"the network produced NaN or Inf values{hint}: are the weights of {source} broken?")
        for (y, x), res in zip(group, restored, strict=True):
            weight = torch.outer(_window(th, y, h, overlap), _window(tw, x, w, overlap)).to(image.device)
            out[:, y : y + th, x : x + tw] += res * weight
            norm[:, y : y + th, x : x + tw] += weight
    return out / norm


def tiles_per_batch(device: torch.device, auto_tile: int, tile_area: int, cap: int = MAX_TILES_PER_BATCH) -> int:
    """How many tiles go through the network at once: as many as fit in one auto-sized tile's memory on a
    GPU; one on a CPU, where batching gains little and would delay progress and cancel by a whole batch."""
    if device.type == "cpu":
        return 1
    return max(1, min(cap, auto_tile**2 // tile_area))


def _count_tiles(h: int, w: int, tile: int, overlap: int) -> int:
    th, tw = min(tile, h), min(tile, w)
    return len(_tile_starts(h, th, overlap)) * len(_tile_starts(w, tw, overlap))


def _grey_if(image: Tensor, restored: Tensor) -> Tensor:
    """``restored`` (C, H, W), made grey (the channels' mean) when every channel of ``image`` is the same."""
    if len(image) > 1 and all(torch.equal(image[0], c) for c in image[1:]):
        return restored.mean(dim=0, keepdim=True).expand_as(restored)
    return restored


def _check_tensor(batch: Tensor, channels: int) -> None:
    if batch.ndim != 4 or batch.shape[1] != channels:
        raise ValueError(f"expected a (B, {channels}, H, W) batch, got shape {tuple(batch.shape)}")
    if batch.numel() == 0:
        raise ValueError(f"the image is empty (shape {tuple(batch.shape)})")
    if min(batch.shape[-2:]) < MULTIPLE:
        h, w = batch.shape[-2:]
        raise ValueError(f"the image is {h}x{w} pixels; ALGNet needs at least {MULTIPLE}x{MULTIPLE}")
    bad = (~torch.isfinite(batch)).sum().item()
    if bad:
        raise ValueError(f"the image has {bad} NaN or Inf values; replace them first (e.g. np.nan_to_num)")


def _check_tiling(tile: int | str | None, overlap: int) -> None:
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"overlap must be a whole number of pixels >= 0, got {overlap!r}")
    if tile is None or tile == "auto":
        return
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < MULTIPLE:
        raise ValueError(f"tile must be 'auto', None or a whole number of pixels >= {MULTIPLE}, got {tile!r}")


def deblur_tensor(
    batch: Tensor,
    model: str | os.PathLike | ALGNet = "motion",
    tile: int | str | None = "auto",
    overlap: int = DEFAULT_OVERLAP,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    ensemble: bool = False,
    grey: bool = True,
) -> Tensor:
    """The tiled engine: a (B, C, H, W) float batch in 0..1 -> its restoration, same shape/dtype/device.

    With ``grey`` (the default), an image whose channels are all equal (grey stored as RGB) comes back grey:
    each channel the mean of the restored ones (``False`` for a chunk of a larger image, where it would decide
    chunk by chunk). ``tile=None`` runs whole images; ``tile="auto"`` uses :func:`choose_tile`.
    ``progress(done, total)`` counts ALGBlocks run (over all tiles, images and ensemble passes); ``cancel()`` is
    checked after each. On CUDA out-of-memory the tile is halved (one tile per batch from then on) and the image
    restarted; ``progress`` then counts afresh.
    """
    _check_tiling(tile, overlap)
    net = _resolve_model(model, device)
    dev = next(net.parameters()).device
    _check_tensor(batch, net._hub_mixin_config.get("img_channel", 3))
    h, w = batch.shape[-2:]
    auto_tile = choose_tile(net._hub_mixin_config["width"], dev)
    size = auto_tile if tile == "auto" else max(h, w) if tile is None else int(tile)
    if size < max(h, w) and size < 2 * overlap + MULTIPLE:
        raise ValueError(f"tile {size} is too small for overlap {overlap}: need at least {2 * overlap + MULTIPLE}")
    amp = _autocast_dtype(precision, dev)
    images = batch.float()
    max_batch = MAX_TILES_PER_BATCH
    done, total = 0, 0

    def after_block() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(min(done, total), total)
        if cancel is not None and cancel():
            raise DeblurCancelled("deblur was cancelled")

    while True:
        tiles = len(images) * _count_tiles(h, w, size, overlap)
        per_batch = tiles_per_batch(dev, auto_tile, min(size, h) * min(size, w), max_batch)
        log.info("algnet: %dx%d image(s), tile %d, overlap %d, %d tile(s) on %s", w, h, size, overlap, tiles, dev)
        done = 0
        try:
            with torch.inference_mode(), _each_block(net, after_block) as blocks:
                forwards = len(images) * math.ceil(_count_tiles(h, w, size, overlap) / per_batch)
                total = forwards * blocks * (ENSEMBLE_SIZE if ensemble else 1)
                out = [_tiled_one(net, img, size, overlap, per_batch, amp, ensemble, cancel) for img in images]
            out = [_grey_if(img, res) for img, res in zip(images, out, strict=True)] if grey else out
            return torch.stack(out).to(batch.dtype)
        except torch.OutOfMemoryError:
            if size // 2 < 2 * overlap + MULTIPLE:
                raise
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            size, max_batch = size // 2, 1
            log.warning("algnet: out of GPU memory, retrying with tile %d", size)


def normalization_range(
    colour: Any, dtype: np.dtype, normalize: str, percentiles: tuple[float, float]
) -> tuple[float, float]:
    """The (low, high) values that map to 0 and 1 (see the module docs); ``colour`` is a numpy or dask array."""
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    low_q, high_q = percentiles
    if not 0 <= low_q < high_q <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}")
    if dtype.kind == "u" and normalize == "dtype":
        return 0.0, float(np.iinfo(dtype).max)
    lazy = type(colour).__module__.startswith("dask")
    if normalize == "percentile":
        flat = colour.ravel() if lazy else np.asarray(colour).ravel()
        stats = (da_percentile(flat, percentiles) if lazy else np.percentile(flat, percentiles)).tolist()
    else:
        stats = [colour.min(), colour.max()]
    if lazy:
        import dask

        stats = dask.compute(*stats)
    lo, hi = (float(v) for v in stats)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("the image has NaN or Inf values; replace them first (e.g. np.nan_to_num)")
    if normalize == "auto":
        if dtype == np.uint16 and hi < 2**AUTO_RANGE_BITS:
            return lo, hi
        if dtype.kind == "u":
            return 0.0, float(np.iinfo(dtype).max)
    if normalize in ("auto", "dtype") and lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    return lo, hi


def da_percentile(flat: Any, percentiles: tuple[float, float]) -> Any:
    """Percentiles of a flat dask array (dask's own approximation, merged from the chunks)."""
    import dask.array

    return dask.array.percentile(flat, list(percentiles))


Mapping = tuple[float, float, float, float]
"""(low, high, clip low, clip high): low and high map to 0 and 1; the result is clipped to the clip range (the
dtype's, see the module docs)."""


def value_mapping(
    colour: Any, dtype: np.dtype, normalize: str = "auto", percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> Mapping:
    """The one :data:`Mapping` of ``colour`` (numpy or dask: all its values, every page of a stack)."""
    lo, hi = normalization_range(colour, dtype, normalize, percentiles)
    if dtype.kind == "u":
        return lo, hi, 0.0, float(np.iinfo(dtype).max)
    if normalize in ("auto", "dtype") and (lo, hi) == (0.0, 1.0):
        return lo, hi, 0.0, 1.0
    finite = np.finfo(dtype)
    return lo, hi, float(finite.min), float(finite.max)


def _numpy_dtype(image: np.ndarray | Tensor) -> np.dtype:
    """The image's dtype in numpy's terms (bfloat16, which numpy lacks: float32, for its values' mapping)."""
    if isinstance(image, Tensor):
        return _to_numpy(torch.empty(0, dtype=image.dtype)).dtype
    return image.dtype.newbyteorder("=")


def _to_numpy(tensor: Tensor) -> np.ndarray:
    """A CPU tensor as numpy (bfloat16, which numpy lacks, as float32)."""
    return tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _check_dtype(dtype: np.dtype) -> None:
    if dtype not in (np.uint8, np.uint16) and dtype.kind != "f":
        raise TypeError(f"unsupported image dtype {dtype}: use uint8, uint16, float32 or float64")


def _deblur_array(
    image: np.ndarray | Tensor,
    net: ALGNet,
    tile: int | str | None,
    overlap: int,
    precision: str,
    progress: ProgressFn | None,
    cancel: CancelFn | None,
    normalize: str = "auto",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    ensemble: bool = False,
    mapping: Mapping | None = None,
    grey: bool = True,
) -> np.ndarray | Tensor:
    dtype = _numpy_dtype(image)
    _check_dtype(dtype)
    if image.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC image, got shape {tuple(image.shape)}")
    if image.size == 0 if isinstance(image, np.ndarray) else image.numel() == 0:
        raise ValueError(f"the image is empty (shape {tuple(image.shape)})")
    # A native-byte-order copy of a numpy image (never a view: the input may be read-only or big-endian).
    original = image.detach() if isinstance(image, Tensor) else torch.from_numpy(np.array(image, dtype=dtype))
    planes = original if original.ndim == 3 else original[..., None]
    if planes.is_floating_point() and not bool(torch.isfinite(planes).all()):
        bad = (~torch.isfinite(planes)).sum().item()
        raise ValueError(f"the image has {bad} NaN or Inf values; replace them first (e.g. np.nan_to_num)")
    channels = planes.shape[-1]
    color = (planes[..., :3] if channels in (3, 4) else planes).to("cpu")
    lo, hi, clip_lo, clip_hi = mapping or value_mapping(_to_numpy(color), dtype, normalize, percentiles)
    scale = (hi - lo) or 1.0
    norm = ((color.double() - lo) / scale).float().permute(2, 0, 1)  # (c, h, w), mapped in float64
    batch = norm[None] if channels in (3, 4) else norm[:, None].expand(-1, 3, -1, -1)
    grey = grey or channels not in (3, 4)  # planes run as grey RGB are grey whatever the chunk
    restored = deblur_tensor(
        batch, net, tile, overlap, progress, cancel, precision=precision, ensemble=ensemble, grey=grey
    )
    if isinstance(image, Tensor) and image.dtype == torch.bfloat16:  # mapped as float32, stored as bfloat16
        largest = float(torch.finfo(torch.bfloat16).max)
        clip_lo, clip_hi = max(clip_lo, -largest), min(clip_hi, largest)
    bound = torch.finfo(restored.dtype).max  # each channel clipped to the clip range normalised, before a mean
    restored = restored.clamp_(max((clip_lo - lo) / scale, -bound), min((clip_hi - lo) / scale, bound))
    result = restored[0] if channels in (3, 4) else restored.mean(dim=1)  # (c, h, w)
    result = result.permute(1, 2, 0).double() * scale + lo
    result = result.clamp_(clip_lo, clip_hi)
    if dtype.kind != "f":
        result = result.round()
    result = result.to(torch.uint16 if dtype == np.uint16 else original.dtype)
    if channels == 4:
        result = torch.cat([result, planes[..., 3:].to("cpu")], dim=-1)
    result = result.reshape(image.shape)
    return result.to(image.device) if isinstance(image, Tensor) else result.numpy()


def stack_mapping(
    image: Any, pages: int = 0, normalize: str = "auto", percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> Mapping:
    """The one :data:`Mapping` of an image or stack (numpy, torch or dask; ``pages`` as in :func:`deblur`),
    over all its pages: the grey or many-channel values, or the RGB of RGB(A)."""
    dtype = _numpy_dtype(image) if isinstance(image, np.ndarray | Tensor) else np.dtype(image.dtype)
    _check_dtype(dtype.newbyteorder("="))
    rgb = image.ndim - pages == 3 and image.shape[-1] in (3, 4)
    colour = image[..., :3] if rgb else image
    if isinstance(colour, Tensor):
        colour = _to_numpy(colour.detach().cpu())
    return value_mapping(colour, dtype.newbyteorder("="), normalize, percentiles)


def _check_pages(image: Any, pages: int) -> None:
    if isinstance(pages, bool) or not isinstance(pages, int) or not 0 <= pages <= max(image.ndim - 2, 0):
        raise ValueError(f"pages must be a whole number from 0 to {max(image.ndim - 2, 0)}, got {pages!r}")
    if image.ndim - pages not in (2, 3):
        what = f"{pages} page axes and " if pages else ""
        raise ValueError(f"expected {what}an HxW or HxWxC image, got shape {tuple(image.shape)}")


def _deblur_pages(
    image: np.ndarray | Tensor, net: ALGNet, pages: int, progress: ProgressFn | None, **options: Any
) -> np.ndarray | Tensor:
    """Deblur every page of an in-memory stack with one mapping computed over all of them."""
    mapping = stack_mapping(image, pages, options["normalize"], options["percentiles"])
    flat = image.reshape(-1, *image.shape[pages:])
    count = len(flat)

    def each(index: int) -> ProgressFn | None:
        if progress is None:
            return None
        return lambda done, total: progress(index * total + done, count * total)

    out = [_deblur_array(page, net, progress=each(i), mapping=mapping, **options) for i, page in enumerate(flat)]
    stacked = torch.stack(out) if isinstance(image, Tensor) else np.stack(out)
    return stacked.reshape(image.shape)


_load_lock = threading.Lock()


def _deblur_block(
    block: np.ndarray, model: str | ALGNet, device: str, pages: int, mapping: Mapping, **options: Any
) -> np.ndarray:
    """One chunk of a dask image or stack, wherever dask runs it: a model name is loaded once per process (the
    lock: a worker's threads start chunks at once, and would each load it)."""
    with _load_lock:
        net = model if isinstance(model, ALGNet) else _resolve_model(model, device)
    if pages == 0:  # grey=False: a chunk that happens to be grey stays as restored, like its neighbours
        return _deblur_array(block, net, progress=None, mapping=mapping, grey=False, **options)
    out = np.empty(block.shape, np.dtype(block.dtype).newbyteorder("="))
    for index in np.ndindex(block.shape[:pages]):
        out[index] = _deblur_array(block[index], net, progress=None, mapping=mapping, grey=False, **options)
    return out


def _merge_small(sizes: tuple[int, ...], minimum: int) -> tuple[int, ...]:
    """Chunk sizes along one axis with every chunk of at least ``minimum`` (merged into a neighbour), so that
    no chunk, the edge remainder of a regular chunking included, is smaller than one network tile."""
    merged: list[int] = []
    for size in sizes:
        if merged and merged[-1] < minimum:
            merged[-1] += size
        else:
            merged.append(size)
    if len(merged) > 1 and merged[-1] < minimum:
        last = merged.pop()
        merged[-1] += last
    return tuple(merged)


def deblur_dask(
    image: Any,
    model: str | os.PathLike | ALGNet,
    device: str | torch.device,
    pages: int,
    mapping: Mapping | None = None,
    **options: Any,
) -> Any:
    """The lazy deblurring of a dask image or stack (``options``: :func:`_deblur_array`'s tiling, precision,
    cancel, normalize, percentiles and ensemble); ``mapping`` (:func:`value_mapping`) is computed over the
    whole array when not given. A model that is not an instance goes into the graph by name."""
    dtype = np.dtype(image.dtype).newbyteorder("=")
    _check_dtype(dtype)
    _check_pages(image, pages)
    chunks = {axis: _merge_small(image.chunks[axis], MULTIPLE) for axis in (pages, pages + 1)}
    if image.ndim - pages == 3:
        chunks[image.ndim - 1] = (image.shape[-1],)  # channels whole
    if any(image.chunks[axis] != sizes for axis, sizes in chunks.items()):
        image = image.rechunk(chunks)
    if mapping is None:
        mapping = stack_mapping(image, pages, options["normalize"], options["percentiles"])
    overlap = options["overlap"]
    depth = {axis: overlap if axis in (pages, pages + 1) else 0 for axis in range(image.ndim)}
    spec = model if isinstance(model, ALGNet) else os.fspath(model)
    return image.map_overlap(
        _deblur_block,
        depth=depth,
        boundary="none",
        dtype=dtype,
        meta=np.empty((0,) * image.ndim, dtype),
        model=spec,
        device=str(device),
        pages=pages,
        mapping=tuple(float(v) for v in mapping),
        **options,
    )


def deblur(
    image: Any,
    model: str | os.PathLike | ALGNet = "motion",
    tile: int | str | None = "auto",
    overlap: int = DEFAULT_OVERLAP,
    device: str | torch.device = "auto",
    precision: str = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    normalize: str = "auto",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    ensemble: bool = False,
    pages: int = 0,
) -> Any:
    """Deblur ``image`` and return the result with the same shape and dtype (values clipped to the dtype's range).

    ``image``: numpy array or torch tensor, HxW or HxWxC, uint8/uint16/float (see the module docs for the
    normalisation and channel rules), or a dask array (returns a lazy dask array, computed chunk by chunk
    with ``map_overlap`` on dask's scheduler, a ``dask.distributed`` client's workers when one is active;
    ``progress`` is not called for dask, ``cancel`` is checked in every chunk). ``pages``: how many leading
    axes index pages of a stack (e.g. 1 for ZxHxW or TxHxWx3), deblurred one by one with one mapping.
    ``model``: a registered name, a ``save_pretrained`` folder, a Hub repo id or an ALGNet instance (never
    changed: used as is, or copied to ``device`` when it is elsewhere). Models loaded by name are cached;
    a local folder is loaded again when its files change (see :func:`weights_stamp`). ``tile``: pixels per
    tile side, ``"auto"`` or None (whole image). ``precision``: ``"auto"`` (float16 autocast on CUDA,
    float32 elsewhere), ``"float32"``, ``"float16"`` or ``"bfloat16"``. ``normalize``: one of
    :data:`NORMALIZE_MODES` (``percentiles`` for ``"percentile"``). ``ensemble``: average the 8 flips and
    transposes (8x the time). ``progress(done, total)`` is called after each ALGBlock of each tile;
    ``cancel()`` returning True raises :class:`DeblurCancelled`.
    """
    lazy = type(image).__module__.startswith("dask")
    if not (lazy or isinstance(image, np.ndarray | Tensor)):
        raise TypeError(f"expected a numpy array, torch tensor or dask array, got {type(image).__name__}: "
                        "convert it first, e.g. np.asarray(image)")  # fmt: skip
    _check_tiling(tile, overlap)
    _check_pages(image, pages)
    options = dict(tile=tile, overlap=overlap, precision=precision, cancel=cancel, normalize=normalize,
                   percentiles=percentiles, ensemble=ensemble)  # fmt: skip
    if lazy:
        if isinstance(model, ALGNet):
            model = _resolve_model(model, device)
        else:  # checked here (loaded on the CPU, cached); loaded again where the chunks run, on their device
            _resolve_model(model, "cpu")
        return deblur_dask(image, model, device, pages, **options)
    net = _resolve_model(model, device)
    if pages:
        return _deblur_pages(image, net, pages, progress, **options)
    return _deblur_array(image, net, progress=progress, **options)
