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

import numba
import numpy as np

__all__ = ["newton_moments", "wave_correlation"]


@numba.njit(cache=True, nogil=True)
def newton_moments(z, ey, ex, iy, ix, gy, gx):  # pragma: no cover - numba
    """Σ over the band of ze = Z e^{2πi g·s} (e = ey[iy]·ex[ix]): (Σ gy Im ze, Σ gx Im ze,
    Σ gy² Re ze, Σ gy gx Re ze, Σ gx² Re ze, Σ Re ze), float64."""
    a0 = a1 = a2 = a3 = a4 = a5 = 0.0
    for j in range(z.shape[0]):
        e = ey[iy[j]] * ex[ix[j]]
        ze = z[j] * e
        re, im = ze.real, ze.imag
        y, x = gy[j], gx[j]
        a0 += y * im
        a1 += x * im
        a2 += (y * y) * re
        a3 += (y * x) * re
        a4 += (x * x) * re
        a5 += re
    return a0, a1, a2, a3, a4, a5


@numba.njit(cache=True, nogil=True)
def _whitened(y, exponent):  # pragma: no cover - numba
    """y / |y|^exponent (complex64; 0: unchanged, 0.5 by a square root)."""
    if exponent == 0.0:
        return y
    mag = max(np.float32(abs(y)), np.float32(1e-30))
    r = np.sqrt(mag) if exponent == 0.5 else mag ** np.float32(exponent)
    return np.complex64(complex(y.real / r, y.imag / r))


@numba.njit(cache=True, nogil=True)
def wave_correlation(phi, phi_neg, amp, cos_x, sin_x, neg, camera, quad, mw, spec_w, exponent, z):
    """Z_k = S_w · conj(y_k) for every trial k, with the prediction of an image from the wave φ,
    y = whiten(((φ T + φ*(−g) T*(−g)) C + Q) · mw), T = amp (cos χ_k − i sin χ_k); writes Z
    (k, m) and returns ‖y_k‖ (k,) (float64 sums)."""
    k_n, m = cos_x.shape
    norms = np.zeros(k_n)
    for k in range(k_n):
        total = 0.0
        for j in range(m):
            t = np.complex64(complex(amp[j] * cos_x[k, j], -(amp[j] * sin_x[k, j])))
            n = neg[j]
            tn = np.complex64(complex(amp[n] * cos_x[k, n], amp[n] * sin_x[k, n]))
            y = _whitened(((phi[j] * t + phi_neg[j] * tn) * camera[j] + quad[j]) * mw[j], exponent)
            total += y.real * y.real + y.imag * y.imag
            z[k, j] = spec_w[j] * np.conj(y)
        norms[k] = np.sqrt(total)
    return norms
