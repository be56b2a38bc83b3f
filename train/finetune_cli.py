"""``algnet finetune``: the command line of :mod:`train.finetune` (``algnet_train.finetune`` once installed).

Only the standard library is imported here, so ``algnet --help`` and ``algnet finetune --help`` work without
the ``train`` extra; the engine (PyYAML, SciPy, Pillow) is imported when the command runs, and a missing
module is reported with the extra to install.

    algnet finetune SHARP_DIR --psf PSF.tif [--noise SIGMA] --minutes M [--model defocus] -o OUT
    algnet finetune SHARP_DIR --defocus-radius 2 6 | --motion-length 5 25 [--noise SIGMA] --minutes M -o OUT
    algnet finetune --blur-dir B --sharp-dir S --minutes M [--model motion] -o OUT
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable

EXTRA_MODULES = {"yaml": "PyYAML", "scipy": "SciPy", "PIL": "Pillow"}
"""Modules of the ``train`` extra that the engine imports, by the distribution that provides them."""
DESCRIPTION = """Fine-tune a model on your own images and blur; writes a new save_pretrained folder (never an
existing one) that `algnet deblur --model OUT`, napari and ComfyUI use like the bundled models. Blur comes from
a PSF file (.npy, .tif, .png: normalised and centred), from defocus or motion parameters, or from your own
blurry/sharp pairs (same file names). TIFF stacks count page by page, greyscale is fine. A share of the images
is held back for validation: the PSNR of the blurry input, of the starting model and of the fine-tuned model
on it is printed and written into the folder's model card. Ctrl-C stops early and keeps the best model so far."""


def _positive(kind: type) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        return value

    return parse


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``algnet finetune``."""
    parser.description = DESCRIPTION
    parser.add_argument("sharp", nargs="?", metavar="SHARP_DIR", help="folder of sharp images to blur")
    blur = parser.add_mutually_exclusive_group(required=True)
    blur.add_argument("--psf", metavar="FILE", help="point-spread function: .npy, .tif/.tiff or .png, one 2-D plane")
    blur.add_argument(
        "--defocus-radius", nargs=2, type=_positive(float), metavar=("MIN", "MAX"), help="disk radii in pixels"
    )
    blur.add_argument(
        "--motion-length", nargs=2, type=_positive(float), metavar=("MIN", "MAX"), help="camera-shake path in pixels"
    )
    blur.add_argument("--blur-dir", metavar="DIR", help="folder of blurry images, paired by file name with --sharp-dir")
    parser.add_argument("--sharp-dir", metavar="DIR", help="the sharp images of --blur-dir (or give them as SHARP_DIR)")
    parser.add_argument(
        "--noise",
        type=_non_negative,
        metavar="SIGMA",
        default=None,
        help="Gaussian noise sigma added to the synthetic blur, in units of the image range (default 0.01)",
    )
    parser.add_argument(
        "--poisson",
        type=_non_negative,
        metavar="A",
        default=0.0,
        help="Poisson (shot) noise: variance per unit of signal, for Poisson-Gaussian camera noise (default 0)",
    )
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=_positive(float), metavar="M", help="training time, validations included")
    budget.add_argument("--steps", type=_positive(int), metavar="N", help="optimisation steps (reproducible)")
    parser.add_argument(
        "--model",
        default=None,
        metavar="NAME",
        help="starting model: registered name, save_pretrained folder or training checkpoint "
        "(default: motion for --motion-length, else defocus)",
    )
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="new folder to write the model to (must not exist)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--crop", type=_positive(int), default=None, help="training patch side in pixels")
    parser.add_argument("--batch", type=_positive(int), default=None, help="patches per step")
    parser.add_argument("--lr", type=_positive(float), default=None, help="initial learning rate (cosine decay)")
    parser.add_argument(
        "--warmup",
        type=_count,
        default=None,
        help="steps over which the learning rate rises (default 20, at most 1/5 of the run)",
    )
    parser.add_argument(
        "--val-fraction", type=_positive(float), default=None, help="share of the images held back (default 0.2)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the crops and the blur")
    parser.add_argument("--threads", type=_positive(int), default=None, help="CPU threads (torch and the scan)")


def run(args: argparse.Namespace) -> int:
    """Run ``algnet finetune``: train, print the validation PSNRs, write the folder. Ctrl-C or SIGTERM stops
    after the current step and keeps the best model so far; a second one aborts."""
    try:
        from . import finetune
    except ModuleNotFoundError as err:
        top = (err.name or "").partition(".")[0]
        if top not in EXTRA_MODULES:
            raise
        raise RuntimeError(
            f"fine-tuning needs {EXTRA_MODULES[top]} (module {err.name!r} is missing): pip install 'algnet[train]'"
        ) from err
    if args.sharp and args.sharp_dir:
        raise ValueError("give the sharp images once: SHARP_DIR or --sharp-dir")
    if args.sharp_dir and not args.blur_dir:
        raise ValueError("--sharp-dir pairs with --blur-dir; for sharp images alone give SHARP_DIR")
    sharp = args.sharp or args.sharp_dir
    if sharp is None:
        raise ValueError("no sharp images: give SHARP_DIR (or --sharp-dir with --blur-dir)")
    options = {
        "model": args.model or ("motion" if args.motion_length else "defocus"),
        "crop": args.crop,
        "batch": args.batch,
        "lr": args.lr,
        "warmup_steps": args.warmup,
        "noise": args.noise,
        "val_fraction": args.val_fraction,
    }
    tuner = finetune.FineTuner(
        args.output,
        sharp,
        blur=args.blur_dir,
        psf=args.psf,
        defocus_radius=args.defocus_radius and tuple(args.defocus_radius),
        motion_length=args.motion_length and tuple(args.motion_length),
        poisson=args.poisson,
        minutes=args.minutes,
        steps=args.steps,
        device=args.device,
        seed=args.seed,
        log_progress=True,
        **{k: v for k, v in options.items() if v is not None},
    )
    if args.threads:
        import numba
        import torch

        torch.set_num_threads(args.threads)
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))  # the CPU selective scan

    def stop(signum: int, _frame: object) -> None:
        print(
            f"algnet finetune: {signal.Signals(signum).name}: stopping after this step with the best model so far "
            "(again to abort)",
            file=sys.stderr,
        )
        tuner.cancel()
        restore()  # a second signal aborts the run (its folder is removed)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {signum: signal.signal(signum, stop) for signum in handled}
    try:
        result = tuner.run()
    finally:
        restore()
    print(result.summary())
    return 0
