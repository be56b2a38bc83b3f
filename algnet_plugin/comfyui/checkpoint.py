"""Recognise an ALGNet state dict and rebuild the network it came from, from its keys and shapes alone.

A bare ``.safetensors`` file (no ``config.json`` beside it) carries no constructor arguments; every one of
them can be read off the state dict, which is what spandrel's architecture detection and the loader node's
file choices rely on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from algnet_core import ALGNet

ALGNET_KEYS = ("intro.weight", "ending.weight", "SFE2.main.0.main.0.weight", "FAM2.merge.weight")
"""Keys every ALGNet has; the shallow feature extractors (SFE) and merges (FAM) are ALGNet's own."""
MAMBA_SUFFIX = ".g_layer.mamba.A_log"
"""The global (Mamba) branch of an ALGBlock: what tells ALGNet from NAFNet-like U-Nets."""


def is_algnet_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` has ALGNet's multi-scale input keys and at least one Mamba branch."""
    return all(k in state_dict for k in ALGNET_KEYS) and any(k.endswith(MAMBA_SUFFIX) for k in state_dict)


def _stage_length(state_dict: Mapping[str, Any], prefix: str) -> int:
    """Number of blocks of the ``nn.Sequential`` at ``prefix``: the largest ``prefix.N.`` index + 1."""
    indices = {int(k[len(prefix) + 1 :].split(".", 1)[0]) for k in state_dict if k.startswith(prefix + ".")}
    return max(indices) + 1 if indices else 0


def config_from_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """ALGNet constructor arguments that produce exactly the keys and shapes of ``state_dict``."""
    if not is_algnet_state_dict(state_dict):
        raise ValueError("not an ALGNet state dict (no SFE/FAM keys or no Mamba branch)")
    intro = state_dict["intro.weight"]
    has_local = any(".l_layer." in k for k in state_dict)
    if not has_local:
        branches, aggregation = "global", "fa"
    elif any(k.endswith(".inside_all") for k in state_dict):
        branches, aggregation = "both", "fa"
    elif any(k.endswith(".conv3_2.weight") for k in state_dict):
        branches, aggregation = "both", "concat"
    else:
        branches, aggregation = "both", "sum"
    return dict(
        img_channel=int(intro.shape[1]),
        width=int(intro.shape[0]),
        middle_blk_num=_stage_length(state_dict, "middle_blks"),
        enc_blk_nums=tuple(_stage_length(state_dict, f"encoders.{i}") for i in range(4)),
        dec_blk_nums=tuple(_stage_length(state_dict, f"decoders.{i}") for i in range(4)),
        branches=branches,
        aggregation=aggregation,
    )


def model_from_state_dict(state_dict: Mapping[str, Any]) -> ALGNet:
    """An ALGNet (eval mode) with the weights of ``state_dict`` loaded strictly."""
    model = ALGNet(**config_from_state_dict(state_dict))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
