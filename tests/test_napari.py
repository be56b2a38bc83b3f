"""napari plugin "ALGNet Deblur": manifest, Plugins menu, runs on real layers, cancel, errors, samples.

The model is ``helpers.active_tiny`` (every ALGBlock changes the image), so an output layer that equals
``deblur`` of its input plane proves the plugin ran the network on the right data.
Needs napari, pytest-qt and a display: CI runs it under a virtual X server (Xvfb).
"""

from __future__ import annotations

import copy
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
    pytest.skip("the napari tests need a display: run them under Xvfb (xvfb-run)", allow_module_level=True)

import dask.array as da  # noqa: E402
import torch  # noqa: E402
from helpers import active_tiny, require_shared  # noqa: E402
from huggingface_hub import constants  # noqa: E402
from napari.layers import Image, Points  # noqa: E402
from napari.utils.notifications import ErrorNotification, NotificationSeverity, notification_manager  # noqa: E402
from npe2 import PluginManifest  # noqa: E402
from qtpy.QtWidgets import QApplication, QDialog, QLabel, QProgressBar  # noqa: E402
from scipy import ndimage  # noqa: E402
from skimage.draw import disk  # noqa: E402
from skimage.io import imread  # noqa: E402
from skimage.metrics import peak_signal_noise_ratio  # noqa: E402

import algnet_core  # noqa: E402
from algnet_core import ALGNet, DeblurCancelled, deblur  # noqa: E402
from algnet_core.algblock import ALGBlock  # noqa: E402
from algnet_core.inference import DEFAULT_PERCENTILES, NORMALIZE_MODES  # noqa: E402
from algnet_plugin.napari import DeblurWidget, _widget, deblur_layer, motion_blur_sample  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "napari.yaml"
DOCK_TITLE = "Deblur (ALGNet Deblur)"
CUSTOM = "folder or Hub id…"


@pytest.fixture(scope="module", autouse=True)
def numba_threads_launched() -> None:
    """Launch numba's threads here, once, and keep torch's thread count as it was.

    numba's first ``set_num_threads`` (in the compiled CPU scan) starts its OpenMP workers, which also sets
    OpenMP's thread count of the calling thread to numba's (all cores): torch in that thread then runs with
    another count and its float sums can differ in the last bit. Done in the first widget run's worker, that
    would make the run differ from the ``deblur`` it is compared with.
    """
    threads = torch.get_num_threads()
    deblur(np.zeros((16, 16), np.float32), active_tiny())
    torch.set_num_threads(threads)


def use_model(monkeypatch: pytest.MonkeyPatch, model: ALGNet) -> None:
    """Make every model the widget loads (whatever the blur type) be ``model``."""
    monkeypatch.setattr(algnet_core, "load_model", lambda spec, device="auto": model)


def deblur_planes(stack: np.ndarray, model: ALGNet, lead: int) -> np.ndarray:
    """``deblur`` of each plane of ``stack`` (``lead`` leading axes), the reference for the widget's output."""
    out = np.empty_like(stack)
    for index in np.ndindex(stack.shape[:lead]):
        out[index] = deblur(stack[index], model)
    return out


@pytest.fixture
def plugin(npe2pm):
    """The plugin registered from the top-level manifest in a plugin manager that discovers nothing else."""
    npe2pm.register(PluginManifest.from_file(MANIFEST))
    return npe2pm


@pytest.fixture
def docked(make_napari_viewer, plugin):
    """A shown viewer and the widget opened as a user does: Plugins → ALGNet Deblur → Deblur (ALGNet Deblur)."""
    viewer = make_napari_viewer(show=True)
    submenu = next(a.menu() for a in viewer.window.plugins_menu.actions() if a.text() == "ALGNet Deblur")
    actions = {a.text(): a for a in submenu.actions()}
    actions[DOCK_TITLE].trigger()
    return viewer, viewer.window.dock_widgets[DOCK_TITLE]  # keyed by the dock's title


def run_widget(qtbot, widget: DeblurWidget) -> None:
    widget.run.native.click()
    assert widget.run.text == "Cancel"
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.run.text == "Run"


def errors_shown() -> list[str]:
    return [n.message for n in notification_manager.records if n.severity == NotificationSeverity.ERROR]


def snapshot(layer: Image) -> dict:
    """Copies of every property of ``layer`` that a run must leave as it is (the data's identity aside)."""
    arrays = ("translate", "scale", "rotate", "shear", "contrast_limits")
    return {
        **{name: np.array(getattr(layer, name)).tolist() for name in arrays},
        "data": (layer.data.shape, layer.data.dtype, layer.data.tobytes()),
        "affine": layer.affine.affine_matrix.tolist(),
        "metadata": copy.deepcopy(layer.metadata),
        "name": layer.name,
        "visible": layer.visible,
        "opacity": layer.opacity,
        "blending": str(layer.blending),
        "gamma": layer.gamma,
        "colormap": layer.colormap.name,
        "units": tuple(str(unit) for unit in layer.units),
        "axis_labels": tuple(layer.axis_labels),
    }


def microscopy(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(sharp, blurred) 12-bit camera frame: round cells on a background of 58 counts, up to 2336; the
    blurred frame is the sharp one through a Gaussian blur (sigma 2) and Poisson noise, as uint16."""
    rng = np.random.default_rng(3)
    cells = np.zeros((size, size))
    for centre in rng.integers(12, size - 12, (10, 2)):
        cells[disk(tuple(centre), rng.integers(3, 9), shape=cells.shape)] = rng.uniform(0.4, 1.0)
    sharp = 58 + (2336 - 58) * cells
    return sharp, rng.poisson(ndimage.gaussian_filter(sharp, 2.0)).astype(np.uint16)


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """PSNR in dB with the reference's own range as the peak."""
    return peak_signal_noise_ratio(reference, image.astype(float), data_range=np.ptp(reference))


def blocking_model(gate: threading.Event, *, fail: bool = False, at_block: int | None = None) -> ALGNet:
    """The active tiny model, made to wait for ``gate`` before its first forward (or before ALGBlock call ``at_block``),
    then to raise ``RuntimeError("planted failure in the network")`` when ``fail``."""
    model, calls = active_tiny(), []

    def wait(*_):
        calls.append(1)
        if at_block is None or len(calls) == at_block:
            gate.wait(10)
            if fail:
                raise RuntimeError("planted failure in the network")

    modules = [model] if at_block is None else [m for m in model.modules() if isinstance(m, ALGBlock)]
    for module in modules:
        module.register_forward_pre_hook(wait)
    return model


def test_manifest_validates_and_ships_inside_the_package():
    manifest = PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()
    assert manifest.display_name == "ALGNet Deblur"
    assert [w.display_name for w in manifest.contributions.widgets] == ["Deblur", "Fine-tune"]
    assert [m.command for m in manifest.contributions.menus["napari/layers/filter"]] == ["algnet.deblur"]
    assert (ROOT / "algnet_plugin" / "napari.yaml").read_bytes() == MANIFEST.read_bytes()


def test_plugins_menu_opens_the_dock_and_layers_filter_lists_it(docked):
    viewer, widget = docked
    assert isinstance(widget, DeblurWidget) and widget.native.isVisible()
    filter_menu = next(a.menu() for a in viewer.window.layers_menu.actions() if a.text() == "Filter")
    assert DOCK_TITLE in [a.text() for a in filter_menu.actions()]


def test_restore_defaults_button(docked):
    _, widget = docked
    widget.tile.value, widget.overlap.value, widget.device.value = 128, 8, "cpu"
    widget.normalize.value, widget.low.value, widget.high.value = "percentile", 5.0, 95.0
    assert widget.low.visible and widget.high.visible
    widget.restore_defaults.native.click()
    assert (widget.tile.value, widget.overlap.value, widget.device.value) == (0, 32, "auto")
    assert (widget.normalize.value, widget.low.value, widget.high.value) == ("auto", 1.0, 99.8)
    assert not widget.low.visible and not widget.high.visible


@pytest.mark.parametrize("case", ["rgb_photo", "gray_uint16", "stack_3_planes"])
def test_output_layer_is_deblur_of_each_input_plane(docked, qtbot, active_dir, case):
    viewer, widget = docked
    if case == "rgb_photo":  # a real 50x125 RGB photo (RealBlur crop), read in place
        layer = viewer.add_image(imread(require_shared() / "data/realblur_crop/blur/scene050-6.png"), scale=(0.5, 0.5))
    elif case == "gray_uint16":
        data = np.random.default_rng(0).integers(0, 65535, (40, 56), dtype=np.uint16)
        layer = viewer.add_image(data, scale=(2.0, 1.0), translate=(10, -3), contrast_limits=(100, 60000))
    else:
        data = np.random.default_rng(1).random((3, 32, 48), dtype=np.float32)
        layer = viewer.add_image(data, scale=(5.0, 1.0, 1.0), name="stack")
        widget.planes.value = "all planes"
    before = layer.data.copy()
    widget.image.value = layer
    widget.blur.value = CUSTOM
    widget.model.value = str(active_dir)
    run_widget(qtbot, widget)

    out = viewer.layers[f"{layer.name} [ALGNet tiny]"]
    assert len(viewer.layers) == 2 and out.data.dtype == layer.data.dtype
    expected = deblur_planes(before, active_tiny(), lead=before.ndim - (3 if layer.rgb else 2))
    np.testing.assert_array_equal(out.data, expected)
    assert np.abs(out.data.astype(float) - before).mean() > 0.01 * np.ptp(before)  # the network changed it
    np.testing.assert_array_equal(out.scale, layer.scale)
    np.testing.assert_array_equal(out.translate, layer.translate)
    assert out.rgb == layer.rgb and out.contrast_limits == layer.contrast_limits
    if not out.rgb:  # the slider reaches every restored value, also those beyond the copied limits
        low, high = out.contrast_limits_range
        assert low <= out.data.min() and out.data.max() <= high
    assert out.metadata["algnet"]["tile"] == "auto" and out.metadata["algnet"]["overlap"] == 32
    assert out.metadata["algnet"]["normalize"] == "auto"
    assert layer.data.tobytes() == before.tobytes()


def test_normalisation_choice_reaches_the_engine(docked, qtbot, monkeypatch):
    viewer, widget = docked
    model = active_tiny()
    use_model(monkeypatch, model)
    _, plane = microscopy()
    assert 0 < plane.min() and 2000 < plane.max() < 2**12  # a 12-bit camera's counts in a uint16 array
    viewer.add_image(plane, name="cells")
    assert widget.normalize.value == "auto" and not widget.low.visible
    outputs = {}
    for mode in NORMALIZE_MODES:
        widget.normalize.value = mode
        assert widget.low.visible == widget.high.visible == (mode == "percentile")
        widget.low.value, widget.high.value = 2.0, 98.0  # used by "percentile" only
        run_widget(qtbot, widget)
        assert not widget.status.value.startswith("failed"), widget.status.value
        meta = viewer.layers["cells [ALGNet motion]"].metadata["algnet"]
        assert meta["normalize"] == mode and meta["percentiles"] == ([2.0, 98.0] if mode == "percentile" else None)
        outputs[mode] = viewer.layers["cells [ALGNet motion]"].data
    for mode, out in outputs.items():
        percentiles = (2, 98) if mode == "percentile" else DEFAULT_PERCENTILES
        np.testing.assert_array_equal(out, deblur(plane, model, normalize=mode, percentiles=percentiles))
    assert np.abs(outputs["auto"].astype(float) - outputs["dtype"]).mean() > 50  # not the dtype mapping for 12 bits


def test_twelve_bit_image_is_deblurred_as_well_as_its_full_range_copy(docked, qtbot):
    """issue #13.1: 12-bit counts divided by 65535 reached the network as a nearly black image (-11.6 dB)."""
    viewer, widget = docked
    sharp, counts = microscopy()
    low, high = int(counts.min()), int(counts.max())
    gain = 65535 / (high - low)
    viewer.add_image(counts, name="12-bit")
    viewer.add_image(np.round((counts - low) * gain).astype(np.uint16), name="full range")
    widget.blur.value = "defocus"  # the bundled weights: no download
    assert widget.normalize.value == "auto"  # the default
    for name in ("12-bit", "full range"):
        widget.image.value = viewer.layers[name]
        run_widget(qtbot, widget)
        assert widget.status.value.startswith("done"), widget.status.value
    twelve = psnr(sharp, viewer.layers["12-bit [ALGNet defocus]"].data)
    full = psnr((sharp - low) * gain, viewer.layers["full range [ALGNet defocus]"].data)
    assert twelve >= full - 0.5
    assert twelve > psnr(sharp, counts) + 1.0  # (measured: 22.8 -> 25.0 dB) it deblurs, not only passes through


def test_rerun_replaces_the_previous_output(docked, qtbot, active_dir):
    viewer, widget = docked
    viewer.add_image(np.zeros((32, 32), np.uint8), name="a")
    viewer.add_image(np.ones((32, 32), np.uint8), name="b")  # its output is not touched
    widget.blur.value = CUSTOM
    widget.model.value = str(active_dir)
    for name in ("b", "a", "a"):
        widget.image.value = viewer.layers[name]
        run_widget(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["a", "b", "b [ALGNet tiny]", "a [ALGNet tiny]"]


def test_a_folder_saved_again_in_place_is_loaded_afresh(docked, qtbot, tmp_path):
    """A model folder re-exported (or fine-tuned into) while napari stays open: the next run uses its new
    weights, as ``deblur`` does, not the copy the widget loaded before."""
    viewer, widget = docked
    image = np.random.default_rng(2).random((32, 32), dtype=np.float32)
    viewer.add_image(image, name="photo")
    widget.blur.value = CUSTOM
    widget.model.value = str(tmp_path / "model")
    outputs = []
    for seed in (0, 1):
        active_tiny(seed).save_pretrained(tmp_path / "model")
        run_widget(qtbot, widget)
        outputs.append(viewer.layers["photo [ALGNet model]"].data)
        np.testing.assert_array_equal(outputs[-1], deblur(image, active_tiny(seed)))
    assert np.abs(outputs[0] - outputs[1]).mean() > 1e-3


def test_current_plane_sits_at_that_plane_and_leaves_the_input_in_place(docked, qtbot, active_dir):
    viewer, widget = docked
    stack = np.random.default_rng(4).random((5, 32, 32), dtype=np.float32)
    layer = viewer.add_image(stack, scale=(2.0, 1.0, 1.0))
    viewer.dims.set_current_step(0, 3)
    widget.image.value = layer
    widget.blur.value = CUSTOM
    widget.model.value = str(active_dir)
    assert widget.planes.value == "current plane" and widget.planes.enabled
    run_widget(qtbot, widget)
    out = viewer.layers[-1]
    assert out.data.shape == (1, 32, 32) and tuple(out.translate) == (6.0, 0.0, 0.0)
    assert out.metadata["algnet"]["planes"] == [3]
    np.testing.assert_array_equal(out.data[0], deblur(stack[3], active_tiny()))
    assert tuple(layer.translate) == (0.0, 0.0, 0.0)  # was (6, 0, 0): the output's offset written into it


def test_current_plane_beside_a_layer_of_other_units(docked, qtbot, active_dir):
    """A calibrated image beside an uncalibrated stack: napari drops the viewer's units (None)."""
    viewer, widget = docked
    viewer.add_image(np.zeros((32, 32), np.float32), units=("um", "um"))
    stack = np.random.default_rng(4).random((5, 32, 32), dtype=np.float32)
    layer = viewer.add_image(stack)
    assert viewer.dims.units is None
    viewer.dims.set_current_step(0, 3)
    widget.image.value = layer
    widget.blur.value = CUSTOM
    widget.model.value = str(active_dir)
    run_widget(qtbot, widget)
    assert viewer.layers[-1].metadata["algnet"]["planes"] == [3]


@pytest.mark.parametrize("kind", ["2d", "rgb", "current_plane", "all_planes", "cancelled", "failed"])
def test_every_kind_of_run_leaves_the_input_layer_as_it_was(docked, qtbot, monkeypatch, kind):
    viewer, widget = docked
    gate = threading.Event()
    model = blocking_model(gate, fail=kind == "failed") if kind in ("cancelled", "failed") else active_tiny()
    use_model(monkeypatch, model)
    metadata = {"experiment": {"id": 7}, "tags": ["a"]}
    placement = {"opacity": 0.7, "blending": "additive", "gamma": 0.6, "metadata": metadata}
    if kind == "2d":
        data = np.random.default_rng(5).integers(0, 4096, (40, 56), dtype=np.uint16)
        placement |= {"rotate": 30, "shear": [0.2], "affine": [[1, 0, 5], [0, 2, -4], [0, 0, 1]]}
        layer = viewer.add_image(
            data, scale=(2, 1), translate=(10, -3), contrast_limits=(100, 3000), colormap="magma", **placement
        )
    elif kind == "rgb":
        data = imread(require_shared() / "data/realblur_crop/blur/scene050-6.png")
        layer = viewer.add_image(data, scale=(0.5, 0.5), translate=(1, 2), rotate=10, **placement)
    else:
        data = np.random.default_rng(6).random((5, 32, 32), dtype=np.float32)
        c, s = np.cos(0.4), np.sin(0.4)
        rotate = [[1, 0, 0], [0, c, -s], [0, s, c]]  # within the image plane
        affine = np.eye(4)
        affine[1:3, 3] = 5, -5
        placement |= {"rotate": rotate, "shear": [0, 0, 0.1], "affine": affine, "colormap": "viridis"}
        placement |= {"units": ("um", "nm", "nm"), "axis_labels": ("z", "y", "x")}  # the slider's point is in nm
        layer = viewer.add_image(data, scale=(2, 1, 1), translate=(0, 4, 0), contrast_limits=(0.1, 0.9), **placement)
        viewer.dims.set_current_step(0, 3)
        widget.planes.value = "all planes" if kind in ("all_planes", "cancelled") else "current plane"
    before, data = snapshot(layer), layer.data
    widget.run.native.click()
    if kind == "cancelled":
        widget.run.native.click()
    gate.set()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)

    assert layer.data is data and snapshot(layer) == before
    if kind in ("cancelled", "failed"):
        assert [lay.name for lay in viewer.layers] == [layer.name]
        failed = "failed: planted failure in the network"
        assert widget.status.value == ("cancelled: no layer added" if kind == "cancelled" else failed)
        return
    out = viewer.layers[-1]
    assert (out.gamma, out.opacity, str(out.blending)) == (0.6, 0.7, "additive")  # displayed as the input is
    for name in ("scale", "rotate", "shear"):
        np.testing.assert_allclose(getattr(out, name), getattr(layer, name), atol=1e-12)
    np.testing.assert_allclose(out.affine.affine_matrix, layer.affine.affine_matrix)
    plane = (3,) if kind == "current_plane" else (0,) * (layer.ndim - 2)
    for pixel in [(0, 0), (5, 7), (31, 20)]:  # the output shows each pixel where the input shows it
        out_world = out.data_to_world((*(0,) * (layer.ndim - 2), *pixel))
        np.testing.assert_allclose(out_world, layer.data_to_world((*plane, *pixel)))


def test_image_field_follows_the_active_image_layer(docked, qtbot, monkeypatch):
    viewer, widget = docked
    use_model(monkeypatch, active_tiny())
    viewer.open_sample("algnet", "motion")
    sharp, blurred = viewer.layers["astronaut (sharp reference)"], viewer.layers["astronaut (motion blur)"]
    assert widget.image.value is blurred  # not the first image layer, the hidden sharp reference
    assert DeblurWidget(viewer).image.value is blurred  # a widget opened after the sample too
    viewer.layers.selection.active = sharp
    assert widget.image.value is sharp
    viewer.add_points([[1, 1]])  # the active layer is not an image: the field stays
    assert widget.image.value is sharp
    viewer.layers.selection.active = blurred
    run_widget(qtbot, widget)
    assert viewer.layers.selection.active.name == "astronaut (motion blur) [ALGNet motion]"
    assert widget.image.value is blurred  # the new output became active; the field stays on the input


def test_models_that_need_a_download_are_marked(docked, qtbot, monkeypatch, tmp_path):
    viewer, widget = docked
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty Hugging Face cache
    use_model(monkeypatch, active_tiny())
    viewer.add_image(np.zeros((32, 32), np.uint8))

    def labels() -> list[str]:
        return [widget.blur.native.itemText(i) for i in range(widget.blur.native.count())]

    run_widget(qtbot, widget)  # every run ends by checking the models afresh
    assert labels() == ["motion", "defocus", "motion-algnet (needs download)", "motion-b (needs download)", CUSTOM]
    assert widget.blur.choices == ("motion", "defocus", "motion-algnet", "motion-b", CUSTOM)

    snapshot_dir = tmp_path / "models--algnet--ALGNet-GoPro" / "snapshots" / ("0" * 40)
    snapshot_dir.mkdir(parents=True)
    (snapshot_dir.parents[1] / "refs").mkdir()
    (snapshot_dir.parents[1] / "refs" / "main").write_text("0" * 40)
    for name in ("config.json", "model.safetensors"):  # as a run that downloaded motion-algnet leaves the cache
        (snapshot_dir / name).write_text("{}")
    widget.blur.value = "motion-algnet"
    run_widget(qtbot, widget)
    assert labels() == ["motion", "defocus", "motion-algnet", "motion-b (needs download)", CUSTOM]
    assert widget.blur.value == "motion-algnet" and not widget.model.visible


def test_progress_bar_is_determinate_within_a_one_tile_image(docked, qtbot, monkeypatch):
    viewer, widget = docked
    gate = threading.Event()
    use_model(monkeypatch, blocking_model(gate, at_block=2))  # waits in the second ALGBlock of the only tile
    viewer.add_image(np.zeros((32, 32), np.uint8))
    widget.run.native.click()

    def determinate() -> bool:
        bars = viewer.window._qt_window.findChildren(QProgressBar)
        return any(bar.maximum() > 0 and bar.value() >= 1 for bar in bars)

    try:
        qtbot.waitUntil(determinate, timeout=10_000)
    finally:
        gate.set()
        qtbot.waitUntil(lambda: widget.worker is None, timeout=10_000)


def test_the_worker_runs_torch_with_the_gui_threads_count(docked, qtbot, monkeypatch):
    viewer, widget = docked
    model, seen = active_tiny(), []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    use_model(monkeypatch, model)
    viewer.add_image(np.zeros((32, 32), np.uint8))
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):  # a new worker thread has the default count, a pooled one keeps the one it had
            torch.set_num_threads(count)
            run_widget(qtbot, widget)
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 2]


def test_cancel_mid_run_leaves_the_layer_list_as_before(docked, qtbot, monkeypatch):
    viewer, widget = docked
    model, in_tile, release = active_tiny(), threading.Event(), threading.Event()

    def block_first_tile(*_):
        in_tile.set()
        release.wait(10)

    model.register_forward_pre_hook(block_first_tile)
    use_model(monkeypatch, model)
    viewer.add_image(np.zeros((3, 32, 32), np.float32), name="stack")
    widget.planes.value = "all planes"
    names = [layer.name for layer in viewer.layers]
    widget.run.native.click()
    qtbot.waitUntil(in_tile.is_set, timeout=10_000)
    widget.run.native.click()  # Cancel, while the first tile is being deblurred
    release.set()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10_000)
    assert [layer.name for layer in viewer.layers] == names and widget.run.text == "Run"
    assert widget.status.value.startswith("cancelled")


def test_weights_load_in_the_background_and_offline_fallback_is_announced_once_per_model(docked, qtbot, monkeypatch):
    viewer, widget = docked
    monkeypatch.setattr(_widget, "ANNOUNCED", set())  # a new napari session
    loaded_in: list[threading.Thread] = []

    def offline_load(spec: str, device: str = "auto") -> ALGNet:
        loaded_in.append(threading.current_thread())
        model = active_tiny()
        model.provenance = {"model_id": spec, "revision": None, "source": "bundled"}
        return model

    def toasts() -> list[QLabel]:
        dialogs = viewer.window._qt_window.findChildren(QDialog)
        return [d.message for d in dialogs if type(d).__name__ == "NapariQtNotification" and d.isVisible()]

    monkeypatch.setattr(algnet_core, "load_model", offline_load)
    viewer.add_image(np.zeros((32, 32), np.uint8), name="photo")
    notification_manager.records.clear()
    for blur, run_in in [("motion", widget), ("defocus", widget), ("motion", widget), ("motion", DeblurWidget(viewer))]:
        run_in.image.value = viewer.layers["photo"]
        run_in.blur.value = blur
        run_widget(qtbot, run_in)
        assert viewer.layers[f"photo [ALGNet {blur}]"].metadata["algnet"]["source"] == "bundled"
        assert f"{blur}: neither the Hub nor its local cache had a copy" in run_in.status.value
        assert "the weights bundled with the package were used" in run_in.status.value
    assert len(loaded_in) == 4 and threading.main_thread() not in loaded_in
    notes = [n.message for n in notification_manager.records if "bundled" in n.message]
    assert notes == ["ALGNet Deblur: bundled motion weights", "ALGNet Deblur: bundled defocus weights"]
    qtbot.waitUntil(lambda: len(toasts()) == 2, timeout=5_000)
    for label in toasts():  # shown whole on the toast's one line, not cut short with "…"
        assert QLabel.text(label) == label.text() and label.text() in notes


def test_failures_come_through_the_errored_signal_into_the_status_line(docked, qtbot, monkeypatch):
    viewer, widget = docked
    gate = threading.Event()
    use_model(monkeypatch, blocking_model(gate, fail=True))
    viewer.add_image(np.zeros((32, 32), np.uint8), name="photo")
    notification_manager.records.clear()
    widget.run.native.click()
    errored: list[Exception] = []
    widget.worker.errored.connect(errored.append)
    gate.set()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10_000)
    assert [str(exc) for exc in errored] == ["planted failure in the network"]
    assert widget.status.value == "failed: planted failure in the network"
    assert errors_shown() == ["ALGNet Deblur: planted failure in the network"]
    assert [layer.name for layer in viewer.layers] == ["photo"] and widget.run.text == "Run"


def test_errors_are_notifications_without_traceback(docked, qtbot, active_dir):
    viewer, widget = docked
    notification_manager.records.clear()
    viewer.add_points([[1, 1]])
    widget.run.native.click()  # no image layer at all
    assert widget.worker is None and "No image layer" in errors_shown()[-1]
    assert widget.status.value.startswith("failed: No image layer")

    viewer.add_image(np.zeros((2, 2), np.uint8), name="tiny")
    widget.blur.value = CUSTOM
    widget.model.value = str(active_dir)
    run_widget(qtbot, widget)
    assert "'tiny' is 2x2 pixels" in errors_shown()[-1] and "'tiny' is 2x2 pixels" in widget.status.value
    assert [layer.name for layer in viewer.layers] == ["Points", "tiny"]
    assert not [n for n in notification_manager.records if isinstance(n, ErrorNotification)]
    dialogs = [w for w in QApplication.topLevelWidgets() if type(w).__name__ == "TracebackDialog"]
    assert not [w for w in dialogs if w.isVisible()]


def test_a_channel_axis_read_as_pixels_is_named_in_the_error():
    two_channels = Image(np.zeros((64, 64, 2), np.uint16), name="cells")  # added without channel_axis
    with pytest.raises(ValueError, match=r"'cells' is 64x2 pixels; .* add the image with channel_axis=-1"):
        deblur_layer(two_channels, active_tiny())
    with pytest.raises(ValueError, match=r"'strip' is 64x12 pixels; ALGNet needs at least 16x16$"):
        deblur_layer(Image(np.zeros((64, 12), np.uint16), name="strip"), active_tiny())


def test_deblur_layer_without_viewer_one_plane_dask_and_multiscale():
    model = active_tiny()
    stack = np.random.default_rng(2).random((2, 3, 32, 32), dtype=np.float32)
    layer = Image(stack, scale=(1, 4, 1, 1))
    data, kwargs, kind = deblur_layer(layer, model, plane=(1, 2))
    assert kind == "image" and data.shape == (1, 1, 32, 32) and kwargs["translate"] == (1.0, 8.0, 0.0, 0.0)
    np.testing.assert_array_equal(data[0, 0], deblur(stack[1, 2], model))
    assert tuple(layer.translate) == (0.0, 0.0, 0.0, 0.0)
    full, _, _ = deblur_layer(Image(da.from_array(stack, chunks=(1, 1, 32, 32))), model)
    assert isinstance(full, np.ndarray)
    np.testing.assert_array_equal(full, deblur_planes(stack, model, lead=2))

    pyramid = [np.zeros((64, 64, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)]
    out, kwargs, _ = deblur_layer(Image(pyramid, multiscale=True, rgb=True), model)
    assert out.shape == (64, 64, 3) and kwargs["metadata"]["algnet"]["multiscale_level"] == 0


def test_one_plane_output_overlays_its_plane_under_any_transform():
    c, s = np.cos(0.3), np.sin(0.3)
    rotate = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])  # mixes the plane axis with y
    placement = {"scale": (3, 1.5, 1), "translate": (1, 2, 3), "rotate": rotate, "shear": [0.1, 0.2, 0.3]}
    placement |= {"affine": np.diag([1, 2, 1, 1.0]), "units": ("um",) * 3, "axis_labels": "zyx"}
    layer = Image(np.zeros((4, 32, 32), np.float32), **placement)
    data, kwargs, _ = deblur_layer(layer, active_tiny(), plane=(2,))
    out = Image(data, **kwargs)
    for pixel in [(0, 0), (5, 7), (31, 20)]:
        np.testing.assert_allclose(out.data_to_world((0, *pixel)), layer.data_to_world((2, *pixel)))
    assert out.units == layer.units and out.axis_labels == layer.axis_labels


def test_deblur_layer_counts_progress_over_planes_and_cancels():
    seen: list[tuple[int, int]] = []
    layer = Image(np.zeros((3, 32, 32), np.uint8))
    deblur_layer(layer, active_tiny(), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] and seen[-1][1] % 3 == 0 and len(seen) == seen[-1][1]
    assert [done for done, _ in seen] == list(range(1, seen[-1][1] + 1))
    with pytest.raises(DeblurCancelled):
        deblur_layer(layer, active_tiny(), progress=lambda *_: seen.clear(), cancel=lambda: not seen)
    with pytest.raises(TypeError, match="Points layer"):
        deblur_layer(Points([[1, 1]]), active_tiny())


def test_motion_sample_is_a_blurred_photo_with_its_sharp_reference():
    (sharp, sharp_kw, _), (blurred, blurred_kw, _) = motion_blur_sample()
    assert sharp.shape == blurred.shape == (320, 320, 3) and blurred.dtype == np.uint8
    grad = [np.abs(np.diff(image.astype(float).mean(-1), axis=1)).mean() for image in (sharp, blurred)]
    assert grad[1] < 0.6 * grad[0]
    assert "sharp" in sharp_kw["name"] and "motion" in blurred_kw["name"]
