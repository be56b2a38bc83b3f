"""The selective scan of Mamba (S6) as one op with interchangeable backends.

For every batch element b, channel e and state n (``MAMBA_LAYOUT.md``, step 7)::

    s[t] = exp(delta[t] * A[e, n]) * s[t-1] + delta[t] * B[n, t] * u[e, t],   s[-1] = 0
    y[e, t] = sum_n C[n, t] * s[t][e, n]

then ``y += D * u`` and ``y *= silu(z)``. Shapes follow ``mamba_ssm``'s ``selective_scan_fn``:
``u, delta, z: (batch, d_inner, L)``, ``A: (d_inner, d_state)``, ``B, C: (batch, d_state, L)``.

Backends (pick one with ``backend=`` or the ``ALGNET_SCAN_BACKEND`` environment variable):

* ``reference`` - the plain per-step recurrence: the specification and the test oracle, slow.
* ``chunked`` - exact pure PyTorch, any device, forward and backward. The sequence is cut into chunks;
  inside a chunk the recurrence is a log-depth (Hillis-Steele) scan of affine maps, and only the
  (batch, d_inner, d_state) state crosses chunk borders, so memory is bounded by the chunk, not by L.
  With gradients each chunk is recomputed in the backward pass (activation checkpointing).
* ``cpu`` - compiled CPU kernels (numba, ``scan_cpu.py``) that fuse the step sizes, skip and gate into the
  scan, forward and backward; the default on CPU when numba is installed.
* ``mamba_ssm`` - the official CUDA kernel, when the ``mamba_ssm`` package imports and tensors are on CUDA.
* ``triton`` - a fused Triton kernel for CUDA without ``mamba_ssm`` (``scan_triton.py``). UNVERIFIED on a
  GPU (tested only in Triton's CPU interpreter), so never chosen automatically: ask for it by name.

Like ``selective_scan_ref``, the scan itself runs in float32 (float64 when given float64; the ``triton``
kernel always in float32) and the result is cast back to the dtype of ``u``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

ENV_VAR = "ALGNET_SCAN_BACKEND"
CHUNK_ELEMENTS = 1 << 21
"""Target size of one chunk's (batch, d_inner, chunk, d_state) work tensor in the chunked backend."""
CPU_CHUNK_ELEMENTS = 1 << 16
"""Upper bound of that size on CPU, where a chunk's work tensors should stay in cache (bench/scan.py)."""
DECAY_FLOOR = 2.0**-62
"""Smallest decay (product) the chunked backend uses: it keeps products of two decays, and a decay times a
state of magnitude >= 2**-64, normal floats (subnormal arithmetic is ~100x slower on CPUs). The error,
under 2**-62 times the state, is far below float32 rounding."""


@dataclass(frozen=True)
class ScanBackend:
    """One implementation of :func:`selective_scan`.

    ``run`` takes the arguments of :func:`selective_scan` (without ``backend``); ``unavailable`` returns
    ``None`` when the backend can run on a device, else the reason it cannot.
    """

    name: str
    run: Callable[..., Tensor]
    unavailable: Callable[[torch.device], str | None]


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will need gradients through an op on these tensors (``None`` entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _discretisation_inputs(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, delta_bias: Tensor | None, delta_softplus: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Cast to the compute dtype and apply the step-size bias and softplus."""
    dtype = _compute_dtype(u)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u.to(dtype), delta, A.to(dtype), B.to(dtype), C.to(dtype)


def _skip_and_gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def _run_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False) -> Tensor:
    """The specification, written out step by step; it shares no code with the backends it checks."""
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    x, dt, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    state = x.new_zeros(x.shape[0], x.shape[1], A.shape[1])  # (b, d_inner, d_state)
    ys = []
    for t in range(x.shape[2]):
        decay = torch.exp(dt[:, :, t, None] * A)  # (b, d_inner, d_state)
        state = decay * state + (dt[:, :, t] * x[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", state, C[:, :, t]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + D.to(dtype)[:, None] * x
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype)


def _scan_chunk(state: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """Scan one chunk exactly. state: (b, d, n); u, delta: (b, d, T); B, C: (b, n, T).

    Returns y (b, d, T) and the state after the chunk's last step.
    """
    decay = torch.exp(delta[..., None] * A[:, None, :]).clamp_min_(DECAY_FLOOR)  # (b, d, T, n)
    inp = (delta * u)[..., None] * B.transpose(1, 2)[:, None]  # (b, d, T, n)
    first = inp[:, :, :1] + decay[:, :, :1] * state[:, :, None]
    s = torch.cat([first, inp[:, :, 1:]], dim=2)
    # Hillis-Steele inclusive scan: after the pass with offset k, position t holds the composition of
    # the affine maps s -> decay*s + inp of steps t-2k+1 .. t (decay products stay in (0, 1]: stable).
    length, k = s.shape[2], 1
    while k < length:
        s = torch.cat([s[:, :, :k], torch.addcmul(s[:, :, k:], decay[:, :, k:], s[:, :, :-k])], dim=2)
        if 2 * k < length:
            decay = torch.cat([decay[:, :, :k], (decay[:, :, k:] * decay[:, :, :-k]).clamp_min_(DECAY_FLOOR)], dim=2)
        k *= 2
    y = torch.einsum("bdtn,bnt->bdt", s, C)
    return y, s[:, :, -1]


def _run_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False) -> Tensor:
    out_dtype = u.dtype
    u, delta, A, B, C = _discretisation_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, d_inner, length = u.shape
    d_state = A.shape[1]
    elements = min(CHUNK_ELEMENTS, CPU_CHUNK_ELEMENTS) if u.device.type == "cpu" else CHUNK_ELEMENTS
    chunk = max(16, elements // (batch * d_inner * d_state))
    recompute = needs_grad(u, delta, A, B, C)
    state = u.new_zeros(batch, d_inner, d_state)
    # Without gradients the chunks are written into one output: no list of small tensors between the large
    # short-lived work tensors, which fragments glibc's heap (several GiB of RSS at L=921600).
    y = None if recompute else u.new_empty(batch, d_inner, length)
    ys = []
    for start in range(0, length, chunk):
        part = slice(start, start + chunk)
        args = (state, u[:, :, part], delta[:, :, part], A, B[:, :, part], C[:, :, part])
        if recompute:
            y_part, state = checkpoint(_scan_chunk, *args, use_reentrant=False)
            ys.append(y_part)
        else:
            y[:, :, part], state = _scan_chunk(*args)
    return _skip_and_gate(torch.cat(ys, dim=2) if recompute else y, u, D, z, out_dtype)


def _run_mamba_ssm(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False) -> Tensor:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _run_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False) -> Tensor:
    from .scan_cpu import selective_scan_cpu

    dtype = _compute_dtype(u)
    args = (None if t is None else t.to(dtype) for t in (u, delta, A, B, C, D, z, delta_bias))
    return selective_scan_cpu(*args, delta_softplus).to(u.dtype)


def _run_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False) -> Tensor:
    from .scan_triton import selective_scan_triton

    return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _everywhere(device: torch.device) -> str | None:
    return None


def _needs(device_type: str, package: str, kernel: str, install: str) -> Callable[[torch.device], str | None]:
    """The ``unavailable`` check of a backend whose ``kernel`` runs on ``device_type`` and needs ``package``."""

    def unavailable(device: torch.device) -> str | None:
        if device.type != device_type:
            return f"{kernel} on {device_type.upper()} tensors only (got {device.type})"
        if not _installed(package):
            return f"the {package} package is not installed ({install})"
        return None

    return unavailable


@functools.cache
def _installed(package: str) -> bool:
    """Whether ``package`` can be imported; looked up once per process (ALGNet runs ~40 scans per forward)."""
    return importlib.util.find_spec(package) is not None


BACKENDS: dict[str, ScanBackend] = {
    b.name: b
    for b in (
        ScanBackend("reference", _run_reference, _everywhere),
        ScanBackend("chunked", _run_chunked, _everywhere),
        ScanBackend("cpu", _run_cpu, _needs("cpu", "numba", "the numba kernels run", "pip install numba")),
        ScanBackend(
            "mamba_ssm",
            _run_mamba_ssm,
            _needs("cuda", "mamba_ssm", "mamba_ssm's kernel runs", "pip install 'algnet[cuda]'"),
        ),
        ScanBackend(
            "triton",
            _run_triton,
            _needs("cuda", "triton", "the Triton kernel runs", "it comes with CUDA builds of torch"),
        ),
    )
}
AUTO_ORDER: list[str] = ["mamba_ssm", "cpu", "chunked"]
"""Backends tried in this order when none is asked for; the first that can run is used. ``triton`` is not
among them until it has been verified on a GPU."""
UNVERIFIED = {"triton"}
"""Backends whose kernels have not yet run on the hardware they target; using one logs a warning."""

_announced: set[tuple[str, str]] = set()


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend that :func:`selective_scan` uses on ``device``.

    ``backend`` (or else ``$ALGNET_SCAN_BACKEND``) names one; ``None``/``"auto"`` picks the fastest
    available. A named backend that cannot run raises ``RuntimeError``: never a silent fall-back.
    """
    name = backend or os.environ.get(ENV_VAR) or "auto"
    if name == "auto":
        return next(n for n in AUTO_ORDER if BACKENDS[n].unavailable(device) is None)
    if name not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {name!r}; choose from {['auto', *BACKENDS]}")
    reason = BACKENDS[name].unavailable(device)
    if reason is not None:
        raise RuntimeError(f"selective-scan backend {name!r} was asked for but cannot run: {reason}")
    return name


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Run the selective scan; returns (batch, d_inner, L) in the dtype of ``u``. See the module docs.

    On the ``meta`` device (shapes only: cost counting) no backend runs; the result is an empty tensor.
    """
    name = resolve_backend(backend, u.device)
    if u.device.type == "meta":
        return torch.empty_like(u)
    if (name, u.device.type) not in _announced:
        _announced.add((name, u.device.type))
        log.info("selective scan: backend %r on %s", name, u.device.type)
        if name in UNVERIFIED:
            log.warning("selective-scan backend %r has not been verified on a GPU yet; check its output", name)
    return BACKENDS[name].run(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
