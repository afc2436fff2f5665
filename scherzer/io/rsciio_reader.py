"""Reading other programs' files through rosettasciio without allocating past the read budget.

The declared shapes are found before any data is read: HyperSpy ``.hspy`` (HDF5) and ``.zspy``
(zarr) files by opening ``/Experiments/<name>/data`` ourselves, then read eagerly (rosettasciio
keeps lazily read hspy files open for the life of the process); every other format lazily, as
dask arrays whose shapes are checked before they are computed. Where rosettasciio cannot read
lazily (DM RGBA images) the file is read whole if its size on disk fits the budget — those
formats are uncompressed, so the data are no larger than the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scherzer.io.budget import ReadBudget
from scherzer.io.hdf5 import open_read

__all__ = ["read_checked", "rsciio_module"]

#: HyperSpy's group of signals in .hspy/.zspy files.
_EXPERIMENTS = "Experiments"


def rsciio_module(fmt: str) -> Any:
    """rosettasciio's reader module for a sniffed format name."""
    if fmt == "zspy":
        from rsciio import zspy

        return zspy
    from rsciio import digitalmicrograph, emd, hspy, tia, tiff

    readers = {
        "velox": emd,
        "berkeley": emd,
        "hspy": hspy,
        "dm": digitalmicrograph,
        "tia": tia,
        "tiff": tiff,
    }
    return readers[fmt]


def _hspy_shapes(path: Path) -> list[tuple[tuple[int, ...], np.dtype]]:
    with open_read(path) as f:
        exps = f.get(_EXPERIMENTS)
        groups = list(exps.values()) if exps is not None else []
        return [(g["data"].shape, g["data"].dtype) for g in groups if "data" in g]


def _zspy_shapes(path: Path) -> list[tuple[tuple[int, ...], np.dtype]]:
    import zarr

    store = zarr.storage.ZipStore(str(path), mode="r") if path.is_file() else str(path)
    root = zarr.open_group(store, mode="r")
    try:
        exps = root[_EXPERIMENTS] if _EXPERIMENTS in root else None
        groups = [exps[k] for k in exps.group_keys()] if exps is not None else []
        return [(g["data"].shape, g["data"].dtype) for g in groups if "data" in g]
    finally:
        if hasattr(store, "close"):
            store.close()


def _disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _materialise(dicts: list[dict], path: Path, budget: ReadBudget) -> None:
    """Replace each lazily read ``data`` by an array, after checking all against the budget."""
    for i, d in enumerate(dicts):
        data = d["data"]
        budget.take(data.shape, data.dtype, f"signal {i} of {path}")
    for d in dicts:
        data = d["data"]
        d["data"] = np.asarray(data.compute() if hasattr(data, "compute") else data)


def read_checked(reader: Any, fmt: str, path: Path, budget: ReadBudget) -> list[dict]:
    """rosettasciio's signal dicts for ``path`` with ``data`` as arrays, every declared shape
    counted against ``budget`` before it is read (see the module docstring)."""
    if fmt in ("hspy", "zspy"):
        probe = _hspy_shapes if fmt == "hspy" else _zspy_shapes
        for i, (shape, dtype) in enumerate(probe(path)):
            budget.take(shape, dtype, f"signal {i} of {path}")
        return reader.file_reader(str(path))
    try:
        dicts = reader.file_reader(str(path), lazy=True)
    except ValueError as lazy_error:
        if "lazy" not in str(lazy_error).lower():
            raise
        budget.take((_disk_bytes(path),), np.uint8, f"{path} (read whole: no lazy reading)")
        dicts = reader.file_reader(str(path))
    _materialise(dicts, path, budget)
    return dicts
