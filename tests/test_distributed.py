"""dask.distributed (issue #15): a zarr volume deblurred on a real LocalCluster of two worker processes equals
the single-process result, each worker loads the model once, an interrupted run resumes without redoing
finished chunks, and a worker killed mid-run still leaves a complete, equal result."""

from __future__ import annotations

import hashlib
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import dask.array as da
import numpy as np
import pytest
import tifffile
import torch
from helpers import active_tiny

distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

from algnet_core.cli import main  # noqa: E402
from algnet_core.distributed import (  # noqa: E402
    DONE_FOLDER,
    ONE_THREAD,
    PART_SUFFIX,
    connect,
    deblur_to_zarr,
    open_source,
    page_axes,
)
from algnet_core.imageio import ImageFileError, Stack, write_image  # noqa: E402
from algnet_core.inference import deblur  # noqa: E402

OPTIONS = {"tile": None, "overlap": 16}
"""Whole 300 px planes as one tile: the same computation wherever it runs (an auto tile depends on free memory)."""
SHAPE = (6, 300, 300)


class Interrupted(Exception):
    """Raised from a progress callback: the run stops as on Ctrl-C."""


def tree_state(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: its SHA-256 and modification time."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def loads(client) -> dict[str, tuple[int, int]]:
    """(models loaded, cache hits) of each worker process: a chunk loads the model or finds it loaded."""

    def info() -> tuple[int, int]:
        from algnet_core.inference import _cached_model

        cache = _cached_model.cache_info()
        return cache.misses, cache.hits

    return client.run(info)


def wait_idle(client, timeout: float = 120) -> None:
    """Until no worker executes a task (cancelled tasks that were running finish on their own)."""
    deadline = time.monotonic() + timeout
    while sum(client.run(lambda dask_worker: dask_worker.state.executing_count).values()):
        assert time.monotonic() < deadline, "the workers did not become idle"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    """A 6 x 300 x 300 12-bit uint16 volume as a zarr array chunked per plane, a tiny active model saved with
    save_pretrained, and the single-process result (the in-memory stack, one mapping over all planes)."""
    root = tmp_path_factory.mktemp("cluster")
    model = root / "model"
    active_tiny().save_pretrained(model)  # TINY, randomise()d
    rng = np.random.default_rng(15)
    # Each plane has its own range (plane i: 200 i .. 200 i + 3000), so one mapping differs from per-plane ones.
    volume = (rng.integers(0, 3000, SHAPE) + 200 * np.arange(6)[:, None, None]).astype(np.uint16)
    source = root / "in.zarr"
    zarr.create_array(store=str(source), shape=SHAPE, chunks=(1, 300, 300), dtype=np.uint16)[:] = volume
    reference = deblur(volume, str(model), pages=1, **OPTIONS)
    return SimpleNamespace(root=root, model=str(model), volume=volume, source=source, reference=reference)


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0", env=ONE_THREAD
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def test_zarr_volume_on_two_worker_processes_equals_the_single_process_run(data, client) -> None:
    before = tree_state(data.source)
    target = data.root / "out.zarr"
    calls = []
    summary = deblur_to_zarr(
        data.source, target, data.model, client=client, progress=lambda *a: calls.append(a), **OPTIONS
    )
    out = zarr.open_array(store=str(target), mode="r")
    assert out.shape == SHAPE and out.dtype == np.uint16 and out.chunks == (1, 300, 300)
    result = out[:]
    assert np.abs(result.astype(int) - data.reference).max() <= 1  # measured: 0 (bit-identical)
    assert np.abs(result.astype(int) - data.volume).mean() > 100  # really restored (measured: 147 of 0..3999)
    # One mapping for the whole volume (a 12-bit volume: its own min..max), as the single-process run:
    assert summary == {
        "chunks": 6,
        "skipped": 0,
        "computed": 6,
        "mapping": (0.0, float(data.volume.max()), 0.0, 65535.0),  # restored values clipped to uint16 only
        "target": str(target),
    }
    alone = deblur(data.volume[5], data.model, **OPTIONS)  # plane 5 mapped by its own range 1000..3999
    assert np.abs(alone.astype(int) - result[5]).mean() > 20  # measured: 35 (max 81)
    per_worker = loads(client).values()  # each worker loaded the model once and ran some of the 6 chunks
    assert sorted(m for m, _ in per_worker) == [1, 1] and sum(m + h for m, h in per_worker) == 6
    assert calls[0] == (0, 6) and calls[-1] == (6, 6) and [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert out.attrs["algnet"]["complete"] is True and out.attrs["algnet"]["settings"]["model"] == data.model
    assert not (target / DONE_FOLDER).exists() and not target.with_name(target.name + PART_SUFFIX).exists()
    assert tree_state(data.source) == before  # the input is never touched


def test_deblur_of_a_dask_array_runs_on_the_active_clients_workers(data, client) -> None:
    lazy = deblur(da.from_zarr(str(data.source)), data.model, pages=1, **OPTIONS)
    graph = distributed.protocol.pickle.dumps(dict(lazy.__dask_graph__()))
    assert len(graph) < 50_000  # the model travels by name (its weights: 2.5 MB); measured 5 kB
    hits = sum(h for _, h in loads(client).values())
    result = np.asarray(lazy[:2])  # as napari reads a plane; no scheduler named: dask uses the active Client
    assert np.abs(result.astype(int) - data.reference[:2]).max() <= 1  # the mapping is the whole volume's
    after = loads(client)
    assert sum(h for _, h in after.values()) == hits + 2 and all(m == 1 for m, _ in after.values())


def test_worker_threads_that_start_chunks_together_load_the_model_once(data) -> None:
    from algnet_core.inference import _cached_model, _deblur_block

    options = {**OPTIONS, "precision": "auto", "cancel": None, "normalize": "auto", "percentiles": (1, 99.8)}
    mapping = (0.0, 4000.0, 0.0, 4000.0)
    start = threading.Barrier(3)

    def chunk(plane: np.ndarray) -> np.ndarray:
        start.wait()  # as a worker's threads do when the first chunks arrive
        return _deblur_block(plane[None, :64, :64], data.model, "auto", 1, mapping, **options)

    _cached_model.cache_clear()
    with ThreadPoolExecutor(3) as pool:
        blocks = list(pool.map(chunk, data.volume[:3]))
    assert _cached_model.cache_info().misses == 1 and _cached_model.cache_info().hits == 2
    assert all(b.shape == (1, 64, 64) and b.dtype == np.uint16 for b in blocks)


def test_an_interrupted_run_resumes_from_the_command_line_without_redoing_finished_chunks(data, client, capsys):
    target = data.root / "resumed.zarr"
    partial = target.with_name(target.name + PART_SUFFIX)

    def stop_after_two(done: int, total: int) -> None:
        if done >= 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        deblur_to_zarr(data.source, target, data.model, client=client, progress=stop_after_two, **OPTIONS)
    wait_idle(client)
    assert not target.exists()  # nothing half-written looks complete
    assert zarr.open_array(store=str(partial), mode="r").attrs["algnet"]["complete"] is False
    records = sorted(p.name for p in (partial / DONE_FOLDER).iterdir())
    assert 2 <= len(records) < 6  # the two seen, and any finished or running when it stopped
    chunks = {name: (partial / "c" / name.split(".")[0] / "0" / "0").stat().st_mtime_ns for name in records}

    argv = ["deblur", str(data.source), "-o", str(target), "--model", data.model, "--tile", "none"]
    assert main([*argv, "--overlap", "16", "--scheduler", client.scheduler.address]) == 0
    assert f"{6 - len(records)} chunk(s) deblurred, {len(records)} done by an earlier run" in capsys.readouterr().err
    for name, mtime in chunks.items():  # the finished chunks were not written again
        assert (target / "c" / name.split(".")[0] / "0" / "0").stat().st_mtime_ns == mtime
    result = zarr.open_array(store=str(target), mode="r")[:]
    assert np.abs(result.astype(int) - data.reference).max() <= 1
    assert not partial.exists() and not (target / DONE_FOLDER).exists()


def test_a_run_refuses_other_settings_an_existing_output_and_a_model_instance(data, client) -> None:
    target = data.root / "refused.zarr"

    def stop(done: int, total: int) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):  # stops before any chunk: the .part holds the settings and the mapping
        deblur_to_zarr(data.source, target, data.model, client=client, progress=stop, **OPTIONS)
    with pytest.raises(FileExistsError, match=r"other settings \(overlap: 16 then, 8 now\)"):
        deblur_to_zarr(data.source, target, data.model, client=client, tile=None, overlap=8)
    with pytest.raises(FileExistsError, match="in.zarr exists; choose a new output name"):
        deblur_to_zarr(data.root / "model", data.source, data.model, client=client)
    with pytest.raises(FileExistsError, match="inside, or holds, the input"):
        deblur_to_zarr(data.source, data.source / "out.zarr", data.model, client=client)
    with pytest.raises(TypeError, match="save_pretrained"):
        deblur_to_zarr(data.source, data.root / "x.zarr", active_tiny(), client=client)
    group = zarr.open_group(store=str(data.root / "group.zarr"), mode="w")
    group.create_array("0", shape=(32, 32), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"group.zarr is a zarr group, not an array; it holds 0: name one"):
        open_source(data.root / "group.zarr")


def test_tiff_stacks_and_image_folders_are_read_lazily_page_by_page(tmp_path) -> None:
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 65535, (2, 3, 40, 48), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "tzyx.tif", grey, imagej=True, metadata={"axes": "TZYX"})
    rgb = rng.integers(0, 255, (3, 3, 40, 48), dtype=np.uint8)  # planar RGB pages: samples first in the file
    tifffile.imwrite(tmp_path / "planar.tif", rgb, photometric="rgb", planarconfig="separate")
    for path, want in [(tmp_path / "tzyx.tif", grey), (tmp_path / "planar.tif", np.moveaxis(rgb, 1, -1))]:
        array = open_source(path)
        assert math.prod(array.numblocks) == math.prod(want.shape[: page_axes(want.shape)])  # one chunk a page
        assert np.array_equal(array.compute(scheduler="synchronous"), want)
    assert page_axes((2, 3, 40, 48)) == 2 and page_axes((3, 40, 48, 3)) == 1 and page_axes((40, 48)) == 0
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(grey[0]):
        write_image(folder / f"t{i}.png", Stack(pages=frame[None], shape=frame.shape))
    assert np.array_equal(open_source(folder).compute(scheduler="synchronous"), grey[0])
    odd = np.zeros((40, 40), np.uint16)
    write_image(folder / "t9.png", Stack(pages=odd[None], shape=odd.shape))
    with pytest.raises(ImageFileError, match=r"t9.png is \(40, 40\) uint16; the folder's first image is \(40, 48\)"):
        open_source(folder).compute(scheduler="synchronous")


def test_pages_of_an_in_memory_stack_share_one_mapping_and_one_progress_count() -> None:
    model = active_tiny()
    rng = np.random.default_rng(2)
    stack = rng.integers(0, 1000, (3, 32, 40)).astype(np.uint16) + np.array([0, 500, 1000], np.uint16)[:, None, None]
    calls = []
    out = deblur(stack, model, tile=None, pages=1, progress=lambda *a: calls.append(a))
    total = calls[-1][1]
    assert calls[-1] == (total, total) and [c[0] for c in calls] == list(range(1, total + 1))  # over all 3 pages
    alone = np.abs(out[0].astype(int) - deblur(stack[0], model, tile=None)).mean()  # page 0 mapped by 0..999
    # measured: 36 (the restoration changes a page by 70): the stack's mapping 0..1999 is not page 0's own
    assert alone > 10 and np.array_equal(deblur(torch.from_numpy(stack), model, tile=None, pages=1).numpy(), out)
    with pytest.raises(ValueError, match="pages must be a whole number from 0 to 1"):
        deblur(stack, model, pages=2)


def test_work_chunks_grow_to_keep_margins_small_and_stay_bounded() -> None:
    from algnet_core.distributed import _work_chunks

    small = da.zeros((4, 1000, 300, 3), np.uint8, chunks=(2, 100, 64, 1))  # RGB pages, tiny chunks
    assert _work_chunks(small, 1).chunksize == (2, 600, 300, 3)  # whole source chunks to >= 512, or the side
    huge = da.zeros((2, 10000, 300), np.uint16, chunks=(1, 10000, 300))  # one chunk a 10000 px page
    assert _work_chunks(huge, 1).chunksize == (1, 4096, 300)


def test_command_line_folder_to_zarr_in_this_process_and_usage_errors(data, tmp_path, capsys) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(2):
        plane = data.volume[i, :64, :80]
        write_image(folder / f"f{i}.png", Stack(pages=plane[None], shape=plane.shape))
    before = tree_state(folder)
    out = tmp_path / "frames.zarr"
    argv = ["deblur", str(folder), "-o", str(out), "--model", data.model, "--tile", "none", "--overlap", "16"]
    assert main(argv) == 0  # no --scheduler: one worker thread in this process
    want = deblur(data.volume[:2, :64, :80], data.model, pages=1, **OPTIONS)
    assert np.abs(zarr.open_array(store=str(out), mode="r")[:].astype(int) - want).max() <= 1
    assert tree_state(folder) == before
    capsys.readouterr()
    assert main(argv) == 1
    assert "frames.zarr exists; choose a new output name" in capsys.readouterr().err
    for args, message in [
        ([str(folder), "-o", str(tmp_path / "x"), "--scheduler", "local:2"], "--scheduler needs a zarr output"),
        ([str(folder), str(folder), "-o", str(tmp_path / "x.zarr")], "takes one input"),
        ([str(folder), "-o", str(out), "--overwrite"], "never replaces an array"),
    ]:
        with pytest.raises(SystemExit):
            main(["deblur", *args])
        assert message in capsys.readouterr().err
    assert main(["deblur", str(out), "-o", str(tmp_path / "pngs")]) == 1
    assert "frames.zarr is a zarr array: deblur it into a new one, -o NAME.zarr" in capsys.readouterr().err
    with pytest.raises(ValueError, match="local:N needs a whole number N >= 1"), connect("local:0"):
        pass


def test_a_worker_killed_mid_run_still_leaves_a_complete_equal_result(data, client) -> None:
    target = data.root / "killed.zarr"
    done = target.with_name(target.name + PART_SUFFIX) / DONE_FOLDER
    workers = set(client.scheduler_info()["workers"])
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(deblur_to_zarr, data.source, target, data.model, client=client, **OPTIONS)
        deadline = time.monotonic() + 120
        while not (done.is_dir() and any(done.iterdir())):
            assert time.monotonic() < deadline and not run.done()
            time.sleep(0.02)
        busy = None
        while busy is None:
            busy = next((address for address, keys in client.processing().items() if keys), None)
        pid = client.run(os.getpid, workers=[busy])[busy]
        finished_at_kill = sum(1 for _ in done.iterdir())
        os.kill(pid, signal.SIGKILL)
        summary = run.result(timeout=300)
    assert finished_at_kill < 6  # killed mid-run
    assert busy not in client.scheduler_info()["workers"] and busy in workers
    assert summary["computed"] == 6 and summary["skipped"] == 0
    result = zarr.open_array(store=str(target), mode="r")[:]
    assert np.abs(result.astype(int) - data.reference).max() <= 1
