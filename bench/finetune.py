"""Fine-tuning on your own blur, measured: microscopy-like images, an Airy-like PSF, a time budget on the CPU.

``make`` writes a seeded, download-free data set: 16-bit greyscale fluorescence-like images (filaments, cells
with nuclei, diffraction-limited spots, an uneven background), an Airy-like PSF (``psf.tif``, first dark ring
at 3.5 px, 31x31, not the bundled model's disks or Gaussians) and held-back test pairs blurred by that PSF with
Poisson-Gaussian noise. ``run`` fine-tunes the bundled ``defocus`` model on ``train/`` for each budget (a fresh
process per case) and reports the PSNR of the blurry test images, of the bundled model and of the fine-tuned
one on them (the ``algnet eval`` protocol: 16-bit data range).

    python bench/finetune.py make DATA                          # DATA/{train,test/blur,test/sharp,psf.tif}
    python bench/finetune.py run DATA --minutes 5 10 --json finetune.json
    python bench/finetune.py run DATA --quick                   # one 1-minute case

The same run by hand (see README, "Fine-tune on your own blur"):

    algnet finetune DATA/train --psf DATA/psf.tif --noise 0.01 --poisson 0.0005 --minutes 10 -o models/airy
    algnet eval DATA/test/blur DATA/test/sharp --model models/airy
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage, special
from scipy.signal import fftconvolve

SIDE = 256
TRAIN_IMAGES = 40
TEST_IMAGES = 12
NOISE_SIGMA = 0.01
"""Gaussian (read) noise, in units of the 16-bit range."""
POISSON = 0.0005
"""Shot-noise variance per unit of signal (2,000 photons at full range)."""
AIRY_FIRST_ZERO = 3.5
PSF_SIDE = 31


def airy_psf(first_zero: float = AIRY_FIRST_ZERO, side: int = PSF_SIDE, supersample: int = 8) -> np.ndarray:
    """An Airy pattern (2 J1(v) / v)^2 whose first dark ring has radius ``first_zero`` px, pixel-integrated."""
    n = side * supersample
    r = np.hypot(*np.meshgrid(*(2 * [(np.arange(n) + 0.5) / supersample - side / 2])))
    v = np.maximum(r * 3.8317 / first_zero, 1e-9)
    pattern = (2 * special.j1(v) / v) ** 2
    psf = pattern.reshape(side, supersample, side, supersample).mean(axis=(1, 3))
    return psf / psf.sum()


def specimen(rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """A fluorescence-like object in 0..1: uneven background, cells with brighter nuclei, filaments, spots."""
    yy, xx = np.mgrid[:side, :side].astype(np.float64)
    image = 0.04 + 0.03 * ndimage.gaussian_filter(rng.standard_normal((side, side)), side / 6) * side / 12
    for _ in range(rng.integers(2, 6)):  # cells: soft ellipses with a textured stain and a nucleus
        cy, cx = rng.uniform(0, side, 2)
        a, b, angle = rng.uniform(20, 50), rng.uniform(15, 35), rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / a
        w = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / b
        texture = 1 + 0.5 * ndimage.gaussian_filter(rng.standard_normal((side, side)), 2) * 4
        image += rng.uniform(0.08, 0.2) / (1 + np.exp((np.hypot(u, w) - 1) * 12)) * np.clip(texture, 0.2, 2)
        image += rng.uniform(0.15, 0.35) / (1 + np.exp((np.hypot(u, w) - 0.35) * 25))
    lines = np.zeros((side, side))
    for _ in range(rng.integers(8, 20)):  # filaments: smooth random walks, thinner than a pixel
        pos, heading = rng.uniform(0, side, 2), rng.uniform(0, 2 * np.pi)
        brightness = rng.uniform(0.3, 1.0)
        for _ in range(int(rng.uniform(80, 400))):
            heading += rng.normal(0, 0.08)
            pos = pos + 0.5 * np.array([np.sin(heading), np.cos(heading)])
            y, x = int(pos[0]), int(pos[1])
            if 0 <= y < side and 0 <= x < side:
                lines[y, x] += brightness * 0.5
    image += ndimage.gaussian_filter(lines, 0.6) * 1.2
    spots = np.zeros((side, side))
    idx = rng.integers(0, side, size=(int(rng.integers(20, 80)), 2))
    np.add.at(spots, (idx[:, 0], idx[:, 1]), rng.uniform(0.5, 3.0, len(idx)))
    image += ndimage.gaussian_filter(spots, 0.8)
    return np.clip(image, 0, 0.95)


def blur(sharp: np.ndarray, psf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PSF convolution (reflect-padded, same size) plus Poisson-Gaussian noise, clipped to 0..1."""
    m = psf.shape[0] // 2
    blurred = fftconvolve(np.pad(sharp, m, mode="reflect"), psf, mode="valid")
    std = np.sqrt(POISSON * np.clip(blurred, 0, None) + NOISE_SIGMA**2)
    return np.clip(blurred + std * rng.standard_normal(blurred.shape), 0, 1)


def to_uint16(image: np.ndarray) -> np.ndarray:
    return np.round(image * 65535).astype(np.uint16)


def make(out: Path, seed: int) -> None:
    """Write ``train/``, ``test/blur``, ``test/sharp`` (16-bit TIFFs) and ``psf.tif`` (float32)."""
    if out.exists():
        raise SystemExit(f"{out} exists: choose a new folder")
    rng = np.random.default_rng(seed)
    psf = airy_psf()
    for sub in ("train", "test/blur", "test/sharp"):
        (out / sub).mkdir(parents=True)
    tifffile.imwrite(out / "psf.tif", psf.astype(np.float32))
    for i in range(TRAIN_IMAGES):
        tifffile.imwrite(out / "train" / f"cells_{i:03d}.tif", to_uint16(specimen(rng)))
    for i in range(TEST_IMAGES):
        sharp = specimen(rng)
        tifffile.imwrite(out / "test/sharp" / f"test_{i:03d}.tif", to_uint16(sharp))
        tifffile.imwrite(out / "test/blur" / f"test_{i:03d}.tif", to_uint16(blur(sharp, psf, rng)))
    print(f"wrote {TRAIN_IMAGES} training images, {TEST_IMAGES} test pairs and psf.tif to {out}")


def evaluate(data: Path, model: str) -> dict[str, float]:
    """Mean PSNR/SSIM of the blurry and the restored test images (``algnet eval --json``)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "eval.json"
        command = ["algnet", "eval", str(data / "test/blur"), str(data / "test/sharp"), "--model", model]
        subprocess.run([*command, "--json", str(report)], check=True, capture_output=True)
        mean = json.loads(report.read_text())["mean"]
    return {"blurry": mean["blurry"]["psnr"], "restored": mean["restored"]["psnr"]}


def run(data: Path, budgets: list[float], threads: int, json_path: str | None) -> None:
    """Fine-tune once per budget (fresh process each) and print blurry / bundled / fine-tuned test PSNRs."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}
    bundled = evaluate(data, "defocus")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for minutes in budgets:
            folder = Path(tmp) / f"airy_{minutes:g}min"
            command = ["algnet", "finetune", str(data / "train"), "--psf", str(data / "psf.tif")]
            command += ["--noise", str(NOISE_SIGMA), "--poisson", str(POISSON), "--minutes", str(minutes)]
            command += ["--model", "defocus", "--threads", str(threads), "-o", str(folder)]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / 60
            tuned = evaluate(data, str(folder))
            steps = int(done.stdout.split(" steps in ")[0].split()[-1])
            rows.append({"minutes": minutes, "cpu_minutes": cpu, "steps": steps, "blurry": bundled["blurry"],
                         "bundled": bundled["restored"], "fine_tuned": tuned["restored"],
                         "gain_over_bundled": tuned["restored"] - bundled["restored"]})  # fmt: skip
    header = f"{'minutes':>7}  {'cpu min':>7}  {'steps':>5}  {'blurry':>7}  {'bundled':>7}  {'tuned':>7}  {'gain':>6}"
    print(f"test PSNR (dB) on {TEST_IMAGES} held-back images, {threads} thread(s)\n{header}")
    for r in rows:
        print(
            f"{r['minutes']:>7g}  {r['cpu_minutes']:>7.1f}  {r['steps']:>5}  {r['blurry']:>7.2f}  "
            f"{r['bundled']:>7.2f}  {r['fine_tuned']:>7.2f}  {r['gain_over_bundled']:>+6.2f}"
        )
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make", help="write the data set")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("run", help="fine-tune per budget and evaluate")
    p.add_argument("data", type=Path)
    p.add_argument("--minutes", type=float, nargs="+", default=[5.0, 10.0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="one 1-minute case")
    p.add_argument("--json")
    args = parser.parse_args()
    if args.command == "make":
        make(args.out, args.seed)
    else:
        run(args.data, [1.0] if args.quick else args.minutes, args.threads, args.json)


if __name__ == "__main__":
    sys.exit(main())
