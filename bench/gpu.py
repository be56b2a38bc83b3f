"""GPU check: the selective-scan backends on CUDA (correctness and speed) and ALGNet at 1280x720 in half
precision. The one script to run when a GPU is lent (a few minutes on an H100/H200).

    python bench/gpu.py --json gpu.json

1. Correctness: every CUDA backend (``chunked``, ``triton``, ``mamba_ssm`` where it imports) against the
   ``reference`` recurrence in float32, forward and gradients, at small Mamba-like sizes (ragged lengths,
   batch 2, d_state 32 and 5).
2. Scan speed at d_inner 64, d_state 32, batch 1, L = 65536 and 921600: milliseconds per forward.
3. ALGNet preset, one 1x3x720x1280 forward under float16 autocast (the ``deblur`` default on CUDA) with
   each backend: milliseconds (median of 10 after warm-up) and peak CUDA memory.

The ``triton`` backend stays marked unverified in ``algnet_core.scan.UNVERIFIED`` until this script has
passed on a GPU and its JSON is kept in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys

import torch
from scan import D_INNER, D_STATE, mamba_inputs  # bench/scan.py: run as python bench/gpu.py

from algnet_core import PRESETS, ALGNet
from algnet_core.scan import selective_scan


def _backends() -> list[str]:
    names = ["chunked", "triton"]
    if importlib.util.find_spec("mamba_ssm") is not None:
        names.append("mamba_ssm")
    return names


def check_correctness(backend: str) -> list[dict]:
    """Max |error| of forward and (relative) gradients against the reference, per shape."""
    rows = []
    for shape in [(1, 8, 32, 300), (2, 4, 32, 1000), (2, 3, 5, 129), (1, 2, 16, 1)]:
        x = mamba_inputs(*shape, device="cuda")
        results = {}
        for name in ("reference", backend):
            inputs = {k: v.clone().requires_grad_() for k, v in x.items()}
            y = selective_scan(**inputs, delta_softplus=True, backend=name)
            weights = torch.linspace(-1, 1, y.numel(), device="cuda").view(y.shape)
            (y * weights).sum().backward()
            results[name] = (y.detach(), {k: v.grad for k, v in inputs.items()})
        (y_ref, g_ref), (y_got, g_got) = results["reference"], results[backend]
        grad_error = max((g_got[k] - g_ref[k]).abs().max().item() / g_ref[k].abs().max().item() for k in g_ref)
        rows.append(
            {
                "backend": backend,
                "shape": list(shape),
                "forward_max_abs_error": (y_got - y_ref).abs().max().item(),
                "grad_max_rel_error": grad_error,
                "ok": (y_got - y_ref).abs().max().item() <= 1e-4 and grad_error <= 1e-4,
            }
        )
    return rows


def _time_ms(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_scan(backend: str, length: int) -> dict:
    x = mamba_inputs(1, D_INNER, D_STATE, length, device="cuda")
    with torch.no_grad():
        ms = _time_ms(lambda: selective_scan(**x, delta_softplus=True, backend=backend), repeats=5)
    elements = D_INNER * D_STATE * length
    return {"backend": backend, "L": length, "ms": ms, "ns_per_elem": ms * 1e6 / elements}


def time_model(backend: str) -> dict:
    torch.manual_seed(0)
    model = ALGNet(**PRESETS["ALGNet"]).eval().cuda()
    x = torch.rand(1, 3, 720, 1280, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    os.environ["ALGNET_SCAN_BACKEND"] = backend  # the model's scans read it at every call
    try:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            ms = _time_ms(lambda: model(x))
    finally:
        del os.environ["ALGNET_SCAN_BACKEND"]
    return {
        "backend": backend,
        "ms": ms,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "device": torch.cuda.get_device_name(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    backends = _backends()
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "backends": backends}

    report["correctness"] = [row for b in backends for row in check_correctness(b)]
    print(f"{report['device']}, torch {report['torch']}")
    print(f"{'backend':<10} {'shape':<18} {'fwd err':>9} {'grad err':>9}  ok")
    for r in report["correctness"]:
        shape = "x".join(map(str, r["shape"]))
        errors = f"{r['forward_max_abs_error']:9.1e} {r['grad_max_rel_error']:9.1e}"
        print(f"{r['backend']:<10} {shape:<18} {errors}  {r['ok']}")

    report["scan"] = [time_scan(b, length) for length in (65536, 921600) for b in backends]
    print(f"\n{'backend':<10} {'L':>8} {'ms':>9} {'ns/elem':>9}")
    for r in report["scan"]:
        print(f"{r['backend']:<10} {r['L']:>8} {r['ms']:9.3f} {r['ns_per_elem']:9.4f}")

    report["model"] = [time_model(b) for b in backends]
    print("\nALGNet preset, 1x3x720x1280, float16 autocast (target: < 50 ms on an H100/H200)")
    for r in report["model"]:
        print(f"{r['backend']:<10} {r['ms']:9.1f} ms  peak {r['peak_gib']:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
