"""The network is the authors' network: same state dict, same outputs, any input size."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, randomise, require_shared
from safetensors.torch import load_file

from algnet_core import PRESETS, ALGNet
from algnet_core.algblock import ALGBlock
from algnet_core.clgf import box_average


@pytest.mark.parametrize(
    ("preset", "manifest"),
    [("ALGNet", "official_state_dict_algnet32.json"), ("ALGNet-B", "official_state_dict_algnet64.json")],
)
def test_state_dict_matches_official_manifest(shared, preset, manifest):
    official = json.loads((shared / "reference" / manifest).read_text())
    with torch.device("meta"):
        model = ALGNet(**PRESETS[preset])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: v["shape"] for k, v in official["state_dict"].items()}
    assert list(ours) == list(theirs)  # same keys, same order
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == official["total_parameters"]


def test_preset_parameter_counts():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in ALGNet(**cfg).parameters()) for name, cfg in PRESETS.items()}
    assert counts["ALGNet"] == 54_642_252
    assert counts["ALGNet-B"] == 213_823_628
    assert counts["ALGNet-v1"] == 37_697_676
    assert counts["ALGNet-S"] < 6_000_000  # < 25 MB in float32: ships inside the wheel


@pytest.mark.parametrize("backend", ["cpu", "chunked", "reference"])
def test_golden_outputs_of_official_code(shared, monkeypatch, backend):
    golden = shared / "reference" / "golden_tiny"
    config = json.loads((golden / "config.json").read_text())["constructor_kwargs"]
    model = ALGNet(**config).eval()
    model.load_state_dict(load_file(golden / "official_weights.safetensors"), strict=True)
    x = load_file(golden / "input.safetensors")["input"]
    expected = load_file(golden / "outputs.safetensors")
    monkeypatch.setenv("ALGNET_SCAN_BACKEND", backend)
    with torch.no_grad():
        outputs = model(x, return_all_scales=True)
    for name, out in zip(["out_1_8", "out_1_4", "out_1_2", "out_full"], outputs, strict=True):
        assert out.shape == expected[name].shape
        assert (out - expected[name]).abs().max().item() < 1e-4, name


def test_first_block_intermediates(shared):
    golden = shared / "reference" / "golden_tiny"
    model = ALGNet(**TINY).eval()
    model.load_state_dict(load_file(golden / "official_weights.safetensors"), strict=True)
    mid = load_file(golden / "intermediates.safetensors")
    block = model.encoders[0][0]
    with torch.no_grad():
        s = block.sg(block.conv2(block.conv1(block.norm1(mid["enc0_blk0_input"]))))
        assert torch.allclose(s, mid["enc0_blk0_branch_input"], atol=1e-5)
        assert torch.allclose(block.g_layer(s), mid["enc0_blk0_global_out"], atol=1e-5)
        assert torch.allclose(block.l_layer(s), mid["enc0_blk0_local_out"], atol=1e-5)
        assert torch.allclose(block(mid["enc0_blk0_input"]), mid["enc0_blk0_output"], atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (2, 3, 16, 16), (3, 3, 50, 70), (1, 3, 1, 1)])
def test_any_size_comes_back_at_input_size(tiny_model, shape):
    x = torch.rand(shape)
    with torch.no_grad():
        y = tiny_model(x)
        scales = tiny_model(x, return_all_scales=True)
    assert y.shape == x.shape and y.dtype == x.dtype
    h, w = shape[-2:]
    assert [s.shape[-2:] for s in scales] == [(-(-h // f), -(-w // f)) for f in (8, 4, 2, 1)]
    assert torch.equal(scales[-1], y)


def test_batch_equals_single_images_and_eval_is_deterministic(tiny_model):
    x = torch.rand(3, 3, 40, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batch = tiny_model(x)
        singles = torch.cat([tiny_model(x[i : i + 1]) for i in range(3)])
        again = tiny_model(x)
    assert torch.allclose(batch, singles, atol=5e-5)  # batched BLAS sums in another order
    assert torch.equal(batch, again)


def test_padding_is_invisible_inside_the_image(tiny_model):
    """Cropping back returns the same pixels the official (uncropped) forward computes there."""
    x = torch.rand(1, 3, 40, 56)
    padded = torch.nn.functional.pad(x, (0, 8, 0, 8))
    with torch.no_grad():
        assert torch.equal(tiny_model(x), tiny_model(padded)[..., :40, :56])


def test_fresh_model_starts_as_identity_blocks():
    """Official init: every ALGBlock's branch and FFN scales are zero, so each block is the identity."""
    block = ALGBlock(8)
    x = torch.randn(2, 8, 12, 12)
    assert torch.equal(block(x), x)


@pytest.mark.parametrize(
    ("branches", "aggregation", "absent", "present"),
    [
        (
            "both",
            "fa",
            [],
            ["gamma", "inside_all", "conv3_2.weight", "g_layer.norm.weight", "l_layer.conv1.weight"],
        ),
        ("both", "sum", ["inside_all", "gamma", "conv3_2.weight"], ["lamb_g", "lamb_l"]),
        ("both", "concat", ["inside_all", "lamb_l"], ["conv3_2.weight", "lamb_g"]),
        ("global", "fa", ["lamb_l", "l_layer.conv1.weight", "inside_all"], ["g_layer.norm.weight"]),
        ("local", "fa", ["lamb_g", "g_layer.norm.weight", "inside_all"], ["l_layer.conv1.weight"]),
    ],
)
def test_ablation_variants(branches, aggregation, absent, present):
    model = randomise(ALGNet(**TINY, branches=branches, aggregation=aggregation)).eval()
    keys = {k.removeprefix("encoders.0.0.") for k in model.state_dict() if k.startswith("encoders.0.0.")}
    assert not keys & set(absent)
    assert set(present) <= keys
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize(
    ("branches", "aggregation"),
    [("both", "fa"), ("both", "sum"), ("both", "concat"), ("global", "fa"), ("local", "fa")],
)
def test_ablations_equal_their_branches_composed_by_hand(branches, aggregation):
    """F_A of each ablation from its branches' outputs, then X + F_A and the gated FFN (module docs)."""
    block = randomise(ALGBlock(8, branches, aggregation), seed=1).double()
    x = torch.randn(2, 8, 10, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s = block.sg(block.conv2(block.conv1(block.norm1(x))))
        f_g = block.g_layer(s) if branches != "local" else None
        f_l = block.l_layer(s) if branches != "global" else None
        lamb = {name: getattr(block, name)[:, None, None] for name in ("lamb_g", "lamb_l") if hasattr(block, name)}
        if branches == "global":
            f_a = lamb["lamb_g"] * f_g
        elif branches == "local":
            f_a = lamb["lamb_l"] * f_l
        elif aggregation == "concat":  # lamb_g Conv1x1([F_G, F_L]) with the 2C -> C conv
            f_a = lamb["lamb_g"] * block.conv3_2(torch.cat([f_g, f_l], dim=1))
        elif aggregation == "sum":
            f_a = lamb["lamb_g"] * f_g + lamb["lamb_l"] * f_l
        else:  # FA: W = 1 + inside_all on the global branch
            f_a = (1 + block.inside_all) * lamb["lamb_g"] * f_g + lamb["lamb_l"] * f_l
        y = x + f_a
        expected = y + block.beta * block.conv5(block.sg(block.conv4(block.norm2(y))))
        assert torch.allclose(block(x), expected, rtol=0, atol=1e-12)
        for branch in (f_g, f_l):
            if branch is not None:  # each branch present is far from zero (measured: 0.012 to 0.021)
                assert branch.abs().mean() > 1e-3
    with pytest.raises(ValueError, match="aggregation"):
        ALGBlock(8, aggregation="max")


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * weight[:, None, None] + bias[:, None, None]


def _conv(x: torch.Tensor, conv: torch.nn.Conv2d, groups: int = 1) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, padding=conv.weight.shape[-1] // 2, groups=groups)


def _gate(x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1] // 2
    return x[:, :c] * x[:, c:]


def test_baseline_is_the_nafnet_block():
    """Table 4's Baseline against NAFNet's block written out from its paper (Chen et al., ECCV 2022, Fig. 3c):
    Z = SG(DWConv3x3(Conv1x1(LN(X)))); Y = X + beta * Conv1x1(Z * SCA(Z)) with SCA(Z) = Conv1x1(GAP(Z));
    out = Y + gamma * Conv1x1(SG(Conv1x1(LN(Y)))). NAFNet's names here: sca = l_layer.conv1,
    conv3 = l_layer.conv2, beta = lamb_l, gamma = beta; the rest keep their names."""
    model = randomise(ALGNet(**{**TINY, "branches": PRESETS["Baseline"]["branches"]}), seed=2).double().eval()
    block = model.middle_blks[0]  # 128 channels at 1/16 resolution
    x = torch.randn(1, 128, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = _gate(_conv(_conv(_layer_norm(x, block.norm1.weight, block.norm1.bias), block.conv1), block.conv2, 256))
        sca = _conv(z.mean(dim=(2, 3), keepdim=True), block.l_layer.conv1)
        y = x + block.lamb_l[:, None, None] * _conv(z * sca, block.l_layer.conv2)
        ffn = _conv(_gate(_conv(_layer_norm(y, block.norm2.weight, block.norm2.bias), block.conv4)), block.conv5)
        expected = y + block.beta * ffn
        assert torch.allclose(block(x), expected, rtol=0, atol=1e-12)
        assert (expected - x).abs().mean() > 0.01  # an active block, not the identity (measured: 0.065)


def test_missing_reference_data_skips_or_fails_under_ci(tmp_path, monkeypatch):
    """What the ``shared`` fixture does without ../shared: skip with one reason, or fail when CI=true."""
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="reference data not found at .*absent"):
        require_shared(tmp_path / "absent")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must have it"):
        require_shared(tmp_path / "absent")
    assert require_shared(tmp_path) == tmp_path


def test_local_pooling_equals_global_on_small_inputs_and_differs_on_large(tiny_model):
    x = torch.rand(1, 3, 64, 64)
    wide = torch.rand(1, 3, 48, 160)
    with torch.no_grad():
        global_small, global_wide = tiny_model(x), tiny_model(wide)
        tiny_model.use_local_pooling(train_size=64)  # full-res window 96 > 64: still the global mean
        assert torch.equal(tiny_model(x), global_small)
        assert not torch.allclose(tiny_model(wide), global_wide, atol=1e-4)
        tiny_model.use_local_pooling(None)
        assert torch.equal(tiny_model(wide), global_wide)


def test_box_average_is_a_windowed_mean():
    x = torch.arange(6 * 8, dtype=torch.float32).reshape(1, 1, 6, 8)
    out = box_average(x, 3)
    assert out.shape == x.shape
    # Valid windows are centred: output[2, 3] is the mean of rows 1..3, cols 2..4.
    assert out[0, 0, 2, 3].item() == pytest.approx(x[0, 0, 1:4, 2:5].mean().item())
    # Borders replicate the nearest valid window.
    assert out[0, 0, 0, 0].item() == pytest.approx(x[0, 0, 0:3, 0:3].mean().item())
    assert torch.allclose(box_average(x, 100), x.mean().expand_as(x))
