"""HyperSpy's own layout inside our files, so a plain ``hs.load(path)`` gives calibrated signals.

Every Scherzer file is at once Berkeley EMD 1.0 (``/data/<name>``, for ncempy/py4DSTEM) and a
HyperSpy file in rosettasciio's "HSPY" format 3.3: root attributes ``file_format="HyperSpy"``,
``file_format_version="3.3"``, and one ``/Experiments/<name>`` group per stack or result whose
``data`` is an HDF5 *soft link* to ``/data/<name>/data`` — the frames are stored once. (Soft, not
hard, links: readers that walk the file object by object — rosettasciio's and ncempy's EMD
readers — visit a hard-linked dataset under one name only, the lexicographically first,
``/Experiments/...``, and would then miss the EMD group; soft links they skip.)

Each experiment holds what HyperSpy's reader expects:

* ``axis-0..axis-N`` (attributes ``name``, ``scale``, ``offset``, ``size``, ``units``,
  ``navigate``): for a stack (n, y, x) the frame axis navigates (or the calibrated quantity the
  stack is a series over, e.g. "Energy loss" in eV for EFTEM) and y/x (nm) are the signal axes,
  so HyperSpy builds a ``Signal2D`` (a ``ComplexSignal2D`` for complex data such as exit waves);
  for a result the last two axes are the signal axes (the last one for 1-D results);
* ``metadata``: ``General`` (title, date, time, time_zone), ``Signal`` (signal_type, quantity,
  signal_origin) and ``Acquisition_instrument.TEM`` as HyperSpy defines them (beam_energy keV,
  convergence_angle mrad, camera_length mm, magnification, microscope, acquisition_mode,
  exposure s or dwell_time s, ``Detector.name``) plus ``Cs`` in mm;
* ``original_metadata``: ``records`` (a soft link to the per-frame records table: time, nominal
  and read-back defocus, scan rotation, exposure/dwell, dose, signal), ``instrument`` and, for
  stacks, ``metadata`` (the stack's free metadata); for results, ``attrs``.

HyperSpy takes the frame count from ``axis-0``'s ``size``. A :class:`~scherzer.io.emd.StackWriter`
rewrites it in place after every append (an existing attribute may be modified in SWMR mode; a
new one may not be created) and writes the record-derived TEM metadata when it closes;
:func:`scherzer.io.swmr.repair` trims and re-counts the files a killed writer left.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from scherzer.io.hdf5 import json_default

__all__ = [
    "EXPERIMENTS",
    "HSPY_FILE_FORMAT",
    "HSPY_FORMAT_VERSION",
    "add_result_view",
    "add_stack_view",
    "remove_view",
    "set_frame_count",
    "tem_metadata",
    "update_stack_view",
]

HSPY_FILE_FORMAT = "HyperSpy"
#: rosettasciio's current hspy format version (``rsciio._hierarchical.version``).
HSPY_FORMAT_VERSION = "3.3"
EXPERIMENTS = "Experiments"
#: How HyperSpy's hspy format stores None.
_NONE = "_None_"
#: Images: the last two axes of a result are HyperSpy signal axes (y, x).
_IMAGE_SIGNAL_AXES = 2
_MM_PER_M = 1e3
_S_PER_US = 1e-6
_SIGNAL_COLUMN = "signal"
SIMULATED_MICROSCOPE = "Scherzer virtual microscope (simulated)"


# --- writing HyperSpy's dictionary convention ---------------------------------------------------


def _key(key: Any) -> str:
    """An HDF5-safe name for a dictionary key ('/' would make a path)."""
    return str(key).replace("/", "_") or "_"


def _attr_value(value: Any) -> Any:
    """A value as HyperSpy's hspy format stores an attribute (None as "_None_", JSON fallback)."""
    if value is None:
        return _NONE
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value
    if isinstance(value, (list, tuple)):
        arr = np.asarray(value) if value else None
        if arr is not None and arr.dtype.kind in "iuf":
            return arr
    return json.dumps(value, default=json_default)


def write_tree(group: h5py.Group, values: Mapping[str, Any]) -> None:
    """A nested dict as HyperSpy stores one: dicts as subgroups, leaves as attributes."""
    for key, value in values.items():
        if isinstance(value, Mapping):
            write_tree(group.require_group(_key(key)), value)
        else:
            group.attrs[_key(key)] = _attr_value(value)


# --- the metadata HyperSpy defines --------------------------------------------------------------


def _general(title: str) -> dict[str, Any]:
    now = _dt.datetime.now().astimezone()
    offset = now.strftime("%z")  # +HHMM
    return {
        "title": title,
        "date": now.date().isoformat(),
        "time": now.time().replace(microsecond=0).isoformat(),
        "time_zone": f"{offset[:3]}:{offset[3:]}" if offset else "UTC",
    }


def _signal(instrument: Mapping[str, Any], quantity: str) -> dict[str, Any]:
    origin = "simulation" if instrument.get("simulated") else "experiment"
    return {"signal_type": "", "quantity": quantity, "signal_origin": origin}


def _number(*values: Any) -> float | None:
    for value in values:
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                return float(value)
    return None


def _first_finite(table: np.ndarray | None, column: str) -> float | None:
    if table is None or table.dtype.names is None or column not in table.dtype.names:
        return None
    values = np.asarray(table[column], dtype=float)
    finite = values[np.isfinite(values)]
    return float(finite[0]) if finite.size else None


def _detector(table: np.ndarray | None) -> str | None:
    if table is None or not len(table) or _SIGNAL_COLUMN not in (table.dtype.names or ()):
        return None
    value = table[_SIGNAL_COLUMN][0]
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text or None


def _instrument_values(instrument: Mapping[str, Any], optics: Mapping[str, Any]) -> dict:
    """The TEM values that do not depend on the frames (None where unknown)."""
    camera_length_m = _number(instrument.get("camera_length_m"))
    return {
        "beam_energy": _number(instrument.get("voltage_kv"), optics.get("voltage_kv")),
        "Cs": _number(instrument.get("cs_mm"), optics.get("cs_mm")),
        "magnification": _number(instrument.get("magnification")),
        "camera_length": _number(
            instrument.get("camera_length_mm"),
            None if camera_length_m is None else _MM_PER_M * camera_length_m,
        ),
    }


def _microscope(instrument: Mapping[str, Any]) -> str | None:
    microscope = instrument.get("microscope")
    if isinstance(microscope, str) and microscope:
        return microscope
    return SIMULATED_MICROSCOPE if instrument.get("simulated") else None


def tem_metadata(instrument: Mapping[str, Any], records: np.ndarray | None = None) -> dict:
    """``Acquisition_instrument.TEM`` from our instrument dict and (if given) the records.

    Units as HyperSpy defines them: beam_energy keV (= the accelerating voltage in kV),
    convergence_angle mrad (the STEM probe semi-angle; for camera frames the beam divergence
    when known), camera_length mm, exposure and dwell_time s. ``Cs`` (mm) is our addition.
    """
    optics = instrument.get("optics")
    optics = optics if isinstance(optics, Mapping) else {}
    exposure_s = _first_finite(records, "exposure_s")
    dwell_us = _first_finite(records, "dwell_us")
    mode = "STEM" if dwell_us is not None else "TEM" if exposure_s is not None else None
    if mode is None and isinstance(instrument.get("acquisition_mode"), str):
        mode = instrument["acquisition_mode"]
    divergence = _number(optics.get("beam_divergence_mrad"))
    probe = _number(instrument.get("convergence_mrad"))
    detector = _detector(records) or instrument.get("detector")
    found = {
        **_instrument_values(instrument, optics),
        "convergence_angle": divergence if mode == "TEM" and divergence else probe,
        "acquisition_mode": mode,
        "dwell_time": None if dwell_us is None else dwell_us * _S_PER_US,
        "exposure": exposure_s if dwell_us is None else None,
        "microscope": _microscope(instrument),
        "Detector": {"name": detector} if isinstance(detector, str) and detector else None,
    }
    return {k: v for k, v in found.items() if v is not None}


# --- experiments ----------------------------------------------------------------------------------


def _experiments(f: h5py.File) -> h5py.Group:
    """``/Experiments`` (creation-ordered), marking the file as HyperSpy's format."""
    f.attrs["file_format"] = HSPY_FILE_FORMAT
    f.attrs["file_format_version"] = HSPY_FORMAT_VERSION
    if EXPERIMENTS not in f:
        f.create_group(EXPERIMENTS, track_order=True)
    return f[EXPERIMENTS]


def remove_view(f: h5py.File, name: str) -> None:
    """Drop ``/Experiments/<name>`` (before its data group is replaced)."""
    exps = f.get(EXPERIMENTS)
    if exps is not None and name in exps:
        del exps[name]


def _write_axis(
    exp: h5py.Group, index: int, axis: tuple[str, float, float, str], size: int, navigate: bool
) -> None:
    name, scale, offset, units = axis
    g = exp.create_group(f"axis-{index}")
    g.attrs["_type"] = "UniformDataAxis"
    g.attrs["name"] = name or _NONE
    g.attrs["scale"] = float(scale)
    g.attrs["offset"] = float(offset)
    g.attrs["size"] = int(size)
    g.attrs["units"] = units or _NONE
    g.attrs["navigate"] = np.bool_(navigate)
    g.attrs["is_binned"] = np.False_


def _new_experiment(f: h5py.File, name: str, data: h5py.Dataset) -> h5py.Group:
    exp = _experiments(f).create_group(name)
    exp["data"] = h5py.SoftLink(data.name)  # the same dataset, stored once
    return exp


def _frame_axis(group: h5py.Group) -> tuple[str, float, float, str]:
    """The navigation axis of a stack: the frame index, or the calibrated quantity its ``dim1``
    holds (``scale``/``offset`` attributes, e.g. energy loss in eV)."""
    dim = group.get("dim1")
    if dim is None or "scale" not in dim.attrs:
        return ("frame", 1.0, 0.0, "")
    name, units = (dim.attrs.get(k, "") for k in ("name", "units"))
    name, units = (v.decode() if isinstance(v, bytes) else str(v) for v in (name, units))
    return (name, float(dim.attrs["scale"]), float(dim.attrs["offset"]), units)


def add_stack_view(
    f: h5py.File,
    name: str,
    group: h5py.Group,
    *,
    instrument: Mapping[str, Any],
    metadata: Mapping[str, Any],
    intensity_units: str,
) -> None:
    """``/Experiments/<name>`` for the stack group ``/data/<name>``: a Signal2D stack."""
    remove_view(f, name)
    data = group["data"]
    n, ny, nx = data.shape
    py, px = (float(v) for v in group.attrs["pixel_size_nm"])
    exp = _new_experiment(f, name, data)
    _write_axis(exp, 0, _frame_axis(group), n, navigate=True)
    _write_axis(exp, 1, ("y", py, 0.0, "nm"), ny, navigate=False)
    _write_axis(exp, 2, ("x", px, 0.0, "nm"), nx, navigate=False)
    records = group["records"][:n]
    md = {
        "General": _general(name),
        "Signal": _signal(instrument, f"Intensity ({intensity_units})"),
        "Acquisition_instrument": {"TEM": tem_metadata(instrument, records)},
    }
    write_tree(exp.create_group("metadata"), md)
    om = exp.create_group("original_metadata")
    om["records"] = h5py.SoftLink(group["records"].name)  # grows with the acquisition
    write_tree(om.create_group("instrument"), dict(instrument))
    write_tree(om.create_group("metadata"), dict(metadata))


def set_frame_count(f: h5py.File, name: str, n: int) -> None:
    """The frame count of a stack's view (``axis-0`` size), rewritten in place: modifying an
    existing attribute is allowed while the file is in SWMR mode, creating one is not."""
    exps = f.get(EXPERIMENTS)
    if exps is not None and name in exps:
        exps[name]["axis-0"].attrs.modify("size", np.int64(n))


def update_stack_view(f: h5py.File, name: str, instrument: Mapping[str, Any]) -> None:
    """Frame count and record-derived metadata of a stack's view, after frames were appended."""
    exps = f.get(EXPERIMENTS)
    if exps is None or name not in exps:
        return
    exp = exps[name]
    n = int(exp["data"].shape[0])
    exp["axis-0"].attrs["size"] = n
    tem_path = "metadata/Acquisition_instrument/TEM"
    if tem_path in exp:
        del exp[tem_path]
    records = exp["original_metadata/records"][:n]
    write_tree(exp.require_group(tem_path), tem_metadata(instrument, records))


def add_result_view(
    f: h5py.File,
    name: str,
    group: h5py.Group,
    *,
    axes: Sequence[tuple[str, float, float, str]],
    attrs: Mapping[str, Any],
    instrument: Mapping[str, Any],
) -> None:
    """``/Experiments/<name>`` for a result: the last two axes are signal axes (one for 1-D)."""
    remove_view(f, name)
    data = group["data"]
    exp = _new_experiment(f, name, data)
    n_signal = min(data.ndim, _IMAGE_SIGNAL_AXES)
    for k, (axis, size) in enumerate(zip(axes, data.shape, strict=True)):
        _write_axis(exp, k, axis, size, navigate=k < data.ndim - n_signal)
    md = {
        "General": _general(name),
        "Signal": _signal(instrument, ""),
        "Acquisition_instrument": {"TEM": tem_metadata(instrument)},
    }
    write_tree(exp.create_group("metadata"), md)
    om = exp.create_group("original_metadata")
    write_tree(om.create_group("attrs"), dict(attrs))
    write_tree(om.create_group("instrument"), dict(instrument))
