"""The ComfyUI nodes, called as ComfyUI calls them, with and without ComfyUI's modules present."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from huggingface_hub import constants
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from safetensors.torch import save_file

from algnet_core import ALGNet, WeightsError, deblur, deblur_tensor, hub, list_models, scan
from algnet_core import inference as core_inference
from algnet_core.inference import BYTES_PER_PIXEL_PER_WIDTH, MIN_AUTO_TILE
from algnet_plugin.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from algnet_plugin.comfyui import nodes as comfy_nodes
from algnet_plugin.comfyui.nodes import ALGNetDeblur, ALGNetModelLoader

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
COMFYUI_PACKAGES = {
    canonicalize_name(name)
    for name in (
        # ComfyUI's requirements.txt
        *("torch", "torchsde", "torchvision", "einops", "transformers", "tokenizers"),
        *("sentencepiece", "safetensors", "aiohttp", "yarl", "pyyaml", "Pillow", "scipy", "tqdm", "psutil"),
        *("kornia", "spandrel", "soundfile", "av", "pydantic", "alembic", "SQLAlchemy", "numpy"),
        "huggingface-hub",  # a requirement of transformers
    )
}
"""What a ComfyUI installation has: its requirements and huggingface-hub (through transformers)."""


@pytest.fixture(autouse=True)
def no_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reaches for the Hub: it is unreachable and the Hugging Face cache is empty."""
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


class Interrupted(Exception):
    """Stands for ComfyUI's InterruptProcessingException."""


@pytest.fixture
def fake_comfyui(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    """Minimal ``comfy.model_management``, ``comfy.utils`` and ``folder_paths`` that record their calls."""
    record = SimpleNamespace(
        progress=[], interrupted=False, freed=[], models_dir=tmp_path / "models", offload_device=torch.device("cpu")
    )
    mm = ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: record.offload_device
    mm.module_size = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())
    mm.free_memory = lambda size, device: record.freed.append(size)
    mm.should_use_fp16 = mm.should_use_bf16 = lambda device: False
    mm.processing_interrupted = lambda: record.interrupted

    def throw_if_interrupted() -> None:
        if record.interrupted:
            raise Interrupted

    mm.throw_exception_if_processing_interrupted = throw_if_interrupted
    utils = ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total: int) -> None:
            self.total = total

        def update_absolute(self, value: int, total: int | None = None) -> None:
            record.progress.append((value, total))

    utils.ProgressBar = ProgressBar
    comfy = ModuleType("comfy")
    comfy.model_management, comfy.utils = mm, utils

    fp = ModuleType("folder_paths")
    fp.models_dir = str(record.models_dir)
    fp.folder_names_and_paths = {}
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])

    def get_filename_list(name: str) -> list[str]:
        paths, extensions = fp.folder_names_and_paths[name]
        files = (p.relative_to(root) for root in map(Path, paths) for p in root.rglob("*") if p.is_file())
        return sorted(f.as_posix() for f in files if f.suffix in extensions)

    def get_full_path(name: str, filename: str) -> str | None:
        found = [Path(p) / filename for p in fp.folder_names_and_paths[name][0] if (Path(p) / filename).is_file()]
        return str(found[0]) if found else None

    fp.get_filename_list, fp.get_full_path = get_filename_list, get_full_path
    for name, module in {
        "comfy": comfy,
        "comfy.model_management": mm,
        "comfy.utils": utils,
        "folder_paths": fp,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return record


def _check_input_spec(spec: tuple) -> None:
    assert isinstance(spec, tuple) and len(spec) == 2
    assert isinstance(spec[0], str) or (isinstance(spec[0], list) and all(isinstance(c, str) for c in spec[0]))
    assert isinstance(spec[1], dict) and spec[1]["tooltip"]  # every input says what it is, in the UI
    if spec[0] == "INT":
        assert spec[1]["min"] <= spec[1]["default"] <= spec[1]["max"]


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_node_declarations_are_well_formed(node_id: str) -> None:
    cls = NODE_CLASS_MAPPINGS[node_id]
    inputs = cls.INPUT_TYPES()
    assert set(inputs) <= {"required", "optional", "hidden"} and inputs["required"]
    for group in inputs.values():
        for spec in group.values():
            _check_input_spec(spec)
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) and all(cls.OUTPUT_TOOLTIPS)
    assert callable(getattr(cls, cls.FUNCTION))
    assert cls.CATEGORY == "image/restoration/ALGNet"
    assert NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("ALGNet ")


def test_loader_output_is_the_deblur_model_input() -> None:
    assert ALGNetModelLoader.RETURN_TYPES == ("ALGNET_MODEL",)
    assert ALGNetDeblur.INPUT_TYPES()["required"]["algnet_model"][0] == "ALGNET_MODEL"
    assert ALGNetDeblur.RETURN_TYPES == ("IMAGE",)


def test_root_init_reexports_the_node_mappings() -> None:
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("algnet_custom_node", root / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS is NODE_CLASS_MAPPINGS
    assert module.NODE_DISPLAY_NAME_MAPPINGS is NODE_DISPLAY_NAME_MAPPINGS


def test_deblur_node_runs_every_image_of_an_odd_sized_batch(tiny_model: ALGNet) -> None:
    image = torch.rand(2, 37, 53, 3)
    (out,) = ALGNetDeblur().deblur(image, tiny_model, tile=0, overlap=0)
    assert out.shape == (2, 37, 53, 3) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    alone = [deblur_tensor(one.movedim(-1, 1), tiny_model, tile=None, overlap=0) for one in image.split(1)]
    expected = torch.cat(alone).clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)  # a batch of 2 may sum in another order


def test_deblur_node_tiles_large_images_to_full_size(tiny_model: ALGNet) -> None:
    image = torch.rand(2, 70, 45, 3)
    (out,) = ALGNetDeblur().deblur(image, tiny_model, tile=32, overlap=8)
    assert out.shape == image.shape and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1


def test_deblur_node_runs_grey_images_as_the_core_does(tiny_model: ALGNet) -> None:
    """A one-channel IMAGE (some custom nodes make them) comes back one-channel: ``algnet_core.deblur`` of the
    grey image (run as grey RGB, the three outputs averaged)."""
    image = torch.rand(2, 24, 32, 1)
    (out,) = ALGNetDeblur().deblur(image, tiny_model, tile=0, overlap=0)
    assert out.shape == image.shape and out.dtype == torch.float32
    for one, restored in zip(image, out, strict=True):
        expected = deblur(one[..., 0].numpy(), tiny_model, tile=None, overlap=0)
        torch.testing.assert_close(restored[..., 0], torch.from_numpy(expected), atol=1e-5, rtol=0)
    assert (out - image).abs().mean() > 1e-3  # restored, not passed through


def test_deblur_node_returns_a_grey_photo_grey(tiny_model: ALGNet, caplog: pytest.LogCaptureFixture) -> None:
    """LoadImage makes a grey PNG three equal channels: it comes back with three equal channels (the mean of
    the restored ones), while a colour image of the same batch stays colour."""
    grey = torch.rand(1, 24, 32, 1).expand(-1, -1, -1, 3)
    image = torch.cat([grey, torch.rand(1, 24, 32, 3)])
    with caplog.at_level(logging.INFO, logger="algnet_core.inference"):
        (out,) = ALGNetDeblur().deblur(image, tiny_model, tile=0, overlap=0)
    assert torch.equal(out[0, ..., 0], out[0, ..., 1]) and torch.equal(out[0, ..., 1], out[0, ..., 2])
    (one,) = ALGNetDeblur().deblur(grey[..., :1].contiguous(), tiny_model, tile=0, overlap=0)
    torch.testing.assert_close(out[0, ..., :1], one[0], atol=1e-6, rtol=0)  # as the one-channel IMAGE
    assert (out[1, ..., 0] - out[1, ..., 1]).abs().max() > 1e-3
    assert "algnet: 32x24 image(s)" in caplog.text  # width x height, as ComfyUI states sizes


def test_deblur_node_keeps_alpha(tiny_model: ALGNet) -> None:
    image = torch.rand(1, 20, 24, 4)
    (out,) = ALGNetDeblur().deblur(image, tiny_model, tile=0, overlap=0)
    assert out.shape == image.shape
    assert torch.equal(out[..., 3], image[..., 3])


@pytest.mark.parametrize("shape", [(2, 1, 40, 3), (1, 40, 1, 3)])
def test_deblur_node_rejects_one_pixel_strips(tiny_model: ALGNet, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="needs at least 16x16"):
        ALGNetDeblur().deblur(torch.rand(shape), tiny_model, tile=0, overlap=0)


def test_deblur_node_rejects_channels_first_tensors(tiny_model: ALGNet) -> None:
    with pytest.raises(ValueError, match=r"\[B, H, W, 1, 3 or 4\]"):
        ALGNetDeblur().deblur(torch.rand(1, 3, 32, 32), tiny_model, tile=0, overlap=0)


def test_in_comfyui_progress_bar_counts_up_to_its_total(fake_comfyui: SimpleNamespace, tiny_model: ALGNet) -> None:
    image = torch.rand(2, 40, 40, 3)
    (out,) = ALGNetDeblur().deblur(image, tiny_model, tile=32, overlap=8)
    assert out.shape == image.shape
    assert fake_comfyui.freed and fake_comfyui.progress
    total = fake_comfyui.progress[0][1]
    assert total % 8 == 0  # 2 images x 2x2 tiles, each counted whole or by its ALGBlocks
    assert fake_comfyui.progress == [(done, total) for done in range(1, total + 1)]


def test_in_comfyui_cancel_raises_comfyuis_interrupt(fake_comfyui: SimpleNamespace, tiny_model: ALGNet) -> None:
    fake_comfyui.interrupted = True
    with pytest.raises(Interrupted):
        ALGNetDeblur().deblur(torch.rand(2, 40, 40, 3), tiny_model, tile=32, overlap=8)
    assert fake_comfyui.progress == []


def test_loader_lists_and_loads_files_of_models_algnet(fake_comfyui: SimpleNamespace, tiny_model: ALGNet) -> None:
    folder = fake_comfyui.models_dir / "algnet"
    (folder / "finetuned").mkdir(parents=True)
    save_file(tiny_model.state_dict(), folder / "bare.safetensors")
    tiny_model.save_pretrained(folder / "finetuned")
    (folder / "notes.txt").write_text("not a model")
    choices = ALGNetModelLoader.INPUT_TYPES()["required"]["model"][0]
    assert {"bare.safetensors", "finetuned/model.safetensors"} <= set(choices)
    assert "notes.txt" not in choices
    image = torch.rand(1, 24, 24, 3)
    (expected,) = ALGNetDeblur().deblur(image, tiny_model, tile=0, overlap=0)
    for name in ("bare.safetensors", "finetuned/model.safetensors"):
        (model,) = ALGNetModelLoader().load(name)
        (out,) = ALGNetDeblur().deblur(image, model, tile=0, overlap=0)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_loader_passes_names_and_hub_ids_to_the_core(monkeypatch: pytest.MonkeyPatch, tiny_model: ALGNet) -> None:
    asked = []
    monkeypatch.setattr(comfy_nodes, "load_model", lambda model, device: asked.append((model, device)) or tiny_model)
    registered = ALGNetModelLoader.INPUT_TYPES()["required"]["model"][0][0]
    assert ALGNetModelLoader().load(registered) == (tiny_model,)
    assert ALGNetModelLoader().load(registered, hub_repo_id="  someone/algnet-finetune ") == (tiny_model,)
    assert asked == [(registered, "cpu"), ("someone/algnet-finetune", "cpu")]


def test_example_workflows_cover_motion_defocus_and_comparison() -> None:
    names = {p.stem for p in WORKFLOWS}
    assert {"algnet_motion_deblur", "algnet_defocus_deblur", "algnet_side_by_side"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_example_workflow_links_and_widgets_fit_the_nodes(path: Path) -> None:
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, link_type in workflow["links"]:
        output, target = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert output["type"] == link_type == target["type"]
        assert link_id in output["links"] and target["link"] == link_id
    ours = [n for n in nodes.values() if n["type"] in NODE_CLASS_MAPPINGS]
    assert {n["type"] for n in ours} == set(NODE_CLASS_MAPPINGS)
    for n in ours:
        specs = NODE_CLASS_MAPPINGS[n["type"]].INPUT_TYPES()
        widgets = [
            s for group in specs.values() for s in group.values() if isinstance(s[0], list) or s[0] in WIDGET_TYPES
        ]
        assert len(widgets) == len(n["widgets_values"])
        for spec, value in zip(widgets, n["widgets_values"], strict=True):
            if isinstance(spec[0], list):
                assert value in spec[0]
            elif spec[0] == "INT":
                assert spec[1]["min"] <= value <= spec[1]["max"]


def _cache_hub_copy(cache: Path, repo_id: str) -> None:
    """Put a Hub repository's config and weights in the Hugging Face cache layout, as a download leaves them."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in (hub.CONFIG_NAME, hub.WEIGHTS_NAME):
        (snapshot / name).write_text("{}")


def test_loader_offers_hub_only_models_while_reachable_or_once_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    offline = [n for n in list_models() if hub.REGISTRY[n].bundled is not None]
    hub_only = [n for n in list_models() if hub.REGISTRY[n].bundled is None]
    assert offline[:2] == ["motion", "defocus"] and len(hub_only) == 2
    assert ALGNetModelLoader.INPUT_TYPES()["required"]["model"][0] == offline
    _cache_hub_copy(Path(constants.HF_HUB_CACHE), hub.REGISTRY[hub_only[0]].repo_id)
    assert ALGNetModelLoader.INPUT_TYPES()["required"]["model"][0] == [*offline, hub_only[0]]
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    assert ALGNetModelLoader.INPUT_TYPES()["required"]["model"][0] == list_models()


def test_loader_error_names_a_corrupt_file(fake_comfyui: SimpleNamespace) -> None:
    folder = fake_comfyui.models_dir / "algnet"
    folder.mkdir(parents=True)
    (folder / "broken.safetensors").write_bytes(b"\xff" * 64)  # header length 2**64-1: "header too large"
    save_file({"weight": torch.zeros(2)}, folder / "other.safetensors")
    assert {"broken.safetensors", "other.safetensors"} <= set(ALGNetModelLoader.INPUT_TYPES()["required"]["model"][0])
    with pytest.raises(WeightsError, match=r"broken\.safetensors is not a readable safetensors file.*header"):
        ALGNetModelLoader().load("broken.safetensors")
    with pytest.raises(WeightsError, match=r"other\.safetensors is not the state dict of an ALGNet"):
        ALGNetModelLoader().load("other.safetensors")


def test_loader_sees_new_and_re_exported_files_without_a_restart(
    fake_comfyui: SimpleNamespace, tiny_model: ALGNet
) -> None:
    folder = fake_comfyui.models_dir / "algnet"
    folder.mkdir(parents=True)
    assert "bare.safetensors" not in ALGNetModelLoader.INPUT_TYPES()["required"]["model"][0]
    save_file(tiny_model.state_dict(), folder / "bare.safetensors")
    tiny_model.save_pretrained(folder / "finetuned")
    choices = ALGNetModelLoader.INPUT_TYPES()["required"]["model"][0]
    assert {"bare.safetensors", "finetuned/model.safetensors"} <= set(choices)

    assert ALGNetModelLoader.IS_CHANGED("motion") == ALGNetModelLoader.IS_CHANGED("motion")
    for name, path in [("bare.safetensors", folder / "bare.safetensors"), ("finetuned/model.safetensors", None)]:
        before = ALGNetModelLoader.IS_CHANGED(name)
        assert ALGNetModelLoader.IS_CHANGED(name) == before  # untouched: ComfyUI keeps the loaded model
        changed = path or folder / "finetuned" / "config.json"
        stat = changed.stat()
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # re-exported in place
        assert ALGNetModelLoader.IS_CHANGED(name) != before


def test_deblur_node_states_sizes_as_width_x_height(tiny_model: ALGNet) -> None:
    with pytest.raises(ValueError, match=r"the image is 12x20 pixels; ALGNet needs at least 16x16"):
        ALGNetDeblur().deblur(torch.rand(1, 20, 12, 3), tiny_model, tile=0, overlap=0)


def test_in_comfyui_the_model_runs_on_the_device_and_goes_back_to_the_offload_device(
    fake_comfyui: SimpleNamespace, tiny_model: ALGNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = torch.rand(1, 40, 200, 3)
    rgb = image.movedim(-1, 1)
    expected = deblur_tensor(rgb, tiny_model, MIN_AUTO_TILE, 8).clamp(0, 1).movedim(1, -1)
    fake_comfyui.offload_device = torch.device("meta")  # a move there is visible on the parameters
    moves, core_calls = [], []
    real_to = tiny_model.to
    monkeypatch.setattr(tiny_model, "to", lambda device: moves.append(device) or real_to(device))

    def core(batch: torch.Tensor, model: ALGNet, tile: int, overlap: int, **kwargs: object) -> torch.Tensor:
        core_calls.append((model, tile, kwargs["device"], next(model.parameters()).device))
        return deblur_tensor(batch, model, tile, overlap, **kwargs)

    monkeypatch.setattr(comfy_nodes, "deblur_tensor", core)
    monkeypatch.setattr(core_inference, "free_memory", lambda device: 1 << 20)  # auto tile: the smallest
    (out,) = ALGNetDeblur().deblur(image, tiny_model, tile=0, overlap=8)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert moves == [torch.device("cpu"), torch.device("meta")]
    assert next(tiny_model.parameters()).device.type == "meta"
    assert core_calls == [(tiny_model, MIN_AUTO_TILE, "auto", torch.device("cpu"))]  # the moved model, as is
    module_size = sum(p.numel() * p.element_size() for p in tiny_model.parameters())
    tile_memory = 40 * MIN_AUTO_TILE * BYTES_PER_PIXEL_PER_WIDTH * tiny_model.intro.out_channels
    assert fake_comfyui.freed == [module_size + tile_memory]


def test_in_comfyui_the_model_goes_back_when_cancelled(fake_comfyui: SimpleNamespace, tiny_model: ALGNet) -> None:
    fake_comfyui.interrupted = True
    fake_comfyui.offload_device = torch.device("meta")
    with pytest.raises(Interrupted):
        ALGNetDeblur().deblur(torch.rand(1, 40, 40, 3), tiny_model, tile=32, overlap=8)
    assert next(tiny_model.parameters()).device.type == "meta"


@pytest.fixture
def fresh_scan_warning() -> None:
    comfy_nodes._warn_once_without_cpu_scan.cache_clear()
    yield
    comfy_nodes._warn_once_without_cpu_scan.cache_clear()


def test_without_the_compiled_cpu_scan_the_log_says_so_once(
    fresh_scan_warning: None, tiny_model: ALGNet, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    image = torch.rand(1, 16, 16, 3)
    caplog.set_level(logging.WARNING, logger=comfy_nodes.__name__)
    if scan.BACKENDS["cpu"].unavailable(torch.device("cpu")) is None:
        ALGNetDeblur().deblur(image, tiny_model, tile=0, overlap=0)
        assert not caplog.records  # numba is installed here: nothing to say
        comfy_nodes._warn_once_without_cpu_scan.cache_clear()
    missing = dataclasses.replace(
        scan.BACKENDS["cpu"], unavailable=lambda device: "the numba package is not installed (pip install numba)"
    )
    monkeypatch.setitem(scan.BACKENDS, "cpu", missing)
    for _ in range(2):
        (out,) = ALGNetDeblur().deblur(image, tiny_model, tile=0, overlap=0)
        assert out.shape == image.shape
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "compiled CPU selective scan" in warnings[0] and "-m pip install numba" in warnings[0]


PACK_IMPORTS = """
import importlib.metadata, json, sys
import torch
from algnet_core import ALGNet
from algnet_plugin.comfyui.nodes import ALGNetDeblur
from helpers import TINY
ALGNetDeblur().deblur(torch.rand(1, 16, 16, 3), ALGNet(**TINY).eval(), tile=0, overlap=0)
dists = importlib.metadata.packages_distributions()
print(json.dumps(sorted({d for m in list(sys.modules) for d in dists.get(m.split(".")[0], [])})))
"""


def test_requirements_txt_lists_what_the_pack_needs_beyond_comfyui() -> None:
    """The distributions the pack imports to deblur, among the project's dependencies, less ComfyUI's own."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    run = subprocess.run([sys.executable, "-c", PACK_IMPORTS], capture_output=True, text=True, env=env, check=True)
    used = {canonicalize_name(d) for d in json.loads(run.stdout.strip().splitlines()[-1])}
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    specs = {canonicalize_name(r.name): r.specifier for r in map(Requirement, dependencies)}
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    listed = {canonicalize_name(r.name): r.specifier for r in map(Requirement, filter(None, lines))}
    needed = (used & specs.keys()) - COMFYUI_PACKAGES
    assert "numba" in needed  # the compiled CPU scan
    assert listed == {name: specs[name] for name in needed}


@pytest.fixture
def motion_model() -> ALGNet:
    (model,) = ALGNetModelLoader().load("motion")  # the bundled weights: the Hub is unreachable here
    return model


def test_deblur_node_leaves_no_seam_on_the_bottom_and_right_edges(motion_model: ALGNet) -> None:
    """A 250x190 image (neither side a multiple of 16): the last row and column step no more than the input."""
    h, w = 190, 250
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    smooth = torch.stack([0.3 + 0.4 * x, 0.2 + 0.5 * y, 0.5 + 0.2 * torch.sin(6 * x + 4 * y)], dim=-1)
    image = (smooth + 0.05 * torch.rand(h, w, 3, generator=torch.Generator().manual_seed(0))).clamp(0, 1)[None]
    (out,) = ALGNetDeblur().deblur(image, motion_model, tile=0, overlap=32)

    def last_row_step(t: torch.Tensor) -> float:
        return (t[0, -1] - t[0, -2]).abs().mean().item()

    def last_column_step(t: torch.Tensor) -> float:
        return (t[0, :, -1] - t[0, :, -2]).abs().mean().item()

    assert last_row_step(out) <= 1.5 * last_row_step(image)
    assert last_column_step(out) <= 1.5 * last_column_step(image)


def test_deblur_node_ensemble_averages_flips_and_stays_close(active_model: ALGNet) -> None:
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    (plain,) = ALGNetDeblur().deblur(image, active_model, tile=0, overlap=0, ensemble=False)
    (averaged,) = ALGNetDeblur().deblur(image, active_model, tile=0, overlap=0, ensemble=True)
    assert (averaged - plain).abs().mean() > 1e-3
    for out in (plain, averaged):
        assert (out - image).abs().mean() < 0.1


@pytest.mark.parametrize("use", ["bf16", "fp16"])
def test_in_comfyui_the_precision_is_comfyuis_choice(
    fake_comfyui: SimpleNamespace, active_model: ALGNet, monkeypatch: pytest.MonkeyPatch, use: str
) -> None:
    image = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(0))
    rgb = image.movedim(-1, 1)
    full = deblur_tensor(rgb, active_model, None, precision="float32").clamp(0, 1).movedim(1, -1)
    mm = sys.modules["comfy.model_management"]
    monkeypatch.setattr(mm, f"should_use_{use}", lambda device: True)
    asked = []

    def core(batch: torch.Tensor, model: ALGNet, tile: int, overlap: int, **kwargs: object) -> torch.Tensor:
        asked.append(kwargs["precision"])
        return deblur_tensor(batch, model, tile, overlap, **kwargs)

    monkeypatch.setattr(comfy_nodes, "deblur_tensor", core)
    (out,) = ALGNetDeblur().deblur(image, active_model, tile=0, overlap=8)
    assert asked == [{"bf16": "bfloat16", "fp16": "float16"}[use]]
    if use == "bf16":  # float16 autocast is CUDA-only in the core: checked there, not here
        error = (out - full).abs()
        assert 1e-4 < error.max() < 0.02 and error.mean() < 2e-3  # close to float32, not equal
