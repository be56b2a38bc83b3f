"""The ``algnet`` command: ``deblur`` image files, ``eval`` on a benchmark folder, ``info``, ``convert``,
``publish`` and ``finetune``."""

from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import math
import signal
import sys
import threading
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import publish
from .distributed import is_zarr
from .hub import REGISTRY, bundled_files, convert_checkpoint, load_model
from .imageio import IMAGE_SUFFIXES, SAMPLE_IMAGE, Stack, read_image, significant_bits, write_image
from .inference import (
    DEFAULT_OVERLAP,
    DEFAULT_PERCENTILES,
    NORMALIZE_MODES,
    choose_tile,
    deblur,
    free_memory,
    resolve_device,
)
from .metrics import data_range_of, image_metrics
from .model import MULTIPLE, PRESETS, ALGNet

ZARR_SUFFIX = ".zarr"
FILE_ERRORS = (OSError, TypeError, ValueError, RuntimeError, MemoryError)
"""What one bad file raises (unreadable, unsupported, too small, out of memory): reported, then the next file."""


def _tile(text: str) -> int | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    if not text.isdigit() or int(text) < MULTIPLE:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'none' or whole pixels >= {MULTIPLE}, got {text!r}")
    return int(text)


def _overlap(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels >= 0, got {text!r}")
    return int(text)


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject option combinations that no single option's type can (exits with argparse's usage error)."""
    if isinstance(getattr(args, "tile", None), int) and args.tile < 2 * args.overlap + MULTIPLE:
        parser.error(
            f"--tile {args.tile} is too small for --overlap {args.overlap}: tiles need at least "
            f"2 x overlap + {MULTIPLE} = {2 * args.overlap + MULTIPLE} pixels"
        )
    if getattr(args, "percentiles", None) is not None:
        low, high = args.percentiles
        if not 0 <= low < high <= 100:
            parser.error(f"--percentiles {low:g} {high:g}: need 0 <= LOW < HIGH <= 100")
        if args.normalize != "percentile":
            parser.error("--percentiles applies to --normalize percentile only")
    if args.command == "deblur":
        zarr_output = Path(args.output).suffix.lower() == ZARR_SUFFIX
        if args.scheduler is not None and not zarr_output:
            parser.error(f"--scheduler needs a zarr output: -o NAME{ZARR_SUFFIX}")
        if zarr_output and (args.sample or len(args.inputs) != 1):
            parser.error(f"-o NAME{ZARR_SUFFIX} takes one input: a zarr array, a TIFF stack or a folder of images")
        if zarr_output and args.overwrite:
            parser.error(f"-o NAME{ZARR_SUFFIX} never replaces an array: remove it first or choose a new name")


def collect_inputs(items: Sequence[str]) -> list[Path]:
    """Image files named by ``items``: files, folders (their images, not recursive) and glob patterns, as absolute
    paths under the names given (a symbolic link keeps its own name)."""
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
    unique: dict[Path, Path] = {}  # a file named twice (or through a link) once, under the name it was given first
    for path in found:
        unique.setdefault(path.resolve(), path.absolute())
    if not unique:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {' '.join(items)}")
    return list(unique.values())


def plan_outputs(inputs: list[Path], out_dir: Path, overwrite: bool) -> list[Path]:
    """One output path per input (same file name in ``out_dir``); refuses to touch inputs or existing files."""
    targets = [(out_dir / p.name).resolve() for p in inputs]
    names = [t.name for t in targets]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise FileExistsError(f"several inputs would write the same output name: {', '.join(clashes)}")
    sources = {p.resolve() for p in inputs}
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


def _deblur_stack(stack: Stack, model: ALGNet, args: argparse.Namespace, bar: tqdm) -> np.ndarray:
    """The deblurred pages of a stack. An alpha channel (RGBA, grey + alpha) is passed through untouched; RGB is
    deblurred as colour; any other channels (CMYK inks, a TIFF's grey samples) one by one, each as a grey image
    with its own normalisation."""

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    bits = significant_bits(stack)

    def run(image: np.ndarray) -> np.ndarray:
        restored = deblur(
            image,
            model,
            args.tile,
            args.overlap,
            precision=args.precision,
            progress=progress,
            normalize=args.normalize,
            percentiles=args.percentiles or DEFAULT_PERCENTILES,
            ensemble=args.ensemble,
        )  # clipped to the dtype's range; a file that declares fewer bits keeps to them (what its readers assume)
        return restored if bits is None else np.minimum(restored, (1 << bits) - 1)

    def page(image: np.ndarray) -> np.ndarray:
        colour = image[..., :-1] if stack.alpha else image
        if stack.rgb or colour.ndim == 2:
            restored = run(colour)
        else:
            restored = np.stack([run(colour[..., c]) for c in range(colour.shape[-1])], axis=-1)
        return np.concatenate([restored, image[..., -1:]], axis=-1) if stack.alpha else restored

    return np.stack([page(p) for p in stack.pages])


def fresh_path(path: Path) -> Path:
    """``path`` if it does not exist, else the first free ``STEM_2.SUFFIX``, ``STEM_3.SUFFIX``, ... beside it."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


def _report(failures: list[str], total: int, what: str) -> int:
    """Print the failed files' summary; the exit status (1 if any failed)."""
    if failures:
        print(f"{len(failures)} of {total} {what} failed: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


def _file_error(path: Path, err: Exception) -> str:
    """The error line for one file: its message, led by the file name unless the message names it."""
    message = str(err) or type(err).__name__
    return message if str(path) in message else f"{path}: {message}"


def cmd_deblur(args: argparse.Namespace) -> int:
    """Deblur image files into new files in the output folder, keeping format, bit depth and metadata.

    A file that fails (unreadable, unsupported, ...) is reported by name and the others go on; the exit
    status is then 1. With --sample and no other input, an existing output is kept and the result written
    under a fresh name (motion_blurred_astronaut_2.png, ...), so the first example can be run again.

    With -o NAME.zarr the one input (a zarr array, a TIFF stack or a folder of images of one size) is
    deblurred chunk by chunk into a new zarr array, on a dask cluster with --scheduler: see
    :mod:`algnet_core.distributed`. Run the same command again to finish an interrupted run.
    """
    if Path(args.output).suffix.lower() == ZARR_SUFFIX:
        return _deblur_to_zarr(args)
    zarr_inputs = [item for item in args.inputs if is_zarr(item)]
    if zarr_inputs:
        raise ValueError(f"{zarr_inputs[0]} is a zarr array: deblur it into a new one, -o NAME{ZARR_SUFFIX}")
    inputs = collect_inputs([*args.inputs, *([str(SAMPLE_IMAGE)] if args.sample else [])])
    out_dir = Path(args.output)
    sample_only = args.sample and not args.inputs and not args.overwrite
    if sample_only:
        targets = [fresh_path(out_dir.resolve() / SAMPLE_IMAGE.name)]
    else:
        targets = plan_outputs(inputs, out_dir, args.overwrite)
    model = _load(args)
    made = [d for d in (out_dir, *out_dir.absolute().parents) if not d.exists()]  # deepest first
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    try:
        with tqdm(total=len(inputs), unit="image", desc="images") as images, tqdm(desc="network", leave=False) as bar:
            for source, target in zip(inputs, targets, strict=True):
                try:
                    stack = read_image(source)
                    write_image(target, stack.with_pages(_deblur_stack(stack, model, args, bar)), args.overwrite)
                except FILE_ERRORS as err:
                    tqdm.write(f"algnet deblur: error: {_file_error(source, err)}", file=sys.stderr)
                    failures.append(source.name)
                images.update()
    finally:
        for folder in made:  # stopped or failed before any file: no empty folder it made is left behind
            if any(folder.iterdir()):
                break
            folder.rmdir()
    if sample_only and targets[0].name != SAMPLE_IMAGE.name and not failures:
        print(f"{out_dir / SAMPLE_IMAGE.name} exists (kept); wrote {targets[0]}", file=sys.stderr)
    print(f"wrote {len(targets) - len(failures)} file(s) to {out_dir}", file=sys.stderr)
    return _report(failures, len(inputs), "file(s)")


def _deblur_to_zarr(args: argparse.Namespace) -> int:
    """``algnet deblur SOURCE -o NAME.zarr [--scheduler ...]``: progress bar over the chunks the cluster finishes."""
    try:
        import zarr  # noqa: F401 (used by algnet_core.distributed)
        from distributed import KilledWorker
    except ImportError as err:
        raise RuntimeError(
            f"-o NAME{ZARR_SUFFIX} needs dask.distributed and zarr: pip install 'algnet[distributed]'"
        ) from err
    from .distributed import connect, deblur_to_zarr

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    with connect(args.scheduler) as client, tqdm(unit="chunk", desc="chunks") as bar:
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
        tqdm.write(f"dask scheduler {client.scheduler.address}: {workers} worker(s)", file=sys.stderr)
        try:
            summary = deblur_to_zarr(
                args.inputs[0],
                args.output,
                args.model,
                client=client,
                tile=args.tile,
                overlap=args.overlap,
                device=args.device,
                precision=args.precision,
                normalize=args.normalize,
                percentiles=args.percentiles or DEFAULT_PERCENTILES,
                ensemble=args.ensemble,
                progress=progress,
            )
        except KilledWorker as err:
            raise RuntimeError(
                f"a chunk took down several workers ({err}); out of memory? Try a smaller --tile, then run the "
                "same command again: finished chunks are kept"
            ) from err
    before = f", {summary['skipped']} done by an earlier run" if summary["skipped"] else ""
    print(f"wrote {args.output}: {summary['computed']} chunk(s) deblurred{before}", file=sys.stderr)
    return 0


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _finite_or_null(value: object) -> object:
    """``value`` with every NaN or infinite float replaced by None (JSON's null), through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def plan_reports(reports: Sequence[str | None], inputs: Sequence[Path], overwrite: bool) -> list[Path]:
    """The report files to write; refuses an input image, one path given twice, or (unless ``overwrite``) a
    file that exists."""
    paths = [Path(r) for r in reports if r]
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) < len(resolved):
        raise FileExistsError(f"--csv and --json name the same file: {paths[0]}")
    sources = {p.resolve() for p in inputs}
    for path, target in zip(paths, resolved, strict=True):
        if target in sources:
            raise FileExistsError(f"{path} is an input image; choose another report file name")
        if target.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; choose a new report file name or pass --overwrite")
    return paths


def cmd_eval(args: argparse.Namespace) -> int:
    """Benchmark protocol: PSNR, SSIM and MAE of the blurry input and of the restoration vs the sharp image.

    The data range is the sharp file's: 255 (8-bit), 65535 (16-bit), 1.0 (floats within [0, 1]), else its
    max - min (see :mod:`algnet_core.metrics`). The PSNR of identical images is infinite: "inf" in the table
    and the CSV, null in the JSON (standard JSON has no infinity), and so is a mean over it. A pair that fails
    is reported by name and left out of the means; the exit status is then 1.
    """
    blur_dir, sharp_dir = Path(args.blur_dir), Path(args.sharp_dir)
    blurry = collect_inputs([str(blur_dir)])
    missing = [p.name for p in blurry if not (sharp_dir / p.name).is_file()]
    if missing:
        raise FileNotFoundError(f"no sharp image in {sharp_dir} for: {', '.join(missing)}")
    plan_reports([args.csv, args.json], [*blurry, *(sharp_dir / p.name for p in blurry)], args.overwrite)
    model = _load(args)
    results, failures = [], []
    with tqdm(total=len(blurry), unit="image", desc="images") as images, tqdm(desc="network", leave=False) as bar:
        for path in blurry:
            try:
                results.append(_eval_pair(path, sharp_dir / path.name, model, args, bar))
            except FILE_ERRORS as err:
                tqdm.write(f"algnet eval: error: {_file_error(path, err)}", file=sys.stderr)
                failures.append(path.name)
            images.update()
    if not results:
        return _report(failures, len(blurry), "image pair(s)")
    mean = {kind: _mean([r[kind] for r in results]) for kind in ("blurry", "restored")}
    report = {"model": model.provenance, "images": results, "mean": mean, "failed": failures}
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
    mode = "w" if args.overwrite else "x"  # "x": never replaces a file that appeared since the check
    if args.csv:
        with open(args.csv, mode, newline="") as f:
            csv.writer(f).writerows([header, *table])
    if args.json:
        with open(args.json, mode) as f:
            f.write(json.dumps(_finite_or_null(report), indent=2, allow_nan=False) + "\n")
    return _report(failures, len(blurry), "image pair(s)")


def _eval_pair(path: Path, sharp_path: Path, model: ALGNet, args: argparse.Namespace, bar: tqdm) -> dict:
    """One row of the eval report: the blurry and the restored image's mean metrics over the pages."""
    stack, sharp = read_image(path), read_image(sharp_path)
    if sharp.pages.shape != stack.pages.shape:
        raise ValueError(f"blurry {stack.pages.shape} and sharp {sharp.pages.shape} differ")
    if sharp.pages.dtype != stack.pages.dtype:
        raise ValueError(f"blurry {stack.pages.dtype} and sharp {sharp.pages.dtype} differ")
    peak = data_range_of(sharp.pages)
    restored = _deblur_stack(stack, model, args, bar)
    pages = zip(stack.pages, restored, sharp.pages, strict=True)
    scores = [(image_metrics(b, s, peak), image_metrics(r, s, peak)) for b, r, s in pages]
    return {"image": path.name, "blurry": _mean([s[0] for s in scores]), "restored": _mean([s[1] for s in scores])}


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
    card = Path(args.output) / "README.md"
    kept = card.exists()
    preset = convert_checkpoint(args.checkpoint, args.output, overwrite=args.overwrite)
    print(f"{args.checkpoint}: {preset}; written to {args.output}")
    if kept:
        print(f"{card} kept as it was: it may describe another model; edit it before publishing", file=sys.stderr)
    return 0


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="motion", help="registered name, save_pretrained folder or Hub repo id")
    parser.add_argument(
        "--tile", type=_tile, default="auto", help=f"tile side in pixels (>= {MULTIPLE}), 'auto' or 'none'"
    )
    parser.add_argument(
        "--overlap",
        type=_overlap,
        default=DEFAULT_OVERLAP,
        help=f"tile overlap in pixels, >= 0 (a tile must be at least 2 x overlap + {MULTIPLE})",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument(
        "--normalize",
        default="auto",
        choices=NORMALIZE_MODES,
        help="how values map to the network's 0..1: 'dtype' divides integers by their type's maximum, 'range' "
        "uses the image's own min..max, 'percentile' maps --percentiles to 0..1; 'auto' (default) is 'range' for "
        "16-bit images that use few bits (12/14-bit cameras), else 'dtype'",
    )
    parser.add_argument(
        "--percentiles",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        help="with --normalize percentile: the percentiles mapped to 0 and 1 (default {:g} {:g})".format(
            *DEFAULT_PERCENTILES
        ),
    )
    parser.add_argument(
        "--ensemble", action="store_true", help="average the 8 flips and transposes of each tile (8x slower)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``algnet`` and its sub-commands."""
    parser = argparse.ArgumentParser(prog="algnet", description="ALGNet image deblurring")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("deblur", help="deblur images into new files", description=cmd_deblur.__doc__)
    p.add_argument("inputs", nargs="*", help="image files, folders or glob patterns (PNG, JPEG, TIFF)")
    p.add_argument(
        "--sample",
        action="store_true",
        help="also deblur the bundled sample image (alone: written under a fresh name if the output exists)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help=f"output folder (created; files keep their names), or a new NAME{ZARR_SUFFIX} array for one zarr "
        "array, TIFF stack or folder of equal-size images (written chunk by chunk; rerun to resume)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (never an input)")
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help=f"with -o NAME{ZARR_SUFFIX}: run on a dask cluster: a scheduler address (tcp://HOST:8786), a scheduler "
        "file (.json) or local:N for N local worker processes (default: this process)",
    )
    _model_options(p)
    p.set_defaults(run=cmd_deblur)

    p = sub.add_parser("eval", help="PSNR/SSIM/MAE on a blur/sharp folder pair", description=cmd_eval.__doc__)
    p.add_argument("blur_dir")
    p.add_argument("sharp_dir", help="sharp images with the same file names")
    p.add_argument("--csv", help="write the table as CSV here (a new file; PSNR of identical images: inf)")
    p.add_argument("--json", help="write per-image and mean metrics as JSON here (a new file; infinite PSNR: null)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --csv/--json files (never an input)")
    _model_options(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("info", help="versions, device, scan backend, models, cost", description=cmd_info.__doc__)
    p.add_argument("--preset", default="ALGNet-S", choices=list(PRESETS))
    p.add_argument("--device", default="auto")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("convert", help="official .pth -> save_pretrained folder", description=cmd_convert.__doc__)
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model there")
    p.set_defaults(run=cmd_convert)
    p = sub.add_parser(
        "publish",
        help="upload an exported model folder to the Hugging Face Hub",
        description=publish.__doc__.split("\n")[0],
    )
    publish.add_arguments(p)
    p.set_defaults(run=publish.run)
    _add_finetune(sub)
    return parser


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    """``algnet finetune``, from ``algnet_train`` (the wheel's name for train/): its options module imports only
    the standard library, the training engine is imported when the command runs."""
    from algnet_train import finetune_cli

    p = sub.add_parser("finetune", help="fine-tune a model on your own images and blur (PSF, parameters, pairs)")
    finetune_cli.add_arguments(p)
    p.set_defaults(run=finetune_cli.run)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds like an error: a file being written removes its temporary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``algnet`` console script; returns the exit status.

    SIGTERM (in the main thread) exits with status 143, Ctrl-C (SIGINT) with 130, through the normal clean-up,
    leaving no partial file (nor an output folder it made and wrote nothing to).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_options(parser, args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("algnet_core.hub").setLevel(logging.INFO)  # always say which weights are used
    handle = threading.current_thread() is threading.main_thread()  # Python sets handlers there only
    previous = signal.signal(signal.SIGTERM, _terminate) if handle else None
    try:
        return args.run(args)
    except (OSError, TypeError, ValueError, RuntimeError) as err:  # WeightsError is a RuntimeError
        print(f"algnet {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the same clean-up as SIGTERM, a line instead of a traceback
        print(f"algnet {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
