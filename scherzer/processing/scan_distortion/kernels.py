"""Numba kernels: cubic B-spline sampling with gradients, bilinear gathers for spectrum images.

Coordinates are fractional (row, col) pixels of the sampled array; indices beyond the array are
clamped to its edge (callers weight such samples out).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from scipy import ndimage

__all__ = ["gather_bilinear", "sample_spline", "spline_coefficients"]


def spline_coefficients(image: np.ndarray) -> np.ndarray:
    """Cubic B-spline coefficients (float32) of an image (mirror boundary)."""
    return ndimage.spline_filter(
        np.asarray(image, dtype=np.float32), order=3, mode="mirror", output=np.float32
    )


@numba.njit(cache=True, inline="always")
def _weights(t):
    t2 = t * t
    t3 = t2 * t
    s = 1.0 - t
    return (
        s * s * s / 6.0,
        (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0,
        (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0,
        t3 / 6.0,
    )


@numba.njit(cache=True, inline="always")
def _dweights(t):
    s = 1.0 - t
    return (-0.5 * s * s, 1.5 * t * t - 2.0 * t, -1.5 * t * t + t + 0.5, 0.5 * t * t)


@numba.njit(parallel=True, cache=True)
def _sample(coeffs, ys, xs, val, gy, gx, with_gradient):  # pragma: no cover - numba
    h, w = coeffs.shape
    for p in numba.prange(ys.shape[0]):
        y, x = ys[p], xs[p]
        iy, ix = math.floor(y), math.floor(x)
        wy = _weights(y - iy)
        wx = _weights(x - ix)
        dy = _dweights(y - iy)
        dx = _dweights(x - ix)
        v = 0.0
        ay = 0.0
        ax = 0.0
        for a in range(4):
            yy = min(max(iy - 1 + a, 0), h - 1)
            row = 0.0
            drow = 0.0
            for b in range(4):
                c = coeffs[yy, min(max(ix - 1 + b, 0), w - 1)]
                row += wx[b] * c
                drow += dx[b] * c
            v += wy[a] * row
            if with_gradient:
                ay += dy[a] * row
                ax += wy[a] * drow
        val[p] = v
        if with_gradient:
            gy[p] = ay
            gx[p] = ax


def sample_spline(
    coeffs: np.ndarray, ys: np.ndarray, xs: np.ndarray, gradient: bool = False
) -> tuple[np.ndarray, ...]:
    """Values (and d/dy, d/dx if ``gradient``) of a cubic spline at (ys, xs), shaped as ys."""
    shape = np.shape(ys)
    yf = np.ascontiguousarray(ys, dtype=np.float64).reshape(-1)
    xf = np.ascontiguousarray(xs, dtype=np.float64).reshape(-1)
    val = np.empty(yf.shape, np.float32)
    gy = np.empty(yf.shape if gradient else 1, np.float32)
    gx = np.empty(yf.shape if gradient else 1, np.float32)
    _sample(coeffs, yf, xf, val, gy, gx, gradient)
    if gradient:
        return val.reshape(shape), gy.reshape(shape), gx.reshape(shape)
    return (val.reshape(shape),)


@numba.njit(parallel=True, cache=True)
def _gather(cube, ys, xs, valid, out):  # pragma: no cover - numba
    h, w, nc = cube.shape
    ny, nx = ys.shape
    for i in numba.prange(ny):
        for j in range(nx):
            if not valid[i, j]:
                continue
            y, x = ys[i, j], xs[i, j]
            iy, ix = min(max(math.floor(y), 0), h - 2), min(max(math.floor(x), 0), w - 2)
            ty, tx = y - iy, x - ix
            w00 = (1 - ty) * (1 - tx)
            w01 = (1 - ty) * tx
            w10 = ty * (1 - tx)
            w11 = ty * tx
            for c in range(nc):
                out[i, j, c] += (
                    w00 * cube[iy, ix, c]
                    + w01 * cube[iy, ix + 1, c]
                    + w10 * cube[iy + 1, ix, c]
                    + w11 * cube[iy + 1, ix + 1, c]
                )


def gather_bilinear(
    cube: np.ndarray, ys: np.ndarray, xs: np.ndarray, valid: np.ndarray, out: np.ndarray
) -> None:
    """out[i, j, :] += bilinear sample of cube (h, w, channels) at (ys, xs)[i, j] where valid
    (counts are conserved on average; no ringing, no negative values)."""
    _gather(
        np.ascontiguousarray(cube, dtype=np.float32),
        np.ascontiguousarray(ys, dtype=np.float64),
        np.ascontiguousarray(xs, dtype=np.float64),
        np.ascontiguousarray(valid),
        out,
    )
