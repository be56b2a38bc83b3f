"""The weights campaign: sharp and barely blurred training samples, safe checkpoint loading, clean stops."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY
from PIL import Image

from algnet_core import ALGNet
from train.campaign import CAMPAIGNS, command
from train.data import MILD_DEFOCUS_RADIUS, BlurRecipe
from train.engine import initial_weights, load_checkpoint
from train.export import export_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _identity(kernel: np.ndarray) -> bool:
    centre = kernel.shape[0] // 2
    return kernel[centre, centre] == 1.0


def _spread(kernel: np.ndarray) -> float:
    """RMS distance (px) of the kernel's mass from its central pixel."""
    rows, cols = np.indices(kernel.shape) - kernel.shape[0] // 2
    return float(np.sqrt((kernel * (rows**2 + cols**2)).sum()))


@pytest.mark.parametrize("kind", ["motion", "defocus"])
def test_recipe_draws_sharp_and_mild_kernels_in_their_shares(kind: str) -> None:
    def recipe(sharp: float, mild: float) -> BlurRecipe:
        return BlurRecipe(kind, 31, motion_length=(3, 27), defocus_radius=(1, 10), sharp_prob=sharp, mild_prob=mild)

    rng = np.random.default_rng(0)
    mixed = [recipe(0.1, 0.1).kernel(rng) for _ in range(2000)]
    assert 0.08 < sum(map(_identity, mixed)) / len(mixed) < 0.12
    mild = [recipe(0.0, 1.0).kernel(rng) for _ in range(200)]
    full = [recipe(0.0, 0.0).kernel(rng) for _ in range(200)]
    assert not any(map(_identity, mild + full))
    assert max(map(_spread, mild)) < 1.6 < 3.0 < np.median([_spread(k) for k in full])
    assert all(abs(k.sum() - 1) < 1e-9 for k in mixed + mild)


def test_recipe_without_shares_never_draws_the_identity() -> None:
    recipe = BlurRecipe(kind="defocus", kernel_size=21, defocus_radius=(1, 10))
    rng = np.random.default_rng(1)
    assert not any(_identity(recipe.kernel(rng)) for _ in range(500))
    assert MILD_DEFOCUS_RADIUS[1] < 1.0 + 1e-9  # barely blurred stays below the full recipe's smallest disk


@pytest.mark.parametrize("shares", [(-0.1, 0.0), (0.7, 0.5)])
def test_recipe_refuses_impossible_shares(shares: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="sharp_prob and mild_prob"):
        BlurRecipe(sharp_prob=shares[0], mild_prob=shares[1])


class _RunsCode:
    """Unpickling this object runs a shell command (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_cannot_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with evil.open("wb") as f:
        pickle.dump({"model": _RunsCode(marker), "ema": None}, f)
    for load in (load_checkpoint, initial_weights, lambda p: export_checkpoint(p, tmp_path / "out")):
        with pytest.raises(pickle.UnpicklingError):
            load(evil)
    assert not marker.exists()


def test_initial_weights_from_a_bundled_name_equal_the_shipped_file() -> None:
    state = initial_weights("defocus")
    shipped = ALGNet.from_pretrained("defocus").state_dict()
    assert state.keys() == shipped.keys()
    assert all(torch.equal(state[k], shipped[k]) for k in state)


def test_campaign_runs_each_model_from_its_config_outside_the_repo(tmp_path: Path) -> None:
    cmd = command(CAMPAIGNS["motion"], tmp_path, 30.0)
    assert cmd[:3] == [sys.executable, "-m", "train"]
    assert cmd[3] == str(REPO / "train/configs/synthetic_motion_s.yaml")
    assert cmd[4:7] == ["--resume", "--minutes", "30.0"]
    sets = dict(s.split("=", 1) for s in cmd[8::2])
    assert sets["log.out_dir"] == str(tmp_path / "motion")
    assert sets["run.init"] == "motion"
    assert set(CAMPAIGNS) == {"motion", "defocus"}


def _tiny_config(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.uniform(size=(48, 48, 3)) * 255).astype(np.uint8)).save(photos / f"{i}.png")
    overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"""
name: tiny
model: {{preset: ALGNet-S, overrides: {overrides}}}
data:
  crop: 32
  workers: 0
  train:
    kind: synthetic
    folders: [{photos}]
    recipe: {{kind: motion, kernel_size: 9, motion_length: [2, 6], sharp_prob: 0.2, mild_prob: 0.2}}
run: {{steps: 100000, batch: 2}}
log: {{out_dir: {tmp_path / "run"}, every: 1, ckpt_every: 100000, tensorboard: false, progress: false}}
"""
    )
    return config


def test_sigterm_stops_training_after_a_step_with_a_checkpoint(tmp_path: Path) -> None:
    config = _tiny_config(tmp_path)
    env = os.environ | {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "train", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    train_csv = tmp_path / "run" / "train.csv"
    try:
        for _ in range(600):  # wait for the first logged steps (up to 60 s on a loaded machine)
            if train_csv.exists() and len(train_csv.read_text().splitlines()) >= 3:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert 2 <= state["step"] < 100000
    assert "SIGTERM: stopping after this step" in output
