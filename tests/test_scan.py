"""The selective-scan backends compute the same function, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import mamba_inputs

from algnet_core import scan as scan_mod
from algnet_core.scan import resolve_backend, selective_scan


def scan_inputs(batch, d_inner, d_state, length, dtype=torch.float32, seed=0, extras=True):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return dict(
        u=randn(batch, d_inner, length),
        # Step sizes are positive: raw values go through softplus when extras are on, else are given so.
        delta=randn(batch, d_inner, length) * 0.5 - 1.0
        if extras
        else torch.rand(batch, d_inner, length, generator=g, dtype=dtype) * 0.3,
        A=-torch.exp(torch.rand(d_inner, d_state, generator=g, dtype=dtype) * 2.5 - 0.5),
        B=randn(batch, d_state, length),
        C=randn(batch, d_state, length),
        D=randn(d_inner) if extras else None,
        z=randn(batch, d_inner, length) if extras else None,
        delta_bias=randn(d_inner) * 0.1 if extras else None,
        delta_softplus=extras,
    )


@pytest.mark.parametrize(
    ("batch", "d_inner", "d_state", "length", "extras"),
    [(1, 4, 2, 1, True), (2, 8, 16, 37, True), (1, 16, 32, 300, False), (3, 5, 7, 1000, True)],
)
def test_chunked_equals_reference(monkeypatch, batch, d_inner, d_state, length, extras):
    monkeypatch.setattr(scan_mod, "CHUNK_ELEMENTS", 64 * batch * d_inner * d_state)  # several chunks
    args = scan_inputs(batch, d_inner, d_state, length, extras=extras)
    ref = selective_scan(**args, backend="reference")
    out = selective_scan(**args, backend="chunked")
    assert out.shape == (batch, d_inner, length) and out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 1e-5


def test_scan_matches_the_recurrence_written_out():
    """One channel, one state, three steps, computed by hand."""
    u = torch.tensor([[[1.0, 2.0, 3.0]]])
    delta = torch.tensor([[[0.5, 1.0, 0.25]]])
    A = torch.tensor([[-2.0]])
    B = torch.tensor([[[1.0, -1.0, 2.0]]])
    C = torch.tensor([[[2.0, 1.0, 0.5]]])
    s0 = 0.5 * 1.0 * 1.0
    s1 = torch.exp(torch.tensor(-2.0)) * s0 + 1.0 * -1.0 * 2.0
    s2 = torch.exp(torch.tensor(-0.5)) * s1 + 0.25 * 2.0 * 3.0
    expected = torch.tensor([2.0 * s0, 1.0 * s1, 0.5 * s2])
    for backend in ("reference", "chunked"):
        out = selective_scan(u, delta, A, B, C, backend=backend)
        assert torch.allclose(out[0, 0], expected, atol=1e-6), backend


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
def test_half_input_computes_in_float32_and_returns_half(backend):
    if scan_mod.BACKENDS[backend].unavailable(torch.device("cpu")):
        pytest.skip(scan_mod.BACKENDS[backend].unavailable(torch.device("cpu")))
    half = {k: v.half() for k, v in mamba_inputs(1, 8, 16, 200).items()}
    exact = selective_scan(**{k: v.float() for k, v in half.items()}, delta_softplus=True, backend="reference")
    out = selective_scan(**half, delta_softplus=True, backend=backend)
    assert out.dtype == torch.float16
    # Computed in float32, then rounded once to float16: within half an ulp (2**-11 relative; measured: 0.41
    # of this bound). Computed in float16, the 200 steps drift: 14.7x the bound, on 15% of the outputs.
    assert ((out.float() - exact).abs() <= exact.abs() * 2**-10 + 1e-4).all()


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_gradcheck_float64(monkeypatch, backend):
    monkeypatch.setattr(scan_mod, "CHUNK_ELEMENTS", 16 * 1 * 2 * 2)  # the smallest chunk: 16 steps
    args = scan_inputs(1, 2, 2, 33, dtype=torch.float64)
    chunks = []
    scan_chunk = scan_mod._scan_chunk
    monkeypatch.setattr(scan_mod, "_scan_chunk", lambda *a: chunks.append(a[1].shape[2]) or scan_chunk(*a))
    selective_scan(**args, backend="chunked")
    assert chunks == [16, 16, 1]  # two full chunks and a one-step tail carry the state across borders
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    tensors = tuple(args[n].requires_grad_() for n in names)

    def f(*ts):
        return selective_scan(**dict(zip(names, ts, strict=True)), delta_softplus=True, backend=backend)

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-5)


def test_chunked_gradients_equal_reference_float32(monkeypatch):
    monkeypatch.setattr(scan_mod, "CHUNK_ELEMENTS", 32 * 2 * 16 * 8)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    grads = {}
    for backend in ("reference", "chunked"):
        args = scan_inputs(2, 16, 8, 200)
        for n in names:
            args[n].requires_grad_()
        out = selective_scan(**args, backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads[backend] = {n: args[n].grad for n in names}
    for n in names:
        ref, got = grads["reference"][n], grads["chunked"][n]
        assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item()), n


def test_reference_is_written_out_with_no_helper_shared_with_the_backends(monkeypatch):
    """One channel and state, three steps, with step bias, softplus, skip and gate, by hand; the helpers of the
    other backends are broken meanwhile, so the oracle cannot share their mistakes."""

    def broken(*args, **kwargs):
        raise AssertionError("the reference used a helper of the backends it checks")

    for helper in ("_compute_dtype", "_discretisation_inputs", "_skip_and_gate"):
        monkeypatch.setattr(scan_mod, helper, broken)
    u, raw, bias, A = [1.0, 2.0, 3.0], [0.3, -1.0, 0.5], 0.2, -2.0
    B, C, D, z = [1.0, -1.0, 2.0], [2.0, 1.0, 0.5], 0.7, [0.5, -1.0, 2.0]
    delta = [math.log1p(math.exp(r + bias)) for r in raw]
    state, expected = 0.0, []
    for t in range(3):
        state = math.exp(delta[t] * A) * state + delta[t] * B[t] * u[t]
        silu = z[t] / (1 + math.exp(-z[t]))
        expected.append((C[t] * state + D * u[t]) * silu)
    out = scan_mod._run_reference(
        *(torch.tensor(v).reshape(1, 1, -1) for v in (u, raw)),
        torch.tensor([[A]]),
        *(torch.tensor(v).reshape(1, 1, -1) for v in (B, C)),
        D=torch.tensor([D]),
        z=torch.tensor(z).reshape(1, 1, -1),
        delta_bias=torch.tensor([bias]),
        delta_softplus=True,
    )
    assert torch.allclose(out[0, 0], torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_package_lookups_are_cached_and_the_environment_is_read_on_every_call(monkeypatch):
    find_spec = scan_mod.importlib.util.find_spec
    looked_up = []
    monkeypatch.setattr(scan_mod.importlib.util, "find_spec", lambda name: looked_up.append(name) or find_spec(name))
    scan_mod._installed.cache_clear()
    monkeypatch.delenv("ALGNET_SCAN_BACKEND", raising=False)
    x = scan_inputs(1, 2, 2, 5)
    for _ in range(40):  # one ALGNet forward's worth of scans
        selective_scan(**x)
    assert sorted(looked_up) == sorted(set(looked_up)) and len(looked_up) <= 3  # once per package at most
    monkeypatch.setenv("ALGNET_SCAN_BACKEND", "reference")
    assert resolve_backend(None, torch.device("cpu")) == "reference"  # an environment change still counts


def test_backend_choice_env_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("ALGNET_SCAN_BACKEND", "reference")
    assert resolve_backend(None, cpu) == "reference"
    assert resolve_backend("chunked", cpu) == "chunked"  # the argument wins over the environment
    monkeypatch.delenv("ALGNET_SCAN_BACKEND")
    assert resolve_backend(None, cpu) != "mamba_ssm"
    with pytest.raises(ValueError, match="unknown selective-scan backend 'fast'"):
        resolve_backend("fast", cpu)
    with pytest.raises(RuntimeError, match="'mamba_ssm' was asked for but cannot run: .*CUDA"):
        resolve_backend("mamba_ssm", cpu)
