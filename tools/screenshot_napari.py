"""Take the README screenshot of the napari plugin: the docked widget beside a deblurred sample photo.

Needs a display; on a server run it under a virtual one:

    xvfb-run -a -s "-screen 0 1600x1000x24" python tools/screenshot_napari.py --model motion

``--model`` is what the widget runs: a registered name, a local save_pretrained folder or a Hub repo id.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import napari
from npe2 import PluginManager, PluginManifest
from qtpy.QtWidgets import QApplication, QDialog

import algnet_core

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Open the motion sample, run the widget on it, and save the whole window as a PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="motion", help="registered name, model folder or Hub repo id")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "napari_widget.png")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the deblurring")
    args = parser.parse_args()

    plugins = PluginManager.instance()
    if "algnet" not in plugins:  # running from a checkout whose install has no napari.manifest entry point
        plugins.register(PluginManifest.from_file(ROOT / "napari.yaml"))
    viewer = napari.Viewer(show=True, title="napari: ALGNet Deblur")
    viewer.window._qt_window.resize(1400, 680)
    viewer.open_sample("algnet", "motion")
    menu = {action.text(): action for action in viewer.window.plugins_menu.actions()}
    menu["Deblur (ALGNet Deblur)"].trigger()  # as a user opens it: Plugins → Deblur (ALGNet Deblur)
    widget = viewer.window.dock_widgets["Deblur (ALGNet Deblur)"]  # its image field: the active (blurred) layer
    if args.model in algnet_core.list_models():
        widget.blur.value = args.model
    else:
        widget.blur.value = widget.blur.choices[-1]
        widget.model.value = args.model
    widget.run.native.click()
    deadline = time.monotonic() + args.timeout
    while widget.worker is not None and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.05)
    if widget.worker is not None:
        raise SystemExit(f"deblurring took longer than {args.timeout} s")

    viewer.layers.selection.active = viewer.layers[-1]
    viewer.canvas.grid.enabled = True  # blurred and deblurred side by side (the sharp reference stays hidden)
    viewer.reset_view()
    for toast in viewer.window._qt_window.findChildren(QDialog):
        if type(toast).__name__ == "NapariQtNotification":
            toast.close()  # the widget's status line says the same
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.window.screenshot(str(args.out), canvas_only=False, flash=False)
    print(f"wrote {args.out}: {widget.status.value}")
    viewer.close()


if __name__ == "__main__":
    main()
