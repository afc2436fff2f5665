"""Numba kernels of the focal registration's inner loops (one pass over the band each).

One job: the per-evaluation work that numpy would spread over many temporaries of the band's
size — the moments of a band correlation Re Σ Z e^{2πi g·s} that a Newton step of the shift
needs (:func:`newton_moments`), and the correlation of an image with its whitened prediction
from a wave at trial defoci (:func:`wave_correlation`). Elementwise arithmetic is
float32/complex64 in the order numpy used; sums accumulate in float64.

Conventions: band frequencies in cycles/px (``gy``, ``gx``); ``iy``/``ix`` the band's row and
column indices into per-axis phase factors (see :class:`~.problem.Correlator`).
"""

from __future__ import annotations

import atexit
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np

from scherzer.optics import fft_workers

__all__ = ["band_chunks", "newton_moments", "on_image_thread", "over_chunks", "wave_correlation"]

# A band at least this large is split over the cores: the kernels release the GIL and each
# thread takes one contiguous chunk. Measured per call on 2 cores: a 512² series' band (~2·10⁴
# elements) takes ~0.1 ms, about what handing work to a thread costs; a 1024² band (~1.5·10⁵)
# ~0.7 ms. The gain is wall time on a machine with a free core (these kernels are ~1/5 of an
# 11 × 1024² registration); on the shared 2 cores at load 5.5–6.8 it was none (wall 22.6–24.3 s
# either way) for 6 % more process time (14.2–14.7 → 15.1–15.5 s). Set it above any band
# size to keep one thread. On an image thread (:func:`on_image_thread`: the images of a pass
# are already matched on all cores) the chunks run one after the other, in the same order, so
# the sums are the same bits: measured idle, 11 × 1024² from the CLI, median of 3: 9.28 s wall
# / 12.4 s CPU splitting there too, 8.66 s / 11.4 s not.
PARALLEL_MIN_BAND = 65536
_POOL: list[ThreadPoolExecutor] = []
_THREAD = threading.local()  # .on_image: this thread matches one image of a parallel pass


def on_image_thread(fn: Callable[[int], Any]) -> Callable[[int], Any]:
    """``fn`` marked as run on an image thread: its kernels do not split the band further."""

    def run(i: int) -> Any:
        _THREAD.on_image = True
        try:
            return fn(i)
        finally:
            _THREAD.on_image = False

    return run


def band_chunks(m: int) -> list[tuple[int, int]]:
    """[(j0, j1)] covering range(m): one chunk below ``PARALLEL_MIN_BAND``, else one per core."""
    parts = fft_workers() if m >= PARALLEL_MIN_BAND else 1
    edges = np.linspace(0, m, max(parts, 1) + 1).astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def over_chunks(fn: Callable[[int, int], Any], chunks: list[tuple[int, int]]) -> list[Any]:
    """[fn(j0, j1) for each chunk], the chunks on a shared thread pool when there are several
    (the kernels release the GIL; results in chunk order, so the sums are deterministic); one
    after the other on an image thread (:func:`on_image_thread`)."""
    if len(chunks) < 2 or getattr(_THREAD, "on_image", False):
        return [fn(*c) for c in chunks]
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(fft_workers(), thread_name_prefix="focal-band"))
        atexit.register(_POOL[0].shutdown)
    return list(_POOL[0].map(lambda c: fn(*c), chunks))


@numba.njit(cache=True, nogil=True)
def _axis_phase(f, s):  # pragma: no cover - numba
    """exp(2πi f s) per axis frequency, computed in complex128 and stored as complex64."""
    out = np.empty(f.shape[0], np.complex64)
    for j in range(f.shape[0]):
        a = 2.0 * np.pi * f[j] * s
        out[j] = np.complex64(complex(np.cos(a), np.sin(a)))
    return out


@numba.njit(cache=True, nogil=True)
def newton_moments(z, sy, sx, fy, fx, iy, ix, gy, gx, j0, j1):  # pragma: no cover - numba
    """Σ over the band elements j0 ≤ j < j1 of ze = Z e^{2πi g·s} (e = ey[iy]·ex[ix], the
    per-axis factors of the shift (sy, sx) at the axis frequencies ``fy``, ``fx``):
    (Σ gy Im ze, Σ gx Im ze, Σ gy² Re ze, Σ gy gx Re ze, Σ gx² Re ze, Σ Re ze), float64."""
    ey, ex = _axis_phase(fy, sy), _axis_phase(fx, sx)
    a0 = a1 = a2 = a3 = a4 = a5 = 0.0
    for j in range(j0, j1):
        p, q = ey[iy[j]], ex[ix[j]]
        er = p.real * q.real - p.imag * q.imag
        ei = p.real * q.imag + p.imag * q.real
        zr, zi = z[j].real, z[j].imag
        re = zr * er - zi * ei
        im = zr * ei + zi * er
        y, x = gy[j], gx[j]
        a0 += y * im
        a1 += x * im
        a2 += (y * y) * re
        a3 += (y * x) * re
        a4 += (x * x) * re
        a5 += re
    return a0, a1, a2, a3, a4, a5


TINY = np.float32(1e-30)  # |y| floor of the whitening (as problem.whiten)


@numba.njit(cache=True, nogil=True)
def wave_correlation(
    phi, phi_neg, amp, cos_x, sin_x, neg, camera, quad, mw, spec_w, exponent, z, j0, j1
):  # pragma: no cover - numba
    """Z_k = S_w · conj(y_k) for every trial k, with the prediction of an image from the wave φ,
    y = whiten(((φ T + φ*(−g) T*(−g)) C + Q) · mw), T = amp (cos χ_k − i sin χ_k), on the band
    elements j0 ≤ j < j1; writes those of Z (k, m) and returns ‖y_k‖² over them (k,) (float64
    sums). Real float32 arithmetic throughout."""
    k_n = cos_x.shape[0]
    norms = np.zeros(k_n)
    e32 = np.float32(exponent)
    for k in range(k_n):
        total = 0.0
        for j in range(j0, j1):
            a, n = amp[j], neg[j]
            tr, ti = a * cos_x[k, j], -(a * sin_x[k, j])
            b = amp[n]
            ur, ui = b * cos_x[k, n], b * sin_x[k, n]  # T*(−g)
            p, q = phi[j], phi_neg[j]
            lr = (p.real * tr - p.imag * ti) + (q.real * ur - q.imag * ui)
            li = (p.real * ti + p.imag * tr) + (q.real * ui + q.imag * ur)
            c, w = camera[j], mw[j]
            yr = (lr * c + quad[j].real) * w
            yi = (li * c + quad[j].imag) * w
            if exponent != 0.0:
                mag = max(np.sqrt(yr * yr + yi * yi), TINY)
                r = np.sqrt(mag) if exponent == 0.5 else mag**e32
                yr, yi = yr / r, yi / r
            total += yr * yr + yi * yi
            sr, si = spec_w[j].real, spec_w[j].imag
            z[k, j] = np.complex64(complex(sr * yr + si * yi, si * yr - sr * yi))
        norms[k] = total
    return norms
