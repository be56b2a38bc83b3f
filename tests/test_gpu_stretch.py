"""The GPU stretch script, run on the CPU in its dry-run mode: what a lent GPU would bring back."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from algnet_core.hub import DESCRIPTION_KEY, build_model, bundled_files
from train.gpu_stretch import main


def test_dry_run_writes_float16_weights_that_load_and_moved_from_the_shipped_ones(tmp_path: Path, shared) -> None:
    out = tmp_path / "out"
    assert main(["--out", str(out), "--models", "motion", "--dry-run"]) == 0
    weights, config = out / "motion.safetensors", out / "motion.json"
    with safe_open(weights, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert "GPU stretch from motion, 3 steps" in f.metadata()[DESCRIPTION_KEY]
    trained, shipped = build_model(config, weights), build_model(*bundled_files("motion"))
    moved = [k for k, v in shipped.state_dict().items() if not torch.equal(v, trained.state_dict()[k])]
    assert len(moved) > 10  # trained: the weights are not the shipped ones
    rows = list(csv.DictReader((out / "motion" / "val.csv").open()))
    assert [r["step"] for r in rows] == ["3"] and float(rows[0]["psnr"]) > 15
    assert not (out / "motion" / "best.pt").exists()  # only the float16 weights travel back
    with pytest.raises(SystemExit):  # never over an earlier stretch's results
        main(["--out", str(out), "--models", "motion", "--dry-run"])
