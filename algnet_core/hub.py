"""Where weights come from: one registry of short names, Hub download, offline fall-back, strict loading.

A model is a ``config.json`` (the :class:`~algnet_core.model.ALGNet` constructor arguments) plus a
``model.safetensors`` state dict: the ``save_pretrained`` layout of ``huggingface_hub``. ``name_or_path`` is
resolved in this order:

1. an existing local folder (``source="local"``);
2. a registered short name (:data:`REGISTRY`): its Hub repo at its registered revision, from the Hub when it
   can be reached (``"hub"``), else from the Hugging Face cache (``"cache"``), else the default bundled in
   the wheel (``"bundled"``), with one log line saying which;
3. anything else is a Hub repo id: the Hub or the cache, and a clear :class:`WeightsError` when neither
   has it.

Bundled weights live in ``algnet_core/weights/`` as ``<bundled>.safetensors`` (float16 storage, loaded as
float32) and ``<bundled>.json``; their cards are in ``docs/model_cards/``.
Every load is strict: missing, unexpected or mis-shaped tensors raise, naming the files.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import safetensors
import safetensors.torch
import torch
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .model import PRESETS, ALGNet

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DESCRIPTION_KEY = "algnet.description"
"""safetensors metadata key with a one-line description of bundled weights (shown in the log line)."""
HUB_PROBE_TIMEOUT_S = 2.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class WeightsError(RuntimeError):
    """Weights could not be found or do not form a valid ALGNet; the message names the file or repo."""


@dataclass(frozen=True)
class RegisteredModel:
    """A short name: Hub repo and revision, the preset it must be, and its bundled file stem."""

    repo_id: str
    revision: str
    preset: str
    bundled: str | None
    summary: str


REGISTRY: dict[str, RegisteredModel] = {
    "motion": RegisteredModel("algnet/ALGNet-S-motion", "main", "ALGNet-S", "motion", "motion blur, compact"),
    "defocus": RegisteredModel("algnet/ALGNet-S-defocus", "main", "ALGNet-S", "defocus", "defocus blur, compact"),
    "motion-algnet": RegisteredModel(
        "algnet/ALGNet-GoPro", "main", "ALGNet", None, "motion blur, the paper's ALGNet (GoPro)"
    ),
    "motion-b": RegisteredModel(
        "algnet/ALGNet-B-GoPro", "main", "ALGNet-B", None, "motion blur, the paper's ALGNet-B (GoPro)"
    ),
}


def list_models() -> list[str]:
    """The registered short names, e.g. ``["motion", "defocus", ...]``."""
    return list(REGISTRY)


def bundled_files(stem: str) -> tuple[Path, Path]:
    """(config, weights) paths of the bundled weights named ``stem`` (checked by :func:`build_model`)."""
    weights = WEIGHTS_DIR / f"{stem}.safetensors"
    return weights.with_suffix(".json"), weights


def save_bundled(model: ALGNet, stem: str, description: str, directory: Path | None = None) -> Path:
    """Write ``model`` as bundled weights ``<stem>.safetensors`` (float16) + ``<stem>.json`` in ``directory``
    (default: the package's ``weights/``, where they ship).

    ``description`` goes into the safetensors metadata and appears in the load log line. Returns the
    weights path.
    """
    directory = WEIGHTS_DIR if directory is None else directory
    directory.mkdir(exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    weights = directory / f"{stem}.safetensors"
    metadata = {"format": "pt", DESCRIPTION_KEY: description}
    safetensors.torch.save_file(state, weights, metadata=metadata)
    weights.with_suffix(".json").write_text(json.dumps(model._hub_mixin_config, indent=2) + "\n")
    return weights


def build_model(config_path: Path, weights_path: Path) -> ALGNet:
    """An ALGNet (float32, CPU, eval mode) from a config json and a safetensors file, loaded strictly."""
    if not config_path.is_file():
        raise WeightsError(f"missing model config: {config_path}")
    if not weights_path.is_file():
        raise WeightsError(f"missing weights file: {weights_path}")
    try:
        config = json.loads(config_path.read_text())
        model = ALGNet(**config)
    except (ValueError, TypeError) as err:
        raise WeightsError(f"{config_path} is not a valid ALGNet config: {err}") from err
    try:
        state = safetensors.torch.load_file(weights_path)
    except (safetensors.SafetensorError, OSError) as err:
        raise WeightsError(
            f"{weights_path} is not a readable safetensors file (corrupted or truncated?): {err}"
        ) from err
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{weights_path} does not match the model described by {config_path}: {err}") from err
    return model.eval()


def preset_of(config: dict) -> str | None:
    """The name of the :data:`PRESETS` entry that ``config`` (ALGNet constructor kwargs) is, else None."""
    defaults = {"img_channel": 3, "branches": "both", "aggregation": "fa"}
    norm = {k: list(v) if isinstance(v, list | tuple) else v for k, v in {**defaults, **config}.items()}
    for name, preset in PRESETS.items():
        want = {k: list(v) if isinstance(v, list | tuple) else v for k, v in {**defaults, **preset}.items()}
        if norm == want:
            return name
    return None


def _metadata(weights_path: Path) -> dict[str, str]:
    with safetensors.safe_open(weights_path, framework="pt") as f:
        return f.metadata() or {}


def _offline() -> bool:
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    """The Hub URL: ``$HF_ENDPOINT`` as set now (``huggingface_hub`` reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def hub_reachable() -> bool:
    """Whether the Hub endpoint accepts a TCP connection within a short timeout (and not offline)."""
    if _offline():
        return False
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True  # only the Hub client, through the proxy, can tell
    url = urlsplit(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _hub_answers(repo_id: str, revision: str | None, token: str | bool | None) -> bool:
    """Whether the Hub answers a request about ``repo_id`` now, within the client's own timeout. When it does
    not (a dead proxy, a timeout, a 5xx), ``hf_hub_download`` quietly serves its cache, so this decides between
    "hub" and "cache"; any other answer, an error included (404, 401), lets the download say what it is."""
    try:
        url = hf_hub_url(repo_id, CONFIG_NAME, revision=revision, endpoint=hub_endpoint())
        get_hf_file_metadata(url, token=token, timeout=constants.DEFAULT_ETAG_TIMEOUT)
    except HFValidationError:
        return True
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        return status is not None and status < 500
    except Exception as err:  # noqa: BLE001 (whatever stops an answer makes the client fall back to its cache)
        log.debug("%s: the Hub did not answer (%s)", repo_id, err)
        return False
    return True


def _download(repo_id: str, revision: str | None, local_only: bool, **hub_kwargs) -> tuple[Path, Path]:
    """(config, weights) of a Hub repo via the Hub client; ``local_only`` reads only the cache."""
    paths = []
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            path = hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                local_files_only=local_only,
                endpoint=hub_endpoint(),
                **hub_kwargs,
            )
        except RepositoryNotFoundError as err:
            raise WeightsError(
                f"{repo_id!r} is not a local folder, a registered name ({', '.join(REGISTRY)}) "
                "or a model repository on the Hub"
            ) from err
        except RevisionNotFoundError as err:
            raise WeightsError(f"the Hub repository {repo_id!r} has no revision {revision!r}") from err
        except LocalEntryNotFoundError as err:
            where = "the Hub cannot be reached" if local_only else "it could not be downloaded"
            raise WeightsError(f"{repo_id}/{filename} is not in the Hugging Face cache and {where}") from err
        except EntryNotFoundError as err:
            raise WeightsError(f"the Hub repository {repo_id!r} has no file {filename}") from err
        except HfHubHTTPError as err:  # another answer: 401 (private or gated, no token), 5xx with no cached copy
            message = f"{repo_id}/{filename} is not in the Hugging Face cache and the Hub refused it: {err}"
            raise WeightsError(message) from err
        paths.append(Path(path))
    return paths[0], paths[1]


def _describe(provenance: dict) -> str:
    text = f"{provenance['model_id']}"
    if provenance.get("revision"):
        text += f"@{provenance['revision']}"
    return f"{text} ({provenance['source']}: {provenance['path']})"


def resolve_files(name_or_path: str | os.PathLike, revision: str | None = None, **hub_kwargs) -> tuple:
    """Find the (config, weights) files for a folder, registered name or Hub repo id, plus provenance.

    ``hub_kwargs`` (``cache_dir``, ``token``, ``local_files_only``) go to ``hf_hub_download``.
    """
    text = os.fspath(name_or_path)
    folder = Path(text).expanduser()
    if folder.is_dir() and (text not in REGISTRY or (folder / CONFIG_NAME).is_file()):
        provenance = {"model_id": str(folder), "revision": None, "source": "local", "path": str(folder)}
        return folder / CONFIG_NAME, folder / WEIGHTS_NAME, provenance
    entry = REGISTRY.get(text)
    repo_id = entry.repo_id if entry else text
    asked_revision = revision is not None
    if entry and revision is None:
        revision = entry.revision
    local_only = bool(hub_kwargs.pop("local_files_only", False))
    online = not local_only and hub_reachable() and _hub_answers(repo_id, revision, hub_kwargs.get("token"))
    source = "hub" if online else "cache"
    try:
        config, weights = _download(repo_id, revision, local_only=not online, **hub_kwargs)
    except HFValidationError as err:
        raise WeightsError(
            f"{text!r} is not a local folder, a registered name ({', '.join(REGISTRY)}) or a valid Hub repo id"
        ) from err
    except WeightsError as err:
        if entry is None or entry.bundled is None or asked_revision:  # a revision asked for is that one or none
            raise
        config, weights = bundled_files(entry.bundled)
        source, revision = "bundled", None
        log.debug("%s: no Hub copy (%s)", text, err)
    provenance = {"model_id": text if entry else repo_id, "revision": revision, "source": source}
    provenance["path"] = str(weights)
    return config, weights, provenance


def loads_offline(name: str) -> bool:
    """Whether the registered model ``name`` loads without the Hub: bundled weights or a Hugging Face cache copy."""
    try:
        resolve_files(name, local_files_only=True)
    except WeightsError:
        return False
    return True


_warned_bundled: set[str] = set()
"""Registered names whose fall-back to bundled weights this process has warned about."""
HUB_KWARGS = ("cache_dir", "token", "local_files_only", "force_download")
"""The keyword arguments of :func:`from_pretrained` that go to ``hf_hub_download``."""


def from_pretrained(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    *,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    **hub_kwargs,
) -> ALGNet:
    """Load an ALGNet (float32, eval, on ``map_location``) from a folder, registered name or Hub repo id,
    strictly (``strict=False`` is refused: it would hide missing or unexpected weights).

    ``hub_kwargs``: :data:`HUB_KWARGS`, for a Hub repo; anything else is a ``TypeError``. An explicit
    ``revision`` is that revision or an error, never the bundled weights. The result has ``provenance``:
    ``model_id``, ``revision``, ``source`` (``hub``, ``cache``, ``bundled`` or ``local``), ``path`` and
    ``description``. One log line says which weights were used.
    """
    unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unknown:
        raise TypeError(
            f"from_pretrained() got unexpected keyword arguments {unknown}; it takes revision, strict, "
            f"map_location and {', '.join(HUB_KWARGS)}"
        )
    if not strict:
        raise ValueError("ALGNet weights load strictly: strict=False would hide missing or unexpected weights")
    config, weights, provenance = resolve_files(name_or_path, revision, **hub_kwargs)
    model = build_model(config, weights)
    entry = REGISTRY.get(os.fspath(name_or_path)) if provenance["source"] != "local" else None
    if entry is not None and preset_of(model._hub_mixin_config) != entry.preset:
        raise WeightsError(f"{config} is not the {entry.preset} preset that {name_or_path!r} promises")
    metadata = _metadata(weights) if provenance["source"] == "bundled" else {}
    provenance["description"] = metadata.get(DESCRIPTION_KEY, "")
    model.provenance = provenance
    if provenance["source"] == "bundled":  # a warning the first time per name, then a note (ComfyUI loads often)
        level = logging.INFO if provenance["model_id"] in _warned_bundled else logging.WARNING
        _warned_bundled.add(provenance["model_id"])
        log.log(level, "algnet: Hub copy not available, using bundled weights %s", _describe(provenance))
    else:
        log.info("algnet: using weights %s", _describe(provenance))
    return model.to(map_location)


def load_model(model: str | os.PathLike | ALGNet = "motion", device: str | torch.device = "auto") -> ALGNet:
    """An ALGNet on ``device`` from a registered name, folder or Hub repo id (eval mode), or an instance.

    An instance belongs to the caller and is never changed (mode, device, attributes): it is returned as is
    when ``device`` is ``"auto"`` or its own device, else a copy on ``device`` is returned. Its mode does not
    matter for inference: ALGNet has no layer that behaves differently in training mode.
    """
    from .inference import resolve_device

    if isinstance(model, ALGNet):
        if str(device) == "auto":
            return model
        target = torch.empty(0, device=resolve_device(device)).device  # "cuda" -> "cuda:0", as parameters say
        return model if next(model.parameters()).device == target else copy.deepcopy(model).to(target)
    return from_pretrained(model).to(resolve_device(device))


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@functools.cache
def _preset_shapes(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return _shapes(ALGNet(**PRESETS[name]).state_dict())


def detect_preset(state: dict[str, torch.Tensor]) -> str | None:
    """The :data:`PRESETS` entry whose tensors (names and shapes) are exactly ``state``'s, else None."""
    wanted = _shapes(state)
    return next((name for name in PRESETS if _preset_shapes(name) == wanted), None)


def _closest_difference(state: dict[str, torch.Tensor], most: int = 5) -> str:
    """How ``state`` differs from the preset that shares most of its tensors: missing, unexpected and
    mis-shaped names (at most ``most`` of each), for an error message."""
    have = _shapes(state)
    name = max(PRESETS, key=lambda n: sum(have.get(k) == v for k, v in _preset_shapes(n).items()))
    want = _preset_shapes(name)
    parts = {
        "missing": [k for k in want if k not in have],
        "unexpected": [k for k in have if k not in want],
        "other shape": [f"{k} {have[k]} (not {want[k]})" for k in want if k in have and have[k] != want[k]],
    }
    said = [
        f"{what} {len(keys)}: {', '.join(keys[:most])}{' ...' if len(keys) > most else ''}"
        for what, keys in parts.items()
        if keys
    ]
    return f". Closest: {name}, {'; '.join(said)}"


def unwrap_checkpoint(checkpoint: object) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: unwraps ``params``/``params_ema``/``state_dict``/``model`` and
    strips a ``module.`` (DataParallel) prefix. Raises :class:`WeightsError` when there is none."""
    while isinstance(checkpoint, dict) and not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        key = next((k for k in ("params", "params_ema", "state_dict", "model") if k in checkpoint), None)
        if key is None:
            raise WeightsError(f"no state dict in the checkpoint; its top-level keys are {list(checkpoint)[:10]}")
        checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise WeightsError(f"the checkpoint holds a {type(checkpoint).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


CONVERTED_CARD = """---
library_name: algnet
license: unknown
pipeline_tag: image-to-image
tags:
- image-deblurring
- algnet
---

# ALGNet ({preset}), converted from `{checkpoint}`

The tensors of `{checkpoint}`, a checkpoint of the authors of "Learning Enriched Features via Selective
State Spaces Model for Efficient Image Deblurring" (https://doi.org/10.1145/3664647.3681009), loaded strictly
into the `algnet` package's ALGNet ({preset} preset) by `algnet convert` and saved as `config.json` +
`model.safetensors`. The weights and their terms are the authors': see where the checkpoint came from.
"""
"""The model card :func:`convert_checkpoint` writes into a folder that has none."""


def convert_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> str:
    """Convert an official ``.pth`` checkpoint into a ``save_pretrained`` folder; returns the preset name.

    Loads with ``torch.load(weights_only=True)``, detects the preset from the tensors and loads strictly.
    Raises ``FileExistsError`` when ``out_dir`` already holds a ``config.json`` or ``model.safetensors`` and
    ``overwrite`` is False. A folder without a ``README.md`` gets :data:`CONVERTED_CARD`; an existing one is
    always kept (the ``algnet convert`` command then says so: it may describe the model it replaced).
    """
    path, out = Path(checkpoint), Path(out_dir)
    existing = [out / name for name in (CONFIG_NAME, WEIGHTS_NAME) if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; choose a new folder (or allow overwriting)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise WeightsError(f"{path} cannot be read as a PyTorch checkpoint (weights only): {err}") from err
    try:
        state = unwrap_checkpoint(loaded)
    except WeightsError as err:
        raise WeightsError(f"{path}: {err}") from err
    preset = detect_preset(state)
    if preset is None:
        width = tuple(state["intro.weight"].shape) if "intro.weight" in state else "no 'intro.weight'"
        raise WeightsError(
            f"{path} is not a checkpoint of a known ALGNet configuration ({len(state)} tensors, intro conv "
            f"{width}); known: {', '.join(PRESETS)}{_closest_difference(state)}"
        )
    model = ALGNet(**PRESETS[preset])
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    card = out / "README.md"
    if not card.exists():  # save_pretrained writes a generic card only where there is none
        out.mkdir(parents=True, exist_ok=True)
        card.write_text(CONVERTED_CARD.format(preset=preset, checkpoint=path.name))
    model.save_pretrained(out)
    return preset
