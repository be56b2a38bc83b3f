"""The ``algnet`` command and its image I/O: new files only, bit depth kept, eval numbers, info, convert."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import png
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from algnet_core.cli import main
from algnet_core.imageio import SAMPLE_IMAGE, Stack, read_image, write_image
from algnet_core.inference import deblur
from algnet_core.model import PRESETS, ALGNet

TINY = dict(width=8, middle_blk_num=1, enc_blk_nums=(1, 1, 1, 1), dec_blk_nums=(1, 1, 1, 1))
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def identity_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A save_pretrained folder of a tiny ALGNet with zero output convolutions (returns its input)."""
    torch.manual_seed(0)
    model = ALGNet(**TINY)
    with torch.no_grad():
        for conv in [model.ending, *model.ConvsOut]:
            conv.weight.zero_()
            conv.bias.zero_()
    folder = tmp_path_factory.mktemp("identity")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    ALGNet(**TINY).save_pretrained(folder)
    return folder


PAGES = {
    "grey8.png": (RNG.random((1, 32, 40)) * 255).astype(np.uint8),
    "rgb16.png": (RNG.random((1, 32, 40, 3)) * 65535).astype(np.uint16),
    "rgba8.png": (RNG.random((1, 32, 40, 4)) * 255).astype(np.uint8),
    "stack16.tif": (RNG.random((3, 32, 40)) * 65535).astype(np.uint16),
    "rgb8.tiff": (RNG.random((1, 32, 40, 3)) * 255).astype(np.uint8),
    "photo.jpg": np.broadcast_to(np.linspace(0, 250, 40, dtype=np.uint8)[None, None, :, None], (1, 32, 40, 3)),
}


def _write_inputs(folder: Path) -> None:
    folder.mkdir()
    for name, pages in PAGES.items():
        shape = pages.shape if len(pages) > 1 else pages.shape[1:]
        write_image(folder / name, Stack(pages, shape))


@pytest.mark.parametrize("name", list(PAGES))
def test_image_files_round_trip(name, tmp_path) -> None:
    _write_inputs(tmp_path / "in")
    stack = read_image(tmp_path / "in" / name)
    assert stack.pages.shape == PAGES[name].shape and stack.pages.dtype == PAGES[name].dtype
    if name.endswith(".jpg"):
        assert peak_signal_noise_ratio(PAGES[name], stack.pages) > 35  # lossy
    else:
        assert np.array_equal(stack.pages, PAGES[name])
    with pytest.raises(FileExistsError):
        write_image(tmp_path / "in" / name, stack)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_deblur_writes_new_files_keeping_bit_depth(tiny_dir, tmp_path, capsys) -> None:
    _write_inputs(tmp_path / "in")
    before = _digests(tmp_path / "in")
    args = ["deblur", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(tiny_dir), "--tile", "none"]
    assert main(args) == 0
    assert _digests(tmp_path / "in") == before
    for name, pages in PAGES.items():
        out = read_image(tmp_path / "out" / name)
        assert out.pages.shape == pages.shape and out.pages.dtype == pages.dtype
        assert not np.array_equal(out.pages, read_image(tmp_path / "in" / name).pages)
    written = _digests(tmp_path / "out")
    assert main(args) == 1  # outputs exist: refused, nothing touched
    assert "exists" in capsys.readouterr().err and _digests(tmp_path / "out") == written
    inplace = ["deblur", str(tmp_path / "in" / "grey8.png"), "-o", str(tmp_path / "in"), "--overwrite"]
    assert main([*inplace, "--model", str(tiny_dir)]) == 1  # never an input, even with --overwrite
    assert "is an input" in capsys.readouterr().err and _digests(tmp_path / "in") == before


def test_deblur_globs_and_sample(identity_dir, tmp_path) -> None:
    _write_inputs(tmp_path / "in")
    pattern = str(tmp_path / "in" / "*.png")
    assert main(["deblur", pattern, "--sample", "-o", str(tmp_path / "out"), "--model", str(identity_dir)]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["grey8.png", "motion_blurred_astronaut.png", "rgb16.png", "rgba8.png"]
    sample = read_image(SAMPLE_IMAGE).pages
    assert np.array_equal(read_image(tmp_path / "out" / SAMPLE_IMAGE.name).pages, sample)
    assert SAMPLE_IMAGE.stat().st_size < 300_000 and sample.shape == (1, 256, 256, 3)


def test_missing_input_is_an_error(tmp_path, capsys) -> None:
    assert main(["deblur", str(tmp_path / "nothing.png"), "-o", str(tmp_path / "out")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_eval_reports_blurry_baseline_and_restored(identity_dir, tmp_path, capsys) -> None:
    for folder in ("blur", "sharp"):
        (tmp_path / folder).mkdir()
    sharp = [(RNG.random((32, 40, 3)) * 255).astype(np.uint8) for _ in range(2)]
    for i, image in enumerate(sharp):
        blurry = np.clip(image.astype(int) + RNG.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
        write_image(tmp_path / "blur" / f"{i}.png", Stack(blurry[None], blurry.shape))
        write_image(tmp_path / "sharp" / f"{i}.png", Stack(image[None], image.shape))
    args = ["eval", str(tmp_path / "blur"), str(tmp_path / "sharp"), "--model", str(identity_dir)]
    assert main([*args, "--csv", str(tmp_path / "m.csv"), "--json", str(tmp_path / "m.json")]) == 0
    table = capsys.readouterr().out
    assert "PSNR blurry" in table and "mean" in table
    report = json.loads((tmp_path / "m.json").read_text())
    expected = [
        peak_signal_noise_ratio(image, read_image(tmp_path / "blur" / f"{i}.png").pages[0])
        for i, image in enumerate(sharp)
    ]
    assert [r["blurry"]["psnr"] for r in report["images"]] == pytest.approx(expected)
    assert report["mean"]["restored"] == pytest.approx(report["mean"]["blurry"])  # identity model
    rows = list(csv.reader((tmp_path / "m.csv").open()))
    assert rows[0][0] == "image" and [r[0] for r in rows[1:]] == ["0.png", "1.png", "mean"]


def test_info_prints_backend_models_and_cost(capsys) -> None:
    assert main(["info", "--preset", "ALGNet-S"]) == 0
    out = capsys.readouterr().out
    assert "selective-scan backend" in out and "motion" in out and "auto tile for ALGNet-S" in out
    assert "4,131,148" in out  # the cost report's parameter count of ALGNet-S


def test_convert_command(tmp_path, capsys) -> None:
    torch.manual_seed(1)
    model = ALGNet(**PRESETS["ALGNet-S"])
    torch.save({"params": model.state_dict()}, tmp_path / "official.pth")
    assert main(["convert", str(tmp_path / "official.pth"), "-o", str(tmp_path / "out")]) == 0
    assert "ALGNet-S" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "config.json").is_file()
    torch.save({"params": {"x": torch.zeros(1)}}, tmp_path / "bad.pth")
    assert main(["convert", str(tmp_path / "bad.pth"), "-o", str(tmp_path / "bad")]) == 1
    assert "not a checkpoint of a known ALGNet configuration" in capsys.readouterr().err


def test_eval_of_float_images_outside_0_1_uses_the_sharp_images_range(identity_dir, tmp_path) -> None:
    for folder in ("blur", "sharp"):
        (tmp_path / folder).mkdir()
    sharp = (RNG.random((32, 40)) * 900 + 50).astype(np.float32)  # e.g. microscopy counts, 50..950
    blurry = sharp + RNG.normal(0, 20, sharp.shape).astype(np.float32)
    write_image(tmp_path / "blur" / "a.tif", Stack(blurry[None], blurry.shape))
    write_image(tmp_path / "sharp" / "a.tif", Stack(sharp[None], sharp.shape))
    args = ["eval", str(tmp_path / "blur"), str(tmp_path / "sharp"), "--model", str(identity_dir), "--tile", "none"]
    assert main([*args, "--json", str(tmp_path / "m.json")]) == 0
    span = float(sharp.max()) - float(sharp.min())
    mse = np.mean((blurry.astype(np.float64) - sharp) ** 2)
    blurry_scores = json.loads((tmp_path / "m.json").read_text())["images"][0]["blurry"]
    assert blurry_scores["psnr"] == pytest.approx(10 * np.log10(span**2 / mse))  # ~33 dB; with R = 1: -26 dB
    assert blurry_scores["mae"] == pytest.approx(np.abs(blurry.astype(np.float64) - sharp).mean() / span)


def test_deblur_passes_the_alpha_of_grey_alpha_pngs_through_like_rgba(tiny_dir, tmp_path) -> None:
    grey = (RNG.random((32, 40)) * 255).astype(np.uint8)
    alpha = np.zeros((32, 40), np.uint8)
    alpha[8:24, 10:30] = 255  # an opaque box on a transparent background
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "ga.png", Stack(np.dstack([grey, alpha])[None], (32, 40, 2)))
    assert main(["deblur", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(tiny_dir)]) == 0
    out = read_image(tmp_path / "out" / "ga.png").pages[0]
    assert out.shape == (32, 40, 2) and np.array_equal(out[..., 1], alpha)  # alpha untouched
    assert np.array_equal(out[..., 0], deblur(grey, ALGNet.from_pretrained(tiny_dir)))  # grey as a grey image
    assert not np.array_equal(out[..., 0], grey)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "RGB+tRNS", "I;16"])
def test_png_pixels_are_those_pypng_decodes(mode, tmp_path) -> None:
    """8-bit PNGs are read by Pillow (fast), the rest by pypng: both give pypng's direct decoding."""
    rgb = (RNG.random((20, 30, 3)) * 255).astype(np.uint8)
    image = {
        "L": Image.fromarray(rgb[..., 0]),
        "LA": Image.fromarray(rgb[..., :2].copy()),
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "P": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE),
        "RGB+tRNS": Image.fromarray(rgb),
        "I;16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257 + 3),
    }[mode]
    image.save(tmp_path / "x.png", **({"transparency": tuple(rgb[0, 0].tolist())} if mode == "RGB+tRNS" else {}))
    width, height, rows, info = png.Reader(filename=str(tmp_path / "x.png")).asDirect()
    expected = np.vstack([np.asarray(row) for row in rows]).reshape(height, width, info["planes"])
    expected = expected[..., 0] if info["planes"] == 1 else expected
    got = read_image(tmp_path / "x.png").pages[0]
    assert got.shape == expected.shape and np.array_equal(got, expected)


def test_convert_refuses_an_existing_config(tmp_path, capsys) -> None:
    torch.manual_seed(1)
    torch.save({"params": ALGNet(**PRESETS["ALGNet-S"]).state_dict()}, tmp_path / "official.pth")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text('{"mine": true}\n')
    assert main(["convert", str(tmp_path / "official.pth"), "-o", str(tmp_path / "out")]) == 1
    assert "config.json exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "config.json").read_text() == '{"mine": true}\n'
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert main(["convert", str(tmp_path / "official.pth"), "-o", str(tmp_path / "out"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["width"] == PRESETS["ALGNet-S"]["width"]
