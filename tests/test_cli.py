"""The ``algnet`` command and its image I/O: new files only, bit depth kept, eval numbers, info, convert."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import png
import pytest
import tifffile
import torch
from helpers import TINY
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from algnet_core.cli import main
from algnet_core.imageio import SAMPLE_IMAGE, Stack, read_image, write_image
from algnet_core.inference import deblur
from algnet_core.model import PRESETS, ALGNet

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


def test_linked_inputs_keep_the_links_names(identity_dir, tmp_path) -> None:
    """A symbolic link is written under its own name (not its target's); a file named twice is deblurred once;
    an output that is a link to an input is refused even with --overwrite."""
    _write_inputs(tmp_path / "in")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "holiday.png").symlink_to(tmp_path / "in" / "rgba8.png")
    items = [str(tmp_path / "links"), str(tmp_path / "in" / "rgba8.png"), str(tmp_path / "in" / "grey8.png")]
    assert main(["deblur", *items, "-o", str(tmp_path / "out"), "--model", str(identity_dir)]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["grey8.png", "holiday.png"]
    assert np.array_equal(read_image(tmp_path / "out" / "holiday.png").pages, PAGES["rgba8.png"])
    (tmp_path / "out" / "rgba8.png").symlink_to(tmp_path / "in" / "rgba8.png")
    item = str(tmp_path / "in" / "rgba8.png")
    assert main(["deblur", item, "-o", str(tmp_path / "out"), "--model", str(identity_dir), "--overwrite"]) == 1
    assert np.array_equal(read_image(tmp_path / "in" / "rgba8.png").pages, PAGES["rgba8.png"])


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
    card = (tmp_path / "out" / "README.md").read_text()  # its own card, not the mixin's generic one
    assert "# ALGNet (ALGNet-S), converted from `official.pth`" in card and "license: unknown" in card
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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--overlap", "-8"], "argument --overlap: expected a whole number of pixels >= 0, got '-8'"),
        (["--tile", "8"], "argument --tile: expected 'auto', 'none' or whole pixels >= 16, got '8'"),
        (["--tile", "64", "--overlap", "32"], "--tile 64 is too small for --overlap 32"),
        (["--normalize", "percentile", "--percentiles", "99", "1"], "need 0 <= LOW < HIGH <= 100"),
        (["--percentiles", "1", "99"], "--percentiles applies to --normalize percentile only"),
    ],
)
def test_bad_tiling_and_normalisation_options_are_usage_errors(options, message, identity_dir, tmp_path, capsys):
    _write_inputs(tmp_path / "in")
    args = ["deblur", str(tmp_path / "in" / "grey8.png"), "-o", str(tmp_path / "out"), "--model", str(identity_dir)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *options])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_normalize_percentiles_and_ensemble_reach_deblur(active_dir, tmp_path) -> None:
    counts = (RNG.random((32, 40)) * 2000 + 600).astype(np.uint16)  # a 12-bit camera: "auto" is "range"
    model = ALGNet.from_pretrained(active_dir)
    runs = {
        "default": ([], {}),
        "dtype": (["--normalize", "dtype"], {"normalize": "dtype"}),
        "percentile": (
            ["--normalize", "percentile", "--percentiles", "5", "95"],
            {"normalize": "percentile", "percentiles": (5.0, 95.0)},
        ),
        "ensemble": (["--ensemble"], {"ensemble": True}),
    }
    outputs = {}
    for name, (options, kwargs) in runs.items():
        image = counts.astype(np.float32) if name == "percentile" else counts  # float: the same 600..2600 range
        (tmp_path / name).mkdir()
        write_image(tmp_path / name / "cam.tif", Stack(image[None], image.shape))
        args = ["deblur", str(tmp_path / name), "-o", str(tmp_path / name / "out"), "--model", str(active_dir)]
        assert main([*args, "--tile", "none", *options]) == 0
        outputs[name] = read_image(tmp_path / name / "out" / "cam.tif").pages[0]
        assert np.array_equal(outputs[name], deblur(image, model, tile=None, **kwargs)), name
    for name in ("dtype", "percentile", "ensemble"):  # each option changes the result
        assert np.abs(outputs[name].astype(float) - outputs["default"]).max() > 5, name


def test_eval_refuses_to_overwrite_reports_and_writes_standard_json(identity_dir, tmp_path, capsys) -> None:
    for folder in ("blur", "sharp"):
        (tmp_path / folder).mkdir()
    image = (RNG.random((32, 40, 3)) * 255).astype(np.uint8)
    for folder in ("blur", "sharp"):  # identical pair: PSNR is infinite
        write_image(tmp_path / folder / "0.png", Stack(image[None], image.shape))
    (tmp_path / "old.csv").write_text("my notes\n")
    before = _digests(tmp_path / "blur")
    args = ["eval", str(tmp_path / "blur"), str(tmp_path / "sharp"), "--model", str(identity_dir), "--tile", "none"]
    assert main([*args, "--csv", str(tmp_path / "old.csv")]) == 1
    assert "old.csv exists" in capsys.readouterr().err and (tmp_path / "old.csv").read_text() == "my notes\n"
    assert main([*args, "--json", str(tmp_path / "blur" / "0.png"), "--overwrite"]) == 1  # never an input
    assert "is an input image" in capsys.readouterr().err and _digests(tmp_path / "blur") == before
    assert main([*args, "--json", str(tmp_path / "m.json"), "--csv", str(tmp_path / "m.csv")]) == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    report = json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse)
    assert report["images"][0]["blurry"]["psnr"] is None and report["mean"]["restored"]["psnr"] is None
    assert report["images"][0]["blurry"]["ssim"] == pytest.approx(1.0) and report["failed"] == []
    assert list(csv.reader((tmp_path / "m.csv").open()))[1][1] == "inf"
    assert main([*args, "--csv", str(tmp_path / "m.csv"), "--overwrite"]) == 0  # asked for: replaced


def test_one_bad_file_is_reported_by_name_and_the_others_deblurred(tiny_dir, tmp_path, capsys) -> None:
    _write_inputs(tmp_path / "in")
    good = sorted(PAGES)
    grey = (RNG.random((32, 40)) * 255).astype(np.uint8)
    Image.fromarray(np.dstack([grey] * 3)).save(tmp_path / "in" / "ok.png")
    data = (tmp_path / "in" / "ok.png").read_bytes()
    (tmp_path / "in" / "a_truncated.png").write_bytes(data[: len(data) // 2])
    rgb16 = (tmp_path / "in" / "rgb16.png").read_bytes()
    (tmp_path / "in" / "b_crc.png").write_bytes(rgb16[:-20] + bytes([rgb16[-20] ^ 0xFF]) + rgb16[-19:])  # pypng
    (tmp_path / "in" / "c_tiny.png").write_bytes(b"")
    write_image(tmp_path / "in" / "d_small.png", Stack(grey[None, :8, :8], (8, 8)))  # below one network tile
    Image.fromarray(np.dstack([grey] * 3)).convert("CMYK").save(tmp_path / "in" / "e_cmyk.jpg")
    bad = ["a_truncated.png", "b_crc.png", "c_tiny.png", "d_small.png"]
    args = ["deblur", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(tiny_dir), "--tile", "none"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"4 of {len(good) + 6} file(s) failed: {', '.join(bad)}" in err and "Traceback" not in err
    for name in bad:
        assert f"error: {(tmp_path / 'in' / name).resolve()}: " in err, name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*good, "e_cmyk.jpg", "ok.png"])
    with Image.open(tmp_path / "out" / "e_cmyk.jpg") as out:  # CMYK stays CMYK, K deblurred too
        assert out.mode == "CMYK"


@pytest.mark.parametrize(("photometric", "channels"), [("separated", 4), ("minisblack", 3)])
def test_cmyk_and_grey_sample_tiffs_deblur_channel_by_channel(photometric, channels, active_dir, tmp_path) -> None:
    """CMYK inks and e.g. three microscopy channels are not RGB (nor is K alpha): each is a grey image."""
    planes = (RNG.random((32, 40, channels)) * 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(
        tmp_path / "in" / "x.tif", planes, photometric=photometric, planarconfig="contig", resolution=(300, 300)
    )
    assert main(["deblur", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(active_dir)]) == 0
    model = ALGNet.from_pretrained(active_dir)
    with tifffile.TiffFile(tmp_path / "out" / "x.tif") as tif:
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC[photometric.upper()]
        assert tif.pages[0].resolution == (300, 300)
        out = tif.asarray()
    for c in range(channels):
        assert np.array_equal(out[..., c], deblur(planes[..., c], model)), c
    assert not np.array_equal(out[..., -1], planes[..., -1])


def test_jpeg_orientation_and_exif_are_kept(tiny_dir, tmp_path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    (tmp_path / "in").mkdir()
    photo = (RNG.random((32, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "in" / "phone.jpg", exif=exif)
    assert main(["deblur", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(tiny_dir)]) == 0
    with Image.open(tmp_path / "in" / "phone.jpg") as before, Image.open(tmp_path / "out" / "phone.jpg") as after:
        assert after.info["exif"] == before.info["exif"] and after.getexif()[0x0112] == 6
        assert after.size == (48, 32)  # pixels as stored: with the tag, the output displays like the input


def test_an_ome_tiff_of_12_significant_bits_stays_within_them(active_dir, tmp_path) -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(2000, 4096, (48, 64)).astype(np.uint16)
    data[10:30, 20:40] = 4095  # saturated by the camera
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "cells.ome.tif", data, ome=True, metadata={"SignificantBits": 12})
    assert deblur(data, model=str(active_dir), tile=None).max() > 4095  # what the uint16 range alone would allow
    assert main(["deblur", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(active_dir)]) == 0
    with tifffile.TiffFile(tmp_path / "out" / "cells.ome.tif") as tif:
        out = tif.asarray()
        assert 'SignificantBits="12"' in tif.pages[0].description
    assert out.dtype == np.uint16 and out.max() <= 4095 and not np.array_equal(out, data)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_write_leaves_no_partial_file(identity_dir, tmp_path, signum) -> None:
    _write_inputs(tmp_path / "in")
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        from algnet_core import cli, imageio

        def write_then_terminate(file, image, keep):
            file.write(b"half a PNG")
            os.kill(os.getpid(), {int(signum)})
            time.sleep(60)  # a handler that raises interrupts the sleep
            raise AssertionError("the signal did not stop the write")

        imageio._write_png = write_then_terminate
        sys.exit(cli.main(sys.argv[1:]))
        """
    )
    args = [str(tmp_path / "in" / "grey8.png"), "-o", str(tmp_path / "out" / "a"), "--model", str(identity_dir)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-c", script, "deblur", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + signum, done.stderr
    assert not (tmp_path / "out").exists()  # neither the output nor its .part temporary, nor the folders made
    assert "Traceback" not in done.stderr
    if signum == signal.SIGINT:
        assert "algnet deblur: interrupted" in done.stderr


def test_convert_refuses_an_existing_config(tmp_path, capsys) -> None:
    torch.manual_seed(1)
    torch.save({"params": ALGNet(**PRESETS["ALGNet-S"]).state_dict()}, tmp_path / "official.pth")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text('{"mine": true}\n')
    assert main(["convert", str(tmp_path / "official.pth"), "-o", str(tmp_path / "out")]) == 1
    assert "config.json exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "config.json").read_text() == '{"mine": true}\n'
    assert not (tmp_path / "out" / "model.safetensors").exists()
    (tmp_path / "out" / "README.md").write_text("my card of another model\n")
    assert main(["convert", str(tmp_path / "official.pth"), "-o", str(tmp_path / "out"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["width"] == PRESETS["ALGNet-S"]["width"]
    assert (tmp_path / "out" / "README.md").read_text() == "my card of another model\n"  # the user's: kept
    assert "README.md kept as it was: it may describe another model" in capsys.readouterr().err


def test_the_readme_sample_command_can_be_repeated(identity_dir, tmp_path, capsys) -> None:
    args = ["deblur", "--sample", "-o", str(tmp_path / "deblurred"), "--model", str(identity_dir)]
    assert main(args) == 0
    first = _digests(tmp_path / "deblurred")
    assert list(first) == [SAMPLE_IMAGE.name]
    capsys.readouterr()
    assert main(args) == 0
    second = tmp_path / "deblurred" / "motion_blurred_astronaut_2.png"
    assert f"wrote {second}" in capsys.readouterr().err
    assert {k: v for k, v in _digests(tmp_path / "deblurred").items() if k in first} == first  # first untouched
    assert np.array_equal(read_image(second).pages, read_image(tmp_path / "deblurred" / SAMPLE_IMAGE.name).pages)


def test_precision_reaches_deblur_bfloat16_close_to_but_not_float32(active_dir, tmp_path) -> None:
    image = (RNG.random((32, 40, 3)) * 65535).astype(np.uint16)
    model = ALGNet.from_pretrained(active_dir)
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "rgb.tif", Stack(image[None], image.shape))
    outputs = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        args = ["deblur", str(tmp_path / "in"), "-o", str(out), "--model", str(active_dir), "--tile", "none"]
        assert main([*args, "--precision", precision]) == 0
        outputs[precision] = read_image(out / "rgb.tif").pages[0].astype(np.float64)
        assert np.array_equal(outputs[precision], deblur(image, model, tile=None, precision=precision)), precision
    error = np.abs(outputs["bfloat16"] - outputs["float32"]) / 65535
    assert 1e-4 < error.max() < 0.02 and error.mean() < 2e-3  # bfloat16 rounding: close, not equal
    with pytest.raises(SystemExit, match="2"):  # argparse: a usage error
        main(["deblur", str(tmp_path / "in"), "-o", str(tmp_path / "x"), "--precision", "half"])
