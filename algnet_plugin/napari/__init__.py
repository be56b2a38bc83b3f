"""napari plugin "ALGNet Deblur": the Deblur and Fine-tune dock widgets, the viewer-free compute function and
sample data. ``FinetuneWidget`` is imported on first use: it loads the training engine (``algnet_train``),
which the Deblur widget does not need."""

from typing import Any

from ._compute import deblur_layer, output_name
from ._sample_data import defocus_blur_sample, motion_blur_sample
from ._widget import DeblurWidget

__all__ = ["DeblurWidget", "FinetuneWidget", "deblur_layer", "defocus_blur_sample", "motion_blur_sample", "output_name"]


def __getattr__(name: str) -> Any:
    if name == "FinetuneWidget":
        from ._finetune_widget import FinetuneWidget

        return FinetuneWidget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
