"""Deterministic synthetic deblurring benchmarks: a ``blur/`` + ``sharp/`` folder pair and a manifest.

Two fixed recipes (the defaults reproduce the published tables bit for bit):

* ``levin`` (motion): the 8 real camera-shake kernels of Levin et al. 2009 (``kernels/levin09.npz``,
  ``k0``..``k7``) on the ``natural/kodak24`` photos; image i (sorted by name) gets kernel ``k{i mod 8}``.
* ``disk`` (defocus): disk kernels of radius 3, 5 and 8 px on ``natural/mcmaster``; image i gets
  radius ``(3, 5, 8)[i mod 3]``.

Each kernel is shifted by whole pixels so its centre of mass is its central pixel (see
:func:`train.kernels.centre`), the photo is blurred by a 'valid' convolution (no invented border), and
the sharp target is the photo cropped by half a kernel on every side, so both images have the same size.
Then Gaussian noise of ``sigma`` (default 0.01 = 2.55/255) from ``numpy.random.default_rng([seed, i])``
is added, the result clipped and rounded to 8 bits. Files are ``NAME_k{j}.png`` / ``NAME_r{r}.png``.

    python -m train.benchmark levin OUT_DIR    # -> OUT_DIR/blur, OUT_DIR/sharp, OUT_DIR/benchmark.json
    python -m train.benchmark disk OUT_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from algnet_core import metrics

from .data import blur_valid, list_images, read_image
from .kernels import centre, disk_kernel

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The shared data folder next to the repository clone (``../shared/data``)."""
DISK_RADII = (3, 5, 8)
LEVIN_KERNELS = 8


def _kernels(kind: str, kernels_file: Path) -> list[tuple[str, np.ndarray]]:
    if kind == "levin":
        with np.load(kernels_file) as data:
            return [(f"k{j}", centre(data[f"k{j}"])) for j in range(LEVIN_KERNELS)]
    if kind == "disk":
        return [(f"r{r}", disk_kernel(r)) for r in DISK_RADII]
    raise ValueError(f"unknown benchmark {kind!r} (levin or disk)")


def _png(arr: np.ndarray, path: Path) -> str:
    Image.fromarray(arr).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_benchmark(
    kind: str,
    out_dir: str | Path,
    source: str | Path | None = None,
    kernels_file: str | Path | None = None,
    sigma: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Build the ``levin`` or ``disk`` benchmark into ``out_dir``; returns (and writes) its manifest.

    ``source`` defaults to ``../shared/data/natural/kodak24`` (levin) or ``.../mcmaster`` (disk),
    ``kernels_file`` to ``../shared/data/kernels/levin09.npz``.
    """
    default_source = {"levin": "kodak24", "disk": "mcmaster"}.get(kind, "")
    source = Path(source) if source else SHARED_DATA / "natural" / default_source
    kernels_file = Path(kernels_file) if kernels_file else SHARED_DATA / "kernels" / "levin09.npz"
    kernels = _kernels(kind, kernels_file)
    out_dir = Path(out_dir)
    (out_dir / "blur").mkdir(parents=True, exist_ok=True)
    (out_dir / "sharp").mkdir(parents=True, exist_ok=True)
    items = []
    for i, path in enumerate(list_images(source)):
        tag, kernel = kernels[i % len(kernels)]
        image = read_image(path)
        m = kernel.shape[0] // 2
        sharp = np.round(image[m : image.shape[0] - m, m : image.shape[1] - m] * 255).astype(np.uint8)
        noise = np.random.default_rng([seed, i]).standard_normal(sharp.shape)
        blurred = np.clip(blur_valid(image, kernel) + sigma * noise, 0.0, 1.0)
        blurred = np.round(blurred * 255).astype(np.uint8)
        name = f"{path.stem}_{tag}.png"
        items.append(
            {
                "name": name,
                "source": path.name,
                "kernel": tag,
                "size": list(sharp.shape[:2]),
                "psnr_blurry": round(metrics.psnr(blurred, sharp), 4),
                "sha256_blur": _png(blurred, out_dir / "blur" / name),
                "sha256_sharp": _png(sharp, out_dir / "sharp" / name),
            }
        )
    if not items:
        raise FileNotFoundError(f"no images in {source}")
    manifest = {
        "benchmark": kind,
        "source": source.name,
        "kernels": [tag for tag, _ in kernels],
        "noise_sigma": sigma,
        "seed": seed,
        "mean_psnr_blurry": round(float(np.mean([it["psnr_blurry"] for it in items])), 4),
        "images": items,
    }
    (out_dir / "benchmark.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the builder's arguments (kind, OUT_DIR, --source, --kernels, --sigma, --seed)."""
    parser.add_argument("kind", choices=["levin", "disk"], help="levin: motion on Kodak24; disk: defocus on McMaster")
    parser.add_argument("out_dir", help="folder to create (blur/, sharp/, benchmark.json)")
    parser.add_argument("--source", default=None, help="folder of sharp photos (default: the recipe's)")
    parser.add_argument("--kernels", default=None, help="levin09.npz (default: ../shared/data/kernels)")
    parser.add_argument("--sigma", type=float, default=0.01, help="Gaussian noise sigma on 0..1 images")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run(args: argparse.Namespace) -> int:
    """Build the benchmark named by parsed arguments; returns the exit status."""
    manifest = make_benchmark(args.kind, args.out_dir, args.source, args.kernels, args.sigma, args.seed)
    print(f"{len(manifest['images'])} pairs in {args.out_dir}, mean blurry PSNR {manifest['mean_psnr_blurry']} dB")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.benchmark {levin,disk} OUT_DIR [--source DIR] [--sigma S] [--seed N]``."""
    parser = argparse.ArgumentParser(prog="python -m train.benchmark", description=__doc__.split("\n")[0])
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
