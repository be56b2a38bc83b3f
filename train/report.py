"""``python -m train.report``: the models against the benchmarks, beside a sharpening filter and the input.

What a user of the bundled weights sees, on data that no run selects on: for each benchmark the mean PSNR
of the blurry input, of each model (and, with ``--ensemble``, of its 8-transform ensemble), and of the
best of 9 unsharp-mask settings (scikit-image's ``unsharp_mask``, radius 1/2/3 x amount 0.5/1/1.5, the
setting chosen on the same images: an optimistic peer that any deblurring model should beat).

Benchmarks (8-bit, built in a temporary folder from ``../shared/data``; ``--limit`` pairs of each):

* ``levin``: the 8 recorded camera-shake kernels on Kodak24 (``python -m train.benchmark levin``);
* ``disk``: disk defocus r = 3/5/8 px on McMaster (``python -m train.benchmark disk``);
* ``sharp``: CBSD68 photos without blur, Gaussian noise sigma 0.005: a deblurrer must do no harm;
* ``gopro``, ``realblur``: the real blurry/sharp pairs of ``gopro/`` and ``realblur_crop/``.

    python -m train.report --models motion defocus RUN/export --limit 8 --json report.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from skimage.filters import unsharp_mask

from algnet_core import deblur, load_model
from algnet_core.imageio import read_image
from algnet_core.metrics import psnr

from .benchmark import SHARED_DATA, make_benchmark
from .data import centre_crop

UNSHARP_GRID = [(r, a) for r in (1, 2, 3) for a in (0.5, 1.0, 1.5)]
SHARP_NOISE = 0.005
BENCHMARKS = ("levin", "disk", "sharp", "gopro", "realblur")


def _pairs(folder: Path, limit: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    names = sorted(p.name for p in (folder / "blur").iterdir())[:limit]
    return [(n, read_image(folder / "blur" / n).pages[0], read_image(folder / "sharp" / n).pages[0]) for n in names]


def sharp_pairs(photos: Sequence[Path], crop: int | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, noisy, sharp) uint8 pairs of the do-no-harm benchmark: each photo (or its centre ``crop`` x
    ``crop``) with Gaussian noise sigma ``SHARP_NOISE`` and no blur, seeded by its index in ``photos``."""
    pairs = []
    for i, path in enumerate(photos):
        sharp = centre_crop(read_image(path).pages[0], crop)
        noise = np.random.default_rng([7, i]).standard_normal(sharp.shape) * SHARP_NOISE * 255
        noisy = np.clip(np.round(sharp + noise), 0, 255).astype(np.uint8)
        pairs.append((f"{path.parent.name}/{path.name}", noisy, sharp))
    return pairs


def load_benchmark(name: str, limit: int, scratch: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, blurry, sharp) uint8 pairs of one benchmark."""
    if name in ("levin", "disk"):
        make_benchmark(name, scratch / name)
        return _pairs(scratch / name, limit)
    if name == "sharp":
        return sharp_pairs(sorted((SHARED_DATA / "natural" / "cbsd68").glob("*.png"))[:limit])
    return _pairs(SHARED_DATA / {"gopro": "gopro", "realblur": "realblur_crop"}[name], limit)


def _mean_psnr(outputs: Sequence[np.ndarray], pairs: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> float:
    return float(np.mean([psnr(out, sharp, data_range=255) for out, (_, _, sharp) in zip(outputs, pairs, strict=True)]))


def _unsharp(blurry: np.ndarray, radius: float, amount: float) -> np.ndarray:
    channel_axis = 2 if blurry.ndim == 3 else None  # positive: scikit-image 0.26 mis-slices channel_axis=-1
    out = unsharp_mask(blurry, radius=radius, amount=amount, channel_axis=channel_axis, preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def report(models: Sequence[str], benchmarks: Sequence[str], limit: int, ensemble: bool) -> list[dict]:
    """One row per benchmark: mean PSNR of the input, each model (and its ensemble), the best unsharp mask."""
    nets = {name: load_model(name) for name in models}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for bench in benchmarks:
            pairs = load_benchmark(bench, limit, Path(scratch))
            row = {"benchmark": bench, "images": len(pairs), "blurry": _mean_psnr([b for _, b, _ in pairs], pairs)}
            for name, net in nets.items():
                row[name] = _mean_psnr([deblur(b, net) for _, b, _ in pairs], pairs)
                if ensemble:
                    row[f"{name} ensemble"] = _mean_psnr([deblur(b, net, ensemble=True) for _, b, _ in pairs], pairs)
            scores = {s: _mean_psnr([_unsharp(b, *s) for _, b, _ in pairs], pairs) for s in UNSHARP_GRID}
            best = max(scores, key=scores.get)
            row["unsharp"], row["unsharp setting"] = scores[best], f"radius {best[0]}, amount {best[1]}"
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    values = [f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "benchmark"]
    return f"{row['benchmark']}: " + ", ".join(values)


def markdown(rows: Sequence[dict]) -> str:
    """The rows as a markdown table (PSNR in dB, gains over the input in brackets)."""
    columns = [k for k in rows[0] if k not in ("benchmark", "images", "unsharp setting")]
    lines = ["| benchmark | images | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for r in rows:
        cells = [f"{r['blurry']:.2f}"] + [f"{r[c]:.2f} ({r[c] - r['blurry']:+.2f})" for c in columns[1:]]
        lines.append(f"| {r['benchmark']} | {r['images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report (a markdown table at the end); ``--json`` also writes its rows."""
    parser = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["motion", "defocus"], help="names, folders or Hub ids")
    parser.add_argument("--benchmarks", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--limit", type=int, default=8, help="pairs per benchmark (the first, by name)")
    parser.add_argument("--ensemble", action="store_true", help="also each model's 8-transform ensemble")
    parser.add_argument("--json", type=Path, help="write the rows here (refused if it exists)")
    args = parser.parse_args(argv)
    if args.json and args.json.exists():
        parser.error(f"{args.json} exists: choose a new name")
    rows = report(args.models, args.benchmarks, args.limit, args.ensemble)
    print("\n" + markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
