"""The network is the authors' network: same state dict, same outputs, any input size."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY, randomise
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


def test_ablation_aggregations_compute_what_they_say():
    fa, plain = randomise(ALGBlock(8, "both", "fa")), ALGBlock(8, "both", "sum")
    shared_weights = {k: v for k, v in fa.state_dict().items() if k in plain.state_dict()}
    plain.load_state_dict(shared_weights, strict=True)
    with torch.no_grad():
        x = torch.randn(1, 8, 10, 10)
        assert not torch.allclose(fa(x), plain(x), atol=1e-4)
        fa.inside_all.zero_()  # W = 1 + inside_all = 1: FA reduces to the plain sum
        assert torch.allclose(fa(x), plain(x), atol=1e-6)
    with pytest.raises(ValueError, match="aggregation"):
        ALGBlock(8, aggregation="max")


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
