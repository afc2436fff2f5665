"""Absolute defocus and two-fold astigmatism from the restored wave.

One job: find the χ error (δC1, δA1) of the model from a wave restored on the band. For a
weak-phase object ψ = 1 + iP the product p(g) = φ(g) φ(−g) has phase π − 2Δχ(g), Δχ being the
χ error; :func:`fit_chi_weak_phase` maximises Re Σ −p/|p|^½ e^{2iΔχ} over C1 and A1 (minimum
amplitude contrast over all annuli and sectors at once). :func:`fit_chi_free_phase` assumes
only ψ − 1 = c·R(r) with R real and one complex c (a crystal's exit wave in the channelling
picture) and fits A1 from rings of equal |g|. :func:`wave_absolute` restores the wave and
applies one of them; :func:`refine_defocus_min_amplitude` optionally refines δC1 for strong
pure-phase objects.

Conventions: defocus and A1 in nm; A1 as (|A1| cos 2φ_A1, |A1| sin 2φ_A1) inside
(:func:`cartesian_a1`, :func:`polar_a1`), φ_A1 in degrees in [0, 180) at the boundary, with
the azimuth φ = atan2(k_y, k_x) of :mod:`scherzer.optics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.fft as sfft
from scipy.optimize import minimize, minimize_scalar

from scherzer.optics import FrequencyGrid, Optics, chi, fft_workers
from scherzer.processing.focal.search import best_of_starts
from scherzer.processing.spectral import SpectralBand, shift_phase
from scherzer.processing.wiener import pair_noise_covariance, solve_series

if TYPE_CHECKING:
    from scherzer.processing.focal.problem import Problem

__all__ = [
    "ChiFit",
    "cartesian_a1",
    "chi_basis",
    "fit_chi_free_phase",
    "fit_chi_weak_phase",
    "model_agreement",
    "polar_a1",
    "refine_defocus_min_amplitude",
    "wave_absolute",
]

COARSE_DEFOCUS_STEP_NM = 0.5  # grid of the δC1 start (finer: slower; coarser: side maxima)
A1_START_NM = 1.5  # the A1 fit also starts from (±this, ±this) nm (cartesian components)
PURE_PHASE_HALF_RANGE_NM = 1.5  # ± range of the minimum-amplitude refinement of δC1
PURE_PHASE_TOL_NM = 0.01  # … and its tolerance
AGREEMENT_QUANTILE = 0.98  # model_agreement is judged on the strongest pairs (above this
# |q| quantile): the rest is mostly noise, which would hide a misfit of the signal
RING_FIT_QUANTILE = 0.98  # the ring fit of A1 uses band elements above this |q| quantile
RING_MIN_CONDITIONING = 0.1  # smallest/largest eigenvalue of the ring design's Gram matrix


def chi_basis(optics: Optics, grid: FrequencyGrid, band: SpectralBand) -> np.ndarray:
    """∂χ/∂(C1, A1·cos 2φ_A, A1·sin 2φ_A) per nm on the band, (3, m) float64."""
    v = optics.voltage_kv
    u0 = chi(Optics(voltage_kv=v), grid, 1.0)
    u1 = chi(Optics(voltage_kv=v, a1_nm=1.0, a1_deg=0.0), grid, 0.0)
    u2 = chi(Optics(voltage_kv=v, a1_nm=1.0, a1_deg=45.0), grid, 0.0)
    return band.gather(np.stack([u0, u1, u2])).astype(np.float64)


def cartesian_a1(a1_nm: float, a1_deg: float) -> np.ndarray:
    """(|A1| cos 2φ, |A1| sin 2φ) nm of A1 = (nm, deg)."""
    t = math.radians(2 * a1_deg)
    return np.array([a1_nm * math.cos(t), a1_nm * math.sin(t)])


def polar_a1(c: np.ndarray) -> tuple[float, float]:
    """(|A1| nm, φ_A1 deg in [0, 180)) of cartesian A1 (2,)."""
    mag = float(math.hypot(c[0], c[1]))
    ang = (math.degrees(math.atan2(c[1], c[0])) / 2.0) % 180.0
    return mag, ang


@dataclass
class ChiFit:
    """A χ-error fit: ``delta_nm`` δC1, ``a1_cartesian_nm`` δA1 (2,); for the ring fit of A1
    also how it was done (``a1_method``) and how well the rings fix it
    (``a1_ring_conditioning``, :func:`ring_conditioning`). ``model_agreement`` ∈ [−1, 1]: how
    well the object model holds at the fit (:func:`model_agreement`; NaN: not evaluated)."""

    delta_nm: float
    a1_cartesian_nm: np.ndarray
    a1_method: str | None = None
    a1_ring_conditioning: float | None = None
    model_agreement: float = math.nan

    def details(self) -> dict[str, Any]:
        """The ring fit's diagnostics for the registration history ({} when none)."""
        if self.a1_ring_conditioning is None:
            return {}
        return {"a1_ring_conditioning": self.a1_ring_conditioning, "a1_method": self.a1_method}


ChiFitter = Callable[..., ChiFit]


def _pair_terms(phi, basis, band, noise_cov12):
    """q = −p/|p|^½ on one of each (g, −g) pair (p = φ(g)φ(−g) minus its noise part), the
    basis there, and the pair selection ``half``."""
    half = (band.gy > 0) | ((band.gy == 0) & (band.gx > 0))  # p(g) = p(−g): one of each pair
    p = phi[half].astype(np.complex128) * phi[band.neg][half]
    if noise_cov12 is not None:
        p = p - noise_cov12[half]
    q = -p / np.maximum(np.abs(p), 1e-30) ** 0.5
    return q, basis[:, half], half


def _defocus_start(q, basis, range_nm: float, j_and_grad, score) -> tuple[np.ndarray, np.ndarray]:
    """(x0, x): the best δC1 on a ``COARSE_DEFOCUS_STEP_NM`` grid over ± ``range_nm`` by
    ``score`` of e = q e^{2iδu}, and BFGS from it."""
    step = COARSE_DEFOCUS_STEP_NM
    coarse = np.arange(-range_nm, range_nm + 1e-9, step)
    e = q * np.exp(2j * coarse[0] * basis[0])
    rot = np.exp(2j * step * basis[0])
    vals = np.empty(coarse.size)
    for k in range(coarse.size):  # e^{2iδu} by repeated rotation: one multiply per trial
        vals[k] = score(e)
        e *= rot
    x0 = np.array([coarse[int(np.argmax(vals))]])
    return x0, minimize(j_and_grad, x0, jac=True, method="BFGS").x


def fit_chi_weak_phase(
    phi: np.ndarray,
    basis: np.ndarray,
    band: SpectralBand,
    range_nm: float,
    fit_astigmatism: bool = True,
    noise_cov12: np.ndarray | None = None,
) -> ChiFit:
    """χ error of a restored weak-phase wave φ (band): maximises J = Re Σ q(g) e^{2iΔχ(g)} with
    q = −p/|p|^½, p = φ(g)φ(−g) minus its noise part ``noise_cov12`` (see
    :func:`~scherzer.processing.spectral.pair_noise_covariance`), over C1 (± ``range_nm``) and
    A1 (module doc)."""
    q, basis, _ = _pair_terms(phi, basis, band, noise_cov12)
    j_and_grad = phase_objective(q, basis, None)  # arg p = π: no free phase
    _, x = _defocus_start(q, basis, range_nm, j_and_grad, lambda e: e.real.sum())
    if not fit_astigmatism:
        return ChiFit(float(x[0]), np.zeros(2), model_agreement=model_agreement(q, basis, x, False))
    a = A1_START_NM
    x = best_of_starts(j_and_grad, ([x[0], 0.0, 0.0], [x[0], a, a], [x[0], -a, -a])).x
    agree = model_agreement(q, basis, x, False)
    return ChiFit(float(x[0]), np.array([x[1], x[2]]), model_agreement=agree)


def fit_chi_free_phase(
    phi: np.ndarray,
    basis: np.ndarray,
    band: SpectralBand,
    range_nm: float,
    fit_astigmatism: bool = True,
    noise_cov12: np.ndarray | None = None,
) -> ChiFit:
    """χ error of a wave c·R(r) (R real, one unknown complex c: a crystal's exit wave in the
    channelling picture, amplitude and phase contrast in a fixed ratio): arg p = 2 arg c −
    2Δχ, so J = |Σ q e^{2iΔχ}| is maximised. A1 is fitted first with a free phase per ring of
    equal |g| (symmetry-equivalent reflections share c, so within a ring only A1 changes
    arg p), then the defocus with A1 fixed; when the rings cannot fix both A1 components
    (:func:`ring_conditioning` below ``RING_MIN_CONDITIONING``, e.g. a rectangular lattice with
    few equivalent reflections) the joint free-phase fit is used."""
    q, basis, half = _pair_terms(phi, basis, band, noise_cov12)
    j_and_grad = phase_objective(q, basis, np.zeros(q.size, np.int64))  # one free phase: 2 arg c
    x0, x = _defocus_start(q, basis, range_nm, j_and_grad, lambda e: abs(e.sum()))
    if not fit_astigmatism:
        return ChiFit(float(x[0]), np.zeros(2), model_agreement=model_agreement(q, basis, x, True))
    ny, nx = band.shape
    rings = np.rint(np.hypot(band.gy[half] * ny, band.gx[half] * nx)).astype(np.int64)
    # only the strong elements (the spots): a ring of noise alone fits any A1
    keep = np.abs(q) >= np.quantile(np.abs(q), RING_FIT_QUANTILE)
    rings = np.where(keep, rings, rings.max() + 1)
    qk = np.where(keep, q, 0)
    ring_obj = phase_objective(qk, basis[1:], rings)
    a = A1_START_NM
    ast = best_of_starts(ring_obj, ([0.0, 0.0], [a, a], [-a, -a])).x
    cond = ring_conditioning(np.abs(qk), basis[1:], rings)
    if cond < RING_MIN_CONDITIONING:  # one A1 direction unconstrained: the joint fit
        x = best_of_starts(j_and_grad, ([x[0], *ast], [x[0], 0.0, 0.0]))
        method = "joint free phase (rings ill-conditioned)"
        agree = model_agreement(q, basis, x.x, True)
        return ChiFit(float(x.x[0]), np.array(x.x[1:3]), method, cond, agree)
    fixed = q * np.exp(2j * (ast @ basis[1:]))
    c1_obj = phase_objective(fixed, basis[:1], np.zeros(q.size, np.int64))
    x = minimize(c1_obj, x0, jac=True, method="BFGS").x
    agree = model_agreement(q, basis, np.array([x[0], *ast]), True)
    return ChiFit(float(x[0]), np.asarray(ast, float), "rings of equal |g|", cond, agree)


def model_agreement(q: np.ndarray, basis: np.ndarray, x: np.ndarray, free_phase: bool) -> float:
    """How well the object model holds at the χ error x: J/Σ|q| with J the fit's objective
    (Re Σ q e^{2iΔχ} for a weak-phase object, |Σ q e^{2iΔχ}| for one free complex c), in
    [−1, 1]; 1 when every frequency pair obeys the model exactly. A thick crystal whose
    columns need different c (dynamical scattering) scores low: its absolute defocus is then
    not trustworthy."""
    keep = np.abs(q) >= np.quantile(np.abs(q), AGREEMENT_QUANTILE)
    b = basis[: len(x), keep]
    e = q[keep] * np.exp(2j * (np.asarray(x, float) @ b))
    total = float(np.sum(np.abs(q[keep]))) + 1e-30
    return float(abs(e.sum()) if free_phase else e.real.sum()) / total


def wave_absolute(
    prob: Problem,
    d_abs: np.ndarray,
    shifts: np.ndarray,
    ok: np.ndarray,
    basis: np.ndarray,
    range_nm: float,
    corrections: int,
    fit: ChiFitter,
) -> ChiFit:
    """The χ error of the wave restored from the ``ok`` images of ``prob`` (aligned by
    ``shifts``, at ``d_abs``; ``corrections`` quadratic-term rounds), by ``fit``
    (:func:`fit_chi_weak_phase` or :func:`fit_chi_free_phase`); δC1 refined by
    :func:`refine_defocus_min_amplitude` with ``FocalParams.pure_phase_refinement``."""
    p = prob.params
    aligned = prob.spectra * shift_phase(prob.band, shifts)
    t = prob.bt.transfer(d_abs[ok], prob.bt.spatial(d_abs[ok]))
    sol = solve_series(
        aligned[ok], t, prob.band, camera=prob.camera, corrections=corrections,
        mask=prob.mask[ok],
    )  # fmt: skip
    cov12 = pair_noise_covariance(sol.terms.sums(), 1.0 / sol.prior)
    result = fit(sol.phi, basis, prob.band, range_nm, p.fit_astigmatism, cov12)
    if p.pure_phase_refinement:
        result.delta_nm = refine_defocus_min_amplitude(
            sol.phi, basis, prob.band, result.delta_nm, result.a1_cartesian_nm
        )
    return result


def ring_conditioning(w: np.ndarray, basis: np.ndarray, rings: np.ndarray) -> float:
    """How well rings of equal |g| fix both A1 components: λ_min/λ_max of the weighted Gram
    matrix of the A1 basis with each ring's (weighted) mean removed (0: one direction free)."""
    n = int(rings.max()) + 1
    wsum = np.bincount(rings, w, n) + 1e-30
    centred = [b - (np.bincount(rings, w * b, n) / wsum)[rings] for b in basis[:2]]
    g = np.array([[np.sum(w * ci * cj) for cj in centred] for ci in centred])
    ev = np.linalg.eigvalsh(g)
    return float(ev[0] / max(ev[1], 1e-30))


def phase_objective(q: np.ndarray, basis: np.ndarray, groups: np.ndarray | None) -> Any:
    """(−J, −∇J) of x (len ≤ rows of ``basis``) with e = q e^{2i x·basis}.

    ``groups`` None: J = Re Σ e (the weak-phase relation, arg p = π). Otherwise each group
    has its own free phase: J = Σ_groups |Σ_{g∈group} e|; ∇J = Σ Re(z̄/|z| · 2i basis e).
    """

    def f(x: np.ndarray) -> tuple[float, np.ndarray]:
        b = basis[: len(x)]
        e = q * np.exp(2j * (x @ b))
        if groups is None:
            return -float(e.real.sum()), 2.0 * (b @ e.imag)
        n = int(groups.max()) + 1
        z = np.bincount(groups, e.real, n) + 1j * np.bincount(groups, e.imag, n)
        r = np.abs(z) + 1e-30
        w = (np.conj(z) / r)[groups]
        return -float(r.sum()), -2.0 * (b @ (w * 1j * e).real)

    return f


def refine_defocus_min_amplitude(
    phi: np.ndarray,
    basis: np.ndarray,
    band: SpectralBand,
    delta_nm: float,
    ast: np.ndarray,
    half_range_nm: float = PURE_PHASE_HALF_RANGE_NM,
) -> float:
    """Refine δC1 so that the propagated wave 1 + F⁻¹[φ e^{iΔχ}] has the least amplitude
    variance (a pure phase object, without the weak-phase linearisation: strong objects).

    Evaluated on the band's alias-free product box; Brent within ±``half_range_nm``.
    """
    (by, bx), pos = band.product_box
    scale = np.float32(by * bx / (band.shape[0] * band.shape[1]))
    fixed = ast[0] * basis[1] + ast[1] * basis[2]

    def amp_var(d: float) -> float:
        grid = np.zeros(by * bx, np.complex64)
        grid[pos] = phi * np.exp(1j * (d * basis[0] + fixed)).astype(np.complex64) * scale
        wave = sfft.ifft2(grid.reshape(by, bx), workers=fft_workers()) + np.complex64(1.0)
        return float(np.var(np.abs(wave)))

    res = minimize_scalar(
        amp_var,
        bounds=(delta_nm - half_range_nm, delta_nm + half_range_nm),
        method="bounded",
        options={"xatol": PURE_PHASE_TOL_NM},
    )
    return float(res.x)
