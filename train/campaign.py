"""``python -m train.campaign --minutes M``: keep training both bundled models, stretch after stretch.

For each bundled model (``motion``, ``defocus``) one ``python -m train`` process runs, niced and on one
compute thread (two threads on a shared 2-core machine spin-wait on each other), in ``RUNS/NAME``
(default ``~/.cache/algnet/runs``, outside the repository). It continues from ``RUNS/NAME/last.pt`` when
there is one, else it starts from the shipped weights (``run.init``) with a fresh optimiser and the
campaign's schedule. Each process stops by itself after M minutes with a checkpoint; SIGTERM or Ctrl-C to
the campaign stops both the same way, after their current step.

Which checkpoint is worth shipping is decided on validation only (``RUNS/NAME/val.csv``, ``best.pt``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RUNS = Path("~/.cache/algnet/runs").expanduser()


@dataclass(frozen=True)
class Campaign:
    """One bundled model's campaign: its config and what changes from the config for a fine-tune."""

    model: str
    config: str
    overrides: tuple[str, ...]


CAMPAIGNS = {
    c.model: c
    for c in (
        # From the shipped (converged) weights: a lower peak lr and a long cosine, stretched later with
        # --set run.steps=N (the schedule re-plans on resume).
        Campaign("motion", "train/configs/synthetic_motion_s.yaml", ("optim.lr=2e-4", "run.steps=12000")),
        Campaign("defocus", "train/configs/synthetic_defocus_s.yaml", ("optim.lr=2e-4", "run.steps=12000")),
    )
}


def command(campaign: Campaign, runs: Path, minutes: float, extra: Sequence[str] = ()) -> list[str]:
    """The ``python -m train`` command line of one model's stretch."""
    out = runs / campaign.model
    sets = [
        f"log.out_dir={out}",
        f"export.dir={out / 'export'}",
        f"run.init={campaign.model}",  # used only when there is no last.pt to resume
        "log.progress=false",
        *campaign.overrides,
        *extra,
    ]
    args = [sys.executable, "-m", "train", str(REPO / campaign.config), "--resume", "--minutes", str(minutes)]
    return args + [a for s in sets for a in ("--set", s)]


def _one_thread_niced() -> None:
    os.nice(10)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stretches side by side and wait for them; the exit status is the worst of theirs."""
    parser = argparse.ArgumentParser(prog="python -m train.campaign", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="length of this stretch")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help=f"run folders (default {DEFAULT_RUNS})")
    parser.add_argument("--models", nargs="+", choices=sorted(CAMPAIGNS), default=sorted(CAMPAIGNS))
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="extra config override for every run, e.g. --set run.steps=16000",
    )  # fmt: skip
    args = parser.parse_args(argv)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    procs = []
    for name in args.models:
        out = args.runs / name
        out.mkdir(parents=True, exist_ok=True)
        cmd = command(CAMPAIGNS[name], args.runs, args.minutes, args.overrides)
        log = (out / "campaign.log").open("a")
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_one_thread_niced)
        )
        print(f"{name}: pid {procs[-1].pid}, log {out / 'campaign.log'}", flush=True)

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            p.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    raise SystemExit(main())
