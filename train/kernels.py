"""Blur kernels for synthetic training data and benchmarks: camera shake, disk and Gaussian defocus, measured PSFs.

Every kernel is a non-negative float64 array that sums to 1, square with an odd side, and centred: its
centre of mass lies within half a pixel of the central pixel, so the blurred image stays aligned with
the sharp one (the network is trained to restore, not to shift). Random kernels take a
``numpy.random.Generator``: the same generator state gives the same kernel.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from algnet_core import imageio

SUPERSAMPLE = 8
"""Sub-pixels per pixel side used to anti-alias disk edges."""


def _normalise(kernel: np.ndarray) -> np.ndarray:
    kernel = np.clip(kernel, 0.0, None)
    return kernel / kernel.sum()


def pad_to(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad an odd square kernel symmetrically to ``size`` x ``size`` (odd, >= its side)."""
    side = kernel.shape[0]
    if size < side or (size - side) % 2:
        raise ValueError(f"cannot pad a {side}x{side} kernel to {size}x{size}")
    p = (size - side) // 2
    return np.pad(kernel, p)


def centre(kernel: np.ndarray) -> np.ndarray:
    """Shift a kernel by whole pixels so its centre of mass is the central pixel; result is odd-sized."""
    kernel = _normalise(np.asarray(kernel, dtype=np.float64))
    rows, cols = np.indices(kernel.shape)
    cy, cx = (rows * kernel).sum(), (cols * kernel).sum()
    iy, ix = round(cy), round(cx)
    half = max(iy, kernel.shape[0] - 1 - iy, ix, kernel.shape[1] - 1 - ix)
    out = np.zeros((2 * half + 1, 2 * half + 1))
    out[half - iy : half - iy + kernel.shape[0], half - ix : half - ix + kernel.shape[1]] = kernel
    return out


def disk_kernel(radius: float, size: int | None = None) -> np.ndarray:
    """Uniform disk (pillbox) of ``radius`` pixels, edges anti-aliased by area coverage.

    ``radius`` 0 gives the identity kernel. ``size`` defaults to ``2 * ceil(radius) + 1``.
    """
    if radius < 0:
        raise ValueError("radius must be >= 0")
    half = math.ceil(radius)
    size = 2 * half + 1 if size is None else size
    if radius == 0:
        return pad_to(np.ones((1, 1)), size)
    n = (2 * half + 1) * SUPERSAMPLE
    offsets = (np.arange(n) + 0.5) / SUPERSAMPLE - (half + 0.5)
    inside = (offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2
    cover = inside.reshape(2 * half + 1, SUPERSAMPLE, 2 * half + 1, SUPERSAMPLE).mean(axis=(1, 3))
    return pad_to(_normalise(cover), size)


def gaussian_kernel(sigma: float, size: int | None = None) -> np.ndarray:
    """Isotropic Gaussian of standard deviation ``sigma`` pixels; ``size`` defaults to 2*ceil(3 sigma)+1."""
    if sigma <= 0:
        raise ValueError("sigma must be > 0")
    size = 2 * math.ceil(3 * sigma) + 1 if size is None else size
    r = np.arange(size) - size // 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    return _normalise(np.outer(g, g))


def camera_shake_trajectory(
    rng: np.random.Generator,
    samples: int = 2000,
    max_anxiety: float = 0.005,
    max_jerk_prob: float = 0.2,
    path_length: float = 60.0,
) -> np.ndarray:
    """A random 2-D camera-shake path (complex positions in pixels), after Boracchi & Foi (2012).

    A point moves along a path of about ``path_length`` pixels in ``samples`` equal time steps. At
    every step its velocity receives Gaussian noise and a pull back towards the start (centripetal),
    both scaled by an ``anxiety`` drawn from U(0, max_anxiety) and by the step length; with a per-step
    probability of U(0, max_jerk_prob) x anxiety, a jerk roughly reverses the direction. Small anxiety
    gives near-straight strokes, large anxiety curved ones with a few turn-backs, like real shake.
    The speed varies smoothly along the path (the camera dwells where it slows, which brightens the
    kernel there), and the exposure covers a random fraction (0.1 to 1) of it, so short straight strokes
    occur too.
    """
    anxiety = max_anxiety * rng.uniform()
    jerk_prob = max_jerk_prob * rng.uniform() * anxiety
    centripetal = 0.7 * rng.uniform()
    gaussian_term = 10 * rng.uniform()
    step = path_length / (samples - 1)
    time = np.linspace(0, 1, samples)
    wobble = sum(np.cos(2 * np.pi * rng.uniform(0.5, 3) * time + rng.uniform(0, 2 * np.pi)) for _ in range(3))
    speed = step * np.exp(rng.uniform(0, 1) * wobble / np.sqrt(1.5))  # log-speed: std up to 1
    v = step * np.exp(1j * rng.uniform(0, 2 * np.pi))
    x = np.zeros(samples, dtype=np.complex128)
    noise = rng.standard_normal((samples, 2)) @ np.array([1.0, 1j])
    jerks = rng.uniform(size=samples) < jerk_prob
    jerk_angles = np.pi + rng.uniform(-0.5, 0.5, size=samples)
    for t in range(1, samples):
        jerk = 2 * v * np.exp(1j * jerk_angles[t]) if jerks[t] else 0.0
        v = v + jerk + anxiety * step * (gaussian_term * noise[t] - centripetal * x[t - 1])
        v *= speed[t] / max(abs(v), 1e-12)
        x[t] = x[t - 1] + v
    exposure = rng.uniform(0.1, 1.0)
    return x[: max(2, round(exposure * samples))]


def rasterise(path: np.ndarray, length: float, size: int) -> np.ndarray:
    """Scale a complex path so its longest extent is ``length`` pixels and splat it into a kernel.

    The path is centred on its mean (centre of mass of the exposure), then drawn with bilinear weights
    into a ``size`` x ``size`` grid (odd ``size``); parts outside are clipped, then the kernel is normalised.
    """
    path = path - path.mean()
    extent = max(np.ptp(path.real), np.ptp(path.imag), 1e-12)
    path = path * (length / extent)
    half = size // 2
    xs, ys = path.real + half, path.imag + half
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    kernel = np.zeros((size + 1, size + 1))
    for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yy, xx = np.clip(y0 + dy, 0, size), np.clip(x0 + dx, 0, size)
        np.add.at(kernel, (yy, xx), w)
    return _normalise(kernel[:size, :size])


def motion_kernel(rng: np.random.Generator, size: int, min_length: float, max_length: float) -> np.ndarray:
    """A random camera-shake kernel of side ``size`` whose path spans U(min_length, max_length) pixels."""
    if max_length > size - 2:
        raise ValueError(f"max_length {max_length} does not fit a {size}x{size} kernel")
    length = rng.uniform(min_length, max_length)
    return rasterise(camera_shake_trajectory(rng), length, size)


def random_defocus_kernel(
    rng: np.random.Generator, size: int, radius: tuple[float, float], gaussian_prob: float
) -> np.ndarray:
    """A disk of radius U(radius), or with probability ``gaussian_prob`` a Gaussian of sigma = radius / 2."""
    r = rng.uniform(*radius)
    if rng.uniform() < gaussian_prob:
        return gaussian_kernel(max(r / 2, 0.3), size=size)
    return disk_kernel(r, size=size)


def psf_kernel(psf: np.ndarray, source: str = "the PSF") -> np.ndarray:
    """A point-spread function as a training kernel: normalised (sum 1) and centred (:func:`centre`).

    ``psf`` must be one 2-D plane (axes of length 1 are dropped), finite, non-negative and not all zero;
    otherwise ``ValueError`` (``TypeError`` for non-numeric data), naming ``source`` (e.g. the file).
    """
    arr = np.asarray(psf)
    if arr.dtype.kind not in "uif":
        raise TypeError(f"{source}: a PSF must hold numbers, not {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{source} is empty (shape {arr.shape})")
    singleton = [axis for axis, n in enumerate(arr.shape) if n == 1][: max(0, arr.ndim - 2)]
    plane = arr.squeeze(axis=tuple(singleton)).astype(np.float64)
    if plane.ndim != 2:
        raise ValueError(
            f"{source} has shape {arr.shape}: training on 2-D images needs a 2-D PSF (one plane); "
            "for a 3-D PSF give its in-focus plane, e.g. psf[z]"
        )
    bad = int((~np.isfinite(plane)).sum())
    if bad:
        raise ValueError(f"{source} has {bad} NaN or Inf values")
    if plane.min() < 0:
        raise ValueError(
            f"{source} has negative values (min {plane.min():.3g}): subtract the background and clip at 0 "
            "first, e.g. np.clip(psf - background, 0, None)"
        )
    if plane.max() == 0:
        raise ValueError(f"{source} is all zeros")
    return centre(plane)


def load_psf(path: str | Path) -> np.ndarray:
    """Read a PSF file, ``.npy`` or an image :func:`algnet_core.imageio.read_image` reads (``.tif``, ``.png``,
    ...), and make it a kernel with :func:`psf_kernel`. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no PSF file {path}")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"{path} cannot be read as a .npy array: {err}") from err
    else:
        stack = imageio.read_image(path)
        if stack.rgb:
            raise ValueError(f"{path} is a colour image: a PSF is one grey plane")
        arr = stack.pages
    return psf_kernel(arr, str(path))
