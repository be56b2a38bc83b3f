"""The benchmark report: models beside the input and an unsharp-mask peer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY

from algnet_core import ALGNet
from train.report import _unsharp, main, markdown, report


def test_unsharp_peer_keeps_flat_colour_images_and_sharpens_edges() -> None:
    flat = np.full((24, 24, 3), 100, np.uint8)
    assert np.array_equal(_unsharp(flat, 2, 1.0), flat)  # scikit-image's channel_axis=-1 garbles this
    edge = np.repeat(np.linspace(50, 200, 24)[None, :, None], 24, 0).repeat(3, 2).astype(np.uint8)
    edge[:, 12:] = 200
    out = _unsharp(edge, 2, 1.0).astype(int)
    assert out[:, 12].mean() > 200 and out[:, 12].std() == 0  # overshoot at the edge, same on every row


def test_an_identity_model_scores_exactly_the_input(tmp_path: Path, shared, capsys) -> None:
    folder = tmp_path / "identity"
    model = ALGNet(**TINY)
    with torch.no_grad():  # zero output convolutions: the network returns its input
        for conv in [model.ending, *model.ConvsOut]:
            conv.weight.zero_()
            conv.bias.zero_()
    model.save_pretrained(folder)
    rows = report([str(folder)], ["sharp", "realblur"], limit=1, ensemble=True)
    for row in rows:
        assert row["images"] == 1
        assert row[str(folder)] == pytest.approx(row["blurry"], abs=1e-9)
        assert row[f"{folder} ensemble"] == pytest.approx(row["blurry"], abs=1e-9)
        assert 15 < row["unsharp"] < 60 and row["unsharp setting"].startswith("radius")
    assert rows[0]["blurry"] > 44  # sigma 0.005 noise on a sharp photo: ~46 dB
    assert "| sharp | 1 |" in markdown(rows)
    (tmp_path / "r.json").write_text("mine")
    with pytest.raises(SystemExit):  # an existing report is never overwritten
        main(["--models", str(folder), "--json", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").read_text() == "mine"
