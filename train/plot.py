"""Validation curves of training runs, drawn as one PNG: PSNR against optimiser steps and against training hours.

    python -m train.plot ~/.cache/algnet/runs/motion ~/.cache/algnet/runs/defocus -o curves.png
    python -m train.plot RUN ... -o docs/campaign_curves.png --overwrite    # replace the card figure

Reads each run's ``val.csv`` (PSNR of the EMA model and of the blurry input, by step) and ``train.csv``. The
training time of a step comes from the throughput that ``train.csv`` logs (``images_per_s`` over each
logging interval, which includes a validation that falls in it), so the pauses between stretches are not
counted; with one compute thread per run (the campaign's setting) it is the time of one CPU core.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Curve:
    """One run's validation curve: ``psnr[i]`` at ``steps[i]`` after ``hours[i]`` hours of training."""

    name: str
    steps: np.ndarray
    hours: np.ndarray
    psnr: np.ndarray
    psnr_blurry: float


def training_hours(train_rows: Sequence[dict[str, str]], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative training hours at each logged step of ``train.csv``: each interval takes ``steps * batch /
    images_per_s`` seconds. Steps are counted once: after a resume from an earlier checkpoint, only the
    steps beyond the furthest one reached before count (the time to reach a step, not the time spent)."""
    steps, hours, furthest, total = [], [], 0, 0.0
    for row in train_rows:
        step = int(row["step"])
        if step > furthest:
            total += (step - furthest) * batch / float(row["images_per_s"]) / 3600
            furthest = step
        steps.append(step)
        hours.append(total)
    return np.array(steps), np.array(hours)


def load_curve(run: Path) -> Curve:
    """Read a run folder (``val.csv``, ``train.csv``, ``config.yaml`` for the batch)."""
    import yaml

    for name in ("val.csv", "train.csv", "config.yaml"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name}: not a training run folder (python -m train writes it)")
    batch = int(yaml.safe_load((run / "config.yaml").read_text())["run"]["batch"])
    with open(run / "train.csv", newline="") as f:
        logged_steps, logged_hours = training_hours(list(csv.DictReader(f)), batch)
    with open(run / "val.csv", newline="") as f:
        val = list(csv.DictReader(f))
    if not val:
        raise ValueError(f"{run / 'val.csv'}: no validation yet")
    steps = np.array([int(r["step"]) for r in val])
    return Curve(
        name=run.name,
        steps=steps,
        hours=np.interp(steps, np.concatenate([[0], logged_steps]), np.concatenate([[0.0], logged_hours])),
        psnr=np.array([float(r["psnr"]) for r in val]),
        psnr_blurry=float(val[-1]["psnr_blurry"]),
    )


def plot(curves: Sequence[Curve], out: Path, title: str) -> None:
    """Validation PSNR gain over the blurry input against steps (left) and training hours (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for curve in curves:
        gain = curve.psnr - curve.psnr_blurry
        label = f"{curve.name} (blurry {curve.psnr_blurry:.2f} dB)"
        axes[0].plot(curve.steps, gain, marker="o", markersize=3, label=label)
        axes[1].plot(curve.hours, gain, marker="o", markersize=3, label=label)
    axes[0].set_xlabel("optimiser steps")
    axes[1].set_xlabel("training hours (one CPU thread per run)")
    axes[0].set_ylabel("validation PSNR gain over the input (dB)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (log.out_dir of python -m train)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="ALGNet-S validation during training")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists: choose a new name or pass --overwrite")
    curves = [load_curve(run) for run in args.runs]
    plot(curves, args.out, args.title)
    for c in curves:
        print(f"{c.name}: step {c.steps[-1]}, {c.hours[-1]:.2f} h, {c.psnr[-1]:.2f} dB (blurry {c.psnr_blurry:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
