"""The training loop: DDP, autocast, clipping, EMA, exact checkpoint/resume, validation and logs.

One :class:`Trainer` per process. Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins a process group
(nccl on CUDA, gloo on CPU), wraps the model in DistributedDataParallel and feeds each process
``batch / world`` samples of every global batch (see :class:`train.data.EpochSampler`). Rank 0 alone
validates, logs and writes checkpoints.

Files in ``log.out_dir``: ``last.pt`` (everything needed to resume: model, optimiser, scheduler,
grad scaler, EMA, RNG states, step, best metric), ``best.pt`` (the evaluated weights of the best
validation PSNR), ``train.csv``, ``val.csv``, ``config.yaml``, ``tb/`` (TensorBoard events, when
installed) and, when ``export.dir`` is set, the exported ``save_pretrained`` folder.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from algnet_core import ALGNet, metrics

from .config import Config, RunConfig
from .data import EpochSampler, Flips, build_dataset
from .losses import MultiScaleLoss

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(run: RunConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training and validation on ``device`` (None: float32): ``run.precision`` on
    CUDA, ``run.cpu_precision`` elsewhere (bf16 or fp32; CPU autocast has no float16 path worth having)."""
    cuda = device.type == "cuda"
    name, allowed = (run.precision, ("bf16", "fp16", "fp32")) if cuda else (run.cpu_precision, ("bf16", "fp32"))
    if name not in allowed:
        key = "run.precision" if cuda else "run.cpu_precision"
        raise ValueError(f"{key}={name!r}: expected one of {', '.join(allowed)}")
    return AUTOCAST_DTYPES.get(name)


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the torchrun process group if there is one; returns (rank, world size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _hwc(image: Tensor) -> np.ndarray:
    """A (3, h, w) tensor as an (h, w, 3) float64 array, for :mod:`algnet_core.metrics`."""
    return image.permute(1, 2, 0).double().cpu().numpy()


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers.

    The decay warms up as ``min(decay, (1 + step) / (10 + step))`` so that early averages follow the
    model instead of staying at the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """ema = d * ema + (1 - d) * current, d the warmed-up decay at ``step`` (0 for the first update)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        current = model.state_dict()
        for name, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(current[name], 1 - decay)
            else:
                value.copy_(current[name])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint (``last.pt``/``best.pt``), unpickled with ``weights_only=True``: tensors,
    numbers, strings and containers only, so a crafted file cannot run code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def initial_weights(source: str | Path) -> dict[str, Tensor]:
    """The weights a fine-tuning run starts from.

    ``source`` is a training checkpoint (``.pt``/``.pth``: its EMA weights when it has them, else its
    model; ``best.pt`` stores the evaluated, i.e. EMA, weights as its model) or anything
    :meth:`ALGNet.from_pretrained` takes: a bundled or registered name, a ``save_pretrained`` folder,
    a Hub repo id.
    """
    if Path(source).suffix in (".pt", ".pth"):
        state = load_checkpoint(source)
        return state.get("ema") or state["model"]
    return ALGNet.from_pretrained(source).state_dict()


def _rng_state() -> dict[str, Any]:
    # numpy's state as a tensor and plain numbers, so checkpoints load with weights_only=True
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def freeze_unused(model: nn.Module, channels: int) -> list[str]:
    """Freeze parameters that the forward never uses (the official layout's ``gamma``/``conv3_2``).

    Found by one tiny forward/backward; returns their names. DDP then needs no unused-parameter search.
    """
    device = next(model.parameters()).device
    outputs = model(torch.rand(1, channels, 16, 16, device=device), return_all_scales=True)
    sum(o.mean() for o in outputs).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    for name, p in model.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    return unused


class Trainer:
    """Builds everything from a :class:`Config` and runs :meth:`fit`.

    ``train_set``/``val_set`` replace the datasets of ``cfg.data`` (which then only describes them, e.g. images
    held in memory); ``device`` replaces the automatic choice (one process only).
    """

    def __init__(
        self,
        cfg: Config,
        train_set: Dataset | None = None,
        val_set: Dataset | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        if device is not None:
            if self.world > 1:
                raise ValueError("a device is chosen per process under torchrun; do not pass one")
            self.device = device
        self.out_dir = Path(cfg.log.out_dir)
        torch.manual_seed(cfg.run.seed)
        model_kwargs = cfg.model_kwargs()
        self.model = ALGNet(**model_kwargs).to(self.device)
        if cfg.run.init:
            self.model.load_state_dict(initial_weights(cfg.run.init))
        self.frozen = freeze_unused(self.model, model_kwargs.get("img_channel", 3))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ddp = DistributedDataParallel(self.model) if self.world > 1 else None
        self.ema = EMA(self.model, cfg.run.ema_decay) if cfg.run.ema_decay else None
        self.optimizer = torch.optim.Adam(
            self.params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.autocast = autocast_dtype(cfg.run, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast is torch.float16)
        self.criterion = MultiScaleLoss(cfg.loss.eps, cfg.loss.edge_weight, cfg.loss.freq_weight)
        self.step, self.best_psnr = 0, -math.inf
        self.last_val: dict[str, float] = {}  # the latest validation metrics and their step
        self.stop_requested = False  # set by a signal handler or another thread: fit() checkpoints and returns

        flips = Flips(**cfg.data.flips)
        if train_set is None:
            train_set = build_dataset(cfg.data.train, cfg.data.crop, flips, train=True, seed=cfg.run.seed)
        if val_set is None and cfg.data.val:
            recipe = cfg.data.train.get("recipe")
            val_set = build_dataset(cfg.data.val, None, flips, train=False, seed=cfg.run.seed + 1, recipe=recipe)
        self.train_set, self.val_set = train_set, val_set
        self.sampler = EpochSampler(len(self.train_set), cfg.run.batch, cfg.run.seed, self.rank, self.world)

    def lr_factor(self, step: int) -> float:
        """Cosine annealing from ``optim.lr`` at step 0 to ``optim.min_lr`` at ``run.steps`` (closed form).

        Read from the config at every step, so resuming with a larger ``run.steps`` stretches the rest of
        the schedule (the learning rate jumps up to the new curve: a warm restart). With
        ``optim.warmup_steps`` = W, step s < W is scaled by (s + 1) / W.
        """
        lr, min_lr, total = self.cfg.optim.lr, self.cfg.optim.min_lr, self.cfg.run.steps
        progress = min(step, total) / total
        warmup = min(1.0, (step + 1) / self.cfg.optim.warmup_steps) if self.cfg.optim.warmup_steps else 1.0
        return warmup * (min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / lr

    # ----------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs."""
        return {
            "step": self.step,
            "best_psnr": self.best_psnr,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema else None,
            "rng": _rng_state(),
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (strictly: the model must match the config)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():  # empty when saved by a run without fp16
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ValueError("the checkpoint has no EMA weights but the config asks for EMA")
            self.ema.model.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])
        self.step, self.best_psnr = state["step"], state["best_psnr"]

    def save(self, path: Path, state: dict[str, Any]) -> None:
        """Write atomically (temporary file, then rename): an interrupted save keeps the old file."""
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def resume(self, path: str | Path) -> None:
        """Continue from a ``last.pt`` checkpoint (written on any device, any world size)."""
        self.load_state_dict(load_checkpoint(path))
        log.info("resumed from %s at step %d", path, self.step)

    # ----------------------------------------------------------------------------------- one step
    def train_step(self, blur: Tensor, sharp: Tensor) -> dict[str, float]:
        """Forward, Eq. 1 loss, backward (scaled for fp16), clipping, Adam, cosine step, EMA."""
        net = self.ddp or self.model
        net.train()
        blur, sharp = blur.to(self.device, non_blocking=True), sharp.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=bool(self.autocast)):
            outputs = net(blur, return_all_scales=True)
        terms = self.criterion.terms(outputs, sharp)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        self.step += 1
        return {k: v.item() for k, v in terms.items()}

    # ----------------------------------------------------------------------------------- validation
    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and exported: the EMA when enabled."""
        return self.ema.model if self.ema else self.model

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean PSNR/SSIM of restored and of blurry inputs against the sharp images of the val set.

        The data range is 1 and the output is clipped to 0..1, as deblur clips photos, for sharp images within
        0..1; a sharp image beyond them (a 12-bit plane mapped by its blurred range, whose spots reach ~4) is
        scored over its own extent, with 0..1 included, and the output is not clipped (nor is deblur's)."""
        model = self.eval_model.eval()
        sums = dict.fromkeys(("psnr", "ssim", "psnr_blurry", "ssim_blurry"), 0.0)
        for i in range(len(self.val_set)):
            blur, sharp = self.val_set[i]
            with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=bool(self.autocast)):
                out = model(blur[None].to(self.device))
            low, high = min(0.0, float(sharp.min())), max(1.0, float(sharp.max()))
            out = out.float()[0].clamp(0, 1) if (low, high) == (0.0, 1.0) else out.float()[0]
            out, blur, sharp = (_hwc(t) for t in (out, blur, sharp))
            sums["psnr"] += metrics.psnr(out, sharp, data_range=high - low)
            sums["ssim"] += metrics.ssim(out, sharp, data_range=high - low)
            sums["psnr_blurry"] += metrics.psnr(blur, sharp, data_range=high - low)
            sums["ssim_blurry"] += metrics.ssim(blur, sharp, data_range=high - low)
        return {k: v / len(self.val_set) for k, v in sums.items()} | {"images": len(self.val_set)}

    # ----------------------------------------------------------------------------------- the loop
    def loader(self, epoch: int, start: int) -> DataLoader:
        """This rank's batches of ``epoch``, skipping its first ``start`` samples."""
        self.sampler.set_epoch(epoch, start)
        workers = self.cfg.data.workers
        return DataLoader(
            self.train_set,
            batch_size=self.sampler.per_rank,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_worker_init if workers else None,
        )

    def fit(
        self,
        until: int | None = None,
        minutes: float | None = None,
        on_step: Callable[[Trainer], None] | None = None,
    ) -> dict[str, Any]:
        """Train to ``run.steps`` (or stop early at step ``until`` / after ``minutes`` / when
        ``stop_requested`` is set, checkpointing).

        ``on_step(trainer)`` is called after every step, once its logging and validation are done (one process
        only); it may change ``cfg.run.steps`` (and ``cfg.log.val_every``), e.g. to fit a time budget: the end of
        the run and the cosine schedule follow; setting ``stop_requested`` stops after this step. Returns the best
        validation metrics so far (empty without validation).
        """
        cfg, main = self.cfg, self.rank == 0

        def stop_at() -> int:
            return min(cfg.run.steps, until or cfg.run.steps)

        deadline = time.monotonic() + 60 * minutes if minutes else None
        logger = _Logs(self.out_dir, cfg.log.tensorboard) if main else None
        if main:
            self.write_config()
            log.info(
                "%s: step %d of %d, batch %d (%d per process x %d), %d training samples, %d unused tensors frozen",
                cfg.name, self.step, cfg.run.steps, cfg.run.batch, self.sampler.per_rank, self.world,
                len(self.train_set), len(self.frozen),
            )  # fmt: skip
        bar = tqdm(total=cfg.run.steps, initial=self.step, disable=not (main and cfg.log.progress), unit="step")
        best = _read_best(self.out_dir) if main else {}
        window: dict[str, float] = {}
        tick, seen, count = time.perf_counter(), 0, 0
        stopped = False
        while self.step < stop_at() and not stopped:
            epoch, offset = divmod(self.step, self.sampler.steps_per_epoch)
            for blur, sharp in self.loader(epoch, offset * self.sampler.per_rank):
                terms = self.train_step(blur, sharp)
                for k, v in terms.items():
                    window[k] = window.get(k, 0.0) + v
                seen, count = seen + blur.shape[0] * self.world, count + 1
                bar.total = cfg.run.steps
                bar.update(1)
                stop = self.step >= stop_at() or self._should_stop(deadline)
                if self.step % cfg.log.every == 0 or stop:
                    self._log_train(logger, bar, epoch, window, count, seen / (time.perf_counter() - tick))
                    window, tick, seen, count = {}, time.perf_counter(), 0, 0
                finished = self.step == cfg.run.steps
                if self.val_set is not None and (self.step % cfg.log.val_every == 0 or finished):
                    best = self._validate_and_keep(logger, best)
                if on_step is not None:
                    on_step(self)
                    if self.stop_requested and not stop and count:  # on_step (one process) stops: log the rest
                        self._log_train(logger, bar, epoch, window, count, seen / (time.perf_counter() - tick))
                    stop = stop or self.stop_requested
                if self.step % cfg.log.ckpt_every == 0 or stop:
                    self._barrier()
                    if main:
                        self.save(self.out_dir / "last.pt", self.state_dict())
                if stop:
                    stopped = True
                    break
        bar.close()
        if main:
            if self.val_set is None and self.step == cfg.run.steps:
                self.save(self.out_dir / "best.pt", self._best_state({}))
            logger.close()
        self._barrier()
        return best

    def _log_train(
        self, logger: _Logs | None, bar: tqdm, epoch: int, window: dict[str, float], count: int, rate: float
    ) -> None:
        """One train.csv row: the mean loss terms of the ``count`` steps in ``window``, at ``rate`` images/s."""
        means = self._reduce({k: v / count for k, v in window.items()})
        lr = self.scheduler.get_last_lr()[0]
        if logger is not None:
            bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.2f}")
            logger.train(self.step, epoch, means, lr, rate)

    def write_config(self) -> None:
        """Write ``config.yaml``: the run's settings as they are now (an ``on_step`` plan may have changed them)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def _should_stop(self, deadline: float | None) -> bool:
        """Past the deadline or asked to stop, on any process (then on all of them)."""
        stop = self.stop_requested or (deadline is not None and time.monotonic() > deadline)
        if self.world > 1:
            flag = torch.tensor(float(stop), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def _validate_and_keep(self, logger: _Logs | None, best: dict[str, Any]) -> dict[str, Any]:
        if self.rank == 0:
            metrics = self.validate()
            logger.val(self.step, metrics)
            log.info("step %d validation: %s", self.step, {k: round(v, 4) for k, v in metrics.items()})
            best = self.keep_if_best(metrics) or best
        self._barrier()
        return best

    def keep_if_best(self, metrics: dict[str, float]) -> dict[str, Any] | None:
        """Record ``metrics`` (a :meth:`validate` result for the current weights) as the latest; when its PSNR
        beats the best so far, write ``best.pt`` with these weights and return the metrics with the step. A
        diverged (NaN) validation is never the best."""
        self.last_val = metrics | {"step": self.step}
        if not metrics["psnr"] > self.best_psnr:
            return None
        self.best_psnr = metrics["psnr"]
        best = self.last_val
        self.save(self.out_dir / "best.pt", self._best_state(best))
        return best

    def _best_state(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.eval_model.state_dict(),
            "model_kwargs": self.cfg.model_kwargs(),
            "metrics": metrics,
            "config": self.cfg.to_dict(),
        }

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist(), strict=True))

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _read_best(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "best.pt"
    if not path.exists():
        return {}
    return load_checkpoint(path)["metrics"]


class _Logs:
    """CSV files (train.csv, val.csv) plus TensorBoard events when tensorboard is installed."""

    TRAIN_FIELDS = ("step", "epoch", "loss", "char", "edge", "freq", "lr", "images_per_s", "time")
    VAL_FIELDS = ("step", "psnr", "ssim", "psnr_blurry", "ssim_blurry", "images", "time")

    def __init__(self, out_dir: Path, tensorboard: bool) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir, self.tb = out_dir, None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed: logging to CSV only")
            else:
                self.tb = SummaryWriter(str(out_dir / "tb"))

    def _append(self, name: str, fields: tuple[str, ...], row: dict[str, Any]) -> None:
        path = self.out_dir / name
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in fields})

    def train(self, step: int, epoch: int, means: dict[str, float], lr: float, rate: float) -> None:
        """One row of training loss terms, learning rate and throughput."""
        row = means | {"step": step, "epoch": epoch, "lr": lr, "images_per_s": rate, "time": time.time()}
        self._append("train.csv", self.TRAIN_FIELDS, row)
        if self.tb:
            for k, v in means.items():
                self.tb.add_scalar(f"train/{k}", v, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/images_per_s", rate, step)

    def val(self, step: int, metrics: dict[str, float]) -> None:
        """One row of validation metrics."""
        self._append("val.csv", self.VAL_FIELDS, metrics | {"step": step, "time": time.time()})
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(f"val/{k}", v, step)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.tb:
            self.tb.close()
