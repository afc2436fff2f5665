"""How smooth a frame's line functions are, and how far each line's own estimate strays
beyond its noise, estimated from the lines themselves (restricted maximum likelihood).

Every scan line r gives its own estimate z_r of a line-function component (its normal
equations solved on their own) with the noise variance v_r = σ²·(H_r⁻¹)_cc that the
residual noise σ² (measured from the frame's residuals) and the line's contrast imply. The
model: z_r = u_r + ε_r, where u is smooth — its second differences are white with precision
κ (a random walk of the slope, the prior behind the second-difference penalty) — and
ε_r ~ N(0, v_r + τ²): the line's noise plus an error of variance τ² that every line carries
whatever its contrast (what the per-line noise model misses: interpolation and reference
error, pick-up faster than the prior allows). κ and τ² maximise the restricted likelihood
of the z (Patterson & Thompson 1971; for smoothing splines Wahba 1985): no smoothing width
to tune, and a line whose estimate is no better than τ² does not pull the fit however much
contrast it has.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import linalg, optimize

__all__ = ["LinePrior", "line_variances", "restricted_likelihood"]

# search ranges (natural log) around the scale of the mean line noise v̄: κ·v̄ (λ, the
# penalty relative to the mean line precision) and τ²/v̄
LOG_KAPPA_SPAN = 14.0
LOG_TAU_RANGE = (-12.0, 6.0)
# Nelder–Mead starts (log κ·v̄, log τ²/v̄): little / some / much error beyond the noise
STARTS = ((0.0, -6.0), (0.0, -1.0), (3.0, 0.0))
TOLERANCE = 0.05  # on the log parameters


@functools.lru_cache(maxsize=8)
def second_difference_bands(ny: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DᵀD of second differences: the pentadiagonal (ny, ny) band's offsets 0, 1, 2 (read-only
    and cached: the likelihood search asks for the same size thousands of times)."""
    d0 = np.full(ny, 6.0)
    d0[[0, -1]], d0[[1, -2]] = 1.0, 5.0
    d1 = np.full(ny - 1, -4.0)
    d1[[0, -1]] = -2.0
    bands = (d0, d1, np.ones(ny - 2))
    for band in bands:
        band.flags.writeable = False
    return bands


def restricted_likelihood(z: np.ndarray, v: np.ndarray, log_kappa: float, log_tau2: float) -> float:
    """−2·log restricted likelihood (up to a constant) of the line estimates ``z`` (ny,) with
    noise variances ``v`` (ny,) under the module's model: with W = diag(1/(v + τ²)) and the
    smooth fit û = (W + κP)⁻¹Wz (P = DᵀD), −log|W| − (n−2)·log κ + log|W + κP| +
    (z − û)ᵀW(z − û) + κ·ûᵀPû."""
    ny = len(z)
    d0, d1, d2 = second_difference_bands(ny)
    weight = 1.0 / (v + math.exp(log_tau2))
    kappa = math.exp(log_kappa)
    ab = np.zeros((3, ny))  # upper banded form of W + κP
    ab[2] = weight + kappa * d0
    ab[1, 1:] = kappa * d1
    ab[0, 2:] = kappa * d2
    chol = linalg.cholesky_banded(ab, check_finite=False)
    u = linalg.cho_solve_banded((chol, False), weight * z, check_finite=False)
    fit = float(weight @ (z - u) ** 2) + kappa * float(np.sum(np.diff(u, 2) ** 2))
    logdet = 2.0 * float(np.sum(np.log(chol[2])))
    return -float(np.sum(np.log(weight))) - (ny - 2) * log_kappa + logdet + fit


def line_variances(lines: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """(κ, τ²) maximising the summed :func:`restricted_likelihood` of ``lines``, pairs (z, v)
    of line estimates and their noise variances (one frame, or every frame of a series);
    deterministic (the best of fixed Nelder–Mead starts, the search confined to ranges
    around the mean noise)."""
    scale = math.log(max(float(np.mean([np.mean(v) for _, v in lines])), 1e-300))
    lo, hi = -scale - LOG_KAPPA_SPAN, -scale + LOG_KAPPA_SPAN
    tlo, thi = scale + LOG_TAU_RANGE[0], scale + LOG_TAU_RANGE[1]

    def objective(p: np.ndarray) -> float:
        a, b = min(max(p[0], lo), hi), min(max(p[1], tlo), thi)
        outside = (p[0] - a) ** 2 + (p[1] - b) ** 2  # a steep wall beyond the ranges
        return sum(restricted_likelihood(z, v, a, b) for z, v in lines) + 1e3 * outside

    best = None
    for a, b in STARTS:
        found = optimize.minimize(
            objective, np.array([a - scale, b + scale]), method="Nelder-Mead",
            options={"xatol": TOLERANCE, "fatol": 1e-3},
        )  # fmt: skip
        if best is None or found.fun < best.fun:
            best = found
    assert best is not None
    a, b = min(max(best.x[0], lo), hi), min(max(best.x[1], tlo), thi)
    return math.exp(a), math.exp(b)


class LinePrior:
    """(κ, τ²) per line-function component for a series: in a cycle every frame's lines are
    recorded (:meth:`variances`); :meth:`pool` then estimates one pair per component from
    all frames together (the frames of one series share their distortion's statistics; a
    frame's own estimate from its few hundred lines wanders), used from the next cycle on.
    Before the first pooling every frame uses its own estimate."""

    def __init__(self) -> None:
        self.pooled: dict[int, tuple[float, float]] = {}
        self.recorded: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def variances(self, frame: int, component: int, z: np.ndarray, v: np.ndarray):
        """(κ, τ²) for ``component`` of ``frame``, whose lines (z, v) are recorded."""
        self.recorded[(frame, component)] = (z, v)  # one key per frame: thread-safe
        if component in self.pooled:
            return self.pooled[component]
        return line_variances([(z, v)])

    def pool(self) -> None:
        """Pool the lines recorded since the last call (in frame order: deterministic)."""
        for component in sorted({c for _, c in self.recorded}):
            keys = sorted(k for k in self.recorded if k[1] == component)
            self.pooled[component] = line_variances([self.recorded[k] for k in keys])
        self.recorded = {}
