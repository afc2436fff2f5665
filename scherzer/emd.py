"""EMD 1.0 (Berkeley) HDF5 files for ImageStacks and results, and import of foreign formats.

Units and conventions
---------------------
* Lengths at every boundary are in nm (``pixel_size_nm`` is (y, x)); imported calibrations in
  m, cm, mm, µm/um, nm/n_m, Å/A and pm are converted to nm. Other units (s, 1/nm, …) are kept.
* Arrays are stored in C order exactly as held in memory: ``dimK`` describes array axis K-1
  (frames: dim1 = frame index, dim2 = y, dim3 = x), as the EMD specification and ncempy read them.
  HyperSpy/rosettasciio present Berkeley EMD data transposed (x, y, frame) with the dims reversed;
  that is the same file seen in Fortran order.
* The layout is documented in ``docs/file-format.md``. In short: root attrs ``version_major=1``,
  ``version_minor=0``, ``scherzer_format=1``; ``/data/<name>`` EMD groups (``emd_group_type=1``)
  holding ``data``, ``dim1..dimN`` and, for stacks, a compound ``records`` table;
  ``/microscope`` (instrument, attrs); ``/metadata/<name>`` (attrs); ``/ground_truth/<name>/<key>``
  (datasets); ``/tables/<name>`` (structured datasets); ``/processing/<step>`` (attrs).
* Incremental writing (:class:`StackWriter`) uses HDF5 SWMR (single writer, multiple readers):
  every append writes and flushes the frame, then writes and flushes its record, so a writer
  killed with SIGKILL leaves a file whose complete records all have their frames. Readers trust
  the leading rows of ``records`` whose ``index`` is not -1 (the fill value of unwritten rows).
  A file left by a killed writer keeps HDF5's "open for writing" flag; Scherzer reads it in SWMR
  mode, other tools need ``h5clear -s FILE`` first.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from scherzer import __version__
from scherzer.stack import (
    RECORD_DTYPE,
    FrameRecord,
    ImageStack,
    StackError,
    records_from_array,
    records_to_array,
)

__all__ = [
    "EmdError",
    "ImportedSignal",
    "StackWriter",
    "describe",
    "import_signals",
    "import_stack",
    "import_stacks",
    "read_processing",
    "read_processing_summary",
    "read_result",
    "read_stack",
    "read_stacks",
    "read_table",
    "repair",
    "store_pipeline_result",
    "write_processing",
    "write_result",
    "write_stack",
    "write_table",
]

FORMAT_VERSION = 1
_JSON_KEYS = "scherzer_json_keys"
_RESERVED_ATTRS = {"emd_group_type", "scherzer_kind", "pixel_size_nm", "intensity_units"}
_UNWRITTEN_INDEX = -1
_SWMR_LIBVER = ("v110", "latest")


class EmdError(ValueError):
    """A file could not be read or written as asked; the message says what is wrong."""


@dataclass
class ImportedSignal:
    """One signal of a file, as stored (frame axis first), with calibrations in nm.

    ``axes`` is one ``(name, scale, offset, units)`` per array axis; lengths are in nm.
    ``metadata`` holds what was found: ``voltage_kv``, ``magnification``, ``dwell_us``,
    ``exposure_s``, ``detector``, ``microscope``, ``frame_times_s``, ``title``, … (JSON-able).
    """

    data: np.ndarray
    name: str
    axes: list[tuple[str, float, float, str]]
    metadata: dict[str, Any] = field(default_factory=dict)
    source_format: str = ""


# =============================================================================================
# Small helpers: JSON-able values, attributes, opening files
# =============================================================================================


def _jsonable(value: Any) -> Any:
    """``value`` with numpy types, tuples and non-finite floats made strict-JSON friendly."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _write_attrs(obj: h5py.Group | h5py.Dataset, values: Mapping[str, Any]) -> None:
    """Store a dict as HDF5 attributes: numbers, strings and numeric arrays natively,
    everything else (dicts, lists, bools, None) as JSON strings listed in ``scherzer_json_keys``.
    """
    json_keys = set(json.loads(obj.attrs.get(_JSON_KEYS, "[]")))
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
            obj.attrs[key] = json.dumps(value, default=_json_default)
        except TypeError as exc:
            raise EmdError(f"attribute {key!r} cannot be stored: {exc}") from exc
        json_keys.add(key)
    obj.attrs[_JSON_KEYS] = json.dumps(sorted(json_keys))


def _read_attrs(obj: h5py.Group | h5py.Dataset, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Inverse of :func:`_write_attrs` (also reads attributes other programs wrote)."""
    json_keys = set(json.loads(obj.attrs.get(_JSON_KEYS, "[]")))
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


def _existing_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    if p.is_dir():
        raise EmdError(f"{p} is a directory, not a file")
    return p


def _new_file(path: str | Path, **kwargs: Any) -> h5py.File:
    """Create (truncate) an HDF5 file, saying clearly when its folder is missing."""
    p = Path(path)
    if not p.parent.is_dir():
        raise FileNotFoundError(f"cannot create {p}: folder {p.parent} does not exist")
    if p.is_dir():
        raise EmdError(f"{p} is a directory, not a file")
    return h5py.File(p, "w", track_order=True, **kwargs)


def _open_read(path: str | Path) -> h5py.File:
    """Open an HDF5 file read-only. Files being written (or left by a killed SWMR writer) are
    opened in SWMR-read mode; a stale "open for writing" flag that a killed non-SWMR writer left
    is cleared when no process holds the file (see :func:`repair`)."""
    p = _existing_file(path)
    if not h5py.is_hdf5(p):
        raise EmdError(f"{p} is not an HDF5 file (no HDF5 signature); cannot read it as EMD")
    try:
        return h5py.File(p, "r")
    except OSError as first:
        try:
            return h5py.File(p, "r", swmr=True)
        except OSError:
            if _clear_write_flags(p, allow_swmr=False):
                return h5py.File(p, "r")
            raise EmdError(f"cannot open {p} as HDF5: {first}") from first


# --- HDF5 superblock (v2/v3) status flags: what `h5clear -s` clears --------------------------
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_FLAGS_OFFSET = 11
_SWMR_WRITE_FLAG = 0x04
_MASK32 = 0xFFFFFFFF


def _rot32(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK32


def _lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` (initval 0): HDF5's metadata checksum."""
    a = b = c = (0xDEADBEEF + len(data)) & _MASK32
    if not data:
        return c
    padded = data + b"\0" * (-len(data) % 12)
    words = [int.from_bytes(padded[i : i + 4], "little") for i in range(0, len(padded), 4)]
    for i in range(0, len(words) - 3, 3):
        a, b, c = (
            (a + words[i]) & _MASK32,
            (b + words[i + 1]) & _MASK32,
            (c + words[i + 2]) & _MASK32,
        )
        a = (a - c) & _MASK32 ^ _rot32(c, 4)
        c = (c + b) & _MASK32
        b = (b - a) & _MASK32 ^ _rot32(a, 6)
        a = (a + c) & _MASK32
        c = (c - b) & _MASK32 ^ _rot32(b, 8)
        b = (b + a) & _MASK32
        a = (a - c) & _MASK32 ^ _rot32(c, 16)
        c = (c + b) & _MASK32
        b = (b - a) & _MASK32 ^ _rot32(a, 19)
        a = (a + c) & _MASK32
        c = (c - b) & _MASK32 ^ _rot32(b, 4)
        b = (b + a) & _MASK32
    a, b, c = (a + words[-3]) & _MASK32, (b + words[-2]) & _MASK32, (c + words[-1]) & _MASK32
    for x, y, k in (
        (2, 1, 14),
        (0, 2, 11),
        (1, 0, 25),
        (2, 1, 16),
        (0, 2, 4),
        (1, 0, 14),
        (2, 1, 24),
    ):
        abc = [a, b, c]
        abc[x] = ((abc[x] ^ abc[y]) - _rot32(abc[y], k)) & _MASK32
        a, b, c = abc
    return c


def _clear_write_flags(path: Path, *, allow_swmr: bool) -> bool:
    """Clear the superblock's "open for writing" flags left by a killed writer (``h5clear -s``).

    Only when no process holds an HDF5 lock on the file, and (unless ``allow_swmr``) only for
    non-SWMR flags: a live SWMR writer holds no lock, so its flags are never touched here.
    Returns True if flags were cleared.
    """
    try:
        fh = open(path, "r+b")
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live writer holds it
        head = fh.read(64)
        if head[:8] != _HDF5_SIGNATURE or head[8] not in (2, 3):
            return False
        end = 12 + 4 * head[9]  # signature, version, sizes, flags, 4 addresses; then checksum
        flags = head[_FLAGS_OFFSET]
        stored = int.from_bytes(head[end : end + 4], "little")
        if flags == 0 or stored != _lookup3(head[:end]):
            return False
        if flags & _SWMR_WRITE_FLAG and not allow_swmr:
            return False
        fixed = head[:_FLAGS_OFFSET] + b"\0" + head[_FLAGS_OFFSET + 1 : end]
        fh.seek(0)
        fh.write(fixed + _lookup3(fixed).to_bytes(4, "little"))
        fh.flush()
        os.fsync(fh.fileno())
    return True


def repair(path: str | Path) -> bool:
    """Make a file left by a killed writer openable by every HDF5 reader (rosettasciio, h5py
    without SWMR) by clearing its "open for writing" flags, as ``h5clear -s`` does.

    Call it only when no StackWriter is writing the file (a live SWMR writer holds no lock
    that could be checked). Returns True if flags were cleared, False if there were none.
    """
    p = _existing_file(path)
    if not h5py.is_hdf5(p):
        raise EmdError(f"{p} is not an HDF5 file; nothing to repair")
    return _clear_write_flags(p, allow_swmr=True)


def _is_ours(f: h5py.File) -> bool:
    return "scherzer_format" in f.attrs


def _open_ours(path: str | Path) -> h5py.File:
    f = _open_read(path)
    if not _is_ours(f):
        f.close()
        raise EmdError(
            f"{path} is not a Scherzer EMD file (no 'scherzer_format' root attribute); "
            "use import_stack/import_signals for files from other programs"
        )
    return f


def _init_root(f: h5py.File) -> None:
    f.attrs["version_major"] = 1
    f.attrs["version_minor"] = 0
    f.attrs["scherzer_format"] = FORMAT_VERSION
    f.attrs["creator"] = f"scherzer {__version__}"
    if "data" not in f:
        f.create_group("data", track_order=True)


def _open_append(path: str | Path) -> h5py.File:
    """Open (or create) one of our files for adding results."""
    p = Path(path)
    if p.exists():
        if not h5py.is_hdf5(p):
            raise EmdError(f"{p} exists and is not an HDF5 file; refusing to modify it")
        try:
            f = h5py.File(p, "a")
        except OSError as exc:
            if not _clear_write_flags(p, allow_swmr=False):
                raise EmdError(
                    f"cannot open {p} for writing ({exc}); is a writer still running? If a "
                    "killed StackWriter left it, call scherzer.emd.repair(path) first"
                ) from exc
            f = h5py.File(p, "a")
        if not _is_ours(f) and len(f.keys()) > 0:
            f.close()
            raise EmdError(f"{p} is an HDF5 file from another program; refusing to modify it")
    else:
        f = _new_file(p)
    if not _is_ours(f):
        _init_root(f)
    return f


def _data_group(f: h5py.File, name: str) -> h5py.Group:
    data = f.get("data")
    if data is None or name not in data:
        have = sorted(data.keys()) if data is not None else []
        raise EmdError(f"{f.filename} has no /data/{name}; it holds {have or 'no data groups'}")
    return data[name]


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise EmdError(f"{what} name must be a non-empty string without '/'; got {name!r}")
    return name


def _replace_group(parent: h5py.Group, name: str) -> h5py.Group:
    if name in parent:
        del parent[name]
    return parent.create_group(name, track_order=True)


# =============================================================================================
# Writing our files
# =============================================================================================


def _write_dim(group: h5py.Group, k: int, name: str, units: str, values: np.ndarray) -> None:
    dim = group.create_dataset(f"dim{k}", data=values, maxshape=(None,) if k == 1 else None)
    dim.attrs["name"] = name
    dim.attrs["units"] = units


def _create_stack_group(
    f: h5py.File,
    name: str,
    frame_shape: tuple[int, int],
    pixel_size_nm: tuple[float, float],
    intensity_units: str = "counts",
) -> h5py.Group:
    """An empty, resizable EMD group for frames (n, y, x) with its records table."""
    ny, nx = frame_shape
    py, px = pixel_size_nm
    g = _replace_group(f.require_group("data"), name)
    g.attrs["emd_group_type"] = 1
    g.attrs["scherzer_kind"] = "stack"
    g.attrs["pixel_size_nm"] = np.array([py, px], dtype=np.float64)
    g.attrs["intensity_units"] = intensity_units
    g.create_dataset(
        "data", shape=(0, ny, nx), maxshape=(None, ny, nx), chunks=(1, ny, nx), dtype=np.float32
    )
    frame_dim = g.create_dataset(
        "dim1", shape=(0,), maxshape=(None,), chunks=(256,), dtype=np.int64
    )
    frame_dim.attrs["name"] = "frame"
    frame_dim.attrs["units"] = ""
    _write_dim(g, 2, "y", "nm", np.arange(ny) * py)
    _write_dim(g, 3, "x", "nm", np.arange(nx) * px)
    fill = np.zeros((), dtype=RECORD_DTYPE)
    fill["index"] = _UNWRITTEN_INDEX
    for col in RECORD_DTYPE.names:
        if RECORD_DTYPE[col].kind == "f":
            fill[col] = np.nan
    g.create_dataset(
        "records", shape=(0,), maxshape=(None,), chunks=(256,), dtype=RECORD_DTYPE, fillvalue=fill
    )
    return g


def _write_truth(f: h5py.File, name: str, truth: Mapping[str, Any]) -> None:
    g = _replace_group(f.require_group("ground_truth"), name)
    for key, value in truth.items():
        _check_name(key, "ground-truth key")
        if isinstance(value, str):
            g.create_dataset(key, data=value, dtype=h5py.string_dtype())
            continue
        arr = np.asarray(value)
        if arr.dtype.kind not in "biufc":
            try:
                g.create_dataset(key, data=json.dumps(value, default=_json_default))
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
    """Instrument (file-wide, merged), per-stack metadata and ground truth."""
    _write_attrs(f.require_group("microscope"), dict(instrument or {}))
    _write_attrs(_replace_group(f.require_group("metadata"), name), dict(metadata or {}))
    _write_truth(f, name, dict(truth or {}))


def _append_rows(g: h5py.Group, frames: np.ndarray, table: np.ndarray, flush: Any) -> int:
    """Append frames, then (after a flush) their records; returns frames now in the group."""
    data, dim1, records = g["data"], g["dim1"], g["records"]
    n0, k = data.shape[0], frames.shape[0]
    data.resize(n0 + k, axis=0)
    data[n0:] = frames
    dim1.resize((n0 + k,))
    dim1[n0:] = np.arange(n0, n0 + k)
    flush()
    records.resize((n0 + k,))
    records[n0:] = table
    flush()
    return n0 + k


def write_stack(path: str | Path, stack: ImageStack, name: str = "frames", mode: str = "w") -> None:
    """Write one ImageStack as ``/data/<name>`` (mode "w" new file, "a" add to / replace in one).

    Instrument goes to ``/microscope`` (merged with what is there), metadata to
    ``/metadata/<name>``, ground truth to ``/ground_truth/<name>/<key>``.
    """
    _check_name(name, "stack")
    if not isinstance(stack, ImageStack):
        raise EmdError(f"write_stack needs an ImageStack; got {type(stack).__name__}")
    if mode == "w":
        f = _new_file(path)
        _init_root(f)
    elif mode == "a":
        f = _open_append(path)
    else:
        raise EmdError(f"mode must be 'w' (new file) or 'a' (add to a file); got {mode!r}")
    with f:
        g = _create_stack_group(
            f, name, stack.frame_shape, stack.pixel_size_nm, stack.intensity_units
        )
        _append_rows(g, stack.frames, records_to_array(stack.records), f.flush)
        _write_context(f, name, stack.instrument, stack.metadata, stack.ground_truth)


class StackWriter:
    """Incremental, crash-safe writer for an acquisition (one or more signals).

    Every :meth:`append` writes and flushes the frame, then its record; the file is in SWMR
    mode, so readers may open it while it grows and a writer killed at any moment leaves a file
    that :func:`read_stack` reads with every frame appended so far. All signal ``names`` are
    created up front. Refuses to overwrite an existing file unless ``overwrite=True``.
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
    ) -> None:
        self.path = Path(path)
        self.frame_shape = _check_frame_shape(frame_shape)
        self.pixel_size_nm = _check_pixel_size(pixel_size_nm)
        if isinstance(names, str) or not names:
            raise EmdError(f"names must be a non-empty sequence of signal names; got {names!r}")
        self.names = [_check_name(n, "signal") for n in names]
        if len(set(self.names)) != len(self.names):
            raise EmdError(f"signal names must be unique; got {self.names}")
        if self.path.exists() and not overwrite:
            raise EmdError(f"{self.path} already exists; choose a new path or pass overwrite=True")
        self._counts = dict.fromkeys(self.names, 0)
        f = _new_file(self.path, libver=_SWMR_LIBVER)
        try:
            _init_root(f)
            for n in self.names:
                _create_stack_group(f, n, self.frame_shape, self.pixel_size_nm)
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
        if record.index == _UNWRITTEN_INDEX:
            raise EmdError("FrameRecord.index -1 is reserved for unwritten rows; use index >= 0")
        arr = _check_frame(frame, self.frame_shape)
        n = _append_rows(f["data"][name], arr[None], records_to_array([record]), f.flush)
        self._counts[name] = n
        return n

    def set_ground_truth(self, truth: dict) -> None:
        """Store ground truth for every signal (replaces earlier truth). Briefly leaves SWMR
        mode, because HDF5 cannot create datasets while in it."""
        f = self._f()
        f.close()
        self._file = None
        f = h5py.File(self.path, "a", libver=_SWMR_LIBVER)
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
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None

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


def _check_frame(frame: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.dtype.kind not in "iuf":
        raise EmdError(f"frames must be real numbers; got dtype {arr.dtype}")
    if arr.shape != shape:
        raise EmdError(f"frame shape {arr.shape} does not match the writer's {shape} (y, x)")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise EmdError("frame contains non-finite values (NaN/inf); refusing to write it")
    return out


# --- results, tables, processing parameters ------------------------------------------------


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
    _check_name(name, "result")
    arr = np.asarray(data)
    if arr.dtype.kind not in "biufc":
        raise EmdError(f"result {name!r} must be numeric; got dtype {arr.dtype}")
    if arr.dtype.kind == "c":
        arr = arr.astype(np.complex64)
    if arr.ndim == 0:
        raise EmdError(f"result {name!r} must be an array; got a scalar (store it in attrs)")
    dim_list = _result_dims(name, arr.shape, dims)
    user_attrs = dict(attrs or {})
    clash = _RESERVED_ATTRS.intersection(user_attrs)
    if clash:
        raise EmdError(f"attrs use reserved names {sorted(clash)}")
    with _open_append(path) as f:
        g = _replace_group(f.require_group("data"), name)
        g.attrs["emd_group_type"] = 1
        g.attrs["scherzer_kind"] = "result"
        g.create_dataset("data", data=arr)
        for k, (dname, units, values) in enumerate(dim_list, start=1):
            _write_dim(g, k, dname, units, values)
        _write_attrs(g, user_attrs)


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


def read_result(path: str | Path, name: str) -> np.ndarray:
    """The array of ``/data/<name>`` (a result, or a stack's raw frames)."""
    with _open_ours(path) as f:
        return _data_group(f, name)["data"][()]


def write_table(path: str | Path, name: str, table: np.ndarray) -> None:
    """Write a structured array (one row per image, say) as ``/tables/<name>`` (replaced)."""
    _check_name(name, "table")
    arr = np.asarray(table)
    if arr.dtype.names is None or arr.ndim != 1:
        raise EmdError(
            f"table {name!r} must be a 1-D structured array (named columns); got dtype "
            f"{arr.dtype} shape {arr.shape}"
        )
    stored, unicode_cols = _table_for_hdf5(arr)
    with _open_append(path) as f:
        tables = f.require_group("tables")
        if name in tables:
            del tables[name]
        ds = tables.create_dataset(name, data=stored)
        ds.attrs["unicode_columns"] = json.dumps(unicode_cols)


def _table_for_hdf5(arr: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Unicode columns (not storable in HDF5) become UTF-8 bytes; returns their widths."""
    unicode_cols = {
        n: arr.dtype[n].itemsize // 4 for n in arr.dtype.names if arr.dtype[n].kind == "U"
    }
    if not unicode_cols:
        return arr, {}
    descr = [
        (n, f"S{4 * unicode_cols[n]}" if n in unicode_cols else arr.dtype[n])
        for n in arr.dtype.names
    ]
    out = np.zeros(arr.shape, dtype=descr)
    for n in arr.dtype.names:
        out[n] = np.char.encode(arr[n], "utf-8") if n in unicode_cols else arr[n]
    return out, unicode_cols


def read_table(path: str | Path, name: str) -> np.ndarray:
    """Inverse of :func:`write_table`."""
    with _open_ours(path) as f:
        ds = f.get(f"tables/{name}")
        if ds is None:
            have = sorted(f["tables"].keys()) if "tables" in f else []
            raise EmdError(f"{path} has no table {name!r}; tables: {have or 'none'}")
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
    _check_name(step, "processing step")
    if not isinstance(params, Mapping):
        raise EmdError(f"params must be a dict; got {type(params).__name__}")
    with _open_append(path) as f:
        _write_attrs(_replace_group(f.require_group("processing"), step), dict(params))


def read_processing(path: str | Path, step: str) -> dict:
    """The parameters :func:`write_processing` stored for ``step``."""
    with _open_ours(path) as f:
        g = f.get(f"processing/{step}")
        if g is None:
            have = sorted(f["processing"].keys()) if "processing" in f else []
            raise EmdError(f"{path} has no processing step {step!r}; steps: {have or 'none'}")
        return _read_attrs(g)


def store_pipeline_result(path: str | Path, result: Any) -> None:
    """Store what :func:`scherzer.processing.pipeline.run_pipeline` produced in one of our files.

    For each step output (duck-typed: ``step``, ``params``, ``summary``, ``stacks``, ``arrays``,
    ``tables``, ``seconds``, optional ``dims``): stacks go to ``/data/<name>`` (write_stack),
    arrays to ``/data/<name>`` (write_result, complex as complex64), tables to
    ``/tables/<name>``, and the parameters to ``/processing/<step>`` with the step's JSON
    summary and run time in the reserved attributes ``scherzer_summary``/``scherzer_seconds``
    (see :func:`read_processing_summary`).
    """
    for out in result.outputs:
        dims = getattr(out, "dims", None) or {}
        for name, stack in out.stacks.items():
            write_stack(path, stack, name=name, mode="a")
        for name, array in out.arrays.items():
            write_result(path, name, array, dims=dims.get(name), attrs={"step": out.step})
        for name, table in out.tables.items():
            write_table(path, name, table)
        write_processing(path, out.step, dict(out.params))
        with _open_append(path) as f:
            g = f["processing"][out.step]
            g.attrs["scherzer_summary"] = json.dumps(_jsonable(out.summary), allow_nan=False)
            g.attrs["scherzer_seconds"] = float(getattr(out, "seconds", math.nan))


def read_processing_summary(path: str | Path, step: str) -> dict:
    """The JSON summary (and ``seconds``) :func:`store_pipeline_result` stored for ``step``."""
    with _open_ours(path) as f:
        g = f.get(f"processing/{step}")
        if g is None or "scherzer_summary" not in g.attrs:
            raise EmdError(f"{path} has no stored summary for processing step {step!r}")
        out = json.loads(g.attrs["scherzer_summary"])
        out["seconds"] = float(g.attrs.get("scherzer_seconds", math.nan))
        return out


# =============================================================================================
# Reading our files
# =============================================================================================


def _stack_names(f: h5py.File) -> list[str]:
    data = f.get("data")
    if data is None:
        return []
    return [n for n, g in data.items() if g.attrs.get("scherzer_kind") == "stack"]


def _complete_rows(g: h5py.Group) -> int:
    """Frames with a complete record: leading records whose index is not the fill value."""
    index = g["records"].fields("index")[()]
    bad = np.flatnonzero(index == _UNWRITTEN_INDEX)
    n = int(bad[0]) if bad.size else int(index.size)
    return min(n, int(g["data"].shape[0]))


def _read_stack_group(f: h5py.File, name: str) -> ImageStack:
    g = _data_group(f, name)
    n = _complete_rows(g)
    if n == 0:
        raise EmdError(f"stack {name!r} in {f.filename} holds no complete frames yet")
    records = records_from_array(g["records"][:n])
    instrument = _read_attrs(f["microscope"]) if "microscope" in f else {}
    md_group = f.get(f"metadata/{name}")
    return ImageStack(
        frames=g["data"][:n],
        pixel_size_nm=tuple(float(v) for v in g.attrs["pixel_size_nm"]),
        records=records,
        instrument=instrument,
        metadata=_read_attrs(md_group) if md_group is not None else {},
        ground_truth=_read_truth(f, name),
        intensity_units=str(g.attrs.get("intensity_units", "counts")),
    )


def read_stack(path: str | Path, name: str | None = None) -> ImageStack:
    """One stack of a Scherzer EMD file (``name`` None: the first one written)."""
    with _open_ours(path) as f:
        names = _stack_names(f)
        if not names:
            raise EmdError(f"{path} holds no image stacks (data groups: {sorted(f['data'])})")
        if name is None:
            name = names[0]
        if name not in names:
            raise EmdError(f"{path} has no stack {name!r}; stacks: {names}")
        return _read_stack_group(f, name)


def read_stacks(path: str | Path) -> dict[str, ImageStack]:
    """Every stack of a Scherzer EMD file (stacks without complete frames are left out)."""
    with _open_ours(path) as f:
        out = {}
        for name in _stack_names(f):
            if _complete_rows(f["data"][name]) > 0:
                out[name] = _read_stack_group(f, name)
        return out


# =============================================================================================
# Units
# =============================================================================================

_NM_PER_UNIT = {
    "m": 1e9,
    "cm": 1e7,
    "mm": 1e6,
    "um": 1e3,
    "µm": 1e3,
    "μm": 1e3,
    "micron": 1e3,
    "microns": 1e3,
    "nm": 1.0,
    "nanometer": 1.0,
    "nanometers": 1.0,
    "a": 0.1,
    "å": 0.1,
    "Å": 0.1,
    "angstrom": 0.1,
    "angstroms": 0.1,
    "pm": 1e-3,
}


def nm_per_unit(units: str | None) -> float | None:
    """nm per one ``units`` for a length unit (nm, n_m, [n_m], Å, A, pm, µm, um, m, …), else
    None (time, reciprocal and unknown units)."""
    if units is None:
        return None
    key = str(units).strip().strip("[]").replace("_", "").strip()
    return _NM_PER_UNIT.get(key) or _NM_PER_UNIT.get(key.lower())


def _axis_in_nm(name: Any, scale: Any, offset: Any, units: Any) -> tuple[str, float, float, str]:
    units_s = "" if units is None else str(units)
    factor = nm_per_unit(units_s)
    scale_f, offset_f = float(scale), float(offset)
    if factor is not None:
        return (str(name or ""), scale_f * factor, offset_f * factor, "nm")
    return (str(name or ""), scale_f, offset_f, units_s)


# =============================================================================================
# Foreign files
# =============================================================================================


def _sniff(path: Path) -> str:
    """The file's format from its content (and, for TIA, its name)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if h5py.is_hdf5(path):
        with _open_read(path) as f:
            if _is_ours(f):
                return "scherzer"
            if str(f.attrs.get("file_format", "")).lower() in ("hyperspy", "hspy"):
                return "hspy"
            if "Version" in f and "Data" in f:
                return "velox"
            if "version_major" in f.attrs or "data" in f:
                return "berkeley"
        raise EmdError(
            f"{path} is HDF5 but neither EMD (Berkeley/Velox), HyperSpy nor Scherzer; "
            "cannot tell what it holds"
        )
    suffix = path.suffix.lower()
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:4] in (b"\x00\x00\x00\x03", b"\x00\x00\x00\x04") and suffix in (".dm3", ".dm4"):
        return "dm"
    if suffix in (".emi", ".ser"):
        return "tia"
    raise EmdError(
        f"unrecognised file format for {path} (first bytes {head!r}); readable: Scherzer/"
        "Berkeley/Velox EMD, HyperSpy .hspy/.hdf5, DM3/DM4, TIA .emi/.ser, TIFF, .npy"
    )


def import_signals(path: str | Path) -> list[ImportedSignal]:
    """Every signal of any readable file: data as stored (frame axis first), axes in nm."""
    p = _existing_file(path)
    fmt = _sniff(p)
    readers = {
        "scherzer": _signals_ours,
        "berkeley": _signals_berkeley,
        "velox": _signals_rsciio,
        "hspy": _signals_rsciio,
        "dm": _signals_rsciio,
        "tia": _signals_rsciio,
        "tiff": _signals_tiff,
        "npy": _signals_npy,
    }
    signals = readers[fmt](p, fmt)
    if not signals:
        hint = ""
        if fmt == "tia" and p.suffix.lower() == ".emi":
            hint = f" (the data live in {p.stem}_1.ser beside the .emi; is it missing?)"
        raise EmdError(f"{p} holds no signals that could be read{hint}")
    return signals


def _signals_ours(path: Path, fmt: str) -> list[ImportedSignal]:
    out = []
    with _open_read(path) as f:
        instrument = _read_attrs(f["microscope"]) if "microscope" in f else {}
        for name, g in f["data"].items():
            if g.attrs.get("scherzer_kind") == "stack":
                n = _complete_rows(g)
                data = g["data"][:n]
            else:
                data = g["data"][()]
            md = {k: instrument[k] for k in ("voltage_kv", "magnification") if k in instrument}
            md["kind"] = str(g.attrs.get("scherzer_kind", ""))
            out.append(ImportedSignal(data, name, _dims_axes(g, data.ndim), md, "scherzer-emd"))
    return out


def _dims_axes(g: h5py.Group, ndim: int) -> list[tuple[str, float, float, str]]:
    """Axes from EMD ``dim1..dimN`` (or ``dim0..``) datasets in stored array order."""
    first = 0 if "dim0" in g else 1
    axes = []
    for k in range(ndim):
        dim = g.get(f"dim{k + first}")
        if dim is None:
            axes.append((f"axis{k}", 1.0, 0.0, ""))
            continue
        values = dim[()] if dim.ndim else np.array([dim[()]])
        numeric = values.dtype.kind in "iuf" and values.size > 0
        offset = float(values[0]) if numeric else 0.0
        scale = float(values[1] - values[0]) if numeric and values.size > 1 else 1.0
        name, units = (_attr_str(dim, key) for key in ("name", "units"))
        axes.append(_axis_in_nm(name, scale, offset, units))
    return axes


def _attr_str(obj: h5py.Dataset | h5py.Group, key: str) -> str:
    value = obj.attrs.get(key, "")
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", "replace")
    return str(value)


def _signals_berkeley(path: Path, fmt: str) -> list[ImportedSignal]:
    """Berkeley EMD (ncempy, py4DSTEM, HyperSpy): every ``emd_group_type`` group's ``data``,
    in stored (C) order with dim1 describing axis 0. Other layouts go through rosettasciio."""
    found: list[tuple[str, h5py.Group]] = []
    with _open_read(path) as f:
        f.visititems(
            lambda n, o: (
                found.append((n, o))
                if isinstance(o, h5py.Group)
                and o.attrs.get("emd_group_type", 0)
                and isinstance(o.get("data"), h5py.Dataset)
                else None
            )
        )
        if not found:
            return _signals_rsciio(path, fmt)
        om = {grp: _read_attrs(f[grp]) for grp in ("microscope", "sample", "user") if grp in f}
        out = []
        for name, g in found:
            data = g["data"][()]
            md = _instrument_metadata(om, None, "berkeley")
            md["title"] = name.rsplit("/", 1)[-1]
            out.append(
                ImportedSignal(
                    data, name.rsplit("/", 1)[-1], _dims_axes(g, data.ndim), md, "berkeley-emd"
                )
            )
    return out


def _signals_rsciio(path: Path, fmt: str) -> list[ImportedSignal]:
    import warnings

    from rsciio import digitalmicrograph, emd, hspy, tia

    reader = {
        "velox": emd,
        "berkeley": emd,
        "hspy": hspy,
        "dm": digitalmicrograph,
        "tia": tia,
    }[fmt]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dicts = reader.file_reader(str(path))
        except Exception as exc:
            raise EmdError(f"cannot read {path} as {fmt}: {type(exc).__name__}: {exc}") from exc
    return [_from_rsciio(d, fmt, i, _stem(path)) for i, d in enumerate(dicts)]


def _stem(path: Path) -> str:
    """A file's name without suffix (and without TIA's ``_1`` series suffix)."""
    stem = path.stem
    return stem[:-2] if path.suffix.lower() == ".ser" and stem.endswith("_1") else stem


def _signals_tiff(path: Path, fmt: str) -> list[ImportedSignal]:
    import warnings

    import tifffile
    from rsciio import tiff

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dicts = tiff.file_reader(str(path))
        except Exception as exc:
            raise EmdError(f"cannot read {path} as TIFF: {type(exc).__name__}: {exc}") from exc
        with tifffile.TiffFile(path) as tf:
            ij_unit = (tf.imagej_metadata or {}).get("unit")
    out = []
    for i, d in enumerate(dicts):
        if ij_unit:  # rosettasciio leaves ImageJ's length unit out
            for ax in d["axes"]:
                if ax.get("units") in (None, "") and not ax.get("navigate", False):
                    ax["units"] = ij_unit.replace("\\u00B5", "µ")
        out.append(_from_rsciio(d, fmt, i, _stem(path)))
    return out


def _signals_npy(path: Path, fmt: str) -> list[ImportedSignal]:
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise EmdError(f"cannot read {path} as .npy (object arrays are refused): {exc}") from exc
    axes = [(name, 1.0, 0.0, "") for name in _default_axis_names(data.ndim)]
    return [ImportedSignal(data, path.stem, axes, {"title": path.stem}, "npy")]


def _default_axis_names(ndim: int) -> list[str]:
    tail = ["y", "x"][-ndim:] if ndim else []
    return [f"axis{k}" if ndim > 3 else "frame" for k in range(ndim - len(tail))] + tail


def _from_rsciio(d: dict, fmt: str, index: int, stem: str) -> ImportedSignal:
    data = np.asarray(d["data"])
    raw_axes = sorted(d["axes"], key=lambda a: a.get("index_in_array", 0))
    if len(raw_axes) != data.ndim:  # some readers index axes differently; trust the order
        raw_axes = list(d["axes"])
    nav = [i for i, a in enumerate(raw_axes) if a.get("navigate")]
    order = nav + [i for i in range(data.ndim) if i not in nav]
    if order != list(range(data.ndim)):
        data = np.transpose(data, order)
        raw_axes = [raw_axes[i] for i in order]
    names = _default_axis_names(data.ndim)
    axes = [
        _axis_in_nm(
            a.get("name") or names[k], a.get("scale", 1.0), a.get("offset", 0.0), a.get("units")
        )
        for k, a in enumerate(raw_axes)
    ]
    md = _instrument_metadata(d.get("original_metadata") or {}, d.get("mapping"), fmt)
    for key, value in _hyperspy_metadata(d.get("metadata") or {}).items():
        md.setdefault(key, value)
    general = (d.get("metadata") or {}).get("General", {})
    for key in ("title", "date", "time", "original_filename"):
        if general.get(key):
            md[key] = str(general[key])
    if fmt == "tia":
        md.update(_tia_frame_times(d.get("original_metadata") or {}, data.shape[0]))
    name = md.get("title") or md.get("detector") or (stem if index == 0 else f"{stem}_{index}")
    return ImportedSignal(data, str(name), axes, md, _FORMAT_NAMES[fmt])


_FORMAT_NAMES = {
    "velox": "velox-emd",
    "berkeley": "berkeley-emd",
    "hspy": "hyperspy",
    "dm": "digitalmicrograph",
    "tia": "tia",
    "tiff": "tiff",
}


# --- instrument metadata from original_metadata ------------------------------------------------


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _norm(key: str) -> str:
    return key.replace(" ", "_").lower()


def _as_float(value: Any) -> float | None:
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        if value.size != 1:
            return None
        value = value.reshape(()).item()
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


#: (metadata key, factor to our unit, original-metadata key suffixes in order of preference)
_NUMERIC_KEYS: list[tuple[str, float, tuple[str, ...]]] = [
    ("voltage_kv", 1e-3, ("microscope.high_tension", "optics.accelerationvoltage",
                          "microscope_info.voltage", "acceleratingvoltage")),
    ("magnification", 1.0, ("microscope.magnification", "optics.nominalmagnification",
                            "stemmagnification.value", "microscope_info.indicated_magnification",
                            "magnification_x")),
    ("dwell_us", 1e6, ("microscope.dwell_time", "scan.dwelltime")),
    ("dwell_us", 1.0, ("digiscan.sample_time",)),
    ("exposure_s", 1.0, ("detector.exposure_(s)", "high_level.exposure_(s)",
                         "databar.exposure_time_(s)")),
    ("camera_length_m", 1.0, ("microscope.camera_length", "optics.cameralength")),
]  # fmt: skip

_TEXT_KEYS: list[tuple[str, tuple[str, ...]]] = [
    ("microscope", ("microscope.name", "instrument.instrumentclass",
                    "experimentaldescription.microscope", "session_info.microscope",
                    "microscope_info.name")),
    ("detector", ("binaryresult.detector", "acquireinfo.cameranamepath")),
    ("acquisition_mode", ("experimentaldescription.mode", "microscope_info.operation_mode")),
]  # fmt: skip


def _dm_prefix(mapping: Mapping | None) -> str | None:
    """For DM files: the ``ImageList.TagGroupN.`` of this image (from rosettasciio's mapping)."""
    for key in mapping or {}:
        if key.startswith("ImageList.TagGroup"):
            return ".".join(key.split(".")[:2]) + "."
    return None


def _instrument_metadata(om: Mapping, mapping: Mapping | None, fmt: str) -> dict[str, Any]:
    """Useful instrument values from a reader's original metadata (units in the keys)."""
    flat = {_norm(k): v for k, v in _flatten(om).items()}
    prefix = _dm_prefix(mapping)
    if prefix is not None:  # DM: only this image's tags (and non-image ones)
        p = _norm(prefix)
        flat = {k: v for k, v in flat.items() if k.startswith(p) or not k.startswith("imagelist.")}
    md: dict[str, Any] = {}
    for key, factor, suffixes in _NUMERIC_KEYS:
        if key in md:
            continue
        value = _find(flat, suffixes, _as_float)
        if value is not None:
            md[key] = value * factor
    for key, suffixes in _TEXT_KEYS:
        value = _find(flat, suffixes, lambda v: str(_jsonable(v)).strip() or None)
        if value is not None:
            md[key] = value
    if fmt == "tia":
        _tia_dwell_or_exposure(flat, md)
    if fmt == "velox":
        _velox_exposure(flat, md)
    return md


def _hyperspy_metadata(metadata: Mapping) -> dict[str, Any]:
    """Instrument values from HyperSpy's mapped metadata (``Acquisition_instrument.TEM``)."""
    instrument = metadata.get("Acquisition_instrument") or {}
    tem = instrument.get("TEM") or instrument.get("SEM") or {}
    camera = (tem.get("Detector") or {}).get("Camera") or {}
    found = {
        "voltage_kv": (_as_float(tem.get("beam_energy")), 1.0),
        "magnification": (_as_float(tem.get("magnification")), 1.0),
        "dwell_us": (_as_float(tem.get("dwell_time")), 1e6),
        "exposure_s": (_as_float(camera.get("exposure")), 1.0),
    }
    out: dict[str, Any] = {k: v * f for k, (v, f) in found.items() if v is not None}
    for key in ("microscope", "acquisition_mode"):
        if tem.get(key):
            out[key] = str(tem[key])
    return out


def _find(flat: Mapping[str, Any], suffixes: Sequence[str], convert: Any) -> Any:
    for suffix in suffixes:
        for key, value in flat.items():
            if key == suffix or key.endswith("." + suffix):
                out = convert(value)
                if out is not None:
                    return out
    return None


def _tia_dwell_or_exposure(flat: Mapping[str, Any], md: dict[str, Any]) -> None:
    """TIA's ``DwellTimePath`` (s) is the pixel dwell in STEM and the exposure on a camera."""
    value = _find(flat, ("acquireinfo.dwelltimepath",), _as_float)
    if value is None:
        return
    if "STEM" in str(md.get("acquisition_mode", "")).upper():
        md["dwell_us"] = value * 1e6
    else:
        md["exposure_s"] = value


def _velox_exposure(flat: Mapping[str, Any], md: dict[str, Any]) -> None:
    """Velox: the exposure time of the detector that recorded this signal."""
    detector = md.get("detector")
    for key, value in flat.items():
        if key.endswith(".detectorname") and str(value) == detector:
            exposure = _as_float(flat.get(key[: -len("detectorname")] + "exposuretime"))
            if exposure is not None:
                md["exposure_s"] = exposure


def _tia_frame_times(om: Mapping, n: int) -> dict[str, Any]:
    times = np.atleast_1d(np.asarray(om.get("ser_header_parameters", {}).get("Time", []), float))
    if times.size == n and n > 1:
        return {"frame_times_s": (times - times[0]).tolist()}
    return {}


# =============================================================================================
# Imported signals as ImageStacks
# =============================================================================================


def _why_not_image(sig: ImportedSignal) -> str | None:
    """Why a signal is not an image (stack), or None if it is one."""
    dtype = sig.data.dtype
    what = None
    if dtype.names is not None:
        fields = set(dtype.names)
        kind = (
            "RGBA" if {"R", "G", "B", "A"} <= fields else "RGB" if {"R", "G", "B"} <= fields else ""
        )
        what = f"a {kind or 'structured'} colour image (dtype {dtype}), a display rendering"
    elif dtype.kind == "c":
        what = f"complex data (dtype {dtype}), e.g. an FFT or a complex wave"
    elif dtype.kind == "b":
        what = f"a boolean mask (dtype {dtype})"
    elif dtype.kind not in "iuf":
        what = f"non-numeric data (dtype {dtype})"
    elif sig.data.ndim == 1:
        what = f"a 1-D line profile of {sig.data.shape[0]} points"
    elif sig.data.ndim > 3:
        what = f"{sig.data.ndim}-D data of shape {sig.data.shape} (e.g. 4D-STEM), not frames"
    elif sig.data.ndim == 0:
        what = "a scalar"
    if what is None:
        return None
    return f"signal {sig.name!r} is {what}, not an image stack (import_signals returns its array)"


def _select(signals: list[ImportedSignal], signal: str | int | None, path: Path) -> ImportedSignal:
    names = [s.name for s in signals]
    if signal is None:
        for s in signals:
            if _why_not_image(s) is None:
                return s
        raise EmdError(f"{path} holds no image signal: " + "; ".join(map(_why_not_image, signals)))
    if isinstance(signal, (int, np.integer)) and not isinstance(signal, bool):
        if not -len(signals) <= signal < len(signals):
            raise EmdError(f"signal index {signal} out of range; {path} holds {names}")
        return signals[int(signal)]
    for s in signals:
        if s.name.lower() == str(signal).lower():
            return s
    raise EmdError(f"{path} has no signal {signal!r}; it holds {names}")


def import_stack(path: str | Path, signal: str | int | None = None) -> ImageStack:
    """An image (stack) of any readable file as an ImageStack (frames first, pixel size in nm).

    ``signal`` picks by name (case-insensitive) or index into :func:`import_signals`; None takes
    the first image signal (line profiles and other non-images skipped).
    """
    p = _existing_file(path)
    if _sniff(p) == "scherzer":
        return _import_ours(p, signal)
    sig = _select(import_signals(p), signal, p)
    return _signal_to_stack(sig, p)


def _import_ours(path: Path, signal: str | int | None) -> ImageStack:
    if isinstance(signal, (int, np.integer)) and not isinstance(signal, bool):
        with _open_ours(path) as f:
            names = _stack_names(f)
        if not -len(names) <= signal < len(names):
            raise EmdError(f"stack index {signal} out of range; {path} holds stacks {names}")
        signal = names[int(signal)]
    return read_stack(path, signal)


def import_stacks(path: str | Path) -> list[ImageStack]:
    """Every image signal of a file as ImageStacks (non-images skipped)."""
    p = _existing_file(path)
    if _sniff(p) == "scherzer":
        return list(read_stacks(p).values())
    return [_signal_to_stack(s, p) for s in import_signals(p) if _why_not_image(s) is None]


def _signal_to_stack(sig: ImportedSignal, path: Path) -> ImageStack:
    reason = _why_not_image(sig)
    if reason is not None:
        raise EmdError(f"{path}: {reason}")
    data, axes = sig.data, list(sig.axes)
    if data.ndim == 2:
        data = data[None]
        axes = [("frame", 1.0, 0.0, ""), *axes]
    notes: list[str] = []
    if axes[1][0].lower() == "x" and axes[2][0].lower() == "y":
        data = np.swapaxes(data, 1, 2)
        axes = [axes[0], axes[2], axes[1]]
        notes.append("axes stored as (x, y) were transposed to (y, x)")
    pixel = tuple(_pixel_nm(ax, notes) for ax in axes[1:])
    n = data.shape[0]
    md = sig.metadata
    times = md.get("frame_times_s")
    frame_ax = axes[0]
    if times is None and frame_ax[3] == "s":
        times = (frame_ax[2] + frame_ax[1] * np.arange(n)).tolist()
    records = [
        FrameRecord(
            index=i,
            time_s=float(times[i]) if times is not None else 0.0,
            exposure_s=float(md.get("exposure_s", math.nan)),
            dwell_us=float(md.get("dwell_us", math.nan)),
            signal=sig.name[:32],
        )
        for i in range(n)
    ]
    instrument_keys = ("voltage_kv", "magnification", "microscope", "camera_length_m",
                       "acquisition_mode", "detector")  # fmt: skip
    instrument = {k: _jsonable(md[k]) for k in instrument_keys if k in md}
    metadata = {
        "source_file": str(path),
        "source_format": sig.source_format,
        "signal": sig.name,
        "axes": [list(a) for a in axes],
        "original": _jsonable({k: v for k, v in md.items() if k not in instrument_keys}),
    }
    if notes:
        metadata["notes"] = notes
    try:
        return ImageStack(
            frames=data, pixel_size_nm=pixel, records=records, instrument=instrument,
            metadata=metadata,
        )  # fmt: skip
    except StackError as exc:
        raise EmdError(f"{path}: signal {sig.name!r} cannot be an ImageStack: {exc}") from exc


def _pixel_nm(axis: tuple[str, float, float, str], notes: list[str]) -> float:
    name, scale, _, units = axis
    size = abs(scale)
    if units == "nm" and size > 0:
        return size
    if units == "" and size > 0:
        notes.append(f"axis {name!r} has no unit; its scale {scale} was taken as nm")
        return size
    notes.append(f"axis {name!r} is calibrated in {units!r} ({scale}); pixel size set to 1 nm")
    return 1.0


# =============================================================================================
# describe
# =============================================================================================


def describe(path: str | Path) -> dict:
    """A JSON-serialisable summary of what a file holds (for ``scherzer info FILE``)."""
    p = _existing_file(path)
    fmt = _sniff(p)
    if fmt == "scherzer":
        return _describe_ours(p)
    signals = []
    for s in import_signals(p):
        signals.append(
            {
                "name": s.name,
                "shape": list(s.data.shape),
                "dtype": str(s.data.dtype),
                "axes": [
                    {"name": a[0], "scale": a[1], "offset": a[2], "units": a[3]} for a in s.axes
                ],
                "is_image": _why_not_image(s) is None,
                "metadata": _jsonable(s.metadata),
            }
        )
    return _jsonable({"path": str(p), "format": _FORMAT_NAMES.get(fmt, fmt), "signals": signals})


def _describe_ours(path: Path) -> dict:
    with _open_read(path) as f:
        out: dict[str, Any] = {
            "path": str(path),
            "format": "scherzer-emd",
            "emd_version": f"{f.attrs['version_major']}.{f.attrs['version_minor']}",
            "creator": _attr_str(f, "creator"),
            "instrument": _read_attrs(f["microscope"]) if "microscope" in f else {},
            "data": {name: _describe_group(f, name, g) for name, g in f["data"].items()},
            "tables": {
                name: {"rows": int(ds.shape[0]), "columns": list(ds.dtype.names or ())}
                for name, ds in f.get("tables", {}).items()
            },
            "processing": {step: _read_attrs(g) for step, g in f.get("processing", {}).items()},
            "processing_summary": {
                step: json.loads(g.attrs["scherzer_summary"])
                for step, g in f.get("processing", {}).items()
                if "scherzer_summary" in g.attrs
            },
        }
    return _jsonable(out)


def _describe_group(f: h5py.File, name: str, g: h5py.Group) -> dict:
    ds = g["data"]
    kind = str(g.attrs.get("scherzer_kind", ""))
    axes = _dims_axes(g, ds.ndim)
    info: dict[str, Any] = {
        "kind": kind,
        "shape": list(ds.shape),
        "dtype": str(ds.dtype),
        "dims": [{"name": a[0], "step": a[1], "offset": a[2], "units": a[3]} for a in axes],
    }
    if kind == "stack":
        n = _complete_rows(g)
        info["frames_complete"] = n
        info["pixel_size_nm"] = [float(v) for v in g.attrs["pixel_size_nm"]]
        info["intensity_units"] = _attr_str(g, "intensity_units")
        info["records"] = _records_summary(g["records"][:n])
        md = f.get(f"metadata/{name}")
        info["metadata"] = _read_attrs(md) if md is not None else {}
        truth = f.get(f"ground_truth/{name}", {})
        info["ground_truth"] = {
            k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in truth.items()
        }
    else:
        info["attrs"] = _read_attrs(g, skip=_RESERVED_ATTRS)
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
