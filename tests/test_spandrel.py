"""ALGNet as a spandrel architecture: ComfyUI's "Load Upscale Model" path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY
from safetensors.torch import save_file

from algnet_core import ALGNet, deblur

spandrel = pytest.importorskip("spandrel")

import algnet_plugin.comfyui  # noqa: E402, F401  (registers ALGNet with spandrel)
from algnet_plugin.comfyui.checkpoint import config_from_state_dict, is_algnet_state_dict  # noqa: E402
from algnet_plugin.comfyui.spandrel_arch import register  # noqa: E402


@pytest.fixture
def tiny_file(tiny_model: ALGNet, tmp_path: Path) -> Path:
    path = tmp_path / "algnet_tiny.safetensors"
    save_file(tiny_model.state_dict(), path)
    return path


def test_importing_the_pack_registers_algnet_once() -> None:
    assert "ALGNet" in spandrel.MAIN_REGISTRY
    count = len(spandrel.MAIN_REGISTRY)
    register()
    assert len(spandrel.MAIN_REGISTRY) == count


def test_load_from_file_gives_an_algnet_restoration_descriptor(tiny_file: Path) -> None:
    descriptor = spandrel.ModelLoader().load_from_file(tiny_file)
    assert isinstance(descriptor, spandrel.ImageModelDescriptor)
    assert descriptor.architecture.id == "ALGNet"
    assert isinstance(descriptor.model, ALGNet)
    assert descriptor.purpose == "Restoration"
    assert descriptor.scale == 1
    assert descriptor.size_requirements.multiple_of == 16
    assert (descriptor.input_channels, descriptor.output_channels) == (3, 3)
    assert config_from_state_dict(descriptor.model.state_dict())["width"] == TINY["width"]


def test_descriptor_output_matches_algnet_core_deblur(tiny_file: Path, tiny_model: ALGNet) -> None:
    descriptor = spandrel.ModelLoader().load_from_file(tiny_file)
    image = np.random.default_rng(0).random((32, 48, 3), dtype=np.float32)
    ours = deblur(image, model=tiny_model, device="cpu")
    theirs = descriptor(torch.from_numpy(image).permute(2, 0, 1)[None])
    assert theirs.shape == (1, 3, 32, 48)
    np.testing.assert_allclose(theirs[0].permute(1, 2, 0).numpy(), ours, atol=1e-5)


def test_descriptor_returns_full_resolution_for_odd_sizes(tiny_file: Path) -> None:
    descriptor = spandrel.ModelLoader().load_from_file(tiny_file)
    out = descriptor(torch.rand(1, 3, 21, 35))
    assert out.shape == (1, 3, 21, 35)
    assert 0 <= out.min() and out.max() <= 1


def test_wrapped_training_checkpoint_is_recognised(tiny_model: ALGNet) -> None:
    wrapped = {"params": {f"module.{k}": v for k, v in tiny_model.state_dict().items()}}
    descriptor = spandrel.ModelLoader().load_from_state_dict(wrapped)
    assert descriptor.architecture.id == "ALGNet"


@pytest.mark.parametrize("variant", [dict(branches="global"), dict(aggregation="sum"), dict(aggregation="concat"), {}])
def test_config_is_read_back_from_keys_and_shapes(variant: dict) -> None:
    config = dict(TINY, width=16, middle_blk_num=2, enc_blk_nums=(1, 0, 2, 1), dec_blk_nums=(2, 1, 0, 1))
    config.update(variant)
    state_dict = ALGNet(**config).state_dict()
    inferred = config_from_state_dict(state_dict)
    assert {k: inferred[k] for k in config} == config
    rebuilt = ALGNet(**inferred).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in state_dict.items()}


def test_nafnet_is_not_claimed_as_algnet() -> None:
    from spandrel.architectures.NAFNet import NAFNet

    nafnet = NAFNet(img_channel=3, width=8, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1])
    state_dict = nafnet.state_dict()
    assert not is_algnet_state_dict(state_dict)
    assert spandrel.ModelLoader().load_from_state_dict(state_dict).architecture.id == "NAFNet"


def test_algnet_baseline_without_mamba_is_not_claimed() -> None:
    state_dict = ALGNet(**TINY, branches="local").state_dict()
    assert not is_algnet_state_dict(state_dict)
    with pytest.raises(spandrel.UnsupportedModelError):
        spandrel.ModelLoader().load_from_state_dict(state_dict)


def test_random_state_dict_is_not_claimed() -> None:
    g = torch.Generator().manual_seed(0)
    state_dict = {f"layer{i}.weight": torch.randn(4, 4, generator=g) for i in range(6)}
    assert not is_algnet_state_dict(state_dict)
    with pytest.raises(spandrel.UnsupportedModelError):
        spandrel.ModelLoader().load_from_state_dict(state_dict)


def test_randomised_weights_survive_the_round_trip(tiny_file: Path, tiny_model: ALGNet) -> None:
    loaded = spandrel.ModelLoader().load_from_file(tiny_file).model
    for (name, ours), theirs in zip(tiny_model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
