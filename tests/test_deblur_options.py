"""deblur()'s options and guards: normalisation of microscopy data, reflection padding, the ensemble,
progress and cancel inside a tile, argument checks and broken outputs."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from helpers import TINY, randomise
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio

from algnet_core import ALGNet, DeblurCancelled, deblur, deblur_tensor
from algnet_core.inference import NORMALIZE_MODES, normalization_range


@pytest.fixture(scope="module")
def active() -> ALGNet:
    """A tiny ALGNet whose blocks all contribute (random non-zero branch scales)."""
    return randomise(ALGNet(**TINY), seed=3).eval()


def fluorescence(bits_max: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(sharp, blurred) uint16 spots on a background: Gaussian blur sigma 2 and Poisson noise."""
    rng = np.random.default_rng(seed)
    sharp = np.zeros((128, 128))
    ys, xs = rng.integers(4, 124, size=(2, 40))
    sharp[ys, xs] = rng.uniform(0.5, 1.0, size=40)
    sharp = gaussian_filter(sharp, 1.0)
    sharp = 100 + (bits_max - 200) * sharp / sharp.max()
    blurred = rng.poisson(gaussian_filter(sharp, 2.0)).astype(float)
    return sharp, blurred


def test_twelve_bit_data_is_restored_as_well_as_the_same_data_at_full_range() -> None:
    sharp, blurred = fluorescence(2336)
    twelve = np.clip(blurred, 0, 4095).astype(np.uint16)
    full = np.round((blurred - blurred.min()) / (blurred.max() - blurred.min()) * 65535).astype(np.uint16)
    out12 = deblur(twelve, model="defocus").astype(float)
    out_full = deblur(full, model="defocus").astype(float)
    sharp_full = (sharp - blurred.min()) / (blurred.max() - blurred.min()) * 65535
    psnr12 = peak_signal_noise_ratio(sharp, out12, data_range=sharp.max() - sharp.min())
    psnr_full = peak_signal_noise_ratio(sharp_full, out_full, data_range=sharp_full.max() - sharp_full.min())
    old = deblur(twelve, model="defocus", normalize="dtype").astype(float)
    psnr_old = peak_signal_noise_ratio(sharp, old, data_range=sharp.max() - sharp.min())
    assert psnr12 > psnr_full - 0.5
    assert psnr12 > psnr_old + 1.0  # dividing by 65535 made the image nearly black


def test_value_ranges_of_each_mode() -> None:
    data = np.array([[58, 2336], [100, 400]], dtype=np.uint16)
    assert normalization_range(data, data.dtype, "auto", (1, 99.8)) == (58.0, 2336.0)
    assert normalization_range(data, data.dtype, "dtype", (1, 99.8)) == (0.0, 65535.0)
    assert normalization_range(data * 20, data.dtype, "auto", (1, 99.8)) == (0.0, 65535.0)  # uses 16 bits
    photo = np.array([[3, 40]], dtype=np.uint8)
    assert normalization_range(photo, photo.dtype, "auto", (1, 99.8)) == (0.0, 255.0)
    assert normalization_range(photo, photo.dtype, "range", (1, 99.8)) == (3.0, 40.0)
    ramp = np.arange(1001, dtype=np.float32)
    assert normalization_range(ramp, ramp.dtype, "percentile", (1, 99)) == pytest.approx((10.0, 990.0))
    with pytest.raises(ValueError, match="normalize must be one of"):
        normalization_range(data, data.dtype, "minmax", (1, 99.8))
    with pytest.raises(ValueError, match="percentiles"):
        normalization_range(data, data.dtype, "percentile", (99, 1))
    assert NORMALIZE_MODES == ("auto", "dtype", "range", "percentile")


def test_percentile_mode_keeps_spots_above_the_high_percentile(active: ALGNet) -> None:
    _, blurred = fluorescence(3000, seed=1)
    image = blurred.astype(np.uint16)
    out = deblur(image, model=active, normalize="percentile", percentiles=(1, 90))
    high = np.percentile(image, 90)
    assert out.dtype == np.uint16 and out.shape == image.shape
    assert out.max() > high + 100  # not clipped at the 90th percentile


def test_deblurred_spots_may_come_back_brighter_than_the_blurry_input() -> None:
    sharp, blurred = fluorescence(3876, seed=1)
    image = blurred.astype(np.uint16)  # 12-bit data: normalize="auto" maps its own min..max to 0..1
    out = deblur(image, model="defocus")
    capped = np.clip(out, image.min(), image.max())  # what clipping to the blurry image's range kept
    data_range = sharp.max() - sharp.min()
    assert out.max() > image.max() + 50  # the spots gather their light back (the sharp max is 3776)
    assert peak_signal_noise_ratio(sharp, out, data_range=data_range) > peak_signal_noise_ratio(
        sharp, capped, data_range=data_range
    )


def test_float64_data_far_from_zero_keeps_its_detail(active: ALGNet) -> None:
    rng = np.random.default_rng(0)
    detail = rng.uniform(0, 1, size=(48, 48))
    image = 1e6 + detail
    out = deblur(image, model=active) - 1e6
    reference = deblur(detail, model=active, normalize="range")  # the same mapping, without the offset
    assert out.dtype == np.float64
    assert np.abs(out - reference).max() < 1e-4  # float32 before subtracting gave 1/16 steps


def test_huge_finite_values_are_not_reported_as_nan(active: ALGNet) -> None:
    image = np.linspace(-3e38, 3e38, 32 * 32, dtype=np.float32).reshape(32, 32)
    out = deblur(image, model=active)
    assert np.isfinite(out).all() and out.dtype == np.float32
    near_max = torch.from_numpy(image / 3e38 * 3.3e38).to(torch.bfloat16)  # bfloat16's largest is 3.39e38
    out = deblur(near_max, model=active)
    assert bool(torch.isfinite(out).all()) and out.dtype == torch.bfloat16  # float32's clip rounded up to Inf


def test_a_grey_region_of_a_dask_colour_image_is_restored_like_its_neighbours(active: ALGNet) -> None:
    """Only a whole image is made grey when its channels are equal: a dask chunk that happens to lie in a grey
    region (a letterbox bar, a black-and-white part of a scan) is not, or chunks would disagree."""
    import dask.array as da

    image = np.random.default_rng(7).uniform(size=(64, 192, 3)).astype(np.float32)
    image[:, 32:160] = image[:, 32:160, :1]  # a grey band holding the middle chunk and its margins
    out = deblur(da.from_array(image, chunks=(64, 64, 3)), model=active, tile=None, overlap=8).compute()
    band = out[:, 72:120]
    assert not np.array_equal(band[..., 0], band[..., 1])  # as the network gives it, like the colour chunks
    grey = deblur(np.ascontiguousarray(image[:, 32:160]), model=active, tile=None)
    assert np.array_equal(grey[..., 0], grey[..., 1])  # the same band as a whole image of its own: grey


def test_no_seam_on_sides_that_are_not_multiples_of_16() -> None:
    rng = np.random.default_rng(0)
    image = gaussian_filter(rng.uniform(size=(250, 190, 3)), (3, 3, 0)).astype(np.float32)
    image = (image - image.min()) / (image.max() - image.min())
    out = deblur(image, model="motion", tile=None)

    def edge_jump(a: np.ndarray) -> float:
        return max(np.abs(a[-1] - a[-2]).mean(), np.abs(a[:, -1] - a[:, -2]).mean())

    interior = np.abs(np.diff(out[:-2], axis=0)).mean()
    assert edge_jump(out) < 3 * max(interior, edge_jump(image))  # zero padding: ~10x


def test_ensemble_averages_the_eight_flips_and_transposes(active: ALGNet) -> None:
    batch = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    by_hand = torch.zeros_like(batch)
    for flip_w in (False, True):
        for flip_h in (False, True):
            for transpose in (False, True):
                x = batch.flip(-1) if flip_w else batch
                x = x.flip(-2) if flip_h else x
                x = x.transpose(-1, -2) if transpose else x
                y = deblur_tensor(x.contiguous(), model=active, tile=None)
                y = y.transpose(-1, -2) if transpose else y
                y = y.flip(-2) if flip_h else y
                by_hand += y.flip(-1) if flip_w else y
    by_hand /= 8
    out = deblur_tensor(batch, model=active, tile=None, ensemble=True)
    plain = deblur_tensor(batch, model=active, tile=None)
    assert torch.allclose(out, by_hand, atol=1e-5)
    assert (out - plain).abs().max() > 1e-3


def test_progress_and_cancel_answer_inside_one_tile(active: ALGNet) -> None:
    image = np.random.default_rng(2).uniform(size=(64, 64, 3)).astype(np.float32)
    calls: list[tuple[int, int]] = []
    deblur(image, model=active, tile=None, progress=lambda d, t: calls.append((d, t)))
    blocks = sum(1 for m in active.modules() if type(m).__name__ == "ALGBlock")
    assert calls == [(i, blocks) for i in range(1, blocks + 1)]
    asked = []

    def cancel() -> bool:
        asked.append(1)
        return len(asked) > 3  # the first check is before the tile, the next ones after blocks

    with pytest.raises(DeblurCancelled):
        deblur(image, model=active, tile=None, cancel=cancel)
    assert len(asked) == 4
    assert not any(m._forward_hooks for m in active.modules())  # nothing left on the caller's model


def test_progress_hooks_only_report_to_their_own_thread(active: ALGNet) -> None:
    image = np.random.default_rng(3).uniform(size=(48, 48, 3)).astype(np.float32)
    counts = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def run(name: str) -> None:
        barrier.wait()
        deblur(image, model=active, tile=None, progress=lambda d, t: counts[name].append(d))

    threads = [threading.Thread(target=run, args=(n,)) for n in counts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    blocks = sum(1 for m in active.modules() if type(m).__name__ == "ALGBlock")
    assert counts["a"] == counts["b"] == list(range(1, blocks + 1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overlap": -8}, "overlap must be"),
        ({"overlap": 2.5}, "overlap must be"),
        ({"tile": 8}, "tile must be"),
        ({"tile": -64}, "tile must be"),
        ({"tile": "big"}, "tile must be"),
        ({"tile": 64, "overlap": 40}, "too small for overlap"),
    ],
)
def test_bad_tiling_is_refused(active: ALGNet, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        deblur(np.zeros((200, 200), np.float32), model=active, **kwargs)


def test_a_list_is_refused_with_a_hint(active: ALGNet) -> None:
    with pytest.raises(TypeError, match=r"got list: convert it first, e\.g\. np\.asarray"):
        deblur([[0.0] * 32] * 32, model=active)


def test_nan_in_the_alpha_channel_is_refused(active: ALGNet) -> None:
    image = np.zeros((32, 32, 4), np.float32)
    image[0, 0, 3] = np.nan
    with pytest.raises(ValueError, match="1 NaN or Inf"):
        deblur(image, model=active)


def test_a_model_with_a_nan_weight_raises_instead_of_writing_black(active: ALGNet) -> None:
    broken = randomise(ALGNet(**TINY), seed=3).eval()
    with torch.no_grad():
        broken.intro.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf values.*weights"):
        deblur(np.zeros((32, 32, 3), np.uint8), model=broken)
