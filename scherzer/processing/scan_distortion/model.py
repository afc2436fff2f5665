"""The per-frame distortion model in scan coordinates and its conversions.

Scan coordinates: frame i as the scan wrote it (rows = scan lines in time order, columns = the
fast axis), i.e. the common-orientation frame turned by ``k_i`` quarter turns (``np.rot90``).
A scan pixel p = (r, c) sampled the reference (seen in the same orientation) at p + u_i(p),
with u_i(p) = affine_i(p) + rows_i[r] + θ_i[r]·(c − c₀)·ŷ + field_i(p):

* ``affine`` (n, 6): (a0, a1, a2, a3, a4, a5) with dy = a0 + a1·ŕ + a2·ć, dx = a3 + a4·ŕ + a5·ć,
  ŕ = r − (ny−1)/2, ć = c − (nx−1)/2 (drift during a scan is a shear/stretch of the slow axis:
  a1, a4; a2, a5 are the fast axis);
* ``rows`` (n, ny, 2): one (dy, dx) per scan line (row-locked, smooth along the slow axis),
  ``jitter`` (n, ny): a fast-axis offset per line on top of it (line jitter, not smoothed),
  ``theta`` (n, ny): a small rotation per line (row-fitting), ``field`` (n, 2, ny, nx): a
  smooth 2-D field (unconstrained).

Fields for users are in the common orientation (see :func:`common_fields`), with the shift
convention of :mod:`scherzer.processing.registration`: frame_i(q) ≈ ref(q − f_i(q)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scherzer.processing.scan_distortion.kernels import (
    invert_rows,
    sample_bilinear,
    sample_spline,
)

__all__ = [
    "FieldSource",
    "FrameModel",
    "common_field",
    "common_fields",
    "vec_to_common",
    "vec_to_scan",
]

INVERSE_STEPS = 3  # fixed-point steps inverting p + u(p) = q (|∇u| ≲ 0.05: error ×0.05 a step)


def vec_to_common(vy: np.ndarray, vx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A displacement in the scan coordinates of a frame turned by ``k`` quarter turns
    (scan = np.rot90(common, k)) expressed in common coordinates."""
    for _ in range(k % 4):
        vy, vx = vx, -vy
    return vy, vx


def vec_to_scan(vy: np.ndarray, vx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`vec_to_common`."""
    for _ in range(k % 4):
        vy, vx = -vx, vy
    return vy, vx


@dataclass
class FrameModel:
    """Distortion parameters of every frame (scan coordinates; see the module doc)."""

    affine: np.ndarray  # (n, 6)
    rows: np.ndarray  # (n, ny, 2)
    theta: np.ndarray  # (n, ny)
    field: np.ndarray | None  # (n, 2, ny, nx)
    jitter: np.ndarray  # (n, ny)

    @classmethod
    def zeros(cls, n: int, shape: tuple[int, int], dense: bool) -> FrameModel:
        ny, nx = shape
        field = np.zeros((n, 2, ny, nx), np.float32) if dense else None
        return cls(np.zeros((n, 6)), np.zeros((n, ny, 2)), np.zeros((n, ny)), field,
                   np.zeros((n, ny)))  # fmt: skip

    def copy(self) -> FrameModel:
        f = None if self.field is None else self.field.copy()
        return FrameModel(self.affine.copy(), self.rows.copy(), self.theta.copy(), f,
                          self.jitter.copy())  # fmt: skip

    def lines(self, i: int) -> np.ndarray:
        """Frame i's line offsets (ny, 2) with the jitter added to the fast axis."""
        out = self.rows[i].copy()
        out[:, 1] += self.jitter[i]
        return out

    def blend(self, old: FrameModel, factor: float) -> FrameModel:
        """old + factor·(self − old): over-relaxation of a cycle's update."""
        f = None
        if self.field is not None and old.field is not None:
            f = old.field + np.float32(factor) * (self.field - old.field)
        return FrameModel(
            old.affine + factor * (self.affine - old.affine),
            old.rows + factor * (self.rows - old.rows),
            old.theta + factor * (self.theta - old.theta),
            f,
            old.jitter + factor * (self.jitter - old.jitter),
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.shape[1], (self.field.shape[3] if self.field is not None else -1)

    def displacement(
        self, i: int, r: np.ndarray, c: np.ndarray, nx: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """u_i at fractional scan positions (r, c), float64 (dy, dx); the line terms are linear
        between lines and clamped beyond the first and last."""
        ny = self.rows.shape[1]
        a = self.affine[i]
        rr, cc = r - (ny - 1) / 2.0, c - (nx - 1) / 2.0
        rc = np.clip(r, 0, ny - 1)
        r0 = np.minimum(rc.astype(np.intp), max(ny - 2, 0))
        r1 = np.minimum(r0 + 1, ny - 1)
        t = rc - r0
        rows, theta = self.lines(i), self.theta[i]
        dy = a[0] + a[1] * rr + a[2] * cc + rows[r0, 0] + t * (rows[r1, 0] - rows[r0, 0])
        dy += (theta[r0] + t * (theta[r1] - theta[r0])) * cc
        dx = a[3] + a[4] * rr + a[5] * cc + rows[r0, 1] + t * (rows[r1, 1] - rows[r0, 1])
        if self.field is not None:
            dy += sample_bilinear(self.field[i, 0], r, c, clamp=True)
            dx += sample_bilinear(self.field[i, 1], r, c, clamp=True)
        return dy, dx

    def grid_displacement(self, i: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """u_i on the whole scan grid (ny, nx), float64 (dy, dx), by broadcasting."""
        ny, nx = shape
        a = self.affine[i]
        rr = (np.arange(ny) - (ny - 1) / 2.0)[:, None]
        cc = (np.arange(nx) - (nx - 1) / 2.0)[None, :]
        rows = self.lines(i)
        dy = (a[0] + a[1] * rr + rows[:, :1]) + (a[2] + self.theta[i][:, None]) * cc
        dx = (a[3] + a[4] * rr + rows[:, 1:]) + a[5] * cc
        if self.field is not None:
            dy = dy + self.field[i, 0]
            dx = dx + self.field[i, 1]
        return dy, dx

    def grid_positions(self, i: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """p + u_i(p) for every scan pixel p (ny, nx), float32 (qy, qx): the line terms in
        float64, the grids in float32 (≤ 1e-4 px at 4096 px) — half the memory of
        :meth:`grid_displacement` and no float64 temporaries of the frame's size."""
        ny, nx = shape
        a = self.affine[i]
        rr = np.arange(ny) - (ny - 1) / 2.0
        lines = self.lines(i)
        cc = (np.arange(nx) - (nx - 1) / 2.0).astype(np.float32)[None, :]
        y0 = (np.arange(ny) + a[0] + a[1] * rr + lines[:, 0]).astype(np.float32)[:, None]
        ys = (a[2] + self.theta[i]).astype(np.float32)[:, None]
        x0 = ((nx - 1) / 2.0 + a[3] + a[4] * rr + lines[:, 1]).astype(np.float32)[:, None]
        qy = y0 + ys * cc
        qx = x0 + np.float32(1.0 + a[5]) * cc
        if self.field is not None:
            qy += self.field[i, 0]
            qx += self.field[i, 1]
        return qy, qx

    def pull(
        self, i: int, coeffs: np.ndarray, shape: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Frame i (spline ``coeffs`` in scan coordinates) resampled onto the reference grid
        (scan orientation): value at q is the frame at p with p + u(p) = q; and the mask of q
        whose p lies inside the scan."""
        ny, nx = shape
        if self.field is None:
            py, px = invert_rows(self.affine[i], self.lines(i), self.theta[i], nx, INVERSE_STEPS)
        else:
            qy, qx = np.meshgrid(np.arange(ny, dtype=float), np.arange(nx, dtype=float),
                                 indexing="ij")  # fmt: skip
            py, px = qy.copy(), qx.copy()
            for _ in range(INVERSE_STEPS):
                dy, dx = self.displacement(i, py, px, nx)
                py, px = qy - dy, qx - dx
        inside = (py >= 0) & (py <= ny - 1) & (px >= 0) & (px <= nx - 1)
        (val,) = sample_spline(coeffs, py, px)
        return np.where(inside, val, 0.0).astype(np.float32), inside


def common_field(model: FrameModel, i: int, k: int, shape: tuple[int, int]) -> np.ndarray:
    """Frame i's user field (2, H, W) float32 in common orientation: f_i(q) with
    frame_i(q) ≈ ref(q − f_i(q)), i.e. f = −u turned into the common frame (``k`` the
    frame's quarter turns, ``shape`` the scan grid)."""
    ny, nx = shape
    a = model.affine[i]
    rr = np.arange(ny) - (ny - 1) / 2.0
    cc = (np.arange(nx) - (nx - 1) / 2.0).astype(np.float32)[None, :]
    lines = model.lines(i)
    # −u: the line terms in float64, the grids in float32 (no float64 frame-sized arrays)
    y0 = -(a[0] + a[1] * rr + lines[:, 0]).astype(np.float32)[:, None]
    ys = -(a[2] + model.theta[i]).astype(np.float32)[:, None]
    x0 = -(a[3] + a[4] * rr + lines[:, 1]).astype(np.float32)[:, None]
    fy = y0 + ys * cc
    fx = x0 + np.float32(-a[5]) * cc
    if model.field is not None:
        fy -= model.field[i, 0]
        fx -= model.field[i, 1]
    cy, cx = vec_to_common(fy, fx, k)
    out = np.empty((2, *np.rot90(cy, -k).shape), np.float32)
    out[0], out[1] = np.rot90(cy, -k), np.rot90(cx, -k)
    return out


def common_fields(model: FrameModel, turns: list[int], shape: tuple[int, int]) -> np.ndarray:
    """Every frame's :func:`common_field` (n, 2, H, W) float32 (filled frame by frame: one
    frame's float64 displacement at a time)."""
    h, w = shape if turns[0] % 2 == 0 else shape[::-1]
    out = np.empty((len(turns), 2, h, w), np.float32)
    for i, k in enumerate(turns):
        out[i] = common_field(model, i, k, shape)
    return out


class FieldSource:
    """The per-pixel fields of a series held compactly — the model's parameters (affine,
    one (dy, dx) and rotation per scan line, the dense field only in unconstrained mode) —
    and expanded per frame on demand. Indexes like the (n, 2, H, W) float32 array it stands
    for: ``src[i]`` (2, H, W), ``src[i, c]`` (H, W), ``src.shape``, ``len(src)``;
    :meth:`expand` builds the whole array."""

    def __init__(self, model: FrameModel, turns: list[int], scan_shape: tuple[int, int]):
        self.model = model.copy()
        self.turns = list(turns)
        self.scan_shape = (int(scan_shape[0]), int(scan_shape[1]))
        h, w = self.scan_shape if self.turns[0] % 2 == 0 else self.scan_shape[::-1]
        self.shape = (len(self.turns), 2, h, w)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self[key[0]][key[1:]]
        i = int(key)
        return common_field(self.model, i, self.turns[i], self.scan_shape)

    def expand(self) -> np.ndarray:
        """All fields (n, 2, H, W) float32."""
        return common_fields(self.model, self.turns, self.scan_shape)
