"""The "Fine-tune" dock widget: trains a model on the viewer's image layers with ``algnet_train``'s FineTuner.

Sharp image layers (2-D, RGB, or stacks, whose every plane along the non-image axes counts) are blurred by a
PSF (an image layer or a file), by disks of a range of radii or camera shake of a range of lengths, with
Poisson-Gaussian noise; or they are paired with blurry layers. The run is a thread worker: a napari progress
bar over the planned steps, the latest validation PSNR in the status line, and Run turns into Cancel, which
stops after the current step and keeps the best model so far. Failures come through the worker's ``errored``
signal into the status line and a notification. The new ``save_pretrained`` folder (never an existing one;
by default a fresh sub-folder of :data:`MODELS_DIR`) is then offered in the Deblur widget's blur-type list and
in this widget's starting models. The layers are only read.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

import napari
import numpy as np
import platformdirs
import torch
from algnet_train.finetune import NOISE_SIGMA, FineTuner, FinetuneResult
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, LineEdit, PushButton, Select, SpinBox
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from superqt.utils import FunctionWorker, ensure_main_thread

import algnet_core

from ._compute import leading_shape
from ._finetuned import FINETUNED
from ._widget import CUSTOM, FINE_TUNED, ModelComboBox

log = logging.getLogger(__name__)

MODELS_DIR = Path(platformdirs.user_data_dir("algnet")) / "models"
"""Where models go by default: a fresh sub-folder per run (a relative output folder is taken from here too)."""
PSF_LAYER, PSF_FILE, DEFOCUS, MOTION, PAIRS = "PSF layer", "PSF file", "defocus", "motion", "blurry + sharp pairs"
KINDS = {PSF_LAYER: "psf", PSF_FILE: "psf", DEFOCUS: "defocus", MOTION: "motion", PAIRS: "pairs"}
"""The blur sources and the word each adds to a default folder name."""
MINUTES, STEPS = "minutes", "steps"
PSF_FILES = "*.npy *.tif *.tiff *.png"


def layer_planes(layers: list[Image]) -> dict[str, Any]:
    """The image planes of ``layers`` by name: a 2-D or RGB layer is one plane (its name), a stack gives each
    plane along its leading axes (``name [i, j]``); multiscale layers count by their full-resolution level."""
    planes = {}
    for layer in layers:
        data = layer.data[0] if layer.multiscale else layer.data
        for index in np.ndindex(leading_shape(layer)):  # one empty index for a 2-D or RGB layer
            planes[f"{layer.name} [{', '.join(map(str, index))}]" if index else layer.name] = data[index]
    return planes


def fresh_folder(parent: Path, name: str) -> Path:
    """``parent / name``, else ``name-2``, ``name-3``, …: the first that does not exist."""
    folder, count = parent / name, 1
    while folder.exists():
        count += 1
        folder = parent / f"{name}-{count}"
    return folder


class FinetuneWidget(Container):
    """Fine-tune a model on image layers into a new folder, then offer it in the Deblur widget."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        self._sharp = Select(name="sharp", label="sharp images", choices=self._image_layers)
        self._sharp.tooltip = "the layers to learn from: 2-D, RGB, or stacks (every plane counts)"
        self._source = ComboBox(name="source", label="blur from", choices=list(KINDS))
        self._psf_layer = ComboBox(name="psf_layer", label="PSF layer", choices=self._image_layers)
        self._psf_file = FileEdit(name="psf_file", label="PSF file", mode="r", filter=PSF_FILES)
        self._radius_min = FloatSpinBox(name="radius_min", label="min radius (px)", min=0.1, max=50, value=2)
        self._radius_max = FloatSpinBox(name="radius_max", label="max radius (px)", min=0.1, max=50, value=6)
        self._length_min = FloatSpinBox(name="length_min", label="min length (px)", min=0.1, max=100, value=5)
        self._length_max = FloatSpinBox(name="length_max", label="max length (px)", min=0.1, max=100, value=25)
        self._blurry = Select(name="blurry", label="blurry images", choices=self._image_layers)
        self._blurry.tooltip = "paired with the sharp images in the layer list's order, plane by plane"
        self._noise = FloatSpinBox(name="noise", label="noise sigma", min=0, max=1, step=0.001, value=NOISE_SIGMA)
        self._noise.tooltip = "Gaussian noise added to the blurred images, in units of the image range"
        self._poisson = FloatSpinBox(name="poisson", label="Poisson noise", min=0, max=10, step=0.001, value=0)
        self._poisson.tooltip = "shot noise of a camera: variance per unit of signal (0: none)"
        self._model = ModelComboBox(name="model", label="starting model", value="defocus")
        self._custom = LineEdit(name="custom_model")
        self._custom.native.setPlaceholderText("save_pretrained folder, Hub repo id or training checkpoint .pt")
        self._budget = ComboBox(name="budget", choices=[MINUTES, STEPS])
        self._minutes = FloatSpinBox(name="minutes", min=0.1, max=24 * 60, value=10)
        self._steps = SpinBox(name="steps", min=1, max=10**6, value=1000)
        self._device = ComboBox(name="device", choices=["auto", *algnet_core.available_devices()])
        self._crop = SpinBox(name="crop", label="crop (0 = auto)", min=0, max=1024, step=16)
        self._crop.tooltip = "side of the training patches in pixels (a multiple of 16); 0: by device"
        self._batch = SpinBox(name="batch", label="batch (0 = auto)", min=0, max=256)
        self._output = LineEdit(name="output", label="output folder")
        self._output.native.setPlaceholderText(f"empty: a new folder in {MODELS_DIR}")
        self._output.tooltip = f"a new folder (an existing one is refused); a relative path is taken in {MODELS_DIR}"
        self._run = PushButton(name="run", text="Run")
        self._status = Label(name="status", value="")
        self._status.native.setWordWrap(True)
        super().__init__(
            widgets=[self._sharp, self._source, self._psf_layer, self._psf_file, self._radius_min, self._radius_max]
            + [self._length_min, self._length_max, self._blurry, self._noise, self._poisson, self._model]
            + [self._custom, self._budget, self._minutes, self._steps, self._device, self._crop, self._batch]
            + [self._output, self._run, self._status]
        )
        self.worker: Any = None
        """The running napari thread worker, or None when idle."""
        self._tuner: FineTuner | None = None
        self._cancel = threading.Event()
        self._pbar: progress | None = None
        self._start_psnr: float | None = None
        self._source.changed.connect(self._update_fields)
        self._budget.changed.connect(self._update_fields)
        self._model.changed.connect(self._update_fields)
        self._run.clicked.connect(self._run_or_cancel)
        self._update_fields()

    def _image_layers(self, _widget: Any) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _update_fields(self) -> None:
        """Show the fields of the chosen blur source, budget and starting model."""
        source = self._source.value
        self._psf_layer.visible = source == PSF_LAYER
        self._psf_file.visible = source == PSF_FILE
        for field in (self._radius_min, self._radius_max):
            field.visible = source == DEFOCUS
        for field in (self._length_min, self._length_max):
            field.visible = source == MOTION
        self._blurry.visible = source == PAIRS
        self._noise.visible = self._poisson.visible = source != PAIRS  # blurry images bring their own noise
        self._minutes.visible = self._budget.value == MINUTES
        self._steps.visible = self._budget.value == STEPS
        self._custom.visible = self._model.value == CUSTOM

    def _in_layer_order(self, selected: list[Image]) -> list[Image]:
        return [layer for layer in self._viewer.layers if layer in selected]

    def _arguments(self) -> dict[str, Any]:
        """FineTuner's arguments from the fields (all but ``progress``); a missing choice raises ValueError."""
        sharp = self._in_layer_order(self._sharp.value)
        if not sharp:
            raise ValueError("Select the sharp image layers to learn from")
        source = self._source.value
        args: dict[str, Any] = {"sharp": layer_planes(sharp)}
        if source == PAIRS:
            blurry = self._in_layer_order(self._blurry.value)
            if not blurry:
                raise ValueError("Select the blurry image layers (paired in layer order with the sharp ones)")
            args["blur"] = layer_planes(blurry)
        else:
            args |= {"noise": self._noise.value, "poisson": self._poisson.value}
        if source == PSF_LAYER:
            psf = self._psf_layer.value
            if psf is None:
                raise ValueError("No PSF layer: add the PSF as an image layer, or choose a PSF file")
            if psf in sharp:
                raise ValueError(f"{psf.name!r} is the PSF: it cannot also be a sharp image")
            args["psf"] = np.array(psf.data[0] if psf.multiscale else psf.data)
        elif source == PSF_FILE:
            text = self._psf_file.line_edit.value.strip()
            if not text:
                raise ValueError(f"Choose a PSF file ({PSF_FILES})")
            args["psf"] = Path(text).expanduser()  # FineTuner reads and checks it, naming it in its errors
        elif source == DEFOCUS:
            args["defocus_radius"] = (self._radius_min.value, self._radius_max.value)
        elif source == MOTION:
            args["motion_length"] = (self._length_min.value, self._length_max.value)
        if self._model.value == CUSTOM:
            if not self._custom.value.strip():
                raise ValueError("Enter a starting model (folder, Hub repo id or .pt checkpoint), or pick one")
            args["model"] = str(Path(self._custom.value.strip()).expanduser())
        else:
            args["model"] = self._model.value
        if self._budget.value == MINUTES:
            args["minutes"] = self._minutes.value
        else:
            args["steps"] = self._steps.value
        output = self._output.value.strip()
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", sharp[0].name).strip("-._") or "model"
        args["out_dir"] = (
            MODELS_DIR / Path(output).expanduser() if output else fresh_folder(MODELS_DIR, f"{name}-{KINDS[source]}")
        )
        args |= {"device": self._device.value, "crop": self._crop.value or None, "batch": self._batch.value or None}
        return args

    def _run_or_cancel(self) -> None:
        if self.worker is not None:
            self._cancel.set()
            if self._tuner is not None:
                self._tuner.cancel()
            self._run.text = "Cancelling…"
            self._status.value = "cancelling after this step: the best model so far is kept"
            return
        try:
            args = self._arguments()
        except ValueError as exc:
            self._fail(str(exc))
            return
        self._cancel.clear()
        self._tuner, self._start_psnr = None, None
        self._pbar = progress(total=0, desc="ALGNet: preparing the fine-tune")
        # superqt's worker class, as the Deblur widget: a failure becomes a readable message in _on_errored.
        handlers = {"returned": self._on_returned, "errored": self._on_errored, "finished": self._on_finished}
        self.worker = create_worker(
            self._work,
            torch.get_num_threads(),
            args,
            _start_thread=False,
            _worker_class=FunctionWorker,
            _connect=handlers,
        )
        self._run.text = "Cancel"
        self._status.value = f"preparing {len(args['sharp'])} sharp planes; the model goes to {args['out_dir']}"
        self.worker.start()

    def _work(self, threads: int, args: dict[str, Any]) -> FinetuneResult:
        """Worker body: checks the inputs, loads the starting model and trains (torch with the GUI thread's
        intra-op ``threads``, as the Deblur widget); a failure raises (the ``errored`` signal)."""
        torch.set_num_threads(threads)
        tuner = FineTuner(progress=self._on_progress, **args)
        self._tuner = tuner
        if self._cancel.is_set():  # Cancel was pressed while the inputs were being checked
            tuner.cancel()
        return tuner.run()

    @ensure_main_thread
    def _on_progress(self, step: int, total: int, val_psnr: float) -> None:
        pbar = self._pbar
        if pbar is None or pbar.disable:  # a late call after the run ended
            return
        if step == 0:  # the first call: the starting model is validated
            self._start_psnr = val_psnr
            pbar.set_description("ALGNet: fine-tuning")
            self._status.value = f"starting model: validation PSNR {val_psnr:.2f} dB; training…"
            return
        self._status.value = (
            f"step {step} of {total}: validation PSNR {val_psnr:.2f} dB (starting model {self._start_psnr:.2f} dB)"
        )
        pbar.total = total
        pbar.n = step
        pbar.update(0)

    def _fail(self, message: str) -> None:
        """Report a failure: the reason in the status line and in an error notification."""
        self._status.value = f"failed: {message}"
        show_error(f"ALGNet Fine-tune: {message}")

    def _on_errored(self, exc: Exception) -> None:
        log.debug("ALGNet Fine-tune failed", exc_info=exc)
        self._fail(str(exc) or type(exc).__name__)

    def _on_returned(self, result: FinetuneResult) -> None:
        FINETUNED.append(result.folder)
        label = result.folder.name + FINE_TUNED
        self._status.value = f"{result.summary()}\noffered in the Deblur widget's blur types as {label}"
        gain = result.psnr_tuned - result.psnr_start
        show_info(f"ALGNet Fine-tune: {'cancelled, ' if result.cancelled else ''}{label}, {gain:+.2f} dB")

    def _on_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
        self._pbar = None
        self.worker, self._tuner = None, None
        self._run.text = "Run"
