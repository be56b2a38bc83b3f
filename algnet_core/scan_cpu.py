"""Compiled CPU kernels (numba) for the selective scan: the ``cpu`` backend of :mod:`algnet_core.scan`.

One kernel does the whole op of ``selective_scan_fn``: step sizes ``softplus(delta + delta_bias)``, the
recurrence, the skip ``+ D * u`` and the gate ``* silu(z)``, so that no (batch, d_inner, L) intermediate
passes through memory. The work is split over (batch, group of channels) items run in parallel, and every
item walks the sequence in chunks of ``TIME_CHUNK`` steps so that the chunk of ``B`` and ``C`` (transposed
into a small buffer, shared by the channels of the group) stays in cache.

The loops over the state dimension and over a chunk's steps are vectorised by LLVM. In float32 the
exponentials are ``2**x = 2**k * p(x - k)`` with ``A`` pre-scaled by log2(e), a degree-5 polynomial whose
constant term is exact (relative error < 3e-7, and exact as ``x -> 0``, where decays near 1 compound over
many steps), and ``log1p`` for the softplus is an atanh series; libm's ``expf``/``log1pf`` would not
vectorise. Rounding ``x * log2(e)`` in float32 leaves softplus and silu within ~4e-6 relative of torch's
(torch: ~2e-7), and softplus never goes below 2**-60 (an absolute error under 1e-18). float64 uses libm.

The backward pass keeps the state at every chunk start in the forward pass, recomputes the chunk's states
from it and runs the adjoint recurrence backwards in time::

    g[t] = C[:, t] * dy[t] + exp(delta[t+1] * A) * g[t+1]

The gradients of the step-size, skip and gate epilogues are elementwise and computed with torch.
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload
from torch import Tensor
from torch.autograd.function import once_differentiable

from .scan import needs_grad

TIME_CHUNK = 256
"""Steps per chunk: the cache block of the kernels and the checkpoint interval of the backward pass."""
PARALLEL_MIN_ELEMENTS = 1 << 18
"""Problems with fewer (position, channel, state) elements than this run single-threaded."""

_F32 = np.float32
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# 2**-60 ~ 8.7e-19 is the smallest decay used (as in scan.DECAY_FLOOR): it keeps decay * state normal
# (subnormal arithmetic is ~100x slower) at an error far below float32 rounding of the state.
_EXP2_MIN = _F32(-60.0)
_EXP2_MAX = _F32(128.0)  # from x = 127.5 on, 2**k = 2**128 = inf: never wrapped exponent bits
_HALF, _ONE, _TWO = _F32(0.5), _F32(1.0), _F32(2.0)
# 2**r ~ 1 + r * q(r) on |r| <= 1/2: q is a degree-4 fit of (2**r - 1) / r weighted for relative error
_Q0, _Q1, _Q2 = _F32(0.69314694), _F32(0.24022318), _F32(0.05550834)
_Q3, _Q4 = _F32(0.00966675), _F32(0.0013217)
_LOG2E_F32 = _F32(_LOG2E)

# LLVM fast-math without "no NaNs / no infinities": reductions may be reordered and multiply-adds fused,
# but a NaN or infinity in the inputs still reaches the output, as in the reference.
_FASTMATH = {"contract", "reassoc", "nsz", "arcp", "afn"}

# numba's worker pool must not be entered from two Python threads at once (workqueue layer).
_LOCK = threading.Lock()


@intrinsic
def _int_bits_as_float32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (vectorisable, unlike ``math.ldexp``)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


def _exp2(x):
    """``2**x``, vectorisable for float32 inside the kernels (numba overload below)."""
    return math.exp(x * _LN2)


@overload(_exp2, inline="always", fastmath=_FASTMATH)
def _exp2_overload(x):
    if x == types.float32:

        def exp2_32(x):
            x = min(max(x, _EXP2_MIN), _EXP2_MAX)
            k = np.floor(x + _HALF)
            r = x - k
            p = _ONE + r * ((((_Q4 * r + _Q3) * r + _Q2) * r + _Q1) * r + _Q0)
            return p * _int_bits_as_float32((np.int32(k) + 127) << 23)

        return exp2_32
    return lambda x: math.exp(x * _LN2)


def _softplus(x):
    """``log(1 + exp(x))``, vectorisable for float32 inside the kernels (numba overload below)."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


@overload(_softplus, inline="always", fastmath=_FASTMATH)
def _softplus_overload(x):
    if x == types.float32:

        def softplus32(x):
            v = _exp2(-abs(x) * _LOG2E_F32)  # (0, 1]
            s = v / (v + _TWO)  # log1p(v) = 2 atanh(s), s in (0, 1/3]: the series below is exact to 5e-9
            s2 = s * s
            series = ((_F32(1 / 13) * s2 + _F32(1 / 11)) * s2 + _F32(1 / 9)) * s2 + _F32(1 / 7)
            series = ((series * s2 + _F32(1 / 5)) * s2 + _F32(1 / 3)) * s2 + _ONE
            return max(x, _F32(0)) + _TWO * s * series

        return softplus32
    return lambda x: max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _silu(z):
    """``z * sigmoid(z)``, vectorisable for float32 inside the kernels (numba overload below)."""
    return z / (1.0 + math.exp(-z))


@overload(_silu, inline="always", fastmath=_FASTMATH)
def _silu_overload(z):
    if z == types.float32:
        return lambda z: z / (_ONE + _exp2(-z * _LOG2E_F32))
    return lambda z: z / (1.0 + math.exp(-z))


def _sigmoid(x):
    """``1 / (1 + exp(-x))``, vectorisable for float32 inside the kernels (numba overload below)."""
    return 1.0 / (1.0 + math.exp(-x))


@overload(_sigmoid, inline="always", fastmath=_FASTMATH)
def _sigmoid_overload(x):
    if x == types.float32:
        return lambda x: _ONE / (_ONE + _exp2(-x * _LOG2E_F32))
    return lambda x: 1.0 / (1.0 + math.exp(-x))


@njit(fastmath=_FASTMATH, cache=True)
def _load_transposed(src, b, t0, t1, dst):
    """dst[t - t0, k] = src[b, k, t] for t in [t0, t1)."""
    for k in range(src.shape[1]):
        for t in range(t0, t1):
            dst[t - t0, k] = src[b, k, t]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _forward_kernel(u, delta, delta_bias, softplus, A2, B, C, D, z, y, ungated, starts, n_groups, chunk):
    """The fused op, ``y = (scan + D * u) * silu(z)``, with A2 = A * log2(e). Arrays of size 0 stand for
    absent inputs (``delta_bias``, ``D``, ``z``) and outputs: ``ungated`` receives ``scan + D * u`` and
    ``starts`` (batch, d_inner, n_chunks, d_state) the state before each chunk, for the backward pass."""
    batch, d_inner, length = u.shape
    d_state = A2.shape[1]
    size = (d_inner + n_groups - 1) // n_groups
    has_bias, has_d, gate = delta_bias.shape[0] > 0, D.shape[0] > 0, z.shape[2] > 0
    keep, save = ungated.shape[2] > 0, starts.shape[2] > 0
    zero = A2.dtype.type(0)
    for item in prange(batch * n_groups):
        b = item // n_groups
        d0 = (item % n_groups) * size
        d1 = min(d_inner, d0 + size)
        state = np.zeros((max(d1 - d0, 0), d_state), dtype=A2.dtype)
        Bt = np.empty((chunk, d_state), dtype=A2.dtype)
        Ct = np.empty((chunk, d_state), dtype=A2.dtype)
        steps = np.empty(chunk, dtype=A2.dtype)
        out = np.empty(chunk, dtype=A2.dtype)
        for t0 in range(0, length, chunk):
            t1 = min(length, t0 + chunk)
            _load_transposed(B, b, t0, t1, Bt)
            _load_transposed(C, b, t0, t1, Ct)
            for d in range(d0, d1):
                s = state[d - d0]
                a = A2[d]
                if save:
                    starts[b, d, t0 // chunk] = s
                bias = delta_bias[d] if has_bias else zero
                for i in range(t1 - t0):
                    steps[i] = delta[b, d, t0 + i] + bias
                if softplus:
                    for i in range(t1 - t0):
                        steps[i] = _softplus(steps[i])
                for i in range(t1 - t0):
                    dt = steps[i]
                    du = dt * u[b, d, t0 + i]
                    bt = Bt[i]
                    ct = Ct[i]
                    acc = zero
                    for n in range(d_state):
                        sn = _exp2(dt * a[n]) * s[n] + du * bt[n]
                        s[n] = sn
                        acc += sn * ct[n]
                    out[i] = acc
                if has_d:
                    skip = D[d]
                    for i in range(t1 - t0):
                        out[i] += skip * u[b, d, t0 + i]
                if keep:
                    ungated[b, d, t0:t1] = out[: t1 - t0]
                if gate:
                    for i in range(t1 - t0):
                        out[i] *= _silu(z[b, d, t0 + i])
                y[b, d, t0:t1] = out[: t1 - t0]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _backward_kernel(
    u, delta, delta_bias, softplus, A, A2, B, C, D, z, ungated, dy, starts, n_groups, chunk,
    du, ddelta, dA, dB, dC, dD, dz, dbias,
):  # fmt: skip
    """Gradients of sum(y * dy) for the fused op of the forward kernel (same inputs; A2 = A * log2(e)).
    du, ddelta, dz: (batch, d_inner, L); per batch element: dA (batch, d_inner, d_state), dD, dbias (batch,
    d_inner); per channel group: dB, dC (n_groups, batch, d_state, L). ``starts`` as saved by the forward
    kernel, ``ungated`` its ``scan + D * u`` (read only with ``z``)."""
    batch, d_inner, length = u.shape
    d_state = A.shape[1]
    size = (d_inner + n_groups - 1) // n_groups
    has_bias, has_d, gate = delta_bias.shape[0] > 0, D.shape[0] > 0, z.shape[2] > 0
    zero, one = A.dtype.type(0), A.dtype.type(1)
    for item in prange(batch * n_groups):
        b = item // n_groups
        group = item % n_groups
        d0 = group * size
        d1 = min(d_inner, d0 + size)
        carry = np.zeros((max(d1 - d0, 0), d_state), dtype=A.dtype)  # exp(delta[t+1] A) * g[t+1]
        Bt = np.empty((chunk, d_state), dtype=A.dtype)
        Ct = np.empty((chunk, d_state), dtype=A.dtype)
        dBt = np.empty((chunk, d_state), dtype=A.dtype)
        dCt = np.empty((chunk, d_state), dtype=A.dtype)
        states = np.empty((chunk + 1, d_state), dtype=A.dtype)  # states[i] = s(t0 + i - 1)
        decay = np.empty((chunk, d_state), dtype=A.dtype)
        adj = np.empty((chunk, d_state), dtype=A.dtype)  # g[t0 + i]
        steps = np.empty(chunk, dtype=A.dtype)  # the step sizes
        slope = np.empty(chunk, dtype=A.dtype)  # d steps / d delta
        dscan = np.empty(chunk, dtype=A.dtype)  # d loss / d (scan + D * u)
        for c in range((length + chunk - 1) // chunk - 1, -1, -1):
            t0 = c * chunk
            t1 = min(length, t0 + chunk)
            _load_transposed(B, b, t0, t1, Bt)
            _load_transposed(C, b, t0, t1, Ct)
            dBt[:] = 0
            dCt[:] = 0
            for d in range(d0, d1):
                a, a2 = A[d], A2[d]
                bias = delta_bias[d] if has_bias else zero
                skip = D[d] if has_d else zero
                for i in range(t1 - t0):  # the epilogues: step sizes and the gate
                    t = t0 + i
                    raw = delta[b, d, t] + bias
                    steps[i] = _softplus(raw) if softplus else raw
                    slope[i] = _sigmoid(raw) if softplus else one
                    if gate:  # y = ungated * silu(z)
                        zt = z[b, d, t]
                        sig = _sigmoid(zt)
                        dz[b, d, t] = dy[b, d, t] * ungated[b, d, t] * sig * (one + zt * (one - sig))
                        dscan[i] = dy[b, d, t] * zt * sig
                    else:
                        dscan[i] = dy[b, d, t]
                states[0] = starts[b, d, c]
                for i in range(t1 - t0):  # the chunk's states again, from its first
                    dtu = steps[i] * u[b, d, t0 + i]
                    for n in range(d_state):
                        e = _exp2(steps[i] * a2[n])
                        decay[i, n] = e
                        states[i + 1, n] = e * states[i, n] + dtu * Bt[i, n]
                g_next = carry[d - d0]
                for i in range(t1 - t0 - 1, -1, -1):  # the adjoint recurrence alone: no reductions
                    for n in range(d_state):
                        g = g_next[n] + Ct[i, n] * dscan[i]
                        adj[i, n] = g
                        g_next[n] = g * decay[i, n]
                da = dA[b, d]
                dd = zero
                db = zero
                for i in range(t1 - t0):  # independent steps: their reductions overlap
                    t = t0 + i
                    dt = steps[i]
                    u_t = u[b, d, t]
                    dtu = dt * u_t
                    gb = zero  # sum_n g[n] B[n]
                    gsa = zero  # sum_n g[n] s(t-1)[n] exp(dt A[n]) A[n]
                    for n in range(d_state):
                        g = adj[i, n]
                        dCt[i, n] += dscan[i] * states[i + 1, n]
                        dBt[i, n] += g * dtu
                        gb += g * Bt[i, n]
                        w = g * states[i, n] * decay[i, n]
                        gsa += w * a[n]
                        da[n] += w * dt
                    du[b, d, t] = dt * gb + skip * dscan[i]
                    dd += dscan[i] * u_t
                    ddelta[b, d, t] = (u_t * gb + gsa) * slope[i]
                    db += ddelta[b, d, t]
                dD[b, d] += dd
                dbias[b, d] += db
            for n in range(d_state):
                for t in range(t0, t1):
                    dB[group, b, n, t] = dBt[t - t0, n]
                    dC[group, b, n, t] = dCt[t - t0, n]


def _launch(batch: int, d_inner: int, length: int, d_state: int) -> int:
    """Set numba's thread count for one kernel call and return the channel groups per batch element:
    enough (batch, group) items to keep every thread busy. Small problems run on the calling thread,
    where waking the worker pool would cost more than the scan."""
    if batch * d_inner * length * d_state < PARALLEL_MIN_ELEMENTS:
        threads = 1
    else:
        threads = max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads()))
    numba.set_num_threads(threads)
    return max(1, min(d_inner, -(-threads // batch)))


def _or_empty(u: Tensor, delta_bias: Tensor | None, D: Tensor | None, z: Tensor | None) -> tuple[Tensor, ...]:
    """The optional inputs as the kernels take them: an absent one is an array of size 0 of its rank."""
    return tuple(u.new_empty((0,) * rank) if t is None else t for t, rank in ((delta_bias, 1), (D, 1), (z, 3)))


def _forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    softplus: bool,
    for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the fused forward kernel: y, plus (for the backward pass) ``scan + D * u`` and the chunk states."""
    batch, d_inner, length = u.shape
    d_state = A.shape[1]
    y = u.new_empty(batch, d_inner, length)
    ungated = u.new_empty(batch, d_inner, length) if for_backward and z is not None else u.new_empty(0, 0, 0)
    starts = u.new_empty(batch, d_inner, -(-length // TIME_CHUNK) if for_backward else 0, d_state)
    bias, skip, gate = _or_empty(u, delta_bias, D, z)
    arrays = [t.detach().numpy() for t in (u, delta, bias)]
    arrays += [softplus] + [t.detach().numpy() for t in (A * _LOG2E, B, C, skip, gate, y, ungated, starts)]
    with _LOCK:
        _forward_kernel(*arrays, _launch(batch, d_inner, length, d_state), TIME_CHUNK)
    return y, ungated, starts


class _SelectiveScan(torch.autograd.Function):
    """``selective_scan_fn``'s op with the forward kernel and an exact backward (kernel + torch epilogues)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):  # noqa: ANN001, ANN205
        y, ungated, starts = _forward(u, delta, A, B, C, D, z, delta_bias, softplus, for_backward=True)
        ctx.softplus = softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ungated, starts)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias, ungated, starts = ctx.saved_tensors
        batch, d_inner, length = u.shape
        d_state = A.shape[1]
        groups = _launch(batch, d_inner, length, d_state)
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(u) if z is not None else u.new_empty(0, 0, 0)
        dA = u.new_zeros(batch, d_inner, d_state)
        dB = u.new_empty(groups, batch, d_state, length)
        dC = u.new_empty(groups, batch, d_state, length)
        dD, dbias = u.new_zeros(batch, d_inner), u.new_zeros(batch, d_inner)
        bias, skip, gate = _or_empty(u, delta_bias, D, z)
        arrays = [t.detach().numpy() for t in (u, delta, bias)] + [ctx.softplus]
        arrays += [t.detach().numpy() for t in (A, A * _LOG2E, B, C, skip, gate, ungated, dy.to(u.dtype).contiguous())]
        arrays += [starts.numpy(), groups, TIME_CHUNK]
        arrays += [t.numpy() for t in (du, ddelta, dA, dB, dC, dD, dz, dbias)]
        with _LOCK:
            _backward_kernel(*arrays)
        wants_dD, wants_dz, wants_dbias = ctx.needs_input_grad[5:8]
        return (
            du,
            ddelta,
            dA.sum(0),
            dB.sum(0),
            dC.sum(0),
            dD.sum(0) if wants_dD else None,
            dz if wants_dz else None,
            dbias.sum(0) if wants_dbias else None,
            None,
        )


def selective_scan_cpu(
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
    """``selective_scan_fn`` on CPU tensors that share one dtype (float32 or float64), differentiable.

    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L); D, delta_bias:
    (d_inner,). Returns ``(scan + D * u) * silu(z)`` with step sizes ``softplus(delta + delta_bias)``.
    """
    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    D, z, delta_bias = (None if t is None else t.contiguous() for t in (D, z, delta_bias))
    if needs_grad(u, delta, A, B, C, D, z, delta_bias):
        return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, for_backward=False)[0]
