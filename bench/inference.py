"""Inference benchmark: seconds and peak RSS to deblur a 1280x720 and a 4K RGB image on this machine's CPU.

Each configuration (untiled, and one row per tile size) runs in a fresh subprocess, so its peak resident
memory (``ru_maxrss``) is its own. The model is ALGNet-S (the bundled default's architecture) with its
bundled weights; speed and memory do not depend on the weight values.

    python bench/inference.py            # 1280x720: untiled, tiles 256, 512 and auto; 3840x2160: auto
    python bench/inference.py --quick    # 640x360: tile 256 and auto only
    python bench/inference.py --quick --ensemble   # each case also with ensemble=True, and the time ratio
    python bench/inference.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_one(height: int, width: int, tile: str, threads: int, ensemble: bool) -> dict:
    """Deblur one random image in this process; returns seconds, peak RSS and the tile used."""
    import numpy as np
    import torch

    from algnet_core.inference import choose_tile, deblur, load_model

    torch.set_num_threads(threads)
    model = load_model("motion", "cpu")
    size = None if tile == "none" else "auto" if tile == "auto" else int(tile)
    image = np.random.default_rng(0).random((height, width, 3), dtype=np.float32)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    deblur(image, model, tile=size, device="cpu", ensemble=ensemble)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    used = choose_tile(model._hub_mixin_config["width"], torch.device("cpu")) if tile == "auto" else tile
    return {"tile": str(used), "seconds": seconds, "peak_rss_mib": peak / 1024, "before_mib": base / 1024}


def main() -> None:
    """Print a table: one row per configuration, each measured in its own subprocess."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="640x360, tile 256 and auto only")
    parser.add_argument("--tiles", nargs="*", help="tile sizes to run ('none' = untiled, 'auto')")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ensemble", action="store_true", help="also run each case with ensemble=True")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", nargs=4, metavar=("H", "W", "TILE", "ENSEMBLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        h, w, tile, ensemble = args.child
        print(json.dumps(run_one(int(h), int(w), tile, args.threads, ensemble == "1")))
        return
    if args.quick:
        cases = [(360, 640, tile) for tile in args.tiles or ["256", "auto"]]
    else:
        cases = [(720, 1280, tile) for tile in args.tiles or ["none", "256", "512", "auto"]] + [(2160, 3840, "auto")]
    print(f"RGB, ALGNet-S, CPU, {args.threads} threads")
    print(f"{'size':>10} {'tile':>10} {'ensemble':>9} {'seconds':>9} {'peak RSS MiB':>13} {'after load MiB':>15}")
    rows = []
    for height, width, tile in cases:
        for ensemble in (False, True) if args.ensemble else (False,):
            child = [str(height), str(width), tile, str(int(ensemble))]
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", *child]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            label = "untiled" if tile == "none" else f"{row['tile']}{' (auto)' if tile == 'auto' else ''}"
            size = f"{width}x{height}"
            ratio = f"x{row['seconds'] / rows[-1]['seconds']:.1f}" if ensemble else "no"
            print(
                f"{size:>10} {label:>10} {ratio:>9} {row['seconds']:9.1f} {row['peak_rss_mib']:13.0f}"
                f" {row['before_mib']:15.0f}"
            )
            rows.append({"size": size, "ensemble": ensemble, **row})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
