"""Selective-scan benchmark on CPU: every backend at Mamba's sizes (d_inner 64, d_state 32, batch 1).

    python bench/scan.py [--quick] [--json PATH]

Each (backend, L) case runs in a fresh subprocess with the inputs of a Mamba block (D skip, z gate,
delta_bias, softplus). Reported per case:

* ``seconds`` - the best of ``--repeats`` calls (a single call for the reference beyond L=4096 and for
  L=921600), after a small warm-up call that compiles or loads the numba kernels; under
  ``torch.no_grad`` (forward) or for the forward and backward pass of ``y.sum()`` (all inputs need grads);
* ``ns/elem`` - seconds per (position, channel, state) element, ``batch * d_inner * d_state * L``;
* ``held MiB`` - peak resident-set growth of the subprocess during one call (Linux ``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``, minus ``VmRSS`` before): everything the call allocates
  (torch, numpy and numba alike), the output tensor included. This run sets ``MALLOC_MMAP_THRESHOLD_=65536``
  so that glibc returns freed blocks to the system at once: the number is the memory the computation
  holds at its peak;
* ``rss MiB`` - the same growth in the timed run, with glibc's default heap, which may keep freed blocks
  (many small chunks of work tensors fragment it): what a user of the default allocator sees;
* ``speed-up`` - reference seconds / seconds, where the reference ran. The reference is skipped where its
  time extrapolated linearly from a shorter run exceeds ``--reference-budget`` seconds.

The ``roofline`` row is the ``cpu`` backend's exp-multiply-add (and sum over states) over the same number
of elements without the scan's dependency between time steps: the rate this CPU reaches for the
arithmetic alone. Timings depend on the load of the machine; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

D_INNER, D_STATE, BATCH = 64, 32, 1
LENGTHS = (4096, 65536, 921600)
QUICK_LENGTHS = (4096, 65536)
BACKENDS = ("reference", "chunked", "cpu")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def mamba_inputs(batch: int, d_inner: int, d_state: int, length: int, device: str = "cpu") -> dict:
    """The inputs of a Mamba block's scan (D skip, z gate, delta_bias; delta around softplus(-2)), seeded."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = {
        "u": torch.randn(batch, d_inner, length, generator=g),
        "delta": torch.randn(batch, d_inner, length, generator=g) * 0.5 - 2.0,
        "A": -torch.exp(torch.empty(d_inner, d_state).uniform_(-0.69, 2.77, generator=g)),
        "B": torch.randn(batch, d_state, length, generator=g),
        "C": torch.randn(batch, d_state, length, generator=g),
        "D": torch.randn(d_inner, generator=g),
        "z": torch.randn(batch, d_inner, length, generator=g),
        "delta_bias": torch.randn(d_inner, generator=g) * 0.1,
    }
    return {k: v.to(device) for k, v in x.items()}


def _inputs(length: int, backward: bool) -> dict:
    return {k: v.requires_grad_(backward) for k, v in mamba_inputs(BATCH, D_INNER, D_STATE, length).items()}


def _call(backend: str, x: dict, backward: bool) -> None:
    import torch

    from algnet_core.scan import selective_scan

    if not backward:
        with torch.no_grad():
            selective_scan(**x, delta_softplus=True, backend=backend)
        return
    for v in x.values():
        v.grad = None
    y = selective_scan(**x, delta_softplus=True, backend=backend)
    y.backward(torch.ones_like(y))


def _roofline_seconds(length: int, repeats: int) -> float:
    import numpy as np
    from numba import njit, prange

    from algnet_core.scan_cpu import _exp2

    @njit(parallel=True, fastmath=True)
    def exp_mul_add(delta, A, Bt, out):
        for d in prange(delta.shape[0]):
            a = A[d]
            for t in range(delta.shape[1]):
                dt = delta[d, t]
                bt = Bt[t % Bt.shape[0]]
                acc = np.float32(0)
                for n in range(a.shape[0]):
                    acc += _exp2(dt * a[n]) * bt[n] + dt
                out[d, t] = acc

    rng = np.random.default_rng(0)
    delta = rng.uniform(0.01, 0.3, (D_INNER * BATCH, length)).astype(np.float32)
    A = -rng.uniform(0.5, 16, (D_INNER * BATCH, D_STATE)).astype(np.float32)
    Bt = rng.standard_normal((256, D_STATE)).astype(np.float32)  # cache-resident, like a scan chunk
    out = np.empty_like(delta)
    exp_mul_add(delta[:, :16].copy(), A, Bt, out[:, :16].copy())  # compiles (same array types)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        exp_mul_add(delta, A, Bt, out)
        best = min(best, time.perf_counter() - start)
    return best


def run_case(backend: str, length: int, repeats: int, backward: bool) -> dict:
    """Time one case in this process; returns seconds (best of ``repeats``) and peak extra MiB."""
    if backend == "roofline":
        return {"seconds": _roofline_seconds(length, repeats), "peak_mib": None}
    warm = _inputs(256, backward)  # large enough for the cpu backend's multi-threaded path
    _call(backend, warm, backward)
    x = _inputs(length, backward)
    rss = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _call(backend, x, backward)
        best = min(best, time.perf_counter() - start)
    peak = (_status_kib("VmHWM") - rss) / 1024 if reset else None
    return {"seconds": best, "peak_mib": peak}


def _subprocess_case(
    backend: str, length: int, repeats: int, backward: bool, timeout: float, held: bool = False
) -> dict:
    cmd = [sys.executable, __file__, "--case", backend, str(length), "--repeats", str(repeats)]
    if backward:
        cmd.append("--backward")
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    if held:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=True)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    except subprocess.CalledProcessError as error:
        lines = error.stderr.strip().splitlines()
        return {"skipped": "failed: " + (lines[-1] if lines else f"exit status {error.returncode}")}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_table(lengths: tuple[int, ...], backends: tuple[str, ...], backward: bool, args) -> list[dict]:
    """All cases of one table; the reference is skipped where it would exceed the budget."""
    rows = []
    reference_rate = None  # seconds per position of the last reference run
    for length in lengths:
        reference_seconds = None
        for backend in backends:
            row = {"backend": backend, "L": length, "pass": "forward+backward" if backward else "forward"}
            # one timed call where a call takes seconds: the reference beyond L=4096, everything at 921600
            repeats = 1 if length >= 500_000 or (backend == "reference" and length > 4096) else args.repeats
            estimate = None if reference_rate is None else reference_rate * length
            if backend == "reference" and estimate is not None and estimate > args.reference_budget:
                row["skipped"] = f"skipped (~{estimate:.0f} s estimated)"
            else:
                row.update(_subprocess_case(backend, length, repeats, backward, args.case_timeout))
            if "seconds" in row:
                row["rss_mib"] = row.pop("peak_mib")
                held = _subprocess_case(backend, length, 1, backward, args.case_timeout, held=True)
                row["held_mib"] = held.get("peak_mib")
                row["ns_per_elem"] = row["seconds"] / (BATCH * D_INNER * D_STATE * length) * 1e9
                if backend == "reference":
                    reference_seconds, reference_rate = row["seconds"], row["seconds"] / length
                if reference_seconds is not None:
                    row["speedup_vs_reference"] = reference_seconds / row["seconds"]
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


def _format_row(row: dict) -> str:
    name = f"{row['backend']:<10} {row['pass']:<16} {row['L']:>7}"
    if "seconds" not in row:
        return f"{name}  {row['skipped']}"
    held, rss = ("-" if row.get(k) is None else f"{row[k]:.0f}" for k in ("held_mib", "rss_mib"))
    speedup = f"{row['speedup_vs_reference']:.1f}x" if "speedup_vs_reference" in row else "-"
    return f"{name} {row['seconds']:>10.4f} {row['ns_per_elem']:>9.3f} {held:>9} {rss:>9} {speedup:>9}"


def _targets(rows: list[dict]) -> list[str]:
    def find(backend, length, pass_="forward"):
        return next((r for r in rows if (r["backend"], r["L"], r["pass"]) == (backend, length, pass_)), {})

    lines = []
    chunked, reference = find("chunked", 65536), find("reference", 65536)
    if "seconds" in chunked and "seconds" in reference:
        verdict = "met" if chunked["seconds"] <= reference["seconds"] else "NOT met"
        lines.append(
            f"chunked no slower than reference at L=65536: {chunked['seconds']:.3f} s vs "
            f"{reference['seconds']:.3f} s -> {verdict}"
        )
    chunked = find("chunked", 921600)
    if chunked.get("held_mib") is not None:
        peak = max(chunked["held_mib"], chunked["rss_mib"])
        verdict = "met" if peak < 2048 else "NOT met"
        lines.append(f"chunked L=921600 forward peak extra < 2 GiB: {peak:.0f} MiB (held and rss) -> {verdict}")
    cpu = find("cpu", 921600)
    if "ns_per_elem" in cpu:
        verdict = "met" if cpu["ns_per_elem"] <= 2.0 else "NOT met"
        lines.append(f"cpu L=921600 forward <= 2 ns/elem: {cpu['ns_per_elem']:.3f} ns -> {verdict}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"L in {QUICK_LENGTHS} only, one repeat")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case below L=500000")
    parser.add_argument("--reference-budget", type=float, default=120.0, help="seconds")
    parser.add_argument("--case-timeout", type=float, default=900.0, help="seconds per subprocess")
    parser.add_argument("--no-backward", action="store_true", help="skip the forward+backward table")
    parser.add_argument("--case", nargs=2, metavar=("BACKEND", "L"), help=argparse.SUPPRESS)
    parser.add_argument("--backward", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.repeats, args.backward)))
        return

    import numba
    import torch

    if args.quick:
        args.repeats = 1
    lengths = QUICK_LENGTHS if args.quick else LENGTHS
    meta = {
        "batch": BATCH,
        "d_inner": D_INNER,
        "d_state": D_STATE,
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
    }
    print(
        f"selective scan, CPU: batch {BATCH}, d_inner {D_INNER}, d_state {D_STATE}; torch threads "
        f"{meta['torch_threads']}, numba threads {meta['numba_threads']}, load {meta['load_before'][0]:.2f}"
    )
    columns = ("seconds", "ns/elem", "held MiB", "rss MiB", "speed-up")
    print(f"{'backend':<10} {'pass':<16} {'L':>7} {columns[0]:>10} " + " ".join(f"{c:>9}" for c in columns[1:]))
    rows = run_table(lengths, BACKENDS, False, args)
    if not args.no_backward:
        rows += run_table(lengths[:2], BACKENDS, True, args)
    roofline = {"backend": "roofline", "L": lengths[-1], "pass": "exp-mul-add"}
    roofline.update(_subprocess_case("roofline", lengths[-1], args.repeats, False, args.case_timeout))
    if "seconds" in roofline:
        roofline["ns_per_elem"] = roofline["seconds"] / (BATCH * D_INNER * D_STATE * lengths[-1]) * 1e9
        roofline["elements_per_s"] = 1e9 / roofline["ns_per_elem"]
    rows.append(roofline)
    print(_format_row(roofline) + (f"   ({roofline['elements_per_s']:.3g} elem/s)" if "seconds" in roofline else ""))
    meta["load_after"] = os.getloadavg()
    print(f"load average after: {meta['load_after'][0]:.2f}")
    for line in _targets(rows):
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
