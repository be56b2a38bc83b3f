"""ALGNet vs its Baseline ablation (the same U-Net with NAFNet blocks): forward cost side by side.

Prints params, GFLOPs (honest count and paper-style hook count), seconds, the share of them spent in the
selective scan, and peak RSS of one CPU forward per model and input size, plus the ALGNet/Baseline time
ratio next to their FLOP ratio (the paper's claim: the SSM branch costs no more than its arithmetic). Each
case runs in a fresh process so that its peak RSS is its own.

    python bench/model.py                 # 256x256 and 1280x720, presets ALGNet and Baseline
    python bench/model.py --quick         # 256x256 only
    python bench/model.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from algnet_core import PRESETS, ALGNet, mamba
from algnet_core.cost import count_cost
from algnet_core.scan import resolve_backend


def run_case(preset: str, height: int, width: int, repeats: int) -> dict:
    """One forward (after a warm-up) in this process; returns the measurements."""
    torch.manual_seed(0)
    model = ALGNet(**PRESETS[preset]).eval()
    x = torch.rand(1, 3, height, width)
    scan_seconds = 0.0
    scan = mamba.selective_scan

    def timed_scan(*args, **kwargs):  # the forward's time inside the selective scan (the whole fused op)
        nonlocal scan_seconds
        start = time.perf_counter()
        out = scan(*args, **kwargs)
        scan_seconds += time.perf_counter() - start
        return out

    mamba.selective_scan = timed_scan
    with torch.inference_mode():
        model(x[..., :64, :64])  # warm-up: allocator, kernels
        times, scan_times = [], []
        for _ in range(repeats):
            scan_seconds = 0.0
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
            scan_times.append(scan_seconds)
    best = min(range(repeats), key=times.__getitem__)
    cost = count_cost(PRESETS[preset], height, width)
    return {
        "preset": preset,
        "size": f"{width}x{height}",
        "params": cost.params,
        "gflops": cost.total_flops / 1e9,
        "hook_gmacs": cost.hook_macs / 1e9,
        "seconds": times[best],
        "scan_share": scan_times[best] / times[best],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "scan_backend": resolve_backend(None, torch.device("cpu")),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256x256 only")
    parser.add_argument("--presets", nargs="+", default=["ALGNet", "Baseline"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--case", nargs=3, metavar=("PRESET", "H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        preset, h, w = args.case
        print(json.dumps(run_case(preset, int(h), int(w), args.repeats)))
        return

    sizes = [(256, 256)] if args.quick else [(256, 256), (720, 1280)]
    rows = []
    for h, w in sizes:
        for preset in args.presets:
            cmd = [sys.executable, __file__, "--case", preset, str(h), str(w), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"  measured {preset} at {w}x{h}", file=sys.stderr)

    print(f"\nCPU forward, float32, batch 1, {rows[0]['threads']} threads, scan backend {rows[0]['scan_backend']}")
    print(
        f"{'model':<10} {'size':>9} {'params':>12} {'GFLOPs':>8} {'hook GMACs':>10} {'seconds':>8} {'scan':>5}"
        f" {'peak RSS':>9}"
    )
    for r in rows:
        print(
            f"{r['preset']:<10} {r['size']:>9} {r['params']:>12,} {r['gflops']:>8.1f} {r['hook_gmacs']:>10.1f}"
            f" {r['seconds']:>8.2f} {r['scan_share']:>5.0%} {r['peak_rss_gib']:>7.2f}G"
        )
    by_key = {(r["preset"], r["size"]): r for r in rows}
    if "ALGNet" in args.presets and "Baseline" in args.presets:
        print("\nALGNet / Baseline: time ratio vs FLOP ratio (target: time ratio <= FLOP ratio)")
        for h, w in sizes:
            a, b = by_key[("ALGNet", f"{w}x{h}")], by_key[("Baseline", f"{w}x{h}")]
            print(f"  {w}x{h}: time {a['seconds'] / b['seconds']:.2f}x, FLOPs {a['gflops'] / b['gflops']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
