"""Axis calibrations: length units to nm, and axes from EMD ``dimK`` datasets.

An axis is a ``(name, scale, offset, units)`` tuple. Lengths in m, cm, mm, µm/um/μm, nm/n_m/[n_m],
Å/A and pm are converted to nm (``units="nm"``); other units (s, 1/nm, …) are kept as given.
EMD ``dimK`` describes array axis K-1 (``dim0`` describes axis 0 in files that start at 0).
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from scherzer.io.hdf5 import attr_str

__all__ = ["Axis", "axis_in_nm", "dims_axes", "nm_per_unit"]

Axis = tuple[str, float, float, str]

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


def axis_in_nm(name: Any, scale: Any, offset: Any, units: Any) -> Axis:
    """One axis with a length calibration converted to nm (other units kept)."""
    units_s = "" if units is None else str(units)
    factor = nm_per_unit(units_s)
    scale_f, offset_f = float(scale), float(offset)
    if factor is not None:
        return (str(name or ""), scale_f * factor, offset_f * factor, "nm")
    return (str(name or ""), scale_f, offset_f, units_s)


def dims_axes(g: h5py.Group, ndim: int) -> list[Axis]:
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
        name, units = (attr_str(dim, key) for key in ("name", "units"))
        axes.append(axis_in_nm(name, scale, offset, units))
    return axes
