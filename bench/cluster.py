"""Cluster benchmark: a uint16 stack deblurred zarr to zarr on a dask LocalCluster of 1 and of 2 worker processes.

Each cluster size runs in a fresh subprocess (``algnet_core.distributed.connect("local:N")``, one compute
thread per worker, then ``deblur_to_zarr``), so the rows are side by side from one command. Reported: seconds
of the run (the cluster already started and its workers' imports done: the start-up column), the speed-up over one
worker, and the peak resident memory of each worker process (``ru_maxrss``) and of the client. The model is
the bundled ``motion`` (ALGNet-S); speed and memory do not depend on the weight values. (Not named
``distributed.py``: run as a script, that name would hide the dask package.)

    python bench/cluster.py            # 8 planes of 512x512, auto tile, 1 and 2 workers
    python bench/cluster.py --quick    # 4 planes of 256x256
    python bench/cluster.py --json out.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(workers: int, source: str, target: str) -> dict:
    """Deblur ``source`` into ``target`` on ``workers`` local worker processes; seconds and memory."""
    from algnet_core.distributed import connect, deblur_to_zarr

    start = time.perf_counter()
    with connect(f"local:{workers}") as client:
        client.wait_for_workers(workers)
        client.run(importlib.import_module, "algnet_core.inference")  # torch & co.: start-up, not the run
        started = time.perf_counter() - start
        begin = time.perf_counter()
        summary = deblur_to_zarr(source, target, "motion", client=client)
        seconds = time.perf_counter() - begin
        worker_rss = sorted(client.run(peak_rss_mib).values())
    return {
        "workers": workers,
        "chunks": summary["chunks"],
        "startup_s": started,
        "seconds": seconds,
        "worker_peak_rss_mib": worker_rss,
        "client_peak_rss_mib": peak_rss_mib(),
    }


def make_stack(folder: Path, planes: int, side: int) -> str:
    """A random 12-bit uint16 zarr stack chunked per plane; returns its path."""
    import numpy as np
    import zarr

    path = folder / "stack.zarr"
    data = np.random.default_rng(0).integers(0, 4096, (planes, side, side), dtype=np.uint16)
    zarr.create_array(store=str(path), shape=data.shape, chunks=(1, side, side), dtype=data.dtype)[:] = data
    return str(path)


def main() -> None:
    """Print one row per cluster size, each measured in its own subprocess."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 planes of 256x256")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="cluster sizes to run")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", nargs=3, metavar=("WORKERS", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        workers, source, target = args.child
        print(json.dumps(run_one(int(workers), source, target)))
        return
    planes, side = (4, 256) if args.quick else (8, 512)
    print(f"{planes} x {side} x {side} uint16 zarr stack, chunks of one plane, ALGNet-S (motion), auto tile, CPU")
    print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    header = f"{'workers':>7} {'seconds':>8} {'speed-up':>8} {'start-up s':>10} {'peak RSS per worker MiB':>24}"
    print(f"{header} {'client MiB':>10}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = make_stack(Path(tmp), planes, side)
        for workers in args.workers:
            target = str(Path(tmp) / f"out{workers}.zarr")
            cmd = [sys.executable, __file__, "--child", str(workers), source, target]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            speed_up = rows[0]["seconds"] / row["seconds"] if rows else 1.0
            memory = ", ".join(f"{m:.0f}" for m in row["worker_peak_rss_mib"])
            print(
                f"{workers:>7} {row['seconds']:8.1f} {speed_up:7.2f}x {row['startup_s']:10.1f} {memory:>24} "
                f"{row['client_peak_rss_mib']:10.0f}"
            )
            rows.append(row)
    print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
