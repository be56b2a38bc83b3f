"""The numba ``cpu`` selective-scan backend against the reference recurrence, forward and backward."""

import pytest
import torch
from helpers import mamba_inputs

pytest.importorskip("numba")

from algnet_core import scan  # noqa: E402
from algnet_core.scan import BACKENDS, ENV_VAR, resolve_backend, selective_scan  # noqa: E402
from algnet_core.scan_cpu import PARALLEL_MIN_ELEMENTS, TIME_CHUNK  # noqa: E402


@pytest.mark.parametrize(
    ("shape", "options"),
    [
        ((1, 64, 32, 700), {"D", "z", "delta_bias", "softplus"}),  # Mamba's sizes, parallel, 3 time chunks
        ((2, 16, 16, 600), {"D", "softplus"}),  # parallel over the batch
        ((3, 5, 3, 77), {"z", "delta_bias", "softplus"}),  # odd sizes, single-threaded
        ((1, 4, 8, 300), set()),  # the bare recurrence
        ((2, 1, 1, 1), {"D", "z", "delta_bias", "softplus"}),
    ],
)
def test_cpu_matches_reference(shape, options):
    x = mamba_inputs(*shape)
    if "softplus" not in options:
        x["delta"] = torch.nn.functional.softplus(x["delta"])  # a positive step size, as in Mamba
    kwargs = {k: x.pop(k) for k in ("D", "z", "delta_bias")}
    kwargs = {k: v for k, v in kwargs.items() if k in options}
    kwargs["delta_softplus"] = "softplus" in options
    expected = selective_scan(**x, **kwargs, backend="reference")
    got = selective_scan(**x, **kwargs, backend="cpu")
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-5


def test_cpu_matches_reference_with_mamba_init_A():
    x = mamba_inputs(1, 16, 32, 400)
    x["A"] = -torch.arange(1, 33, dtype=torch.float32).repeat(16, 1)  # Mamba's S4D-real initialisation
    expected = selective_scan(**x, delta_softplus=True, backend="reference")
    got = selective_scan(**x, delta_softplus=True, backend="cpu")
    assert (got - expected).abs().max().item() <= 1e-5


def test_cpu_matches_reference_for_tiny_step_sizes():
    # softplus of -20..-10 is 2e-9..5e-5: 1 + exp(x) rounds to 1 in float32, so log(1 + exp(x)) would be 0
    x = mamba_inputs(2, 6, 8, 300)
    x["delta"] = -10.0 - 10.0 * torch.rand(x["delta"].shape, generator=torch.Generator().manual_seed(3))
    del x["D"]  # the skip would dwarf the scan's tiny output
    expected = selective_scan(**x, delta_softplus=True, backend="reference")
    got = selective_scan(**x, delta_softplus=True, backend="cpu")
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_cpu_handles_non_contiguous_inputs():
    x = mamba_inputs(2, 12, 8, 150)
    g = torch.Generator().manual_seed(1)
    x["u"] = torch.randn(2, 150, 12, generator=g).transpose(1, 2)
    x["B"] = torch.randn(2, 8, 300, generator=g)[..., ::2]
    x["A"] = x["A"].t().contiguous().t()
    x["z"] = torch.randn(12, 2, 150, generator=g).permute(1, 0, 2)
    assert not (x["u"].is_contiguous() or x["B"].is_contiguous() or x["A"].is_contiguous())
    expected = selective_scan(**x, delta_softplus=True, backend="reference")
    got = selective_scan(**x, delta_softplus=True, backend="cpu")
    assert (got - expected).abs().max().item() <= 1e-5


def test_cpu_float64_matches_reference_in_float64():
    x = mamba_inputs(2, 6, 4, 300, dtype=torch.float64)
    expected = selective_scan(**x, delta_softplus=True, backend="reference")
    got = selective_scan(**x, delta_softplus=True, backend="cpu")
    assert got.dtype == torch.float64
    assert (got - expected).abs().max().item() <= 1e-12


def test_cpu_keeps_the_references_non_finite_values():
    x = mamba_inputs(1, 4, 4, 50)
    x["A"] = x["A"].abs() * 30  # exp(delta * A) overflows to inf: a diverging scan, as in the reference
    x["u"][0, 1, 7] = float("nan")
    expected = selective_scan(**x, delta_softplus=True, backend="reference")
    got = selective_scan(**x, delta_softplus=True, backend="cpu")
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf())
    assert got.isnan().any() and not got.isfinite().all()
    finite = expected.isfinite()
    assert torch.allclose(got[finite], expected[finite], rtol=1e-5, atol=1e-5)


def test_cpu_is_auto_selected_on_cpu_only(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(None, torch.device("cpu")) == "cpu"
    assert "CPU" in BACKENDS["cpu"].unavailable(torch.device("meta"))
    assert resolve_backend(None, torch.device("meta")) == "chunked"


def test_cpu_unavailable_without_numba(monkeypatch):
    installed = scan._installed
    monkeypatch.setattr(scan, "_installed", lambda package: package != "numba" and installed(package))
    assert "pip install numba" in BACKENDS["cpu"].unavailable(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="numba"):
        resolve_backend("cpu", torch.device("cpu"))


@pytest.mark.parametrize(
    "options",
    [{"D", "z", "delta_bias", "softplus"}, set(), {"D", "softplus"}, {"z", "delta_bias"}],
    ids=["all", "bare", "skip-softplus", "gate-bias"],
)
def test_cpu_gradcheck_float64(options):
    # the backward kernel computes the step-size, skip and gate epilogues itself: each one on and off
    x = mamba_inputs(2, 3, 2, 9, dtype=torch.float64)
    if "softplus" not in options:
        x["delta"] = torch.nn.functional.softplus(x["delta"])
    names = [k for k in x if k not in {"D", "z", "delta_bias"} - options]
    tensors = [x[k].requires_grad_() for k in names]

    def scan_fn(*args):
        kwargs = dict(zip(names, args, strict=True))
        return selective_scan(**kwargs, delta_softplus="softplus" in options, backend="cpu")

    assert torch.autograd.gradcheck(scan_fn, tensors)


def test_cpu_gradients_match_chunked_float32():
    # 32 channels x 16 states x 600 steps: parallel channel groups and three checkpointed time chunks.
    shape = (1, 32, 16, 600)
    assert shape[0] * shape[1] * shape[2] * shape[3] >= PARALLEL_MIN_ELEMENTS and shape[3] > 2 * TIME_CHUNK
    grads = {}
    for backend in ("chunked", "cpu"):
        x = {k: v.requires_grad_() for k, v in mamba_inputs(*shape).items()}
        y = selective_scan(**x, delta_softplus=True, backend=backend)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        grads[backend] = {k: v.grad for k, v in x.items()}
    for name, expected in grads["chunked"].items():
        got = grads["cpu"][name]
        assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item(), name


def test_cpu_backward_refuses_double_backward():
    x = {k: v.requires_grad_() for k, v in mamba_inputs(1, 2, 2, 5, dtype=torch.float64).items()}
    weights = torch.rand(1, 2, 5, dtype=torch.float64, requires_grad=True)  # a differentiable output grad
    y = selective_scan(**x, backend="cpu")
    (grad_u,) = torch.autograd.grad((y * weights).sum(), x["u"], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        grad_u.sum().backward()
