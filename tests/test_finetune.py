"""Fine-tuning on your own blur (train/finetune.py, ``algnet finetune``): PSF files, checks, runs, cancel, CLI."""

from __future__ import annotations

import csv
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
import yaml
from helpers import active_tiny
from PIL import Image
from scipy.signal import fftconvolve
from skimage.metrics import peak_signal_noise_ratio

from algnet_core import ALGNet, deblur
from algnet_core.cli import main as cli_main
from train import kernels
from train.data import BlurRecipe, SyntheticBlur
from train.engine import Trainer
from train.finetune import FineTuner, _Plan, load_planes, split

FAST = {"crop": 32, "batch": 2, "lr": 1e-3}
"""A tiny run: 32 px crops, two per step, a learning rate that moves a tiny model within a few steps."""


def scene(rng: np.random.Generator, h: int = 48, w: int = 56) -> np.ndarray:
    """A float image in 0..1 with sharp edges (random rectangles on a smooth background): blur changes it."""
    yy, xx = np.mgrid[:h, :w]
    image = 0.2 + 0.1 * np.sin(xx / 7 + rng.uniform(0, 6)) * np.cos(yy / 5)
    for _ in range(6):
        top, left = rng.integers(0, h - 8), rng.integers(0, w - 8)
        image[top : top + rng.integers(4, 16), left : left + rng.integers(4, 16)] = rng.uniform(0.3, 1.0)
    return np.clip(image, 0, 1)


def off_centre_psf() -> np.ndarray:
    """An unnormalised 15x15 PSF, a Gaussian whose peak sits 1 px below and 1 px left of the array's centre."""
    psf = np.zeros((15, 15))
    psf[2:, :13] = kernels.gaussian_kernel(1.2, size=13) * 7.0
    return psf


@pytest.fixture(scope="module")
def start_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny save_pretrained folder with every block active: the starting model of the runs."""
    folder = tmp_path_factory.mktemp("start") / "tiny"
    active_tiny(seed=3).save_pretrained(folder)
    return folder


@pytest.fixture
def sharp_dir(tmp_path: Path) -> Path:
    """Five 8-bit grey PNGs with edges."""
    folder = tmp_path / "sharp"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(np.round(scene(rng) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def psf_file(tmp_path: Path) -> Path:
    path = tmp_path / "psf.tif"
    tifffile.imwrite(path, off_centre_psf().astype(np.float32))
    return path


# ----------------------------------------------------------------------------------------- PSF
@pytest.mark.parametrize("suffix", [".npy", ".tif"])
def test_a_psf_file_round_trips_into_the_blur_generator_normalised_and_centred(tmp_path: Path, suffix: str) -> None:
    psf = off_centre_psf()
    path = tmp_path / f"psf{suffix}"
    if suffix == ".npy":
        np.save(path, psf)
    else:
        tifffile.imwrite(path, psf[None].astype(np.float32))  # one page: (1, h, w)
    recipe = BlurRecipe(kind="psf", psf=str(path), gaussian_sigma=(0, 0), quantise=False)
    kernel = recipe.kernel(np.random.default_rng(0))
    # Normalised and moved by whole pixels so that the peak (the centre of mass) is the central pixel of an
    # odd square: (8, 6) of the 15x15 array becomes (8, 8) of a 17x17 kernel.
    expected = np.zeros((17, 17))
    expected[0:15, 2:17] = psf / psf.sum()
    np.testing.assert_allclose(kernel, expected, rtol=1e-6, atol=1e-12)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12) and recipe.kernel_size == 17
    rows, cols = np.indices(kernel.shape)
    assert abs((rows * kernel).sum() - 8) < 0.5 and abs((cols * kernel).sum() - 8) < 0.5
    side = 17
    # A point in the sharp image becomes the PSF, centred on the point, in the blurred one.
    point = np.zeros((41, 41, 3), dtype=np.float32)
    point[20, 20] = 1.0
    data = SyntheticBlur([], crop=None, recipe=recipe, train=False, images=[point])
    blurred, sharp = data[0]
    assert torch.equal(sharp, torch.from_numpy(point.transpose(2, 0, 1).copy()))
    m = side // 2
    np.testing.assert_allclose(blurred[0, 20 - m : 21 + m, 20 - m : 21 + m].numpy(), kernel, atol=1e-7)
    assert blurred[0].sum().item() == pytest.approx(1.0, abs=1e-5)


def test_bad_psfs_are_refused_with_the_reason(tmp_path: Path) -> None:
    psf = off_centre_psf()
    nan = psf.copy()
    nan[3, 4] = np.nan
    cases = {
        "nan": (nan, "1 NaN or Inf values"),
        "negative": (psf - 0.01, "negative values"),
        "zeros": (np.zeros((5, 5)), "all zeros"),
        "empty": (np.zeros((0, 5)), "empty"),
        "stack": (np.stack([psf, psf, psf]), r"2-D PSF \(one plane\)"),
    }
    for name, (array, message) in cases.items():
        path = tmp_path / f"{name}.npy"
        np.save(path, array)
        with pytest.raises(ValueError, match=message) as err:
            kernels.load_psf(path)
        assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="no PSF file"):
        kernels.load_psf(tmp_path / "missing.tif")


def test_fine_tuning_refuses_bad_inputs_before_training(
    tmp_path: Path, sharp_dir: Path, psf_file: Path, start_model: Path
) -> None:
    def tuner(out: str = "out", sharp: object = sharp_dir, **kwargs: object) -> FineTuner:
        options = {"psf": psf_file, "steps": 1, "model": start_model, **FAST} | kwargs
        return FineTuner(tmp_path / out, sharp, **options)

    with pytest.raises(ValueError, match=r"the 17x17 PSF is larger than the 16x16 training crop"):
        tuner(crop=16)
    big = tmp_path / "big.npy"
    np.save(big, kernels.gaussian_kernel(8.0, size=49))
    with pytest.raises(ValueError, match=r"49x49 PSF is larger than the 32x32 training crop"):
        tuner(psf=big)
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((5, 5), np.nan))
    with pytest.raises(ValueError, match="nan.npy has 25 NaN"):
        tuner(psf=nan)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.stack([off_centre_psf()] * 5).astype(np.float32))  # a z-stack
    with pytest.raises(ValueError, match=r"stack.tif has shape \(5, 15, 15\): training on 2-D images needs a 2-D PSF"):
        tuner(psf=stack)
    one = tmp_path / "one"
    one.mkdir()
    (sharp_dir / "0.png").rename(one / "0.png")
    with pytest.raises(ValueError, match="1 image plane given: .* at least 2"):
        tuner(sharp=one)
    with pytest.raises(ValueError, match="exactly one source of blur"):
        tuner(defocus_radius=(1, 2))
    with pytest.raises(ValueError, match="exactly one budget"):
        tuner(minutes=1.0)
    with pytest.raises(ValueError, match=r"image 0 has shape \(5, 40, 40\).*list\(stack\)"):
        tuner(sharp=[np.zeros((5, 40, 40), np.uint16)])
    with pytest.raises(ValueError, match="warmup_steps must be 0 or more"):
        tuner(warmup_steps=-5)
    grey = np.random.default_rng(0).integers(0, 255, (40, 40))
    blurry, sharp = [grey.astype(np.uint8)] * 2, [(grey * 257).astype(np.uint16)] * 2  # one 8-bit, one 16-bit export
    with pytest.raises(ValueError, match=r"blurry image 0 \(uint8\) and sharp image 0 \(uint16\) differ in bit depth"):
        tuner(psf=None, blur=blurry, sharp=sharp)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="taken exists"):
        tuner(out="taken")
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"


def test_planes_follow_deblurs_mapping_and_stacks_count_page_by_page(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    twelve_bit = np.round(scene(rng) * 4000 + 100).astype(np.uint16)  # a 12-bit camera: mapped by its range
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([twelve_bit, twelve_bit // 2 + 50]))
    Image.fromarray(np.round(scene(rng) * 255).astype(np.uint8)).convert("RGB").save(tmp_path / "colour.png")
    planes = load_planes(tmp_path)
    assert [Path(p.name).name for p in planes] == ["colour.png", "stack.tif [page 0]", "stack.tif [page 1]"]
    assert [p.bits for p in planes] == [8, 16, 16]
    page = planes[1].data
    assert page.shape == (48, 56, 3) and page.dtype == np.float32
    assert page.min() == 0.0 and page.max() == 1.0  # the page's own 12-bit range, as deblur maps it
    lo, hi = twelve_bit.min(), twelve_bit.max()
    np.testing.assert_allclose(page[..., 1], (twelve_bit - lo) / (hi - lo), atol=1e-6)
    assert split(5, 0.2, seed=0) == ([0, 1, 3, 4], [2])
    train, val = split(200, 0.2, seed=0)
    assert len(val) == 8 and len(train) == 192 and not set(train) & set(val)


def test_blurred_twelve_bit_training_inputs_span_the_range_deblur_gives_them(start_model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    spots = np.zeros((128, 128))
    ys, xs = rng.integers(8, 120, size=(2, 30))
    spots[ys, xs] = rng.uniform(0.5, 1.0, size=30)
    psf = kernels.gaussian_kernel(2.0, size=15)
    images = [np.round(100 + 3000 * np.roll(spots, 7 * i, axis=1) / spots.max()).astype(np.uint16) for i in range(3)]
    tuner = FineTuner(tmp_path / "tuned", images, psf=psf, noise=0.005, steps=1, model=start_model, **FAST)
    blurred, sharp = tuner.val_set[0]  # a fixed blur of a held-back plane, as the training draws them
    # deblur maps a blurry 12-bit image by its own min..max: its spots reach 1, not the third of 1 that the sharp
    # plane's range leaves them after the blur
    assert 0.85 < float(blurred.max()) < 1.1 and float(blurred.min()) < 0.05
    assert float(sharp.max()) > 2.0  # the sharp spots are brighter than any blurry pixel
    # validation scores them over the sharp plane's own extent (a data range of 1 would be ~20 dB off)
    result = tuner.run()
    pairs = [tuner.val_set[i] for i in range(len(tuner.val_set))]
    expected = np.mean([
        peak_signal_noise_ratio(s.numpy(), b.numpy(), data_range=float(s.max()) - min(0.0, float(s.min())))
        for b, s in pairs
    ])  # fmt: skip
    assert result.psnr_blurry == pytest.approx(expected, abs=1e-3)
    # Random blurs (a defocus range) dim the spots more or less than the range was estimated for: a lighter one
    # reaches past 1, and the training input is never cut flat there (deblur never sees a clipped image)
    varied = FineTuner(tmp_path / "v", images, defocus_radius=(1, 6), steps=1, model=start_model, **FAST)
    peaks = [float(varied.train_set[(0, i)][0].max()) for i in range(len(varied.train_set))]
    assert max(peaks) > 1.05 and not any(p == 1.0 for p in peaks)


# ----------------------------------------------------------------------------------------- runs
def test_a_short_fine_tune_lowers_the_validation_loss_and_writes_a_loadable_model(
    tmp_path: Path, sharp_dir: Path, psf_file: Path, start_model: Path
) -> None:
    calls: list[tuple[int, int, float]] = []
    out = tmp_path / "tuned"
    result = FineTuner(
        out,
        sharp_dir,
        psf=psf_file,
        noise=0.01,
        steps=6,
        model=start_model,
        progress=lambda *a: calls.append(a),
        **FAST,
    ).run()
    assert result.steps == 6 and not result.cancelled and (result.train_images, result.val_images) == (4, 1)
    assert result.psnr_tuned > result.psnr_start + 0.5 and result.best_step > 0
    assert [c[:2] for c in calls] == [(step, 6) for step in range(7)]
    assert calls[0][2] == result.psnr_start
    with (out / "training" / "val.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # every tenth of the run, and the end
    best = max(rows, key=lambda r: float(r["psnr"]))
    assert int(best["step"]) == result.best_step and float(best["psnr"]) == pytest.approx(result.psnr_tuned)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "psf.npy",
        "training",
    ]
    assert sorted(p.name for p in (out / "training").iterdir()) == ["config.yaml", "train.csv", "val.csv"]
    np.testing.assert_allclose(np.load(out / "psf.npy"), kernels.load_psf(psf_file))
    card = (out / "README.md").read_text()
    assert "Fine-tuned from" in card and str(psf_file) in card and "2.png" in card  # the held-back image
    assert f"| validation (tuned, step {result.best_step}) | 1 | {result.psnr_blurry:.2f} |" in card
    assert f"| validation, starting model {start_model} | 1 | {result.psnr_blurry:.2f} |" in card
    model = ALGNet.from_pretrained(out)
    start = ALGNet.from_pretrained(start_model)
    image = np.asarray(Image.open(sharp_dir / "2.png"))
    assert not np.array_equal(deblur(image, model=out, tile=None), deblur(image, model=start, tile=None))
    assert model._hub_mixin_config == start._hub_mixin_config


def test_cancel_keeps_the_best_model_so_far_as_a_valid_folder(
    tmp_path: Path, sharp_dir: Path, psf_file: Path, start_model: Path
) -> None:
    def stop_at_two(step: int, total: int, psnr: float) -> None:
        if step == 2:
            tuner.cancel()

    tuner = FineTuner(
        tmp_path / "a",
        sharp_dir,
        psf=psf_file,
        steps=50,
        model=start_model,
        progress=stop_at_two,
        warmup_steps=0,
        **FAST,
    )
    result = tuner.run()
    assert result.cancelled and result.steps == 2
    assert result.best_step == 2 and result.psnr_tuned > result.psnr_start  # validated on cancel: kept
    with (tmp_path / "a" / "training" / "train.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2]  # the two steps before the cancel, logged
    assert yaml.safe_load((tmp_path / "a" / "training" / "config.yaml").read_text())["run"]["steps"] == 2
    tuned = ALGNet.from_pretrained(tmp_path / "a")
    assert "| validation (a, step" in (tmp_path / "a" / "README.md").read_text()
    # Cancelled before the first step: the folder holds the starting model, validated.
    early = FineTuner(tmp_path / "b", sharp_dir, psf=psf_file, steps=50, model=start_model, **FAST)
    early.cancel()
    result = early.run()
    assert result.cancelled and result.steps == 0 and result.best_step == 0
    assert result.psnr_tuned == result.psnr_start
    start = ALGNet.from_pretrained(start_model).state_dict()
    written = ALGNet.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(written[k], v) for k, v in start.items())
    assert any(not torch.equal(tuned.state_dict()[k], v) for k, v in start.items())


def test_a_diverged_run_never_replaces_the_starting_model(
    tmp_path: Path, sharp_dir: Path, psf_file: Path, start_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validations after the first come out NaN (a run that diverged): NaN is never the best, so the folder
    holds the starting model, as the promise "never worse than the starting model" says."""
    real, calls = Trainer.validate, []

    def diverged(self: Trainer) -> dict[str, float]:
        calls.append(1)
        return real(self) | ({"psnr": math.nan} if len(calls) > 1 else {})

    monkeypatch.setattr(Trainer, "validate", diverged)
    result = FineTuner(tmp_path / "a", sharp_dir, psf=psf_file, steps=2, model=start_model, **FAST).run()
    assert len(calls) >= 2 and result.best_step == 0 and result.psnr_tuned == result.psnr_start
    start = ALGNet.from_pretrained(start_model).state_dict()
    written = ALGNet.from_pretrained(tmp_path / "a").state_dict()
    assert all(torch.equal(written[k], v) for k, v in start.items())


def test_a_time_budget_plans_the_steps_and_ends_with_a_validation(
    tmp_path: Path, sharp_dir: Path, start_model: Path
) -> None:
    result = FineTuner(tmp_path / "t", sharp_dir, defocus_radius=(1, 3), minutes=0.05, model=start_model, **FAST).run()
    with (tmp_path / "t" / "training" / "val.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert result.steps >= 1 and steps[-1] == result.steps  # the planned last step was validated
    config = (tmp_path / "t" / "training" / "config.yaml").read_text()
    assert "defocus_radius:\n      - 1.0\n      - 3.0" in config
    recorded = yaml.safe_load(config)
    assert recorded["run"]["steps"] == result.steps  # the steps that ran, not the placeholder of the plan


def test_a_time_budget_too_short_to_calibrate_is_not_all_warm_up() -> None:
    cfg = SimpleNamespace(run=SimpleNamespace(steps=10**9), log=SimpleNamespace(val_every=10**9),
                          optim=SimpleNamespace(warmup_steps=20))  # fmt: skip
    plan = _Plan(time.monotonic() - 10.0, minutes=25 / 60, val_seconds=0.0)  # 10 s for step 1, 15 s left
    plan.update(SimpleNamespace(step=1, cfg=cfg))
    assert cfg.run.steps == 2  # ends before the third step, where the warm-up used to be re-planned
    assert cfg.optim.warmup_steps == 0 and cfg.log.val_every == 1  # step 2 at the full rate, then validated


def test_paired_16_bit_stacks_and_in_memory_layers_train(tmp_path: Path, start_model: Path) -> None:
    rng = np.random.default_rng(2)
    (tmp_path / "blur").mkdir()
    (tmp_path / "sharp").mkdir()
    for i in range(2):
        sharp = np.stack([scene(rng) for _ in range(2)])
        blurred = fftconvolve(sharp, kernels.disk_kernel(2.0)[None], mode="same", axes=(1, 2))
        tifffile.imwrite(tmp_path / "sharp" / f"{i}.tif", np.round(sharp * 65535).astype(np.uint16))
        tifffile.imwrite(tmp_path / "blur" / f"{i}.tif", np.round(np.clip(blurred, 0, 1) * 65535).astype(np.uint16))
    result = FineTuner(
        tmp_path / "p", tmp_path / "sharp", blur=tmp_path / "blur", steps=2, model=start_model, **FAST
    ).run()
    assert (result.train_images, result.val_images) == (3, 1)
    assert result.psnr_blurry < 35  # the disk blur, seen through deblur's 16-bit mapping
    assert "paired with their blurry versions" in (tmp_path / "p" / "README.md").read_text()
    layers = {
        "cells": np.round(scene(rng) * 60000).astype(np.uint16),
        "rgb": (scene(rng, 40, 40)[..., None] * [255, 200, 100]).astype(np.uint8),
    }
    result = FineTuner(tmp_path / "m", layers, motion_length=(3, 7), steps=1, model=start_model, **FAST).run()
    assert (result.train_images, result.val_images) == (1, 1)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "given in memory" in card and "camera shake of 3 to 7 px" in card


def test_the_warm_up_raises_the_rate_linearly_then_follows_the_cosine(tmp_path: Path, sharp_dir: Path) -> None:
    tuner = FineTuner(tmp_path / "w", sharp_dir, defocus_radius=(1, 2), steps=10, **FAST)  # warm-up 10 // 5 = 2
    assert tuner.warmup == 2
    trainer = Trainer(tuner._config(tmp_path / "work"), tuner.train_set, tuner.val_set, torch.device("cpu"))
    lr, low = 1e-3, 1e-5
    cosine = [(low + (lr - low) * 0.5 * (1 + math.cos(math.pi * s / 10))) / lr for s in range(11)]
    assert [trainer.lr_factor(s) for s in range(11)] == pytest.approx([cosine[0] / 2, *cosine[1:]], rel=1e-12)
    assert trainer.scheduler.get_last_lr() == [pytest.approx(lr / 2)]  # the first step's rate


# ----------------------------------------------------------------------------------------- CLI
def test_algnet_finetune_end_to_end(
    tmp_path: Path, sharp_dir: Path, psf_file: Path, start_model: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cli"
    args = ["finetune", str(sharp_dir), "--psf", str(psf_file), "--steps", "2", "--model", str(start_model)]
    args += ["--crop", "32", "--batch", "2", "--noise", "0.02", "-o", str(out)]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "done: 2 steps" in printed and "fine-tuned" in printed and f"wrote {out}" in printed
    ALGNet.from_pretrained(out)
    assert "Gaussian noise sigma 0.02" in (out / "README.md").read_text()
    before = sorted(p.name for p in out.iterdir())
    assert cli_main(args) == 1  # the folder exists now: refused, left as it is
    assert "exists" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == before
    assert cli_main(["finetune", "--blur-dir", str(sharp_dir), "--sharp-dir", str(sharp_dir), "--noise", "0.1",
                     "--steps", "1", "-o", str(tmp_path / "x")]) == 1  # fmt: skip
    assert "noise and poisson apply to synthetic blur" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["finetune", str(sharp_dir), "--psf", str(psf_file), "-o", str(tmp_path / "y")])  # no budget
    assert "one of the arguments --minutes --steps is required" in capsys.readouterr().err


def test_ctrl_c_stops_algnet_finetune_with_the_best_model_so_far(
    tmp_path: Path, sharp_dir: Path, psf_file: Path, start_model: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "stopped"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job of a shell

    def interrupt_once_training_started() -> None:
        while not (out / "training" / "config.yaml").exists():  # written when the training loop starts
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_training_started, daemon=True).start()
    args = ["finetune", str(sharp_dir), "--psf", str(psf_file), "--steps", "500", "--model", str(start_model)]
    assert cli_main([*args, "--crop", "32", "--batch", "2", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "SIGINT: stopping after this step" in captured.err and "cancelled:" in captured.out
    assert int(captured.out.split("cancelled: ")[1].split()[0]) < 500
    ALGNet.from_pretrained(out)
    assert signal.getsignal(signal.SIGINT) is before  # put back


def test_a_missing_training_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for name in [m for m in sys.modules if m.startswith("algnet_train.") and m != "algnet_train.finetune_cli"]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh, as in a new process
        monkeypatch.delattr(sys.modules["algnet_train"], name.partition(".")[2], raising=False)
    monkeypatch.setitem(sys.modules, "scipy.signal", None)  # as if SciPy were not installed
    assert cli_main(["finetune", "x", "--psf", "p.tif", "--steps", "1", "-o", "out"]) == 1
    err = capsys.readouterr().err
    assert "fine-tuning needs SciPy (module 'scipy.signal' is missing): pip install 'algnet[train]'" in err
