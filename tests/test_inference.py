"""deblur(): every accepted input kind keeps shape/dtype/range, tiling is seamless, dask stays lazy."""

from __future__ import annotations

import copy

import dask.array as da
import numpy as np
import pytest
import torch
from helpers import TINY

from algnet_core import inference
from algnet_core.imageio import read_image
from algnet_core.inference import DeblurCancelled, deblur, deblur_tensor
from algnet_core.model import ALGNet


@pytest.fixture(scope="module")
def identity() -> ALGNet:
    """A tiny ALGNet whose output convolutions are zero: it returns its input exactly."""
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
    "torch bfloat16 HxWx3": torch.from_numpy(RNG.random((32, 40, 3)).astype(np.float32)).bfloat16(),  # numpy has none
    "torch uint16 HxWx3": torch.from_numpy((RNG.random((32, 40, 3)) * 65535).astype(np.int32)).to(torch.uint16),
}


def _range(image) -> tuple[float, float]:
    """The value range deblur promises to keep: the dtype's (for floats within [0, 1]: [0, 1])."""
    if image.dtype in (np.uint8, torch.uint8):
        return 0.0, 255.0
    if image.dtype in (np.uint16, torch.uint16):
        return 0.0, 65535.0
    lo, hi = float(image.min()), float(image.max())
    return (0.0, 1.0) if lo >= 0 and hi <= 1 else (-np.inf, np.inf)


@pytest.mark.parametrize("kind", list(INPUTS))
def test_deblur_keeps_type_shape_dtype_and_range_without_mutating(kind, active_model) -> None:
    image = INPUTS[kind]
    before = image.clone() if isinstance(image, torch.Tensor) else image.copy()
    out = deblur(image, active_model, tile=None)
    assert type(out) is type(image)
    assert out.shape == image.shape and out.dtype == image.dtype
    lo, hi = _range(image)
    values = out.to(torch.int32) if out.dtype == torch.uint16 else out
    assert lo <= float(values.min()) and float(values.max()) <= hi
    assert bool((image == before).all())
    if isinstance(image, np.ndarray) and image.dtype.kind == "f":
        assert np.abs(out - image).mean() > 1e-3 * np.ptp(image)  # really went through the network


def test_grey_stored_as_rgb_comes_back_grey(active_model) -> None:
    grey = INPUTS["uint8 HxWx3"][..., 0]
    out = deblur(np.repeat(grey[..., None], 3, axis=-1), active_model, tile=None)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert np.array_equal(out[..., 0], deblur(grey, active_model, tile=None))
    colour = deblur(INPUTS["uint8 HxWx3"], active_model, tile=None)
    assert not np.array_equal(colour[..., 0], colour[..., 1])


def test_read_only_and_big_endian_arrays(active_model) -> None:
    image = INPUTS["uint16 HxWx3"]
    frozen = image.astype(">u2")
    frozen.flags.writeable = False
    assert np.array_equal(deblur(frozen, active_model, tile=None), deblur(image, active_model, tile=None))


def test_rgba_keeps_alpha_and_grey_is_the_mean_of_grey_rgb(active_model) -> None:
    rgba = INPUTS["uint8 HxWx4"]
    out = deblur(rgba, active_model, tile=None)
    assert np.array_equal(out[..., 3], rgba[..., 3])
    assert np.array_equal(out[..., :3], deblur(rgba[..., :3], active_model, tile=None))
    grey = INPUTS["float32 HxWx3 in 0..1"][..., 0]
    rgb = deblur(np.repeat(grey[..., None], 3, axis=-1), active_model, tile=None)
    np.testing.assert_allclose(deblur(grey, active_model, tile=None), rgb.mean(axis=-1), atol=1e-6)


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


def test_tiled_matches_untiled_on_a_real_image(active_model, shared) -> None:
    crop = read_image(shared / "data" / "gopro" / "blur" / "istanbul1.png").pages[0][300:428, 500:660]
    whole = deblur(crop, active_model, tile=None)
    tiled = deblur(crop, active_model, tile=96, overlap=32)
    assert psnr(whole, crop) < 30  # the model's active blocks change the image (measured: 26.2 dB)...
    # ...yet 96 px tiles, whose global branches each scan only their own tile, agree with the whole-image
    # pass (measured: 53.5 dB, max 3; tiles without overlap: 49.7 dB, max 9).
    assert psnr(tiled, whole) > 51
    assert np.abs(tiled.astype(int) - whole).max() <= 5


def test_progress_counts_tiles_and_cancel_stops(identity) -> None:
    image = np.zeros((100, 100), np.float32)
    calls: list[tuple[int, int]] = []
    deblur(image, identity, tile=64, overlap=16, progress=lambda d, t: calls.append((d, t)))
    total = calls[-1][1]  # 4 tiles, each reported whole or in equal steps (e.g. one per ALGBlock)
    assert total % 4 == 0 and calls == [(done, total) for done in range(1, total + 1)]
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
    assert batches == [1, 1, 1, 1]  # CPU: one tile at a time, so progress and cancel answer within a tile
    assert steps == list(range(1, len(steps) + 1)) and len(steps) % 4 == 0


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


def test_dask_chunks_smaller_than_a_tile_are_merged(identity) -> None:
    """A 40x50 image in 36x45 chunks: the edge chunks are 4 and 5 px, under one network tile (16 px); with no
    overlap they used to reach the network alone ("the image is 4x5 pixels")."""
    image = (RNG.random((40, 50)) * 255).astype(np.uint8)
    lazy = deblur(da.from_array(image, chunks=(36, 45)), identity, tile=None, overlap=0)
    assert lazy.chunks == ((40,), (50,))
    assert np.array_equal(lazy.compute(scheduler="synchronous"), image)
    stack = deblur(da.from_array(np.stack([image] * 3), chunks=(1, 8, 16)), identity, overlap=0, pages=1)
    assert stack.chunks == ((1, 1, 1), (16, 24), (16, 16, 18)) and np.array_equal(
        stack.compute(), np.stack([image] * 3)
    )


def smooth(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth random float64 image in [0, 1] of ``shape`` (HxW or HxWxC): bicubic upsampling of 8x8 noise."""
    h, w, *c = shape
    noise = torch.from_numpy(np.random.default_rng(seed).random((1, c[0] if c else 1, 8, 8)))
    up = torch.nn.functional.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[0]
    up = (up - up.min()) / (up.max() - up.min())
    return up.permute(1, 2, 0).numpy() if c else up[0].numpy()


def test_dask_float_matches_numpy_with_one_range_and_overlapping_chunks(active_model) -> None:
    # Values 0..1000 rising to the right, so each 48 px chunk has its own min and max.
    image = smooth((96, 96)) * 600 + np.linspace(0, 400, 96)
    whole = deblur(image, active_model, tile=None)
    lazy = deblur(da.from_array(image, chunks=48), active_model, tile=None)  # overlap 32: the default
    error = np.abs(lazy.compute(scheduler="synchronous") - whole) / np.ptp(image)
    # Each chunk is restored with a 32 px margin, so its scans see other content than the whole-image pass:
    # measured max 0.0018, mean 0.00034 of the range. Chunks without margins: max 0.035; each chunk mapped by
    # its own min and max: max 0.0092, mean 0.0034; the network changes the image by 0.037 (mean).
    assert error.max() < 0.005 and error.mean() < 0.001


@pytest.mark.parametrize("channels", [2, 5])
def test_other_channel_counts_are_deblurred_channel_by_channel_as_grey(active_model, channels) -> None:
    image = smooth((40, 48, channels)).astype(np.float32)
    out = deblur(image, active_model, tile=None)
    for c in range(channels):
        np.testing.assert_allclose(out[..., c], deblur(image[..., c], active_model, tile=None), rtol=0, atol=1e-6)
    assert np.abs(out - image).mean() > 0.01  # really restored (measured: 0.04)


def test_precision_bfloat16_is_close_to_but_not_float32(active_model) -> None:
    image = smooth((48, 64, 3)).astype(np.float32)
    full = deblur(image, active_model, tile=None, precision="float32")
    assert np.array_equal(deblur(image, active_model, tile=None, precision="auto"), full)  # "auto" on a CPU
    error = np.abs(deblur(image, active_model, tile=None, precision="bfloat16") - full)
    # bfloat16 autocast rounds the convolutions to 8 significant bits: measured max 0.0014, mean 0.0002
    # (float32 runs differ by at most 1e-7; the network changes the image by 0.04).
    assert 1e-4 < error.max() < 0.01 and error.mean() < 1e-3
    with pytest.raises(ValueError, match="precision must be 'auto' or one of"):
        deblur(image, active_model, tile=None, precision="half")


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


def test_deblur_tensor_batch(active_model) -> None:
    batch = torch.rand(2, 3, 48, 64)  # multiples of 16: no padding, so the same pixels as the bare network
    out = deblur_tensor(batch, active_model, tile=None)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    with torch.inference_mode():
        assert torch.allclose(out, active_model(batch), atol=1e-5)
    with pytest.raises(ValueError, match=r"expected a \(B, 3, H, W\) batch"):
        deblur_tensor(batch[:, :1], active_model)


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


def test_a_folder_re_exported_in_place_is_loaded_afresh(identity, active_model, tmp_path) -> None:
    image = INPUTS["uint8 HxWx3"]
    folder = str(tmp_path / "model")
    identity.save_pretrained(folder)  # weights A: returns its input
    size = (tmp_path / "model" / "model.safetensors").stat().st_size
    assert np.array_equal(deblur(image, folder, tile=None, device="cpu"), image)
    active_model.save_pretrained(folder)  # weights B, same architecture: only the file times tell them apart
    assert (tmp_path / "model" / "model.safetensors").stat().st_size == size
    out = deblur(image, folder, tile=None, device="cpu")
    assert not np.array_equal(out, image) and np.array_equal(out, deblur(image, active_model, tile=None))


def test_deblur_leaves_the_callers_module_as_it_is(active_model) -> None:
    model = copy.deepcopy(active_model).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    image = INPUTS["uint8 HxWx3"]
    out = deblur(image, model, tile=None, device="cpu")
    assert np.array_equal(deblur(image, model, tile=None), out)  # device "auto"
    assert all(m.training for m in model.modules()) and not hasattr(model, "provenance")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert np.array_equal(out, deblur(image, active_model, tile=None))  # ALGNet computes the same in training mode
