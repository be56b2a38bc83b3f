"""``python -m train.gpu_stretch --out DIR --minutes M``: both bundled models' training stretch for a lent GPU.

A lent GPU comes for minutes, not hours, so this is one short, prepared run: for each bundled model in
turn (``motion``, then ``defocus``), its campaign config at the paper's crop and batch (256 px, 32) under
bfloat16 autocast, starting from the shipped weights (or ``--init NAME=SOURCE``), for an equal share of
``M`` minutes. The cosine schedule is fitted to the share: after a few timed steps, ``run.steps`` is set to
what the rest of the share holds, so the learning rate reaches its floor when time is up. Validation (the
config's, on held-out photos) runs every ``--val-every`` steps and at the end; the best EMA weights go to
``DIR/NAME.safetensors`` + ``DIR/NAME.json`` in float16, the bundled format of ``algnet_core/weights``, with
``DIR/NAME/val.csv`` and ``train.csv`` beside them. Whether they are shipped is decided later, on
validation, as for the CPU campaign.

``--dry-run`` does the same on whatever device there is with 32 px crops, batch 2 and 3 steps: the check
that the script works before a GPU is spent on it.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from algnet_core import ALGNet
from algnet_core.hub import save_bundled

from .campaign import CAMPAIGNS, REPO
from .config import load_config
from .engine import Trainer, load_checkpoint

log = logging.getLogger(__name__)

GPU_SETTINGS = ("data.crop=256", "run.batch=32", "run.precision=bf16")
"""The paper's crop and batch; bfloat16 autocast (no loss scaling needed)."""
DRY_RUN_SETTINGS = ("data.crop=32", "run.batch=2", "data.val.crop=48", "data.workers=0")
TIMED_STEPS = 20
"""Steps run before the schedule is fitted to the time left (their time includes the loader's start)."""
DRY_RUN_STEPS = 3


def stretch(
    model: str, out: Path, minutes: float, init: str, val_every: int, workers: int, dry_run: bool = False
) -> Path:
    """Train one bundled model for ``minutes``; write its best weights as ``out/MODEL.safetensors``."""
    campaign = CAMPAIGNS[model]
    run_dir = out / model
    settings = DRY_RUN_SETTINGS if dry_run else (*GPU_SETTINGS, f"data.workers={workers}")
    overrides = [
        *campaign.overrides,
        *settings,
        f"run.init={init}",
        f"log.out_dir={run_dir}",
        f"log.val_every={val_every}",
        f"log.ckpt_every={10**9}",  # last.pt only when the share ends
        "log.every=10",
        "log.progress=false",
        "log.tensorboard=false",
        "export.dir=null",
    ]
    cfg = load_config(REPO / campaign.config, overrides)
    start = time.monotonic()
    trainer = Trainer(cfg)
    if dry_run:
        cfg.run.steps = DRY_RUN_STEPS
        trainer.fit()
    else:
        trainer.fit(until=TIMED_STEPS)
        spent = time.monotonic() - start
        per_step = spent / TIMED_STEPS
        cfg.run.steps = TIMED_STEPS + max(1, int((60 * minutes - spent) / per_step * 0.95))
        log.info("%s: %.3f s per step; schedule fitted to %d steps", model, per_step, cfg.run.steps)
        trainer.fit(minutes=minutes - spent / 60)
    state = load_checkpoint(run_dir / "best.pt")
    net = ALGNet(**state["model_kwargs"])
    net.load_state_dict(state["model"])
    metrics = state["metrics"] or {}
    description = (
        f"{model}: GPU stretch from {init}, {state['step']} steps at crop {cfg.data.crop}, batch {cfg.run.batch}; "
        f"validation PSNR {metrics.get('psnr', float('nan')):.2f} dB (blurry {metrics.get('psnr_blurry', 0):.2f})"
    )
    weights = save_bundled(net, model, description, directory=out)
    (run_dir / "best.pt").unlink()  # 50+ MB each: the float16 weights are what comes back
    (run_dir / "last.pt").unlink(missing_ok=True)
    log.info("%s", description)
    return weights


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stretch for each model in turn (one GPU), sharing the minutes equally."""
    parser = argparse.ArgumentParser(prog="python -m train.gpu_stretch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the weights and logs (e.g. $OUT)")
    parser.add_argument("--minutes", type=float, default=8.0, help="total training time, shared by the models")
    parser.add_argument("--models", nargs="+", choices=sorted(CAMPAIGNS), default=["motion", "defocus"])
    parser.add_argument(
        "--init", action="append", default=[], metavar="MODEL=SOURCE",
        help="start MODEL from SOURCE (a checkpoint or save_pretrained folder) instead of the shipped weights",
    )  # fmt: skip
    parser.add_argument("--val-every", type=int, default=200, help="validation interval in steps")
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--dry-run", action="store_true", help="3 tiny steps per model: check the script")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    inits = dict(spec.split("=", 1) for spec in args.init)
    if unknown := set(inits) - set(args.models):
        parser.error(f"--init for models not trained: {sorted(unknown)}")
    taken = [m for m in args.models if (args.out / m).exists() or (args.out / f"{m}.safetensors").exists()]
    if taken:
        parser.error(f"{args.out} already holds {taken}: choose a new --out")
    args.out.mkdir(parents=True, exist_ok=True)
    share = args.minutes / len(args.models)
    for model in args.models:
        source = inits.get(model, model)
        weights = stretch(model, args.out, share, source, args.val_every, args.workers, args.dry_run)
        print(weights, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
