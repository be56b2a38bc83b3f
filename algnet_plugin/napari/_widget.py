"""The dock widget: gathers parameters, runs :func:`deblur_layer` in a thread worker, adds the result.

Run turns into Cancel while the worker runs; progress goes to a napari progress bar over planes and
tiles; errors become napari notifications; nothing is added to the viewer unless a run completes.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, Label, LineEdit, PushButton, SpinBox
from napari.layers import Image, Layer
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from superqt.utils import ensure_main_thread

import algnet_core
from algnet_core import ALGNet, DeblurCancelled

from ._compute import LayerDataTuple, deblur_layer, leading_shape, model_label

log = logging.getLogger(__name__)

CUSTOM = "folder or Hub id…"
CURRENT, ALL = "current plane", "all planes"
DEFAULTS: dict[str, Any] = {"device": "auto", "tile": 0, "overlap": 32}
"""Widget defaults; a tile of 0 means "auto" (the engine's choice)."""


class DeblurWidget(Container):
    """Deblur an image layer with ALGNet into a new layer ``<input> [ALGNet <model>]``."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        self._image = ComboBox(name="image", choices=self._image_layers)
        self._blur = ComboBox(name="blur", label="blur type", choices=[*algnet_core.list_models(), CUSTOM])
        self._custom = LineEdit(name="model", visible=False)
        self._custom.native.setPlaceholderText("local save_pretrained folder or Hub repo id")
        self._device = ComboBox(name="device", choices=["auto", *algnet_core.available_devices()])
        self._tile = SpinBox(name="tile", label="tile (0 = auto)", min=0, max=4096, step=16)
        self._tile.tooltip = "tile side in pixels; 0 lets the engine choose from the free memory"
        self._overlap = SpinBox(name="overlap", min=0, max=512, tooltip="overlap of tiles in pixels")
        self._defaults = PushButton(name="restore_defaults", text="Restore defaults")
        self._planes = ComboBox(name="planes", choices=[CURRENT, ALL], tooltip="for stacks: which planes")
        self._run = PushButton(name="run", text="Run")
        self._status = Label(name="status", value="")
        self._status.native.setWordWrap(True)
        super().__init__(
            widgets=[self._image, self._blur, self._custom, self._device, self._tile, self._overlap]
            + [self._defaults, self._planes, self._run, self._status]
        )
        self._restore_defaults()
        self.worker: Any = None
        """The running napari thread worker, or None when idle."""
        self._cancel = threading.Event()
        self._pbar: progress | None = None
        self._cached: tuple[tuple[str, str], ALGNet] | None = None
        self._blur.changed.connect(lambda value: setattr(self._custom, "visible", value == CUSTOM))
        self._image.changed.connect(self._update_planes)
        self._defaults.clicked.connect(self._restore_defaults)
        self._run.clicked.connect(self._run_or_cancel)
        self._update_planes()

    def _image_layers(self, _widget: ComboBox) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _restore_defaults(self) -> None:
        for name, value in DEFAULTS.items():
            getattr(self, f"_{name}").value = value

    def _update_planes(self) -> None:
        layer = self._image.value
        self._planes.enabled = layer is not None and len(leading_shape(layer)) > 0

    def _current_plane(self, layer: Image) -> tuple[int, ...] | None:
        lead = leading_shape(layer)
        if not lead or self._planes.value == ALL:
            return None
        coords = layer.world_to_data(self._viewer.dims.point)[: len(lead)]
        return tuple(int(np.clip(np.round(c), 0, s - 1)) for c, s in zip(coords, lead, strict=True))

    def _model_spec(self) -> str:
        if self._blur.value != CUSTOM:
            return self._blur.value
        spec = self._custom.value.strip()
        if not spec:
            raise ValueError("Enter a local model folder or a Hub repo id, or pick a blur type")
        return os.path.expanduser(spec)

    def _run_or_cancel(self) -> None:
        if self.worker is not None:
            self._cancel.set()
            self._run.text = "Cancelling…"
            return
        layer = self._image.value
        try:
            if layer is None:
                raise ValueError("No image layer to deblur: open or add an image first")
            spec = self._model_spec()
        except ValueError as exc:
            show_error(f"ALGNet Deblur: {exc}")
            return
        params = {
            "plane": self._current_plane(layer),
            "tile": self._tile.value or "auto",
            "overlap": self._overlap.value,
            "device": self._device.value,
            "label": model_label(spec),
        }
        self._cancel.clear()
        self._pbar = progress(total=0, desc=f"ALGNet: loading {params['label']}")
        self.worker = create_worker(self._work, layer, spec, params, _start_thread=False)
        self.worker.returned.connect(self._on_returned)
        self.worker.finished.connect(self._on_finished)
        self._run.text = "Cancel"
        self._status.value = f"deblurring {layer.name!r}…"
        self.worker.start()

    def _work(self, layer: Image, spec: str, params: dict[str, Any]) -> LayerDataTuple | str | None:
        """Worker body: the output LayerDataTuple, None when cancelled, or an error message to show.

        The model is loaded here, off the GUI thread, so that fetching weights does not freeze napari;
        the last one loaded is reused while blur type and device stay the same.
        """
        try:
            key = (spec, params["device"])
            if self._cached is None or self._cached[0] != key:
                self._cached = (key, algnet_core.load_model(spec, device=params["device"]))
            self._on_progress(0, 0)
            return deblur_layer(
                layer, self._cached[1], progress=self._on_progress, cancel=self._cancel.is_set, **params
            )
        except DeblurCancelled:
            return None
        except Exception as exc:  # a message for a notification, not a traceback dialog
            log.debug("ALGNet Deblur failed", exc_info=True)
            return f"{exc}" or type(exc).__name__

    @ensure_main_thread
    def _on_progress(self, done: int, total: int) -> None:
        pbar = self._pbar
        if pbar is None or pbar.disable:  # a late call after the run ended
            return
        if total:
            pbar.total = total
            pbar.n = done
            pbar.update(0)
        else:
            pbar.set_description("ALGNet: deblurring")

    def _on_returned(self, result: LayerDataTuple | str | None) -> None:
        if result is None:
            self._status.value = "cancelled: no layer added"
            show_info("ALGNet Deblur: cancelled, no layer was added")
        elif isinstance(result, str):
            self._status.value = "failed"
            show_error(f"ALGNet Deblur: {result}")
        else:
            self._add_or_replace(result)

    def _add_or_replace(self, result: LayerDataTuple) -> None:
        data, kwargs, _ = result
        new = Layer.create(data, kwargs, "image")
        layers = self._viewer.layers
        name = kwargs["name"]
        if name in layers and "algnet" in layers[name].metadata:
            index = layers.index(name)
            layers.pop(index)
            layers.insert(index, new)
        else:
            layers.append(new)
        meta = kwargs["metadata"]["algnet"]
        notes = [f"done: {meta['model_id']} ({meta['source']}) on {meta['device']}"]
        if meta["source"] == "bundled":
            notes.append("the Hub was not reachable: used the weights bundled with the package")
        if meta["multiscale_level"] == 0:
            notes.append("multiscale layer: the full-resolution level was deblurred")
        self._status.value = "\n".join(notes)
        if len(notes) > 1:
            show_info("ALGNet Deblur: " + "; ".join(notes[1:]))

    def _on_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
        self._pbar = None
        self.worker = None
        self._run.text = "Run"
