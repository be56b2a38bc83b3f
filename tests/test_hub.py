"""Weights: save/load round trips, the registry's offline fall-backs, every bad-weights error, convert.

Nothing here touches the network: local folders, a cache filled by the real ``huggingface_hub`` client
from a loopback HTTP stand-in of the Hub (127.0.0.1), and ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import safetensors
import torch
from helpers import TINY
from huggingface_hub import constants

from algnet_core import hub
from algnet_core.hub import WeightsError, from_pretrained, load_model
from algnet_core.model import PRESETS, ALGNet

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def saved(active_model: ALGNet, tmp_path: Path) -> Path:
    active_model.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, online mode, and no real Hub: the endpoint is a closed local port."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setattr(hub, "_warned_bundled", set())  # no fall-back warned about yet
    return tmp_path / "hf-cache"


class FakeHub(BaseHTTPRequestHandler):
    """Serves ``/{repo_id}/resolve/{revision}/{file}`` from ``self.server.repos`` like the Hub does."""

    def _file(self) -> bytes | None:
        if getattr(self.server, "down", None):  # a Hub that answers nothing but this HTTP error
            self.send_response(self.server.down)
            self.end_headers()
            return None
        parts = self.path.lstrip("/").split("/")
        repo, files = "/".join(parts[:2]), self.server.repos.get("/".join(parts[:2]))
        if parts[2:3] != ["resolve"] or files is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            return None
        data = files.get("/".join(parts[4:]))
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return None
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(repo.encode() + data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return data

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self._file()

    def do_GET(self) -> None:  # noqa: N802
        data = self._file()
        if data is not None:
            self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub(hub_env: Path, saved: Path, monkeypatch: pytest.MonkeyPatch):
    """A loopback Hub with repo ``test/tiny`` (a save_pretrained folder) and ``test/no-weights``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    files = {name: (saved / name).read_bytes() for name in (hub.CONFIG_NAME, hub.WEIGHTS_NAME)}
    server.repos = {"test/tiny": files, "test/no-weights": {hub.CONFIG_NAME: files[hub.CONFIG_NAME]}}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    server.shutdown()
    server.server_close()


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_save_pretrained_round_trip_gives_identical_outputs(active_model, saved, image) -> None:
    loaded = ALGNet.from_pretrained(saved)
    assert loaded.provenance["source"] == "local"
    with torch.inference_mode():
        assert torch.equal(loaded(image), active_model(image))


def test_load_model_returns_an_instance_unchanged() -> None:
    model = ALGNet(**TINY).train()
    assert load_model(model) is model and load_model(model, "cpu") is model
    assert model.training and not hasattr(model, "provenance")


def test_hub_download_then_cache_when_offline(active_model, fake_hub, hub_env, image, monkeypatch) -> None:
    online = ALGNet.from_pretrained("test/tiny")
    assert online.provenance["source"] == "hub"
    assert Path(online.provenance["path"]).is_relative_to(hub_env)
    go_offline(monkeypatch)
    cached = load_model("test/tiny", "cpu")
    assert cached.provenance["source"] == "cache"
    with torch.inference_mode():
        assert torch.equal(cached(image), active_model(image))


def test_a_hub_that_does_not_answer_is_reported_as_the_cache(active_model, fake_hub, image) -> None:
    ALGNet.from_pretrained("test/tiny")  # fills the cache
    fake_hub.down = 503  # reachable, but 503 for every request: huggingface_hub serves its cache instead
    cached = ALGNet.from_pretrained("test/tiny")
    assert cached.provenance["source"] == "cache"  # not "hub": nothing came from it
    with torch.inference_mode():
        assert torch.equal(cached(image), active_model(image))


def test_a_hub_that_refuses_is_not_reported_as_unreachable(fake_hub) -> None:
    fake_hub.down = 401  # an answer (e.g. a private repo without a token): not "the Hub cannot be reached"
    with pytest.raises(WeightsError, match="test/tiny/config.json is not in the Hugging Face cache and the Hub refus"):
        ALGNet.from_pretrained("test/tiny")


def test_registered_name_checks_its_preset_and_falls_back_to_bundled(fake_hub, monkeypatch, caplog) -> None:
    entry = hub.RegisteredModel("test/tiny", "main", "ALGNet-S", "motion", "test")
    monkeypatch.setitem(hub.REGISTRY, "tiny-name", entry)
    with pytest.raises(WeightsError, match="not the ALGNet-S preset"):
        from_pretrained("tiny-name")  # the tiny repo is not the preset the name promises
    monkeypatch.setitem(hub.REGISTRY, "tiny-name", hub.RegisteredModel("test/absent", "main", "ALGNet-S", "motion", ""))
    with caplog.at_level(logging.INFO, logger="algnet_core.hub"):
        model = from_pretrained("tiny-name")
    assert model.provenance["source"] == "bundled"
    assert model.provenance["path"] == str(hub.WEIGHTS_DIR / "motion.safetensors")
    assert len(caplog.records) == 1 and "using bundled weights" in caplog.records[0].getMessage()


def test_motion_offline_falls_back_to_the_bundled_weights(hub_env, monkeypatch, caplog) -> None:
    go_offline(monkeypatch)
    with caplog.at_level(logging.INFO, logger="algnet_core.hub"):
        model = load_model("motion", "cpu")
    assert model.provenance["source"] == "bundled"
    assert "motion" in model.provenance["description"]
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "Hub copy not available, using bundled weights" in caplog.records[0].getMessage()
    with caplog.at_level(logging.INFO, logger="algnet_core.hub"):
        load_model("motion", "cpu")  # again, as a ComfyUI loader node runs for each workflow: a note, not a warning
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]


def test_a_revision_asked_for_is_that_revision_or_an_error(hub_env, monkeypatch) -> None:
    """No bundled stand-in for a pinned revision: what the caller asked for, or a WeightsError."""
    go_offline(monkeypatch)
    with pytest.raises(WeightsError, match="ALGNet-S-motion/config.json is not in the Hugging Face cache"):
        from_pretrained("motion", revision=COMMIT)
    assert from_pretrained("motion").provenance["source"] == "bundled"  # the registry's own revision: falls back


def test_a_local_folder_named_like_a_registered_model_is_that_folder(active_model, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    active_model.save_pretrained(tmp_path / "motion")  # a tiny model, not the ALGNet-S that "motion" promises
    loaded = from_pretrained("motion")
    assert loaded.provenance["source"] == "local" and torch.equal(loaded.intro.weight, active_model.intro.weight)


def test_from_pretrained_keywords_of_the_mixin(saved) -> None:
    """strict (True only) and map_location as PyTorchModelHubMixin takes them; anything else is refused."""
    model = ALGNet.from_pretrained(saved, strict=True, map_location="meta")
    assert next(model.parameters()).device.type == "meta"
    with pytest.raises(ValueError, match="load strictly"):
        ALGNet.from_pretrained(saved, strict=False)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['foo'\]"):
        ALGNet.from_pretrained(saved, foo=1)


def test_prefilled_cache_is_used_without_network(saved, hub_env, monkeypatch) -> None:
    snapshot = hub_env / "models--algnet--ALGNet-S-motion" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    config = ALGNet(**PRESETS["ALGNet-S"])
    config.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    model = load_model("motion", "cpu")  # the endpoint is a closed port: Hub unreachable
    assert model.provenance["source"] == "cache"
    assert model.provenance["path"] == str(snapshot / hub.WEIGHTS_NAME)


def test_every_bundled_name_ships_a_small_described_alg_net_s_file() -> None:
    stems = {entry.bundled for entry in hub.REGISTRY.values() if entry.bundled}
    assert stems == {"motion", "defocus"}
    assert sorted(p.stem for p in hub.WEIGHTS_DIR.glob("*.safetensors")) == sorted(stems)  # nothing unused
    for stem in stems:
        config, weights = hub.bundled_files(stem)
        assert weights.stat().st_size < 25e6
        with safetensors.safe_open(weights, framework="pt") as f:
            assert stem in f.metadata()[hub.DESCRIPTION_KEY]
        assert hub.preset_of(hub.build_model(config, weights)._hub_mixin_config) == "ALGNet-S"


def test_bundled_files_dropped_in_are_loaded_as_float16_with_their_description(hub_env, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(hub, "WEIGHTS_DIR", tmp_path / "weights")
    torch.manual_seed(2)
    trained = ALGNet(**PRESETS["ALGNet-S"]).eval()
    hub.save_bundled(trained, "motion", "ALGNet-S trained on test data")
    go_offline(monkeypatch)
    model = load_model("motion", "cpu")
    assert model.provenance["source"] == "bundled"
    assert model.provenance["description"] == "ALGNet-S trained on test data"
    for name, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], value.half().float())


def test_bad_weights_raise_errors_naming_the_file(saved, tmp_path) -> None:
    weights, config = saved / hub.WEIGHTS_NAME, saved / hub.CONFIG_NAME
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(WeightsError, match=rf"{weights}.*corrupted or truncated"):
        from_pretrained(saved)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="corrupted or truncated"):
        from_pretrained(saved)
    weights.write_bytes(good)
    config.write_text(config.read_text().replace('"width": 8', '"width": 16'))
    with pytest.raises(WeightsError, match=rf"{weights} does not match the model described by {config}"):
        from_pretrained(saved)
    config.write_text('{"width": 8, "colour": "red"}')
    with pytest.raises(WeightsError, match=rf"{config} is not a valid ALGNet config"):
        from_pretrained(saved)
    config.unlink()
    with pytest.raises(WeightsError, match=rf"missing model config: {config}"):
        from_pretrained(saved)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="missing"):
        from_pretrained(tmp_path / "empty")


def test_unknown_repo_missing_file_and_invalid_id_raise(fake_hub, monkeypatch) -> None:
    with pytest.raises(WeightsError, match="'test/absent' is not a local folder, a registered name"):
        from_pretrained("test/absent")
    with pytest.raises(WeightsError, match="'test/no-weights' has no file model.safetensors"):
        from_pretrained("test/no-weights")
    with pytest.raises(WeightsError, match="not a local folder, a registered name .* valid Hub repo id"):
        from_pretrained("no//such path")
    go_offline(monkeypatch)
    with pytest.raises(WeightsError, match="test/other/config.json is not in the Hugging Face cache"):
        from_pretrained("test/other")


@pytest.mark.parametrize("wrapper", ["params", "params_ema", "state_dict", "model"])
def test_unwrap_checkpoint_wrappers_and_module_prefix(wrapper) -> None:
    state = {"module.intro.weight": torch.ones(2), "module.intro.bias": torch.zeros(1)}
    assert hub.unwrap_checkpoint({wrapper: state, "iter": 7}).keys() == {"intro.weight", "intro.bias"}


def test_convert_official_checkpoint(tmp_path) -> None:
    torch.manual_seed(3)
    model = ALGNet(**PRESETS["ALGNet-S"]).eval()
    checkpoint = {"params": {f"module.{k}": v for k, v in model.state_dict().items()}, "iter": 1}
    torch.save(checkpoint, tmp_path / "official.pth")
    assert hub.convert_checkpoint(tmp_path / "official.pth", tmp_path / "out") == "ALGNet-S"
    loaded = from_pretrained(tmp_path / "out")
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    with pytest.raises(FileExistsError):
        hub.convert_checkpoint(tmp_path / "official.pth", tmp_path / "out")


@pytest.mark.parametrize("preset", ["ALGNet", "ALGNet-B", "ALGNet-v1"])
def test_detect_preset_of_the_papers_models(preset) -> None:
    with torch.device("meta"):
        state = ALGNet(**PRESETS[preset]).state_dict()
    assert hub.detect_preset(state) == preset


def test_convert_refuses_anything_else(active_model, tmp_path) -> None:
    torch.save({"params": active_model.state_dict()}, tmp_path / "tiny.pth")
    with pytest.raises(WeightsError, match="not a checkpoint of a known ALGNet configuration"):
        hub.convert_checkpoint(tmp_path / "tiny.pth", tmp_path / "out")
    with torch.device("meta"):
        state = ALGNet(**PRESETS["ALGNet-S"]).state_dict()
    state.pop("encoders.0.0.beta")  # one tensor short of ALGNet-S, one renamed, one of another shape
    state["decoders.0.0.extra"] = state.pop("ending.bias")
    state["intro.bias"] = torch.zeros(8, device="meta")
    torch.save({"params": {k: torch.zeros(v.shape) for k, v in state.items()}}, tmp_path / "edited.pth")
    said = "Closest: ALGNet-S, missing 2: ending.bias, encoders.0.0.beta; unexpected 1: decoders.0.0.extra; "
    said += "other shape 1: intro.bias (8,) (not (16,))"
    with pytest.raises(WeightsError, match=re.escape(said)):
        hub.convert_checkpoint(tmp_path / "edited.pth", tmp_path / "out")
    torch.save({"epoch": 3, "optimizer": [1, 2]}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="no state dict in the checkpoint"):
        hub.convert_checkpoint(tmp_path / "other.pth", tmp_path / "out")
    torch.save({"params": {"conv.weight": torch.zeros(2)}}, tmp_path / "foreign.pth")
    with pytest.raises(WeightsError, match="no 'intro.weight'"):
        hub.convert_checkpoint(tmp_path / "foreign.pth", tmp_path / "out")
    torch.save({"params": hub.RegisteredModel("a", "b", "c", None, "d")}, tmp_path / "pickled.pth")
    with pytest.raises(WeightsError, match="cannot be read as a PyTorch checkpoint"):
        hub.convert_checkpoint(tmp_path / "pickled.pth", tmp_path / "out")
