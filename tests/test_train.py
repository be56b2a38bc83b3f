"""Training pipeline: loss values, one step, exact resume, data alignment, kernels, export and publish."""

from __future__ import annotations

import csv
import hashlib
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from algnet_core import ALGNet
from algnet_core.imageio import Stack, write_image
from algnet_core.publish import main as publish_main
from train import kernels
from train.__main__ import main as train_main
from train.benchmark import make_benchmark
from train.config import Config, load_config
from train.data import (
    BlurRecipe,
    EpochSampler,
    PairedDataset,
    SyntheticBlur,
    dpdd_pairs,
    gopro_pairs,
    paired_folder_pairs,
    read_image,
    realblur_pairs,
)
from train.engine import Trainer, load_checkpoint
from train.export import eval_rows, export_checkpoint
from train.losses import MultiScaleLoss, charbonnier, edge_loss, frequency_loss, laplacian

REPO = Path(__file__).resolve().parents[1]


def smooth_photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random smooth RGB uint8 image (bicubic upsampling of noise), like a tiny photograph."""
    small = Image.fromarray((rng.uniform(size=(6, 6, 3)) * 255).astype(np.uint8))
    return np.asarray(small.resize((w, h), Image.BICUBIC))


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(smooth_photo(rng, 40, 48)).save(folder / f"{i}.png")
    return folder


def tiny_config(photos: Path, out_dir: Path, **run: object) -> Config:
    return Config.from_dict(
        {
            "name": "tiny",
            "model": {"preset": "ALGNet-S", "overrides": TINY},
            "data": {
                "crop": 32,
                "workers": 0,
                "train": {
                    "kind": "synthetic",
                    "folders": [str(photos)],
                    "recipe": {"kind": "mixed", "kernel_size": 9, "motion_length": [2, 6], "defocus_radius": [1, 3]},
                },
            },
            "run": {"steps": 4, "batch": 2, "ema_decay": 0.9} | run,
            "log": {"out_dir": str(out_dir), "every": 1, "ckpt_every": 100, "tensorboard": False, "progress": False},
        }
    )


# ----------------------------------------------------------------------------------------- loss
def np_laplacian(x: np.ndarray) -> np.ndarray:
    """MPRNet's band-pass x - g(up(down(g(x)))) with explicit loops (independent of the torch code)."""
    k1 = np.array([0.05, 0.25, 0.4, 0.25, 0.05])
    k = np.outer(k1, k1)

    def g(img: np.ndarray) -> np.ndarray:
        padded = np.pad(img, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="edge")
        out = np.zeros_like(img)
        for dy in range(5):
            for dx in range(5):
                out += k[dy, dx] * padded[..., dy : dy + img.shape[-2], dx : dx + img.shape[-1]]
        return out

    f = g(x)
    up = np.zeros_like(f)
    up[..., ::2, ::2] = 4 * f[..., ::2, ::2]
    return x - g(up)


def test_loss_terms_match_hand_computed_values() -> None:
    # Constant difference d: Charbonnier = sqrt(d^2 + eps^2); the FFT of a constant is only its DC term
    # d*H*W, so the mean of |Re|, |Im| over 2*H*W values is d / 2.
    pred, target = (
        torch.full((1, 3, 8, 8), 0.7, dtype=torch.float64),
        torch.full((1, 3, 8, 8), 0.4, dtype=torch.float64),
    )
    assert charbonnier(pred, target).item() == pytest.approx(np.sqrt(0.3**2 + 1e-6), abs=1e-12)
    assert frequency_loss(pred, target).item() == pytest.approx(0.15, abs=1e-6)

    rng = np.random.default_rng(1)
    a, b = rng.uniform(size=(2, 3, 12, 10)), rng.uniform(size=(2, 3, 12, 10))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    np.testing.assert_allclose(laplacian(ta).numpy(), np_laplacian(a), atol=1e-12)
    la, lb = np_laplacian(a), np_laplacian(b)
    assert edge_loss(ta, tb).item() == pytest.approx(np.mean(np.sqrt((la - lb) ** 2 + 1e-6)), abs=1e-12)
    diff = np.fft.fft2(a) - np.fft.fft2(b)
    expected_freq = (np.abs(diff.real).sum() + np.abs(diff.imag).sum()) / (2 * a.size)
    assert frequency_loss(ta, tb).item() == pytest.approx(expected_freq, rel=1e-5)


def test_multiscale_loss_sums_eq1_over_nearest_downsampled_targets() -> None:
    rng = np.random.default_rng(2)
    target = rng.uniform(size=(1, 3, 24, 40))
    outputs = [rng.uniform(size=(1, 3, -(-24 // s), -(-40 // s))) for s in (8, 4, 2, 1)]
    expected = 0.0
    for out, s in zip(outputs, (8, 4, 2, 1), strict=True):
        tgt = target[..., ::s, ::s]  # [..., ::2, ::2] applied log2(s) times
        assert tgt.shape == out.shape
        d, dl = out - tgt, np_laplacian(out) - np_laplacian(tgt)
        f = np.fft.fft2(out) - np.fft.fft2(tgt)
        expected += np.mean(np.sqrt(d**2 + 1e-6)) + 0.05 * np.mean(np.sqrt(dl**2 + 1e-6))
        expected += 0.1 * (np.abs(f.real).sum() + np.abs(f.imag).sum()) / (2 * out.size)
    got = MultiScaleLoss()([torch.from_numpy(o).float() for o in outputs], torch.from_numpy(target).float())
    assert got.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------- training
def test_one_step_lowers_the_loss_on_a_fixed_batch(photos: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(photos, tmp_path / "run", steps=100))
    blur, sharp = (torch.stack(t) for t in zip(trainer.train_set[(0, 0)], trainer.train_set[(0, 1)], strict=True))

    def loss() -> float:
        with torch.no_grad():
            return trainer.criterion(trainer.model(blur, return_all_scales=True), sharp).item()

    before = loss()
    reported = trainer.train_step(blur, sharp)["loss"]
    assert reported == pytest.approx(before, rel=1e-5)
    assert loss() < before - 1e-3


def test_cpu_precision_bf16_autocasts_the_step_and_rejects_unknown_names(photos: Path, tmp_path: Path) -> None:
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(tiny_config(photos, tmp_path / precision, cpu_precision=precision))
        blur, sharp = (torch.stack(t) for t in zip(trainer.train_set[(0, 0)], trainer.train_set[(0, 1)], strict=True))
        with torch.no_grad():
            fp32 = trainer.criterion(trainer.model(blur, return_all_scales=True), sharp).item()
        losses[precision] = (trainer.train_step(blur, sharp)["loss"], fp32)
    assert losses["fp32"][0] == pytest.approx(losses["fp32"][1], rel=1e-6)  # no autocast at all
    bf16, fp32 = losses["bf16"]
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)  # bfloat16 activations: close, not equal
    with pytest.raises(ValueError, match="run.cpu_precision='fp16'"):
        Trainer(tiny_config(photos, tmp_path / "fp16", cpu_precision="fp16"))


def test_resume_continues_exactly_like_an_uninterrupted_run(photos: Path, tmp_path: Path) -> None:
    straight = Trainer(tiny_config(photos, tmp_path / "a"))
    straight.fit()

    first = Trainer(tiny_config(photos, tmp_path / "b"))
    first.fit(until=2)
    assert first.step == 2
    resumed = Trainer(tiny_config(photos, tmp_path / "b"))
    resumed.resume(tmp_path / "b" / "last.pt")
    assert resumed.step == 2
    resumed.fit()
    assert resumed.step == straight.step == 4
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    for name, value in straight.ema.model.state_dict().items():
        torch.testing.assert_close(resumed.ema.model.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr() == [pytest.approx(1e-7, rel=1e-9)]
    rows = (tmp_path / "b" / "train.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]


def test_fine_tuning_starts_from_the_checkpoints_ema_weights_with_a_fresh_schedule(
    photos: Path, tmp_path: Path
) -> None:
    first = Trainer(tiny_config(photos, tmp_path / "a"))
    first.fit()
    tuned = Trainer(tiny_config(photos, tmp_path / "b", init=str(tmp_path / "a" / "last.pt")))
    assert tuned.step == 0
    assert tuned.scheduler.get_last_lr() == [pytest.approx(tuned.cfg.optim.lr)]
    fresh = Trainer(tiny_config(photos, tmp_path / "c"))
    for name, value in first.ema.model.state_dict().items():
        torch.testing.assert_close(tuned.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(tuned.ema.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(fresh.model.state_dict()[k], v) for k, v in first.ema.model.state_dict().items())


def _run_train_command(photos: Path, out: Path, *args: str) -> None:
    """``python -m train`` in this process on a tiny config with a validation set, then its signal handlers
    (SIGTERM/SIGINT stop the run) are put back."""
    raw = tiny_config(photos, out / "run", steps=3, ema_decay=0.5).to_dict()
    raw["data"]["val"] = {"kind": "synthetic", "folders": [str(photos)], "limit": 2}  # 2 whole 40x48 photos
    raw["log"]["val_every"] = 2
    raw["export"]["dir"] = str(out / "export")
    (out / "config.yaml").write_text(yaml.safe_dump(raw))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert train_main([str(out / "config.yaml"), *args]) == 0
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_a_run_validates_keeps_its_best_step_and_exports_those_weights(photos: Path, tmp_path: Path) -> None:
    _run_train_command(photos, tmp_path)
    run = tmp_path / "run"
    with (run / "val.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 3]  # every log.val_every steps, and at the end
    assert all(int(r["images"]) == 2 and 0 < float(r["ssim"]) <= 1 for r in rows)
    top = max(rows, key=lambda r: float(r["psnr"]))
    best = load_checkpoint(run / "best.pt")
    assert best["step"] == best["metrics"]["step"] == int(top["step"])
    assert best["metrics"]["psnr"] == float(top["psnr"]) and best["metrics"]["images"] == 2
    assert load_checkpoint(run / "last.pt")["step"] == 3
    # The export holds best.pt's weights: validated again, they score the PSNR stored with them.
    exported = ALGNet.from_pretrained(tmp_path / "export")
    for name, value in best["model"].items():
        assert torch.equal(exported.state_dict()[name], value), name
    trainer = Trainer(Config.from_dict(best["config"]))
    trainer.ema.model.load_state_dict(exported.state_dict())
    assert trainer.validate()["psnr"] == pytest.approx(best["metrics"]["psnr"], rel=1e-6)
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"| validation (tiny, step {top['step']}) | 2 | {float(top['psnr_blurry']):.2f} |" in card


def test_minutes_stop_a_run_after_the_current_step_without_exporting(photos: Path, tmp_path: Path) -> None:
    _run_train_command(photos, tmp_path, "--minutes", "1e-9")  # the deadline has passed after any step
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 1
    assert len((tmp_path / "run" / "train.csv").read_text().splitlines()) == 2  # header + step 1
    assert not (tmp_path / "run" / "val.csv").exists() and not (tmp_path / "export").exists()


# ----------------------------------------------------------------------------------------- data
def test_paired_crops_and_flips_keep_blur_and_sharp_aligned(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    (tmp_path / "blur").mkdir()
    (tmp_path / "sharp").mkdir()
    sharp_images = []
    for i in range(2):
        sharp = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
        sharp_images.append(sharp.astype(np.float32) / 255)
        Image.fromarray(sharp).save(tmp_path / "sharp" / f"{i}.png")
        Image.fromarray(255 - sharp).save(tmp_path / "blur" / f"{i}.png")  # "blur" = inverted sharp
    ds = PairedDataset(paired_folder_pairs(tmp_path / "blur", tmp_path / "sharp"), crop=16)
    flips_seen = set()
    for key in [(e, i) for e in range(6) for i in range(2)]:
        blur, sharp = (t.permute(1, 2, 0).numpy() for t in ds[key])
        np.testing.assert_allclose(blur, 1 - sharp, atol=1e-6)  # pixel-aligned through crop + flips
        full = sharp_images[key[1]]
        found = [
            (fh, fv)
            for fh in (False, True)
            for fv in (False, True)
            if _contains(full[:, ::-1] if fh else full, sharp[::-1] if fv else sharp)
        ]
        assert found, "the crop is not a (flipped) window of the sharp image"
        flips_seen.update(found)
    assert len(flips_seen) > 1


def _contains(image: np.ndarray, window: np.ndarray) -> bool:
    h, w = window.shape[:2]
    return any(
        np.array_equal(image[y : y + h, x : x + w], window)
        for y in range(image.shape[0] - h + 1)
        for x in range(image.shape[1] - w + 1)
    )


def test_read_image_keeps_16_bit_precision_and_reads_every_training_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    rgb16 = rng.integers(0, 65536, size=(12, 20, 3), dtype=np.uint16)
    grey16 = rng.integers(0, 65536, size=(12, 20), dtype=np.uint16)
    write_image(tmp_path / "rgb16.png", Stack(rgb16[None], rgb16.shape))
    write_image(tmp_path / "grey16.png", Stack(grey16[None], grey16.shape))
    got = read_image(tmp_path / "rgb16.png")
    assert got.dtype == np.float32 and np.array_equal(got, rgb16.astype(np.float32) / 65535)
    assert len(np.unique(got)) > 256  # not reduced to 8 bits (a max error of 1/255 before)
    assert np.array_equal(read_image(tmp_path / "grey16.png"), np.repeat(grey16[..., None], 3, 2) / np.float32(65535))
    rgba8 = rng.integers(0, 256, size=(12, 20, 4), dtype=np.uint8)
    for name in ("rgba8.png", "rgb8.bmp"):
        Image.fromarray(rgba8 if name.endswith("png") else rgba8[..., :3]).save(tmp_path / name)
        assert np.array_equal(read_image(tmp_path / name), rgba8[..., :3] / np.float32(255))  # alpha dropped


def test_dataset_layouts_find_their_pairs(tmp_path: Path) -> None:
    img = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    for split_dir in ("GOPRO/train/SEQ1/blur", "GOPRO/train/SEQ1/sharp", "DPDD/train_c/source", "DPDD/train_c/target"):
        (tmp_path / split_dir).mkdir(parents=True)
        img.save(tmp_path / split_dir / "000001.png")
    assert gopro_pairs(tmp_path / "GOPRO", "train") == [
        (tmp_path / "GOPRO/train/SEQ1/blur/000001.png", tmp_path / "GOPRO/train/SEQ1/sharp/000001.png")
    ]
    assert dpdd_pairs(tmp_path / "DPDD", "train")[0][1] == tmp_path / "DPDD/train_c/target/000001.png"
    (tmp_path / "RB").mkdir()
    (tmp_path / "RB/RealBlur_J_test_list.txt").write_text("s1/gt/gt_1.png s1/blur/blur_1.png\n")
    assert realblur_pairs(tmp_path / "RB", "J", "test") == [
        (tmp_path / "RB/s1/blur/blur_1.png", tmp_path / "RB/s1/gt/gt_1.png")
    ]


def test_synthetic_blur_is_aligned_reproducible_and_varies(photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = BlurRecipe(kind="motion", kernel_size=9, motion_length=(2, 6), gaussian_sigma=(0, 0), quantise=False)
    ds = SyntheticBlur([photos], crop=24, recipe=recipe)
    blur, sharp = ds[(0, 3)]
    assert blur.shape == sharp.shape == (3, 24, 24)
    assert torch.equal(ds[(0, 3)][0], blur) and torch.equal(ds[(0, 3)][1], sharp)
    assert not torch.equal(ds[(1, 3)][1], sharp)  # another epoch: another crop
    assert (blur - sharp).abs().mean() > 1e-3

    delta = np.zeros((9, 9))
    delta[4, 4] = 1
    monkeypatch.setattr(BlurRecipe, "kernel", lambda self, rng: delta)
    for key in [(0, 0), (2, 5), (7, 1)]:
        blur, sharp = ds[key]
        torch.testing.assert_close(blur, sharp, rtol=0, atol=1e-6)  # identity kernel: the same pixels


def test_epoch_sampler_splits_global_batches_across_ranks() -> None:
    single = list(EpochSampler(10, 4, seed=5))
    ranks = [list(EpochSampler(10, 4, seed=5, rank=r, world=2)) for r in range(2)]
    assert len(single) == 8
    for step in range(2):
        global_batch = single[4 * step : 4 * step + 4]
        assert ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2] == global_batch
    resumed = EpochSampler(10, 4, seed=5)
    resumed.set_epoch(0, start=4)
    assert list(resumed) == single[4:]


# ----------------------------------------------------------------------------------------- kernels
def _lit_per_extent(kernel: np.ndarray) -> float:
    """Pixels above 5% of the peak per pixel of the kernel's extent: 1-4 for a stroke, more for a blob."""
    lit = kernel > 0.05 * kernel.max()
    rows, cols = np.nonzero(lit)
    return lit.sum() / (max(np.ptp(rows), np.ptp(cols)) + 1)


def test_motion_kernels_are_strokes_like_real_camera_shake(shared: Path) -> None:
    levin = np.load(shared / "data" / "kernels" / "levin09.npz")
    real = [_lit_per_extent(levin[name]) for name in levin.files]  # 2.4 .. 4.0
    rng = np.random.default_rng(0)
    ours = [_lit_per_extent(kernels.motion_kernel(rng, 31, 10, 27)) for _ in range(100)]
    # A path that winds back over itself many times fills a blob (the old generator: median 7.5).
    assert 1 < np.median(ours) <= max(real)


def test_kernels_are_normalised_centred_and_reproducible() -> None:
    for seed in range(5):
        k = kernels.motion_kernel(np.random.default_rng(seed), 25, 4, 20)
        assert k.shape == (25, 25) and k.min() >= 0 and k.sum() == pytest.approx(1, abs=1e-12)
        rows, cols = np.indices(k.shape)
        assert abs((rows * k).sum() - 12) < 1 and abs((cols * k).sum() - 12) < 1
        np.testing.assert_array_equal(k, kernels.motion_kernel(np.random.default_rng(seed), 25, 4, 20))
    assert not np.array_equal(
        kernels.motion_kernel(np.random.default_rng(0), 25, 4, 20),
        kernels.motion_kernel(np.random.default_rng(1), 25, 4, 20),
    )
    for r in (0, 1.5, 3, 8):
        d = kernels.disk_kernel(r, size=17)
        assert d.sum() == pytest.approx(1, abs=1e-12) and d.min() >= 0
        np.testing.assert_allclose(d, d.T)
        np.testing.assert_allclose(d, d[::-1])
    assert kernels.disk_kernel(0)[0, 0] == 1
    disk = kernels.disk_kernel(3)
    dist = np.hypot(*np.indices(disk.shape) - 3)
    half_diagonal = np.sqrt(0.5)
    np.testing.assert_allclose(disk[dist + half_diagonal < 3], disk.max())  # fully covered pixels
    assert np.all(disk[dist - half_diagonal > 3] == 0)
    assert 0 < disk[3, 0] < disk.max()  # the edge pixel is partly covered
    g = kernels.gaussian_kernel(1.5)
    assert g.shape == (11, 11) and g.sum() == pytest.approx(1) and g.argmax() == 60
    d1 = kernels.random_defocus_kernel(np.random.default_rng(4), 21, (1, 10), 0.5)
    np.testing.assert_array_equal(d1, kernels.random_defocus_kernel(np.random.default_rng(4), 21, (1, 10), 0.5))


def test_centre_moves_the_centre_of_mass_to_the_middle() -> None:
    k = np.zeros((5, 7))
    k[0, 0], k[0, 1] = 0.75, 0.25
    c = kernels.centre(k)
    assert c.shape[0] % 2 == 1 and c.shape[0] == c.shape[1]
    mid = c.shape[0] // 2
    assert c[mid, mid] == 0.75 and c[mid, mid + 1] == 0.25


# ----------------------------------------------------------------------------------------- benchmark
@pytest.fixture
def benchmark_source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(5)
    for name in ("a", "b", "c", "d"):
        Image.fromarray(smooth_photo(rng, 40, 44)).save(src / f"{name}.png")
    return src


def test_benchmark_builder_is_deterministic(benchmark_source: Path, tmp_path: Path) -> None:
    one = make_benchmark("disk", tmp_path / "one", source=benchmark_source)
    two = make_benchmark("disk", tmp_path / "two", source=benchmark_source)
    assert one == two
    assert [it["name"] for it in one["images"]] == ["a_r3.png", "b_r5.png", "c_r8.png", "d_r3.png"]
    assert one["images"][2]["size"] == [40 - 16, 44 - 16]  # valid convolution: half a kernel cropped
    blur = np.asarray(Image.open(tmp_path / "one/blur/a_r3.png"))
    assert blur.shape == np.asarray(Image.open(tmp_path / "one/sharp/a_r3.png")).shape == (34, 38, 3)
    assert one["images"][0]["sha256_blur"] == hashlib.sha256((tmp_path / "one/blur/a_r3.png").read_bytes()).hexdigest()


def test_levin_benchmark_cycles_through_the_recorded_kernels(benchmark_source: Path, shared: Path, tmp_path) -> None:
    levin = shared / "data" / "kernels" / "levin09.npz"
    manifest = make_benchmark("levin", tmp_path / "levin", source=benchmark_source, kernels_file=levin)
    assert [it["kernel"] for it in manifest["images"]] == ["k0", "k1", "k2", "k3"]


# ----------------------------------------------------------------------------------------- configs
def test_shipped_configs_load_and_keep_the_paper_recipe() -> None:
    configs = {p.stem: load_config(p) for p in sorted((REPO / "train" / "configs").glob("*.yaml"))}
    assert {"gopro_algnet", "gopro_algnet_b", "dpdd_algnet", "synthetic_motion_s", "synthetic_defocus_s"} <= set(
        configs
    )
    for name, cfg in configs.items():
        assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.lr == 5e-4 and cfg.optim.min_lr == 1e-7, name
        assert (cfg.loss.eps, cfg.loss.edge_weight, cfg.loss.freq_weight) == (1e-3, 0.05, 0.1), name
        assert cfg.data.flips == {"horizontal": True, "vertical": True}, name
        if not name.startswith("synthetic"):
            assert (cfg.run.batch, cfg.data.crop) == (32, 256), name
    for name in ("synthetic_motion_s", "synthetic_defocus_s"):
        cfg = configs[name]
        assert cfg.model.preset == "ALGNet-S"
        folders = cfg.data.train["folders"] + cfg.data.val["folders"]
        assert all("train_photos" in f and "natural" not in f for f in folders)
    with pytest.raises(ValueError, match="learning_rate"):
        Config.from_dict({"name": "x", "optim": {"learning_rate": 1}})
    cfg = load_config(REPO / "train/configs/synthetic_motion_s.yaml", ["optim.lr=3e-4", "run.init=runs/a/best.pt"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float) and cfg.run.init == "runs/a/best.pt"


# ----------------------------------------------------------------------------------------- export/publish
@pytest.fixture
def exported(tmp_path: Path) -> Path:
    cfg = Config.from_dict({"name": "algnet-tiny", "model": {"preset": "ALGNet-S", "overrides": TINY}})
    torch.manual_seed(0)
    model = ALGNet(**cfg.model_kwargs())
    metrics = {"psnr": 30.5, "ssim": 0.91, "psnr_blurry": 25.25, "ssim_blurry": 0.8, "images": 8, "step": 40}
    state = {"step": 40, "model": model.state_dict(), "model_kwargs": cfg.model_kwargs(), "metrics": metrics}
    torch.save(state | {"config": cfg.to_dict()}, tmp_path / "best.pt")
    extra = [{"benchmark": "levin", "images": 16, "psnr_blurry": 23.14, "ssim_blurry": 0.7, "psnr": 27, "ssim": 0.8}]
    return export_checkpoint(tmp_path / "best.pt", tmp_path / "export", extra)


def test_export_writes_a_loadable_folder_with_a_metrics_card(exported: Path) -> None:
    assert json.loads((exported / "config.json").read_text())["width"] == 8
    ALGNet.from_pretrained(exported)
    card = (exported / "README.md").read_text()
    assert "| validation (algnet-tiny, step 40) | 8 | 25.25 | 0.8000 | 30.50 | 0.9100 | +5.25 |" in card
    assert "| levin | 16 | 23.14 | 0.7000 | 27.00 | 0.8000 | +3.86 |" in card
    assert "steps: 40" in card and "ALGNet-S preset" in card


def test_eval_rows_read_algnet_eval_reports(tmp_path: Path) -> None:
    report = {
        "model": {},
        "images": [{"image": "a.png"}, {"image": "b.png"}],
        "mean": {
            "blurry": {"psnr": 23.1, "ssim": 0.7, "mae": 0.05},
            "restored": {"psnr": 27.2, "ssim": 0.8, "mae": 0.03},
        },
    }
    (tmp_path / "levin.json").write_text(json.dumps(report))
    assert eval_rows(f"Levin x Kodak24={tmp_path / 'levin.json'}") == [
        {
            "benchmark": "Levin x Kodak24",
            "images": 2,
            "psnr_blurry": 23.1,
            "psnr": 27.2,
            "ssim_blurry": 0.7,
            "ssim": 0.8,
        }
    ]


def test_publish_dry_run_lists_the_exact_files_and_the_card(exported: Path, capsys: pytest.CaptureFixture) -> None:
    assert publish_main([str(exported), "--repo-id", "someone/algnet-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    listed = [line.split()[0] for line in lines[1 : lines.index("")]]
    assert listed == ["README.md", "config.json", "model.safetensors"]
    assert "someone/algnet-tiny" in out and "| benchmark | images | blurry PSNR" in out and "| levin | 16 |" in out


def test_publish_uploads_through_hfapi(exported: Path, capsys: pytest.CaptureFixture) -> None:
    class FakeApi:
        def __init__(self) -> None:
            self.calls: list[tuple[str, tuple, dict]] = []

        def create_repo(self, *args: object, **kwargs: object) -> str:
            self.calls.append(("create_repo", args, kwargs))
            return "url"

        def upload_folder(self, **kwargs: object) -> str:
            self.calls.append(("upload_folder", (), kwargs))
            return "commit-info"

    api = FakeApi()
    assert publish_main([str(exported), "--repo-id", "someone/algnet-tiny", "--private"], api=api) == 0
    assert api.calls[0] == (
        "create_repo",
        ("someone/algnet-tiny",),
        {"repo_type": "model", "private": True, "exist_ok": True},
    )
    name, _, kwargs = api.calls[1]
    assert name == "upload_folder" and kwargs["repo_id"] == "someone/algnet-tiny"
    assert kwargs["folder_path"] == str(exported) and kwargs["repo_type"] == "model"
    assert kwargs["allow_patterns"] == ["README.md", "config.json", "model.safetensors"]
    (exported / "notes[v2].md").write_text("a name that is also a glob pattern")
    assert publish_main([str(exported), "--repo-id", "someone/algnet-tiny"], api=api) == 0
    names = [p.name for p in exported.iterdir()]
    uploaded = filter_repo_objects(names, allow_patterns=api.calls[-1][2]["allow_patterns"])  # the Hub client's filter
    assert sorted(uploaded) == sorted(names)
    (exported / "notes[v2].md").unlink()
    (exported / "README.md").write_text("no table")
    with pytest.raises(ValueError, match="evaluation table"):
        publish_main([str(exported), "--repo-id", "x/y", "--dry-run"])
