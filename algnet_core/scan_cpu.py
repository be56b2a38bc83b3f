"""Compiled CPU kernels (numba) for the selective scan: the ``cpu`` backend of :mod:`algnet_core.scan`.

The recurrence is the one of ``scan.py``; the work is split over (batch, group of channels) items run in
parallel, and every item walks the sequence in chunks of ``TIME_CHUNK`` steps so that the chunk of ``B``
and ``C`` (transposed into a small buffer, shared by the channels of the group) stays in cache. The loop
over the state dimension is vectorised by LLVM: ``exp`` in float32 is a Cody-Waite range reduction
``2**k * p(r)`` with a degree-7 polynomial (relative error < 3e-7), written so that it vectorises (libm's
``expf`` does not); float64 uses libm's ``exp``.

The backward pass keeps the state at every chunk start in the forward pass, recomputes the chunk's states
from it and runs the adjoint recurrence backwards in time::

    g[t] = C[:, t] * dy[t] + exp(delta[t+1] * A) * g[t+1]
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

TIME_CHUNK = 256
"""Steps per chunk: the cache block of the kernels and the checkpoint interval of the backward pass."""
PARALLEL_MIN_ELEMENTS = 1 << 18
"""Problems with fewer (position, channel, state) elements than this run single-threaded."""

_F32 = np.float32
_LOG2E = _F32(1.4426950408889634)
_LN2_HI = _F32(0.693359375)
_LN2_LO = _F32(-2.12194440e-4)
# exp(-42) ~ 5.7e-19 is the smallest decay used (as scan.DECAY_FLOOR): it keeps decay * state normal
# (subnormal arithmetic is ~100x slower) at an error far below float32 rounding of the state.
_EXP_MIN = _F32(-42.0)
_EXP_MAX = _F32(89.0)  # beyond exp(88.7) = inf: here 2**k is inf, no wrapped exponent bits
_HALF = _F32(0.5)
_ONE = _F32(1.0)
# the polynomial of Cephes' expf: exp(r) ~ 1 + r + r**2 * P(r) on |r| <= ln(2) / 2
_P0, _P1, _P2 = _F32(1.9875691500e-4), _F32(1.3981999507e-3), _F32(8.3334519073e-3)
_P3, _P4, _P5 = _F32(4.1665795894e-2), _F32(1.6666665459e-1), _F32(5.0000001201e-1)

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


def _exp(x):
    """``exp`` that vectorises for float32 inside the kernels (numba overload below)."""
    return math.exp(x)


@overload(_exp, inline="always", fastmath=_FASTMATH)
def _exp_overload(x):
    if x == types.float32:

        def exp32(x):
            x = min(max(x, _EXP_MIN), _EXP_MAX)
            k = np.floor(x * _LOG2E + _HALF)
            r = x - k * _LN2_HI - k * _LN2_LO
            p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
            p = p * r * r + r + _ONE
            return p * _int_bits_as_float32((np.int32(k) + 127) << 23)

        return exp32
    return lambda x: math.exp(x)


@njit(fastmath=_FASTMATH, cache=True)
def _load_transposed(src, b, t0, t1, dst):
    """dst[t - t0, k] = src[b, k, t] for t in [t0, t1)."""
    for k in range(src.shape[1]):
        for t in range(t0, t1):
            dst[t - t0, k] = src[b, k, t]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _forward_kernel(u, delta, A, B, C, y, starts, n_groups, chunk):
    """y[b, d, t] = sum_n C[b, n, t] s[b, d, n](t); stores the state before each chunk in ``starts``
    (batch, d_inner, n_chunks, d_state) when it has n_chunks > 0."""
    batch, d_inner, length = u.shape
    d_state = A.shape[1]
    size = (d_inner + n_groups - 1) // n_groups
    save = starts.shape[2] > 0
    zero = A.dtype.type(0)
    for item in prange(batch * n_groups):
        b = item // n_groups
        d0 = (item % n_groups) * size
        d1 = min(d_inner, d0 + size)
        state = np.zeros((max(d1 - d0, 0), d_state), dtype=A.dtype)
        Bt = np.empty((chunk, d_state), dtype=A.dtype)
        Ct = np.empty((chunk, d_state), dtype=A.dtype)
        for t0 in range(0, length, chunk):
            t1 = min(length, t0 + chunk)
            _load_transposed(B, b, t0, t1, Bt)
            _load_transposed(C, b, t0, t1, Ct)
            for d in range(d0, d1):
                s = state[d - d0]
                a = A[d]
                if save:
                    starts[b, d, t0 // chunk] = s
                for t in range(t0, t1):
                    dt = delta[b, d, t]
                    du = dt * u[b, d, t]
                    bt = Bt[t - t0]
                    ct = Ct[t - t0]
                    acc = zero
                    for n in range(d_state):
                        sn = _exp(dt * a[n]) * s[n] + du * bt[n]
                        s[n] = sn
                        acc += sn * ct[n]
                    y[b, d, t] = acc


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _backward_kernel(u, delta, A, B, C, dy, starts, n_groups, chunk, du, ddelta, dA, dB, dC):
    """Gradients of sum(y * dy). du, ddelta: (batch, d_inner, L); dA: per batch (batch, d_inner, d_state);
    dB, dC: per channel group (n_groups, batch, d_state, L). ``starts`` as saved by the forward kernel."""
    batch, d_inner, length = u.shape
    d_state = A.shape[1]
    size = (d_inner + n_groups - 1) // n_groups
    zero = A.dtype.type(0)
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
        for c in range((length + chunk - 1) // chunk - 1, -1, -1):
            t0 = c * chunk
            t1 = min(length, t0 + chunk)
            _load_transposed(B, b, t0, t1, Bt)
            _load_transposed(C, b, t0, t1, Ct)
            dBt[:] = 0
            dCt[:] = 0
            for d in range(d0, d1):
                a = A[d]
                states[0] = starts[b, d, c]
                for t in range(t0, t1):
                    i = t - t0
                    dt = delta[b, d, t]
                    du_t = dt * u[b, d, t]
                    for n in range(d_state):
                        e = _exp(dt * a[n])
                        decay[i, n] = e
                        states[i + 1, n] = e * states[i, n] + du_t * Bt[i, n]
                g_next = carry[d - d0]
                da = dA[b, d]
                for t in range(t1 - 1, t0 - 1, -1):
                    i = t - t0
                    dt = delta[b, d, t]
                    u_t = u[b, d, t]
                    dy_t = dy[b, d, t]
                    gb = zero  # sum_n g[n] B[n]
                    gsa = zero  # sum_n g[n] s(t-1)[n] exp(dt A[n]) A[n]
                    for n in range(d_state):
                        g = g_next[n] + Ct[i, n] * dy_t
                        dCt[i, n] += dy_t * states[i + 1, n]
                        dBt[i, n] += g * dt * u_t
                        gb += g * Bt[i, n]
                        w = g * states[i, n] * decay[i, n]
                        gsa += w * a[n]
                        da[n] += w * dt
                        g_next[n] = g * decay[i, n]
                    du[b, d, t] = dt * gb
                    ddelta[b, d, t] = u_t * gb + gsa
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


def _forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, save_states: bool) -> tuple[Tensor, Tensor]:
    batch, d_inner, length = u.shape
    n_chunks = -(-length // TIME_CHUNK) if save_states else 0
    y = u.new_empty(batch, d_inner, length)
    starts = u.new_empty(batch, d_inner, n_chunks, A.shape[1])
    arrays = [t.detach().numpy() for t in (u, delta, A, B, C, y, starts)]
    with _LOCK:
        _forward_kernel(*arrays, _launch(batch, d_inner, length, A.shape[1]), TIME_CHUNK)
    return y, starts


class _SelectiveScan(torch.autograd.Function):
    """The scan without skip and gate: (u, delta, A, B, C) -> y, with the kernels' exact backward."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        y, starts = _forward(u, delta, A, B, C, save_states=True)
        ctx.save_for_backward(u, delta, A, B, C, starts)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        u, delta, A, B, C, starts = ctx.saved_tensors
        batch, d_inner, length = u.shape
        d_state = A.shape[1]
        groups = _launch(batch, d_inner, length, d_state)
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dA = u.new_zeros(batch, d_inner, d_state)
        dB = u.new_empty(groups, batch, d_state, length)
        dC = u.new_empty(groups, batch, d_state, length)
        arrays = [t.detach().numpy() for t in (u, delta, A, B, C, dy.to(u.dtype).contiguous(), starts)]
        with _LOCK:
            _backward_kernel(*arrays, groups, TIME_CHUNK, *(t.numpy() for t in (du, ddelta, dA, dB, dC)))
        return du, ddelta, dA.sum(0), dB.sum(0), dC.sum(0)


def selective_scan_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """The scan of CPU tensors in their (float32 or float64) dtype, differentiable. u, delta: (batch,
    d_inner, L), A: (d_inner, d_state), B, C: (batch, d_state, L); delta already biased and softplus-ed."""
    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C)):
        return _SelectiveScan.apply(u, delta, A, B, C)
    return _forward(u, delta, A, B, C, save_states=False)[0]
