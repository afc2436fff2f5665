"""What processing adds to one of our files: results (``/data/<name>`` arrays with their dims),
per-image tables (``/tables/<name>``), processing records (``/processing/<step>`` attributes) and
:func:`store_pipeline_result`, which stores a whole pipeline run.

Results are EMD 1.0 groups (``emd_group_type=1``, ``scherzer_kind="result"``): ``data`` in any
real dtype as given, complex always as complex64, ``dim1..dimN`` describing axes 0..N-1 in C
order, and a HyperSpy view ``/Experiments/<name>`` (:mod:`scherzer.io.hspy`; the last two axes
are its signal axes, so an exit wave opens as a ComplexSignal2D with its pixel size).

Tables are 1-D structured datasets; numpy unicode columns (not storable in HDF5) are written as
UTF-8 bytes and listed, with their widths, in the JSON attribute ``unicode_columns``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from scherzer.io import hspy
from scherzer.io.budget import ReadBudget
from scherzer.io.emd import stack_names, write_dim, write_stack
from scherzer.io.errors import EmdError
from scherzer.io.hdf5 import (
    RESERVED_ATTRS,
    check_name,
    data_group,
    jsonable,
    open_append,
    open_ours,
    read_attrs,
    replace_group,
    write_attrs,
)

__all__ = [
    "read_processing",
    "read_processing_summary",
    "read_result",
    "read_table",
    "store_pipeline_result",
    "write_processing",
    "write_result",
    "write_table",
]

#: Bytes per character of numpy's ``U`` dtype (UCS-4), and the UTF-8 bytes reserved per character.
_UCS4_BYTES = 4
_UTF8_MAX_BYTES = 4
#: Pipeline images on the pixel grid of the file's first stack when the step gives no dims.
IMAGE_RESULTS = ("exit_wave", "structure_image")
#: ``<prefix><signal>``: made from stack ``<signal>`` (or ``aligned_<signal>``), on its pixel grid
#: in the last two axes (averages; displacement fields (n, 2, y, x)).
IMAGE_PREFIXES = ("average_", "displacement_", "fields_")
_IMAGE_SIGNAL_NDIM = 2


def write_result(
    path: str | Path,
    name: str,
    data: np.ndarray,
    *,
    dims: Sequence[tuple[str, str, np.ndarray | None]] | None = None,
    attrs: dict | None = None,
) -> None:
    """Write a real or complex array as the EMD group ``/data/<name>`` (replacing one of that
    name). Complex data are stored as complex64. ``dims`` is one (name, units, values or None
    for 0..n-1) per axis; ``attrs`` go on the group (JSON-able values)."""
    check_name(name, "result")
    arr = np.asarray(data)
    if arr.dtype.kind not in "biufc":
        raise EmdError(f"result {name!r} must be numeric; got dtype {arr.dtype}")
    if arr.dtype.kind == "c":
        arr = arr.astype(np.complex64)
    if arr.ndim == 0:
        raise EmdError(f"result {name!r} must be an array; got a scalar (store it in attrs)")
    dim_list = _result_dims(name, arr.shape, dims)
    user_attrs = dict(attrs or {})
    clash = RESERVED_ATTRS.intersection(user_attrs)
    if clash:
        raise EmdError(f"attrs use reserved names {sorted(clash)}")
    with open_append(path) as f:
        hspy.remove_view(f, name)
        g = replace_group(f.require_group("data"), name)
        g.attrs["emd_group_type"] = 1
        g.attrs["scherzer_kind"] = "result"
        g.create_dataset("data", data=arr)
        for k, (dname, units, values) in enumerate(dim_list, start=1):
            write_dim(g, k, dname, units, values)
        write_attrs(g, user_attrs)
        axes = [_axis_of(dname, units, values) for dname, units, values in dim_list]
        instrument = read_attrs(f["microscope"]) if "microscope" in f else {}
        hspy.add_result_view(f, name, g, axes=axes, attrs=user_attrs, instrument=instrument)


def _axis_of(name: str, units: str, values: np.ndarray) -> tuple[str, float, float, str]:
    """(name, scale, offset, units) of a dim vector (its first step and first value)."""
    numeric = values.dtype.kind in "iuf" and values.size > 0
    offset = float(values[0]) if numeric else 0.0
    scale = float(values[1] - values[0]) if numeric and values.size > 1 else 1.0
    return (name, scale, offset, units)


def _result_dims(
    name: str, shape: tuple[int, ...], dims: Sequence[tuple[str, str, Any]] | None
) -> list[tuple[str, str, np.ndarray]]:
    if dims is None:
        dims = [(f"dim{k + 1}", "", None) for k in range(len(shape))]
    if len(dims) != len(shape):
        raise EmdError(f"result {name!r} has {len(shape)} axes but {len(dims)} dims were given")
    out = []
    for k, (dim, size) in enumerate(zip(dims, shape, strict=True)):
        try:
            dname, units, values = dim
        except (TypeError, ValueError) as exc:
            raise EmdError(f"dims[{k}] must be (name, units, values or None); got {dim!r}") from exc
        vals = np.arange(size) if values is None else np.asarray(values)
        if vals.shape != (size,):
            raise EmdError(
                f"dims[{k}] ({dname!r}) has {vals.size} values (shape {vals.shape}) for an axis "
                f"of length {size}"
            )
        out.append((str(dname), str(units), vals))
    return out


def read_result(path: str | Path, name: str, *, max_bytes: int | None = None) -> np.ndarray:
    """The array of ``/data/<name>`` (a result, or a stack's raw frames), within the read
    budget ``max_bytes`` (None = a fraction of the available memory)."""
    budget = ReadBudget.of(max_bytes)
    with open_ours(path) as f:
        ds = data_group(f, name)["data"]
        budget.take(ds.shape, ds.dtype, f"result {name!r} in {path}")
        return ds[()]


def write_table(path: str | Path, name: str, table: np.ndarray) -> None:
    """Write a structured array (one row per image, say) as ``/tables/<name>`` (replaced)."""
    check_name(name, "table")
    arr = np.asarray(table)
    if arr.dtype.names is None or arr.ndim != 1:
        raise EmdError(
            f"table {name!r} must be a 1-D structured array (named columns); got dtype "
            f"{arr.dtype} shape {arr.shape}"
        )
    stored, unicode_cols = _table_for_hdf5(arr)
    with open_append(path) as f:
        tables = f.require_group("tables")
        if name in tables:
            del tables[name]
        ds = tables.create_dataset(name, data=stored)
        ds.attrs["unicode_columns"] = json.dumps(unicode_cols)


def _table_for_hdf5(arr: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Unicode columns (not storable in HDF5) become UTF-8 bytes; returns their widths."""
    unicode_cols = {
        n: arr.dtype[n].itemsize // _UCS4_BYTES for n in arr.dtype.names if arr.dtype[n].kind == "U"
    }
    if not unicode_cols:
        return arr, {}
    descr = [
        (n, f"S{_UTF8_MAX_BYTES * unicode_cols[n]}" if n in unicode_cols else arr.dtype[n])
        for n in arr.dtype.names
    ]
    out = np.zeros(arr.shape, dtype=descr)
    for n in arr.dtype.names:
        out[n] = np.char.encode(arr[n], "utf-8") if n in unicode_cols else arr[n]
    return out, unicode_cols


def read_table(path: str | Path, name: str, *, max_bytes: int | None = None) -> np.ndarray:
    """Inverse of :func:`write_table` (within the read budget ``max_bytes``)."""
    budget = ReadBudget.of(max_bytes)
    with open_ours(path) as f:
        ds = f.get(f"tables/{name}")
        if ds is None:
            have = sorted(f["tables"].keys()) if "tables" in f else []
            raise EmdError(f"{path} has no table {name!r}; tables: {have or 'none'}")
        budget.take(ds.shape, ds.dtype, f"table {name!r} in {path}")
        arr = ds[()]
        unicode_cols = json.loads(ds.attrs.get("unicode_columns", "{}"))
    if not unicode_cols:
        return arr
    descr = [
        (n, f"U{unicode_cols[n]}" if n in unicode_cols else arr.dtype[n]) for n in arr.dtype.names
    ]
    out = np.zeros(arr.shape, dtype=descr)
    for n in arr.dtype.names:
        out[n] = np.char.decode(arr[n], "utf-8") if n in unicode_cols else arr[n]
    return out


def write_processing(path: str | Path, step: str, params: dict) -> None:
    """Record a processing step's parameters (JSON-able) as attrs of ``/processing/<step>``."""
    check_name(step, "processing step")
    if not isinstance(params, Mapping):
        raise EmdError(f"params must be a dict; got {type(params).__name__}")
    with open_append(path) as f:
        write_attrs(replace_group(f.require_group("processing"), step), dict(params))


def read_processing(path: str | Path, step: str) -> dict:
    """The parameters :func:`write_processing` stored for ``step``."""
    with open_ours(path) as f:
        g = f.get(f"processing/{step}")
        if g is None:
            have = sorted(f["processing"].keys()) if "processing" in f else []
            raise EmdError(f"{path} has no processing step {step!r}; steps: {have or 'none'}")
        return read_attrs(g)


def store_pipeline_result(path: str | Path, result: Any) -> None:
    """Store what :func:`scherzer.processing.pipeline.run_pipeline` produced in one of our files.

    For each step output (duck-typed: ``step``, ``params``, ``summary``, ``stacks``, ``arrays``,
    ``tables``, ``seconds``, optional ``dims``): stacks go to ``/data/<name>`` (write_stack),
    arrays to ``/data/<name>`` (write_result, complex as complex64), tables to
    ``/tables/<name>``, and the parameters to ``/processing/<step>`` with the step's JSON
    summary and run time in the reserved attributes ``scherzer_summary``/``scherzer_seconds``
    (see :func:`read_processing_summary`). Images without ``dims`` (``average_<signal>``,
    ``displacement_<signal>``, ``fields_<signal>``, ``exit_wave``, ``structure_image``) get y/x
    in nm from the stack they were made from when their last two axes are its frame shape
    (:func:`_image_dims`).
    """
    for out in result.outputs:
        dims = getattr(out, "dims", None) or {}
        for name, stack in out.stacks.items():
            write_stack(path, stack, name=name, mode="a")
        for name, array in out.arrays.items():
            given = dims.get(name) or _image_dims(path, name, np.shape(array))
            write_result(path, name, array, dims=given, attrs={"step": out.step})
        for name, table in out.tables.items():
            write_table(path, name, table)
        write_processing(path, out.step, dict(out.params))
        with open_append(path) as f:
            g = f["processing"][out.step]
            g.attrs["scherzer_summary"] = json.dumps(jsonable(out.summary), allow_nan=False)
            g.attrs["scherzer_seconds"] = float(getattr(out, "seconds", math.nan))


def _source_stacks(f: h5py.File, name: str) -> list[h5py.Group]:
    """The stack groups a pipeline image may have been made from, most likely first (see
    :func:`store_pipeline_result`)."""
    stacks = stack_names(f)
    prefix = next((p for p in IMAGE_PREFIXES if name.startswith(p)), None)
    if prefix is not None:
        source = name[len(prefix) :]
        candidates = [f"aligned_{source}", source]
    elif name in IMAGE_RESULTS:
        candidates = stacks[:1]
    else:
        return []
    return [f["data"][c] for c in candidates if c in stacks]


def _image_dims(
    path: str | Path, name: str, shape: tuple[int, ...]
) -> list[tuple[str, str, np.ndarray]] | None:
    """Dims for a pipeline image on its source stack's pixel grid — y/x in nm on the last two
    axes, indices before them — or None if it is not one (or the shapes differ)."""
    if len(shape) < _IMAGE_SIGNAL_NDIM or not Path(path).exists():
        return None
    with open_ours(path) as f:
        grids = [g.attrs["pixel_size_nm"] for g in _source_stacks(f, name)
                 if tuple(g["data"].shape[1:]) == tuple(shape[-2:])]  # fmt: skip
    if not grids:
        return None
    py, px = (float(v) for v in grids[0])
    ny, nx = shape[-2:]
    lead = [(f"index{k}", "", None) for k in range(len(shape) - _IMAGE_SIGNAL_NDIM)]
    return [*lead, ("y", "nm", np.arange(ny) * py), ("x", "nm", np.arange(nx) * px)]


def read_processing_summary(path: str | Path, step: str) -> dict:
    """The JSON summary (and ``seconds``) :func:`store_pipeline_result` stored for ``step``."""
    with open_ours(path) as f:
        g = f.get(f"processing/{step}")
        if g is None or "scherzer_summary" not in g.attrs:
            raise EmdError(f"{path} has no stored summary for processing step {step!r}")
        out = json.loads(g.attrs["scherzer_summary"])
        out["seconds"] = float(g.attrs.get("scherzer_seconds", math.nan))
        return out
