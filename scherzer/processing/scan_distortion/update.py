"""One Gauss–Newton step of a frame's distortion model against a reference.

The frame S (scan coordinates) is compared with the reference R seen in the same orientation
at the model's positions q = p + u(p): S(p) ≈ g·R(q) + o (a gain and offset fitted per step).
Linearising R(q + δ) ≈ R(q) + ∇R·δ gives the normal equations of every model component:
6×6 for the affine, one 2×2 (row-locked) or 3×3 (row-fitting) system per scan line coupled
by a penalty on the second differences of the line functions along the slow axis (a weighted
Whittaker smoother: lines without contrast — between the atom rows of a crystal aligned with
the scan — are interpolated, lines with contrast keep their own value), plus an unsmoothed
fast-axis offset per line (jitter) where the line has fast-axis contrast; or a 2×2 system
per pixel smoothed in 2-D (unconstrained). A damping term keeps directions without contrast
from moving.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg, ndimage

from scherzer.processing.scan_distortion.kernels import sample_bilinear, sample_spline
from scherzer.processing.scan_distortion.line_prior import LinePrior, second_difference_bands
from scherzer.processing.scan_distortion.model import FrameModel

__all__ = ["Target", "gauss_newton_step"]

DAMPING = 1e-3  # Levenberg damping relative to the mean curvature: stability against speed
ROW_START_SKIP = 0.03  # fraction of each line (after flyback, probe settling) that does not vote
MIN_SEEN = 0.999  # a sample counts only if the reference is seen there (bilinear seen-mask)
# σ (lines) of the Gaussian whose half-power frequency matches the line penalty at λ = 1
# (λ = (σ/PENALTY_SIGMA_PX)⁴, see roughness_weight)
PENALTY_SIGMA_PX = 2.0 * np.sqrt(np.log(2.0) / 2.0)
# lines above this quantile of fast-axis curvature estimate the jitter variance (the others
# carry too little contrast to tell jitter from noise)
JITTER_QUANTILE = 0.75


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
    nx = frame.shape[1]
    qy, qx = model.grid_positions(i, frame.shape)
    val, gy, gx = sample_spline(target.coeffs, qy, qx, gradient=True)
    w = sample_bilinear(target.seen, qy, qx)
    del qy, qx
    seen = w >= MIN_SEEN
    w[...] = seen  # 1 where the reference is seen, else 0 (in place)
    del seen
    w[:, : round(ROW_START_SKIP * nx)] = 0.0
    sw = float(w.sum())
    if sw < 0.05 * w.size:
        return np.zeros_like(w), np.zeros_like(w), gy, gx
    mv, ms = float((w * val).sum() / sw), float((w * frame).sum() / sw)
    var = float((w * (val - mv) ** 2).sum())
    gain = float((w * (val - mv) * (frame - ms)).sum()) / var if var > 0 else 1.0
    gain = gain if gain > 1e-6 else 1.0
    e = val
    e -= mv
    e *= -gain
    e += frame
    e -= ms  # frame − (gain·(val − mv) + ms), in val's memory
    e *= w
    gy *= gain
    gx *= gain
    return w, e, gy, gx


def _solve_batched(h: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Damped solutions of (…, k, k) systems."""
    k = h.shape[-1]
    trace = np.trace(h, axis1=-2, axis2=-1)
    scale = DAMPING * max(float(np.mean(trace)) / k, 1e-12)
    return np.linalg.solve(h + scale * np.eye(k), b[..., None])[..., 0]


def _affine_step(w, e, gy, gx, nx) -> np.ndarray:
    """6×6 normal equations of (dy, dx) = (a0 + a1·ŕ + a2·ć, a3 + a4·ŕ + a5·ć), built from
    per-line sums (moments 0–2 in ć of w·g·g' and 0–1 of g·e) weighted by powers of ŕ: no
    (6, H·W) basis in memory."""
    ny = w.shape[0]
    rr = np.arange(ny, dtype=np.float64) - (ny - 1) / 2
    cc = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2)[None, :]
    grads = (gy, gx)
    h = np.zeros((6, 6))
    b = np.zeros(6)
    for a in range(2):
        ge = (grads[a] * e).astype(np.float64)
        b0, b1 = ge.sum(axis=1), (ge * cc).sum(axis=1)
        b[3 * a : 3 * a + 3] = (b0.sum(), (rr * b0).sum(), b1.sum())
        for c in range(a, 2):
            wg = (w * grads[a] * grads[c]).astype(np.float64)
            m0, m1, m2 = wg.sum(axis=1), (wg * cc).sum(axis=1), (wg * cc * cc).sum(axis=1)
            # basis of one component: (1, ŕ, ć) → block[p, q] = Σ basis_p·basis_q·w·g·g'
            block = np.array([
                [m0.sum(), (rr * m0).sum(), m1.sum()],
                [(rr * m0).sum(), (rr * rr * m0).sum(), (rr * m1).sum()],
                [m1.sum(), (rr * m1).sum(), m2.sum()],
            ])  # fmt: skip
            h[3 * a : 3 * a + 3, 3 * c : 3 * c + 3] = block
            h[3 * c : 3 * c + 3, 3 * a : 3 * a + 3] = block.T
    return _solve_batched(h[None], b[None])[0]


def _row_sums(w, e, terms) -> tuple[np.ndarray, np.ndarray]:
    """Per-line normal equations (ny, k, k), (ny, k) of the Jacobian columns ``terms``."""
    k = len(terms)
    h = np.empty((w.shape[0], k, k))
    b = np.empty((w.shape[0], k))
    for a in range(k):  # einsum: the products summed line by line, no frame temporaries
        b[:, a] = np.einsum("rc,rc->r", terms[a], e)
        for j in range(a, k):
            h[:, a, j] = h[:, j, a] = np.einsum("rc,rc,rc->r", w, terms[a], terms[j])
    return h, b


def roughness_weight(smoothing_px: float) -> float:
    """λ of the second-difference penalty for a smoothing of ``smoothing_px`` lines: an evenly
    contrasted frame follows a ripple of frequency f (cycles per line) by 1/(1 + λ(2 sin πf)⁴),
    which halves at the frequency where a Gaussian of σ = ``smoothing_px`` does."""
    return (smoothing_px / PENALTY_SIGMA_PX) ** 4


def penalised_rows(h: np.ndarray, b: np.ndarray, current: np.ndarray, lam: float) -> np.ndarray:
    """Step δ (ny, k) minimising Σ_r (δ_r − H_r⁻¹b_r)ᵀH_r(…) + Σ_c s_c‖D²(current + δ)_c‖²:
    every line's own normal equations plus a penalty on the second differences of the line
    functions (a weighted Whittaker smoother: lines without contrast are interpolated from
    their neighbours, lines with contrast keep their own value up to the ripple the penalty
    allows). s_c = λ·mean H_cc puts every component on the scale of its own curvature.
    Solved as one symmetric banded system, lines interleaved (bandwidth 2k)."""
    if b.shape[0] < 3 or lam <= 0:
        return _solve_batched(h, b)
    s = lam * np.maximum(np.mean(np.diagonal(h, axis1=1, axis2=2), axis=0), 1e-12)  # (k,)
    return _penalised_solve(h, b, current, s)


def _penalised_solve(h, b, current, s, ridge: float | None = None) -> np.ndarray:
    """The penalised step for the weights ``s`` (k,): one symmetric banded system, lines
    interleaved (bandwidth 2k); ``ridge`` on the diagonal keeps it positive definite
    (default: a small fraction of the penalty)."""
    ny, k = b.shape
    d0, d1, d2 = second_difference_bands(ny)
    bandwidth = 2 * k
    ab = np.zeros((bandwidth + 1, ny * k))  # upper form: ab[bandwidth + i - j, j] = A[i, j]
    for c in range(k):
        for off, diag in ((0, d0), (1, d1), (2, d2)):
            j = np.arange(off, ny) * k + c
            ab[bandwidth - off * k, j] += s[c] * diag
    for a in range(k):
        for c in range(a, k):
            j = np.arange(ny) * k + c  # element (r·k + a, r·k + c)
            ab[bandwidth - (c - a), j] += h[:, a, c]
    ab[bandwidth] += DAMPING * 1e-3 * float(np.mean(s)) if ridge is None else ridge
    rough = _second_difference_normal(current, d0, d1, d2)
    rhs = (b - s[None, :] * rough).reshape(-1)
    return linalg.solveh_banded(ab, rhs, check_finite=False).reshape(ny, k)


def data_weighted_rows(h, b, current, noise: float, prior: LinePrior, frame: int) -> np.ndarray:
    """The penalised step with its weights from the data (:mod:`.line_prior`): per component
    the lines' own estimates z = current + (H⁻¹b)_c with noise ``noise``·(H⁻¹)_cc (``noise``
    the residual variance per sample) give κ and τ² by restricted likelihood; the smooth
    function is then fitted to the lines with the precision (H⁻¹ + τ²/noise)⁻¹ per line (the
    error every line carries added to its noise, so contrast-rich lines do not pull beyond
    it) and the penalty noise·κ. Re-linearised at every step around the current functions."""
    ny, k = b.shape
    if ny < 4 or noise <= 0:
        return _solve_batched(h, b)
    scale = DAMPING * max(float(np.mean(np.trace(h, axis1=1, axis2=2))) / k, 1e-12)
    inv = np.linalg.inv(h + scale * np.eye(k))
    own = np.einsum("rab,rb->ra", inv, b)
    s, extra = np.empty(k), np.empty(k)
    for c in range(k):
        kappa, tau2 = prior.variances(frame, c, current[:, c] + own[:, c], noise * inv[:, c, c])
        s[c], extra[c] = noise * kappa, tau2 / noise
    prec = np.linalg.inv(inv + extra[None, :, None] * np.eye(k)[None])
    tiny = DAMPING * 1e-3 * float(np.mean(np.trace(prec, axis1=1, axis2=2))) / k
    return _penalised_solve(prec, np.einsum("rab,rb->ra", prec, own), current, s, tiny)


def _second_difference_normal(x, d0, d1, d2) -> np.ndarray:
    """(DᵀD)·x along axis 0 from the pentadiagonal bands."""
    out = d0[:, None] * x
    out[:-1] += d1[:, None] * x[1:]
    out[1:] += d1[:, None] * x[:-1]
    out[:-2] += d2[:, None] * x[2:]
    out[2:] += d2[:, None] * x[:-2]
    return out


def _row_step(w, e, gy, gx, nx, sigma, rotation, current, penalty, prior, i) -> tuple:
    """(rows update (ny, 2), theta update (ny,)); ``current`` (ny, k) the line functions;
    with a ``prior`` (:class:`LinePrior`) the smoother's weights come from the data
    (:func:`data_weighted_rows`) and ``sigma`` is unused. Also returns the normal equations'
    fast-axis remainder for the jitter term."""
    cc = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2)[None, :]
    terms = [gy, gx, gy * cc] if rotation else [gy, gx]
    h, b = _row_sums(w, e, terms)
    if prior is not None:
        noise = float((e * e).sum() / max(float(w.sum()), 1.0))
        step = data_weighted_rows(h, b, current, noise, prior, i)
    elif penalty:
        step = penalised_rows(h, b, current, roughness_weight(sigma))
    elif sigma > 0:  # a Gaussian window over the lines' normal equations, locally linear
        step = local_linear_rows(h, b, sigma)
    else:
        step = _solve_batched(h, b)
    theta = step[:, 2] if rotation else np.zeros(len(step))
    rest = b[:, 1] - np.einsum("rk,rk->r", h[:, 1, :], step)
    return step[:, :2], theta, rest, h[:, 1, 1]


def local_linear_rows(h: np.ndarray, b: np.ndarray, sigma: float) -> np.ndarray:
    """Step (ny, k) by a Gaussian-weighted (σ = ``sigma`` lines) local *linear* fit of the
    line functions around every line (local regression of degree 1) from the lines' normal
    equations ``h`` (ny, k, k), ``b`` (ny, k). With contrast uneven along the slow axis (the
    atom planes of a crystal aligned with the scan) a local constant is pulled towards the
    contrast-rich lines' values wherever the function has a slope (measured on 12 × 512²
    SrTiO3 with an ideal reference: an error at the atom-plane period mixed with the 50 Hz
    pick-up); a local line is not. The normal equations are extended evenly beyond the first
    and last lines (a one-sided linear fit there extrapolates noise: null-series fields 0.026
    px RMS at the ends against 0.010 even)."""
    ny, k = b.shape
    radius = int(np.ceil(4 * sigma))
    d = np.arange(-radius, radius + 1, dtype=float)
    g = np.exp(-0.5 * (d / sigma) ** 2)
    kernels = [g, g * d, g * d * d]

    def smooth(x, kern):  # Σ_j kern(j − r)·x_j
        return ndimage.correlate1d(x, kern, axis=0, mode="reflect")

    m = [smooth(h, kern) for kern in kernels]  # (ny, k, k) each
    bm = [smooth(b, kern) for kern in kernels[:2]]
    big = np.zeros((ny, 2 * k, 2 * k))
    big[:, :k, :k], big[:, :k, k:], big[:, k:, :k], big[:, k:, k:] = m[0], m[1], m[1], m[2]
    rhs = np.concatenate([bm[0], bm[1]], axis=1)
    return _solve_batched(big, rhs)[:, :k]


def jitter_update(jitter, rest, hxx, noise_var) -> np.ndarray:
    """New per-line jitter: the Wiener estimate of a random fast-axis offset per line. Each
    line's total offset beyond the smooth solution, o = j + rest/H (variance noise/H), is
    shrunk by H/(H + noise/σ²) with the jitter variance σ² estimated from the lines with the
    most fast-axis contrast (mean of o² − noise/H, ≥ 0): no jitter in the data, none in the
    model; lines without contrast keep the smooth solution."""
    strong = hxx >= max(float(np.quantile(hxx, JITTER_QUANTILE)), 1e-12)
    if not strong.any() or noise_var <= 0:
        return np.zeros_like(jitter)
    offset = jitter[strong] + rest[strong] / hxx[strong]
    var = float(np.mean(offset**2 - noise_var / hxx[strong]))
    if var <= 0:
        return np.zeros_like(jitter)
    return (jitter * hxx + rest) / (hxx + noise_var / var)


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
    smoothing_px: float, jitter: bool, penalty: bool = True, line_prior: LinePrior | None = None,
) -> float:  # fmt: skip
    """Update frame i of ``model`` in place by one step; returns the mean |update| (px).
    ``line_prior``: the row smoother's weights from the data instead of ``smoothing_px``."""
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
    rotation = mode == "row-fitting"
    current = np.concatenate([model.rows[i], model.theta[i][:, None]], axis=1)
    lines = current if rotation else current[:, :2]
    rows, theta, rest, hxx = _row_step(
        w, e, gy, gx, nx, smoothing_px, rotation, lines, penalty, line_prior, i
    )
    model.rows[i] += rows
    model.theta[i] += theta
    change = float(np.mean(np.hypot(rows[:, 0], rows[:, 1])) + np.mean(np.abs(theta)) * nx / 4)
    if jitter:
        noise_var = float((e * e).sum() / max(float(w.sum()), 1.0))
        new = jitter_update(model.jitter[i], rest, hxx, noise_var)
        change += float(np.mean(np.abs(new - model.jitter[i])))
        model.jitter[i] = new
    return change
