"""Numba kernels of the focal registration's inner loops (one pass over the band each).

One job: the per-evaluation work that numpy would spread over many temporaries of the band's
size — the moments of a band correlation Re Σ Z e^{2πi g·s} that a Newton step of the shift
needs (:func:`newton_moments`). Elementwise arithmetic is float32/complex64 in the order numpy
used; sums accumulate in float64.

Conventions: band frequencies in cycles/px (``gy``, ``gx``); ``iy``/``ix`` the band's row and
column indices into per-axis phase factors (see :class:`~.problem.Correlator`).
"""

from __future__ import annotations

import numba

__all__ = ["newton_moments"]


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
