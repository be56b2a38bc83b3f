"""A Triton kernel for the selective scan: the ``triton`` backend of :mod:`algnet_core.scan`, for CUDA GPUs
without ``mamba_ssm``.

UNVERIFIED ON A GPU: it is checked against the reference only in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, ``tests/test_scan_triton.py``), so it is never picked automatically; ask for it
with ``backend="triton"`` or ``ALGNET_SCAN_BACKEND=triton``.

One program scans one (batch, channel) row: it walks the sequence in chunks of ``CHUNK`` steps, and inside a
chunk the recurrence over a (d_state, CHUNK) tile is a parallel ``tl.associative_scan`` of the affine maps
``s -> decay * s + input``; the state crossing from one chunk to the next stays in registers. Step sizes
``softplus(delta + delta_bias)``, the skip ``+ D * u`` and the gate ``* silu(z)`` are fused, so the kernel
reads each input once and writes only y. It computes in float32 whatever the inputs' dtype (y is stored in
u's dtype). Gradients recompute the op with the ``chunked`` backend (first order only).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .scan import needs_grad, selective_scan

CHUNK = 128
"""Steps per tile (a power of two)."""


@triton.jit
def _compose(decay_a, state_a, decay_b, state_b):
    """Apply the affine map a, then b: s -> decay_b * (decay_a * s + state_a) + state_b."""
    return decay_a * decay_b, state_a * decay_b + state_b


@triton.jit
def _scan_kernel(
    u_ptr, delta_ptr, a2_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, y_ptr,
    length, d_inner, d_state,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    N: tl.constexpr, T: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # batch * d_inner + channel; offsets can pass 2**31
    batch, channel = row // d_inner, row % d_inner
    n = tl.arange(0, N)
    t = tl.arange(0, T)
    n_ok = n < d_state
    a2 = tl.load(a2_ptr + channel * d_state + n, mask=n_ok, other=0.0)  # A * log2(e)
    bias = tl.load(bias_ptr + channel).to(tl.float32) if HAS_BIAS else 0.0
    skip = tl.load(d_ptr + channel).to(tl.float32) if HAS_D else 0.0
    state = tl.zeros([N], dtype=tl.float32)
    for t0 in range(0, length, T):
        steps = t0 + t
        ok = steps < length
        dt = tl.load(delta_ptr + row * length + steps, mask=ok, other=0.0).to(tl.float32) + bias
        if SOFTPLUS:  # log1p(exp(dt)) in Kahan's form: exact where 1 + exp(dt) rounds to 1
            e = tl.exp(dt)
            w = 1.0 + e
            dt = tl.where(dt > 20.0, dt, tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0)))
        dt = tl.where(ok, dt, 0.0)  # padded steps: decay 1, input 0, so the state passes through
        u = tl.load(u_ptr + row * length + steps, mask=ok, other=0.0).to(tl.float32)
        bc = batch * d_state * length + n[:, None] * length + steps[None, :]  # (N, T)
        bc_ok = n_ok[:, None] & ok[None, :]
        B = tl.load(b_ptr + bc, mask=bc_ok, other=0.0).to(tl.float32)
        C = tl.load(c_ptr + bc, mask=bc_ok, other=0.0).to(tl.float32)
        decay = tl.exp2(a2[:, None] * dt[None, :])  # (N, T)
        decays, states = tl.associative_scan((decay, B * (dt * u)[None, :]), axis=1, combine_fn=_compose)
        states += decays * state[:, None]  # the state carried in from the previous chunk
        y = tl.sum(states * C, axis=0) + skip * u
        if HAS_Z:
            z = tl.load(z_ptr + row * length + steps, mask=ok, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + row * length + steps, y.to(y_ptr.dtype.element_ty), mask=ok)
        state = tl.sum(tl.where(t[None, :] == T - 1, states, 0.0), axis=1)


def _forward(u, delta, A, B, C, D, z, delta_bias, softplus) -> Tensor:
    u, delta, B, C = (x.contiguous() for x in (u, delta, B, C))
    batch, d_inner, length = u.shape
    d_state = A.shape[1]
    a2 = (A.float() * math.log2(math.e)).contiguous()
    y = torch.empty_like(u)
    z = None if z is None else z.contiguous()
    _scan_kernel[(batch * d_inner,)](
        u, delta, a2, B, C,
        D.float().contiguous() if D is not None else a2, z if z is not None else u,
        delta_bias.float().contiguous() if delta_bias is not None else a2, y,
        length, d_inner, d_state,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        N=triton.next_power_of_2(d_state), T=CHUNK,
    )  # fmt: skip
    return y


class _TritonScan(torch.autograd.Function):
    """Forward with the kernel; backward by recomputing the op with the ``chunked`` backend under autograd."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):  # noqa: ANN001, ANN205
        ctx.softplus = softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        return _forward(u, delta, A, B, C, D, z, delta_bias, softplus)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        inputs = [None if x is None else x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        with torch.enable_grad():
            y = selective_scan(*inputs, delta_softplus=ctx.softplus, backend="chunked")
        wanted = [x for x in inputs if x is not None and x.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, dy))
        return (*(next(grads) if x is not None and x.requires_grad else None for x in inputs), None)


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """``selective_scan_fn`` with the Triton kernel (shapes as in :mod:`algnet_core.scan`); y in u's dtype."""
    if needs_grad(u, delta, A, B, C, D, z, delta_bias):
        return _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
