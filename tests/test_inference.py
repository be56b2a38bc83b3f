"""deblur(): every accepted input kind keeps shape/dtype/range, tiling is seamless, dask stays lazy."""

from __future__ import annotations

import copy
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch

from algnet_core import inference
from algnet_core.imageio import read_image
from algnet_core.inference import DeblurCancelled, deblur, deblur_tensor
from algnet_core.model import ALGNet

TINY = dict(width=8, middle_blk_num=1, enc_blk_nums=(1, 1, 1, 1), dec_blk_nums=(1, 1, 1, 1))
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def tiny() -> ALGNet:
    torch.manual_seed(0)
    return ALGNet(**TINY).eval()


@pytest.fixture(scope="module")
def identity() -> ALGNet:
    """A tiny ALGNet whose output convolutions are zero: it returns its input exactly."""
    torch.manual_seed(0)
    model = ALGNet(**TINY).eval()
    with torch.no_grad():
        for conv in [model.ending, *model.ConvsOut]:
            conv.weight.zero_()
            conv.bias.zero_()
    return model


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    return float(10 * np.log10(peak**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


RNG = np.random.default_rng(0)
INPUTS = {
    "uint8 HxW": (RNG.random((32, 40)) * 255).astype(np.uint8),
    "uint8 HxWx1": (RNG.random((32, 40, 1)) * 255).astype(np.uint8),
    "uint8 HxWx3": (RNG.random((32, 40, 3)) * 255).astype(np.uint8),
    "uint8 HxWx4": (RNG.random((32, 40, 4)) * 255).astype(np.uint8),
    "uint16 HxWx3": (RNG.random((32, 40, 3)) * 65535).astype(np.uint16),
    "uint16 HxWx2": (RNG.random((32, 40, 2)) * 65535).astype(np.uint16),
    "float32 HxWx3 in 0..1": RNG.random((32, 40, 3)).astype(np.float32),
    "float64 HxW in -5..300": RNG.random((32, 40)) * 305 - 5,
    "torch uint8 HxWx3": torch.from_numpy((RNG.random((32, 40, 3)) * 255).astype(np.uint8)),
    "torch float32 HxW": torch.from_numpy(RNG.random((32, 40)).astype(np.float32)),
    "torch uint16 HxWx3": torch.from_numpy((RNG.random((32, 40, 3)) * 65535).astype(np.int32)).to(torch.uint16),
}


def _range(image) -> tuple[float, float]:
    """The value range deblur promises to keep: the dtype's for integers, [0, 1] or [min, max] for floats."""
    if image.dtype in (np.uint8, torch.uint8):
        return 0.0, 255.0
    if image.dtype in (np.uint16, torch.uint16):
        return 0.0, 65535.0
    lo, hi = float(image.min()), float(image.max())
    return (0.0, 1.0) if lo >= 0 and hi <= 1 else (lo, hi)


@pytest.mark.parametrize("kind", list(INPUTS))
def test_deblur_keeps_type_shape_dtype_and_range_without_mutating(kind, tiny) -> None:
    image = INPUTS[kind]
    before = image.clone() if isinstance(image, torch.Tensor) else image.copy()
    out = deblur(image, tiny, tile=None)
    assert type(out) is type(image)
    assert out.shape == image.shape and out.dtype == image.dtype
    lo, hi = _range(image)
    values = out.to(torch.int32) if out.dtype == torch.uint16 else out
    assert lo <= float(values.min()) and float(values.max()) <= hi
    assert bool((image == before).all())
    if isinstance(image, np.ndarray) and image.dtype.kind == "f":
        assert np.abs(out - image).mean() > 1e-3 * (hi - lo)  # really went through the network


def test_read_only_and_big_endian_arrays(tiny) -> None:
    image = INPUTS["uint16 HxWx3"]
    frozen = image.astype(">u2")
    frozen.flags.writeable = False
    assert np.array_equal(deblur(frozen, tiny, tile=None), deblur(image, tiny, tile=None))


def test_rgba_keeps_alpha_and_grey_is_the_mean_of_grey_rgb(tiny) -> None:
    rgba = INPUTS["uint8 HxWx4"]
    out = deblur(rgba, tiny, tile=None)
    assert np.array_equal(out[..., 3], rgba[..., 3])
    assert np.array_equal(out[..., :3], deblur(rgba[..., :3], tiny, tile=None))
    grey = INPUTS["float32 HxWx3 in 0..1"][..., 0]
    rgb = deblur(np.repeat(grey[..., None], 3, axis=-1), tiny, tile=None)
    np.testing.assert_allclose(deblur(grey, tiny, tile=None), rgb.mean(axis=-1), atol=1e-6)


@pytest.mark.parametrize("kind", ["uint16 HxWx3", "float64 HxW in -5..300", "torch uint16 HxWx3"])
def test_normalisation_is_invertible(kind, identity) -> None:
    image = INPUTS[kind]
    out = deblur(image, identity, tile=None)
    if isinstance(image, torch.Tensor):
        assert torch.equal(out, image)
    elif image.dtype.kind == "f":
        np.testing.assert_allclose(out, image, rtol=0, atol=1e-4 * 305)
    else:
        assert np.array_equal(out, image)


def test_tiles_blend_back_exactly_with_an_identity_model(identity) -> None:
    image = (RNG.random((100, 77, 3)) * 255).astype(np.uint8)
    assert np.array_equal(deblur(image, identity, tile=48, overlap=16), image)


def test_tiled_matches_untiled_on_a_real_image(tiny) -> None:
    crop = read_image(DATA / "gopro" / "blur" / "istanbul1.png").pages[0][300:428, 500:660]
    whole = deblur(crop, tiny, tile=None)
    tiled = deblur(crop, tiny, tile=96, overlap=32)
    assert psnr(whole, crop) < 25  # the random tiny model changes the image a lot...
    assert psnr(tiled, whole) > 45  # ...yet tiles agree with the whole-image pass (measured: 54 dB)
    assert np.abs(tiled.astype(int) - whole).max() <= 8


def test_progress_counts_tiles_and_cancel_stops(identity) -> None:
    image = np.zeros((100, 100), np.float32)
    calls: list[tuple[int, int]] = []
    deblur(image, identity, tile=64, overlap=16, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    calls.clear()
    with pytest.raises(DeblurCancelled):
        deblur(image, identity, tile=64, overlap=16, progress=lambda d, t: calls.append((d, t)), cancel=lambda: True)
    assert calls == []


def test_tiles_are_batched_on_gpus_and_one_by_one_on_cpus(identity, monkeypatch) -> None:
    assert inference.tiles_per_batch(torch.device("cuda"), 128, 64 * 64) == 4
    assert inference.tiles_per_batch(torch.device("cuda"), 1024, 64 * 64) == inference.MAX_TILES_PER_BATCH
    batches, steps = [], []
    handle = identity.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    monkeypatch.setattr(inference, "choose_tile", lambda width, device: 128)
    try:
        deblur(np.zeros((100, 100), np.float32), identity, tile=64, overlap=16, progress=lambda d, t: steps.append(d))
    finally:
        handle.remove()
    assert batches == [1, 1, 1, 1]  # CPU: progress and cancel after every tile
    assert steps == [1, 2, 3, 4]


def test_out_of_memory_halves_the_tile(identity, caplog) -> None:
    def fail_on_big_tiles(module, args) -> None:
        if args[0].shape[-1] > 64 or args[0].shape[0] > 1:
            raise torch.OutOfMemoryError("simulated")

    handle = identity.register_forward_pre_hook(fail_on_big_tiles)
    image = (RNG.random((100, 120)) * 255).astype(np.uint8)
    try:
        out = deblur(image, identity, tile=128, overlap=16)
    finally:
        handle.remove()
    assert np.array_equal(out, image)
    assert "retrying with tile 64" in caplog.text


def test_dask_array_is_lazy_and_matches_numpy(identity) -> None:
    image = (RNG.random((100, 90, 3)) * 65535).astype(np.uint16)
    calls = []
    handle = identity.register_forward_hook(lambda *args: calls.append(1))
    try:
        lazy = deblur(da.from_array(image, chunks=(64, 64, 3)), identity, tile=None, overlap=16)
        assert isinstance(lazy, da.Array) and calls == []
        out = lazy.compute(scheduler="synchronous")
    finally:
        handle.remove()
    assert out.dtype == np.uint16 and np.array_equal(out, image)
    assert len(calls) > 1


def test_dask_float_uses_one_range_for_all_chunks(identity) -> None:
    image = RNG.random((96, 96)) * 1000
    out = deblur(da.from_array(image, chunks=48), identity, tile=None).compute(scheduler="synchronous")
    np.testing.assert_allclose(out, image, atol=1e-3)


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        (np.zeros((0, 32, 3), np.uint8), ValueError, "empty"),
        (np.zeros((8, 32), np.uint8), ValueError, "at least 16x16"),
        (np.full((32, 32), np.nan, np.float32), ValueError, "NaN or Inf"),
        (np.array([[np.inf] * 32] * 32), ValueError, "NaN or Inf"),
        (np.zeros((2, 32, 32, 3), np.uint8), ValueError, "HxW or HxWxC"),
        (np.zeros((32, 32), np.int32), TypeError, "unsupported image dtype"),
    ],
)
def test_bad_inputs_raise_clear_errors(image, error, message, identity) -> None:
    with pytest.raises(error, match=message):
        deblur(image, identity)


def test_deblur_tensor_batch(tiny) -> None:
    batch = torch.rand(2, 3, 40, 48)
    out = deblur_tensor(batch, tiny, tile=None)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    with torch.inference_mode():
        assert torch.allclose(out, tiny(batch), atol=1e-5)
    with pytest.raises(ValueError, match=r"expected a \(B, 3, H, W\) batch"):
        deblur_tensor(batch[:, :1], tiny)


def test_devices_and_auto_tile(monkeypatch) -> None:
    assert inference.available_devices()[-1] == "cpu"
    assert inference.resolve_device("auto").type == inference.available_devices()[0]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available"):
            inference.resolve_device("cuda")
    cpu = torch.device("cpu")
    monkeypatch.setattr(inference, "free_memory", lambda device: 64 << 30)
    big = inference.choose_tile(16, cpu)  # capped by the CPU budget
    monkeypatch.setattr(inference, "free_memory", lambda device: 1 << 30)
    small = inference.choose_tile(16, cpu)
    assert big % 16 == 0 and small % 16 == 0 and inference.MIN_AUTO_TILE <= small < big <= 1024
    assert big == 16 * (int((inference.CPU_MEMORY_BUDGET / (192 * 16)) ** 0.5) // 16)


def test_a_folder_re_exported_in_place_is_loaded_afresh(identity, tiny, tmp_path) -> None:
    image = INPUTS["uint8 HxWx3"]
    folder = str(tmp_path / "model")
    identity.save_pretrained(folder)  # weights A: returns its input
    size = (tmp_path / "model" / "model.safetensors").stat().st_size
    assert np.array_equal(deblur(image, folder, tile=None, device="cpu"), image)
    tiny.save_pretrained(folder)  # weights B, same architecture: only the file times tell them apart
    assert (tmp_path / "model" / "model.safetensors").stat().st_size == size
    out = deblur(image, folder, tile=None, device="cpu")
    assert not np.array_equal(out, image) and np.array_equal(out, deblur(image, tiny, tile=None))


def test_deblur_leaves_the_callers_module_as_it_is(tiny) -> None:
    model = copy.deepcopy(tiny).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    image = INPUTS["uint8 HxWx3"]
    out = deblur(image, model, tile=None, device="cpu")
    assert np.array_equal(deblur(image, model, tile=None), out)  # device "auto"
    assert all(m.training for m in model.modules()) and not hasattr(model, "provenance")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert np.array_equal(out, deblur(image, tiny, tile=None))  # ALGNet computes the same in training mode
