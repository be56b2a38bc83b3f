"""ComfyUI nodes: "ALGNet Model Loader" and "ALGNet Deblur", thin wrappers over ``algnet_core``.

ComfyUI's modules (``comfy.*``, ``folder_paths``) are imported inside functions and are optional: without
them (tests, scripts) the nodes run on the model's own device, with no progress bar and no queue to cancel
from. Sizes in messages are width x height, as ComfyUI shows them.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from types import ModuleType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from algnet_core import ALGNet, DeblurCancelled, WeightsError, deblur_tensor, hub, list_models, load_model
from algnet_core.hub import CONFIG_NAME, WEIGHTS_NAME
from algnet_core.inference import BYTES_PER_PIXEL_PER_WIDTH, choose_tile
from algnet_core.model import MULTIPLE
from algnet_core.scan import BACKENDS

from .checkpoint import model_from_state_dict

log = logging.getLogger(__name__)

CATEGORY = "image/restoration/ALGNet"
MODEL_TYPE = "ALGNET_MODEL"
MODELS_FOLDER = "algnet"
"""``ComfyUI/models/algnet/``, registered with ``folder_paths`` under this name."""


def _model_management() -> ModuleType | None:
    """``comfy.model_management`` inside ComfyUI, else None."""
    try:
        from comfy import model_management
    except ImportError:
        return None
    return model_management


def register_model_folder() -> None:
    """Register ``models/algnet`` (``.safetensors``) with ``folder_paths``; a no-op outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return
    default = os.path.join(folder_paths.models_dir, MODELS_FOLDER)
    paths, extensions = folder_paths.folder_names_and_paths.get(MODELS_FOLDER, ([], set()))
    if default not in paths:
        paths = [default, *paths]
    folder_paths.folder_names_and_paths[MODELS_FOLDER] = (paths, set(extensions) | {".safetensors"})


def _local_files() -> list[str]:
    """The ``.safetensors`` files under ``models/algnet`` (relative names), or [] outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return []
    register_model_folder()
    return list(folder_paths.get_filename_list(MODELS_FOLDER))


def available_models() -> list[str]:
    """The registered models that can be loaded now: all of them while the Hub can be reached, else those
    bundled or in the Hugging Face cache (the Hub is probed only when some model is neither)."""
    names = list_models()
    offline = [name for name in names if hub.loads_offline(name)]
    return names if len(offline) < len(names) and hub.hub_reachable() else offline


def _local_path(name: str) -> str:
    """The full path of ``models/algnet/<name>``; FileNotFoundError naming the folders searched."""
    import folder_paths

    path = folder_paths.get_full_path(MODELS_FOLDER, name)
    if path is None:
        raise FileNotFoundError(
            f"ALGNet model file {name!r} not found in {folder_paths.get_folder_paths(MODELS_FOLDER)}"
        )
    return path


def _weight_files(path: str) -> list[str]:
    """The files a ``models/algnet`` entry loads from: the file, and ``config.json`` of a ``save_pretrained``
    folder (``<folder>/model.safetensors``)."""
    folder, filename = os.path.split(path)
    config = os.path.join(folder, CONFIG_NAME)
    return [config, path] if filename == WEIGHTS_NAME and os.path.isfile(config) else [path]


def _load_local_file(name: str) -> ALGNet:
    """``models/algnet/<name>``: a ``save_pretrained`` folder's ``model.safetensors``, or a bare state dict."""
    path = _local_path(name)
    files = _weight_files(path)
    if len(files) == 2:
        return load_model(os.path.dirname(path), device="cpu")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path} is not a readable safetensors file (corrupted or truncated?): {err}") from err
    try:
        model = model_from_state_dict(state)
    except (ValueError, RuntimeError) as err:
        raise WeightsError(f"{path} is not the state dict of an ALGNet: {err}") from err
    model.provenance = {"model_id": path, "revision": None, "source": "local"}
    return model


class ALGNetModelLoader:
    """Loads an ALGNet: a registered model, a file of ``models/algnet``, or a Hub repo id."""

    DESCRIPTION = "Loads an ALGNet deblurring model (registered name, models/algnet file, or Hub repo id)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """The registered models that can load now and the files of ``models/algnet`` (both read afresh on
        every call, so new files show up without a restart), and an optional Hub repo id that overrides them."""
        choices = [*available_models(), *_local_files()]
        return {
            "required": {
                "model": (
                    choices,
                    {
                        "default": choices[0] if choices else "",
                        "tooltip": "Registered model (Hub-only ones while the Hub can be reached or once "
                        "cached) or a .safetensors in models/algnet.",
                    },
                ),
            },
            "optional": {
                "hub_repo_id": (
                    "STRING",
                    {"default": "", "tooltip": "Hugging Face Hub repo id; when set it replaces 'model'."},
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, model: str, hub_repo_id: str = "") -> str:
        """For a ``models/algnet`` file: its path, modification time and size (with its folder's config), so
        that a file re-exported in place is loaded afresh; "" for registered models and Hub repo ids."""
        if hub_repo_id.strip() or model in list_models():
            return ""
        try:
            files = _weight_files(_local_path(model))
        except FileNotFoundError:
            return "missing"  # load() then says which folders were searched
        return ";".join(f"{f}:{os.stat(f).st_mtime_ns}:{os.stat(f).st_size}" for f in files)

    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("algnet_model",)
    OUTPUT_TOOLTIPS = ("The model, for ALGNet Deblur.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, model: str, hub_repo_id: str = "") -> tuple[ALGNet]:
        """Load the chosen model on the CPU; "ALGNet Deblur" moves it to ComfyUI's device while it runs."""
        if hub_repo_id.strip():
            return (load_model(hub_repo_id.strip(), device="cpu"),)
        if model in list_models():
            return (load_model(model, device="cpu"),)
        return (_load_local_file(model),)


class ALGNetDeblur:
    """Deblurs every image of an IMAGE batch (any size from 16x16) tile by tile with an ALGNet."""

    DESCRIPTION = "Removes motion or defocus blur with ALGNet, tile by tile; Cancel in the queue stops it."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """The images, the model, the tiling (tile 0: the largest tile that fits in memory) and the ensemble."""
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The blurry images (any size from 16x16; RGB, RGBA or grey)."}),
                "algnet_model": (MODEL_TYPE, {"tooltip": "From ALGNet Model Loader."}),
                "tile": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 8192,
                        "step": 16,
                        "tooltip": "Tile side, at least 2 x overlap + 16 when the image is larger; 0: automatic.",
                    },
                ),
                "overlap": (
                    "INT",
                    {"default": 32, "min": 0, "max": 512, "step": 8, "tooltip": "Pixels shared by adjacent tiles."},
                ),
                "ensemble": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Average over the 8 flips and transposes of each tile: a little better, 8x slower.",
                    },
                ),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The deblurred images, the same size as the input.",)
    FUNCTION = "deblur"
    CATEGORY = CATEGORY

    def deblur(
        self, image: torch.Tensor, algnet_model: ALGNet, tile: int, overlap: int, ensemble: bool = False
    ) -> tuple[torch.Tensor]:
        """IMAGE (float [B, H, W, C] in 0..1; C 3, 4 with alpha kept, or 1: grey, run as grey RGB and averaged
        back, as ``algnet_core.deblur`` does) -> the deblurred IMAGE, float32, of the same shape."""
        if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"IMAGE must be [B, H, W, 1, 3 or 4]; got shape {tuple(image.shape)}")
        height, width = image.shape[1:3]
        if min(height, width) < MULTIPLE:
            raise ValueError(f"the image is {width}x{height} pixels; ALGNet needs at least {MULTIPLE}x{MULTIPLE}")
        rgb = image[..., :3].expand(-1, -1, -1, 3).movedim(-1, 1).float()
        mm = _model_management()
        if mm is None:
            _warn_if_scan_is_slow(next(algnet_model.parameters()).device)
            out = deblur_tensor(rgb, algnet_model, tile or "auto", overlap, ensemble=ensemble)
        else:
            out = _deblur_in_comfyui(mm, rgb, algnet_model, tile, overlap, ensemble)
        out = out.clamp(0, 1).movedim(1, -1).to(image.device, torch.float32)
        if image.shape[-1] == 1:
            out = out.mean(dim=-1, keepdim=True)
        if image.shape[-1] == 4:
            out = torch.cat([out, image[..., 3:].float()], dim=-1)
        return (out,)


def _warn_if_scan_is_slow(device: torch.device) -> None:
    """On the CPU without the compiled selective scan (numba), say once how to get it."""
    if device.type == "cpu":
        _warn_once_without_cpu_scan()


@functools.cache
def _warn_once_without_cpu_scan() -> None:
    reason = BACKENDS["cpu"].unavailable(torch.device("cpu"))
    if reason is not None:
        log.warning(
            "ALGNet: the compiled CPU selective scan cannot run (%s), so deblurring on the CPU takes about 5x "
            "longer; to fix it, run: %s -m pip install numba",
            reason,
            sys.executable,
        )


def _deblur_in_comfyui(
    mm: ModuleType, rgb: torch.Tensor, model: ALGNet, tile: int, overlap: int, ensemble: bool
) -> torch.Tensor:
    """On ComfyUI's device and precision, with its progress bar and Cancel, as ComfyUI's upscale node does:
    ComfyUI frees memory for the model and one batch of tiles (tile 0: the core's automatic tile), the
    model moves to the device for the run and back to ComfyUI's offload device after it."""
    from comfy.utils import ProgressBar

    device = mm.get_torch_device()
    _warn_if_scan_is_slow(device)
    precision = "float16" if mm.should_use_fp16(device) else "bfloat16" if mm.should_use_bf16(device) else "float32"
    width = model.intro.out_channels
    side = tile or choose_tile(width, device)
    height, image_width = rgb.shape[-2:]
    tile_pixels = min(side, height) * min(side, image_width)
    mm.free_memory(mm.module_size(model) + tile_pixels * BYTES_PER_PIXEL_PER_WIDTH * width, device)
    bar = ProgressBar(1)
    try:
        model.to(device)
        return deblur_tensor(
            rgb,
            model,
            side,
            overlap,
            progress=lambda done, total: bar.update_absolute(done, total),
            cancel=mm.processing_interrupted,
            device="auto",  # the model as it is, on ``device``: no copy
            precision=precision,
            ensemble=ensemble,
        )
    except DeblurCancelled:
        mm.throw_exception_if_processing_interrupted()
        raise
    finally:
        model.to(mm.unet_offload_device())


NODE_CLASS_MAPPINGS = {"ALGNetModelLoader": ALGNetModelLoader, "ALGNetDeblur": ALGNetDeblur}
NODE_DISPLAY_NAME_MAPPINGS = {"ALGNetModelLoader": "ALGNet Model Loader", "ALGNetDeblur": "ALGNet Deblur"}
