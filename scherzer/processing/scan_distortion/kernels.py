"""Numba kernels: cubic B-spline sampling with gradients, bilinear gathers for spectrum images,
bilinear splatting for the density-weighted merge.

Coordinates are fractional (row, col) pixels of the sampled array; indices beyond the array are
clamped to its edge (callers weight such samples out).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from scipy import ndimage

from scherzer.optics import fft_workers

__all__ = [
    "gather_bilinear",
    "in_threads",
    "invert_rows",
    "sample_bilinear",
    "sample_spline",
    "splat_bilinear",
    "spline_coefficients",
]


def in_threads(fn, items) -> list:
    """[fn(item) …] in ``fft_workers()`` threads, in order. The image kernels here are serial
    and release the GIL (as numpy does): frames run side by side, one per core, instead of
    every kernel call fanning out over the cores (whose thread start-up and spin-waiting cost
    more than 512² samples take on a loaded machine)."""
    items = list(items)
    workers = min(fft_workers(), len(items))
    if workers <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


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


@numba.njit(cache=True, nogil=True)  # serial: the engine runs frames in threads
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


def _coordinates(values: np.ndarray) -> np.ndarray:
    """Flat contiguous float32 or float64 coordinates (float32 kept: no copy of the grids)."""
    arr = np.asarray(values)
    dtype = arr.dtype if arr.dtype in (np.float32, np.float64) else np.float64
    return np.ascontiguousarray(arr, dtype=dtype).reshape(-1)


def sample_spline(
    coeffs: np.ndarray, ys: np.ndarray, xs: np.ndarray, gradient: bool = False
) -> tuple[np.ndarray, ...]:
    """Values (and d/dy, d/dx if ``gradient``) of a cubic spline at (ys, xs), shaped as ys."""
    shape = np.shape(ys)
    yf, xf = _coordinates(ys), _coordinates(xs)
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


@numba.njit(cache=True, nogil=True)  # serial: the engine runs frames in threads
def _bilinear(img, ys, xs, out, fill):  # pragma: no cover - numba
    h, w = img.shape
    for p in numba.prange(ys.shape[0]):
        y, x = ys[p], xs[p]
        if not (y >= 0.0 and y <= h - 1 and x >= 0.0 and x <= w - 1):
            out[p] = fill
            continue
        iy, ix = min(int(y), h - 2), min(int(x), w - 2)
        ty, tx = y - iy, x - ix
        out[p] = (1 - ty) * ((1 - tx) * img[iy, ix] + tx * img[iy, ix + 1]) + ty * (
            (1 - tx) * img[iy + 1, ix] + tx * img[iy + 1, ix + 1]
        )


def sample_bilinear(
    image: np.ndarray, ys: np.ndarray, xs: np.ndarray, fill: float = 0.0, clamp: bool = False
) -> np.ndarray:
    """Bilinear samples of a 2-D float32 image at (ys, xs), shaped as ys; ``fill`` outside
    (``clamp``: positions are first clamped into the image, as mode "nearest")."""
    shape = np.shape(ys)
    h, w = image.shape
    yf, xf = _coordinates(ys), _coordinates(xs)
    if clamp:
        yf, xf = np.clip(yf, 0, h - 1), np.clip(xf, 0, w - 1)
    out = np.empty(yf.shape, np.float32)
    _bilinear(np.ascontiguousarray(image, dtype=np.float32), yf, xf, out, fill)
    return out.reshape(shape)


@numba.njit(cache=True, nogil=True)  # serial: the engine runs frames in threads
def _invert_rows(affine, rows, theta, nx, steps, py, px):  # pragma: no cover - numba
    ny = rows.shape[0]
    cy, cx = (ny - 1) / 2.0, (nx - 1) / 2.0
    for qi in numba.prange(ny):
        for qj in range(nx):
            y, x = float(qi), float(qj)
            for _ in range(steps):
                rc = min(max(y, 0.0), ny - 1.0)
                r0 = min(int(rc), max(ny - 2, 0))
                r1 = min(r0 + 1, ny - 1)
                t = rc - r0
                rr, cc = y - cy, x - cx
                th = theta[r0] + t * (theta[r1] - theta[r0])
                dy = affine[0] + affine[1] * rr + affine[2] * cc + th * cc
                dy += rows[r0, 0] + t * (rows[r1, 0] - rows[r0, 0])
                dx = affine[3] + affine[4] * rr + affine[5] * cc
                dx += rows[r0, 1] + t * (rows[r1, 1] - rows[r0, 1])
                y, x = qi - dy, qj - dx
            py[qi, qj] = y
            px[qi, qj] = x


def invert_rows(
    affine: np.ndarray, rows: np.ndarray, theta: np.ndarray, nx: int, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scan positions p with p + u(p) = q for every grid point q (ny, nx) of an affine +
    line model (fixed-point steps, in float64), stored float32 (py, px): ≤ 2.4e-4 px at
    4096 px, half the memory."""
    ny = rows.shape[0]
    py, px = np.empty((ny, nx), np.float32), np.empty((ny, nx), np.float32)
    _invert_rows(
        np.ascontiguousarray(affine, dtype=np.float64),
        np.ascontiguousarray(rows, dtype=np.float64),
        np.ascontiguousarray(theta, dtype=np.float64),
        nx, steps, py, px,
    )  # fmt: skip
    return py, px


@numba.njit(cache=True, nogil=True)
def _splat(values, ys, xs, total, weight):  # pragma: no cover - numba
    h, w = total.shape
    for p in range(values.shape[0]):
        y, x = ys[p], xs[p]
        if not (y > -1.0 and y < h and x > -1.0 and x < w):
            continue
        iy, ix = math.floor(y), math.floor(x)
        ty, tx = y - iy, x - ix
        for a in range(2):
            yy = iy + a
            if yy < 0 or yy >= h:
                continue
            wy = ty if a else 1.0 - ty
            for b in range(2):
                xx = ix + b
                if xx < 0 or xx >= w:
                    continue
                k = wy * (tx if b else 1.0 - tx)
                total[yy, xx] += k * values[p]
                weight[yy, xx] += k


def splat_bilinear(
    values: np.ndarray, ys: np.ndarray, xs: np.ndarray, total: np.ndarray, weight: np.ndarray
) -> None:
    """Add samples at fractional (ys, xs) to the grids ``total`` (Σ k·value) and ``weight``
    (Σ k) with bilinear weights k (the forward map of a scan: where each pixel landed)."""
    _splat(
        np.ascontiguousarray(values, dtype=np.float32).reshape(-1),
        np.ascontiguousarray(ys, dtype=np.float64).reshape(-1),
        np.ascontiguousarray(xs, dtype=np.float64).reshape(-1),
        total,
        weight,
    )
