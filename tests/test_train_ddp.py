"""DistributedDataParallel on CPU: torchrun, gloo backend, 2 processes, a few steps.

Each process gets half of every global batch and DDP averages the gradients, so 2 processes must end
with the weights of a single process that trains on the whole global batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY
from PIL import Image

from algnet_core import ALGNet
from train.config import Config
from train.engine import Trainer, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed support")
def test_two_gloo_processes_train_like_one_process_on_the_global_batch(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        small = Image.fromarray((rng.uniform(size=(6, 6, 3)) * 255).astype(np.uint8))
        small.resize((40, 36), Image.BICUBIC).save(photos / f"{i}.png")
    raw = {
        "name": "ddp",
        "model": {"preset": "ALGNet-S", "overrides": TINY},
        "data": {
            "crop": 32,
            "workers": 0,
            "train": {"kind": "synthetic", "folders": [str(photos)], "recipe": {"kind": "defocus", "kernel_size": 7}},
        },
        "run": {"steps": 2, "batch": 4},
        "log": {"out_dir": str(tmp_path / "ddp"), "every": 1, "tensorboard": False, "progress": False},
    }
    raw["data"]["train"]["recipe"]["defocus_radius"] = [1, 3]
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*cmd, "-m", "train", str(config)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 4 (2 per process x 2)" in result.stderr
    distributed = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert distributed["step"] == 2

    single = Trainer(Config.from_dict(raw | {"log": raw["log"] | {"out_dir": str(tmp_path / "single")}}))
    single.fit()
    # Compare what the weights compute: a conv bias right before an InstanceNorm has a zero gradient up
    # to rounding, which Adam scales up to lr-sized steps in arbitrary directions, without any effect.
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # the run's seed: the initial weights of both runs
    model = ALGNet(**Config.from_dict(raw).model_kwargs())
    with torch.no_grad():
        initial = model(x)
        model.load_state_dict(distributed["model"])
        torch.testing.assert_close(model(x), single.model(x), rtol=0, atol=1e-5)
        assert (model(x) - initial).abs().max() > 1e-3  # and training did change them
    rows = (tmp_path / "ddp" / "train.csv").read_text().splitlines()
    assert len(rows) == 3  # header + one row per step, written by rank 0 only
