"""ALGNet as a spandrel architecture, so that ComfyUI's "Load Upscale Model" accepts ALGNet files.

ComfyUI loads every file of ``models/upscale_models/`` with ``spandrel.ModelLoader``, which asks each
architecture of ``spandrel.MAIN_REGISTRY`` in turn whether it recognises the state dict.
"""

from __future__ import annotations

from spandrel import (
    MAIN_REGISTRY,
    Architecture,
    ArchSupport,
    ImageModelDescriptor,
    ModelTiling,
    SizeRequirements,
    StateDict,
)

from algnet_core import ALGNet
from algnet_core.model import MULTIPLE

from .checkpoint import config_from_state_dict, is_algnet_state_dict


class ALGNetArch(Architecture[ALGNet]):
    """Detects ALGNet state dicts (SFE/FAM keys and a Mamba branch) and builds the matching network."""

    def __init__(self) -> None:
        super().__init__(id="ALGNet", name="ALGNet", detect=is_algnet_state_dict)

    def load(self, state_dict: StateDict) -> ImageModelDescriptor[ALGNet]:
        """A restoration descriptor (scale 1); calling it returns the full-resolution output."""
        config = config_from_state_dict(state_dict)
        channels = config["img_channel"]
        return ImageModelDescriptor(
            ALGNet(**config),
            state_dict,
            architecture=self,
            purpose="Restoration",
            tags=[f"{config['width']}w"],
            # float32 only: a half or bfloat16 cast of the network fails in its norms (mixed dtypes).
            supports_half=False,
            supports_bfloat16=False,
            scale=1,
            input_channels=channels,
            output_channels=channels,
            size_requirements=SizeRequirements(multiple_of=MULTIPLE),
            tiling=ModelTiling.SUPPORTED,
        )


def register() -> None:
    """Add ALGNet to spandrel's main registry (again is a no-op)."""
    MAIN_REGISTRY.add(ArchSupport.from_architecture(ALGNetArch()), ignore_duplicates=True)
