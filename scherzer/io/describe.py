"""``describe``: a JSON-serialisable summary of what a file holds (``scherzer info FILE``).

For our files: EMD version, creator, instrument, every ``/data`` group (kind, shape, dtype, dims;
for stacks the complete frame count, pixel size, per-column record ranges, metadata and ground
truth shapes), tables, processing parameters and summaries. For other files: every imported
signal with its shape, dtype, axes (in nm where lengths), whether it is an image, and metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from scherzer.io.axes import dims_axes
from scherzer.io.emd import complete_rows
from scherzer.io.hdf5 import RESERVED_ATTRS, attr_str, jsonable, open_read, read_attrs
from scherzer.io.imports import (
    FORMAT_NAMES,
    existing_input,
    import_signals,
    sniff,
    why_not_image,
)

__all__ = ["describe"]


def describe(path: str | Path, *, max_bytes: int | None = None) -> dict:
    """A JSON-serialisable summary of what a file holds (for ``scherzer info FILE``). Our files
    are described without reading frames; others are imported within the read budget
    ``max_bytes`` (None = a fraction of the available memory)."""
    p = existing_input(path)
    fmt = sniff(p)
    if fmt == "scherzer":
        return _describe_ours(p)
    signals = []
    for s in import_signals(p, max_bytes=max_bytes):
        signals.append(
            {
                "name": s.name,
                "shape": list(s.data.shape),
                "dtype": str(s.data.dtype),
                "axes": [
                    {"name": a[0], "scale": a[1], "offset": a[2], "units": a[3]} for a in s.axes
                ],
                "is_image": why_not_image(s) is None,
                "metadata": jsonable(s.metadata),
            }
        )
    return jsonable({"path": str(p), "format": FORMAT_NAMES.get(fmt, fmt), "signals": signals})


def _describe_ours(path: Path) -> dict:
    with open_read(path) as f:
        out: dict[str, Any] = {
            "path": str(path),
            "format": "scherzer-emd",
            "emd_version": f"{f.attrs['version_major']}.{f.attrs['version_minor']}",
            "creator": attr_str(f, "creator"),
            "instrument": read_attrs(f["microscope"]) if "microscope" in f else {},
            "data": {name: _describe_group(f, name, g) for name, g in f["data"].items()},
            "tables": {
                name: {"rows": int(ds.shape[0]), "columns": list(ds.dtype.names or ())}
                for name, ds in f.get("tables", {}).items()
            },
            "processing": {step: read_attrs(g) for step, g in f.get("processing", {}).items()},
            "processing_summary": {
                step: json.loads(g.attrs["scherzer_summary"])
                for step, g in f.get("processing", {}).items()
                if "scherzer_summary" in g.attrs
            },
        }
    return jsonable(out)


def _describe_group(f: h5py.File, name: str, g: h5py.Group) -> dict:
    ds = g["data"]
    kind = str(g.attrs.get("scherzer_kind", ""))
    axes = dims_axes(g, ds.ndim)
    info: dict[str, Any] = {
        "kind": kind,
        "shape": list(ds.shape),
        "dtype": str(ds.dtype),
        "dims": [{"name": a[0], "step": a[1], "offset": a[2], "units": a[3]} for a in axes],
    }
    if kind == "stack":
        n = complete_rows(g)
        info["frames_complete"] = n
        info["pixel_size_nm"] = [float(v) for v in g.attrs["pixel_size_nm"]]
        info["intensity_units"] = attr_str(g, "intensity_units")
        info["records"] = _records_summary(g["records"][:n])
        md = f.get(f"metadata/{name}")
        info["metadata"] = read_attrs(md) if md is not None else {}
        truth = f.get(f"ground_truth/{name}", {})
        info["ground_truth"] = {
            k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in truth.items()
        }
    else:
        info["attrs"] = read_attrs(g, skip=RESERVED_ATTRS)
    return info


def _dtype_name(dtype: np.dtype) -> str:
    return "str" if h5py.check_string_dtype(dtype) else str(dtype)


def _records_summary(table: np.ndarray) -> dict[str, Any]:
    """Per record column: min/max of finite values (numbers) or the distinct values (text)."""
    out: dict[str, Any] = {}
    for col in table.dtype.names or ():
        values = table[col]
        if values.dtype.kind == "S":
            out[col] = sorted({v.decode("utf-8", "replace") for v in values})
            continue
        finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        out[col] = {"min": finite.min().item(), "max": finite.max().item()} if finite.size else None
    return out
