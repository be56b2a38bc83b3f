"""ComfyUI entry point of a ``git clone`` of this repository into ``ComfyUI/custom_nodes/``.

Only re-exports the node mappings of :mod:`algnet_plugin.comfyui`. The clone's folder is appended to
``sys.path`` so that ``algnet_core`` and ``algnet_plugin`` import without ``pip install`` (an installed
``algnet`` comes first).
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from algnet_plugin.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
