"""The per-frame distortion model in scan coordinates and its conversions.

Scan coordinates: frame i as the scan wrote it (rows = scan lines in time order, columns = the
fast axis), i.e. the common-orientation frame turned by ``k_i`` quarter turns (``np.rot90``).
A scan pixel p = (r, c) sampled the reference (seen in the same orientation) at p + u_i(p),
with u_i(p) = affine_i(p) + rows_i[r] + θ_i[r]·(c − c₀)·ŷ + field_i(p):

* ``affine`` (n, 6): (a0, a1, a2, a3, a4, a5) with dy = a0 + a1·ŕ + a2·ć, dx = a3 + a4·ŕ + a5·ć,
  ŕ = r − (ny−1)/2, ć = c − (nx−1)/2 (drift during a scan is a shear/stretch of the slow axis:
  a1, a4; a2, a5 are the fast axis);
* ``rows`` (n, ny, 2): one (dy, dx) per scan line (row-locked), ``theta`` (n, ny): a small
  rotation per line (row-fitting), ``field`` (n, 2, ny, nx): a smooth 2-D field (unconstrained).

Fields for users are in the common orientation (see :func:`common_fields`), with the shift
convention of :mod:`scherzer.processing.registration`: frame_i(q) ≈ ref(q − f_i(q)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from scherzer.processing.scan_distortion.kernels import sample_spline

__all__ = ["FrameModel", "common_fields", "vec_to_common", "vec_to_scan"]

INVERSE_STEPS = 5  # fixed-point steps inverting p + u(p) = q (fields are smooth: ~1e-4 px)


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

    @classmethod
    def zeros(cls, n: int, shape: tuple[int, int], dense: bool) -> FrameModel:
        ny, nx = shape
        field = np.zeros((n, 2, ny, nx), np.float32) if dense else None
        return cls(np.zeros((n, 6)), np.zeros((n, ny, 2)), np.zeros((n, ny)), field)

    def copy(self) -> FrameModel:
        f = None if self.field is None else self.field.copy()
        return FrameModel(self.affine.copy(), self.rows.copy(), self.theta.copy(), f)

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
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.shape[1], (self.field.shape[3] if self.field is not None else -1)

    def displacement(
        self, i: int, r: np.ndarray, c: np.ndarray, nx: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """u_i at scan positions (r, c) (fractional allowed), float64 (dy, dx)."""
        ny = self.rows.shape[1]
        a = self.affine[i]
        rr, cc = r - (ny - 1) / 2.0, c - (nx - 1) / 2.0
        dy = a[0] + a[1] * rr + a[2] * cc
        dx = a[3] + a[4] * rr + a[5] * cc
        if np.issubdtype(np.asarray(r).dtype, np.integer):
            ri = np.clip(r, 0, ny - 1)
            dy = dy + self.rows[i, ri, 0] + self.theta[i, ri] * cc
            dx = dx + self.rows[i, ri, 1]
        else:
            lines = np.arange(ny)
            dy = (
                dy
                + np.interp(r, lines, self.rows[i, :, 0])
                + np.interp(r, lines, self.theta[i]) * cc
            )
            dx = dx + np.interp(r, lines, self.rows[i, :, 1])
        if self.field is not None:
            if np.issubdtype(np.asarray(r).dtype, np.integer):
                dy = dy + self.field[i, 0][r, c]
                dx = dx + self.field[i, 1][r, c]
            else:
                coords = np.stack([r, c])
                dy = dy + ndimage.map_coordinates(self.field[i, 0], coords, order=1, mode="nearest")
                dx = dx + ndimage.map_coordinates(self.field[i, 1], coords, order=1, mode="nearest")
        return dy, dx

    def grid_displacement(self, i: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        ny, nx = shape
        r, c = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        return self.displacement(i, r, c, nx)

    def pull(
        self, i: int, coeffs: np.ndarray, shape: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Frame i (spline ``coeffs`` in scan coordinates) resampled onto the reference grid
        (scan orientation): value at q is the frame at p with p + u(p) = q; and the mask of q
        whose p lies inside the scan."""
        ny, nx = shape
        qy, qx = np.meshgrid(np.arange(ny, dtype=float), np.arange(nx, dtype=float), indexing="ij")
        py, px = qy.copy(), qx.copy()
        for _ in range(INVERSE_STEPS):
            dy, dx = self.displacement(i, py, px, nx)
            py, px = qy - dy, qx - dx
        inside = (py >= 0) & (py <= ny - 1) & (px >= 0) & (px <= nx - 1)
        (val,) = sample_spline(coeffs, py, px)
        return np.where(inside, val, 0.0).astype(np.float32), inside


def common_fields(model: FrameModel, turns: list[int], shape: tuple[int, int]) -> np.ndarray:
    """User fields (n, 2, H, W) float32 in common orientation: f_i(q) with
    frame_i(q) ≈ ref(q − f_i(q)), i.e. f = −u turned into the common frame."""
    out = []
    for i, k in enumerate(turns):
        dy, dx = model.grid_displacement(i, shape)
        cy, cx = vec_to_common(-dy, -dx, k)
        out.append(np.stack([np.rot90(cy, -k), np.rot90(cx, -k)]))
    return np.asarray(out, dtype=np.float32)
