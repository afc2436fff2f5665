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
from scherzer.settings import REQUIRED_OPTICS
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
_OPTICS_KEYS = REQUIRED_OPTICS  # declared once in scherzer.settings
# optional optics a user may give (Optics fields; 0 when neither given nor recorded): three-fold
# astigmatism A2, vibration, the A1 start value, an objective aperture, …
_OPTIONAL_OPTICS = tuple(k for k in Optics.model_fields if k not in (*_OPTICS_KEYS, "defocus_nm"))
_NOMINAL_KEYS = ("start_nm", "step_nm", "end_nm", "defocus_list_nm")
_OTHER_KEYS = ("pixel_nm", "information_limit_nm", *_NOMINAL_KEYS)


def instrument_from_stack(stack: ImageStack, **overrides: Any) -> tuple[Optics, float, np.ndarray]:
    """(optics, pixel_nm, nominal defocus (n,) nm) from the stack, overrides winning.

    Overrides (None = not given): ``voltage_kv``, ``cs_mm``, ``focal_spread_nm``,
    ``beam_divergence_mrad`` (required, from the file or given) and any other
    :class:`~scherzer.optics.Optics` field (``a2_nm``/``a2_deg`` three-fold astigmatism,
    ``vibration_nm``, ``a1_nm``/``a1_deg`` the A1 start, ``objective_aperture_mrad``, …);
    ``information_limit_nm`` d (frequencies beyond 1/d are not used: an aperture at
    θ = λ/d, or the given aperture if smaller); ``pixel_nm``; the nominal defocus as
    ``start_nm`` with ``step_nm`` or ``end_nm`` (start + i·step, or evenly to the end) or
    ``defocus_list_nm`` (one value per frame), replacing the per-frame records. A pixel size of
    exactly (1.0, 1.0) nm, the ImageStack default, counts as not recorded. Raises ValueError
    naming every missing value.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {*_OPTICS_KEYS, *_OPTIONAL_OPTICS, *_OTHER_KEYS}
    if unknown:
        raise ValueError(f"unknown instrument override(s): {sorted(unknown)}")
    recorded = dict(stack.instrument.get("optics") or {})
    optics_given = {k: given[k] for k in (*_OPTICS_KEYS, *_OPTIONAL_OPTICS) if k in given}
    merged = {**recorded, **optics_given}
    missing = [f"{k} (--{k.replace('_', '-')})" for k in _OPTICS_KEYS if k not in merged]
    pixel = _pixel_nm(stack, given.get("pixel_nm"))
    if pixel is None:
        missing.append("pixel size (--pixel-nm)")
    nominal, problem = _nominal(stack, given)
    if problem:
        missing.append(problem)
    if missing:
        raise ValueError("missing instrument parameters: " + "; ".join(missing))
    try:
        optics = Optics(**merged)
        if "information_limit_nm" in given:
            optics = _with_information_limit(optics, float(given["information_limit_nm"]))
    except Exception as exc:
        raise ValueError(f"invalid optics parameters: {exc}") from exc
    if not float(pixel) > 0:
        raise ValueError(f"pixel size must be positive; got {pixel}")
    return optics, float(pixel), nominal


def _pixel_nm(stack: ImageStack, given: float | None) -> float | None:
    """The given pixel size, else the recorded square one (None: not recorded)."""
    if given is not None or tuple(stack.pixel_size_nm) == (1.0, 1.0):
        return given
    py, px = stack.pixel_size_nm
    if not math.isclose(py, px, rel_tol=1e-3):
        raise ValueError(f"non-square pixels {stack.pixel_size_nm} nm are not supported")
    return py


def _nominal(stack: ImageStack, given: dict[str, Any]) -> tuple[np.ndarray, str | None]:
    """(nominal defocus (n,) nm, what is missing or inconsistent, or None)."""
    n = stack.n_frames
    if "defocus_list_nm" in given:
        d = np.asarray(given["defocus_list_nm"], np.float64).reshape(-1)
        if d.size != n:
            return np.full(n, np.nan), f"--defocus-list-nm has {d.size} values for {n} frames"
        return d, None
    if any(k in given for k in ("start_nm", "step_nm", "end_nm")):
        start, step, end = (given.get(k) for k in ("start_nm", "step_nm", "end_nm"))
        if start is None or (step is None and end is None):
            return np.full(n, np.nan), "nominal defocus: both --start-nm and --step-nm are needed"
        if end is not None:
            from_end = (float(end) - float(start)) / max(n - 1, 1)
            if step is not None and not math.isclose(float(step), from_end, abs_tol=1e-6):
                return np.full(n, np.nan), (
                    f"--step-nm {step} disagrees with --start-nm/--end-nm ({from_end:g} nm)"
                )
            step = from_end
        return float(start) + float(step) * np.arange(n), None
    nominal = stack.column("defocus_nominal_nm").astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(nominal))
    if bad.size:
        return (
            nominal,
            f"nominal defocus of frames {bad.tolist()} (records or --start-nm/--step-nm)",
        )
    return nominal, None


def _with_information_limit(optics: Optics, limit_nm: float) -> Optics:
    """``optics`` with an objective aperture at θ = λ/d (the information limit d as a hard
    cut-off of the transfer), or its own aperture if that is smaller."""
    if not limit_nm > 0:
        raise ValueError(f"information_limit_nm must be positive; got {limit_nm}")
    theta_mrad = optics.wavelength_A / (10.0 * limit_nm) * 1e3
    current = optics.objective_aperture_mrad
    return optics.with_(objective_aperture_mrad=min(current, theta_mrad) if current else theta_mrad)


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
