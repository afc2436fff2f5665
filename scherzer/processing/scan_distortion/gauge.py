"""What the frames alone cannot tell: the global position, orientation and shape of the result.

Registration against a reference built from the frames only measures frames *relative* to each
other: a global affine map G applied to every frame (in common coordinates) fits as well. The
scan fixes it. Along the fast axis a frame is nearly undistorted (a line takes W·dwell, a frame
H lines): each frame's fast-axis column of its linear map must be the nominal one. Orthogonal
scans (fast axes in two directions) pin G completely. A single scan direction leaves the slow
axis free; there the drift *between* frames predicts the slow axis of each frame: a pixel
sampled the reference at p + u(p) with u = −d(t) + const (d the specimen drift), so the slope
of the frame centres' positions with time, s = −d′ (px per line), is the slow-axis column's
departure from nominal (∂u/∂r = s) and s/W that of the fast axis. The mean frame sits at 0.
"""

from __future__ import annotations

import numpy as np

from scherzer.processing.scan_distortion.model import FrameModel, vec_to_common, vec_to_scan

__all__ = ["drift_slopes", "fix_gauge", "fix_row_gauge", "rotation_matrix"]

CONDITION_LIMIT = 0.05  # smallest/largest eigenvalue below which fast axes alone do not pin G
DRIFT_DEGREE = 2  # polynomial degree in time of the drift the row gauge follows (2: acceleration)


def rotation_matrix(k: int) -> np.ndarray:
    """L with common = L · scan for displacement vectors (k quarter turns)."""
    cols = [vec_to_common(np.float64(1.0), np.float64(0.0), k),
            vec_to_common(np.float64(0.0), np.float64(1.0), k)]  # fmt: skip
    return np.array([[cols[0][0], cols[1][0]], [cols[0][1], cols[1][1]]])


def _linear(a: np.ndarray) -> np.ndarray:
    """Scan-coordinate linear part I + A of an affine row (a0..a5)."""
    return np.array([[1.0 + a[1], a[2]], [a[4], 1.0 + a[5]]])


def drift_slopes(model: FrameModel, turns: list[int], lines_per_frame: float) -> np.ndarray:
    """d(centre position)/d(time) in common px per scan line, per frame (n, 2)."""
    centres = np.array(
        [vec_to_common(model.affine[i, 0], model.affine[i, 3], k) for i, k in enumerate(turns)]
    )
    if len(centres) < 2:
        return np.zeros_like(centres)
    times = np.arange(len(centres)) * lines_per_frame
    return np.gradient(centres, times, axis=0)


def fix_gauge(
    model: FrameModel, turns: list[int], active: np.ndarray, lines_per_frame: float,
    nx: int, linear: bool = True, drift: bool = True,
) -> None:  # fmt: skip
    """Apply in place the global map that makes the active frames' mean sit at 0 and (with
    ``linear``) their fast axes nominal (and, for one scan direction, the slow axes follow
    the drift between frames)."""
    idx = np.flatnonzero(active)
    if linear and len(idx) >= 1:
        g = _global_linear(model, turns, idx, lines_per_frame, nx, drift)
        for i, k in enumerate(turns):
            rot = rotation_matrix(k)
            gs = rot.T @ g @ rot  # the global map seen in frame i's scan coordinates
            lin = gs @ _linear(model.affine[i])
            off = gs @ model.affine[i, [0, 3]]
            model.affine[i] = [off[0], lin[0, 0] - 1, lin[0, 1], off[1], lin[1, 0], lin[1, 1] - 1]
            model.rows[i] = model.rows[i] @ gs.T
            if model.field is not None:
                f = model.field[i]
                model.field[i] = np.einsum("ab,byx->ayx", gs, f).astype(np.float32)
    if len(set(turns)) == 1 and len(idx) > 0:
        # one scan direction: the frames' common non-affine part is a gauge freedom too (noise
        # would let it wander from cycle to cycle); it is held at 0 in specimen coordinates
        # (fix_row_gauge sets its slow part last)
        specimen_mean_gauge(model, idx)
        model.jitter -= model.jitter[idx].mean(axis=0)
        model.theta -= model.theta[idx].mean(axis=0)
        if model.field is not None:
            model.field -= model.field[idx].mean(axis=0)
    means = []
    for i in idx:
        my = model.affine[i, 0] + model.rows[i, :, 0].mean()
        mx = model.affine[i, 3] + model.rows[i, :, 1].mean() + model.jitter[i].mean()
        if model.field is not None:
            my += float(model.field[i, 0].mean())
            mx += float(model.field[i, 1].mean())
        means.append(vec_to_common(my, mx, turns[i]))
    ty, tx = np.mean(np.asarray(means), axis=0)
    for i, k in enumerate(turns):
        sy, sx = vec_to_scan(ty, tx, k)
        model.affine[i, 0] -= sy
        model.affine[i, 3] -= sx


def specimen_mean_gauge(model: FrameModel, idx: np.ndarray) -> None:
    """One scan direction: remove from the frames' line functions the part they share in
    reference (specimen) coordinates. Frame i's line r sampled the reference at slow-axis
    position Y_i(r) = r + u_i(r); a function φ(Y) added to every frame's lines at Y_i(r)
    deforms the reference alike and fits every frame as well, so relative registration
    cannot see it. It is held at 0: φ(Y) = the mean over the frames ``idx`` of their line
    functions at Y (linear interpolation onto whole lines of Y), subtracted at Y_i(r). The
    frames drift, so a mean over frames at equal *scan* lines pins φ only at periods long
    against the drift between frames; shorter ones (the 50 Hz ripple, ≈18 lines) wandered
    from cycle to cycle. Measured per-pixel residual, 12 × 512² seed 0, after 3, 4, 6, 8
    non-linear cycles: 0.114, 0.116, 0.123, 0.131 px with the scan-line mean (16: 0.160);
    0.114, 0.112, 0.109, 0.107 with this (seed 1: 0.119, 0.116, 0.115, 0.115). Real SrTiO3
    content through a distorted scan, 6 × 192²: 0.138 → 0.134 px; the real ADF, 6 × 160²:
    0.136 → 0.129; the simulator's 6 × 192²: 0.079 → 0.073."""
    ny = model.rows.shape[1]
    rr = np.arange(ny) - (ny - 1) / 2.0
    ys = [np.arange(ny) + model.affine[i, 0] + model.affine[i, 1] * rr + model.rows[i, :, 0]
          for i in idx]  # fmt: skip
    lo = int(np.floor(min(float(y.min()) for y in ys)))
    size = int(np.ceil(max(float(y.max()) for y in ys))) - lo + 2
    num = np.zeros((size, model.rows.shape[2]))
    den = np.zeros(size)
    nodes = []
    for i, y in zip(idx, ys, strict=True):
        g = np.clip(y - lo, 0.0, size - 1.001)
        j = g.astype(np.intp)
        t = g - j
        nodes.append((j, t))
        for jj, wt in ((j, 1.0 - t), (j + 1, t)):  # splat the lines onto whole lines of Y
            np.add.at(num, jj, wt[:, None] * model.rows[i])
            np.add.at(den, jj, wt)
    phi = num / np.maximum(den, 1e-6)[:, None]
    for i, (j, t) in zip(idx, nodes, strict=True):
        model.rows[i] -= (1.0 - t)[:, None] * phi[j] + t[:, None] * phi[j + 1]


def _global_linear(model, turns, idx, lines_per_frame, nx, drift) -> np.ndarray:
    """G (2×2, common coordinates) by least squares: G·(fast column) = nominal for every
    frame; with one scan direction also G·(slow column) = nominal + drift slope (``drift``)
    or = nominal (no drift prior: the mean frame is taken as undistorted)."""
    xs, ys = [], []
    slopes = drift_slopes(model, turns, lines_per_frame)
    for i in idx:
        rot = rotation_matrix(turns[i])
        lin = rot @ _linear(model.affine[i])
        # nominal: drift during a line (slope/W per pixel, ~1e-4) is below what frames measure
        xs.append(lin[:, 1])
        ys.append(rot[:, 1])
    x, y = np.array(xs).T, np.array(ys).T
    normal = x @ x.T
    eig = np.linalg.eigvalsh(normal)
    if eig[0] < CONDITION_LIMIT * eig[-1]:
        slow = [rotation_matrix(turns[i]) @ _linear(model.affine[i])[:, 0] for i in idx]
        for i, col in zip(idx, slow, strict=True):
            xs.append(col)
            target = rotation_matrix(turns[i])[:, 0] + slopes[i]
            ys.append(target if drift else rotation_matrix(turns[i])[:, 0])
        x, y = np.array(xs).T, np.array(ys).T
        normal = x @ x.T
    return y @ x.T @ np.linalg.inv(normal)


def fix_row_gauge(
    model: FrameModel, turns: list[int], active: np.ndarray, lines_per_frame: float
) -> None:
    """One scan direction: give the frames' common row function the shape the drift between
    frames predicts. Each frame's row function E_i(r) (slow-axis position at the line centre)
    is −d(t_i + r) up to a function g(r) common to all frames, which relative registration
    cannot see (its part slow against the drift between frames). A polynomial p(t) of
    ``DRIFT_DEGREE`` fitted to the frames' departures from their mean, E_i − Ē =
    p(t_i + r) − mean_j p(t_j + r), gives g: every frame's rows get mean_j p(t_j + r) − Ē(r).
    No-op for mixed scan directions (they pin g themselves)."""
    idx = np.flatnonzero(active)
    if len(set(turns)) != 1 or len(idx) < 3:
        return
    ny = model.rows.shape[1]
    rr = np.arange(ny) - (ny - 1) / 2.0
    rows = (
        model.affine[idx][:, [0, 3]][:, None, :]
        + rr[None, :, None] * model.affine[idx][:, [1, 4]][:, None, :]
        + model.rows[idx]
    )  # (m, ny, 2)
    span = (idx.max() + 1) * lines_per_frame
    times = (idx[:, None] * lines_per_frame + np.arange(ny)[None, :]) / span  # (m, ny)
    basis = np.stack([times**k for k in range(1, DRIFT_DEGREE + 1)], axis=-1)  # (m, ny, K)
    a = (basis - basis.mean(axis=0)).reshape(-1, DRIFT_DEGREE)
    b = (rows - rows.mean(axis=0)).reshape(-1, 2)
    coef, *_ = np.linalg.lstsq(a, b, rcond=None)
    correction = basis.mean(axis=0) @ coef - rows.mean(axis=0)  # (ny, 2)
    correction -= correction.mean(axis=0)
    model.rows += correction[None]
