"""Image quality of a restoration against its sharp reference: PSNR, SSIM and MAE, one convention everywhere.

``algnet eval``, training validation (``train.engine``) and the benchmark builder (``train.benchmark``) all
score images here, so their numbers agree:

* PSNR: scikit-image's ``peak_signal_noise_ratio``, ``10 log10(R^2 / MSE)`` with the MSE over all pixels
  and channels; ``inf`` for identical images.
* SSIM: scikit-image's ``structural_similarity`` with its defaults: 7x7 uniform windows (no Gaussian
  weights), sample covariance, K1 = 0.01, K2 = 0.03. An HxWxC image is scored channel by channel
  (``channel_axis=-1``) and the channel scores averaged; an HxW image is one plane.
* MAE: the mean absolute difference over all pixels and channels, divided by R (so on the 0..1 scale).

All three are computed in float64. R, the data range, is :func:`data_range_of` the reference unless given:
the dtype's maximum for unsigned integers (255 for uint8, 65535 for uint16); 1.0 for float images within
[0, 1]; for any other float image the reference's max - min, the same range that
:func:`algnet_core.deblur` maps such an image from. Image and reference must have the same shape, and the
same dtype unless both are floats.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def data_range_of(reference: np.ndarray) -> float:
    """The data range R of ``reference`` (see the module docs); ``TypeError`` for bool or signed integers."""
    dtype = reference.dtype
    if dtype.kind == "u":
        return float(np.iinfo(dtype).max)
    if dtype.kind != "f":
        raise TypeError(f"no data range for {dtype} images: use unsigned integers or floats")
    lo, hi = float(reference.min()), float(reference.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("the reference has NaN or Inf values")
    if lo >= 0.0 and hi <= 1.0:
        return 1.0
    if hi == lo:
        raise ValueError(f"the reference is constant ({lo}) outside [0, 1]: it has no data range; pass one")
    return hi - lo


def _prepare(image: np.ndarray, reference: np.ndarray, data_range: float | None) -> tuple:
    image, reference = np.asarray(image), np.asarray(reference)
    if image.shape != reference.shape:
        raise ValueError(f"image {image.shape} and reference {reference.shape} differ in shape")
    if image.dtype != reference.dtype and not image.dtype.kind == reference.dtype.kind == "f":
        raise ValueError(f"image ({image.dtype}) and reference ({reference.dtype}) differ in dtype")
    peak = data_range_of(reference) if data_range is None else float(data_range)
    return image.astype(np.float64), reference.astype(np.float64), peak


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float | None = None) -> float:
    """PSNR in dB of ``image`` against ``reference`` (``inf`` when they are equal)."""
    a, b, peak = _prepare(image, reference, data_range)
    with np.errstate(divide="ignore"):
        return float(peak_signal_noise_ratio(b, a, data_range=peak))


def ssim(image: np.ndarray, reference: np.ndarray, data_range: float | None = None) -> float:
    """Mean SSIM of ``image`` against ``reference``, HxW or HxWxC (per channel, then averaged)."""
    a, b, peak = _prepare(image, reference, data_range)
    return float(structural_similarity(b, a, data_range=peak, channel_axis=-1 if a.ndim == 3 else None))


def mae(image: np.ndarray, reference: np.ndarray, data_range: float | None = None) -> float:
    """Mean absolute error of ``image`` against ``reference``, divided by the data range."""
    a, b, peak = _prepare(image, reference, data_range)
    return float(np.abs(a - b).mean() / peak)


def image_metrics(image: np.ndarray, reference: np.ndarray, data_range: float | None = None) -> dict[str, float]:
    """``{"psnr", "ssim", "mae"}`` of ``image`` against ``reference``."""
    return {f.__name__: f(image, reference, data_range) for f in (psnr, ssim, mae)}
