"""napari plugin "ALGNet Deblur": manifest, Plugins menu, runs on real layers, cancel, errors, samples.

Needs napari, pytest-qt and a display: CI runs it under a virtual X server (Xvfb).
"""

from __future__ import annotations

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
from napari.layers import Image, Points  # noqa: E402
from napari.utils.notifications import ErrorNotification, NotificationSeverity, notification_manager  # noqa: E402
from npe2 import PluginManifest  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402
from skimage.io import imread  # noqa: E402

import algnet_core  # noqa: E402
from algnet_core import ALGNet, DeblurCancelled  # noqa: E402
from algnet_plugin.napari import DeblurWidget, deblur_layer, motion_blur_sample  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MANIFEST = ROOT / "napari.yaml"
DOCK_TITLE = "Deblur (ALGNet Deblur)"
TINY_LOCAL = dict(width=4, middle_blk_num=1, enc_blk_nums=(1, 1, 1, 1), dec_blk_nums=(1, 1, 1, 1))
"""A tiny ALGNet (87 k parameters) without the Mamba branch: these tests check the plugin, not the net."""


def tiny_model() -> ALGNet:
    torch.manual_seed(0)
    return ALGNet(**TINY_LOCAL, branches="local").eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A save_pretrained folder of the tiny model: the widget loads it as a "local model folder"."""
    folder = tmp_path_factory.mktemp("models") / "tiny"
    tiny_model().save_pretrained(folder)
    return folder


@pytest.fixture
def plugin(npe2pm):
    """The plugin registered from the top-level manifest in a plugin manager that discovers nothing else."""
    npe2pm.register(PluginManifest.from_file(MANIFEST))
    return npe2pm


@pytest.fixture
def docked(make_napari_viewer, plugin):
    """A shown viewer and the widget opened as a user does: Plugins → Deblur (ALGNet Deblur)."""
    viewer = make_napari_viewer(show=True)
    actions = {a.text(): a for a in viewer.window.plugins_menu.actions()}
    actions[DOCK_TITLE].trigger()
    return viewer, viewer.window.dock_widgets[DOCK_TITLE]  # keyed by the dock's title


def run_widget(qtbot, widget: DeblurWidget) -> None:
    widget.run.native.click()
    assert widget.run.text == "Cancel"
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.run.text == "Run"


def errors_shown() -> list[str]:
    return [n.message for n in notification_manager.records if n.severity == NotificationSeverity.ERROR]


def test_manifest_validates_and_ships_inside_the_package():
    manifest = PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()
    assert manifest.display_name == "ALGNet Deblur"
    assert [w.display_name for w in manifest.contributions.widgets] == ["Deblur"]
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
    widget.restore_defaults.native.click()
    assert (widget.tile.value, widget.overlap.value, widget.device.value) == (0, 32, "auto")


@pytest.mark.parametrize("case", ["rgb_photo", "gray_uint16", "stack_3_planes"])
def test_run_adds_a_new_layer_and_keeps_the_input(docked, qtbot, tiny_folder, case):
    viewer, widget = docked
    if case == "rgb_photo":  # a real 50x125 RGB photo (RealBlur crop), read in place
        layer = viewer.add_image(imread(SHARED / "data/realblur_crop/blur/scene050-6.png"), scale=(0.5, 0.5))
    elif case == "gray_uint16":
        data = np.random.default_rng(0).integers(0, 65535, (40, 56), dtype=np.uint16)
        layer = viewer.add_image(data, scale=(2.0, 1.0), translate=(10, -3), contrast_limits=(100, 60000))
    else:
        data = np.random.default_rng(1).random((3, 32, 48), dtype=np.float32)
        layer = viewer.add_image(data, scale=(5.0, 1.0, 1.0), name="stack")
        widget.planes.value = "all planes"
    before = layer.data.copy()
    widget.image.value = layer
    widget.blur.value = "folder or Hub id…"
    widget.model.value = str(tiny_folder)
    run_widget(qtbot, widget)

    out = viewer.layers[f"{layer.name} [ALGNet tiny]"]
    assert len(viewer.layers) == 2 and out.data.shape == layer.data.shape and out.data.dtype == layer.data.dtype
    np.testing.assert_array_equal(out.scale, layer.scale)
    np.testing.assert_array_equal(out.translate, layer.translate)
    assert out.rgb == layer.rgb and out.contrast_limits == layer.contrast_limits
    assert out.metadata["algnet"]["tile"] == "auto" and out.metadata["algnet"]["overlap"] == 32
    assert layer.data.tobytes() == before.tobytes()


def test_rerun_replaces_the_previous_output(docked, qtbot, tiny_folder):
    viewer, widget = docked
    viewer.add_image(np.zeros((32, 32), np.uint8), name="a")
    viewer.add_image(np.ones((32, 32), np.uint8), name="b")  # its output is not touched
    widget.blur.value = "folder or Hub id…"
    widget.model.value = str(tiny_folder)
    for name in ("b", "a", "a"):
        widget.image.value = viewer.layers[name]
        run_widget(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["a", "b", "b [ALGNet tiny]", "a [ALGNet tiny]"]


def test_current_plane_only_sits_at_that_plane(docked, qtbot, tiny_folder):
    viewer, widget = docked
    layer = viewer.add_image(np.zeros((3, 32, 32), np.float32), scale=(5.0, 1.0, 1.0), translate=(1, 0, 0))
    viewer.dims.set_current_step(0, 2)
    widget.image.value = layer
    widget.blur.value = "folder or Hub id…"
    widget.model.value = str(tiny_folder)
    assert widget.planes.value == "current plane" and widget.planes.enabled
    run_widget(qtbot, widget)
    out = viewer.layers[-1]
    assert out.data.shape == (1, 32, 32) and tuple(out.translate) == (11.0, 0.0, 0.0)
    assert out.metadata["algnet"]["planes"] == [2]


def test_cancel_mid_run_leaves_the_layer_list_as_before(docked, qtbot, monkeypatch):
    viewer, widget = docked
    model, in_tile, release = tiny_model(), threading.Event(), threading.Event()

    def block_first_tile(*_):
        in_tile.set()
        release.wait(10)

    model.register_forward_pre_hook(block_first_tile)
    monkeypatch.setattr(algnet_core, "load_model", lambda spec, device="auto": model)
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


def test_weights_load_in_the_background_and_offline_fallback_is_announced(docked, qtbot, monkeypatch):
    viewer, widget = docked
    loaded_in: list[threading.Thread] = []

    def offline_load(spec: str, device: str = "auto") -> ALGNet:
        loaded_in.append(threading.current_thread())
        model = tiny_model()
        model.provenance = {"model_id": spec, "revision": None, "source": "bundled"}
        return model

    monkeypatch.setattr(algnet_core, "load_model", offline_load)
    viewer.add_image(np.zeros((32, 32), np.uint8), name="photo")
    notification_manager.records.clear()
    run_widget(qtbot, widget)
    assert loaded_in and loaded_in[0] is not threading.main_thread()
    assert viewer.layers["photo [ALGNet motion]"].metadata["algnet"]["source"] == "bundled"
    assert "Hub was not reachable" in widget.status.value
    assert any("Hub was not reachable" in n.message for n in notification_manager.records)


def test_errors_are_notifications_without_traceback(docked, qtbot, tiny_folder):
    viewer, widget = docked
    notification_manager.records.clear()
    viewer.add_points([[1, 1]])
    widget.run.native.click()  # no image layer at all
    assert widget.worker is None and "No image layer" in errors_shown()[-1]

    viewer.add_image(np.zeros((2, 2), np.uint8), name="tiny")
    widget.blur.value = "folder or Hub id…"
    widget.model.value = str(tiny_folder)
    run_widget(qtbot, widget)
    assert "'tiny' is 2x2 pixels" in errors_shown()[-1]
    assert [layer.name for layer in viewer.layers] == ["Points", "tiny"]
    assert not [n for n in notification_manager.records if isinstance(n, ErrorNotification)]
    dialogs = [w for w in QApplication.topLevelWidgets() if type(w).__name__ == "TracebackDialog"]
    assert not [w for w in dialogs if w.isVisible()]


def test_deblur_layer_without_viewer_one_plane_dask_and_multiscale():
    model = tiny_model()
    stack = np.random.default_rng(2).random((2, 3, 32, 32), dtype=np.float32)
    data, kwargs, kind = deblur_layer(Image(stack, scale=(1, 4, 1, 1)), model, plane=(1, 2))
    assert kind == "image" and data.shape == (1, 1, 32, 32) and kwargs["translate"] == (1.0, 8.0, 0.0, 0.0)
    full, _, _ = deblur_layer(Image(da.from_array(stack, chunks=(1, 1, 32, 32))), model)
    assert isinstance(full, np.ndarray) and full.shape == stack.shape
    np.testing.assert_allclose(full[1, 2], data[0, 0], atol=1e-6)

    pyramid = [np.zeros((64, 64, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)]
    out, kwargs, _ = deblur_layer(Image(pyramid, multiscale=True, rgb=True), model)
    assert out.shape == (64, 64, 3) and kwargs["metadata"]["algnet"]["multiscale_level"] == 0


def test_deblur_layer_counts_tiles_over_planes_and_cancels():
    seen: list[tuple[int, int]] = []
    layer = Image(np.zeros((3, 32, 32), np.uint8))
    deblur_layer(layer, tiny_model(), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] and seen[-1][1] % 3 == 0 and len(seen) == seen[-1][1]
    with pytest.raises(DeblurCancelled):
        deblur_layer(layer, tiny_model(), progress=lambda *_: seen.clear(), cancel=lambda: not seen)
    with pytest.raises(TypeError, match="Points layer"):
        deblur_layer(Points([[1, 1]]), tiny_model())


def test_motion_sample_is_a_blurred_photo_with_its_sharp_reference():
    (sharp, sharp_kw, _), (blurred, blurred_kw, _) = motion_blur_sample()
    assert sharp.shape == blurred.shape == (320, 320, 3) and blurred.dtype == np.uint8
    grad = [np.abs(np.diff(image.astype(float).mean(-1), axis=1)).mean() for image in (sharp, blurred)]
    assert grad[1] < 0.6 * grad[0]
    assert "sharp" in sharp_kw["name"] and "motion" in blurred_kw["name"]
