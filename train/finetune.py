"""Fine-tune a model on your own images and blur: the engine of ``algnet finetune`` and of front ends.

    tuner = FineTuner("models/my-psf", "sharp/", psf="psf.tif", minutes=10)   # checks every input now
    result = tuner.run()          # blocking: in a GUI, call it from a worker thread
    tuner.cancel()                # from any thread: stop after the current step, keep the best model so far
    print(result.summary())       # PSNR of the blurry input, the starting model and the fine-tuned one

Training data, one of:

* sharp images and a blur model: a point-spread function (a ``.npy``/``.tif``/``.png`` file or an array:
  one 2-D plane, normalised and centred, refused when empty, negative, NaN/Inf, 3-D or larger than the crop),
  or ``defocus_radius=(min, max)`` disks, or ``motion_length=(min, max)`` camera shake; blurred on the fly
  with Poisson-Gaussian noise (``noise`` sigma, ``poisson`` variance per unit signal), quantised to 8 bits
  when every image is 8-bit;
* pairs: blurry and sharp images with the same file names (or two sequences of arrays in the same order).

Images are a folder (its image files, not sub-folders), or arrays in memory: a sequence, or a mapping from
names (e.g. napari layer names) to arrays, each HxW (grey) or HxWx3/4 (RGB, alpha dropped); pass a stack
as its pages, ``list(stack)``. Files count page by page (TIFF stacks) and channel by channel unless RGB,
as ``algnet deblur`` processes them; 8- and 16-bit and float data are mapped to 0..1 as
:func:`algnet_core.deblur` maps them (``normalize="auto"``; a pair by its blurry image), so the model learns
what it will see. Grey planes train the RGB network as grey RGB, as deblur runs them.

A share of the planes (``val_fraction``, at least one, at most :data:`MAX_VAL_IMAGES`) is held back for
validation, with fixed degradations. The starting model is validated first and counts as the best so far,
so the written model is never worse than it on these images; validation runs every tenth of the run, at the
end, and on cancel (the weights of that step), and the best validated weights are written. The budget is
``steps`` or ``minutes`` (the training loop with its validations; the number of steps is planned from the
measured step time and the cosine schedule follows the plan).

The output is a new ``save_pretrained`` folder (``config.json``, ``model.safetensors``, ``README.md`` model
card saying what it was trained on and the validation PSNRs, ``psf.npy`` for a PSF, and ``training/`` with
``train.csv``, ``val.csv`` and ``config.yaml``), loadable by ``ALGNet.from_pretrained(folder)`` and
``deblur(image, model=folder)``. An existing path is refused; a run that fails removes the folder it made.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from algnet_core import imageio
from algnet_core.hub import load_model, preset_of
from algnet_core.inference import DEFAULT_PERCENTILES, normalization_range, resolve_device
from algnet_core.model import MULTIPLE

from .config import Config
from .data import BlurRecipe, Flips, PairedDataset, SyntheticBlur, blur_valid, list_images
from .engine import Trainer, load_checkpoint
from .export import export_checkpoint

log = logging.getLogger(__name__)

ImageSource = str | os.PathLike | Sequence[np.ndarray] | Mapping[str, np.ndarray]
"""A folder of image files, a sequence of arrays, or a mapping from names to arrays."""
ProgressFn = Callable[[int, int, float], None]
"""``progress(step, total, val_psnr)``: steps done, steps planned (changes with a time budget), latest PSNR."""
MAX_VAL_IMAGES = 8
"""At most this many planes are held back, so that a validation stays short."""
NOISE_SIGMA = 0.01
"""Default Gaussian noise sigma of the synthetic blur (in units of the image range)."""
DEFAULTS = {"cpu": {"crop": 64, "batch": 8}, "cuda": {"crop": 128, "batch": 16}}
"""Training patch side and batch per device type (other devices: the CPU's). On the CPU, more steps on 64 px crops
beat fewer on 96 px ones in the same time (measured: bench/finetune.py); the CUDA sizes are not measured."""
VAL_CROP = 128
"""Validation images are centre crops of at most this side."""
MIN_TRAIN_STEPS_PER_EPOCH = 8
"""Training planes are repeated (with fresh crops) so that an epoch has at least this many steps."""
CALIBRATION_STEPS = 3
"""With a time budget, the validation interval is fixed once this many steps have been timed."""
WARMUP_STEPS = 20
"""Default linear warm-up of the learning rate (at most a fifth of the run): without it, the first full-rate
Adam steps knock a model that already fits the data off (measured: Kodak24, defocus 2-6 px, lr 2e-3, 80 steps:
+0.43 dB on validation with it, no step better than the start without)."""


@dataclass(frozen=True)
class Plane:
    """One training image: a float32 array (h, w, 3) mapped as deblur maps it (a read-only broadcast view for grey
    data): 0..1, or for 12/14-bit sharp images by the range of their blurred versions (see :func:`load_planes`)."""

    name: str
    data: np.ndarray
    bits: int
    """8 for 8-bit data (the synthetic blur then quantises to 8 bits), else 16 (16-bit or float)."""


def _folder_files(folder: str | os.PathLike, what: str) -> list[Path]:
    """The image files in ``folder`` (not its sub-folders), sorted; an error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder} ({what} images)")
    files = [p for p in list_images(folder) if p.is_file()]
    if not files:
        raise FileNotFoundError(f"no images in {folder} ({what} images)")
    return files


def _file_planes(path: Path) -> list[tuple[str, np.ndarray]]:
    """(name, plane) of a file as ``algnet deblur`` processes it: page by page, RGB whole, other channels one by
    one, alpha dropped; names like ``cells.tif [page 2, channel 1]``."""
    stack = imageio.read_image(path)
    planes = []
    for p, page in enumerate(stack.pages):
        colour = page[..., :-1] if stack.alpha else page
        colour = colour[..., 0] if colour.ndim == 3 and colour.shape[-1] == 1 else colour
        labels = [f"page {p}"] if len(stack.pages) > 1 else []
        channels = [(labels, colour)] if colour.ndim == 2 or stack.rgb else [
            ([*labels, f"channel {c}"], colour[..., c]) for c in range(colour.shape[-1])
        ]  # fmt: skip
        planes += [(f"{path} [{', '.join(label)}]" if label else str(path), plane) for label, plane in channels]
    return planes


def _arrays(source: ImageSource, what: str) -> list[tuple[str, np.ndarray]]:
    """(name, HxW or HxWx3 array) of every plane of ``source``."""
    if isinstance(source, str | os.PathLike):
        return [plane for path in _folder_files(source, what) for plane in _file_planes(path)]
    if isinstance(source, np.ndarray):
        raise TypeError(f"the {what} images are one array: give a list of images, e.g. [image] or list(stack)")
    items = source.items() if isinstance(source, Mapping) else ((f"{what} image {i}", a) for i, a in enumerate(source))
    planes = []
    for name, array in items:
        array = np.asarray(array)
        if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
            array = array[..., 0] if array.shape[-1] == 1 else array[..., :3]
        if array.ndim != 2 and not (array.ndim == 3 and array.shape[-1] == 3):
            raise ValueError(
                f"{name} has shape {array.shape}: give HxW (grey) or HxWx3 (RGB) images; pass a stack as its "
                "pages, list(stack)"
            )
        planes.append((str(name), array))
    if not planes:
        raise ValueError(f"no {what} images given")
    return planes


def _value_range_of(name: str, array: np.ndarray) -> tuple[float, float]:
    """The (low, high) that :func:`algnet_core.deblur` maps to 0..1 for ``array`` (``normalize="auto"``)."""
    dtype = array.dtype.newbyteorder("=")
    if dtype not in (np.uint8, np.uint16) and dtype.kind != "f":
        raise TypeError(f"{name}: {array.dtype} images are not supported; use 8- or 16-bit or float data")
    if min(array.shape[:2]) < MULTIPLE:
        raise ValueError(f"{name} is {array.shape[0]}x{array.shape[1]}: images need at least {MULTIPLE} px a side")
    try:
        return normalization_range(array, dtype, "auto", DEFAULT_PERCENTILES)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err


def _plane(name: str, array: np.ndarray, value_range: tuple[float, float]) -> Plane:
    lo, hi = value_range
    data = ((array.astype(np.float64) - lo) / ((hi - lo) or 1.0)).astype(np.float32)
    if data.ndim == 2:
        data = np.broadcast_to(data[..., None], (*data.shape, 3))
    return Plane(name, data, 8 if array.dtype == np.uint8 else 16)


BLURRED_RANGE_DRAWS = 4
"""Blurs drawn from the recipe to estimate the value range of a sharp image's blurred versions."""


def _blurred_range(array: np.ndarray, value_range: tuple[float, float], recipe: BlurRecipe) -> tuple[float, float]:
    """The (low, high) that deblur would map to 0..1 for ``array`` blurred by ``recipe`` (its noise included):
    the mean over :data:`BLURRED_RANGE_DRAWS` seeded blurs of the whole image, borders reflected."""
    lo, hi = value_range
    scale = (hi - lo) or 1.0
    image = (array.astype(np.float64) - lo) / scale
    image = image[..., None] if image.ndim == 2 else image
    rng = np.random.default_rng(0)
    extremes = []
    for _ in range(BLURRED_RANGE_DRAWS):
        kernel = recipe.kernel(rng)
        m = kernel.shape[0] // 2
        blurred = recipe.finish(blur_valid(np.pad(image, ((m, m), (m, m), (0, 0)), mode="reflect"), kernel), rng)
        extremes.append((blurred.min(), blurred.max()))
    low, high = np.mean(extremes, axis=0)
    return lo + float(low) * scale, lo + float(high) * scale


def load_planes(source: ImageSource, what: str = "sharp", recipe: BlurRecipe | None = None) -> list[Plane]:
    """Every plane of ``source`` (folder, arrays or named arrays), mapped to 0..1 as deblur maps it; with the
    ``recipe`` that will blur them, a plane that deblur maps by its own range (12/14-bit data) is mapped by
    the range of its blurred versions instead, which is what deblur sees (blur dims the peaks of sparse
    spots 3x, so the sharp plane's own range would train the model on far dimmer inputs than it meets)."""
    planes = []
    for name, array in _arrays(source, what):
        value_range = _value_range_of(name, array)
        if recipe is not None and not _is_nominal(array.dtype.newbyteorder("="), value_range):
            value_range = _blurred_range(array, value_range, recipe)
        planes.append(_plane(name, array, value_range))
    return planes


def _is_nominal(dtype: np.dtype, value_range: tuple[float, float]) -> bool:
    """Whether ``value_range`` is the dtype's own (0..255, 0..65535, 0..1), not the image's statistics."""
    return value_range == ((0.0, float(np.iinfo(dtype).max)) if dtype.kind == "u" else (0.0, 1.0))


def load_pairs(blur: ImageSource, sharp: ImageSource) -> list[tuple[Plane, Plane]]:
    """(blurry, sharp) planes: folders paired by file name (then page and channel), arrays by position or
    name; both mapped to 0..1 by the blurry plane's range (as deblur maps the blurry image)."""
    if isinstance(blur, str | os.PathLike) != isinstance(sharp, str | os.PathLike):
        raise TypeError("give the blurry and the sharp images the same way: two folders, or two sets of arrays")
    if isinstance(blur, str | os.PathLike):
        blurs, sharps = [], []
        for path in _folder_files(blur, "blurry"):
            partner = Path(sharp) / path.name
            if not partner.is_file():
                raise FileNotFoundError(f"no sharp image {partner} for {path}")
            b, s = _file_planes(path), _file_planes(partner)
            if len(b) != len(s):
                raise ValueError(f"{path} has {len(b)} planes but {partner} has {len(s)}")
            blurs, sharps = blurs + b, sharps + s
    else:
        blurs, sharps = _arrays(blur, "blurry"), _arrays(sharp, "sharp")
        if len(blurs) != len(sharps):
            raise ValueError(f"{len(blurs)} blurry images but {len(sharps)} sharp ones")
    pairs = []
    for (blur_name, b), (sharp_name, s) in zip(blurs, sharps, strict=True):
        if b.shape != s.shape:
            raise ValueError(f"{blur_name} {b.shape} and {sharp_name} {s.shape} differ in size")
        if b.dtype != s.dtype:  # one value range maps both: 8-bit input, 16-bit target would be 257x too bright
            raise ValueError(f"{blur_name} ({b.dtype}) and {sharp_name} ({s.dtype}) differ in bit depth")
        value_range = _value_range_of(blur_name, b)
        _value_range_of(sharp_name, s)  # dtype, size and finiteness checks
        pairs.append((_plane(blur_name, b, value_range), _plane(sharp_name, s, value_range)))
    return pairs


def split(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, validation) indices of ``count`` planes: a seeded random ``fraction`` (at least one, at most
    :data:`MAX_VAL_IMAGES`) is held back; at least one must remain for training."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be between 0 and 1, got {fraction}")
    if count < 2:
        raise ValueError(
            f"{count} image plane given: fine-tuning holds at least one back for validation and trains on the "
            "rest, so it needs at least 2 (e.g. two images, or a stack of two pages)"
        )
    n_val = min(max(1, round(fraction * count)), MAX_VAL_IMAGES, count - 1)
    order = np.random.default_rng(seed).permutation(count)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def _repeat(items: list, batch: int) -> list:
    """``items`` repeated so that an epoch holds :data:`MIN_TRAIN_STEPS_PER_EPOCH` batches (each repeat gets
    its own crops, flips and blur: they are drawn per index)."""
    return items * math.ceil(MIN_TRAIN_STEPS_PER_EPOCH * batch / len(items))


@dataclass(frozen=True)
class FinetuneResult:
    """What a run did: the folder written and the validation PSNRs (dB) on the held-back planes."""

    folder: Path
    steps: int
    """Optimisation steps run."""
    best_step: int
    """The step whose weights were written (0: the starting model, no step did better on validation)."""
    seconds: float
    """Wall time of the training loop (validations included)."""
    cancelled: bool
    train_images: int
    val_images: int
    psnr_blurry: float
    psnr_start: float
    psnr_tuned: float

    def summary(self) -> str:
        """A few lines for the terminal."""
        how = "cancelled" if self.cancelled else "done"
        kept = f"step {self.best_step}" if self.best_step else "the starting model (no step did better)"
        return "\n".join(
            [
                f"{how}: {self.steps} steps in {self.seconds / 60:.1f} min on {self.train_images} training planes",
                f"validation PSNR on {self.val_images} held-back planes: blurry {self.psnr_blurry:.2f} dB, "
                f"starting model {self.psnr_start:.2f} dB, fine-tuned {self.psnr_tuned:.2f} dB "
                f"({self.psnr_tuned - self.psnr_start:+.2f} dB)",
                f"wrote {self.folder} (kept {kept})",
            ]
        )


def _recipe_args(
    psf: str | os.PathLike | np.ndarray | None,
    defocus_radius: tuple[float, float] | None,
    motion_length: tuple[float, float] | None,
    noise: float | None,
    poisson: float,
    quantise: bool,
) -> dict[str, Any]:
    """:class:`BlurRecipe` arguments for one blur model, with fixed Poisson-Gaussian noise."""
    sigma = NOISE_SIGMA if noise is None else float(noise)
    if not (sigma >= 0 and poisson >= 0):
        raise ValueError(f"noise and poisson must be >= 0, got {sigma} and {poisson}")
    common = {"gaussian_sigma": (sigma, sigma), "poisson": (poisson, poisson), "quantise": quantise}
    if psf is not None:
        return {"kind": "psf", "psf": psf if isinstance(psf, np.ndarray) else os.fspath(psf), **common}
    name, (low, high) = ("defocus", defocus_radius) if defocus_radius is not None else ("motion", motion_length)
    low, high = float(low), float(high)
    if not 0 < low <= high:
        raise ValueError(f"{name} sizes must satisfy 0 < min <= max, got {low:g} and {high:g}")
    if name == "defocus":
        size = 2 * math.ceil(high) + 1
        return {"kind": "defocus", "kernel_size": size, "defocus_radius": (low, high), "gaussian_prob": 0.0, **common}
    size = 2 * math.ceil((high + 2) / 2) + 1  # odd, and at least the length + 2
    return {"kind": "motion", "kernel_size": size, "motion_length": (low, high), **common}


class FineTuner:
    """One fine-tuning run: everything is checked when it is made; :meth:`run` trains and writes the folder.

    ``out_dir``: the new folder (refused if the path exists). ``sharp``: the sharp images; with ``blur`` (the
    blurry images) they are pairs, else exactly one of ``psf``, ``defocus_radius``, ``motion_length`` blurs
    them. ``model``: the starting model (registered name, ``save_pretrained`` folder, Hub repo id, or a
    training checkpoint ``.pt``). Budget: ``steps`` or ``minutes``, exactly one. ``crop``/``batch`` default
    by device (:data:`DEFAULTS`); ``lr`` decays by a cosine to ``lr / 100`` (the default, 4x the paper's rate
    from scratch, gains most in a few minutes: measured with bench/finetune.py); weights are averaged (EMA,
    ``ema_decay``); the rate first rises over ``warmup_steps`` (default :data:`WARMUP_STEPS`, at most a fifth of
    the run). ``workers``: DataLoader processes making the blurred crops (default 4 on CUDA, else 0:
    everything in this process). ``progress(step, total, val_psnr)`` is called from the
    thread running :meth:`run` after the starting model's validation and after every step. ``log_progress``
    shows a progress bar.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        sharp: ImageSource,
        *,
        blur: ImageSource | None = None,
        psf: str | os.PathLike | np.ndarray | None = None,
        defocus_radius: tuple[float, float] | None = None,
        motion_length: tuple[float, float] | None = None,
        noise: float | None = None,
        poisson: float = 0.0,
        model: str | os.PathLike = "defocus",
        steps: int | None = None,
        minutes: float | None = None,
        device: str | torch.device = "auto",
        crop: int | None = None,
        batch: int | None = None,
        lr: float = 2e-3,
        ema_decay: float = 0.99,
        warmup_steps: int | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        workers: int | None = None,
        progress: ProgressFn | None = None,
        log_progress: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists():
            raise FileExistsError(f"{self.out_dir} exists: fine-tuning writes a new folder, choose another name")
        if (steps is None) == (minutes is None):
            raise ValueError("give exactly one budget: steps or minutes")
        if (steps is not None and steps < 1) or (minutes is not None and not minutes > 0):
            raise ValueError(f"the budget must be positive, got steps={steps}, minutes={minutes}")
        if warmup_steps is not None and warmup_steps < 0:
            raise ValueError(f"warmup_steps must be 0 or more, got {warmup_steps}")
        blur_models = {"psf": psf, "defocus_radius": defocus_radius, "motion_length": motion_length, "blur": blur}
        given = [k for k, v in blur_models.items() if v is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one source of blur: a PSF, defocus_radius, motion_length or blurry images (blur); "
                f"got {', '.join(given) or 'none'}"
            )
        if blur is not None and (noise is not None or poisson):
            raise ValueError("noise and poisson apply to synthetic blur; blurry images bring their own noise")
        self.device = resolve_device(device)
        sizes = DEFAULTS.get(self.device.type, DEFAULTS["cpu"])
        self.crop, self.batch = crop or sizes["crop"], batch or sizes["batch"]
        if self.crop % MULTIPLE:
            raise ValueError(f"the crop must be a multiple of {MULTIPLE} px, got {self.crop}")
        self.steps, self.minutes, self.seed, self.progress = steps, minutes, seed, progress
        self.lr, self.ema_decay, self.log_progress = lr, ema_decay, log_progress
        self.warmup = min(WARMUP_STEPS, (steps or 10**9) // 5) if warmup_steps is None else warmup_steps
        self.workers = (4 if self.device.type == "cuda" else 0) if workers is None else workers
        self.model = os.fspath(model)
        self._cancel = threading.Event()
        self._trainer: Trainer | None = None
        self._start_config, self.start_description = self._starting_model(self.model)

        if blur is not None:
            pairs = load_pairs(blur, sharp)
            train_idx, val_idx = split(len(pairs), val_fraction, seed)
            small = [p[0].name for p in pairs if min(p[0].data.shape[:2]) < self.crop]
            if small:
                raise ValueError(f"{small[0]} is smaller than the {self.crop} px training crop: use a smaller crop")
            self.recipe, self.recipe_args = None, {}
            train = [(pairs[i][0].data, pairs[i][1].data) for i in train_idx]
            val = [(pairs[i][0].data, pairs[i][1].data) for i in val_idx]
            self.train_set: Dataset = PairedDataset(
                _repeat(train, self.batch), self.crop, Flips(False, False), True, seed
            )
            self.val_set: Dataset = PairedDataset(val, max(VAL_CROP, self.crop), train=False, seed=seed + 1)
            planes = [p[1] for p in pairs]
            self.kind = "pairs"
        else:
            arrays = dict(_arrays(sharp, "sharp"))
            quantise = all(a.dtype == np.uint8 for a in arrays.values())
            self.recipe_args = _recipe_args(psf, defocus_radius, motion_length, noise, poisson, quantise)
            self.recipe = BlurRecipe(**self.recipe_args)
            planes = load_planes(arrays, recipe=self.recipe)
            train_idx, val_idx = split(len(planes), val_fraction, seed)
            flips = Flips(False, False) if psf is not None else Flips()  # a flipped pair would flip the PSF
            train = [planes[i].data for i in train_idx]
            val = [planes[i].data for i in val_idx]
            self.train_set = SyntheticBlur(
                [], self.crop, self.recipe, flips, train=True, seed=seed, images=_repeat(train, self.batch)
            )
            self.val_set = SyntheticBlur(
                [], max(VAL_CROP, self.crop), self.recipe, train=False, seed=seed + 1, images=val
            )
            self.kind = "psf" if psf is not None else "defocus" if defocus_radius else "motion"
        self.psf_source = None if psf is None else psf if isinstance(psf, np.ndarray) else os.fspath(psf)
        self.train_names = [planes[i].name for i in train_idx]
        self.val_names = [planes[i].name for i in val_idx]
        self.source = sharp if isinstance(sharp, str | os.PathLike) else None
        self.blur_source = blur if isinstance(blur, str | os.PathLike) else None

    # ------------------------------------------------------------------------------------------- setup
    @staticmethod
    def _starting_model(model: str) -> tuple[dict[str, Any], str]:
        """The starting model's constructor kwargs and a description of it (checked now, loaded by the Trainer)."""
        if Path(model).suffix in (".pt", ".pth"):
            state = load_checkpoint(model)
            return Config.from_dict(state["config"]).model_kwargs(), f"the training checkpoint `{model}`"
        net = load_model(model, "cpu")
        config, provenance = dict(net._hub_mixin_config), net.provenance
        where = f"{provenance['source']} weights {provenance['path']}"
        return config, f"`{model}` ({where})"

    def _describe_data(self) -> str:
        """The model card's "Training data" paragraph."""
        n_train, n_val = len(self.train_names), len(self.val_names)
        where = f" from `{self.source}`" if self.source is not None else " given in memory"
        text = f"Fine-tuned from {self.start_description} on {n_train + n_val} image planes{where}"
        if self.kind == "pairs":
            where = f"`{self.blur_source}`" if self.blur_source is not None else "in memory"
            text += f" (sharp) paired with their blurry versions ({where})."
        else:
            r = self.recipe
            if self.kind == "psf":
                name = "an array" if isinstance(self.psf_source, np.ndarray) else f"`{self.psf_source}`"
                blur = f"the PSF {name} ({r.kernel_size}x{r.kernel_size} normalised and centred: `psf.npy` here)"
            elif self.kind == "defocus":
                blur = f"disk defocus of radius {r.defocus_radius[0]:g} to {r.defocus_radius[1]:g} px"
            else:
                blur = f"camera shake of {r.motion_length[0]:g} to {r.motion_length[1]:g} px"
            noise = f"Gaussian noise sigma {r.gaussian_sigma[0]:g}, Poisson variance {r.poisson[0]:g} x signal"
            text += f", blurred on the fly by {blur}; {noise}{', 8-bit quantisation' if r.quantise else ''}."
        text += f" Held back for validation (seed {self.seed}, {n_val} of them): {', '.join(self.val_names)}."
        text += (
            " Validation PSNR is over each held-back sharp plane's value range as the model sees it (0..1, or the"
            " plane's own extent where it is wider), not over the file's dtype range as `algnet eval` measures."
        )
        return text

    def _config(self, work: Path) -> Config:
        steps = self.steps or 10**9  # a time budget re-plans this after every step
        train = (
            {"kind": "paired", "blur_dir": str(self.blur_source), "sharp_dir": str(self.source)}
            if self.kind == "pairs"
            else {"kind": "synthetic", "folders": [str(self.source)] if self.source is not None else []}
        )
        if self.recipe is not None:
            recipe = self.recipe_args | ({"psf": "psf.npy"} if self.kind == "psf" else {})
            train["recipe"] = {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()}
        flips = self.kind in ("defocus", "motion")
        preset = preset_of(self._start_config)
        return Config.from_dict(
            {
                "name": self.out_dir.name,
                "model": {"preset": preset or "ALGNet", "overrides": {} if preset else self._start_config},
                "data": {
                    "train": train,
                    "val": None,  # the held-back planes are named in the card
                    "crop": self.crop,
                    "flips": {"horizontal": flips, "vertical": flips},
                    "workers": self.workers,
                },
                "optim": {"lr": self.lr, "min_lr": self.lr / 100, "grad_clip": 1.0, "warmup_steps": self.warmup},
                "run": {
                    "steps": steps,
                    "batch": self.batch,
                    "ema_decay": self.ema_decay,
                    "seed": self.seed,
                    "init": self.model,
                },
                "log": {
                    "out_dir": str(work),
                    "every": 10,
                    "val_every": max(1, steps // 10) if self.steps else 10**9,
                    "ckpt_every": 10**9,
                    "tensorboard": False,
                    "progress": self.log_progress,
                },
                "export": {"training_data": self._describe_data()},
            }
        )

    # ------------------------------------------------------------------------------------------- running
    def cancel(self) -> None:
        """Stop after the current step (from any thread); :meth:`run` then writes the best model so far."""
        self._cancel.set()
        if self._trainer is not None:
            self._trainer.stop_requested = True

    def run(self) -> FinetuneResult:
        """Validate the starting model, train, validate, write the folder; returns what happened."""
        self.out_dir.mkdir(parents=True)  # fails if the folder appeared since the check: never reuse one
        work = self.out_dir / "training"
        try:
            work.mkdir()
            result = self._train(work)
        except BaseException:
            shutil.rmtree(self.out_dir, ignore_errors=True)  # only what this run made
            raise
        return result

    def _train(self, work: Path) -> FinetuneResult:
        cfg = self._config(work)
        trainer = Trainer(cfg, self.train_set, self.val_set, self.device)
        self._trainer = trainer
        if self._cancel.is_set():
            trainer.stop_requested = True
        tick = time.monotonic()
        start = trainer.validate()
        trainer.keep_if_best(start)
        val_seconds = time.monotonic() - tick
        log.info("starting model: validation %s (%.1f s)", {k: round(v, 4) for k, v in start.items()}, val_seconds)
        self._report(trainer)
        began = time.monotonic()
        plan = _Plan(began, self.minutes, val_seconds) if self.minutes else None

        def on_step(t: Trainer) -> None:
            if self._cancel.is_set():
                t.stop_requested = True
            if plan is not None:
                plan.update(t)
            self._report(t)

        if not trainer.stop_requested:
            trainer.fit(on_step=on_step)
        if trainer.last_val["step"] != trainer.step:  # cancelled between validations: the current weights too
            trainer.keep_if_best(trainer.validate())
        trainer.cfg.run.steps = trainer.step  # what ran (a time budget or a cancel ends the plan here)
        trainer.write_config()
        seconds = time.monotonic() - began
        best = load_checkpoint(work / "best.pt")["metrics"]
        rows = [{"benchmark": f"validation, starting model {self.model}", **start}]
        export_checkpoint(work / "best.pt", self.out_dir, rows, overwrite=True)
        if self.recipe is not None and self.recipe.kind == "psf":
            np.save(self.out_dir / "psf.npy", self.recipe.psf_kernel)
        for name in ("best.pt", "last.pt"):
            (work / name).unlink(missing_ok=True)
        return FinetuneResult(
            folder=self.out_dir,
            steps=trainer.step,
            best_step=best["step"],
            seconds=seconds,
            cancelled=self._cancel.is_set(),
            train_images=len(self.train_names),
            val_images=len(self.val_names),
            psnr_blurry=start["psnr_blurry"],
            psnr_start=start["psnr"],
            psnr_tuned=best["psnr"],
        )

    def _report(self, trainer: Trainer) -> None:
        if self.progress is not None:
            self.progress(trainer.step, trainer.cfg.run.steps, trainer.last_val["psnr"])


class _Plan:
    """Fits a run into ``minutes``: after every step the number of steps is re-planned from the mean time per
    step so far (validations included), keeping time for the final validation; the validation interval is
    fixed to a tenth of the plan, and the warm-up to at most a fifth, after :data:`CALIBRATION_STEPS` steps
    (re-planned after each step before then, so that a run that ends sooner is not all warm-up)."""

    def __init__(self, began: float, minutes: float, val_seconds: float) -> None:
        self.began, self.deadline, self.val_seconds = began, began + 60 * minutes, val_seconds
        self.warmup: int | None = None

    def update(self, trainer: Trainer) -> None:
        """Set ``run.steps`` (and once ``log.val_every``) for the time left; the planned last step stays last."""
        if trainer.step >= trainer.cfg.run.steps:
            return
        now = time.monotonic()
        per_step = (now - self.began) / trainer.step
        left = math.floor((self.deadline - now - self.val_seconds) / per_step)
        trainer.cfg.run.steps = trainer.step + max(1, left)
        if self.warmup is None:
            self.warmup = trainer.cfg.optim.warmup_steps  # as asked, before any plan shortened it
        if trainer.step <= CALIBRATION_STEPS:
            trainer.cfg.log.val_every = max(1, trainer.cfg.run.steps // 10)
            trainer.cfg.optim.warmup_steps = min(self.warmup, trainer.cfg.run.steps // 5)
