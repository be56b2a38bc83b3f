"""``python -m train CONFIG.yaml [--resume] [--until STEP] [--minutes M] [--set key=value ...]``.

Trains (in one go or in stretches that each end with a checkpoint), then exports the best weights.
SIGTERM or Ctrl-C stops a run after the current step, with a checkpoint (resume with ``--resume``).
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from .config import load_config
from .engine import Trainer
from .export import export_checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, train (resuming from ``log.out_dir/last.pt`` with ``--resume``), export."""
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("config", help="YAML config (see train/configs/)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue from a checkpoint: a path, or without value LOG_DIR/last.pt if it exists",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set run.steps=100 --set log.out_dir=runs/try",
    )  # fmt: skip
    parser.add_argument("--until", type=int, default=None, help="stop (and checkpoint) at this step")
    parser.add_argument("--minutes", type=float, default=None, help="stop (and checkpoint) after this long")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    if not args.resume and (Path(cfg.log.out_dir) / "last.pt").exists():
        parser.error(f"{cfg.log.out_dir}/last.pt exists: pass --resume, or set another log.out_dir")
    trainer = Trainer(cfg)
    if args.resume:
        path = Path(cfg.log.out_dir) / "last.pt" if args.resume == "auto" else Path(args.resume)
        if path.exists():
            trainer.resume(path)
        elif args.resume != "auto":
            parser.error(f"no checkpoint {path}")

    def request_stop(signum: int, _frame: object) -> None:
        logging.info("%s: stopping after this step, with a checkpoint", signal.Signals(signum).name)
        trainer.stop_requested = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    trainer.fit(until=args.until, minutes=args.minutes)
    if trainer.rank == 0 and cfg.export.dir and trainer.step == cfg.run.steps:
        logging.info(
            "exported %s", export_checkpoint(Path(cfg.log.out_dir) / "best.pt", cfg.export.dir, overwrite=True)
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
