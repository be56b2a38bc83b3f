"""The Triton scan kernel against the reference recurrence, run in Triton's CPU interpreter.

The kernel has not run on a GPU yet: these tests check its arithmetic (chunking, the carried state, masks,
fused epilogues) and the registry's rules for an unverified backend, not its speed or CUDA code generation.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from algnet_core.scan import AUTO_ORDER, BACKENDS, UNVERIFIED, resolve_backend  # noqa: E402

# Runs in a fresh interpreter: TRITON_INTERPRET must be set before the kernel is decorated.
_SCRIPT = """
import json, sys, torch
from algnet_core.scan import selective_scan
from algnet_core.scan_triton import CHUNK, selective_scan_triton
from helpers import mamba_inputs

batch, d_inner, d_state, length, options = json.loads(sys.argv[1])
x = mamba_inputs(batch, d_inner, d_state, length)
x = {k: v for k, v in x.items() if k in ("u", "delta", "A", "B", "C") or k in options}
if "small_steps" in options:  # raw step sizes -20..-10: softplus 2e-9..5e-5, where 1 + exp(x) rounds to 1
    x["delta"] = -10.0 - 10.0 * torch.rand(batch, d_inner, length, generator=torch.Generator().manual_seed(1))
softplus = "softplus" in options
if not softplus:
    x["delta"] = torch.nn.functional.softplus(x["delta"])
grads = {}
for name, fn in (("triton", selective_scan_triton), ("reference", None)):
    inputs = {k: v.clone().requires_grad_() for k, v in x.items()}
    if fn is None:
        y = selective_scan(**inputs, delta_softplus=softplus, backend="reference")
    else:
        y = fn(**inputs, delta_softplus=softplus)
    (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    grads[name] = (y.detach(), {k: v.grad for k, v in inputs.items()})
(y_t, g_t), (y_r, g_r) = grads["triton"], grads["reference"]
print(json.dumps({
    "chunks": -(-length // CHUNK),
    "forward": (y_t - y_r).abs().max().item() / y_r.abs().max().item(),
    "grads": {k: (g_t[k] - g_r[k]).abs().max().item() / max(g_r[k].abs().max().item(), 1e-12) for k in g_r},
}))
"""


@pytest.mark.parametrize(
    ("shape", "options"),
    [
        ((1, 3, 32, 300), ["D", "z", "delta_bias", "softplus"]),  # Mamba's d_state, 3 chunks, a ragged tail
        ((2, 2, 5, 129), ["D", "softplus"]),  # d_state not a power of two; batch rows
        ((1, 2, 4, 1), []),  # one step, the bare recurrence
        ((1, 2, 8, 200), ["z", "softplus", "small_steps"]),  # tiny step sizes, no skip to hide them
    ],
)
def test_triton_kernel_matches_reference_in_the_interpreter(shape, options):
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])  # helpers.py
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps([*shape, options])],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["chunks"] == -(-shape[3] // 128)
    assert result["forward"] <= 1e-5  # relative to the largest output
    assert set(result["grads"]) == {"u", "delta", "A", "B", "C", *(k for k in options if k in ("D", "z", "delta_bias"))}
    assert max(result["grads"].values()) <= 1e-5, result["grads"]


def test_triton_backend_is_unverified_and_never_automatic(monkeypatch):
    monkeypatch.delenv("ALGNET_SCAN_BACKEND", raising=False)
    assert "triton" in BACKENDS and "triton" in UNVERIFIED and "triton" not in AUTO_ORDER
    assert "CUDA" in BACKENDS["triton"].unavailable(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="triton.*CUDA"):
        resolve_backend("triton", torch.device("cpu"))
