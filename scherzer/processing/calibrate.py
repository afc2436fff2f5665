"""Sampling calibration: the pixel size from a known lattice spacing in the image's FFT.

One job: measure where a lattice reflection of known spacing d sits in the image's Fourier
transform and return the pixel size that puts it there, p = d·|g| (|g| in cycles per pixel).
The image is mean-removed and Hann-windowed (no wrap-around streaks), the reflection located on
the FFT grid — near the position a guessed pixel size predicts, or the strongest one — and every
symmetry-equivalent reflection at the same |g| (a square lattice's (100) and (010), ±g) refined to
a fraction of an FFT pixel by a local, finely sampled discrete Fourier transform
(:func:`refine_peak`); |g| is their mean.

Conventions: frequencies in cycles/px (``fftfreq`` order, (gy, gx)); lengths in nm at the
boundary (``spacing_nm``, ``pixel_nm``). For a cubic crystal the spacing of reflection (hkl) is
a/√(h² + k² + l²) (:func:`cubic_spacing_nm`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

from scherzer.optics import fft_workers

__all__ = ["PixelCalibration", "cubic_spacing_nm", "measure_pixel_size", "refine_peak"]

MIN_FREQUENCY_PX = 4.0  # FFT pixels around g = 0 ignored (background, window leakage)
GUESS_TOLERANCE = 0.15  # with a guessed pixel size, the reflection is looked for within ± this
EQUIVALENT_RADIUS_TOL = 0.03  # reflections within this fraction of |g| count as equivalent …
EQUIVALENT_MIN_HEIGHT = 0.5  # … when at least this fraction of the strongest one's |F|
REFINE_HALF_PX = 1.0  # the local DFT searches ± this many FFT pixels around a grid peak …
REFINE_SAMPLES = 41  # … on this many points per axis, then a parabola through the best
MIN_PEAK_CONTRAST = 8.0  # the reflection's |F| over the median |F| where it is searched (lower:
# a noise peak may pass for a weak reflection; higher: weak reflections are refused)
MAX_PEAKS = 8  # equivalent reflections refined at most (a square lattice has 4 at one |g|)


@dataclass
class PixelCalibration:
    """The measured pixel size and how it was found.

    ``pixel_nm``: d·|g|. ``g_cycles_per_px``: mean |g| of the equivalent reflections;
    ``peaks_cycles_per_px`` (k, 2) their refined (gy, gx); ``scatter``: relative standard
    deviation of their |g| (a distorted or non-square sampling shows here).
    """

    pixel_nm: float
    spacing_nm: float
    g_cycles_per_px: float
    peaks_cycles_per_px: np.ndarray
    scatter: float


def cubic_spacing_nm(a_nm: float, hkl: tuple[int, int, int]) -> float:
    """Lattice spacing of reflection (hkl) of a cubic crystal with lattice constant a (nm)."""
    n2 = sum(int(h) ** 2 for h in hkl)
    if n2 == 0:
        raise ValueError("hkl must not be (0, 0, 0)")
    return float(a_nm) / math.sqrt(n2)


def _hann(n: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * (np.arange(n) + 0.5) / n)).astype(np.float64)


def refine_peak(image: np.ndarray, g0: np.ndarray) -> np.ndarray:
    """The (gy, gx) cycles/px near ``g0`` maximising |Σ_r I(r) e^{−2πi g·r}| of the (windowed)
    ``image``: a local DFT on ``REFINE_SAMPLES``² points within ± ``REFINE_HALF_PX`` FFT pixels,
    then a parabola through the best point and its neighbours on each axis."""
    ny, nx = image.shape
    offs = np.linspace(-REFINE_HALF_PX, REFINE_HALF_PX, REFINE_SAMPLES)
    gy = g0[0] + offs / ny
    gx = g0[1] + offs / nx
    ey = np.exp(-2j * np.pi * np.outer(gy, np.arange(ny)))
    ex = np.exp(-2j * np.pi * np.outer(gx, np.arange(nx)))
    mag = np.abs(ey @ image @ ex.T)
    jy, jx = np.unravel_index(int(np.argmax(mag)), mag.shape)
    return np.array([_parabola(gy, mag[:, jx], jy), _parabola(gx, mag[jy, :], jx)])


def _parabola(x: np.ndarray, y: np.ndarray, j: int) -> float:
    if 0 < j < len(y) - 1:
        den = y[j - 1] - 2 * y[j] + y[j + 1]
        if den < 0:
            return float(x[j] + 0.5 * (x[1] - x[0]) * (y[j - 1] - y[j + 1]) / den)
    return float(x[j])


def measure_pixel_size(
    image: np.ndarray, spacing_nm: float, pixel_nm_guess: float | None = None
) -> PixelCalibration:
    """The pixel size (nm) at which the lattice spacing ``spacing_nm`` shows in ``image``.

    ``pixel_nm_guess``: the reflection is looked for within ± ``GUESS_TOLERANCE`` of where this
    pixel size puts it (None: the strongest reflection of the image is taken to be it).
    """
    img = np.asarray(image, np.float64)
    if img.ndim != 2 or min(img.shape) < 32:
        raise ValueError(f"a 2-D image of at least 32×32 px is needed; got shape {img.shape}")
    if not spacing_nm > 0:
        raise ValueError(f"spacing_nm must be positive; got {spacing_nm}")
    ny, nx = img.shape
    win = (img - img.mean()) * _hann(ny)[:, None] * _hann(nx)[None, :]
    mag = np.abs(sfft.fft2(win, workers=fft_workers()))
    fy, fx = np.fft.fftfreq(ny)[:, None], np.fft.fftfreq(nx)[None, :]
    q = np.hypot(fy, fx)  # cycles/px
    allowed = np.hypot(fy * ny, fx * nx) >= MIN_FREQUENCY_PX
    if pixel_nm_guess is not None:
        q0 = pixel_nm_guess / spacing_nm
        allowed &= np.abs(q - q0) <= GUESS_TOLERANCE * q0
    if not allowed.any():
        raise ValueError("no frequencies where the reflection is expected (check the guess)")
    masked = np.where(allowed, mag, 0.0)
    top = np.unravel_index(int(np.argmax(masked)), mag.shape)
    contrast = float(mag[top] / max(float(np.median(mag[allowed])), 1e-30))
    if contrast < MIN_PEAK_CONTRAST:
        raise ValueError(
            f"no clear reflection where spacing {spacing_nm} nm is expected (strongest |F| only "
            f"{contrast:.1f}× the median there); is that reflection transferred in this image?"
        )
    q_top = float(q[top])
    ring = allowed & (np.abs(q - q_top) <= EQUIVALENT_RADIUS_TOL * q_top)
    ring &= mag >= EQUIVALENT_MIN_HEIGHT * mag[top]
    ring &= mag >= _neighbour_max(mag)  # local maxima only
    idx = np.flatnonzero(ring.ravel())
    idx = idx[np.argsort(mag.ravel()[idx])[::-1][:MAX_PEAKS]]
    peaks = np.array([refine_peak(win, np.array([fy.ravel()[i // nx], fx.ravel()[i % nx]]))
                      for i in idx])  # fmt: skip
    radii = np.hypot(peaks[:, 0], peaks[:, 1])
    g = float(np.mean(radii))
    scatter = float(np.std(radii) / g) if len(radii) > 1 else 0.0
    return PixelCalibration(spacing_nm * g, float(spacing_nm), g, peaks, scatter)


def _neighbour_max(mag: np.ndarray) -> np.ndarray:
    """The largest of each pixel's 8 neighbours (periodic), for local-maximum tests."""
    out = np.full(mag.shape, -np.inf)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                out = np.maximum(out, np.roll(mag, (dy, dx), axis=(0, 1)))
    return out
