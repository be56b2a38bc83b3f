"""The plugin's compute path: a napari image layer in, the deblurred layer out as a LayerDataTuple.

No viewer and no Qt here: the widget gathers the parameters and runs :func:`deblur_layer` in a thread;
tests call it directly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Layer
from napari.utils.transforms import Affine

import algnet_core
from algnet_core import ALGNet
from algnet_core.inference import DEFAULT_PERCENTILES
from algnet_core.model import MULTIPLE

LayerDataTuple = tuple[np.ndarray, dict[str, Any], str]


def model_label(model: str | ALGNet) -> str:
    """Short name of a model for layer names: "motion", a folder's name, a Hub repo id, or "custom"."""
    if isinstance(model, ALGNet):
        return "custom"
    path = Path(model).expanduser()
    return path.name if path.is_dir() else model


def output_name(input_name: str, label: str) -> str:
    """Name of the output layer of ``input_name`` deblurred by the model ``label``."""
    return f"{input_name} [ALGNet {label}]"


def leading_shape(layer: Image) -> tuple[int, ...]:
    """Shape of the axes before the image plane (YX, plus the channel axis of RGB layers), full resolution."""
    data = layer.data[0] if layer.multiscale else layer.data
    return tuple(int(s) for s in data.shape[: data.ndim - (3 if layer.rgb else 2)])


MAX_CHANNELS_HINT = 8
"""An image side this small is more likely a channel axis than pixels: the error then says how to split it."""


def deblur_layer(
    layer: Layer,
    model: str | ALGNet = "motion",
    *,
    plane: tuple[int, ...] | None = None,
    tile: int | str = "auto",
    overlap: int = 32,
    device: str = "auto",
    normalize: str = "auto",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    label: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> LayerDataTuple:
    """Deblur an image layer's full-resolution data with ``algnet_core.deblur``; the layer is not modified.

    ``plane`` indexes the leading (non-YX) axes of the one plane to process; None processes every plane,
    each one as its own image (``normalize`` and ``percentiles`` as in ``algnet_core.deblur``, per plane).
    ``progress(done, total)`` counts the engine's steps (ALGBlocks run) over all planes; ``cancel()`` returning
    True raises ``algnet_core.DeblurCancelled`` within one ALGBlock. Returns ``(data, add_image kwargs, "image")`` with
    the input's placement (scale, translate, rotate, shear, affine, units, axis labels), rgb flag, display
    (contrast limits, gamma, colormap, opacity, blending), and the provenance under ``metadata["algnet"]``.
    """
    if not isinstance(layer, Image):
        raise TypeError(f"ALGNet deblurs image layers; {layer.name!r} is a {type(layer).__name__} layer")
    data = layer.data[0] if layer.multiscale else layer.data
    lead = leading_shape(layer)
    height, width = data.shape[len(lead) : len(lead) + 2]
    if min(height, width) < MULTIPLE:
        hint = (
            f"; if its last axis ({width}) holds channels, add the image with channel_axis=-1 (a layer per channel)"
            if width <= MAX_CHANNELS_HINT and not layer.rgb
            else ""
        )
        raise ValueError(
            f"{layer.name!r} is {height}x{width} pixels; ALGNet needs at least {MULTIPLE}x{MULTIPLE}{hint}"
        )
    if plane is not None and (len(plane) != len(lead) or not all(0 <= i < n for i, n in zip(plane, lead, strict=True))):
        raise ValueError(f"plane {plane} is not an index into the leading axes {lead} of {layer.name!r}")

    net = model if isinstance(model, ALGNet) else algnet_core.load_model(model, device=device)
    planes = list(np.ndindex(lead)) if plane is None else [plane]
    out = np.empty(data.shape if plane is None else (1,) * len(lead) + data.shape[len(lead) :], data.dtype)
    for i, index in enumerate(planes):

        def steps_done(done: int, total: int, i: int = i) -> None:
            if progress is not None:
                progress(i * total + done, len(planes) * total)

        out[index if plane is None else (0,) * len(lead)] = algnet_core.deblur(
            np.asarray(data[index]),
            net,
            tile=tile,
            overlap=overlap,
            device=device,
            progress=steps_done,
            cancel=cancel,
            normalize=normalize,
            percentiles=percentiles,
        )

    translate = np.array(layer.translate, dtype=float)  # a copy: napari returns the layer's own array
    if plane is not None:  # the one-plane output sits where that plane is in the world
        linear = Affine(scale=layer.scale, rotate=layer.rotate, shear=layer.shear).linear_matrix
        translate += linear @ np.concatenate([plane, np.zeros(layer.ndim - len(lead))])
    provenance = getattr(net, "provenance", {"model_id": "ALGNet instance", "source": "instance"})
    metadata = {
        "model_id": provenance.get("model_id"),
        "revision": provenance.get("revision"),
        "source": provenance.get("source"),
        "tile": tile,
        "overlap": overlap,
        "device": str(next(net.parameters()).device),
        "normalize": normalize,
        "percentiles": list(percentiles) if normalize == "percentile" else None,
        "input_layer": layer.name,
        "planes": "all" if plane is None else list(plane),
        "multiscale_level": 0 if layer.multiscale else None,
    }
    kwargs: dict[str, Any] = {
        "name": output_name(layer.name, label or model_label(model)),
        "scale": tuple(layer.scale),
        "translate": tuple(translate.tolist()),
        "rotate": np.array(layer.rotate),
        "shear": np.array(layer.shear),
        "affine": np.array(layer.affine.affine_matrix),
        "units": tuple(layer.units),
        "axis_labels": tuple(layer.axis_labels),
        "rgb": layer.rgb,
        "contrast_limits": list(layer.contrast_limits),
        "gamma": layer.gamma,
        "opacity": layer.opacity,
        "blending": str(layer.blending),
        "metadata": {"algnet": metadata},
    }
    if not layer.rgb:
        kwargs["colormap"] = layer.colormap.name
    return out, kwargs, "image"
