"""napari "Fine-tune" widget: a short run on a stack with a PSF layer, its progress in the status line, the new
model in the Deblur widget's list (and Deblur with it equals ``deblur(plane, model=folder)``), Cancel keeping
the best model so far, and bad inputs through the errored signal. The layers are never changed.

Tiny and fast: the starting model is ``helpers.active_tiny`` saved as a folder, 32 px planes, crop 32, batch 2.
Needs napari, pytest-qt and a display: CI runs it under a virtual X server (Xvfb).
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
    pytest.skip("the napari tests need a display: run them under Xvfb (xvfb-run)", allow_module_level=True)

from napari.layers import Image  # noqa: E402
from npe2 import PluginManifest  # noqa: E402
from qtpy.QtWidgets import QProgressBar  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from scipy import ndimage  # noqa: E402

from algnet_core import ALGNet, deblur  # noqa: E402
from algnet_plugin.napari import FinetuneWidget, _finetune_widget  # noqa: E402
from algnet_plugin.napari._finetuned import FINETUNED  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[1] / "napari.yaml"
SUBMENU = "ALGNet Deblur"
DEBLUR, FINETUNE = "Deblur (ALGNet Deblur)", "Fine-tune (ALGNet Deblur)"
CUSTOM = "folder or Hub id…"


@pytest.fixture(autouse=True)
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Default output folders in a temporary folder; this session's fine-tuned models forgotten afterwards."""
    folder = tmp_path / "models"
    monkeypatch.setattr(_finetune_widget, "MODELS_DIR", folder)
    yield folder
    FINETUNED.clear()


@pytest.fixture
def docked(make_napari_viewer, npe2pm):
    """A shown viewer with both widgets opened as a user does: Plugins → ALGNet Deblur → each widget."""
    npe2pm.register(PluginManifest.from_file(MANIFEST))
    viewer = make_napari_viewer(show=True)
    submenu = next(a.menu() for a in viewer.window.plugins_menu.actions() if a.text() == SUBMENU)
    actions = {a.text(): a for a in submenu.actions()}
    assert list(actions) == [DEBLUR, FINETUNE]
    for title in (FINETUNE, DEBLUR):
        actions[title].trigger()
    return viewer, viewer.window.dock_widgets[FINETUNE], viewer.window.dock_widgets[DEBLUR]


def snapshot(layer: Image) -> dict:
    """Copies of what a run must leave as it is: the data's bytes and the layer's properties."""
    return {
        "data": (layer.data.shape, layer.data.dtype, layer.data.tobytes()),
        **{name: np.array(getattr(layer, name)).tolist() for name in ("translate", "scale", "contrast_limits")},
        "metadata": copy.deepcopy(layer.metadata),
        "name": layer.name,
        "colormap": layer.colormap.name,
    }


def cells(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """``count`` smooth float32 planes in 0..1: blobs of several sizes, something to deblur."""
    noise = np.random.default_rng(seed).random((count, size, size))
    return np.stack([ndimage.gaussian_filter(p, 1.5) for p in noise]).astype(np.float32) * 2 - 0.5


def gaussian_psf(side: int, sigma: float) -> np.ndarray:
    """A ``side`` x ``side`` Gaussian PSF with peak 1 (not normalised: the engine normalises it)."""
    y, x = np.mgrid[:side, :side] - (side - 1) / 2
    return np.exp(-(x**2 + y**2) / (2 * sigma**2))


def set_tiny(widget: FinetuneWidget, start: Path, steps: int) -> None:
    """The tiny, fast configuration: the start folder, a step budget, on the CPU, crop 32 and batch 2."""
    widget.model.value = CUSTOM
    widget.custom_model.value = str(start)
    widget.budget.value = "steps"
    widget.steps.value = steps
    widget.device.value, widget.crop.value, widget.batch.value = "cpu", 32, 2


def labels(combo) -> list[str]:
    return [combo.native.itemText(i) for i in range(combo.native.count())]


def test_fine_tune_a_stack_then_deblur_with_the_new_model(docked, qtbot, active_dir, models_dir):
    viewer, widget, deblur_widget = docked
    stack = viewer.add_image(np.clip(cells(3), 0, 1), name="cells", scale=(4, 1, 1), colormap="magma")
    psf = viewer.add_image(gaussian_psf(7, 1.2), name="psf", metadata={"objective": "60x"})
    before = {layer.name: (snapshot(layer), layer.data) for layer in (stack, psf)}
    (models_dir / "cells-psf").mkdir(parents=True)  # taken: the default name becomes cells-psf-2
    widget.sharp.value = [stack]
    widget.source.value = "PSF layer"
    widget.psf_layer.value = psf
    assert widget.psf_layer.visible and widget.noise.visible and not widget.blurry.visible
    assert not widget.radius_min.visible and not widget.custom_model.visible
    set_tiny(widget, active_dir, steps=2)
    widget.run.native.click()
    folder = models_dir / "cells-psf-2"
    assert (
        widget.run.text == "Cancel" and widget.status.value == f"preparing 3 sharp planes; the model goes to {folder}"
    )
    steps: list[tuple[int, int, str]] = []  # (value, maximum, status line) of the progress bar at each change
    for bar in viewer.window._qt_window.findChildren(QProgressBar):
        bar.valueChanged.connect(lambda value, bar=bar: steps.append((value, bar.maximum(), widget.status.value)))
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.run.text == "Run"

    assert [(value, maximum) for value, maximum, _ in steps] == [(1, 2), (2, 2)]  # shown while it trained
    status = r"step (\d) of 2: validation PSNR (\d+\.\d\d) dB \(starting model (\d+\.\d\d) dB\)"
    lines = [re.fullmatch(status, line) for _, _, line in steps]
    assert [m.group(1) for m in lines] == ["1", "2"] and len({m.group(3) for m in lines}) == 1, steps
    val = np.genfromtxt(folder / "training" / "val.csv", delimiter=",", names=True)
    np.testing.assert_allclose([float(m.group(2)) for m in lines], val["psnr"], atol=0.005)  # validated each step
    summary = widget.status.value
    assert summary.startswith("done: 2 steps") and f"starting model {lines[0].group(3)} dB" in summary
    assert summary.endswith("offered in the Deblur widget's blur types as cells-psf-2 (fine-tuned)")
    assert sorted(p.name for p in (models_dir / "cells-psf").iterdir()) == []  # the taken folder untouched
    assert {"config.json", "model.safetensors", "psf.npy", "README.md"} <= {p.name for p in folder.iterdir()}
    np.testing.assert_allclose(np.load(folder / "psf.npy"), psf.data / psf.data.sum(), atol=1e-6)
    card = (folder / "README.md").read_text()
    held_back = r"held back for validation\s+\(seed 0[^)]*\):\s+cells \[\d\]"  # the layer's planes by name
    assert re.search(held_back, card, re.I)
    assert json.loads((folder / "config.json").read_text())["width"] == 8  # the tiny start's architecture
    for layer in (stack, psf):
        assert snapshot(layer) == before[layer.name][0] and layer.data is before[layer.name][1]

    # The Deblur widget offers the new model before "folder or Hub id…", also after the layer list changes.
    expected = ["motion", "defocus", "motion-algnet", "motion-b", "cells-psf-2 (fine-tuned)", CUSTOM]
    viewer.add_image(np.zeros((32, 32), np.float32), name="other")  # napari resets the widgets' choices
    assert [re.sub(r" \(needs download\)", "", t) for t in labels(deblur_widget.blur)] == expected
    assert "cells-psf-2 (fine-tuned)" in labels(widget.model)  # and as a starting model
    deblur_widget.image.value = stack
    deblur_widget.blur.value = str(folder)
    viewer.dims.set_current_step(0, 1)
    deblur_widget.run.native.click()
    qtbot.waitUntil(lambda: deblur_widget.worker is None, timeout=60_000)
    out = viewer.layers["cells [ALGNet cells-psf-2]"]
    np.testing.assert_array_equal(out.data[0], deblur(stack.data[1], model=str(folder)))
    assert np.abs(out.data[0] - stack.data[1]).mean() > 0.005  # the fine-tuned network changed the plane
    assert snapshot(stack) == before["cells"][0]


def test_cancel_keeps_the_best_model_so_far(docked, qtbot, active_dir, models_dir):
    viewer, widget, deblur_widget = docked
    sharp = cells(2, seed=1)
    blurry = np.stack([ndimage.uniform_filter(p, 5) for p in sharp])
    sharp_layer = viewer.add_image(sharp, name="sharp")
    blurry_layer = viewer.add_image(blurry, name="blurry")
    before = [snapshot(layer) for layer in (sharp_layer, blurry_layer)]
    widget.sharp.value = [sharp_layer]
    widget.source.value = "blurry + sharp pairs"
    widget.blurry.value = [blurry_layer]
    assert widget.blurry.visible and not widget.noise.visible and not widget.psf_layer.visible
    set_tiny(widget, active_dir, steps=1000)
    widget.output.value = "mine"  # relative: in the models folder
    widget.run.native.click()
    qtbot.waitUntil(lambda: widget.status.value.startswith("step 1 of 1000"), timeout=60_000)
    widget.run.native.click()  # Cancel
    assert widget.run.text == "Cancelling…" and widget.status.value.startswith("cancelling")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)

    assert widget.run.text == "Run"
    summary = re.search(
        r"cancelled: (\d+) steps.*starting model (\S+) dB, fine-tuned (\S+) dB.*\(kept (step \d+|the starting model)",
        widget.status.value,
        re.DOTALL,
    )
    assert summary, widget.status.value
    steps, psnr_start, psnr_kept, kept = summary.groups()
    assert 1 <= int(steps) < 1000 and kept in (f"step {steps}", "the starting model")  # validated when cancelled
    assert float(psnr_kept) >= float(psnr_start)
    folder = models_dir / "mine"
    start, written = load_file(active_dir / "model.safetensors"), load_file(folder / "model.safetensors")
    same = written.keys() == start.keys() and all(np.array_equal(written[k], start[k]) for k in start)
    assert same == (kept == "the starting model")
    assert isinstance(ALGNet.from_pretrained(folder), ALGNet)
    assert str(folder) in deblur_widget.blur.choices  # a cancelled run's model is offered too
    assert [snapshot(layer) for layer in (sharp_layer, blurry_layer)] == before


def test_bad_inputs_fail_with_the_reason_in_the_status_line(docked, qtbot, active_dir, models_dir):
    viewer, widget, deblur_widget = docked
    widget.run.native.click()
    assert widget.worker is None and widget.status.value == "failed: Select the sharp image layers to learn from"

    single = viewer.add_image(cells(1)[0], name="single")
    stack = viewer.add_image(np.clip(cells(3), 0, 1), name="stack")
    big_psf = viewer.add_image(gaussian_psf(41, 6.0), name="big psf")
    (models_dir / "taken").mkdir(parents=True)
    (models_dir / "taken" / "notes.txt").write_text("mine")
    set_tiny(widget, active_dir, steps=2)
    cases = [  # (fields, reason, found by the engine in the worker rather than by the widget)
        ({"sharp": [single], "source": "defocus"}, "1 image plane given", True),
        (
            {"sharp": [stack], "source": "PSF layer", "psf_layer": big_psf},
            "the 41x41 PSF is larger than the 32x32",
            True,
        ),
        ({"sharp": [stack], "source": "PSF layer", "psf_layer": stack}, "'stack' is the PSF: it cannot also be", False),
        ({"sharp": [stack], "source": "PSF file"}, "Choose a PSF file (*.npy *.tif *.tiff *.png)", False),
        ({"psf_file": models_dir / "psf.npy"}, f"no PSF file {models_dir / 'psf.npy'}", True),
        ({"sharp": [stack], "source": "blurry + sharp pairs", "blurry": [single]}, "1 blurry images but 3 sharp", True),
        ({"sharp": [stack], "source": "motion", "output": "taken"}, f"{models_dir / 'taken'} exists", True),
    ]
    for fields, reason, in_worker in cases:
        for name, value in fields.items():
            getattr(widget, name).value = value
        widget.run.native.click()
        assert (widget.worker is not None) == in_worker
        qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
        assert widget.status.value.startswith("failed: ") and reason in widget.status.value, widget.status.value
        assert widget.run.text == "Run"
    assert (models_dir / "taken" / "notes.txt").read_text() == "mine" and len(list(models_dir.iterdir())) == 1
    assert not FINETUNED and not [label for label in labels(deblur_widget.blur) if "fine-tuned" in label]
