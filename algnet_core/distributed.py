"""Deblur arrays larger than memory on a dask cluster: zarr, a TIFF stack or a folder of images in, zarr out.

The work runs on the ``dask.distributed`` cluster the user already has (a ``LocalCluster``, dask-jobqueue on
SLURM/PBS, dask-kubernetes, dask-cuda): :func:`connect` makes or joins one, :func:`deblur_to_zarr` runs on it.

* The source (:func:`open_source`) is read, never written: a zarr array (v2 or v3), a TIFF stack (its one
  series, read page by page) or a folder of images of one shape and dtype (one page each).
* Its axes are pages, then the image plane: ``(..., H, W)``, or ``(..., H, W, C)`` when the last axis is
  shorter than 16 pixels, the smallest image side (:func:`page_axes`). Each page is deblurred as
  :func:`~algnet_core.inference.deblur` does, with one mapping (normalisation) computed over the whole source.
* Chunks: the source's, with the two image axes grown to at least :data:`MIN_CHUNK_SIDE` pixels (or the whole
  side) so that the tile margins stay small, and cut to at most :data:`MAX_CHUNK_SIDE`; the output zarr array
  has these chunks.
* Each worker loads the model once, by name (a registered name, a folder on a file system the workers share,
  or a Hub repo id), on its own device with ``device="auto"``; the model never travels in the task graph.
* The output is built beside the target as ``TARGET.part``, a zarr array whose ``algnet`` attributes hold the
  run's settings, the mapping and ``"complete": false``. A chunk is written when it finishes, and only then
  recorded in ``TARGET.part/algnet-done/``. When every chunk is recorded, the array is marked complete and
  renamed to ``TARGET``: a ``TARGET`` that exists is complete, and nothing else looks like one.
* Interrupted (Ctrl-C, a lost client, a dead machine)? Run the same command again: a ``TARGET.part`` with the
  same settings is resumed without redoing its recorded chunks; one with other settings is refused. A worker
  lost during a run is replaced by dask, which recomputes that worker's chunks elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from .imageio import IMAGE_SUFFIXES, READ_ONLY_SUFFIXES, TIFF_SUFFIXES, ImageFileError, read_image
from .inference import (
    DEFAULT_OVERLAP,
    DEFAULT_PERCENTILES,
    ProgressFn,
    _resolve_model,
    deblur_dask,
    stack_mapping,
    weights_stamp,
)
from .model import MULTIPLE, ALGNet

MIN_CHUNK_SIDE = 512
"""Chunks are at least this many pixels along each image axis (or the whole side): a 32 px tile margin then
adds at most a quarter to the work."""
MAX_CHUNK_SIDE = 4096
"""And at most this many, so that one chunk's working copies (~60 bytes a pixel) stay near 1 GiB."""
PART_SUFFIX = ".part"
DONE_FOLDER = "algnet-done"
ATTRIBUTE = "algnet"
CONNECT_TIMEOUT_S = 20
ONE_THREAD = {"NUMBA_NUM_THREADS": "1"}
"""Environment of ``local:N`` worker processes: with dask's own ``OMP_NUM_THREADS=1``, one compute thread each
(numba's threads, used by the selective scan, otherwise spin against the other workers': 10x slower)."""


def page_axes(shape: tuple[int, ...]) -> int:
    """How many leading axes of an array of ``shape`` are pages: all but the image's (H, W) or (H, W, C)."""
    channels = len(shape) >= 3 and shape[-1] < MULTIPLE
    pages = len(shape) - (3 if channels else 2)
    if pages < 0:
        raise ValueError(f"an array of shape {shape} holds no image: expected (..., H, W) or (..., H, W, C)")
    return pages


def is_zarr(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zarr array or group (v2 or v3) on the local file system."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup"))


def _open_zarr(path: Path) -> Any:
    import dask.array as da
    import zarr

    node = zarr.open(store=zarr.storage.LocalStore(path, read_only=True), mode="r")
    if isinstance(node, zarr.Group):
        arrays = sorted(name for name, _ in node.arrays())
        hint = f"; it holds {', '.join(arrays)}: name one, e.g. {path / arrays[0]}" if arrays else " with no arrays"
        raise ValueError(f"{path} is a zarr group, not an array{hint}")
    return da.from_zarr(node)


def _read_tiff_page(path: str, index: int, planar: bool) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        page = tif.asarray(series=0, key=index)
    return np.moveaxis(page, 0, -1) if planar else page


def _open_tiff(path: Path) -> Any:
    import dask
    import dask.array as da

    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.series) != 1 or len(tif.series[0].levels) != 1:
                raise ImageFileError(f"{path} holds several image series or a pyramid; only one flat series works")
            series = tif.series[0]
            shape, dtype, axes, count = series.shape, series.dtype, series.axes, len(series)
            page_shape = series.keyframe.shape
    except (OSError, ValueError, KeyError, IndexError, tifffile.TiffFileError) as err:
        raise ImageFileError(f"{path}: cannot read this TIFF file: {err}") from err
    planar = "S" in axes and not axes.endswith("S")  # planar configuration "separate": samples moved last
    if planar:
        page_shape = (*page_shape[1:], page_shape[0])
        shape = (*shape[: axes.index("S")], *shape[axes.index("S") + 1 :], shape[axes.index("S")])
    read = dask.delayed(_read_tiff_page, pure=True)
    pages = [da.from_delayed(read(str(path), i, planar), page_shape, dtype) for i in range(count)]
    return da.stack(pages).reshape(shape)


def _read_file(path: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    stack = read_image(path)
    data = stack.pages.reshape(stack.shape)
    if data.shape != shape or data.dtype != dtype:
        raise ImageFileError(f"{path} is {data.shape} {data.dtype}; the folder's first image is {shape} {dtype}")
    return data


def _open_folder(path: Path) -> Any:
    import dask
    import dask.array as da

    suffixes = IMAGE_SUFFIXES | READ_ONLY_SUFFIXES
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(suffixes))}) in {path}")
    first = read_image(files[0])
    shape, dtype = first.shape, first.pages.dtype
    read = dask.delayed(_read_file, pure=True)
    return da.stack([da.from_delayed(read(str(f), shape, dtype), shape, dtype) for f in files])


def open_source(path: str | os.PathLike) -> Any:
    """A lazy, read-only dask array of a zarr array, a TIFF file's image series, or a folder of images
    (stacked in file-name order; all must have the first one's shape and dtype, else reading the odd one
    raises :class:`~algnet_core.imageio.ImageFileError` naming it)."""
    source = Path(path)
    if is_zarr(source):
        return _open_zarr(source)
    if source.is_dir():
        return _open_folder(source)
    if source.is_file() and source.suffix.lower() in TIFF_SUFFIXES:
        return _open_tiff(source)
    if not source.exists():
        raise FileNotFoundError(f"no such file or folder: {source}")
    raise ValueError(f"{source} is not a zarr array, a TIFF file or a folder of images")


def _work_chunks(array: Any, pages: int) -> Any:
    """``array`` rechunked: image axes of :data:`MIN_CHUNK_SIDE` to :data:`MAX_CHUNK_SIDE` pixels (or the whole
    side), grown by whole source chunks; channels whole."""
    chunks = list(array.chunksize)
    for axis in (pages, pages + 1):
        side, size = array.shape[axis], chunks[axis]
        if size < MIN_CHUNK_SIDE:
            size = min(side, -(-MIN_CHUNK_SIDE // size) * size)
        chunks[axis] = min(size, MAX_CHUNK_SIDE)
    if array.ndim - pages == 3:
        chunks[-1] = array.shape[-1]
    return array.rechunk(tuple(chunks))


def _write_chunk(block: np.ndarray, target: str, region: tuple[slice, ...], record: str) -> int:
    """Write one finished chunk into the output array, then record it as done; returns its bytes."""
    import zarr

    zarr.open_array(store=target, mode="r+")[region] = block
    Path(record).touch()
    return block.nbytes


def _model_name(model: str | os.PathLike) -> str:
    if isinstance(model, ALGNet):
        raise TypeError(
            "deblur_to_zarr needs the model's registered name, save_pretrained folder or Hub repo id, which each "
            "worker loads; save an ALGNet instance with model.save_pretrained(folder) and pass the folder"
        )
    name = os.fspath(model)
    folder = Path(name).expanduser()
    return str(folder.resolve()) if folder.is_dir() else name


def _settings_difference(stored: dict, settings: dict) -> list[str]:
    return [f"{key}: {stored.get(key)!r} then, {new!r} now" for key, new in settings.items() if stored.get(key) != new]


def _check_target(source: Path, target: Path) -> None:
    if target.exists():
        raise FileExistsError(f"{target} exists; choose a new output name (a zarr output is never replaced)")
    resolved = source.resolve()
    for path in (target, target.with_name(target.name + PART_SUFFIX)):
        if path == resolved or resolved in path.parents or path in resolved.parents:
            raise FileExistsError(f"{path} is inside, or holds, the input {source}; choose another output")


def deblur_to_zarr(
    source: str | os.PathLike,
    target: str | os.PathLike,
    model: str | os.PathLike = "motion",
    *,
    client: Any = None,
    tile: int | str | None = "auto",
    overlap: int = DEFAULT_OVERLAP,
    device: str = "auto",
    precision: str = "auto",
    normalize: str = "auto",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    ensemble: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Deblur ``source`` (see :func:`open_source`) into the new zarr array ``target`` on a dask cluster.

    ``client``: a ``dask.distributed.Client`` (None: the current one). ``model`` is a registered name, a
    folder the workers can read or a Hub repo id; the other options are :func:`~algnet_core.inference.deblur`'s
    (``device`` is resolved on each worker). ``progress(done, total)`` is called as chunks finish on the cluster.
    Returns ``{"chunks", "skipped", "computed", "mapping", "target"}``: ``skipped`` chunks were done by an
    earlier, interrupted run. See the module docs for the ``.part`` array, its records and restarts.
    """
    import dask
    import zarr
    from distributed import Client, as_completed

    try:
        client = client or Client.current()
    except ValueError as err:
        raise ValueError("no dask.distributed Client is running: start one, or pass client=") from err
    source, target = Path(source), Path(target)
    _check_target(source, target)
    partial = target.with_name(target.name + PART_SUFFIX)
    name = _model_name(model)
    _resolve_model(name, "cpu")  # a bad name or folder fails here, not on every worker
    array = open_source(source)
    pages = page_axes(array.shape)
    work = _work_chunks(array, pages)
    dtype = np.dtype(work.dtype).newbyteorder("=")
    settings = {
        "source": str(source.resolve()),
        "shape": list(work.shape),
        "dtype": dtype.str,
        "chunks": [c[0] for c in work.chunks],
        "pages": pages,
        "model": name,
        "weights": [list(entry) for entry in weights_stamp(name)],
        "tile": tile,
        "overlap": overlap,
        "precision": precision,
        "normalize": normalize,
        "percentiles": list(percentiles) if normalize == "percentile" else None,
        "ensemble": ensemble,
    }
    options = dict(tile=tile, overlap=overlap, precision=precision, cancel=None, normalize=normalize,
                   percentiles=percentiles, ensemble=ensemble)  # fmt: skip
    with client.as_current():
        if partial.exists():
            try:
                stored = dict(zarr.open_array(store=str(partial), mode="r").attrs[ATTRIBUTE])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise FileExistsError(f"{partial} exists but is not an unfinished algnet output; remove it") from err
            difference = _settings_difference(stored["settings"], settings)
            if difference:
                raise FileExistsError(
                    f"{partial} is an unfinished run with other settings ({'; '.join(difference)}): run it with "
                    "the same settings to finish it, or remove it"
                )
            mapping = tuple(stored["mapping"])
        else:
            mapping = stack_mapping(work, pages, normalize, percentiles)
            zarr.create_array(
                store=str(partial),
                shape=work.shape,
                chunks=tuple(settings["chunks"]),
                dtype=dtype,
                fill_value=0,
                attributes={ATTRIBUTE: {"settings": settings, "mapping": list(mapping), "complete": False}},
            )
        done = partial / DONE_FOLDER
        done.mkdir(exist_ok=True)
        result = deblur_dask(work, name, device, pages, mapping, **options)
        blocks = result.to_delayed(optimize_graph=True)
        starts = [np.cumsum((0, *sizes)) for sizes in result.chunks]
        write = dask.delayed(_write_chunk, pure=False)
        writes = []
        for index in np.ndindex(blocks.shape):
            record = done / ".".join(map(str, index))
            if not record.exists():
                region = tuple(slice(int(s[i]), int(s[i + 1])) for s, i in zip(starts, index, strict=True))
                writes.append(write(blocks[index], str(partial), region, str(record)))
        total = blocks.size
        skipped = total - len(writes)
        if progress is not None:
            progress(skipped, total)
        futures = client.compute(writes)
        try:
            for finished, future in enumerate(as_completed(futures), skipped + 1):
                future.result()
                if progress is not None:
                    progress(finished, total)
        except BaseException:
            client.cancel(futures)
            raise
    missing = total - sum(1 for _ in done.iterdir())
    if missing:
        raise RuntimeError(f"{partial}: {missing} chunk(s) have no done record; run again to finish them")
    output = zarr.open_array(store=str(partial), mode="r+")
    output.attrs[ATTRIBUTE] = {"settings": settings, "mapping": list(mapping), "complete": True}
    if target.exists():
        raise FileExistsError(f"{target} appeared during the run; the result stays in {partial}")
    os.rename(partial, target)
    shutil.rmtree(target / DONE_FOLDER)
    return {"chunks": total, "skipped": skipped, "computed": len(writes), "mapping": mapping, "target": str(target)}


@contextlib.contextmanager
def connect(scheduler: str | None = None) -> Iterator[Any]:
    """A ``dask.distributed.Client`` for ``scheduler``, closed on exit (with the cluster it started):

    * None: one worker thread in this process (no extra processes, the machine's cores for torch);
    * ``"local:N"``: a ``LocalCluster`` of N worker processes of one compute thread each (:data:`ONE_THREAD`);
    * anything else: the address of a running scheduler, e.g. ``tcp://10.0.0.5:8786`` (dask-jobqueue,
      ``dask scheduler``, dask-cuda), or a scheduler file path ending in ``.json``.
    """
    from distributed import Client, LocalCluster

    if scheduler is None or scheduler.startswith("local:"):
        workers = 1 if scheduler is None else scheduler.removeprefix("local:")
        if not re.fullmatch(r"[1-9][0-9]*", str(workers)):
            raise ValueError(f"--scheduler {scheduler}: local:N needs a whole number N >= 1 of worker processes")
        processes = {"processes": True, "env": ONE_THREAD} if scheduler else {"processes": False}
        with (
            LocalCluster(n_workers=int(workers), threads_per_worker=1, dashboard_address=":0", **processes) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        kwargs = {"scheduler_file": scheduler} if scheduler.endswith(".json") else {"address": scheduler}
        client = Client(**kwargs, timeout=CONNECT_TIMEOUT_S)
    except (OSError, ValueError) as err:
        raise OSError(f"cannot reach the dask scheduler at {scheduler}: {err}") from err
    with client:
        yield client
