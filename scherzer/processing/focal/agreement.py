"""Start defocus and A1 from the Fourier-phase agreement of CTF-corrected images (QFocus-like).

One job: for a fixed-step series, try start defoci, CTF-correct every image and score how well
their Fourier phases agree (:func:`phase_agreement`); the best start overall and per azimuth
sector (:func:`fit_start_phase_agreement`), A1 from the sector optima with an honest
uncertainty (:func:`fit_sectors`). Needs no amorphous area. :func:`agreement_absolute` is the
registration's ``FocalParams(absolute="phase_agreement")`` correction.

Conventions: defocus in nm, start = the defocus of the first image (relative defocus of image n
= its defocus − the first's); sector angles in degrees over [0, 180) with the azimuth
φ = atan2(k_y, k_x); A1 as (|A1| cos 2φ_A1, |A1| sin 2φ_A1) nm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import minimize

from scherzer.processing.focal.absolute import ChiFit
from scherzer.processing.focal.problem import spot_mask
from scherzer.processing.focal.search import parabolic_peak, simplex
from scherzer.processing.spectral import BandTransfer, SpectralBand, shift_phase

if TYPE_CHECKING:
    from scherzer.processing.focal.problem import Problem

__all__ = [
    "AgreementFit",
    "SectorFit",
    "agreement_absolute",
    "fit_sectors",
    "fit_start_phase_agreement",
    "phase_agreement",
]

AGREEMENT_CHUNK = 8  # trial start defoci evaluated at once (memory: chunk × images × band)
COARSE_STEP_NM = 0.5  # start-defocus grid over the whole range
FINE_HALF_RANGE_NM = 1.5  # then ± this around the best …
FINE_STEP_NM = 0.1  # … at this spacing (also the per-sector grid)
JOINT_SIMPLEX_STEPS = (0.5, 1.0, 1.0, 0.2)  # Nelder–Mead start steps: start nm, A1c, A1s nm, β rad
JOINT_XTOL = 0.02  # Nelder–Mead tolerances of the joint (start, A1[, β]) refinement
JOINT_FTOL = 1e-7
MAX_A1_SIGMA_NM = 0.5  # sector A1 more uncertain than this (1σ) is not reported
SECTOR_HALF_RANGE_NM = 5.0  # ± window of the per-sector defocus search around the start
MIN_SECTOR_SPOTS = 2  # strong frequencies a sector needs for its own defocus estimate
MIN_SECTOR_WEIGHT = 0.2  # … and this fraction of the mean sector weight
MIN_SECTOR_CONDITIONING = 0.05  # λ_min/λ_max of the A1 block of the sector design


def agreement_terms(
    spectra: np.ndarray,
    bt: BandTransfer,
    rel_defocus_nm: np.ndarray,
    starts_nm: np.ndarray,
    env_s: np.ndarray,
    extra_chi: np.ndarray | None = None,
    chunk: int = AGREEMENT_CHUNK,
) -> tuple[np.ndarray, ...]:
    """Sums over images for trial start defoci, each (k, m): U = Σ S_n e_n sin χ_n,
    V = Σ S_n e_n cos χ_n, and Σ e_n² sin², Σ e_n² sin·cos, Σ e_n² cos² (e_n = envelopes)."""
    k, m = len(starts_nm), spectra.shape[1]
    u, v = np.empty((k, m), np.complex64), np.empty((k, m), np.complex64)
    pss, psc, pcc = (np.empty((k, m), np.float32) for _ in range(3))
    env = bt.env_t[None] * env_s
    for c0 in range(0, k, chunk):
        st = np.asarray(starts_nm[c0 : c0 + chunk], np.float64)
        dfs = (st[:, None] + rel_defocus_nm[None]).reshape(-1)
        x = bt.chi(dfs).reshape(len(st), len(rel_defocus_nm), -1)
        if extra_chi is not None:
            x = x + extra_chi
        s = (np.sin(x) * env[None]).astype(np.float32)
        c = (np.cos(x) * env[None]).astype(np.float32)
        sl = slice(c0, c0 + len(st))
        u[sl] = np.einsum("knm,nm->km", s, spectra)
        v[sl] = np.einsum("knm,nm->km", c, spectra)
        pss[sl] = np.sum(s * s, axis=1)
        psc[sl] = np.sum(s * c, axis=1)
        pcc[sl] = np.sum(c * c, axis=1)
    return u, v, pss, psc, pcc


def agreement_from_terms(terms, mag: np.ndarray, beta_rad: np.ndarray | float) -> np.ndarray:
    """a(g) for CTFs sin(χ_n + β): (len(β), k, m) for an array β, (k, m) for a scalar."""
    u, v, pss, psc, pcc = terms
    b = np.atleast_1d(np.asarray(beta_rad, np.float64))
    cb = np.cos(b).astype(np.float32)[:, None, None]
    sb = np.sin(b).astype(np.float32)[:, None, None]
    num = np.abs(cb * u[None] + sb * v[None])
    p = cb * cb * pss[None] + 2 * cb * sb * psc[None] + sb * sb * pcc[None]
    out = num / (mag[None, None] * np.sqrt(np.maximum(p, 0)) + 1e-30)
    return out if np.ndim(beta_rad) else out[0]


def phase_agreement(
    spectra: np.ndarray,
    prob_bt: BandTransfer,
    rel_defocus_nm: np.ndarray,
    starts_nm: np.ndarray,
    env_s: np.ndarray,
    extra_chi: np.ndarray | None = None,
    chunk: int = AGREEMENT_CHUNK,
    beta_rad: float = 0.0,
) -> np.ndarray:
    """Per-frequency agreement a(g) ∈ [0, 1] of CTF-corrected images for trial start defoci.

    a(g) = |Σ_n S_n(g) s_n(g)| / √(Σ_n |S_n(g)|² · Σ_n s_n(g)²), s_n = sin(χ_n + β) ·
    envelopes, χ_n at defocus start + rel_n (plus ``extra_chi``, e.g. an A1 term). β = 0 is
    the weak-phase CTF; β ≠ 0 mixes in amplitude contrast (module doc). Returns (k, m).
    """
    mag = np.sqrt(np.sum(np.abs(spectra) ** 2, axis=0))
    terms = agreement_terms(spectra, prob_bt, rel_defocus_nm, starts_nm, env_s, extra_chi, chunk)
    return agreement_from_terms(terms, mag, beta_rad)


def sector_masks(band: SpectralBand, n_sectors: int) -> np.ndarray:
    """(sectors, m) bool masks of azimuth sectors over [0, 180) (g and −g together)."""
    phi = np.mod(np.arctan2(band.gy, band.gx), math.pi)
    which = np.minimum((phi / math.pi * n_sectors).astype(int), n_sectors - 1)
    return which[None] == np.arange(n_sectors)[:, None]


@dataclass
class AgreementFit:
    """Start defocus (nm) and A1 from Fourier-phase agreement of CTF-corrected images.

    ``amplitude_contrast_deg``: the fitted β of the CTF sin(χ + β) (0 = pure weak phase).
    ``astigmatism_uncertainty_nm``: 1σ of each Cartesian A1 component (NaN: not fitted).
    ``astigmatism_determined``: False when the data cannot fix A1 (too few sectors with signal,
    or the uncertainty exceeds the fitted magnitude); A1 is then reported as 0.
    """

    start_nm: float
    astigmatism_cartesian_nm: np.ndarray
    sector_angles_deg: np.ndarray
    sector_defocus_nm: np.ndarray
    trials_nm: np.ndarray
    agreement: np.ndarray
    amplitude_contrast_deg: float = 0.0
    astigmatism_uncertainty_nm: float = math.nan
    astigmatism_determined: bool = True
    sector_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))


BETA_TRIALS = np.radians(np.arange(0.0, 180.0, 5.0))


def fit_start_phase_agreement(
    spectra: np.ndarray,
    bt: BandTransfer,
    basis: np.ndarray,
    band: SpectralBand,
    rel_defocus_nm: np.ndarray,
    center_nm: float,
    range_nm: float,
    n_sectors: int = 6,
    fit_astigmatism: bool = True,
    amplitude_contrast: bool = False,
    mask: np.ndarray | None = None,
) -> AgreementFit:
    """Start defocus and A1 maximising the phase agreement (QFocus-like).

    The CTF of every image is sin(χ_n + β): β = 0 is the weak-phase object; a crystal's
    dynamical amplitude contrast (ψ − 1 ≈ c·R(r) with R real and one complex c, the channelling
    picture: the image term 2|c| R cos(χ − arg c)) is a β ≠ 0, fitted with the defocus when
    ``amplitude_contrast`` (otherwise β = 0, the weak-phase assumption). Measured: with β free
    the start moved by 1.3 nm on a synthetic pure-phase crystal and did not come within 1 nm
    on the simulator's SrTiO3 (β trades against defocus on the few low-order reflections), so
    it is off by default; crystals are better served by ``FocalParams(crystal=True)``.
    Coarse trials (0.5 nm) over center ± range, then 0.1 nm around the best; per azimuth
    sector over ±``SECTOR_HALF_RANGE_NM`` (the sector optima differ by up to ±|A1|); A1 from the
    sector optima (:func:`fit_sectors`), refined jointly by Nelder–Mead on the total. A1 is
    reported only when the sectors determine it with 1σ ≤ ``MAX_A1_SIGMA_NM`` per component
    (``astigmatism_determined``; ``astigmatism_uncertainty_nm`` is given either way);
    otherwise A1 = 0 and the start comes from the A1-free fit. Measured on the simulator's
    crystal-only fields (9 images, 1000 e/Å², truth A1 = 0 or 2 nm): SrTiO3 1 nm 0.14 ± 1.3 nm
    (truth 0) and 0.6 ± 1.9 nm (truth 2), Si [110] 2 nm undetermined (too few sectors with
    signal) — i.e. sector A1 on a crystal is not reliable at this dose; the crystal mode of
    :func:`~.register.register_focal_series` fits A1 from rings of equal |g| instead.
    """
    env_s = bt.spatial(center_nm + rel_defocus_nm)
    if mask is not None:  # frequencies an image does not contribute: no CTF there either
        env_s = env_s * mask
    mag = np.sqrt(np.sum(np.abs(spectra) ** 2, axis=0)).astype(np.float32)
    betas = BETA_TRIALS if amplitude_contrast else np.zeros(1)
    score = _Scorer(spectra, bt, rel_defocus_nm, env_s, mag, betas)
    fit, spots, inside, beta = _sector_scan(score, spectra, band, center_nm, range_nm, n_sectors)
    if not fit_astigmatism:
        return fit
    angles, sw = fit.sector_angles_deg, fit.sector_weights
    sectors = fit_sectors(fit.sector_defocus_nm, angles, sw, spots, inside)
    fit.astigmatism_determined = sectors.determined
    fit.astigmatism_uncertainty_nm = sectors.sigma_nm
    if not sectors.determined:  # say so rather than invent an A1: start defocus alone
        return fit
    x0 = np.array([fit.start_nm, *sectors.coef[1:3], beta][: 4 if amplitude_contrast else 3])
    res = _joint_refinement(score, basis, x0)
    if sectors.sigma_nm > MAX_A1_SIGMA_NM:  # too uncertain to report: the start alone
        fit.astigmatism_determined = False
        return fit
    fit.start_nm, fit.astigmatism_cartesian_nm = float(res.x[0]), np.array(res.x[1:3])
    fit.amplitude_contrast_deg = math.degrees(float(res.x[3])) if amplitude_contrast else 0.0
    return fit


class _Scorer:
    """The agreement of one series, weighted by |S| and summed per sector mask (the scores
    :func:`fit_start_phase_agreement` maximises)."""

    def __init__(self, spectra, bt, rel_defocus_nm, env_s, mag, betas):
        self.spectra, self.bt, self.rel, self.env_s = spectra, bt, rel_defocus_nm, env_s
        self.mag, self.weight, self.betas = mag, mag, betas

    def grid(self, trials, masks, beta=None, extra=None) -> np.ndarray:
        """(β, k, sectors) scores of trial starts (all β trials, or the one ``beta``)."""
        terms = agreement_terms(self.spectra, self.bt, self.rel, trials, self.env_s, extra)
        a = agreement_from_terms(terms, self.mag, self.betas if beta is None else np.array([beta]))
        return (a * self.weight) @ masks.T.astype(np.float32)

    def total(self, start_nm: float, extra: np.ndarray, beta: float) -> float:
        """The weighted agreement of one start with an extra χ term and β."""
        a = phase_agreement(
            self.spectra, self.bt, self.rel, np.array([start_nm]), self.env_s, extra,
            AGREEMENT_CHUNK, beta,
        )  # fmt: skip
        return float((a[0] * self.weight).sum())


def _sector_scan(score: _Scorer, spectra, band, center_nm, range_nm, n_sectors):
    """The start (coarse grid, then fine, β with it) and the per-sector optima around it: the
    A1-free :class:`AgreementFit`, per sector its strong-frequency count and whether its
    optimum lies inside the trials, and the fitted β (rad)."""
    coarse = center_nm + np.arange(-range_nm, range_nm + 1e-9, COARSE_STEP_NM)
    all_b = np.ones((1, band.size), bool)
    tot = score.grid(coarse, all_b)[:, :, 0]  # (β, k)
    jb = int(np.unravel_index(np.argmax(tot), tot.shape)[0])
    total = tot[jb]
    best = parabolic_peak(coarse, total)
    fine = best + np.arange(-FINE_HALF_RANGE_NM, FINE_HALF_RANGE_NM + 1e-9, FINE_STEP_NM)
    tot_f = score.grid(fine, all_b)[:, :, 0]
    jb = int(np.unravel_index(np.argmax(tot_f), tot_f.shape)[0])
    beta = float(score.betas[jb])
    masks = sector_masks(band, n_sectors)
    start = parabolic_peak(fine, tot_f[jb])
    # sectors: a wider window, the sector optima differ by up to ±|A1|
    wide = start + np.arange(-SECTOR_HALF_RANGE_NM, SECTOR_HALF_RANGE_NM + 1e-9, FINE_STEP_NM)
    sec = score.grid(wide, masks, beta)[0]
    angles = (np.arange(n_sectors) + 0.5) * 180.0 / n_sectors
    sector_def = np.array([parabolic_peak(wide, sec[:, j]) for j in range(n_sectors)])
    sw = (score.weight[None] * masks).sum(axis=1)
    spots = (masks & spot_mask(spectra)[None]).sum(axis=1)
    inside = np.array([peak_inside(sec[:, j]) for j in range(n_sectors)])
    fit = AgreementFit(
        start, np.zeros(2), angles, sector_def, coarse, total, math.degrees(beta), math.nan,
        False, sw,
    )  # fmt: skip
    return fit, spots, inside, beta


def _joint_refinement(score: _Scorer, basis: np.ndarray, x0: np.ndarray):
    """Nelder–Mead on (start, A1c, A1s[, β]) of the total agreement from ``x0``."""

    def neg(x):
        extra = (x[1] * basis[1] + x[2] * basis[2])[None]
        b = x[3] if len(x) > 3 else 0.0
        return -score.total(x[0], extra, b)

    start_simplex = simplex(x0, JOINT_SIMPLEX_STEPS[: len(x0)])
    return minimize(
        neg, x0, method="Nelder-Mead",
        options={"xatol": JOINT_XTOL, "fatol": JOINT_FTOL, "initial_simplex": start_simplex},
    )  # fmt: skip


def agreement_absolute(
    prob: Problem, d_abs, shifts, ok, basis: np.ndarray, range_nm: float
) -> ChiFit:
    """The registration's absolute correction (δC1 nm, δA1) by phase agreement
    (``FocalParams(absolute="phase_agreement")``): the start defocus of the aligned ``ok``
    images around the first image's current defocus."""
    aligned = prob.spectra * shift_phase(prob.band, shifts)
    ref_d = float(d_abs[0])
    fit = fit_start_phase_agreement(
        aligned[ok], prob.bt, basis, prob.band, (d_abs - ref_d)[ok], ref_d, range_nm,
        fit_astigmatism=prob.params.fit_astigmatism, mask=prob.mask[ok],
    )  # fmt: skip
    return ChiFit(fit.start_nm - ref_d, fit.astigmatism_cartesian_nm)


@dataclass
class SectorFit:
    """C1(θ) = C1 + A1c cos 2θ + A1s sin 2θ fitted to per-sector defoci (nm)."""

    coef: np.ndarray
    sigma_nm: float
    used: np.ndarray
    determined: bool


def peak_inside(y: np.ndarray) -> bool:
    """The maximum of a trial curve is an interior point (not at the edge of the trials)."""
    j = int(np.argmax(y))
    return 0 < j < len(y) - 1


def fit_sectors(
    sector_defocus_nm: np.ndarray,
    angles_deg: np.ndarray,
    weights: np.ndarray,
    spots: np.ndarray,
    inside: np.ndarray,
) -> SectorFit:
    """Weighted least squares of C1(θ) over the usable sectors, with an honest uncertainty.

    A sector is used when it holds ≥ ``MIN_SECTOR_SPOTS`` strong frequencies, ≥
    ``MIN_SECTOR_WEIGHT`` of the mean weight and its optimum lies inside the trial range. A1 is
    *determined* only with ≥ 4 such sectors (one degree of freedom for the scatter) whose
    angles constrain both components (conditioning ≥ ``MIN_SECTOR_CONDITIONING``); otherwise
    the caller reports no A1. ``sigma_nm``: 1σ of each Cartesian A1 component from the
    residual scatter, s² (DᵀWD)⁻¹ with s² = Σ w r² / (n − 3) (weights normalised to mean 1).
    """
    w = np.asarray(weights, np.float64)
    ok = (spots >= MIN_SECTOR_SPOTS) & (w >= MIN_SECTOR_WEIGHT * w.mean()) & inside
    t = np.radians(2.0 * np.asarray(angles_deg))
    design = np.stack([np.ones_like(t), np.cos(t), np.sin(t)], axis=1)
    if ok.sum() < 4:
        return SectorFit(np.zeros(3), math.nan, ok, False)
    d, y, wn = design[ok], sector_defocus_nm[ok], w[ok] / w[ok].mean()
    normal = d.T @ (wn[:, None] * d)
    block = np.linalg.eigvalsh(normal[1:, 1:])
    if block[0] < MIN_SECTOR_CONDITIONING * block[1]:
        return SectorFit(np.zeros(3), math.nan, ok, False)
    coef = np.linalg.solve(normal, d.T @ (wn * y))
    r = y - d @ coef
    s2 = float(np.sum(wn * r * r)) / (ok.sum() - 3)
    cov = s2 * np.linalg.inv(normal)
    sigma = math.sqrt(max(0.5 * (cov[1, 1] + cov[2, 2]), 0.0))
    return SectorFit(coef, sigma, ok, True)
