"""The training step on the CPU: seconds per optimiser step, side by side over the settings that matter.

One step of ``train.engine.Trainer.train_step`` without the data loader: ALGNet-S forward at all scales,
the paper's loss (Eq. 1), backward, gradient clipping and Adam, on a fixed batch of real photo crops.
Cases: crop 96 and 128 px at batch 8, 1 and 2 threads, float32 and bfloat16 autocast, channels-last or
not. Each case runs in a fresh process (its own threads and peak memory) and reports the median of its
timed steps, pixels per second, and the selective scan's share: the time inside the fused scan op's
forward and backward. The ratio column is against the first row (today's recipe: float32, 1 thread).

    python bench/train.py                # all 16 cases
    python bench/train.py --quick        # crop 96 only, 8 cases
    python bench/train.py --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # not bench/: this file would shadow the ``train`` package
PHOTOS = REPO.parent / "shared" / "data" / "train_photos" / "div2k_crops256"


def _batch(batch: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real photo crops (sharp) and a 5 px box blur of them (blurry): realistic values, no loader."""
    from PIL import Image

    files = sorted(PHOTOS.glob("*.png"))[:batch]
    sharp = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))[:crop, :crop].copy()) for f in files]
    )
    sharp = sharp.permute(0, 3, 1, 2).float() / 255
    blur = torch.nn.functional.avg_pool2d(sharp, 5, 1, 2, count_include_pad=False)
    return blur, sharp


def run_case(batch: int, crop: int, precision: str, channels_last: bool, steps: int) -> dict:
    """Time ``steps`` optimiser steps (after two warm-up steps) in this process."""
    from algnet_core import PRESETS, ALGNet, scan_cpu
    from train.losses import MultiScaleLoss

    torch.manual_seed(0)
    model = ALGNet(**PRESETS["ALGNet-S"]).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    blur, sharp = (t.contiguous(memory_format=fmt) for t in _batch(batch, crop))
    criterion = MultiScaleLoss(1e-3, 0.05, 0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scan_time = {"forward": 0.0, "backward": 0.0}
    op = scan_cpu._SelectiveScan
    forward, backward = op.forward, op.backward

    def timed(name, fn):  # noqa: ANN001, ANN202
        def wrapper(ctx, *args):  # noqa: ANN001, ANN202
            start = time.perf_counter()
            out = fn(ctx, *args)
            scan_time[name] += time.perf_counter() - start
            return out

        return staticmethod(wrapper)

    op.forward, op.backward = timed("forward", forward), timed("backward", backward)
    times, scans = [], []
    for i in range(steps + 2):
        scan_time.update(forward=0.0, backward=0.0)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = model(blur, return_all_scales=True)
        loss = criterion(outputs, sharp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
            scans.append(dict(scan_time))
    seconds = statistics.median(times)
    middle = scans[times.index(sorted(times)[len(times) // 2])]
    return {
        "batch": batch,
        "crop": crop,
        "threads": torch.get_num_threads(),
        "precision": precision,
        "channels_last": channels_last,
        "seconds": seconds,
        "megapixels_per_s": batch * crop * crop / seconds / 1e6,
        "scan_forward_s": middle["forward"],
        "scan_backward_s": middle["backward"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="crop 96 only")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after 2 warm-up steps)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        batch, crop, precision, channels_last = args.case
        print(json.dumps(run_case(int(batch), int(crop), precision, channels_last == "1", args.steps)))
        return

    crops = [96] if args.quick else [96, 128]
    rows = []
    for crop, threads, precision, channels_last in itertools.product(crops, (1, 2), ("fp32", "bf16"), (0, 1)):
        env = os.environ | {t: str(threads) for t in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
        cmd = [sys.executable, __file__, "--case", "8", str(crop), precision, str(channels_last)]
        out = subprocess.run([*cmd, "--steps", str(args.steps)], check=True, capture_output=True, text=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  measured crop {crop}, {threads} threads, {precision}, channels-last {channels_last}", file=sys.stderr)

    base = rows[0]["seconds"]
    print(f"\nALGNet-S training step (forward, Eq. 1 loss, backward, clip, Adam), batch 8, {args.steps} timed steps")
    print(
        f"{'crop':>4} {'thr':>3} {'prec':>5} {'c-last':>6} {'s/step':>7} {'Mpx/s':>6} {'scan fwd':>8}"
        f" {'scan bwd':>8} {'bwd/fwd':>7} {'scan':>5} {'RSS':>6} {'vs row 1':>8}"
    )
    for r in rows:
        scan = r["scan_forward_s"] + r["scan_backward_s"]
        print(
            f"{r['crop']:>4} {r['threads']:>3} {r['precision']:>5} {'yes' if r['channels_last'] else 'no':>6}"
            f" {r['seconds']:>7.2f} {r['megapixels_per_s']:>6.3f} {r['scan_forward_s']:>8.2f}"
            f" {r['scan_backward_s']:>8.2f} {r['scan_backward_s'] / r['scan_forward_s']:>6.1f}x"
            f" {scan / r['seconds']:>5.0%} {r['peak_rss_gib']:>5.2f}G {base / r['seconds']:>7.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
