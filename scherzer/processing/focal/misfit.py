"""Does the one-object-term imaging model fit the series? And a fit that holds when it does not.

One job: after registration, predict every image from the wave restored from the series (the
linear two-sided model plus its quadratic term, :mod:`scherzer.processing.wiener`) and compare
with the measured image spectra — per image on the whole band, and on a crystal's Bragg spots
(:func:`~.problem.spot_mask`), where a thick crystal's dynamical scattering breaks the model
first (:func:`model_fit`). The noise is the same at a spot as at the frequencies of the same |g|
that hold no spot (Poisson noise is white, or shaped radially by the camera NPS, which divides
both), so the residual power on the spots over the residual power of their radial neighbours
is 1 when the model holds and grows with the model error (``spot_ratio``).

When it does not hold (:meth:`ModelFit.fits` False), the per-image defocus of the wave passes
— each image matched on its own, where the dynamical error of the strongest reflections moves
each fitted defocus a little differently, as a trend along the series — is replaced by what a
thick crystal still fixes well: one step scale κ for the whole series, fitted on the Bragg spots
with the restored wave updated at every trial (:func:`~.crystal.fit_step_scale`), and then the
per-image estimates are pulled onto that line by the joint solution (:func:`~.joint.joint_defocus`
with the slope fixed; :func:`step_scale_line`).

Conventions: defocus in nm; ratios are powers (1 = noise only); images not used (``ok`` False)
are still predicted and reported, but enter neither the wave nor the spot set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from scherzer.processing.focal.crystal import step_scale_residual
from scherzer.processing.focal.problem import map_images, spot_mask
from scherzer.processing.focal.search import parabolic_peak
from scherzer.processing.spectral import shift_phase
from scherzer.processing.wiener import linear_prediction, quadratic_term, solve_series

if TYPE_CHECKING:
    from scherzer.processing.focal.problem import Problem

__all__ = ["ModelFit", "model_fit", "step_scale_line"]

# The residual power on the Bragg spots may exceed the noise (the residual of their radial
# neighbours) by this factor before the model counts as failing. A factor 2 means the model
# error on the spots is as large as the noise there: below that, a fit cannot tell a better
# model from noise, above it the spots' residual is mostly the model's. Measured (series spot
# ratio): synthetic weak- and strong-phase objects imaged by the model 0.93 / 1.19; abTEM SrTiO3
# edges under a-C 10.4 (4 cells, 400 e/Å²), 46.7 (4 cells, 4000 e/Å²), 20–24 (8 cells, 150
# e/Å²); the simulator's 3 nm SrTiO3 edge 42 (512²) / 29 (256²); tests/test_focal_abtem.py.
MAX_SPOT_RATIO = 2.0
MISFIT_RADIAL_BINS = 32  # radial bins of the noise estimate (elements per bin ≫ spots per bin)
# The fallback's κ search: three residuals κ0 + (−h, 0, h) about the registration's own step
# scale κ0 with h = this (its trend error was 0.2–2.1 % on the abTEM and simulator edges), the
# bracket moved while its minimum is at an edge (at most FALLBACK_MOVES times), then a parabola,
# and again with h/4 about the vertex: 6–8 restorations instead of a grid and Brent's ~13
FALLBACK_STEP = 0.02
FALLBACK_MOVES = 3
FALLBACK_ROUNDS = 2


@dataclass
class ModelFit:
    """How well the one-object-term model predicts the series (module doc).

    ``residual_fraction`` (n,): per image, residual power over the image's power on the band
    (0 = predicted exactly); ``spot_ratio`` (n,): per image, residual power on the spots over
    the noise expected there; ``series_spot_ratio`` the same over all used images.
    """

    residual_fraction: np.ndarray
    spot_ratio: np.ndarray
    series_spot_ratio: float
    spots: int

    @property
    def fits(self) -> bool:
        """The model holds on the spots within ``MAX_SPOT_RATIO`` (NaN: no spots, holds)."""
        return not self.series_spot_ratio > MAX_SPOT_RATIO

    def to_json(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "series_spot_ratio": _finite(self.series_spot_ratio),
            "max_spot_ratio": MAX_SPOT_RATIO,
            "spots": int(self.spots),
            "residual_fraction": [_finite(v) for v in self.residual_fraction],
            "spot_ratio": [_finite(v) for v in self.spot_ratio],
        }


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def predicted_residuals(prob: Problem, d_abs, shifts, ok) -> tuple[np.ndarray, np.ndarray]:
    """(aligned spectra (n, m), residual spectra (n, m)) of every image against its prediction
    from the wave restored from the ``ok`` images (one quadratic-term round), on each image's
    band mask."""
    env_s = prob.bt.spatial(d_abs)
    t = prob.bt.transfer(d_abs, env_s)
    aligned = prob.spectra * shift_phase(prob.band, shifts)
    sol = solve_series(
        aligned[ok], t[ok], prob.band, camera=prob.camera, corrections=1, mask=prob.mask[ok]
    )
    a, b = t * prob.camera, prob.band.conj_neg(t) * prob.camera
    pred = linear_prediction(sol.phi, a, b, prob.band)
    pred = pred + quadratic_term(prob.band, sol.phi, t, prob.camera)
    return aligned, (aligned - pred) * prob.mask


def model_fit(prob: Problem, d_abs: np.ndarray, shifts: np.ndarray, ok: np.ndarray) -> ModelFit:
    """The model's fit at the registration's defocus and shifts (module doc)."""
    aligned, res = predicted_residuals(prob, d_abs, shifts, ok)
    power = (np.abs(res) ** 2) * prob.inv_nps  # noise-whitened residual power
    data = np.sum(np.abs(aligned * prob.mask) ** 2, axis=1)
    frac = np.sum(np.abs(res) ** 2, axis=1) / np.maximum(data, 1e-30)
    spots = spot_mask(aligned[ok])
    which, _ = prob.band.radial_bins(MISFIT_RADIAL_BINS)
    quiet = ~spots & prob.mask.any(axis=0)
    n_quiet = np.bincount(which[quiet], None, MISFIT_RADIAL_BINS)
    noise = np.stack([np.bincount(which[quiet], p[quiet], MISFIT_RADIAL_BINS) for p in power])
    noise = noise / np.maximum(n_quiet, 1)[None]  # (n, bins): mean residual power per |g|
    has_noise = n_quiet[which[spots]] > 0
    sw = which[spots][has_noise]
    spot_power = (power[:, spots][:, has_noise] * prob.mask[:, spots][:, has_noise]).sum(axis=1)
    expected = (noise[:, sw] * prob.mask[:, spots][:, has_noise]).sum(axis=1)
    ratio = spot_power / np.maximum(expected, 1e-30)
    series = float(spot_power[ok].sum() / max(float(expected[ok].sum()), 1e-30))
    return ModelFit(frac, ratio, series if has_noise.any() else math.nan, int(has_noise.sum()))


def step_scale_line(
    prob: Problem,
    d_abs: np.ndarray,
    shifts: np.ndarray,
    ok: np.ndarray,
    nominal: np.ndarray,
    ref: int,
) -> tuple[float, float]:
    """(κ, spot residual fraction): the step scale fitted on the Bragg spots with the wave
    restored at every trial (defocus_n = d_ref + κ (nominal_n − nominal_ref),
    :func:`~.crystal.step_scale_residual`), searched about the step the registration found
    (``FALLBACK_STEP``)."""
    others = ok & (np.arange(len(d_abs)) != ref)
    kappa = float(np.polyfit(nominal[others], d_abs[others], 1)[0]) if others.sum() >= 2 else 1.0
    aligned = prob.spectra * shift_phase(prob.band, shifts)
    resid = step_scale_residual(
        prob, aligned[ok], nominal[ok], int(np.sum(ok[:ref])), float(d_abs[ref]), prob.mask[ok]
    )
    cache: dict[float, float] = {}

    def f(k: float) -> float:
        key = round(k, 9)
        if key not in cache:
            cache[key] = resid(k)
        return cache[key]

    h = FALLBACK_STEP
    for _ in range(FALLBACK_ROUNDS):
        for _ in range(FALLBACK_MOVES + 1):
            ks = kappa + h * np.array([-1.0, 0.0, 1.0])
            ys = np.array(map_images(lambda j, ks=ks: f(float(ks[j])), range(len(ks))))
            if int(np.argmin(ys)) == 1:
                break
            kappa = float(ks[int(np.argmin(ys))])
        kappa = parabolic_peak(ks, -ys)
        h /= 4.0
    return kappa, f(kappa)
