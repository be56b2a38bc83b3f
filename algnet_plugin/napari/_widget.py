"""The dock widget: gathers parameters, runs :func:`deblur_layer` in a thread worker, adds the result.

Run turns into Cancel while the worker runs; progress goes to a napari progress bar over planes, tiles
and ALGBlocks; failures (the worker's ``errored`` signal) become a napari notification and the status
line, with the reason; nothing is added to the viewer unless a run completes. The image field follows the
active image layer; the blur-type list also offers the models fine-tuned in this session (the Fine-tune
widget adds them as they are written). Notes such as the offline fallback to bundled weights go to the status
line on every run and to a one-line notification once per napari session.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import napari
import numpy as np
import pint
import torch
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, LineEdit, PushButton, SpinBox
from napari.layers import Image, Layer
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from superqt.utils import FunctionWorker, ensure_main_thread

import algnet_core
from algnet_core import ALGNet, DeblurCancelled
from algnet_core.hub import loads_offline
from algnet_core.inference import DEFAULT_PERCENTILES, NORMALIZE_MODES, weights_stamp

from ._compute import LayerDataTuple, deblur_layer, leading_shape, model_label
from ._finetuned import FINETUNED, on_finetuned

log = logging.getLogger(__name__)

CUSTOM = "folder or Hub id…"
CURRENT, ALL = "current plane", "all planes"
NEEDS_DOWNLOAD = " (needs download)"
FINE_TUNED = " (fine-tuned)"
PERCENTILE = "percentile"
DEFAULTS: dict[str, Any] = {
    "device": "auto",
    "tile": 0,
    "overlap": 32,
    "normalize": "auto",
    "low": DEFAULT_PERCENTILES[0],
    "high": DEFAULT_PERCENTILES[1],
}
"""Widget defaults; a tile of 0 means "auto" (the engine's choice)."""
ANNOUNCED: set[str] = set()
"""Notifications already shown in this napari session: each one is shown once, the status line repeats it."""


def model_choices() -> list[tuple[str, str]]:
    """Blur-type choices (label, value): the registered models, marked when they need a download, the models
    fine-tuned in this session (by folder name; the value is the folder), then CUSTOM."""
    models = [(name if loads_offline(name) else name + NEEDS_DOWNLOAD, name) for name in algnet_core.list_models()]
    tuned = [(folder.name + FINE_TUNED, str(folder)) for folder in FINETUNED]
    return [*models, *tuned, (CUSTOM, CUSTOM)]


class ModelComboBox(ComboBox):
    """A combo box of :func:`model_choices`, listed afresh in their order, keeping the choice, when napari resets
    the widget's choices (layer changes), when a model is fine-tuned, and on :meth:`reset_choices`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # magicgui's initialisation lists the choices with reset_choices
        on_finetuned(self.native, self.reset_choices)

    def reset_choices(self, *_: Any) -> None:
        """List the models afresh: a run may have downloaded one, a fine-tune may have made one."""
        value = self.value  # None while magicgui initialises the widget
        with self.changed.blocked():
            self.native.clear()  # else magicgui appends a new or relabelled model at the end, and drops the choice
            self.choices = model_choices()
            if value is not None:
                self.value = value


class DeblurWidget(Container):
    """Deblur an image layer with ALGNet into a new layer ``<input> [ALGNet <model>]``."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        self._image = ComboBox(name="image", choices=self._image_layers)
        self._blur = ModelComboBox(name="blur", label="blur type")
        self._blur.tooltip = f"models marked{NEEDS_DOWNLOAD} are not on this machine yet: they need the Hub"
        self._custom = LineEdit(name="model", visible=False)
        self._custom.native.setPlaceholderText("local save_pretrained folder or Hub repo id")
        self._device = ComboBox(name="device", choices=["auto", *algnet_core.available_devices()])
        self._tile = SpinBox(name="tile", label="tile (0 = auto)", min=0, max=4096, step=16)
        self._tile.tooltip = "tile side in pixels; 0 lets the engine choose from the free memory"
        self._overlap = SpinBox(name="overlap", min=0, max=512, tooltip="overlap of tiles in pixels")
        self._normalize = ComboBox(name="normalize", label="normalisation", choices=NORMALIZE_MODES)
        self._normalize.tooltip = (
            "how values map to the network's 0..1: auto (the image's own range for 12- and 14-bit data, else "
            "dtype), dtype (divided by the dtype's maximum), range (the image's min..max), percentile (the two "
            "percentiles below map to 0 and 1)"
        )
        self._low = FloatSpinBox(name="low", label="low percentile", min=0, max=100, step=0.1, visible=False)
        self._high = FloatSpinBox(name="high", label="high percentile", min=0, max=100, step=0.1, visible=False)
        self._defaults = PushButton(name="restore_defaults", text="Restore defaults")
        self._planes = ComboBox(name="planes", choices=[CURRENT, ALL], tooltip="for stacks: which planes")
        self._run = PushButton(name="run", text="Run")
        self._status = Label(name="status", value="")
        self._status.native.setWordWrap(True)
        super().__init__(
            widgets=[self._image, self._blur, self._custom, self._device, self._tile, self._overlap]
            + [self._normalize, self._low, self._high, self._defaults, self._planes, self._run, self._status]
        )
        self._restore_defaults()
        self.worker: Any = None
        """The running napari thread worker, or None when idle."""
        self._cancel = threading.Event()
        self._pbar: progress | None = None
        self._cached: tuple[tuple[str, str, tuple], ALGNet] | None = None
        self._blur.changed.connect(lambda value: setattr(self._custom, "visible", value == CUSTOM))
        self._normalize.changed.connect(self._update_percentiles)
        self._image.changed.connect(self._update_planes)
        self._defaults.clicked.connect(self._restore_defaults)
        self._run.clicked.connect(self._run_or_cancel)
        napari_viewer.layers.selection.events.active.connect(self._follow_active)
        self._follow_active()
        self._update_planes()

    def _image_layers(self, _widget: ComboBox) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _restore_defaults(self) -> None:
        for name, value in DEFAULTS.items():
            getattr(self, f"_{name}").value = value

    def _follow_active(self, _event: Any = None) -> None:
        """Point the image field at the viewer's active layer when that is an image layer."""
        active = self._viewer.layers.selection.active
        if isinstance(active, Image):
            self._image.reset_choices()  # the layer may be new: list it first
            self._image.value = active

    def _update_percentiles(self) -> None:
        for field in (self._low, self._high):
            field.visible = self._normalize.value == PERCENTILE

    def _update_planes(self) -> None:
        layer = self._image.value
        self._planes.enabled = layer is not None and len(leading_shape(layer)) > 0

    def _current_plane(self, layer: Image) -> tuple[int, ...] | None:
        lead = leading_shape(layer)
        if not lead or self._planes.value == ALL:
            return None
        dims = self._viewer.dims
        # The slider's point is in the viewer's units (the finest of its layers'), the layer's transform in the
        # layer's own: convert as napari does when it slices the layer for display. Layers whose units do not
        # agree leave the viewer without units (None), and napari then takes the point as it is.
        units = pint.get_application_registry()
        world_units = layer.units if dims.units is None else dims.units[-layer.ndim :]
        point = [
            value * units.get_base_units(world)[0] / units.get_base_units(own)[0]
            for value, world, own in zip(dims.point[-layer.ndim :], world_units, layer.units, strict=True)
        ]
        coords = layer.world_to_data(point)[: len(lead)]
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
            self._fail(str(exc))
            return
        normalize = self._normalize.value
        params = {
            "plane": self._current_plane(layer),
            "tile": self._tile.value or "auto",
            "overlap": self._overlap.value,
            "device": self._device.value,
            "normalize": normalize,
            "percentiles": (self._low.value, self._high.value) if normalize == PERCENTILE else DEFAULT_PERCENTILES,
            "label": model_label(spec),
        }
        threads = torch.get_num_threads()
        self._cancel.clear()
        self._pbar = progress(total=0, desc=f"ALGNet: loading {params['label']}")
        # superqt's worker class, not napari's: napari's also sends every error to its traceback notification,
        # while a failed run here is reported as a readable message by _on_errored.
        handlers = {"returned": self._on_returned, "errored": self._on_errored, "finished": self._on_finished}
        self.worker = create_worker(
            self._work,
            layer,
            spec,
            threads,
            params,
            _start_thread=False,
            _worker_class=FunctionWorker,
            _connect=handlers,
        )
        self._run.text = "Cancel"
        self._status.value = f"deblurring {layer.name!r}…"
        self.worker.start()

    def _work(self, layer: Image, spec: str, threads: int, params: dict[str, Any]) -> LayerDataTuple:
        """Worker body: the output LayerDataTuple; a failure or a cancel raises (the ``errored`` signal).

        The model is loaded here, off the GUI thread, so that fetching weights does not freeze napari;
        the last one loaded is reused while blur type, device and (for a folder) its weight files stay the same,
        as in ``algnet_core.deblur``'s own cache. torch runs with the GUI thread's intra-op ``threads``: a
        pooled worker thread keeps the count it had when it was created.
        """
        torch.set_num_threads(threads)
        key = (spec, params["device"], weights_stamp(spec))
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, algnet_core.load_model(spec, device=params["device"]))
        self._on_progress(0, 0)
        return deblur_layer(layer, self._cached[1], progress=self._on_progress, cancel=self._cancel.is_set, **params)

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

    def _fail(self, message: str) -> None:
        """Report a failure: the reason in the status line and in an error notification."""
        self._status.value = f"failed: {message}"
        show_error(f"ALGNet Deblur: {message}")

    def _on_errored(self, exc: Exception) -> None:
        if isinstance(exc, DeblurCancelled):
            self._status.value = "cancelled: no layer added"
            show_info("ALGNet Deblur: cancelled, no layer added")
            return
        log.debug("ALGNet Deblur failed", exc_info=exc)
        self._fail(str(exc) or type(exc).__name__)

    def _on_returned(self, result: LayerDataTuple) -> None:
        data, kwargs, _ = result
        new = Layer.create(data, kwargs, "image")
        if not new.rgb:  # the input's display, with a slider that reaches restored peaks beyond its limits
            low, high = new.contrast_limits_range
            new.contrast_limits_range = (min(low, float(np.min(data))), max(high, float(np.max(data))))
        layers = self._viewer.layers
        name = kwargs["name"]
        image = self._image.value  # adding the output makes it the active layer; the field stays
        if name in layers and "algnet" in layers[name].metadata:
            index = layers.index(name)
            layers.pop(index)
            layers.insert(index, new)
        else:
            layers.append(new)
        if image in self._viewer.layers:
            self._image.value = image
        meta = kwargs["metadata"]["algnet"]
        notes = [f"done: {meta['model_id']} ({meta['source']}) on {meta['device']}"]
        toasts = []  # each fits on a notification's one line (else it is cut short): the status line has details
        if meta["source"] == "bundled":
            notes.append(
                f"{meta['model_id']}: neither the Hub nor its local cache had a copy (offline?), "
                "so the weights bundled with the package were used"
            )
            toasts.append(f"bundled {meta['model_id']} weights")
        if meta["multiscale_level"] == 0:
            notes.append("multiscale layer: the full-resolution level was deblurred")
            toasts.append("used multiscale level 0")
        self._status.value = "\n".join(notes)
        for toast in toasts:
            if toast not in ANNOUNCED:
                ANNOUNCED.add(toast)
                show_info(f"ALGNet Deblur: {toast}")

    def _on_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
        self._pbar = None
        self.worker = None
        self._run.text = "Run"
        self._blur.reset_choices()  # a run may have downloaded a model
