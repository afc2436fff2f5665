"""Small optimisers of the focal registration.

One job: find maxima — of the normalised correlation peak over defocus and shift
(:func:`search_defocus_shift`: coarse trials, then Brent on the defocus with Newton on the
shift; :func:`search_defocus_shift_local` the same within a trust region about a settled
estimate, no coarse trials), of a sampled curve (:func:`parabolic_peak`), of a band
correlation on a small shift grid (:func:`local_grid_peak`), and of a smooth objective from
several starts (:func:`best_of_starts`, BFGS; :func:`simplex` builds Nelder–Mead starts).

Conventions: defocus in nm, shifts in px (frame_i(r) ≈ ref(r − s_i)); a correlator is a
:class:`~scherzer.processing.focal.problem.Correlator` (band-limited cross-power spectra).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar

if TYPE_CHECKING:
    from scherzer.processing.focal.problem import Correlator

__all__ = [
    "best_of_starts",
    "local_grid_peak",
    "parabolic_peak",
    "search_defocus_shift",
    "search_defocus_shift_local",
    "simplex",
]

SEARCH_CANDIDATES = 3  # coarse defocus trials whose shift is refined before Brent (side peaks)
COARSE_NEWTON_STEPS = 6  # Newton steps refining a coarse candidate's shift
FINE_NEWTON_STEPS = 3  # … at every Brent evaluation (starting from the last shift)
FINAL_NEWTON_STEPS = 6  # … at the optimum
LOCAL_GRID_POINTS = 9  # local_grid_peak: points per axis of the start grid
LOCAL_EDGE_TOLS = 2.0  # a local search whose maximum is within this × tol of its edge failed


def search_defocus_shift(
    corr: Correlator,
    z_of: Any,
    center_nm: float,
    range_nm: float,
    n_coarse: int,
    tol_nm: float,
    shift_guess: np.ndarray | None = None,
    shift_window: tuple[np.ndarray, float] | None = None,
) -> tuple[float, np.ndarray, float]:
    """Maximise the normalised correlation peak over defocus Δ and shift.

    ``z_of(Δ (k,)) → (Z (k, m), norm (k,)[, offset (k,)])``; the objective is
    (Re Σ Z e^{2πi g·s} − offset) / norm. Coarse: ``n_coarse`` trials over center ± range,
    peaks by FFT within ``shift_window`` = (centre, radius px) if given (or, with
    ``shift_guess``, by Newton from it). Fine: Brent on Δ within one
    coarse spacing, the shift refined by Newton at every evaluation. Returns (Δ, shift, peak).
    """
    trials = center_nm + np.linspace(-range_nm, range_nm, max(n_coarse, 3))
    z, norm, off = _evaluate(z_of, trials)
    if shift_guess is None:
        peaks, raw = corr.coarse(z, np.ones(len(trials)), *(shift_window or (None, None)))
    else:
        peaks = np.repeat(np.asarray(shift_guess, float)[None], len(trials), axis=0)
        e = corr.phase(peaks[0])
        raw = z.real @ e.real - z.imag @ e.imag
    heights = (raw - off) / np.maximum(norm, 1e-30)
    top = np.argsort(heights)[::-1][:SEARCH_CANDIDATES]
    fits = {int(j): corr.refine(z[j], peaks[j], norm[j], COARSE_NEWTON_STEPS, off[j]) for j in top}
    j = max(fits, key=lambda k: fits[k][1])
    best = float(trials[j])
    h = float(trials[1] - trials[0])
    state = {"s": fits[j][0]}

    def neg_peak(delta: float) -> float:
        zz, nn, oo = _evaluate(z_of, np.array([delta]))
        s_new, height = corr.refine(zz[0], state["s"], nn[0], FINE_NEWTON_STEPS, oo[0])
        state["s"] = s_new
        return -height

    res = minimize_scalar(
        neg_peak,
        bounds=(max(best - h, trials[0]), min(best + h, trials[-1])),
        method="bounded",
        options={"xatol": tol_nm},
    )
    delta = float(res.x)
    zz, nn, oo = _evaluate(z_of, np.array([delta]))
    s, height = corr.refine(zz[0], state["s"], nn[0], FINAL_NEWTON_STEPS, oo[0])
    return delta, s, height


def search_defocus_shift_local(
    corr: Correlator,
    z_of: Any,
    center_nm: float,
    half_nm: float,
    tol_nm: float,
    shift_guess: np.ndarray,
) -> tuple[float, np.ndarray, float] | None:
    """The maximum of the same objective as :func:`search_defocus_shift` within ± ``half_nm``
    of ``center_nm`` (a trust region about an estimate that has settled): the shift refined
    by Newton from ``shift_guess`` at the centre, then Brent on Δ within the region with the
    shift refined at every evaluation (no coarse trials). Returns None when the maximum lies
    at the region's edge (the caller then searches the full range)."""
    state = {"s": np.asarray(shift_guess, np.float64)}
    zz, nn, oo = _evaluate(z_of, np.array([center_nm]))
    state["s"] = corr.refine(zz[0], state["s"], nn[0], COARSE_NEWTON_STEPS, oo[0])[0]

    def neg_peak(delta: float) -> float:
        zz, nn, oo = _evaluate(z_of, np.array([delta]))
        s_new, height = corr.refine(zz[0], state["s"], nn[0], FINE_NEWTON_STEPS, oo[0])
        state["s"] = s_new
        return -height

    lo, hi = center_nm - half_nm, center_nm + half_nm
    res = minimize_scalar(neg_peak, bounds=(lo, hi), method="bounded", options={"xatol": tol_nm})
    delta = float(res.x)
    if min(delta - lo, hi - delta) < LOCAL_EDGE_TOLS * tol_nm:
        return None
    zz, nn, oo = _evaluate(z_of, np.array([delta]))
    s, height = corr.refine(zz[0], state["s"], nn[0], FINAL_NEWTON_STEPS, oo[0])
    return delta, s, height


def _evaluate(z_of: Any, trials: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Z, norm, offset) of ``z_of``; objectives without an offset get zeros."""
    out = z_of(trials)
    if len(out) == 2:
        return out[0], np.asarray(out[1]), np.zeros(len(trials))
    return out[0], np.asarray(out[1]), np.asarray(out[2])


def parabolic_peak(x: np.ndarray, y: np.ndarray) -> float:
    """The maximum of ``y`` sampled on the uniform ``x``, refined by a parabola through its
    neighbours (the grid point itself at an edge or where the curve is not concave)."""
    j = int(np.argmax(y))
    if 0 < j < len(y) - 1:
        den = y[j - 1] - 2 * y[j] + y[j + 1]
        if den < 0:
            return float(x[j] + 0.5 * (x[1] - x[0]) * (y[j - 1] - y[j + 1]) / den)
    return float(x[j])


def local_grid_peak(corr: Correlator, z: np.ndarray, center: np.ndarray, half: float):
    """Shift (2,) maximising Re Σ z e^{2πi g·s} on a 9×9 grid within ± ``half`` px of
    ``center``: a start inside the peak for Newton (a coarse-box peak can be off by half a box
    pixel, several image pixels, on the sharp periodic peaks of a crystal)."""
    offs = np.linspace(-half, half, LOCAL_GRID_POINTS)
    ey = np.exp(2j * math.pi * np.outer(center[0] + offs, corr.fy)).astype(np.complex64)
    ex = np.exp(2j * math.pi * np.outer(center[1] + offs, corr.fx)).astype(np.complex64)
    vals = ((ey[:, corr.iy] * z[None]) @ ex[:, corr.ix].T).real  # (y offsets, x offsets)
    jy, jx = np.unravel_index(int(np.argmax(vals)), vals.shape)
    return np.array([center[0] + offs[jy], center[1] + offs[jx]])


def best_of_starts(fun: Any, starts: Sequence[Sequence[float]]) -> Any:
    """The best BFGS result of ``fun`` (value, gradient) over several starting points."""
    best = None
    for x0 in starts:
        r = minimize(fun, np.asarray(x0, float), jac=True, method="BFGS")
        if best is None or r.fun < best.fun:
            best = r
    return best


def simplex(x0: np.ndarray, steps: Sequence[float]) -> np.ndarray:
    """Nelder–Mead start simplex: x0 and x0 + step_i e_i."""
    pts = [x0]
    for i, s in enumerate(steps):
        p = x0.copy()
        p[i] += s
        pts.append(p)
    return np.array(pts)
