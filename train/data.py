"""Training data: paired benchmark folders, on-the-fly synthetic blur, and a resumable sampler.

Every dataset returns ``(blurry, sharp)`` float32 tensors (3, h, w) in 0..1. Randomness (crop position,
flips, kernels, noise, JPEG) comes from ``numpy.random.default_rng([seed, epoch, index])``: the
:class:`EpochSampler` yields ``(epoch, index)`` keys, so a sample is the same whichever DataLoader worker
builds it, and a resumed run sees exactly the batches the uninterrupted run would have seen.

Folder layouts (``root`` is the dataset's top folder):

* GoPro: ``root/{train,test}/SEQ/{blur,sharp}/NAME.png``
* HIDE: blurry ``root/{train,test}/**/NAME.png``, sharp ``root/GT/NAME.png``
* RealBlur-J/-R: ``root/RealBlur_{J,R}_{train,test}_list.txt`` lines ``GT_PATH BLUR_PATH`` relative to root
* DPDD: ``root/{train,val,test}_c/source`` (centre view) and ``root/{train,val,test}_c/target``
* any paired folder: ``blur_dir`` and ``sharp_dir`` holding images with the same file names

In place of a file, a dataset also takes an image already in memory, as :func:`read_image` would return it
(a float (h, w, 3) array in 0..1, e.g. a broadcast view of a grey plane): :func:`load` reads either.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.signal import fftconvolve
from torch.utils.data import Dataset, Sampler

from algnet_core import imageio

from . import kernels

IMAGE_EXTENSIONS = tuple(sorted(imageio.IMAGE_SUFFIXES | imageio.READ_ONLY_SUFFIXES))
Key = int | tuple[int, int]
MILD_MOTION_LENGTH = (1.0, 3.0)
"""Path extent (px) of the barely blurred motion samples."""
MILD_DEFOCUS_RADIUS = (0.6, 1.0)
"""Disk radius (px) of the barely blurred defocus samples."""


def read_image(path: str | Path) -> np.ndarray:
    """An image file as a float32 (h, w, 3) array in 0..1, read by :func:`algnet_core.imageio.read_image`.

    Unsigned integers are divided by their dtype's maximum (255, or 65535: 16-bit files keep their
    precision), floats are taken as 0..1. Greyscale is repeated, alpha dropped, a TIFF stack's first page used.
    """
    page = imageio.read_image(path).pages[0]
    page = page[..., None] if page.ndim == 2 else page
    rgb = page[..., :3] if page.shape[2] >= 3 else np.repeat(page[..., :1], 3, axis=2)
    if rgb.dtype.kind == "u":
        return rgb.astype(np.float32) / np.iinfo(rgb.dtype).max
    if rgb.dtype.kind == "f":
        return rgb.astype(np.float32)
    raise TypeError(f"{path}: {rgb.dtype} images are not supported; use 8- or 16-bit or float files")


def load(source: str | Path | np.ndarray) -> np.ndarray:
    """A training image: a file read by :func:`read_image`, or an array already in that form, as it is."""
    return source if isinstance(source, np.ndarray) else read_image(source)


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted), optionally searching sub-folders."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in Path(folder).glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS)


def _match(blurs: Sequence[Path], sharp_dir: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for blur in blurs:
        sharp = sharp_dir / blur.name
        if not sharp.exists():
            raise FileNotFoundError(f"no sharp image {sharp} for {blur}")
        pairs.append((blur, sharp))
    return pairs


def paired_folder_pairs(blur_dir: str | Path, sharp_dir: str | Path) -> list[tuple[Path, Path]]:
    """(blurry, sharp) paths for two folders of images with the same file names."""
    return _match(list_images(blur_dir), Path(sharp_dir))


def gopro_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """GoPro (GOPRO_Large): ``root/split/SEQ/blur/*.png`` with ``root/split/SEQ/sharp/*.png``."""
    pairs = []
    for seq in sorted(p for p in (Path(root) / split).iterdir() if p.is_dir()):
        pairs += _match(list_images(seq / "blur"), seq / "sharp")
    return pairs


def hide_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """HIDE: blurry images anywhere under ``root/split``, sharp ones in ``root/GT`` by file name."""
    return _match(list_images(Path(root) / split, recursive=True), Path(root) / "GT")


def realblur_pairs(root: str | Path, variant: str, split: str) -> list[tuple[Path, Path]]:
    """RealBlur-J or -R from its list file ``RealBlur_{variant}_{split}_list.txt`` (``GT BLUR`` lines)."""
    root = Path(root)
    lines = (root / f"RealBlur_{variant}_{split}_list.txt").read_text().split("\n")
    pairs = []
    for line in lines:
        if line.strip():
            gt, blur = line.split()[:2]
            pairs.append((root / blur, root / gt))
    return pairs


def dpdd_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """DPDD (canon, dual-pixel): centre view ``root/{split}_c/source``, all-in-focus ``.../target``."""
    base = Path(root) / f"{split}_c"
    return paired_folder_pairs(base / "source", base / "target")


def pairs_from_config(cfg: dict) -> list[tuple[Path, Path]]:
    """Dispatch on ``cfg["kind"]``: gopro, hide, realblur_j, realblur_r, dpdd or paired."""
    kind = cfg["kind"]
    if kind == "paired":
        return paired_folder_pairs(cfg["blur_dir"], cfg["sharp_dir"])
    split = cfg.get("split", "train")
    if kind == "gopro":
        return gopro_pairs(cfg["root"], split)
    if kind == "hide":
        return hide_pairs(cfg["root"], split)
    if kind in ("realblur_j", "realblur_r"):
        return realblur_pairs(cfg["root"], kind[-1].upper(), split)
    if kind == "dpdd":
        return dpdd_pairs(cfg["root"], split)
    raise ValueError(f"unknown paired dataset kind {kind!r}")


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(h, w, 3) float array -> contiguous float32 (3, h, w) tensor."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))


def random_crop_box(shape: Sequence[int], crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a uniformly placed ``crop`` x ``crop`` window inside an (h, w, ...) array."""
    h, w = shape[:2]
    if h < crop or w < crop:
        raise ValueError(f"image {h}x{w} is smaller than the {crop}x{crop} crop")
    return int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))


def centre_crop(arr: np.ndarray, crop: int | None) -> np.ndarray:
    """The central ``crop`` x ``crop`` window (the whole array when crop is None or too large)."""
    if crop is None:
        return arr
    h, w = arr.shape[:2]
    ch, cw = min(crop, h), min(crop, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return arr[top : top + ch, left : left + cw]


@dataclass
class Flips:
    """Augmentation of the paper: random horizontal and vertical flips (each with probability 1/2)."""

    horizontal: bool = True
    vertical: bool = True

    def __call__(self, arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        """Apply the same random flips to every array."""
        flip_h, flip_v = rng.uniform() < 0.5, rng.uniform() < 0.5
        out = list(arrays)
        if self.horizontal and flip_h:
            out = [a[:, ::-1] for a in out]
        if self.vertical and flip_v:
            out = [a[::-1] for a in out]
        return out


def index_of(key: Key) -> int:
    """The image index of a sampler key (validation ignores the epoch)."""
    return key[1] if isinstance(key, tuple) else key


def _rng(seed: int, key: Key) -> tuple[np.random.Generator, int]:
    epoch, index = key if isinstance(key, tuple) else (0, key)
    return np.random.default_rng([seed, epoch, index]), index


class PairedDataset(Dataset):
    """Aligned (blurry, sharp) image pairs (files or arrays, see :func:`load`); random crops and flips when
    ``crop`` is set and ``train``.

    With ``train=False`` the pair is returned whole, or centre-cropped to ``crop``.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path | np.ndarray, Path | np.ndarray]],
        crop: int | None = 256,
        flips: Flips | None = None,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        if not pairs:
            raise ValueError("no image pairs found")
        self.pairs, self.crop, self.train, self.seed = list(pairs), crop, train, seed
        self.flips = Flips() if flips is None else flips

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        rng, index = _rng(self.seed, key)
        blur_path, sharp_path = self.pairs[index]
        blur, sharp = load(blur_path), load(sharp_path)
        if blur.shape != sharp.shape:
            raise ValueError(f"{blur_path} {blur.shape} and {sharp_path} {sharp.shape} differ in size")
        if not self.train:
            return to_tensor(centre_crop(blur, self.crop)), to_tensor(centre_crop(sharp, self.crop))
        if self.crop is not None:
            top, left = random_crop_box(blur.shape, self.crop, rng)
            window = (slice(top, top + self.crop), slice(left, left + self.crop))
            blur, sharp = blur[window], sharp[window]
        blur, sharp = self.flips([blur, sharp], rng)
        return to_tensor(blur), to_tensor(sharp)


@dataclass
class BlurRecipe:
    """How :class:`SyntheticBlur` degrades a sharp patch (all ranges are sampled uniformly).

    ``kind``: "motion" (camera-shake trajectories), "defocus" (disk, or Gaussian with probability
    ``gaussian_prob``), "mixed" (each with probability 1/2), or "psf": always the point-spread function
    ``psf`` (a file or an array, checked, normalised and centred by :func:`kernels.load_psf` /
    :func:`kernels.psf_kernel`; ``kernel_size`` becomes its side). ``kernel_size`` is the (odd) kernel side.
    So that sharp inputs come back unchanged ("do no harm"), a share ``sharp_prob`` of samples is not
    blurred at all (identity kernel) and a share ``mild_prob`` is barely blurred (``MILD_MOTION_LENGTH`` px
    of shake, or a defocus of ``MILD_DEFOCUS_RADIUS`` px); both get the same noise and JPEG as the rest.
    Noise is Poisson-Gaussian, ``x + sqrt(a x + b^2) n`` with a in ``poisson`` and b in ``gaussian_sigma``;
    then the result is clipped (to 0..1 for 8-bit results, JPEG or ``quantise``, else only below 0),
    JPEG-compressed with probability ``jpeg_prob`` (quality in ``jpeg_quality``), and otherwise quantised to
    8 bits when ``quantise``.
    """

    kind: str = "motion"
    kernel_size: int = 31
    motion_length: tuple[float, float] = (3.0, 25.0)
    defocus_radius: tuple[float, float] = (1.0, 8.0)
    gaussian_prob: float = 0.2
    gaussian_sigma: tuple[float, float] = (0.0, 0.02)
    poisson: tuple[float, float] = (0.0, 0.0)
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (60, 95)
    quantise: bool = True
    sharp_prob: float = 0.0
    mild_prob: float = 0.0
    psf: str | np.ndarray | None = field(default=None, compare=False)
    psf_kernel: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("motion", "defocus", "mixed", "psf"):
            raise ValueError(f"unknown blur kind {self.kind!r}")
        if (self.kind == "psf") != (self.psf is not None):
            raise ValueError("a PSF is given with kind 'psf', and only then")
        if self.kind == "psf":
            if isinstance(self.psf, np.ndarray):
                self.psf_kernel = kernels.psf_kernel(self.psf)
            else:
                self.psf_kernel = kernels.load_psf(self.psf)
            self.kernel_size = self.psf_kernel.shape[0]
            if self.mild_prob:
                raise ValueError("mild_prob does not apply to a PSF (only sharp_prob does)")
        if self.kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd")
        if self.kind in ("defocus", "mixed") and math.ceil(self.defocus_radius[1]) > self.kernel_size // 2:
            raise ValueError("defocus radius does not fit kernel_size")
        if self.kind in ("motion", "mixed") and self.motion_length[1] > self.kernel_size - 2:
            raise ValueError("motion length does not fit kernel_size")
        if min(self.sharp_prob, self.mild_prob) < 0 or self.sharp_prob + self.mild_prob > 1:
            raise ValueError("sharp_prob and mild_prob must be >= 0 and sum to at most 1")

    def kernel(self, rng: np.random.Generator) -> np.ndarray:
        """Draw one normalised kernel (``kernel_size`` square): the identity, a mild or a full blur."""
        share = rng.uniform()
        if share < self.sharp_prob:
            return kernels.pad_to(np.ones((1, 1)), self.kernel_size)
        if self.kind == "psf":
            return self.psf_kernel
        mild = share < self.sharp_prob + self.mild_prob
        kind = self.kind
        if kind == "mixed":
            kind = "motion" if rng.uniform() < 0.5 else "defocus"
        if kind == "motion":
            length = MILD_MOTION_LENGTH if mild else self.motion_length
            return kernels.motion_kernel(rng, self.kernel_size, *length)
        radius = MILD_DEFOCUS_RADIUS if mild else self.defocus_radius
        return kernels.random_defocus_kernel(rng, self.kernel_size, radius, self.gaussian_prob)

    def finish(self, blurred: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noise, clipping, and JPEG or 8-bit quantisation of a blurred (h, w, 3) float image."""
        a, b = rng.uniform(*self.poisson), rng.uniform(*self.gaussian_sigma)
        noise = rng.standard_normal(blurred.shape).astype(np.float32)
        # 8-bit results are clipped to 0..1; 16-bit and float ones only below 0: a 12-bit plane mapped by its
        # blurred range reaches past 1 under a lighter blur, and deblur never sees such an image clipped
        out = np.clip(blurred + np.sqrt(a * np.clip(blurred, 0, None) + b * b) * noise, 0.0, None)
        eight_bit = self.quantise or self.jpeg_prob > 0
        out = np.minimum(out, 1.0) if eight_bit else out
        if rng.uniform() < self.jpeg_prob:
            quality = int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))
            buf = io.BytesIO()
            Image.fromarray(np.round(out * 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
            return np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
        if self.quantise:
            return np.round(out * 255) / 255.0
        return out


def blur_valid(patch: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """'valid' convolution of an (h, w, 3) patch: (h - k + 1, w - k + 1, 3), no border effects."""
    out = fftconvolve(patch, kernel[:, :, None], mode="valid", axes=(0, 1))
    return out.astype(np.float32)


@dataclass
class SyntheticBlur(Dataset):
    """Blurs sharp photos on the fly: ``(recipe(crop of photo), crop of photo)``.

    ``folders`` are searched recursively for images; ``images`` (arrays, see :func:`load`) come after their
    files. A kernel larger than the crop is refused. In training a ``crop``-sized window is chosen
    uniformly (images smaller than the window are reflect-padded), a kernel is drawn, the window plus a
    kernel-sized margin is blurred with a 'valid' convolution (so no border is invented), flips are applied
    to both images, then noise and JPEG. With ``train=False`` the centre crop is used and the
    degradation depends only on ``seed`` and the image index (a fixed validation set).
    """

    folders: Sequence[str | Path]
    crop: int | None = 128
    recipe: BlurRecipe = field(default_factory=BlurRecipe)
    flips: Flips = field(default_factory=Flips)
    train: bool = True
    seed: int = 0
    images: Sequence[np.ndarray] = ()

    def __post_init__(self) -> None:
        files: list[Path | np.ndarray] = [p for folder in self.folders for p in list_images(folder, recursive=True)]
        self.paths = files + list(self.images)
        if not self.paths:
            raise ValueError(f"no images in {list(self.folders)}")
        k = self.recipe.kernel_size
        if self.crop is not None and k > self.crop:
            what = "PSF" if self.recipe.kind == "psf" else "blur kernel"
            raise ValueError(
                f"the {k}x{k} {what} is larger than the {self.crop}x{self.crop} training crop: "
                f"use a crop of at least {k} px, or a smaller {what}"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def window(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The image region to blur: the crop plus a kernel margin (random window in training, the
        centre crop reflect-padded by half a kernel otherwise)."""
        k = self.recipe.kernel_size
        if not self.train:
            p = k // 2
            return np.pad(centre_crop(image, self.crop), ((p, p), (p, p), (0, 0)), mode="reflect")
        size = (self.crop if self.crop is not None else min(image.shape[:2])) + k - 1
        pad_h, pad_w = max(0, size - image.shape[0]), max(0, size - image.shape[1])
        if pad_h or pad_w:
            pads = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
            image = np.pad(image, pads, mode="reflect")
        top, left = random_crop_box(image.shape, size, rng)
        return image[top : top + size, left : left + size]

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        rng, index = _rng(self.seed, key if self.train else index_of(key))
        patch = self.window(load(self.paths[index]), rng)
        kernel = self.recipe.kernel(rng)
        m = kernel.shape[0] // 2
        sharp = patch[m : patch.shape[0] - m, m : patch.shape[1] - m]
        blurred = blur_valid(patch, kernel)
        if self.train:
            blurred, sharp = self.flips([blurred, sharp], rng)
        return to_tensor(self.recipe.finish(blurred, rng)), to_tensor(sharp)


class EpochSampler(Sampler):
    """Yields this rank's ``(epoch, index)`` keys; each global batch is split across ranks.

    Every epoch is a fresh permutation of the ``size`` samples, cut into ``steps_per_epoch`` global batches
    of ``batch`` (the remainder is dropped). Rank r of ``world`` takes the r-th slice of ``batch / world``
    keys of each global batch, so a DDP run sees exactly the batches of a one-process run with the same
    global batch. ``set_epoch(epoch, start)`` skips this rank's first ``start`` keys (mid-epoch resume).
    """

    def __init__(self, size: int, batch: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        if batch % world:
            raise ValueError(f"batch {batch} is not divisible by the world size {world}")
        self.size, self.batch, self.seed, self.rank, self.world = size, batch, seed, rank, world
        self.per_rank = batch // world
        self.epoch, self.start = 0, 0
        if self.steps_per_epoch == 0:
            raise ValueError(f"{size} samples cannot fill one batch of {batch}")

    @property
    def steps_per_epoch(self) -> int:
        """Optimisation steps per epoch."""
        return self.size // self.batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start`` keys on this rank."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps_per_epoch * self.per_rank - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.steps_per_epoch * self.batch]
        mine = order.view(self.steps_per_epoch, self.world, self.per_rank)[:, self.rank].reshape(-1)
        return iter([(self.epoch, int(i)) for i in mine[self.start :]])


def build_dataset(
    section: dict, crop: int | None, flips: Flips, train: bool, seed: int, recipe: dict | None = None
) -> Dataset:
    """A dataset from a config section: ``kind: synthetic`` (``folders``, ``recipe``) or a paired kind.

    A section may set its own ``crop`` (validation crops, None for whole images) and ``limit`` (keep the
    first N images); a synthetic section without ``recipe`` uses ``recipe`` (the training one).
    """
    section = dict(section)
    crop, limit = section.pop("crop", crop), section.pop("limit", None)
    if section["kind"] == "synthetic":
        recipe_args = section.get("recipe", recipe) or {}
        dataset = SyntheticBlur(
            section["folders"], crop=crop, recipe=BlurRecipe(**recipe_args), flips=flips, train=train, seed=seed
        )
        dataset.paths = dataset.paths[:limit]
        return dataset
    return PairedDataset(pairs_from_config(section)[:limit], crop=crop, flips=flips, train=train, seed=seed)
