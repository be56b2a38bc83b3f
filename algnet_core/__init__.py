"""ALGNet image deblurring: the network, its selective scan, inference and hub I/O."""

from .model import PRESETS, ALGNet
from .scan import selective_scan

__all__ = ["ALGNet", "PRESETS", "selective_scan"]
