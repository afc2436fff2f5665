"""Joint relative defocus: one least-squares solution for all focus values of a series.

One job: turn the per-image defocus estimates of the wave passes — each image matched against
the wave restored from all the others, its neighbours and the reference included — into one
solution for all images at once, so that no single image (the reference least of all) passes its
own error on to the others. The solution minimises

    Σ_i (d_i − m_i)² / σ_i²  +  Σ_i (d_i − a − b·D_i)² / σ_p²

over the focus values d and the line (a, b): m_i the measured defocus, D_i the nominal one, σ_p
(``FocalParams.focus_line_sigma_nm``) the expected scatter of the true focus about a straight
line in the nominal defocus (the linear-drift prior: a constant step plus a focal drift linear in
time; None switches it off and d = m). σ_i² = σ_m² (h̄/h_i)² with h_i the image's correlation
peak, and σ_m² = max(s² − σ_p², 0) from the scatter s² of m about the line (empirical Bayes): a
series whose estimates already lie on a line within σ_p is left as it is.

Conventions: defocus in nm (C1 < 0 underfocus); images not used (``ok`` False) keep their own
estimate and do not enter the line.
"""

from __future__ import annotations

import numpy as np

from scherzer.processing.focal.settings import FOCUS_LINE_SIGMA_NM

__all__ = ["joint_defocus"]

MIN_LINE_IMAGES = 4  # the prior needs a scatter estimate: ≥ 4 images for 2 line parameters
PEAK_FLOOR = 0.01  # peaks are floored here before weighting (a 0 peak: no information)


def _weighted_line(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(a, b) of the weighted least-squares line y ≈ a + b x."""
    design = np.stack([np.ones_like(x), x], axis=1)
    normal = design.T @ (w[:, None] * design)
    return np.linalg.solve(normal, design.T @ (w * y))


def joint_defocus(
    defocus_nm: np.ndarray,
    nominal_nm: np.ndarray,
    peaks: np.ndarray,
    ok: np.ndarray,
    line_sigma_nm: float | None = FOCUS_LINE_SIGMA_NM,
    slope: float | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """The joint solution d (n,) nm (module doc) and its diagnostics (``measurement_sigma_nm``
    σ_m, ``shrink`` the mean factor σ_p²/(σ_p² + σ_i²) applied to the residuals about the line;
    1 = unchanged). ``slope`` (the step scale measured otherwise, e.g. on a thick crystal's
    Bragg spots, :mod:`.misfit`) replaces the slope of the per-image estimates first: they are
    tilted about their weighted centroid (the mean defocus stays), keeping their deviations
    from a line (focal drift, hysteresis) but not the trend they share."""
    m = np.asarray(defocus_nm, np.float64)
    if int(np.sum(ok)) < MIN_LINE_IMAGES or (line_sigma_nm is None and slope is None):
        return m.copy(), {"measurement_sigma_nm": float("nan"), "shrink": 1.0}
    x, h = np.asarray(nominal_nm, np.float64)[ok], np.maximum(np.asarray(peaks)[ok], PEAK_FLOOR)
    rel_var = (np.mean(h) / h) ** 2  # σ_i² / σ_m²
    coef = _weighted_line(x, m[ok], 1.0 / rel_var)
    if slope is not None:
        centroid = float(np.sum(x / rel_var) / np.sum(1.0 / rel_var))
        m = m.copy()
        m[ok] += (float(slope) - coef[1]) * (x - centroid)
        coef = _weighted_line(x, m[ok], 1.0 / rel_var)
        if line_sigma_nm is None:  # no prior: the tilt alone
            return m, {"measurement_sigma_nm": float("nan"), "shrink": 1.0}
    resid = m[ok] - (coef[0] + coef[1] * x)
    s2 = float(np.sum(resid**2 / rel_var) / np.sum(1.0 / rel_var)) * ok.sum() / (ok.sum() - 2)
    sp2 = float(line_sigma_nm) ** 2
    sm2 = max(s2 - sp2, 0.0)
    var = sp2 + sm2 * rel_var  # total variance of each residual about the line
    coef = _weighted_line(x, m[ok], 1.0 / var)
    line = coef[0] + coef[1] * x
    shrink = sp2 / var
    out = m.copy()
    out[ok] = line + (m[ok] - line) * shrink
    return out, {"measurement_sigma_nm": float(np.sqrt(sm2)), "shrink": float(np.mean(shrink))}
