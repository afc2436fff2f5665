"""Vendor metadata: the instrument values Scherzer uses, found in a reader's original metadata
(Velox, DigitalMicrograph, TIA, Berkeley EMD groups) or in HyperSpy's mapped metadata.

Returned keys carry their units: ``voltage_kv``, ``magnification``, ``dwell_us``,
``exposure_s``, ``camera_length_m``, text ``microscope``, ``detector``, ``acquisition_mode``, and
``frame_times_s`` (seconds since the first frame) for TIA series. Keys of the original metadata
are matched case-insensitively, with spaces as underscores, on their dotted suffix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from scherzer.io.hdf5 import jsonable

__all__ = ["hyperspy_metadata", "instrument_metadata", "tia_frame_times"]

_V_TO_KV = 1e-3
_S_TO_US = 1e6

#: (metadata key, factor to our unit, original-metadata key suffixes in order of preference)
_NUMERIC_KEYS: list[tuple[str, float, tuple[str, ...]]] = [
    ("voltage_kv", _V_TO_KV, ("microscope.high_tension", "optics.accelerationvoltage",
                              "microscope_info.voltage", "acceleratingvoltage")),
    ("magnification", 1.0, ("microscope.magnification", "optics.nominalmagnification",
                            "stemmagnification.value", "microscope_info.indicated_magnification",
                            "magnification_x")),
    ("dwell_us", _S_TO_US, ("microscope.dwell_time", "scan.dwelltime")),
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


def as_float(value: Any) -> float | None:
    """A finite float from a number, a one-element array or numeric text; else None."""
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


def _dm_prefix(mapping: Mapping | None) -> str | None:
    """For DM files: the ``ImageList.TagGroupN.`` of this image (from rosettasciio's mapping)."""
    for key in mapping or {}:
        if key.startswith("ImageList.TagGroup"):
            return ".".join(key.split(".")[:2]) + "."
    return None


def instrument_metadata(om: Mapping, mapping: Mapping | None, fmt: str) -> dict[str, Any]:
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
        value = _find(flat, suffixes, as_float)
        if value is not None:
            md[key] = value * factor
    for key, suffixes in _TEXT_KEYS:
        value = _find(flat, suffixes, lambda v: str(jsonable(v)).strip() or None)
        if value is not None:
            md[key] = value
    if fmt == "tia":
        _tia_dwell_or_exposure(flat, md)
    if fmt == "velox":
        _velox_exposure(flat, md)
    return md


def hyperspy_metadata(metadata: Mapping) -> dict[str, Any]:
    """Instrument values from HyperSpy's mapped metadata (``Acquisition_instrument.TEM``)."""
    instrument = metadata.get("Acquisition_instrument") or {}
    tem = instrument.get("TEM") or instrument.get("SEM") or {}
    camera = (tem.get("Detector") or {}).get("Camera") or {}
    found = {
        "voltage_kv": (as_float(tem.get("beam_energy")), 1.0),
        "magnification": (as_float(tem.get("magnification")), 1.0),
        "dwell_us": (as_float(tem.get("dwell_time")), _S_TO_US),
        "exposure_s": (as_float(camera.get("exposure", tem.get("exposure"))), 1.0),
    }
    out: dict[str, Any] = {k: v * f for k, (v, f) in found.items() if v is not None}
    for key in ("microscope", "acquisition_mode"):
        if tem.get(key):
            out[key] = str(tem[key])
    return out


def _find(flat: Mapping[str, Any], suffixes: Sequence[str], convert: Callable[[Any], Any]) -> Any:
    for suffix in suffixes:
        for key, value in flat.items():
            if key == suffix or key.endswith("." + suffix):
                out = convert(value)
                if out is not None:
                    return out
    return None


def _tia_dwell_or_exposure(flat: Mapping[str, Any], md: dict[str, Any]) -> None:
    """TIA's ``DwellTimePath`` (s) is the pixel dwell in STEM and the exposure on a camera."""
    value = _find(flat, ("acquireinfo.dwelltimepath",), as_float)
    if value is None:
        return
    if "STEM" in str(md.get("acquisition_mode", "")).upper():
        md["dwell_us"] = value * _S_TO_US
    else:
        md["exposure_s"] = value


def _velox_exposure(flat: Mapping[str, Any], md: dict[str, Any]) -> None:
    """Velox: the exposure time of the detector that recorded this signal."""
    detector = md.get("detector")
    for key, value in flat.items():
        if key.endswith(".detectorname") and str(value) == detector:
            exposure = as_float(flat.get(key[: -len("detectorname")] + "exposuretime"))
            if exposure is not None:
                md["exposure_s"] = exposure


def tia_frame_times(om: Mapping, n: int) -> dict[str, Any]:
    """``frame_times_s`` (since the first frame) from a TIA series' time stamps, if all n exist."""
    times = np.atleast_1d(np.asarray(om.get("ser_header_parameters", {}).get("Time", []), float))
    if times.size == n and n > 1:
        return {"frame_times_s": (times - times[0]).tolist()}
    return {}
