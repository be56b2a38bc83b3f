"""`algnet info` counts agree with the figures measured on the official code (COSTS.md)."""

from __future__ import annotations

import dataclasses

import pytest

from algnet_core import PRESETS, scan
from algnet_core.cost import count_cost, describe


def test_algnet_cost_matches_official_measurements():
    c = count_cost(PRESETS["ALGNet"])
    assert c.params == 54_642_252
    # FlopCounterMode on the official code, scan stubbed: convolution 38.90 G + mm 39.19 G FLOPs.
    assert 2 * c.conv_macs == 38_898_870_272
    assert 2 * c.matmul_macs == 39_191_576_576
    assert c.scan_elements == 1_409_286_144  # sum of B*L*E*N over the 40 Mamba calls
    assert c.total_flops / 2e9 == pytest.approx(44.0, abs=0.1)  # ~44 GMACs, not "17 G"
    # Module hooks with Mamba fused (thop): 19.39 GMACs.
    assert c.hook_macs / 1e9 == pytest.approx(19.39, rel=0.01)


def test_first_configuration_is_the_papers_17g():
    c = count_cost(PRESETS["ALGNet-v1"])
    assert c.params == 37_697_676
    assert c.hook_macs / 1e9 == pytest.approx(17.62, rel=0.01)


def test_describe_names_every_figure():
    text = describe("ALGNet-S")
    for word in ("parameters", "convolutions", "matrix products", "selective scan", "total", "paper-style"):
        assert word in text
    with pytest.raises(ValueError, match="unknown preset"):
        describe("ALGNet-XL")


def test_counts_do_not_depend_on_how_a_scan_backend_computes(monkeypatch):
    def no_arithmetic(*args, **kwargs):
        raise AssertionError("a scan backend ran on the meta device")

    for name, backend in scan.BACKENDS.items():
        monkeypatch.setitem(scan.BACKENDS, name, dataclasses.replace(backend, run=no_arithmetic))
    for name in ("reference", "chunked", "auto"):
        monkeypatch.setenv(scan.ENV_VAR, name)
        c = count_cost(PRESETS["ALGNet-S"], 64, 96)
        assert (c.conv_macs, c.matmul_macs, c.scan_elements) == (213_153_536, 195_821_568, 29_097_984), name
