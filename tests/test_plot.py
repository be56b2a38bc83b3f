"""train.plot: training hours from the logged throughput, and the PNG of the validation curves."""

import csv

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from train.plot import load_curve, main, training_hours  # noqa: E402


def _write(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _run(folder, name, psnr_shift):
    run = folder / name
    run.mkdir()
    (run / "config.yaml").write_text("run:\n  batch: 8\n")
    # 0.5 images/s at batch 8: 16 s a step. A resume from the checkpoint at step 30 logs 40 after 60.
    steps = [20, 40, 60, 40, 80]
    _write(run / "train.csv", [{"step": s, "images_per_s": 0.5, "loss": 0.1} for s in steps])
    _write(
        run / "val.csv",
        [{"step": s, "psnr": 25 + psnr_shift + s / 100, "psnr_blurry": 24.5} for s in (40, 80)],
    )
    return run


def test_training_hours_count_each_interval_once_across_a_resume():
    rows = [{"step": str(s), "images_per_s": "0.5"} for s in (20, 40, 60, 40, 80)]
    steps, hours = training_hours(rows, batch=8)
    assert steps.tolist() == [20, 40, 60, 40, 80]
    # steps 0-60 (60 x 16 s), the resumed steps up to 60 not again, then 60-80: 80 steps in all
    assert np.allclose(hours * 3600, [320, 640, 960, 960, 1280])


def test_curve_and_png(tmp_path):
    runs = [_run(tmp_path, "motion", 0.0), _run(tmp_path, "defocus", 1.0)]
    curve = load_curve(runs[0])
    assert curve.steps.tolist() == [40, 80]
    assert np.allclose(curve.hours * 3600, [640, 1280])
    assert np.allclose(curve.psnr, [25.4, 25.8]) and curve.psnr_blurry == 24.5
    out = tmp_path / "docs" / "curves.png"
    assert main([str(r) for r in runs] + ["-o", str(out)]) == 0
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (1000, 400)
        pixels = np.asarray(png.convert("RGB"))
    assert (pixels.std(axis=(0, 1)) > 10).all()  # lines and text drawn, not a blank canvas
    before = out.read_bytes()
    with pytest.raises(SystemExit):
        main([str(runs[0]), "-o", str(out)])  # an existing file is the user's: replaced only when asked
    assert out.read_bytes() == before
    assert main([str(runs[0]), "-o", str(out), "--overwrite"]) == 0 and out.read_bytes() != before


def test_a_folder_that_is_not_a_run_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="val.csv"):
        load_curve(tmp_path)
