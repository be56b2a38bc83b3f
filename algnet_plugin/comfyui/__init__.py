"""ALGNet for ComfyUI: the "ALGNet Model Loader" and "ALGNet Deblur" nodes, and ALGNet for spandrel.

Importing this module registers ``models/algnet`` with ComfyUI's ``folder_paths`` (inside ComfyUI) and an
ALGNet architecture in ``spandrel.MAIN_REGISTRY``, so that ComfyUI's own "Load Upscale Model" and
"Upscale Image (using Model)" also take ALGNet ``.safetensors`` files from ``models/upscale_models``.
It downloads, installs and compiles nothing.
"""

from __future__ import annotations

import logging

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_model_folder

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]


def _register_spandrel() -> None:
    """Register ALGNet with spandrel; without a usable spandrel only ALGNet's own nodes are offered."""
    try:
        from .spandrel_arch import register
    except Exception as err:  # spandrel absent, or its torchvision unusable beside this torch build
        logging.getLogger(__name__).warning("ALGNet: spandrel unavailable, not registered: %s", err)
        return
    register()


register_model_folder()
_register_spandrel()
