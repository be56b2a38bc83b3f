"""ALGNet image deblurring: the network, its selective scan, inference and hub I/O."""

from .hub import WeightsError, list_models, load_model
from .inference import DeblurCancelled, available_devices, deblur, deblur_tensor, resolve_device
from .model import PRESETS, ALGNet
from .scan import selective_scan

__all__ = [
    "ALGNet",
    "PRESETS",
    "DeblurCancelled",
    "WeightsError",
    "available_devices",
    "deblur",
    "deblur_tensor",
    "list_models",
    "load_model",
    "resolve_device",
    "selective_scan",
]
