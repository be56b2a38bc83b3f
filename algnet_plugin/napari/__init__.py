"""napari plugin "ALGNet Deblur": a dock widget, its viewer-free compute function and sample data."""

from ._compute import deblur_layer, output_name
from ._sample_data import defocus_blur_sample, motion_blur_sample
from ._widget import DeblurWidget

__all__ = ["DeblurWidget", "deblur_layer", "defocus_blur_sample", "motion_blur_sample", "output_name"]
