"""The ``algnet`` command: ``deblur`` image files, ``eval`` on a benchmark folder, ``info``, ``convert``."""

from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import publish
from .hub import REGISTRY, bundled_files, convert_checkpoint, load_model
from .imageio import IMAGE_SUFFIXES, PNG_SUFFIXES, SAMPLE_IMAGE, Stack, read_image, write_image
from .inference import DEFAULT_OVERLAP, choose_tile, deblur, free_memory, resolve_device
from .metrics import data_range_of, image_metrics
from .model import PRESETS, ALGNet


def _tile(text: str) -> int | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    return int(text)


def collect_inputs(items: Sequence[str]) -> list[Path]:
    """Image files named by ``items``: files, folders (their images, not recursive) and glob patterns."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            found += sorted(Path(p) for p in glob.glob(item) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {' '.join(items)}")
    return unique


def plan_outputs(inputs: list[Path], out_dir: Path, overwrite: bool) -> list[Path]:
    """One output path per input (same file name in ``out_dir``); refuses to touch inputs or existing files."""
    targets = [(out_dir / p.name).resolve() for p in inputs]
    names = [t.name for t in targets]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise FileExistsError(f"several inputs would write the same output name: {', '.join(clashes)}")
    sources = set(inputs)
    for target in targets:
        if target in sources:
            raise FileExistsError(f"{target} is an input; choose another output folder")
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; choose a new output folder or pass --overwrite")
    return targets


def _load(args: argparse.Namespace):
    model = load_model(args.model, args.device)
    device = next(model.parameters()).device
    if args.tile == "auto":
        tile = choose_tile(model._hub_mixin_config["width"], device)
        gib = free_memory(device) / 2**30
        print(f"tile: {tile} px (auto: {gib:.1f} GiB free on {device}), overlap {args.overlap}", file=sys.stderr)
    return model


def _deblur_stack(stack: Stack, path: Path, model: ALGNet, args: argparse.Namespace, bar: tqdm) -> np.ndarray:
    """The deblurred pages of ``path``'s stack. A 2-channel PNG is grey + alpha: as for RGBA, the colour is
    deblurred and the alpha plane passed through untouched."""

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    def run(page: np.ndarray) -> np.ndarray:
        return deblur(page, model, args.tile, args.overlap, precision=args.precision, progress=progress)

    grey_alpha = path.suffix.lower() in PNG_SUFFIXES and stack.pages.ndim == 4 and stack.pages.shape[-1] == 2
    return np.stack([np.dstack([run(p[..., 0]), p[..., 1]]) if grey_alpha else run(p) for p in stack.pages])


def cmd_deblur(args: argparse.Namespace) -> int:
    """Deblur image files into new files in the output folder, keeping format and bit depth."""
    inputs = collect_inputs([*args.inputs, *([str(SAMPLE_IMAGE)] if args.sample else [])])
    out_dir = Path(args.output)
    targets = plan_outputs(inputs, out_dir, args.overwrite)
    model = _load(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(inputs), unit="image", desc="images") as images, tqdm(desc="tiles", leave=False) as bar:
        for source, target in zip(inputs, targets, strict=True):
            stack = read_image(source)
            write_image(target, stack.with_pages(_deblur_stack(stack, source, model, args, bar)), args.overwrite)
            images.update()
    print(f"wrote {len(targets)} file(s) to {out_dir}", file=sys.stderr)
    return 0


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def cmd_eval(args: argparse.Namespace) -> int:
    """Benchmark protocol: PSNR, SSIM and MAE of the blurry input and of the restoration vs the sharp image.

    The data range is the sharp file's: 255 (8-bit), 65535 (16-bit), 1.0 (floats within [0, 1]), else its
    max - min (see :mod:`algnet_core.metrics`).
    """
    blur_dir, sharp_dir = Path(args.blur_dir), Path(args.sharp_dir)
    blurry = collect_inputs([str(blur_dir)])
    missing = [p.name for p in blurry if not (sharp_dir / p.name).is_file()]
    if missing:
        raise FileNotFoundError(f"no sharp image in {sharp_dir} for: {', '.join(missing)}")
    model = _load(args)
    results = []
    with tqdm(total=len(blurry), unit="image", desc="images") as images, tqdm(desc="tiles", leave=False) as bar:
        for path in blurry:
            stack, sharp = read_image(path), read_image(sharp_dir / path.name)
            if sharp.pages.shape != stack.pages.shape:
                raise ValueError(f"{path.name}: blurry {stack.pages.shape} and sharp {sharp.pages.shape} differ")
            if sharp.pages.dtype != stack.pages.dtype:
                raise ValueError(f"{path.name}: blurry {stack.pages.dtype} and sharp {sharp.pages.dtype} differ")
            peak = data_range_of(sharp.pages)
            restored = _deblur_stack(stack, path, model, args, bar)
            pages = zip(stack.pages, restored, sharp.pages, strict=True)
            scores = [(image_metrics(b, s, peak), image_metrics(r, s, peak)) for b, r, s in pages]
            results.append(
                {
                    "image": path.name,
                    "blurry": _mean([s[0] for s in scores]),
                    "restored": _mean([s[1] for s in scores]),
                }
            )
            images.update()
    mean = {kind: _mean([r[kind] for r in results]) for kind in ("blurry", "restored")}
    report = {"model": model.provenance, "images": results, "mean": mean}
    header = ["image", "PSNR blurry", "PSNR restored", "SSIM blurry", "SSIM restored", "MAE blurry", "MAE restored"]
    table = [
        [r["image"], *(f"{r[kind][m]:.4f}" for m in ("psnr", "ssim", "mae") for kind in ("blurry", "restored"))]
        for r in [*results, {"image": "mean", **mean}]
    ]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        print(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([header, *table])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Versions, devices, scan backend, registered models and the cost of a preset."""
    import torch

    from .cost import describe
    from .scan import resolve_backend

    try:
        algnet_version = version("algnet")
    except PackageNotFoundError:
        algnet_version = "not installed"
    device = resolve_device(args.device)
    print(f"algnet {algnet_version}, torch {torch.__version__}")
    print(f"device: {device}; selective-scan backend: {resolve_backend(None, device)}")
    width = PRESETS[args.preset]["width"]
    print(f"auto tile for {args.preset} on {device}: {choose_tile(width, device)} px")
    print("registered models:")
    for name, entry in REGISTRY.items():
        bundled = "none" if entry.bundled is None else bundled_files(entry.bundled)[1].name
        print(f"  {name:14} {entry.repo_id}@{entry.revision} ({entry.preset}); bundled: {bundled}")
    print(describe(args.preset))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert an official .pth checkpoint into a save_pretrained folder."""
    preset = convert_checkpoint(args.checkpoint, args.output, overwrite=args.overwrite)
    print(f"{args.checkpoint}: {preset}; written to {args.output}")
    return 0


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="motion", help="registered name, save_pretrained folder or Hub repo id")
    parser.add_argument("--tile", type=_tile, default="auto", help="tile side in pixels, 'auto' or 'none'")
    parser.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help="tile overlap in pixels")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "float16", "bfloat16"])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``algnet`` and its sub-commands."""
    parser = argparse.ArgumentParser(prog="algnet", description="ALGNet image deblurring")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("deblur", help="deblur images into new files", description=cmd_deblur.__doc__)
    p.add_argument("inputs", nargs="*", help="image files, folders or glob patterns (PNG, JPEG, TIFF)")
    p.add_argument("--sample", action="store_true", help="also deblur the bundled sample image")
    p.add_argument("-o", "--output", required=True, help="output folder (created; files keep their names)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (never an input)")
    _model_options(p)
    p.set_defaults(run=cmd_deblur)

    p = sub.add_parser("eval", help="PSNR/SSIM/MAE on a blur/sharp folder pair", description=cmd_eval.__doc__)
    p.add_argument("blur_dir")
    p.add_argument("sharp_dir", help="sharp images with the same file names")
    p.add_argument("--csv", help="write the table as CSV here")
    p.add_argument("--json", help="write per-image and mean metrics as JSON here")
    _model_options(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("info", help="versions, device, scan backend, models, cost", description=cmd_info.__doc__)
    p.add_argument("--preset", default="ALGNet-S", choices=list(PRESETS))
    p.add_argument("--device", default="auto")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("convert", help="official .pth -> save_pretrained folder", description=cmd_convert.__doc__)
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model.safetensors there")
    p.set_defaults(run=cmd_convert)
    p = sub.add_parser(
        "publish",
        help="upload an exported model folder to the Hugging Face Hub",
        description=publish.__doc__.split("\n")[0],
    )
    publish.add_arguments(p)
    p.set_defaults(run=publish.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``algnet`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("algnet_core.hub").setLevel(logging.INFO)  # always say which weights are used
    try:
        return args.run(args)
    except (OSError, TypeError, ValueError, RuntimeError) as err:  # WeightsError is a RuntimeError
        print(f"algnet {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
