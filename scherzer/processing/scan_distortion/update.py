"""One Gauss–Newton step of a frame's distortion model against a reference.

The frame S (scan coordinates) is compared with the reference R seen in the same orientation
at the model's positions q = p + u(p): S(p) ≈ g·R(q) + o (a gain and offset fitted per step).
Linearising R(q + δ) ≈ R(q) + ∇R·δ gives the normal equations of every model component:
6×6 for the affine, one 2×2 (row-locked) or 3×3 (row-fitting) system per scan line whose
sums are smoothed along the slow axis (Gaussian σ = ``smoothing_px``), or a 2×2 system per
pixel smoothed in 2-D (unconstrained). A damping term keeps directions without contrast (a
line along a lattice plane) from moving.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from scherzer.processing.scan_distortion.kernels import sample_bilinear, sample_spline
from scherzer.processing.scan_distortion.model import FrameModel

__all__ = ["Target", "gauss_newton_step"]

DAMPING = 1e-3  # Levenberg damping relative to the mean curvature: stability against speed
ROW_START_SKIP = 0.03  # fraction of each line (after flyback, probe settling) that does not vote
MIN_SEEN = 0.999  # a sample counts only if the reference is seen there (bilinear seen-mask)


@dataclass
class Target:
    """What one frame is registered to: the reference's spline coefficients and its seen-mask
    (both in the frame's scan orientation)."""

    coeffs: np.ndarray
    seen: np.ndarray


def _residuals(
    frame: np.ndarray, target: Target, model: FrameModel, i: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(weights, residual e, g·∂R/∂y, g·∂R/∂x) on the scan grid."""
    ny, nx = frame.shape
    dy, dx = model.grid_displacement(i, (ny, nx))
    qy = np.arange(ny)[:, None] + dy
    qx = np.arange(nx)[None, :] + dx
    val, gy, gx = sample_spline(target.coeffs, qy, qx, gradient=True)
    seen = sample_bilinear(target.seen, qy, qx)
    w = (seen >= MIN_SEEN).astype(np.float32)
    w[:, : round(ROW_START_SKIP * nx)] = 0.0
    sw = float(w.sum())
    if sw < 0.05 * w.size:
        return np.zeros_like(w), np.zeros_like(w), gy, gx
    mv, ms = float((w * val).sum() / sw), float((w * frame).sum() / sw)
    var = float((w * (val - mv) ** 2).sum())
    gain = float((w * (val - mv) * (frame - ms)).sum()) / var if var > 0 else 1.0
    gain = gain if gain > 1e-6 else 1.0
    e = frame - (gain * (val - mv) + ms)
    return w, (w * e).astype(np.float32), gain * gy, gain * gx


def _solve_batched(h: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Damped solutions of (…, k, k) systems."""
    k = h.shape[-1]
    trace = np.trace(h, axis1=-2, axis2=-1)
    scale = DAMPING * max(float(np.mean(trace)) / k, 1e-12)
    return np.linalg.solve(h + scale * np.eye(k), b[..., None])[..., 0]


def _affine_step(w, e, gy, gx, nx) -> np.ndarray:
    ny = w.shape[0]
    rr = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2)[:, None]
    cc = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2)[None, :]
    one = np.ones_like(gy)
    basis = np.stack([gy * one, gy * rr, gy * cc, gx * one, gx * rr, gx * cc]).reshape(6, -1)
    wb = basis * w.reshape(1, -1)
    h = (wb @ basis.T).astype(np.float64)
    b = (basis @ e.reshape(-1)).astype(np.float64)
    return _solve_batched(h[None], b[None])[0]


def _row_sums(w, e, terms) -> tuple[np.ndarray, np.ndarray]:
    """Per-line normal equations (ny, k, k), (ny, k) of the Jacobian columns ``terms``."""
    k = len(terms)
    h = np.empty((w.shape[0], k, k))
    b = np.empty((w.shape[0], k))
    for a in range(k):
        b[:, a] = (terms[a] * e).sum(axis=1)
        for j in range(a, k):
            h[:, a, j] = h[:, j, a] = (w * terms[a] * terms[j]).sum(axis=1)
    return h, b


def _row_step(w, e, gy, gx, nx, sigma, rotation, jitter) -> tuple[np.ndarray, np.ndarray]:
    """(rows update (ny, 2), theta update (ny,))."""
    cc = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2)[None, :]
    terms = [gy, gx, gy * cc] if rotation else [gy, gx]
    h, b = _row_sums(w, e, terms)
    hs = ndimage.gaussian_filter1d(h, sigma, axis=0, mode="nearest") if sigma > 0 else h
    bs = ndimage.gaussian_filter1d(b, sigma, axis=0, mode="nearest") if sigma > 0 else b
    step = _solve_batched(hs, bs)
    if jitter and sigma > 0:
        # line jitter: an unsmoothed fast-axis offset per line, on top of the smooth solution
        rest = b[:, 1] - np.einsum("rk,rk->r", h[:, 1, :], step)
        raw = rest / (h[:, 1, 1] + DAMPING * max(float(np.mean(h[:, 1, 1])), 1e-12))
        step[:, 1] += raw - ndimage.gaussian_filter1d(raw, sigma, mode="nearest")
    theta = step[:, 2] if rotation else np.zeros(len(step))
    return step[:, :2], theta


def _dense_step(w, e, gy, gx, sigma) -> np.ndarray:
    """Smoothed per-pixel 2×2 normal equations (Lucas–Kanade window) → (2, ny, nx)."""
    s = max(sigma, 0.5)
    comps = [w * gy * gy, w * gy * gx, w * gx * gx, gy * e, gx * e]
    hyy, hyx, hxx, by, bx = (ndimage.gaussian_filter(c, s, mode="nearest") for c in comps)
    lam = DAMPING * max(float(np.mean(hyy + hxx)) / 2, 1e-12)
    hyy, hxx = hyy + lam, hxx + lam
    det = hyy * hxx - hyx * hyx
    return np.stack([(hxx * by - hyx * bx) / det, (hyy * bx - hyx * by) / det]).astype(np.float32)


def gauss_newton_step(
    frame: np.ndarray, target: Target, model: FrameModel, i: int, stage: str, mode: str,
    smoothing_px: float, jitter: bool,
) -> float:  # fmt: skip
    """Update frame i of ``model`` in place by one step; returns the mean |update| (px)."""
    ny, nx = frame.shape
    w, e, gy, gx = _residuals(frame, target, model, i)
    if not w.any():
        return 0.0
    if stage == "affine":
        d = _affine_step(w, e, gy, gx, nx)
        model.affine[i] += d
        rr = (ny - 1) / 2
        cc = (nx - 1) / 2
        return float(np.hypot(abs(d[0]) + abs(d[1]) * rr / 2 + abs(d[2]) * cc / 2,
                              abs(d[3]) + abs(d[4]) * rr / 2 + abs(d[5]) * cc / 2))  # fmt: skip
    if mode == "unconstrained":
        assert model.field is not None
        d = _dense_step(w, e, gy, gx, smoothing_px)
        model.field[i] += d
        return float(np.mean(np.hypot(d[0], d[1])))
    rows, theta = _row_step(w, e, gy, gx, nx, smoothing_px, mode == "row-fitting", jitter)
    model.rows[i] += rows
    model.theta[i] += theta
    return float(np.mean(np.hypot(rows[:, 0], rows[:, 1])) + np.mean(np.abs(theta)) * nx / 4)
