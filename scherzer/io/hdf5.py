"""HDF5 plumbing shared by every reader and writer: JSON-able values, attribute dictionaries,
and opening files (new, read-only, append to one of ours).

Attribute dictionaries: ints, floats, strings and numeric arrays are stored as native HDF5
attributes; every other value (dicts, lists, bools, None) as a JSON string whose key is listed
in the JSON-list attribute ``scherzer_json_keys``. Names starting with ``scherzer_`` are
reserved for Scherzer's bookkeeping and never returned by :func:`read_attrs`.

Opening for reading tolerates files left by a killed writer (see :mod:`scherzer.io.swmr`):
SWMR-read mode when the SWMR flag is set, flag clearing when a non-SWMR writer left it and no
process holds the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from scherzer import __version__
from scherzer.io.errors import EmdError, existing_file
from scherzer.io.superblock import clear_write_flags

__all__ = [
    "FORMAT_VERSION",
    "JSON_KEYS",
    "RESERVED_ATTRS",
    "attr_str",
    "check_name",
    "data_group",
    "init_root",
    "is_ours",
    "json_default",
    "jsonable",
    "new_file",
    "open_append",
    "open_ours",
    "open_read",
    "read_attrs",
    "replace_group",
    "write_attrs",
]

#: Version of Scherzer's layout inside EMD 1.0 (root attribute ``scherzer_format``).
FORMAT_VERSION = 1
#: Attribute listing which keys of an attribute dictionary are JSON strings.
JSON_KEYS = "scherzer_json_keys"
#: Attributes of ``/data/<name>`` groups that belong to the layout, not to the user.
RESERVED_ATTRS = {"emd_group_type", "scherzer_kind", "pixel_size_nm", "intensity_units"}
#: EMD 1.0 version written in the root attributes.
EMD_VERSION = (1, 0)


def jsonable(value: Any) -> Any:
    """``value`` with numpy types, tuples and non-finite floats made strict-JSON friendly."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_default(value: Any) -> Any:
    """``json.dumps`` fallback for numpy arrays and scalars."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def write_attrs(obj: h5py.Group | h5py.Dataset, values: Mapping[str, Any]) -> None:
    """Store a dict as HDF5 attributes: numbers, strings and numeric arrays natively,
    everything else (dicts, lists, bools, None) as JSON strings listed in ``scherzer_json_keys``.
    """
    json_keys = set(json.loads(obj.attrs.get(JSON_KEYS, "[]")))
    for key, value in values.items():
        if not isinstance(key, str) or not key or key.startswith("scherzer_"):
            raise EmdError(
                f"attribute names must be non-empty strings not starting with 'scherzer_' "
                f"(reserved); got {key!r}"
            )
        native = isinstance(value, (int, float, str, np.integer, np.floating)) and not isinstance(
            value, (bool, np.bool_)
        )
        native = native or (isinstance(value, np.ndarray) and value.dtype.kind in "iuf")
        if native:
            obj.attrs[key] = value
            json_keys.discard(key)
            continue
        try:
            obj.attrs[key] = json.dumps(value, default=json_default)
        except TypeError as exc:
            raise EmdError(f"attribute {key!r} cannot be stored: {exc}") from exc
        json_keys.add(key)
    obj.attrs[JSON_KEYS] = json.dumps(sorted(json_keys))


def read_attrs(obj: h5py.Group | h5py.Dataset, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Inverse of :func:`write_attrs` (also reads attributes other programs wrote)."""
    json_keys = set(json.loads(obj.attrs.get(JSON_KEYS, "[]")))
    skipped = set(skip)
    out: dict[str, Any] = {}
    for key, value in obj.attrs.items():
        if key in skipped or key.startswith("scherzer_"):
            continue
        if isinstance(value, (bytes, np.bytes_)):
            value = bytes(value).decode("utf-8", "replace")
        if key in json_keys:
            value = json.loads(value)
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def attr_str(obj: h5py.Dataset | h5py.Group, key: str) -> str:
    """Attribute ``key`` as text ("" when absent; bytes decoded as UTF-8)."""
    value = obj.attrs.get(key, "")
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", "replace")
    return str(value)


def new_file(path: str | Path, **kwargs: Any) -> h5py.File:
    """Create (truncate) an HDF5 file, saying clearly when its folder is missing."""
    p = Path(path)
    if not p.parent.is_dir():
        raise FileNotFoundError(f"cannot create {p}: folder {p.parent} does not exist")
    if p.is_dir():
        raise EmdError(f"{p} is a directory, not a file")
    return h5py.File(p, "w", track_order=True, **kwargs)


def open_read(path: str | Path) -> h5py.File:
    """Open an HDF5 file read-only. Files being written (or left by a killed SWMR writer) are
    opened in SWMR-read mode; a stale "open for writing" flag that a killed non-SWMR writer left
    is cleared when no process holds the file (see :mod:`scherzer.io.superblock`)."""
    p = existing_file(path)
    if not h5py.is_hdf5(p):
        raise EmdError(f"{p} is not an HDF5 file (no HDF5 signature); cannot read it as EMD")
    try:
        return h5py.File(p, "r")
    except OSError as first:
        try:
            return h5py.File(p, "r", swmr=True)
        except OSError:
            if clear_write_flags(p, allow_swmr=False):
                return h5py.File(p, "r")
            raise EmdError(f"cannot open {p} as HDF5: {first}") from first


def is_ours(f: h5py.File) -> bool:
    """Whether an open file is a Scherzer file (root attribute ``scherzer_format``)."""
    return "scherzer_format" in f.attrs


def open_ours(path: str | Path) -> h5py.File:
    """Open one of our files read-only; EmdError for files of other programs."""
    f = open_read(path)
    if not is_ours(f):
        f.close()
        raise EmdError(
            f"{path} is not a Scherzer EMD file (no 'scherzer_format' root attribute); "
            "use import_stack/import_signals for files from other programs"
        )
    return f


def init_root(f: h5py.File) -> None:
    """Root attributes of EMD 1.0 and of our layout, and the ``/data`` group."""
    f.attrs["version_major"], f.attrs["version_minor"] = EMD_VERSION
    f.attrs["scherzer_format"] = FORMAT_VERSION
    f.attrs["creator"] = f"scherzer {__version__}"
    if "data" not in f:
        f.create_group("data", track_order=True)


def open_append(path: str | Path) -> h5py.File:
    """Open (or create) one of our files for adding results."""
    p = Path(path)
    if p.exists():
        if not h5py.is_hdf5(p):
            raise EmdError(f"{p} exists and is not an HDF5 file; refusing to modify it")
        try:
            f = h5py.File(p, "a")
        except OSError as exc:
            if not clear_write_flags(p, allow_swmr=False):
                raise EmdError(
                    f"cannot open {p} for writing ({exc}); is a writer still running? If a "
                    "killed StackWriter left it, call scherzer.io.repair(path) first"
                ) from exc
            f = h5py.File(p, "a")
        if not is_ours(f) and len(f.keys()) > 0:
            f.close()
            raise EmdError(f"{p} is an HDF5 file from another program; refusing to modify it")
    else:
        f = new_file(p)
    if not is_ours(f):
        init_root(f)
    return f


def data_group(f: h5py.File, name: str) -> h5py.Group:
    """``/data/<name>``, or EmdError listing the groups the file holds."""
    data = f.get("data")
    if data is None or name not in data:
        have = sorted(data.keys()) if data is not None else []
        raise EmdError(f"{f.filename} has no /data/{name}; it holds {have or 'no data groups'}")
    return data[name]


def check_name(name: str, what: str) -> str:
    """``name`` if it can name an HDF5 group or dataset of ours, else EmdError."""
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise EmdError(f"{what} name must be a non-empty string without '/'; got {name!r}")
    return name


def replace_group(parent: h5py.Group, name: str) -> h5py.Group:
    """A new, creation-ordered group ``name`` in ``parent`` (replacing one of that name)."""
    if name in parent:
        del parent[name]
    return parent.create_group(name, track_order=True)
