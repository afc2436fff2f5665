"""Relative defocus and drift of a crystal-only field (``FocalParams(crystal=True)``).

One job: register a series with no amorphous area, where a lattice makes every correlation
periodic and each image's defocus is poorly determined (a defocus change only rescales each
reflection) while one step scale for the whole series is well determined. The first pass
(:func:`first_pass_crystal`) takes the nominal step and chains the drift image to image with a
sign-free (squared) correlation and a smooth-drift window; later passes (:func:`crystal_pass`)
fit one step scale κ on the Bragg spots (:func:`fit_step_scale`) and refine every shift against
its leave-one-out prediction. :class:`CrystalStrategy` strings them together, with the
exit-surface absolute fit (:func:`~.absolute.fit_chi_free_phase`) on the common band.

Conventions: defocus in nm (defocus_n = ref + κ·(nominal_n − nominal_ref)), shifts in px with
frame_i(r) ≈ ref(r − s_i); the reference's shift is 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.optimize import minimize_scalar

from scherzer.processing.focal.absolute import ChiFit, chi_basis, fit_chi_free_phase, wave_absolute
from scherzer.processing.focal.problem import (
    Correlator,
    PassState,
    Problem,
    map_images,
    refine_shifts,
    spot_mask,
)
from scherzer.processing.focal.search import local_grid_peak, parabolic_peak
from scherzer.processing.focal.settings import MIN_IMAGES
from scherzer.processing.spectral import shift_phase
from scherzer.processing.wiener import solve_series

__all__ = [
    "CrystalStrategy",
    "crystal_pass",
    "first_pass_crystal",
    "fit_step_scale",
    "step_scale_residual",
]

CRYSTAL_STEP_WINDOW_PX = 3.0
CRYSTAL_MAX_DCHI = math.pi / 2  # rad: frequencies whose χ changes less over one step
CRYSTAL_MIN_LOW_FREQUENCIES = 8  # fewer low-band frequencies than this: take the …
CRYSTAL_FALLBACK_LOW_FREQUENCIES = 64  # … this many with the smallest χ change instead
CRYSTAL_PEAK_AMBIGUITY = 0.8  # a peak this close in height to the best counts as equivalent
CRYSTAL_STEP_SCALE_RANGE = 0.1  # ± fraction of the nominal step searched
CRYSTAL_STEP_SCALE_SPACING = 0.02  # grid spacing of that search (then Brent within ± one)
CRYSTAL_STEP_SCALE_REFINE = 0.01  # ± range of the later passes' κ refinement (Brent alone)
CRYSTAL_STEP_SCALE_TOL = 1e-4  # Brent tolerance of κ (a 1e-4 scale error: 0.01 nm over 100 nm)
CRYSTAL_MIN_RELATIVE_PEAK = 0.25  # crystal mode: peaks below this × the median are suspect
# quadratic-term rounds of the wave whose exit-surface criterion gives the absolute defocus
# (the channelling wave's |φ_img|² is not small)
CRYSTAL_CORRECTIONS = 3


def first_pass_crystal(prob: Problem, ref: int, nominal: np.ndarray, used: np.ndarray):
    """Nominal defocus; drift chained image to image (FocalParams ``crystal``).

    Each image is cross-correlated with the previous one on the frequencies where one step
    changes χ by less than π/2 (their contrast is nearly the same there, up to a reversal
    where the CTF crosses zero). A reversal would make a lattice pseudo-translation win, so
    the cross-power is squared (sign-free; the peak sits at twice the step, ambiguous by half
    a lattice vector) and the drift is taken as smooth: the median of the steps found within
    ``max_drift_px``/2 is the steady drift (the squared map repeats with the lattice period,
    so a steady drift per image must stay below ~¼ of the shortest lattice period, ≈ 5 px for
    SrTiO3 at 0.02 nm/px), every step the peak within ``CRYSTAL_STEP_WINDOW_PX`` of it.
    """
    n = len(nominal)
    idx = np.flatnonzero(used)  # excluded frames (e.g. hit by a vibration) leave the chain
    k = idx.size
    steps = np.abs(np.diff(nominal[idx]))
    dchi = np.abs(prob.bt.unit) * float(np.max(steps))  # χ change over one step (rad)
    low = dchi < CRYSTAL_MAX_DCHI
    if low.sum() < CRYSTAL_MIN_LOW_FREQUENCIES:
        low = dchi <= np.sort(dchi)[min(len(dchi) - 1, CRYSTAL_FALLBACK_LOW_FREQUENCIES)]
    spec = prob.spectra[idx] * low
    pairs = spec[1:] * np.conj(spec[:-1])
    # squared phasors: a reflection whose contrast reverses between the two images (sign
    # flip) still points the same way; the correlation of the squares peaks at twice the step
    mag = np.abs(pairs)
    sq = (pairs * pairs / np.maximum(mag, 1e-30)).astype(np.complex64)
    norms = mag.sum(axis=1)
    win = prob.params.max_drift_px
    gap = np.diff(idx).astype(np.float64)[:, None]  # frames between chained neighbours
    wide = np.stack([nearest_strong_peak(prob.corr, sq[j : j + 1], win) for j in range(k - 1)])
    typical = np.median(wide / gap, axis=0)  # twice the steady drift per frame
    near = np.empty((k - 1, 2))
    for j in range(k - 1):
        near[j] = prob.corr.coarse(sq[j : j + 1], np.ones(1), typical * gap[j],
                                   2 * CRYSTAL_STEP_WINDOW_PX)[0][0]  # fmt: skip
    step_s = np.zeros((k, 2))
    peaks = np.ones(n)
    half = 0.5 * max(prob.corr.scale)  # the coarse map's pixel: search ± that finely first
    for j in range(1, k):
        start = local_grid_peak(prob.corr, sq[j - 1], near[j - 1], half)
        s2, peaks[idx[j]] = prob.corr.refine(sq[j - 1], start, float(norms[j - 1]), 6)
        step_s[j] = 0.5 * s2
    chained = np.cumsum(step_s, axis=0)
    frames = np.arange(n, dtype=np.float64)
    shifts = np.stack([np.interp(frames, idx, chained[:, a]) for a in range(2)], axis=1)
    shifts -= shifts[ref]
    return nominal.copy(), shifts, peaks


def nearest_strong_peak(corr: Correlator, z: np.ndarray, radius: float) -> np.ndarray:
    """The coarse peak (2,) of one cross-power ``z`` (1, m) nearest zero among those within
    ``radius`` px that reach ``CRYSTAL_PEAK_AMBIGUITY`` × the highest: a lattice makes the
    (squared) correlation periodic, its equivalent peaks differ in height only by noise, and
    the drift between neighbours is the smallest of them (seen on the simulator's 512²
    SrTiO3 with only {110}-type reflections in the low band: the highest peak was a quarter
    lattice vector off per image, 17 px drift error over 11 images)."""
    peak, height = corr.coarse(z, np.ones(1), np.zeros(2), radius)
    best, top = peak[0], float(height[0])
    r = float(np.hypot(*best))
    while r > 1.0:
        p2, h2 = corr.coarse(z, np.ones(1), np.zeros(2), r - 1.0)
        if float(h2[0]) < CRYSTAL_PEAK_AMBIGUITY * top:
            break
        best, r = p2[0], float(np.hypot(*p2[0]))
    return best


def step_scale_residual(
    prob: Problem,
    aligned: np.ndarray,
    nominal: np.ndarray,
    ref: int,
    ref_defocus_nm: float,
    mask: np.ndarray | None = None,
) -> Callable[[float], float]:
    """The residual fraction on the Bragg spots (:func:`spot_mask`) of the aligned series
    explained by the two-sided linear model (+ quadratic term) with the wave restored at
    defocus_n = ref + κ·(nominal_n − nominal_ref), as a function of κ."""
    spots = spot_mask(aligned)
    total = float(np.sum(np.abs(aligned[:, spots]) ** 2)) + 1e-30

    sp = np.flatnonzero(spots)
    sp_neg, cam = prob.band.neg[sp], prob.camera[sp]
    data = aligned[:, sp]
    m_sp = None if mask is None else mask[:, sp]

    def resid(kappa: float) -> float:
        d = ref_defocus_nm + kappa * (nominal - nominal[ref])
        t = prob.bt.transfer(d, prob.bt.spatial(d))
        sol = solve_series(aligned, t, prob.band, camera=prob.camera, corrections=1, mask=mask)
        # the prediction on the spots only (elementwise: the same values as on the whole band)
        pred = sol.phi[sp] * (t[:, sp] * cam) + np.conj(sol.phi[sp_neg]) * (
            np.conj(t[:, sp_neg]) * cam
        )
        pred = pred + sol.quadratic[:, sp]
        res = data - pred if m_sp is None else (data - pred) * m_sp
        return float(np.sum(np.abs(res) ** 2)) / total

    return resid


def fit_step_scale(
    prob: Problem,
    aligned: np.ndarray,
    nominal: np.ndarray,
    ref: int,
    ref_defocus_nm: float,
    half_range: float = CRYSTAL_STEP_SCALE_RANGE,
    mask: np.ndarray | None = None,
    center: float = 1.0,
) -> tuple[float, float]:
    """Scale κ of the nominal step (defocus_n = ref + κ·(nominal_n − nominal_ref)) that best
    explains the aligned series by the two-sided linear model (+ quadratic term), and the
    residual fraction at it (:func:`step_scale_residual`). The residual is taken on the Bragg
    spots only: a crystal's per-image defocus is poorly determined (a defocus change only
    rescales each reflection), but one step scale for the whole series is well determined."""
    resid = step_scale_residual(prob, aligned, nominal, ref, ref_defocus_nm, mask)
    spacing = CRYSTAL_STEP_SCALE_SPACING
    best = center
    if half_range > spacing:  # a grid first (the residual has side minima); else Brent alone
        grid = center + np.linspace(-half_range, half_range, 2 * round(half_range / spacing) + 1)
        ys = map_images(lambda j: resid(grid[j]), range(len(grid)))  # independent trials
        best = parabolic_peak(grid, -np.array(ys))
    lo, hi = best - min(spacing, half_range), best + min(spacing, half_range)
    res = minimize_scalar(
        resid, bounds=(lo, hi), method="bounded", options={"xatol": CRYSTAL_STEP_SCALE_TOL}
    )
    return float(res.x), float(res.fun)


def crystal_pass(prob: Problem, ref: int, nominal, d_abs, shifts, used, fit_kappa=True):
    """One crystal pass: the step scale κ (defocus on the nominal line through the reference;
    kept as it is without ``fit_kappa``), then every image's shift refined (Newton, from the
    last) against its leave-one-out prediction at that defocus. Returns (defocus, shifts,
    peaks)."""
    n = len(d_abs)
    others = np.arange(n) != ref
    now = float(np.median((d_abs - d_abs[ref])[others] / (nominal - nominal[ref])[others]))
    narrow = abs(now - 1.0) > 1e-9  # a κ was fitted before: refine around it
    if narrow and not fit_kappa:
        new_s, peaks = refine_shifts(prob, ref, d_abs, shifts, used, prob.params.prior_scale)
        return d_abs.copy(), new_s, peaks
    aligned = prob.spectra * shift_phase(prob.band, shifts)
    kappa, _ = fit_step_scale(
        prob, aligned[used], nominal[used], int(np.sum(used[:ref])), float(d_abs[ref]),
        CRYSTAL_STEP_SCALE_REFINE if narrow else CRYSTAL_STEP_SCALE_RANGE,
        prob.mask[used], now if narrow else 1.0,
    )  # fmt: skip
    new_d = d_abs[ref] + kappa * (nominal - nominal[ref])
    new_s, peaks = refine_shifts(prob, ref, new_d, shifts, used, prob.params.prior_scale)
    return new_d, new_s, peaks


class CrystalStrategy:
    """A crystal-only field (:class:`~.problem.Strategy`; ``FocalParams(crystal=True)``): drift
    chained image to image, one step scale fitted on the Bragg spots, the absolute defocus at
    the exit surface from ψ − 1 = c·R(r) on the common band, flagged images put on the drift
    line."""

    def first_pass(self, prob: Problem, ref: int, nominal, used, range_nm: float):
        return first_pass_crystal(prob, ref, nominal, used)

    def later_pass(self, prob: Problem, ref: int, nominal, state: PassState, used, range_nm):
        # κ once per round (measured: refitting it in every pass changed nothing on the
        # simulator's SrTiO3 and Si [110] at 512², and cost 0.5 s)
        return crystal_pass(
            prob, ref, nominal, state.d_abs, state.shifts, used, fit_kappa=state.iteration == 0
        )

    def flag_level(self, prob: Problem, peaks, used) -> float:
        """The problem's level, raised to ``CRYSTAL_MIN_RELATIVE_PEAK`` × the median peak: an
        image near a defocus where the lattice nearly vanishes from the image correlates
        weakly with its prediction and its shift is not determined (seen: peak 0.08 against
        ≈ 0.95, shift 0.66 px off), so it is flagged."""
        level = prob.flag_level
        if used.sum() >= MIN_IMAGES:
            level = max(level, CRYSTAL_MIN_RELATIVE_PEAK * float(np.median(peaks[used])))
        return level

    def absolute(self, prob: Problem, d_abs, shifts, ok, basis, range_nm: float) -> ChiFit:
        # the exit-surface criterion depends on the band: the common one (measured on SrTiO3
        # 1 nm: 0.35 nm, against 2.0 nm on the per-image band)
        common = prob.common()
        basis = chi_basis(common.optics, common.grid, common.band)
        return wave_absolute(
            common, d_abs, shifts, ok, basis, range_nm, CRYSTAL_CORRECTIONS, fit_chi_free_phase
        )

    def finish(self, prob: Problem, ref: int, d_abs, shifts, peaks, used):
        return d_abs, shifts  # the passes refine the shifts already; the exit surface is fitted

    def shifts_of_flagged(self, shifts, used, flagged):
        """No lattice to register: flagged images get the smooth drift line of the others."""
        if not flagged.any():
            return shifts
        good = np.flatnonzero(used & ~flagged)
        coef = np.polyfit(good.astype(float), shifts[good], 1)
        bad = np.flatnonzero(flagged)
        shifts = shifts.copy()
        shifts[bad] = coef[0] * bad[:, None] + coef[1]
        return shifts
