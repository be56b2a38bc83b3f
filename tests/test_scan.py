"""The selective-scan backends compute the same function, forward and backward."""

from __future__ import annotations

import pytest
import torch

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


def test_half_input_computes_in_float32_and_returns_half():
    args = scan_inputs(1, 4, 8, 50)
    ref = selective_scan(**args, backend="reference")
    half = {k: v.half() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    half["A"] = args["A"]
    out = selective_scan(**half, backend="chunked")
    assert out.dtype == torch.float16
    assert (out.float() - ref).abs().max().item() < 5e-2


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_gradcheck_float64(monkeypatch, backend):
    monkeypatch.setattr(scan_mod, "CHUNK_ELEMENTS", 4 * 2 * 3 * 2)  # chunks of 4 steps
    args = scan_inputs(2, 3, 2, 11, dtype=torch.float64)
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
