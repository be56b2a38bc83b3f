"""Training configuration: a YAML file mapped onto typed sections (unknown keys are errors).

Relative paths in a config (data folders, ``log.out_dir``, ``export.dir``) are taken relative to the
current directory; the shipped configs are written to be run from the repository root.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    """``preset``: a name of ``algnet_core.PRESETS``; ``overrides``: constructor kwargs replacing it."""

    preset: str = "ALGNet"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """``train``/``val``: dataset sections (``kind`` + its arguments, see ``train.data``).

    ``crop``: training patch side; ``flips``: {horizontal, vertical}; ``workers``: DataLoader processes
    (augmentation and synthetic blur run there).
    """

    train: dict[str, Any] = field(default_factory=dict)
    val: dict[str, Any] | None = None
    crop: int = 256
    flips: dict[str, bool] = field(default_factory=lambda: {"horizontal": True, "vertical": True})
    workers: int = 4


@dataclass
class OptimConfig:
    """Adam with a per-step cosine annealing from ``lr`` to ``min_lr``; ``grad_clip``: max grad norm;
    ``warmup_steps``: the rate rises linearly over these first steps (0: none)."""

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    min_lr: float = 1e-7
    grad_clip: float | None = None
    warmup_steps: int = 0


@dataclass
class LossConfig:
    """Eq. 1-4 constants: Charbonnier eps, edge weight (delta) and frequency weight (lambda)."""

    eps: float = 1e-3
    edge_weight: float = 0.05
    freq_weight: float = 0.1


@dataclass
class RunConfig:
    """``batch``: global batch (per process = batch / world size); ``precision``: bf16/fp16/fp32 autocast
    on CUDA; ``cpu_precision``: bf16/fp32 on CPU (one config serves a CPU campaign and a GPU stretch, and
    the two want different precisions); ``ema_decay``: None for no EMA of the weights; ``init``: a training
    checkpoint whose weights this run starts from (fine-tuning; optimiser and schedule start afresh)."""

    steps: int = 300_000
    batch: int = 32
    precision: str = "bf16"
    cpu_precision: str = "fp32"
    ema_decay: float | None = None
    seed: int = 0
    init: str | None = None


@dataclass
class LogConfig:
    """Output folder and intervals (in steps) for logs, validation and checkpoints."""

    out_dir: str = "runs/default"
    every: int = 50
    val_every: int = 5000
    ckpt_every: int = 1000
    tensorboard: bool = True
    progress: bool = True


@dataclass
class ExportConfig:
    """Where the best checkpoint is exported (save_pretrained folder) and what its model card says."""

    dir: str | None = None
    training_data: str = ""
    notes: str = ""


@dataclass
class Config:
    """A whole training run."""

    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Build from nested dicts; a key that no section knows raises ``ValueError``."""
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(sections)
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        kwargs: dict[str, Any] = {"name": raw.get("name", "algnet")}
        for f in dataclasses.fields(cls):
            if f.name == "name" or f.name not in raw:
                continue
            section_cls = globals()[f.type]
            try:
                kwargs[f.name] = section_cls(**(raw[f.name] or {}))
            except TypeError as err:
                raise ValueError(f"config section {f.name!r}: {err}") from err
        cfg = cls(**kwargs)
        cfg.optim.betas = tuple(cfg.optim.betas)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (YAML/JSON serialisable)."""
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    def model_kwargs(self) -> dict[str, Any]:
        """ALGNet constructor arguments: the preset updated with the overrides."""
        from algnet_core import PRESETS

        if self.model.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.model.preset!r}; choose from {sorted(PRESETS)}")
        return {**PRESETS[self.model.preset], **self.model.overrides}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; floats in configs are written that way, so read
    every number in exponent notation as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def _set(raw: dict[str, Any], dotted: str, value: str) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        raw = raw.setdefault(key, {})
    raw[keys[-1]] = _yaml(value)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config; ``overrides`` are ``dotted.key=value`` strings (values parsed as YAML)."""
    raw = _yaml(Path(path).read_text()) or {}
    for item in overrides or []:
        key, _, value = item.partition("=")
        _set(raw, key, value)
    return Config.from_dict(raw)
