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

import algnet_core
from algnet_core import ALGNet
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


def deblur_layer(
    layer: Layer,
    model: str | ALGNet = "motion",
    *,
    plane: tuple[int, ...] | None = None,
    tile: int | str = "auto",
    overlap: int = 32,
    device: str = "auto",
    label: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> LayerDataTuple:
    """Deblur an image layer's full-resolution data with ``algnet_core.deblur``; the layer is not modified.

    ``plane`` indexes the leading (non-YX) axes of the one plane to process; None processes every plane.
    ``progress(done, total)`` counts tiles over all planes; ``cancel()`` returning True raises
    ``algnet_core.DeblurCancelled`` within one tile. Returns ``(data, add_image kwargs, "image")`` with
    the input's scale, translate, rgb flag and contrast limits and the provenance under
    ``metadata["algnet"]``.
    """
    if not isinstance(layer, Image):
        raise TypeError(f"ALGNet deblurs image layers; {layer.name!r} is a {type(layer).__name__} layer")
    data = layer.data[0] if layer.multiscale else layer.data
    lead = leading_shape(layer)
    height, width = data.shape[len(lead) : len(lead) + 2]
    if min(height, width) < MULTIPLE:
        raise ValueError(f"{layer.name!r} is {height}x{width} pixels; ALGNet needs at least {MULTIPLE}x{MULTIPLE}")
    if plane is not None and (len(plane) != len(lead) or not all(0 <= i < n for i, n in zip(plane, lead, strict=True))):
        raise ValueError(f"plane {plane} is not an index into the leading axes {lead} of {layer.name!r}")

    net = model if isinstance(model, ALGNet) else algnet_core.load_model(model, device=device)
    planes = list(np.ndindex(lead)) if plane is None else [plane]
    out = np.empty(data.shape if plane is None else (1,) * len(lead) + data.shape[len(lead) :], data.dtype)
    for i, index in enumerate(planes):

        def tiles_done(done: int, total: int, i: int = i) -> None:
            if progress is not None:
                progress(i * total + done, len(planes) * total)

        out[index if plane is None else (0,) * len(lead)] = algnet_core.deblur(
            np.asarray(data[index]),
            net,
            tile=tile,
            overlap=overlap,
            device=device,
            progress=tiles_done,
            cancel=cancel,
        )

    translate = np.asarray(layer.translate, dtype=float)
    if plane is not None:  # the one-plane output sits where that plane is in the world
        translate[: len(lead)] += np.asarray(plane) * np.asarray(layer.scale)[: len(lead)]
    provenance = getattr(net, "provenance", {"model_id": "ALGNet instance", "source": "instance"})
    metadata = {
        "model_id": provenance.get("model_id"),
        "revision": provenance.get("revision"),
        "source": provenance.get("source"),
        "tile": tile,
        "overlap": overlap,
        "device": str(next(net.parameters()).device),
        "input_layer": layer.name,
        "planes": "all" if plane is None else list(plane),
        "multiscale_level": 0 if layer.multiscale else None,
    }
    kwargs: dict[str, Any] = {
        "name": output_name(layer.name, label or model_label(model)),
        "scale": tuple(layer.scale),
        "translate": tuple(translate),
        "rgb": layer.rgb,
        "contrast_limits": list(layer.contrast_limits),
        "metadata": {"algnet": metadata},
    }
    if not layer.rgb:
        kwargs["colormap"] = layer.colormap.name
    return out, kwargs, "image"
