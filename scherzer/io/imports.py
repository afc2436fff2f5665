"""Import of files other programs wrote (and of ours, read the same way): identifying the format
by content (:func:`sniff`), every signal as stored (:func:`import_signals`), and image signals
as ImageStacks (:func:`import_stack`, :func:`import_stacks`).

Formats: Scherzer EMD (this package), Berkeley EMD (h5py; data as stored, ``dimK`` for axis K-1;
other layouts through rosettasciio), Velox EMD, HyperSpy ``.hspy``/``.hdf5`` and ``.zspy``
(a zarr folder or zip), DM3/DM4 and TIA ``.emi``/``.ser`` (rosettasciio), TIFF (rosettasciio,
plus ImageJ's length unit from tifffile), ``.npy`` (uncalibrated, no pickles). Signals keep the
navigation (frame) axis first; lengths are converted to nm (:mod:`scherzer.io.axes`).

Orientation: an ImageStack's frames are (n, y, x). Berkeley EMD written by HyperSpy/rosettasciio
(data under ``/signals/<title>``, two-value ``dimK`` vectors) is stored transposed — a
(n, y, x) signal as (x, y, n) — and is transposed back whole; a stack whose last two axes are
named (x, y) is transposed back to (y, x).

Memory: every reader checks the declared shapes against a read budget before it allocates
(:mod:`scherzer.io.budget`); rosettasciio formats are opened lazily for that check.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from scherzer.io.axes import Axis, axis_in_nm, dims_axes
from scherzer.io.budget import ReadBudget
from scherzer.io.emd import complete_rows, read_stack, read_stacks, stack_names
from scherzer.io.errors import EmdError, existing_file
from scherzer.io.hdf5 import is_ours, jsonable, open_ours, open_read, read_attrs
from scherzer.io.metadata import hyperspy_metadata, instrument_metadata, tia_frame_times
from scherzer.io.rsciio_reader import read_checked, rsciio_module
from scherzer.stack import (
    RECORD_DTYPE,
    FrameRecord,
    ImageStack,
    StackError,
    records_from_array,
)

__all__ = [
    "FORMAT_NAMES",
    "ImportedSignal",
    "existing_input",
    "import_signals",
    "import_stack",
    "import_stacks",
    "sniff",
    "why_not_image",
]

#: First bytes of the formats recognised by content.
_NPY_MAGIC = b"\x93NUMPY"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, LE/BE
_DM_MAGICS = (b"\x00\x00\x00\x03", b"\x00\x00\x00\x04")  # DM3 / DM4 version word
_ZIP_MAGIC = b"PK\x03\x04"
_ZSPY_SUFFIX = ".zspy"
#: Parent group of the signals rosettasciio's (HyperSpy's) Berkeley EMD writer stores transposed.
_RSCIIO_EMD_PARENT = "signals"
#: rosettasciio writes each ``dimK`` as [offset, offset + scale] whatever the axis length.
_RSCIIO_DIM_VALUES = 2
_SNIFF_BYTES = 8
#: Longest signal name a FrameRecord holds (its ``signal`` column is S32).
_RECORD_SIGNAL_CHARS = 32
#: Instrument keys an imported stack carries in ``ImageStack.instrument``.
_INSTRUMENT_KEYS = ("voltage_kv", "magnification", "microscope", "camera_length_m",
                    "acquisition_mode", "detector")  # fmt: skip

#: ``source_format`` reported for each sniffed format read through rosettasciio or h5py.
FORMAT_NAMES = {
    "velox": "velox-emd",
    "berkeley": "berkeley-emd",
    "hspy": "hyperspy",
    "zspy": "hyperspy-zspy",
    "dm": "digitalmicrograph",
    "tia": "tia",
    "tiff": "tiff",
}


@dataclass
class ImportedSignal:
    """One signal of a file, as stored (frame axis first), with calibrations in nm.

    ``axes`` is one ``(name, scale, offset, units)`` per array axis; lengths are in nm.
    ``metadata`` holds what was found: ``voltage_kv``, ``magnification``, ``dwell_us``,
    ``exposure_s``, ``detector``, ``microscope``, ``frame_times_s``, ``title``, … (JSON-able).
    ``records``: Scherzer's per-frame table (``scherzer.stack.RECORD_DTYPE`` columns, one row per
    frame) when the file carries it — a HyperSpy file saved from one of ours keeps it in
    ``original_metadata.records``; else None.
    """

    data: np.ndarray
    name: str
    axes: list[Axis]
    metadata: dict[str, Any] = field(default_factory=dict)
    source_format: str = ""
    records: np.ndarray | None = None


def _sniff_hdf5(path: Path) -> str:
    with open_read(path) as f:
        if is_ours(f):
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


def existing_input(path: str | Path) -> Path:
    """``path`` if it names an existing file, or a HyperSpy ``.zspy`` folder (zarr)."""
    p = Path(path)
    if p.is_dir() and p.suffix.lower() == _ZSPY_SUFFIX:
        return p
    return existing_file(p)


def sniff(path: Path) -> str:
    """The file's format from its content (and, for TIA and zspy, its name)."""
    suffix = path.suffix.lower()
    if path.is_dir():
        return "zspy"  # existing_input admits no other folder
    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    if h5py.is_hdf5(path):
        return _sniff_hdf5(path)
    if head.startswith(_ZIP_MAGIC) and suffix == _ZSPY_SUFFIX:
        return "zspy"
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    if head[:4] in _DM_MAGICS and suffix in (".dm3", ".dm4"):
        return "dm"
    if suffix in (".emi", ".ser"):
        return "tia"
    raise EmdError(
        f"unrecognised file format for {path} (first bytes {head!r}); readable: Scherzer/"
        "Berkeley/Velox EMD, HyperSpy .hspy/.hdf5/.zspy, DM3/DM4, TIA .emi/.ser, TIFF, .npy"
    )


def import_signals(path: str | Path, *, max_bytes: int | None = None) -> list[ImportedSignal]:
    """Every signal of any readable file: data as stored (frame axis first), axes in nm.
    ``max_bytes``: the read budget for all signals together (None = a fraction of the
    available memory); a file declaring more raises MemoryBudgetError before allocating."""
    p = existing_input(path)
    budget = ReadBudget.of(max_bytes)
    fmt = sniff(p)
    readers = {
        "scherzer": _signals_ours,
        "berkeley": _signals_berkeley,
        "velox": _signals_rsciio,
        "hspy": _signals_rsciio,
        "zspy": _signals_rsciio,
        "dm": _signals_rsciio,
        "tia": _signals_rsciio,
        "tiff": _signals_tiff,
        "npy": _signals_npy,
    }
    signals = readers[fmt](p, fmt, budget)
    if not signals:
        hint = ""
        if fmt == "tia" and p.suffix.lower() == ".emi":
            hint = f" (the data live in {p.stem}_1.ser beside the .emi; is it missing?)"
        raise EmdError(f"{p} holds no signals that could be read{hint}")
    return signals


def _signals_ours(path: Path, fmt: str, budget: ReadBudget) -> list[ImportedSignal]:
    out = []
    with open_read(path) as f:
        instrument = read_attrs(f["microscope"]) if "microscope" in f else {}
        for name, g in f["data"].items():
            ds = g["data"]
            stack = g.attrs.get("scherzer_kind") == "stack"
            shape = (complete_rows(g), *ds.shape[1:]) if stack else ds.shape
            budget.take(shape, ds.dtype, f"{name!r} in {path}")
            data = ds[: shape[0]] if stack else ds[()]
            md = {k: instrument[k] for k in ("voltage_kv", "magnification") if k in instrument}
            md["kind"] = str(g.attrs.get("scherzer_kind", ""))
            out.append(ImportedSignal(data, name, dims_axes(g, data.ndim), md, "scherzer-emd"))
    return out


def _emd_groups(f: h5py.File) -> list[tuple[str, h5py.Group]]:
    """Every group with a true ``emd_group_type`` and a ``data`` dataset, in visiting order."""
    found: list[tuple[str, h5py.Group]] = []

    def visit(name: str, obj: Any) -> None:
        if (
            isinstance(obj, h5py.Group)
            and obj.attrs.get("emd_group_type", 0)
            and isinstance(obj.get("data"), h5py.Dataset)
        ):
            found.append((name, obj))

    f.visititems(visit)
    return found


def _written_by_rsciio(name: str, g: h5py.Group, ndim: int) -> bool:
    """Whether an EMD group is rosettasciio's (HyperSpy's) layout, stored transposed: it sits
    at ``/signals/<title>`` and every ``dimK`` holds just [offset, offset + scale]."""
    parent = name.rsplit("/", 1)[0] if "/" in name else ""
    if parent != _RSCIIO_EMD_PARENT or ndim == 0:
        return False
    dims = [g.get(f"dim{k + 1}") for k in range(ndim)]
    return all(isinstance(d, h5py.Dataset) and d.size == _RSCIIO_DIM_VALUES for d in dims)


def _signals_berkeley(path: Path, fmt: str, budget: ReadBudget) -> list[ImportedSignal]:
    """Berkeley EMD (ncempy, py4DSTEM, HyperSpy): every ``emd_group_type`` group's ``data``,
    in stored (C) order with dim1 describing axis 0 — except rosettasciio's transposed layout,
    which is transposed back. Other layouts go through rosettasciio."""
    with open_read(path) as f:
        found = _emd_groups(f)
        if not found:
            return _signals_rsciio(path, fmt, budget)
        om = {grp: read_attrs(f[grp]) for grp in ("microscope", "sample", "user") if grp in f}
        out = []
        for name, g in found:
            ds = g["data"]
            budget.take(ds.shape, ds.dtype, f"{name!r} in {path}")
            data, axes = ds[()], dims_axes(g, ds.ndim)
            if _written_by_rsciio(name, g, ds.ndim):
                data, axes = np.ascontiguousarray(data.T), axes[::-1]
            md = instrument_metadata(om, None, "berkeley")
            title = name.rsplit("/", 1)[-1]
            md["title"] = title
            out.append(ImportedSignal(data, title, axes, md, "berkeley-emd"))
    return out


def _signals_rsciio(path: Path, fmt: str, budget: ReadBudget) -> list[ImportedSignal]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dicts = read_checked(rsciio_module(fmt), fmt, path, budget)
        except EmdError:
            raise
        except Exception as exc:
            raise EmdError(f"cannot read {path} as {fmt}: {type(exc).__name__}: {exc}") from exc
    return [_from_rsciio(d, fmt, i, _stem(path)) for i, d in enumerate(dicts)]


def _stem(path: Path) -> str:
    """A file's name without suffix (and without TIA's ``_1`` series suffix)."""
    stem = path.stem
    return stem[:-2] if path.suffix.lower() == ".ser" and stem.endswith("_1") else stem


#: Flags tifffile sets on a TIFF that holds nothing but the pixels (a stack written by tifffile
#: or numpy-minded tools): such a file carries no calibration for rosettasciio to interpret.
_PLAIN_TIFF_FLAGS = frozenset({"uniform", "shaped"})
_UNIT_RESOLUTION = ((1, 1), 1.0, (1.0, 1.0))  # XResolution as tifffile reports "no calibration"


def _plain_tiff(path: Path, budget: ReadBudget) -> dict | None:
    """The signal dict rosettasciio would give for an uncalibrated single-series TIFF (axes of
    scale 1 without units, tags as original metadata), read by tifffile alone — rosettasciio's
    reader pulls in dask, about a quarter of a cold ``scherzer align``. None for any other TIFF
    (calibrated, ImageJ, vendor metadata, several series): rosettasciio reads those."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        if len(tf.series) != 1 or not set(tf.flags) <= _PLAIN_TIFF_FLAGS:
            return None
        page, series = tf.pages.first, tf.series[0]
        xres = page.tags.get("XResolution")
        if xres is not None and xres.value not in _UNIT_RESOLUTION:
            return None
        shape = tuple(int(n) for n in series.shape)
        if len(shape) not in (2, 3) or page.samplesperpixel != 1:
            return None
        budget.take(shape, series.dtype, str(path))
        data = series.asarray()
        om = {tag.name: tag.value for tag in page.tags}
    names = ["None", "height", "width"][-len(shape) :]
    axes = [
        {"size": n, "name": names[k], "scale": 1.0, "offset": 0.0, "units": None,
         "navigate": len(shape) == 3 and k == 0}
        for k, n in enumerate(shape)
    ]  # fmt: skip
    metadata = {"General": {"original_filename": path.name}, "Signal": {"signal_type": ""}}
    return {"data": data, "axes": axes, "metadata": metadata, "original_metadata": om}


def _signals_tiff(path: Path, fmt: str, budget: ReadBudget) -> list[ImportedSignal]:
    import tifffile

    try:
        plain = _plain_tiff(path, budget)
    except EmdError:
        raise
    except Exception:  # anything tifffile alone cannot read: rosettasciio's turn
        plain = None
    if plain is not None:
        return [_from_rsciio(plain, fmt, 0, _stem(path))]
    from rsciio import tiff

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dicts = read_checked(tiff, "tiff", path, budget)
        except EmdError:
            raise
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


def _signals_npy(path: Path, fmt: str, budget: ReadBudget) -> list[ImportedSignal]:
    try:
        with open(path, "rb") as fh:  # the header first: shape and dtype, no data
            version = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(fh)
    except ValueError as exc:
        raise EmdError(f"cannot read {path} as .npy: {exc}") from exc
    budget.take(shape, dtype, f"{path}")
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise EmdError(f"cannot read {path} as .npy (object arrays are refused): {exc}") from exc
    axes = [(name, 1.0, 0.0, "") for name in _default_axis_names(data.ndim)]
    return [ImportedSignal(data, path.stem, axes, {"title": path.stem}, "npy")]


def _default_axis_names(ndim: int) -> list[str]:
    tail = ["y", "x"][-ndim:] if ndim else []
    return [f"axis{k}" if ndim > 3 else "frame" for k in range(ndim - len(tail))] + tail


def _navigation_first(data: np.ndarray, raw_axes: list[dict]) -> tuple[np.ndarray, list[dict]]:
    """Data and axes reordered so that navigation axes come first (signal axes keep order)."""
    nav = [i for i, a in enumerate(raw_axes) if a.get("navigate")]
    order = nav + [i for i in range(data.ndim) if i not in nav]
    if order != list(range(data.ndim)):
        data = np.transpose(data, order)
        raw_axes = [raw_axes[i] for i in order]
    return data, raw_axes


def _from_rsciio(d: dict, fmt: str, index: int, stem: str) -> ImportedSignal:
    data = np.asarray(d["data"])
    raw_axes = sorted(d["axes"], key=lambda a: a.get("index_in_array", 0))
    if len(raw_axes) != data.ndim:  # some readers index axes differently; trust the order
        raw_axes = list(d["axes"])
    data, raw_axes = _navigation_first(data, raw_axes)
    names = _default_axis_names(data.ndim)
    axes = [
        axis_in_nm(
            a.get("name") or names[k], a.get("scale", 1.0), a.get("offset", 0.0), a.get("units")
        )
        for k, a in enumerate(raw_axes)
    ]
    md = instrument_metadata(d.get("original_metadata") or {}, d.get("mapping"), fmt)
    for key, value in hyperspy_metadata(d.get("metadata") or {}).items():
        md.setdefault(key, value)
    general = (d.get("metadata") or {}).get("General", {})
    for key in ("title", "date", "time", "original_filename"):
        if general.get(key):
            md[key] = str(general[key])
    if fmt == "tia":
        md.update(tia_frame_times(d.get("original_metadata") or {}, data.shape[0]))
    name = md.get("title") or md.get("detector") or (stem if index == 0 else f"{stem}_{index}")
    records = _our_records(d.get("original_metadata") or {}, data.shape[0] if data.ndim else 0)
    return ImportedSignal(data, str(name), axes, md, FORMAT_NAMES[fmt], records)


def _our_records(om: dict, n: int) -> np.ndarray | None:
    """Our per-frame records from ``original_metadata.records`` (a HyperSpy file saved from
    one of ours), when it has every column and at least one row per frame."""
    table = om.get("records")
    if not isinstance(table, np.ndarray) or table.dtype.names is None or n == 0:
        return None
    if not set(RECORD_DTYPE.names) <= set(table.dtype.names) or table.shape[0] < n:
        return None
    out = np.zeros(n, dtype=RECORD_DTYPE)
    for col in RECORD_DTYPE.names:
        out[col] = table[col][:n]
    return out


# =============================================================================================
# Imported signals as ImageStacks
# =============================================================================================


def _what_kind(sig: ImportedSignal) -> str | None:
    """What a signal that is not an image (stack) is, or None if it is one."""
    dtype = sig.data.dtype
    if dtype.names is not None:
        fields = set(dtype.names)
        kind = (
            "RGBA" if {"R", "G", "B", "A"} <= fields else "RGB" if {"R", "G", "B"} <= fields else ""
        )
        return f"a {kind or 'structured'} colour image (dtype {dtype}), a display rendering"
    if dtype.kind == "c":
        return f"complex data (dtype {dtype}), e.g. an FFT or a complex wave"
    if dtype.kind == "b":
        return f"a boolean mask (dtype {dtype})"
    if dtype.kind not in "iuf":
        return f"non-numeric data (dtype {dtype})"
    if sig.data.ndim == 1:
        return f"a 1-D line profile of {sig.data.shape[0]} points"
    if sig.data.ndim > 3:
        return f"{sig.data.ndim}-D data of shape {sig.data.shape} (e.g. 4D-STEM), not frames"
    if sig.data.ndim == 0:
        return "a scalar"
    return None


def why_not_image(sig: ImportedSignal) -> str | None:
    """Why a signal is not an image (stack), or None if it is one."""
    what = _what_kind(sig)
    if what is None:
        return None
    return f"signal {sig.name!r} is {what}, not an image stack (import_signals returns its array)"


def _select(signals: list[ImportedSignal], signal: str | int | None, path: Path) -> ImportedSignal:
    names = [s.name for s in signals]
    if signal is None:
        for s in signals:
            if why_not_image(s) is None:
                return s
        raise EmdError(f"{path} holds no image signal: " + "; ".join(map(why_not_image, signals)))
    if isinstance(signal, (int, np.integer)) and not isinstance(signal, bool):
        if not -len(signals) <= signal < len(signals):
            raise EmdError(f"signal index {signal} out of range; {path} holds {names}")
        return signals[int(signal)]
    for s in signals:
        if s.name.lower() == str(signal).lower():
            return s
    raise EmdError(f"{path} has no signal {signal!r}; it holds {names}")


def import_stack(
    path: str | Path, signal: str | int | None = None, *, max_bytes: int | None = None
) -> ImageStack:
    """An image (stack) of any readable file as an ImageStack (frames first, pixel size in nm).

    ``signal`` picks by name (case-insensitive) or index into :func:`import_signals`; None takes
    the first image signal (line profiles and other non-images skipped). ``max_bytes``: the read
    budget (None = a fraction of the available memory).
    """
    p = existing_input(path)
    if sniff(p) == "scherzer":
        return _import_ours(p, signal, max_bytes)
    sig = _select(import_signals(p, max_bytes=max_bytes), signal, p)
    return _signal_to_stack(sig, p)


def _import_ours(path: Path, signal: str | int | None, max_bytes: int | None) -> ImageStack:
    if isinstance(signal, (int, np.integer)) and not isinstance(signal, bool):
        with open_ours(path) as f:
            names = stack_names(f)
        if not -len(names) <= signal < len(names):
            raise EmdError(f"stack index {signal} out of range; {path} holds stacks {names}")
        signal = names[int(signal)]
    return read_stack(path, signal, max_bytes=max_bytes)


def import_stacks(path: str | Path, *, max_bytes: int | None = None) -> list[ImageStack]:
    """Every image signal of a file as ImageStacks (non-images skipped), within one read
    budget ``max_bytes`` (None = a fraction of the available memory)."""
    p = existing_input(path)
    if sniff(p) == "scherzer":
        return list(read_stacks(p, max_bytes=max_bytes).values())
    signals = import_signals(p, max_bytes=max_bytes)
    return [_signal_to_stack(s, p) for s in signals if why_not_image(s) is None]


def _frames_yx(data: np.ndarray, axes: list[Axis], notes: list[str]) -> tuple[np.ndarray, list]:
    """Frames (n, y, x): a 2-D image gains a frame axis; (x, y) axes are transposed to (y, x)."""
    if data.ndim == 2:
        data = data[None]
        axes = [("frame", 1.0, 0.0, ""), *axes]
    if axes[1][0].lower() == "x" and axes[2][0].lower() == "y":
        data = np.swapaxes(data, 1, 2)
        axes = [axes[0], axes[2], axes[1]]
        notes.append("axes stored as (x, y) were transposed to (y, x)")
    return data, axes


def _records(sig: ImportedSignal, frame_axis: Axis, n: int) -> list[FrameRecord]:
    """One record per frame: our own records if the file carries them, else times (TIA stamps
    or a frame axis in s), exposure/dwell and the signal name."""
    if sig.records is not None and sig.records.shape[0] == n:
        return records_from_array(sig.records)
    md = sig.metadata
    times = md.get("frame_times_s")
    if times is None and frame_axis[3] == "s":
        times = (frame_axis[2] + frame_axis[1] * np.arange(n)).tolist()
    return [
        FrameRecord(
            index=i,
            time_s=float(times[i]) if times is not None else 0.0,
            exposure_s=float(md.get("exposure_s", math.nan)),
            dwell_us=float(md.get("dwell_us", math.nan)),
            signal=sig.name[:_RECORD_SIGNAL_CHARS],
        )
        for i in range(n)
    ]


def _signal_to_stack(sig: ImportedSignal, path: Path) -> ImageStack:
    reason = why_not_image(sig)
    if reason is not None:
        raise EmdError(f"{path}: {reason}")
    notes: list[str] = []
    data, axes = _frames_yx(sig.data, list(sig.axes), notes)
    pixel = tuple(_pixel_nm(ax, notes) for ax in axes[1:])
    records = _records(sig, axes[0], data.shape[0])
    md = sig.metadata
    instrument = {k: jsonable(md[k]) for k in _INSTRUMENT_KEYS if k in md}
    metadata = {
        "source_file": str(path),
        "source_format": sig.source_format,
        "signal": sig.name,
        "axes": [list(a) for a in axes],
        "original": jsonable({k: v for k, v in md.items() if k not in _INSTRUMENT_KEYS}),
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


def _pixel_nm(axis: Axis, notes: list[str]) -> float:
    name, scale, _, units = axis
    size = abs(scale)
    if units == "nm" and size > 0:
        return size
    if units == "" and size > 0:
        notes.append(f"axis {name!r} has no unit; its scale {scale} was taken as nm")
        return size
    notes.append(f"axis {name!r} is calibrated in {units!r} ({scale}); pixel size set to 1 nm")
    return 1.0
