"""Focal-series inputs: what the stack and the user say about the series, checked.

One job: turn an :class:`~scherzer.stack.ImageStack` and user overrides into the numbers the
registration needs — the instrument (:func:`instrument_from_stack`), intensity frames with the
camera's dark offset removed (:func:`intensity_frames`), a nominal defocus that changes
monotonically (:func:`check_nominal_defocus`), the images used (:func:`used_mask`) and the
reference image (:func:`choose_reference`) — refusing bad input with a message naming what
is wrong.

Conventions: defocus in nm, C1 < 0 underfocus; frame indices from 0; pixel size in nm
(square pixels only).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from scherzer.optics import Optics
from scherzer.processing.focal.settings import MIN_IMAGES
from scherzer.stack import ImageStack

__all__ = [
    "camera_offset_counts",
    "check_nominal_defocus",
    "choose_reference",
    "instrument_from_stack",
    "intensity_frames",
    "reference_candidates",
    "used_mask",
]

NEAR_SCHERZER_STEPS = 2.5  # reference candidates: interior images this many steps from Scherzer
# (more: more pair matches to choose among, some far from the best phase contrast)
_OPTICS_KEYS = ("voltage_kv", "cs_mm", "focal_spread_nm", "beam_divergence_mrad")


def instrument_from_stack(stack: ImageStack, **overrides: Any) -> tuple[Optics, float, np.ndarray]:
    """(optics, pixel_nm, nominal defocus (n,) nm) from the stack, overrides winning.

    Overrides (None = not given): ``voltage_kv``, ``cs_mm``, ``focal_spread_nm``,
    ``beam_divergence_mrad``, ``pixel_nm``, ``start_nm`` and ``step_nm`` (nominal defocus
    start + i·step, replacing the per-frame records). A pixel size of exactly (1.0, 1.0) nm, the
    ImageStack default, counts as not recorded. Raises ValueError naming every missing value.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {*_OPTICS_KEYS, "pixel_nm", "start_nm", "step_nm"}
    if unknown:
        raise ValueError(f"unknown instrument override(s): {sorted(unknown)}")
    recorded = dict(stack.instrument.get("optics") or {})
    merged = {**recorded, **{k: given[k] for k in _OPTICS_KEYS if k in given}}
    missing = [f"{k} (--{k.replace('_', '-')})" for k in _OPTICS_KEYS if k not in merged]
    pixel = given.get("pixel_nm")
    if pixel is None and tuple(stack.pixel_size_nm) != (1.0, 1.0):
        py, px = stack.pixel_size_nm
        if not math.isclose(py, px, rel_tol=1e-3):
            raise ValueError(f"non-square pixels {stack.pixel_size_nm} nm are not supported")
        pixel = py
    if pixel is None:
        missing.append("pixel size (--pixel-nm)")
    n = stack.n_frames
    if "start_nm" in given or "step_nm" in given:
        if "start_nm" not in given or "step_nm" not in given:
            missing.append("nominal defocus: both --start-nm and --step-nm are needed")
            nominal = np.full(n, np.nan)
        else:
            nominal = float(given["start_nm"]) + float(given["step_nm"]) * np.arange(n)
    else:
        nominal = stack.column("defocus_nominal_nm").astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(nominal))
        if bad.size:
            missing.append(
                f"nominal defocus of frames {bad.tolist()} (records or --start-nm/--step-nm)"
            )
    if missing:
        raise ValueError("missing instrument parameters: " + "; ".join(missing))
    try:
        optics = Optics(**merged)
    except Exception as exc:
        raise ValueError(f"invalid optics parameters: {exc}") from exc
    if not float(pixel) > 0:
        raise ValueError(f"pixel size must be positive; got {pixel}")
    return optics, float(pixel), nominal


def camera_offset_counts(stack: ImageStack) -> float:
    """The camera's dark offset (counts) recorded in ``stack.instrument["camera"]``, else 0."""
    cam = stack.instrument.get("camera") or {}
    return float(cam.get("offset_counts", 0.0) or 0.0)


def intensity_frames(stack: ImageStack) -> np.ndarray:
    """Frames with the recorded camera offset removed (float32): proportional to intensity."""
    off = camera_offset_counts(stack)
    return stack.frames - np.float32(off) if off else stack.frames


def check_nominal_defocus(nominal_nm: np.ndarray, n: int) -> np.ndarray:
    """Nominal defocus (n,) finite and strictly monotonic, or a ValueError saying what is not."""
    d = np.asarray(nominal_nm, dtype=np.float64).reshape(-1)
    if d.size != n:
        raise ValueError(f"nominal defocus has {d.size} values for {n} frames")
    bad = np.flatnonzero(~np.isfinite(d))
    if bad.size:
        raise ValueError(f"nominal defocus missing (NaN) for frames {bad.tolist()}")
    steps = np.diff(d)
    if not (np.all(steps > 0) or np.all(steps < 0)):
        sign = np.sign(np.median(steps)) or 1.0
        wrong = (np.flatnonzero(steps * sign <= 0) + 1).tolist()
        raise ValueError(
            "nominal defocus must change monotonically through the series; frames "
            f"{wrong} break the order ({d.tolist()})"
        )
    return d


def used_mask(n: int, exclude: Sequence[int], reference: int) -> np.ndarray:
    """(n,) bool: frames not in ``exclude`` (range-checked; the reference cannot be excluded;
    at least ``MIN_IMAGES`` must remain)."""
    used = np.ones(n, bool)
    for i in exclude:
        if not 0 <= int(i) < n:
            raise ValueError(f"excluded frame {i} out of range 0..{n - 1}")
        used[int(i)] = False
    if not used[reference]:
        raise ValueError(f"the reference frame {reference} cannot be excluded")
    if used.sum() < MIN_IMAGES:
        raise ValueError(
            f"registration needs at least {MIN_IMAGES} images; {int(used.sum())} left after "
            f"excluding {list(exclude)}"
        )
    return used


def reference_candidates(
    nominal: np.ndarray, optics: Optics, exclude: Sequence[int] = ()
) -> np.ndarray:
    """Interior frames (never the first or last) fit to be the reference by their nominal
    defocus, nearest first: the interior image nearest Scherzer defocus
    (:meth:`~scherzer.optics.Optics.scherzer_defocus_nm`) and any other within
    ``NEAR_SCHERZER_STEPS`` steps of Scherzer; never one so close to focus that it has no
    phase contrast (within one step of 0 nm; Cs ≈ 0 puts Scherzer at 0 nm) nor an excluded
    one. A first or last reference
    carries its own defocus error into every relative defocus with nothing on its other side
    to average it out."""
    n = len(nominal)
    step = float(np.median(np.abs(np.diff(nominal))))
    dist = np.abs(nominal - optics.scherzer_defocus_nm())
    interior = np.zeros(n, bool)
    interior[1 : n - 1] = True
    interior[[int(i) for i in exclude if 0 <= int(i) < n]] = False
    ok = interior & (np.abs(nominal) >= step)
    if not ok.any():
        ok = interior if interior.any() else np.ones(n, bool)
    dist = np.where(ok, dist, np.inf)
    reach = NEAR_SCHERZER_STEPS * step
    near = np.flatnonzero((dist <= reach) | (np.arange(n) == int(np.argmin(dist))))
    return near[np.argsort(dist[near], kind="stable")]


def choose_reference(nominal: np.ndarray, optics: Optics, reference: int | None) -> int:
    """The reference frame: ``reference`` if given (range-checked; the first or last only
    with a warning), else the nearest-Scherzer interior candidate
    (:func:`reference_candidates`; the registration may prefer another candidate by its
    correlation peak)."""
    n = len(nominal)
    if reference is None:
        return int(reference_candidates(nominal, optics)[0])
    if not 0 <= int(reference) < n:
        raise ValueError(f"reference frame {reference} out of range 0..{n - 1}")
    if int(reference) in (0, n - 1):
        warnings.warn(
            f"reference frame {reference} is the first or last of the series: its own defocus "
            "error shifts every relative defocus (an interior image is chosen by default)",
            UserWarning,
            stacklevel=3,
        )
    return int(reference)
