"""Image stacks in Scherzer's EMD 1.0 (Berkeley) files: the stack group layout, writing a whole
stack (:func:`write_stack`) or one flushed frame at a time (:class:`StackWriter`), and reading
stacks back (:func:`read_stack`, :func:`read_stacks`).

Layout (``docs/file-format.md``): ``/data/<name>`` with ``emd_group_type=1``,
``scherzer_kind="stack"``, ``pixel_size_nm=[y, x]``; ``data`` float32 (n, y, x) in C order, or
int32 for series stored as scaled integers (EFTEM); ``dimK`` describes array axis K-1: frame
index (or, for a series over a calibrated quantity, its values, e.g. energy loss in eV, with
``scale``/``offset`` attributes), y in nm, x in nm; a compound ``records`` table
(``scherzer.stack.RECORD_DTYPE``, one row per frame); ``/microscope`` (instrument attributes,
file-wide, merged); ``/metadata/<name>`` (attributes); ``/ground_truth/<name>/<key>`` (datasets).

Every stack also gets a HyperSpy view, ``/Experiments/<name>`` (:mod:`scherzer.io.hspy`), whose
``data`` is a hard link to the same frames, so ``hs.load`` opens the file as a Signal2D stack.

Crash safety: every append writes and flushes the frame, then writes and flushes its record, in
SWMR mode. Readers trust the leading ``records`` rows whose ``index`` is not -1 (the fill value of
unwritten rows), capped at the length of ``data``: a writer killed at any moment loses at most
the frame it was writing. :func:`finalize_stacks` (run when a writer closes, and by
:func:`scherzer.io.swmr.repair`) trims rows past the complete ones and sets the HyperSpy frame
counts.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from scherzer.io import hspy
from scherzer.io.budget import ReadBudget
from scherzer.io.errors import EmdError
from scherzer.io.hdf5 import (
    check_name,
    data_group,
    init_root,
    json_default,
    new_file,
    open_append,
    open_ours,
    read_attrs,
    replace_group,
    write_attrs,
)
from scherzer.stack import (
    RECORD_DTYPE,
    FrameRecord,
    ImageStack,
    records_from_array,
    records_to_array,
)

__all__ = [
    "StackWriter",
    "complete_rows",
    "finalize_stacks",
    "read_stack",
    "read_stacks",
    "stack_names",
    "update_stack_metadata",
    "write_dim",
    "write_stack",
]

#: ``records.index`` of rows resized but never written (the dataset's fill value).
UNWRITTEN_INDEX = -1
#: Frame data types a stack may be stored in: float32 images, int32 scaled integers (EFTEM).
STACK_DTYPES = (np.dtype(np.float32), np.dtype(np.int32))
#: The default first axis of a stack: the frame index (name, scale, offset, units).
FRAME_AXIS = ("frame", 1.0, 0.0, "")
#: HDF5 format versions that allow SWMR (single writer, multiple readers).
SWMR_LIBVER = ("v110", "latest")
#: Chunk length (rows) of the resizable frame-index and records datasets: small enough that a
#: short series wastes little, large enough that long series do not fragment.
ROW_CHUNK = 256
#: Closing a writer reopens the file to finalise the HyperSpy metadata; a reader holding an HDF5
#: lock (the daemon counting frames) is waited for up to ATTEMPTS × WAIT_S (≈ 1 s).
FINALIZE_ATTEMPTS = 20
FINALIZE_WAIT_S = 0.05

_log = logging.getLogger(__name__)


def write_dim(group: h5py.Group, k: int, name: str, units: str, values: np.ndarray) -> None:
    """EMD ``dim<k>`` (describing array axis k-1) with its ``name`` and ``units``."""
    dim = group.create_dataset(f"dim{k}", data=values, maxshape=(None,) if k == 1 else None)
    dim.attrs["name"] = name
    dim.attrs["units"] = units


def _records_fill() -> np.ndarray:
    """The records' fill value: index -1, every float NaN."""
    fill = np.zeros((), dtype=RECORD_DTYPE)
    fill["index"] = UNWRITTEN_INDEX
    for col in RECORD_DTYPE.names:
        if RECORD_DTYPE[col].kind == "f":
            fill[col] = np.nan
    return fill


def _create_stack_group(
    f: h5py.File,
    name: str,
    frame_shape: tuple[int, int],
    pixel_size_nm: tuple[float, float],
    intensity_units: str = "counts",
    dtype: np.dtype = STACK_DTYPES[0],
    frame_axis: tuple[str, float, float, str] | None = None,
) -> h5py.Group:
    """An empty, resizable EMD group for frames (n, y, x) with its records table. ``frame_axis``
    (name, scale, offset, units): the first axis is that quantity (``dim1`` holds
    offset + scale·index, float64) instead of the frame index."""
    ny, nx = frame_shape
    py, px = pixel_size_nm
    hspy.remove_view(f, name)
    g = replace_group(f.require_group("data"), name)
    g.attrs["emd_group_type"] = 1
    g.attrs["scherzer_kind"] = "stack"
    g.attrs["pixel_size_nm"] = np.array([py, px], dtype=np.float64)
    g.attrs["intensity_units"] = intensity_units
    g.create_dataset(
        "data", shape=(0, ny, nx), maxshape=(None, ny, nx), chunks=(1, ny, nx), dtype=dtype
    )
    axis_name, scale, offset, units = frame_axis or FRAME_AXIS
    frame_dim = g.create_dataset(
        "dim1", shape=(0,), maxshape=(None,), chunks=(ROW_CHUNK,),
        dtype=np.int64 if frame_axis is None else np.float64,
    )  # fmt: skip
    frame_dim.attrs["name"] = axis_name
    frame_dim.attrs["units"] = units
    if frame_axis is not None:
        frame_dim.attrs["scale"] = float(scale)
        frame_dim.attrs["offset"] = float(offset)
    write_dim(g, 2, "y", "nm", np.arange(ny) * py)
    write_dim(g, 3, "x", "nm", np.arange(nx) * px)
    g.create_dataset(
        "records",
        shape=(0,),
        maxshape=(None,),
        chunks=(ROW_CHUNK,),
        dtype=RECORD_DTYPE,
        fillvalue=_records_fill(),
    )
    return g


def _write_truth(f: h5py.File, name: str, truth: Mapping[str, Any]) -> None:
    g = replace_group(f.require_group("ground_truth"), name)
    for key, value in truth.items():
        check_name(key, "ground-truth key")
        if isinstance(value, str):
            g.create_dataset(key, data=value, dtype=h5py.string_dtype())
            continue
        arr = np.asarray(value)
        if arr.dtype.kind not in "biufc":
            try:
                g.create_dataset(key, data=json.dumps(value, default=json_default))
            except TypeError as exc:
                raise EmdError(f"ground truth {key!r} cannot be stored: {exc}") from exc
            g[key].attrs["json"] = 1
            continue
        g.create_dataset(key, data=arr)


def _read_truth(f: h5py.File, name: str) -> dict[str, Any]:
    g = f.get(f"ground_truth/{name}")
    if g is None:
        return {}
    out: dict[str, Any] = {}
    for key, ds in g.items():
        value = ds[()]
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if ds.attrs.get("json", 0):
            value = json.loads(value)
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def _write_context(
    f: h5py.File,
    name: str,
    instrument: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    truth: Mapping[str, Any] | None,
) -> None:
    """Instrument (file-wide, merged), per-stack metadata, ground truth, and the stack's
    HyperSpy view (with the instrument as merged so far)."""
    write_attrs(f.require_group("microscope"), dict(instrument or {}))
    write_attrs(replace_group(f.require_group("metadata"), name), dict(metadata or {}))
    _write_truth(f, name, dict(truth or {}))
    g = f["data"][name]
    hspy.add_stack_view(
        f,
        name,
        g,
        instrument=read_attrs(f["microscope"]),
        metadata=dict(metadata or {}),
        intensity_units=str(g.attrs.get("intensity_units", "counts")),
    )


def _append_rows(
    g: h5py.Group, frames: np.ndarray, table: np.ndarray, flush: Callable[[], None]
) -> int:
    """Append frames, then (after a flush) their records; returns frames now in the group."""
    data, dim1, records = g["data"], g["dim1"], g["records"]
    n0, k = data.shape[0], frames.shape[0]
    data.resize(n0 + k, axis=0)
    data[n0:] = frames
    dim1.resize((n0 + k,))
    index = np.arange(n0, n0 + k)
    if dim1.dtype.kind == "f":  # a calibrated first axis: offset + scale·index
        index = dim1.attrs["offset"] + dim1.attrs["scale"] * index.astype(np.float64)
    dim1[n0:] = index
    flush()
    records.resize((n0 + k,))
    records[n0:] = table
    flush()
    return n0 + k


def write_stack(path: str | Path, stack: ImageStack, name: str = "frames", mode: str = "w") -> None:
    """Write one ImageStack as ``/data/<name>`` (mode "w" new file, "a" add to / replace in one).

    Instrument goes to ``/microscope`` (merged with what is there), metadata to
    ``/metadata/<name>``, ground truth to ``/ground_truth/<name>/<key>``. A ``frame_axis``
    entry in the metadata ([name, scale, offset, units]) calibrates the first axis (see
    :class:`StackWriter`).
    """
    check_name(name, "stack")
    if not isinstance(stack, ImageStack):
        raise EmdError(f"write_stack needs an ImageStack; got {type(stack).__name__}")
    if mode == "w":
        f = new_file(path)
        init_root(f)
    elif mode == "a":
        f = open_append(path)
    else:
        raise EmdError(f"mode must be 'w' (new file) or 'a' (add to a file); got {mode!r}")
    axis = stack.metadata.get("frame_axis")  # [name, scale, offset, units]: a calibrated axis
    if axis is not None:
        _check_frame_axis(axis)
        axis = (str(axis[0]), float(axis[1]), float(axis[2]), str(axis[3]))
    with f:
        g = _create_stack_group(
            f, name, stack.frame_shape, stack.pixel_size_nm, stack.intensity_units,
            frame_axis=axis,
        )  # fmt: skip
        _append_rows(g, stack.frames, records_to_array(stack.records), f.flush)
        _write_context(f, name, stack.instrument, stack.metadata, stack.ground_truth)


class StackWriter:
    """Incremental, crash-safe writer for an acquisition (one or more signals).

    Every :meth:`append` writes and flushes the frame, then its record; the file is in SWMR
    mode, so readers may open it while it grows and a writer killed at any moment leaves a file
    that :func:`read_stack` reads with every frame appended so far. All signal ``names`` are
    created up front. Refuses to overwrite an existing file unless ``overwrite=True``.
    ``dtype``: float32 (default) or int32 (integer frames only, stored exactly); ``frame_axis``
    (name, scale, offset, units): the first axis as a calibrated quantity (e.g.
    ``("Energy loss", 10.0, 400.0, "eV")``), which the HyperSpy view navigates;
    ``intensity_units`` what one stored unit is (HyperSpy's ``Signal.quantity``).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        pixel_size_nm: tuple[float, float],
        frame_shape: tuple[int, int],
        names: Sequence[str] = ("frames",),
        instrument: dict | None = None,
        metadata: dict | None = None,
        overwrite: bool = False,
        dtype: Any = np.float32,
        frame_axis: tuple[str, float, float, str] | None = None,
        intensity_units: str = "counts",
    ) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        if self.dtype not in STACK_DTYPES:
            raise EmdError(f"dtype must be one of {[str(d) for d in STACK_DTYPES]}; got {dtype}")
        if frame_axis is not None:
            _check_frame_axis(frame_axis)
        self.frame_shape = _check_frame_shape(frame_shape)
        self.pixel_size_nm = _check_pixel_size(pixel_size_nm)
        if isinstance(names, str) or not names:
            raise EmdError(f"names must be a non-empty sequence of signal names; got {names!r}")
        self.names = [check_name(n, "signal") for n in names]
        if len(set(self.names)) != len(self.names):
            raise EmdError(f"signal names must be unique; got {self.names}")
        if self.path.exists() and not overwrite:
            raise EmdError(f"{self.path} already exists; choose a new path or pass overwrite=True")
        self._counts = dict.fromkeys(self.names, 0)
        f = new_file(self.path, libver=SWMR_LIBVER)
        try:
            init_root(f)
            for n in self.names:
                _create_stack_group(
                    f, n, self.frame_shape, self.pixel_size_nm, intensity_units,
                    dtype=self.dtype, frame_axis=frame_axis,
                )  # fmt: skip
                _write_context(f, n, instrument, metadata, None)
            f.swmr_mode = True
        except BaseException:
            f.close()
            raise
        self._file: h5py.File | None = f

    # --- writing -------------------------------------------------------------------------
    def _f(self) -> h5py.File:
        if self._file is None:
            raise EmdError(f"StackWriter for {self.path} is closed")
        return self._file

    def append(self, frame: np.ndarray, record: FrameRecord, name: str = "frames") -> int:
        """Write one frame (y, x) and its record to signal ``name``; returns frames written."""
        f = self._f()
        if name not in self._counts:
            raise EmdError(f"unknown signal {name!r}; this writer was opened with {self.names}")
        if not isinstance(record, FrameRecord):
            raise EmdError(f"record must be a FrameRecord; got {type(record).__name__}")
        if record.index == UNWRITTEN_INDEX:
            raise EmdError("FrameRecord.index -1 is reserved for unwritten rows; use index >= 0")
        arr = _check_frame(frame, self.frame_shape, self.dtype)
        n = _append_rows(f["data"][name], arr[None], records_to_array([record]), f.flush)
        hspy.set_frame_count(f, name, n)  # an existing attribute: allowed in SWMR mode
        f.flush()
        self._counts[name] = n
        return n

    def set_ground_truth(self, truth: dict) -> None:
        """Store ground truth for every signal (replaces earlier truth). Briefly leaves SWMR
        mode, because HDF5 cannot create datasets while in it."""
        f = self._f()
        f.close()
        self._file = None
        f = h5py.File(self.path, "a", libver=SWMR_LIBVER)
        try:
            for n in self.names:
                _write_truth(f, n, dict(truth))
            f.flush()
            f.swmr_mode = True
        except BaseException:
            f.close()
            raise
        self._file = f

    def counts(self) -> dict[str, int]:
        """Frames written so far per signal."""
        return dict(self._counts)

    def close(self) -> None:
        """Close the file, then reopen it briefly outside SWMR mode to write the record-derived
        HyperSpy metadata (:func:`finalize_stacks`; the frame counts are already current). A
        reader holding the file (HDF5 lock) is waited for a little; if it still holds it, the
        frames and counts are complete and only that metadata is left out."""
        if self._file is None:
            return
        self._file.flush()
        self._file.close()
        self._file = None
        for attempt in range(FINALIZE_ATTEMPTS):
            try:
                with h5py.File(self.path, "a", libver=SWMR_LIBVER) as f:
                    finalize_stacks(f)
                return
            except OSError as exc:
                if attempt == FINALIZE_ATTEMPTS - 1:
                    _log.warning("%s: HyperSpy metadata not finalised: %s", self.path, exc)
                else:
                    time.sleep(FINALIZE_WAIT_S)

    def __enter__(self) -> StackWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _check_frame_shape(shape: Sequence[int]) -> tuple[int, int]:
    try:
        ny, nx = (int(v) for v in shape)
    except (TypeError, ValueError) as exc:
        raise EmdError(f"frame_shape must be two integers (y, x); got {shape!r}") from exc
    if ny < 1 or nx < 1:
        raise EmdError(f"frame_shape must be positive; got {shape!r}")
    return ny, nx


def _check_pixel_size(size: Sequence[float]) -> tuple[float, float]:
    try:
        py, px = (float(v) for v in size)
    except (TypeError, ValueError) as exc:
        raise EmdError(f"pixel_size_nm must be two numbers (y, x); got {size!r}") from exc
    if not (math.isfinite(py) and math.isfinite(px) and py > 0 and px > 0):
        raise EmdError(f"pixel_size_nm must be positive and finite; got {size!r}")
    return py, px


def _check_frame_axis(axis: Sequence[Any]) -> None:
    try:
        name, scale, offset, units = axis
        ok = isinstance(name, str) and isinstance(units, str) and float(scale) != 0
        ok = ok and math.isfinite(float(scale)) and math.isfinite(float(offset))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise EmdError(f"frame_axis must be (name, scale ≠ 0, offset, units), finite; got {axis!r}")


def _check_frame(
    frame: np.ndarray, shape: tuple[int, int], dtype: np.dtype = STACK_DTYPES[0]
) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.dtype.kind not in "iuf":
        raise EmdError(f"frames must be real numbers; got dtype {arr.dtype}")
    if arr.shape != shape:
        raise EmdError(f"frame shape {arr.shape} does not match the writer's {shape} (y, x)")
    if dtype.kind == "i":
        info = np.iinfo(dtype)
        if arr.dtype.kind not in "iu":
            raise EmdError(f"this stack stores {dtype} frames; got {arr.dtype} (round first)")
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise EmdError(f"frame values outside the {dtype} range; refusing to write them")
        return np.ascontiguousarray(arr, dtype=dtype)
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise EmdError("frame contains non-finite values (NaN/inf); refusing to write it")
    return out


def update_stack_metadata(path: str | Path, name: str, values: Mapping[str, Any]) -> None:
    """Merge ``values`` into a closed file's ``/metadata/<name>`` and its HyperSpy view's
    ``original_metadata.metadata`` (what a job learns only at its end, e.g. counts)."""
    check_name(name, "stack")
    with open_append(path) as f:
        if name not in stack_names(f):
            raise EmdError(f"{path} has no stack {name!r}")
        write_attrs(f.require_group("metadata").require_group(name), dict(values))
        view = f.get(f"{hspy.EXPERIMENTS}/{name}/original_metadata/metadata")
        if view is not None:
            hspy.write_tree(view, dict(values))


# =============================================================================================
# Reading
# =============================================================================================


def stack_names(f: h5py.File) -> list[str]:
    """Names of the stack groups in ``/data``, in the order they were written."""
    data = f.get("data")
    if data is None:
        return []
    return [n for n, g in data.items() if g.attrs.get("scherzer_kind") == "stack"]


def complete_rows(g: h5py.Group) -> int:
    """Frames with a complete record: leading records whose index is not the fill value."""
    index = g["records"].fields("index")[()]
    bad = np.flatnonzero(index == UNWRITTEN_INDEX)
    n = int(bad[0]) if bad.size else int(index.size)
    return min(n, int(g["data"].shape[0]))


def finalize_stacks(f: h5py.File) -> None:
    """Trim every stack to its complete frames (data, frame index and records beyond the last
    complete record are the frame a killed writer was writing) and update its HyperSpy view."""
    instrument = read_attrs(f["microscope"]) if "microscope" in f else {}
    for name in stack_names(f):
        g = f["data"][name]
        n = complete_rows(g)
        for key in ("data", "dim1", "records"):
            if g[key].shape[0] > n:
                g[key].resize(n, axis=0)
        hspy.update_stack_view(f, name, instrument)


def _read_stack_group(f: h5py.File, name: str, budget: ReadBudget) -> ImageStack:
    g = data_group(f, name)
    n = complete_rows(g)
    if n == 0:
        raise EmdError(f"stack {name!r} in {f.filename} holds no complete frames yet")
    data = g["data"]
    budget.take((n, *data.shape[1:]), data.dtype, f"stack {name!r} in {f.filename}")
    records = records_from_array(g["records"][:n])
    instrument = read_attrs(f["microscope"]) if "microscope" in f else {}
    md_group = f.get(f"metadata/{name}")
    return ImageStack(
        frames=g["data"][:n],
        pixel_size_nm=tuple(float(v) for v in g.attrs["pixel_size_nm"]),
        records=records,
        instrument=instrument,
        metadata=read_attrs(md_group) if md_group is not None else {},
        ground_truth=_read_truth(f, name),
        intensity_units=str(g.attrs.get("intensity_units", "counts")),
    )


def read_stack(
    path: str | Path, name: str | None = None, *, max_bytes: int | None = None
) -> ImageStack:
    """One stack of a Scherzer EMD file (``name`` None: the first one written). ``max_bytes``:
    the read budget (:mod:`scherzer.io.budget`; None = a fraction of the available memory)."""
    budget = ReadBudget.of(max_bytes)
    with open_ours(path) as f:
        names = stack_names(f)
        if not names:
            raise EmdError(f"{path} holds no image stacks (data groups: {sorted(f['data'])})")
        if name is None:
            name = names[0]
        if name not in names:
            raise EmdError(f"{path} has no stack {name!r}; stacks: {names}")
        return _read_stack_group(f, name, budget)


def read_stacks(path: str | Path, *, max_bytes: int | None = None) -> dict[str, ImageStack]:
    """Every stack of a Scherzer EMD file (stacks without complete frames are left out), within
    one read budget ``max_bytes`` for all of them (None = a fraction of the available memory)."""
    budget = ReadBudget.of(max_bytes)
    with open_ours(path) as f:
        out = {}
        for name in stack_names(f):
            if complete_rows(f["data"][name]) > 0:
                out[name] = _read_stack_group(f, name, budget)
        return out
