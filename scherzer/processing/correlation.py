"""Spectral correlation primitives for rigid registration (used by :mod:`registration`).

Conventions
-----------
* Spectra are single-precision ``rfft2`` of prepared frames, (n, ny, nx//2 + 1); frequencies in
  cycles per pixel (:class:`Spectral`); sums over the half plane carry Hermitian column weights
  (2 for columns standing for a conjugate pair, 1 for k_x = 0 and Nyquist).
* A correlation c(r) = Σ_k w·Re[C(k)·e^{2πi k·r}] of a cross-power C = G_i·G_j* peaks at
  r = s_i − s_j when frame_i(r) ≈ ref(r − s_i) (the registration module's shift convention).
* Leave-one-out: frame i moved by −s_i (spectrum G_i·e^{2πi k·s_i}) against the sum of the
  others moved likewise.
* Streams: every function that takes a series' spectra accepts an array or a
  :class:`~scherzer.processing.chunked.Store` and works through it a block of frames at a time
  (NumPy products and small matrix products; no numba, so the first call costs no compilation
  or cache loading). Sums over frames are accumulated frame by frame in index order: the block
  size never changes a result.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft as sfft

from scherzer.processing.chunked import as_store
from scherzer.workers import fft_workers

PEAK_TIE = 0.15  # relative height below the top within which correlation peaks count as equal
#: Side (frequency samples) of the box over which template_weight smooths noise and signal power.
SPECTRUM_SMOOTHING_BINS = 9


@dataclass(frozen=True)
class Spectral:
    """rfft2 frequencies (cycles/px) and Hermitian weights of one frame shape."""

    shape: tuple[int, int]

    @property
    def ky(self) -> np.ndarray:
        return np.fft.fftfreq(self.shape[0]).astype(np.float32)

    @property
    def kx(self) -> np.ndarray:
        return np.fft.rfftfreq(self.shape[1]).astype(np.float32)

    @property
    def weights(self) -> np.ndarray:
        """2 for columns that stand for a conjugate pair, 1 for kx = 0 (and Nyquist)."""
        w = np.full(self.shape[1] // 2 + 1, 2.0, dtype=np.float32)
        w[0] = 1.0
        if self.shape[1] % 2 == 0:
            w[-1] = 1.0
        return w

    def bandpass(self, band: tuple[float, float] | None) -> np.ndarray | None:
        """Butterworth band-pass (order 4) with edges as fractions of Nyquist."""
        if band is None:
            return None
        k = np.hypot(self.ky[:, None], self.kx[None, :]) / 0.5
        lo, hi = band
        high = 1.0 / (1.0 + (k / max(hi, 1e-6)) ** 8)
        low = 1.0 - 1.0 / (1.0 + (k / lo) ** 8) if lo > 0 else 1.0
        return (high * low).astype(np.float32)


def snr_weight(spectra: Any) -> np.ndarray:
    """Per-frequency signal fraction max(P − N, 0)/P of a series (float32, rfft layout).

    P is the power averaged over frames; N the noise floor, taken as the median power in the
    outermost frequencies (|k| > 0.9 Nyquist), where little signal survives the optics and
    the detector. Noise is independent between frames, signal is not, so P − N estimates the
    signal power.
    """
    power = mean_power(spectra)
    noise = noise_floor(power)
    weight = np.clip(power - noise, 0.0, None) / np.maximum(power, 1e-30)
    return weight.astype(np.float32)


def mean_power(spectra: Any) -> np.ndarray:
    """Mean |G|² over frames (float32), accumulated frame by frame."""
    store = as_store(spectra)
    total = np.zeros(store.shape[1:], dtype=np.float32)
    for _, block in store.blocks():
        for g in block:
            total += g.real**2 + g.imag**2
    return total / np.float32(len(store))


def noise_floor(power: np.ndarray) -> float:
    """Median of a (ny, nkx) power spectrum over |k| > 0.45 cycles/px (white-noise level)."""
    ny, nkx = power.shape
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(2 * (nkx - 1))[None, :]
    outer = np.hypot(ky, kx) > 0.45
    return float(np.median(power[outer])) if outer.any() else 0.0


def template_weight(spectra: Any, shifts: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Per-frequency weight S/(S + N/(n−1)) for matching a frame to the average of the n−1
    others, from frames already aligned to ``shifts`` (float32, rfft layout, maximum 1).

    N(k): noise power, the scatter of the aligned spectra about their mean, smoothed over 9×9
    frequencies (:data:`SPECTRUM_SMOOTHING_BINS`; noise spectra are smooth). S(k): signal power
    |mean|² − N/n, smoothed likewise — except where |mean|² exceeds 10 N/n (Bragg spots; noise
    alone gets there with probability e⁻¹⁰), where the unsmoothed value is kept. The weight is
    the Wiener factor of the n−1-frame average: single-frame weights S/(S + N) discard the many
    weak frequencies that the average still resolves at low dose.
    """
    store = as_store(spectra)
    n = len(store)
    ramp_y, ramp_x = phase_ramps(shifts, shape)
    mean = aligned_total(store, ramp_y, ramp_x) / np.float32(n)
    scatter = np.zeros(mean.shape, dtype=np.float32)
    d = np.empty_like(mean)
    d2 = np.empty(mean.shape, dtype=np.float32)
    for start, block in store.blocks():
        for k, g in enumerate(block):
            ramped(g, ramp_y[start + k], ramp_x[start + k], out=d)
            d -= mean
            np.abs(d, out=d2)
            d2 *= d2
            scatter += d2
    scatter /= np.float32(n - 1)
    noise = box_mean_half_plane(scatter, SPECTRUM_SMOOTHING_BINS)
    power = np.abs(mean) ** 2
    signal_power = np.clip(power - noise / n, 0.0, None)
    smooth = box_mean_half_plane(signal_power, SPECTRUM_SMOOTHING_BINS)
    signal_power = np.where(power > 10.0 * noise / n, np.maximum(signal_power, smooth), smooth)
    weight = signal_power / (signal_power + noise / (n - 1) + 1e-30)
    return (weight / max(float(weight.max()), 1e-30)).astype(np.float32)


def box_mean_half_plane(values: np.ndarray, size: int) -> np.ndarray:
    """Mean over ``size``×``size`` boxes (``size`` odd) of a map in rfft layout (float32): wrapped
    along k_y (periodic), edge values repeated along k_x (the half plane's edges), as
    ``scipy.ndimage.uniform_filter(values, size, mode=("wrap", "nearest"))`` — by cumulative
    sums in float64, so this path does not load scipy.ndimage."""
    half = size // 2
    padded = np.pad(np.asarray(values, np.float64), ((half, half), (0, 0)), mode="wrap")
    padded = np.pad(padded, ((0, 0), (half, half)), mode="edge")
    for axis in (0, 1):
        total = np.cumsum(padded, axis=axis)
        lead = np.take(total, np.arange(size - 1, total.shape[axis]), axis=axis)
        trail = np.take(total, np.arange(-1, total.shape[axis] - size), axis=axis)
        trail[(slice(None),) * axis + (0,)] = 0.0  # nothing before the first box
        padded = (lead - trail) / size
    return padded.astype(np.float32)


def rfft_frames(frames: np.ndarray) -> np.ndarray:
    return sfft.rfft2(frames, workers=fft_workers()).astype(np.complex64, copy=False)


def normalise_by_magnitude(cross: np.ndarray, alpha: float) -> np.ndarray:
    """``cross / |cross|^α`` with a small floor (relative to each map's largest magnitude)."""
    if alpha == 0:
        return cross
    mag = np.abs(cross)
    mag += np.float32(1e-6) * mag.max(axis=(-2, -1), keepdims=True) + np.float32(1e-30)
    if alpha == 1:
        return cross / mag
    if alpha == 0.5:
        return cross / np.sqrt(mag)
    return cross / mag ** np.float32(alpha)


def normalised_store(store: Any, alpha: float) -> np.ndarray:
    """Every spectrum of an in-memory store divided by |G|^α (as :func:`normalise_by_magnitude`,
    frame by frame)."""
    out = np.empty(store.shape, dtype=np.complex64)
    for start, block in store.blocks():
        for k, g in enumerate(block):
            out[start + k] = normalise_by_magnitude(g, alpha)
    return out


def pair_cross(
    spectra: Any, pairs: np.ndarray, alpha: float, band: np.ndarray | None,
    groups: np.ndarray | None = None, out: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """Normalised, band-weighted cross-power G_i·G_j* / |G_i·G_j*|^α of every pair (i, j) —
    or, with ``groups`` (one integer per pair), the sum over the pairs of each group.

    |G_i·G_j*|^α = |G_i|^α·|G_j|^α, so each frame is normalised once (per call) and every pair
    costs a single complex product. Callers pass pairs a block at a time (the output holds one
    spectrum per pair or group; ``out`` accumulates into a given array instead)."""
    store = as_store(spectra)
    pairs = np.asarray(pairs, dtype=int).reshape(-1, 2)
    target = np.arange(len(pairs)) if groups is None else np.asarray(groups, dtype=int)
    fresh = out is None and groups is None  # one output per pair: written in place
    if out is None:
        out = np.zeros((int(target.max()) + 1, *store.shape[1:]), dtype=np.complex64)
    if alpha != 0 and store.in_memory:  # every frame normalised once per store and α
        whole = store.memo(f"normalised_{alpha}", None, lambda: normalised_store(store, alpha))
        normalised = {int(i): whole[int(i)] for i in np.unique(pairs)}
    else:
        normalised = {int(i): normalise_by_magnitude(store.frame(int(i)), alpha)
                      for i in np.unique(pairs)}  # fmt: skip
    product = None if fresh else np.empty(store.shape[1:], dtype=np.complex64)
    for (i, j), g in zip(pairs, target, strict=True):
        into = out[g] if product is None else product  # no temporaries of a spectrum's size
        np.conjugate(normalised[int(j)], out=into)
        into *= normalised[int(i)]
        if band is not None:
            into *= band
        if product is not None:
            out[g] += product
    return out


def shift_mask(shape: tuple[int, int], max_shift: float) -> np.ndarray:
    """True at correlation lags (in fftfreq order) within ``max_shift`` of zero."""
    dy = np.fft.fftfreq(shape[0], 1.0 / shape[0])
    dx = np.fft.fftfreq(shape[1], 1.0 / shape[1])
    return (dy[:, None] ** 2 + dx[None, :] ** 2) <= max_shift**2


def signed_lag(indices: np.ndarray, size: int) -> np.ndarray:
    """The lag an fftfreq-ordered index stands for (indices past size/2 are negative)."""
    return np.where(indices > size // 2, indices - size, indices)


def lag_order(indices: np.ndarray, size: int) -> np.ndarray:
    """fftfreq-ordered indices sorted by signed lag (negative lags first)."""
    return indices[np.argsort(signed_lag(indices, size), kind="stable")]


def gather_block(arrays: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """arrays[:, rows][:, :, cols] by contiguous slices when the indices form runs."""

    def runs(idx: np.ndarray) -> list[slice]:
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        return [slice(int(r[0]), int(r[-1]) + 1) for r in np.split(idx, breaks)]

    block = np.concatenate([arrays[:, r] for r in runs(rows)], axis=1)
    return np.concatenate([block[:, :, c] for c in runs(cols)], axis=2)


def integer_peaks(maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Integer (dy, dx) of each map's maximum inside ``mask`` (only the mask's bounding box is
    read).

    Peaks within ``PEAK_TIE`` of the highest (above the map's mean) count as equal and the
    smallest lag among them wins: a crystal's lattice-equivalent peaks differ only by noise
    and the window's envelope, and frames in a series move little between neighbours.
    Sub-pixel refinement then climbs to the local maximum."""
    m, ny, nx = maps.shape
    floor = maps.reshape(m, -1).mean(axis=1)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    rows, cols = lag_order(rows, ny), lag_order(cols, nx)
    inner = gather_block(maps, rows, cols)
    flat = np.where(gather_block(mask[None], rows, cols), inner, -np.inf).reshape(m, -1)
    top = flat.max(axis=1)
    near_top = flat >= (floor + (1.0 - PEAK_TIE) * (top - floor))[:, None]
    dy, dx = signed_lag(rows, ny)[:, None], signed_lag(cols, nx)[None, :]
    lag2 = (dy * dy + dx * dx).reshape(-1)
    best = np.where(near_top, lag2[None], np.inf).argmin(axis=1)
    iy, ix = np.unravel_index(best, (len(rows), len(cols)))
    return np.stack([dy[iy, 0], dx[0, ix]], axis=1).astype(np.float64)


def correlation_patches(
    cross: np.ndarray, centres: np.ndarray, half: int, shape: tuple[int, int]
) -> np.ndarray:
    """Values of the correlations F⁻¹[cross] (scaled as ``irfft2``) at the integer lags
    centre + (−half … half)² of each pair: (m, 2·half + 1, 2·half + 1), by matrix-multiply DFT
    (a few rows of the inverse transform instead of the whole map)."""
    sp = Spectral(shape)
    d = np.arange(-half, half + 1)
    ly = centres[:, 0:1] + d[None, :]  # (m, P)
    lx = centres[:, 1:2] + d[None, :]
    e_y = np.exp(2j * np.pi * ly[:, :, None] * sp.ky[None, None, :]).astype(np.complex64)
    e_x = np.exp(2j * np.pi * sp.kx[None, :, None] * lx[:, None, :]) * sp.weights[None, :, None]
    values = np.matmul(e_y, np.matmul(cross, e_x.astype(np.complex64)))
    return values.real / np.float32(shape[0] * shape[1])


def peaks_near(
    cross: np.ndarray, predicted: np.ndarray, radius: np.ndarray, mask: np.ndarray,
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Sub-pixel peaks (parabola) and peak values of each correlation within ``radius`` of
    the ``predicted`` lag (and inside ``mask``), from small patches of the correlation."""
    centres = np.rint(predicted).astype(int)
    half = math.ceil(float(np.max(radius))) + 1
    patches = correlation_patches(cross, centres, half, shape)
    d = np.arange(-half, half + 1)
    ly = centres[:, 0, None, None] + d[None, :, None]
    lx = centres[:, 1, None, None] + d[None, None, :]
    near = (ly - predicted[:, 0, None, None]) ** 2 + (lx - predicted[:, 1, None, None]) ** 2
    allowed = (near <= radius[:, None, None] ** 2) & mask[ly % shape[0], lx % shape[1]]
    best = np.where(allowed, patches, -np.inf).reshape(len(cross), -1).argmax(axis=1)
    by, bx = np.unravel_index(best, patches.shape[1:])
    offsets, values = parabolic_peaks(patches, np.stack([by, bx], axis=1))
    return offsets + centres - half, values


def fourier_moments(
    spectra: np.ndarray, ky: np.ndarray, kx: np.ndarray, w: np.ndarray, shifts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Value, gradient and Hessian of c(r) = Σ_k w Re[C(k) e^{2πi k·r}] at r = ``shifts``.

    ``spectra`` (m, ny, nkx); the sums are separable, so each moment is a batched product
    e_y(r)ᵀ C e_x(r) with e_y = exp(2πi k_y r_y) (times k_y or k_y²).
    """
    two_pi = 2.0 * np.pi
    ey = np.exp(1j * two_pi * ky[None, :] * shifts[:, 0:1]).astype(np.complex64)  # (m, ny)
    ex = (np.exp(1j * two_pi * kx[None, :] * shifts[:, 1:2]) * w[None, :]).astype(np.complex64)
    left = np.stack([ey, ey * ky, ey * ky * ky], axis=1)  # (m, 3, ny)
    rows = np.matmul(left, spectra)  # (m, 3, nkx): Σ_y e_y k_yᵖ C(k)
    right = np.stack([ex, ex * kx, ex * kx * kx], axis=2)  # (m, nkx, 3)
    s = np.matmul(rows, right)  # (m, 3, 3): Σ e_y e_x k_yᵖ k_xᵠ C(k)
    value = s[:, 0, 0].real.astype(np.float64)
    grad = -two_pi * np.stack([s[:, 1, 0].imag, s[:, 0, 1].imag], axis=1).astype(np.float64)
    hyy, hyx, hxx = s[:, 2, 0].real, s[:, 1, 1].real, s[:, 0, 2].real
    h = -(two_pi**2) * np.stack([np.stack([hyy, hyx], 1), np.stack([hyx, hxx], 1)], 1)
    return value, grad, h.astype(np.float64)


def newton_step(grad: np.ndarray, hess: np.ndarray) -> np.ndarray:
    """Uphill steps (m, 2) towards the maxima: Newton where the surface is concave, a 0.25 px
    gradient step elsewhere; every step clipped to 0.5 px."""
    det = hess[:, 0, 0] * hess[:, 1, 1] - hess[:, 0, 1] ** 2
    concave = (hess[:, 0, 0] < 0) & (det > 0)
    inv = np.empty_like(hess)
    inv[:, 0, 0], inv[:, 1, 1] = hess[:, 1, 1], hess[:, 0, 0]
    inv[:, 0, 1] = inv[:, 1, 0] = -hess[:, 0, 1]
    newton = -np.einsum("mab,mb->ma", inv, grad) / np.where(det == 0, 1.0, det)[:, None]
    uphill = grad / (np.abs(grad).max(axis=1, keepdims=True) + 1e-30) * 0.25
    step = np.where(concave[:, None], newton, uphill)
    norm = np.linalg.norm(step, axis=1, keepdims=True)
    return np.where(norm > 0.5, step * 0.5 / np.maximum(norm, 1e-30), step)


def refine_peaks(
    spectra: np.ndarray, shape: tuple[int, int], start: np.ndarray, iterations: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel maxima of the band-limited correlations whose spectra are given (rfft half).

    Newton steps from ``start`` (m, 2) on the exact Fourier series (uphill gradient steps where
    the surface is not concave), each clipped to 0.5 px. Returns (shifts, values); once the
    steps are below 1e-4 px the value before the last step is returned (it differs by the
    square of the step).
    """
    sp = Spectral(shape)
    ky, kx, w = sp.ky, sp.kx, sp.weights
    r = start.astype(np.float64).copy()
    for _ in range(iterations):
        value, grad, hess = fourier_moments(spectra, ky, kx, w, r)
        step = newton_step(grad, hess)
        r += step
        if np.max(np.abs(step)) < 1e-3:
            return r, value
    value, _, _ = fourier_moments(spectra, ky, kx, w, r)
    return r, value


def peak_energy(spectra: Any, w: np.ndarray, alpha: float) -> np.ndarray:
    """Σ w |F|^{2(1−α)} per frame: the Cauchy–Schwarz bound that normalises peak heights."""
    store = as_store(spectra)
    out = np.empty(len(store))
    for start, block in store.blocks():
        mag2 = np.abs(block) if alpha == 0.5 else block.real**2 + block.imag**2
        if alpha not in (0.0, 0.5):
            mag2 = mag2 ** np.float32(1.0 - alpha)
        out[start : start + len(block)] = np.einsum("nyx,x->n", mag2, w)
    return out


def parabolic_peaks(maps: np.ndarray, lags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel peaks (m, 2) from a parabola along each axis through the integer peak at
    ``lags`` and its two neighbours (periodic maps), steps clipped to ±0.5 px; and the values
    at the integer peaks."""
    m, ny, nx = maps.shape
    iy, ix = lags[:, 0].astype(int) % ny, lags[:, 1].astype(int) % nx
    rows = np.arange(m)
    centre = maps[rows, iy, ix]
    out = lags.astype(np.float64).copy()
    for axis, (before, after) in enumerate(
        [(maps[rows, (iy - 1) % ny, ix], maps[rows, (iy + 1) % ny, ix]),
         (maps[rows, iy, (ix - 1) % nx], maps[rows, iy, (ix + 1) % nx])]
    ):  # fmt: skip
        curvature = before - 2.0 * centre + after
        step = np.where(
            curvature < 0, 0.5 * (before - after) / np.where(curvature < 0, curvature, -1.0), 0.0
        )
        out[:, axis] += np.clip(step, -0.5, 0.5)
    return out, centre.astype(np.float64)


def shift_spectra(spectra: np.ndarray, shifts: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Spectra of frames moved by −shifts (aligned): G · exp(+2πi k·s)."""
    ramp_y, ramp_x = phase_ramps(shifts, shape)
    return spectra * ramp_y[:, :, None] * ramp_x[:, None, :]


def aligned_total(spectra: Any, ramp_y: np.ndarray, ramp_x: np.ndarray) -> np.ndarray:
    """Σ_i G_i·ramp_y[i]·ramp_x[i]: the spectrum of the sum of the aligned frames (complex64,
    added frame by frame in index order)."""
    store = as_store(spectra)
    total = np.zeros(store.shape[1:], dtype=np.complex64)
    aligned = np.empty_like(total)
    for start, block in store.blocks():
        for k, g in enumerate(block):
            ramped(g, ramp_y[start + k], ramp_x[start + k], out=aligned)
            total += aligned
    return total


def ramped(
    spectra: np.ndarray, ramp_y: np.ndarray, ramp_x: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``spectra · ramp_y ⊗ ramp_x``: one spectrum (ny, nkx) with ramps (ny,), (nkx,), or a block
    (n, ny, nkx) with ramps (n, ny), (n, nkx). The ramps' outer product first, then one product
    (about 4× faster than a three-operand ``einsum`` on complex64)."""
    return np.multiply(spectra, ramp_y[..., :, None] * ramp_x[..., None, :], out=out)


def phase_ramps(shifts: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Separable phase ramps exp(2πi k·s) (complex64) that move each frame by −s."""
    sp = Spectral(shape)
    ramp_y = np.exp(2j * np.pi * sp.ky[None, :] * shifts[:, 0:1]).astype(np.complex64)
    ramp_x = np.exp(2j * np.pi * sp.kx[None, :] * shifts[:, 1:2]).astype(np.complex64)
    return ramp_y, ramp_x


def full_weight(shape: tuple[int, int], band: np.ndarray | None, hermitian: bool) -> np.ndarray:
    """``band`` as a contiguous float32 (ny, nkx) array, times the Hermitian column weights."""
    sp = Spectral(shape)
    w = sp.weights[None, :] if hermitian else np.float32(1.0)
    w = w * (np.float32(1.0) if band is None else band)
    return np.ascontiguousarray(np.broadcast_to(w, (shape[0], shape[1] // 2 + 1)), np.float32)


def loo_cross(
    spectra: Any, shifts: np.ndarray, shape: tuple[int, int], alpha: float,
    band: np.ndarray | None, frames: slice = slice(None), total: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """Cross-power of every aligned frame (of ``frames``; default all) with the sum of the
    others, normalised by |·|^α and weighted by ``band`` (the peak is where the leave-one-out
    average's is). ``total``: :func:`aligned_total` at ``shifts``, when already known."""
    store = as_store(spectra)
    ramp_y, ramp_x = phase_ramps(shifts, shape)
    if total is None:
        total = aligned_total(store, ramp_y, ramp_x)
    weight = full_weight(shape, band, hermitian=False)
    first, stop, _ = frames.indices(len(store))
    block = store[first:stop]
    aligned = ramped(block, ramp_y[first:stop], ramp_x[first:stop])
    cross = aligned * np.conj(total[None] - aligned)
    cross = normalise_product(cross, alpha)
    cross *= weight
    return cross


def normalise_product(cross: np.ndarray, alpha: float) -> np.ndarray:
    """``cross / |cross|^α`` with a fixed floor of 1e-30 (the leave-one-out products)."""
    if alpha == 0:
        return cross
    mag = np.abs(cross) + np.float32(1e-30)
    if alpha == 1:
        return cross / mag
    if alpha == 0.5:
        return cross / np.sqrt(mag)
    return cross / mag ** np.float32(alpha)


def loo_blocks(
    spectra: Any, shifts: np.ndarray, shape: tuple[int, int], alpha: float,
    band: np.ndarray | None,
) -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
    """(start, :func:`loo_cross` of frames start:start + batch) over the whole series: the
    leave-one-out cross-powers a block at a time."""
    store = as_store(spectra)
    ramp_y, ramp_x = phase_ramps(shifts, shape)
    total = aligned_total(store, ramp_y, ramp_x)
    for start in range(0, len(store), store.batch):
        part = slice(start, min(start + store.batch, len(store)))
        yield start, loo_cross(store, shifts, shape, alpha, band, part, total)


def loo_patches(
    spectra: Any, shifts: np.ndarray, shape: tuple[int, int], band: np.ndarray | None, half: int
) -> np.ndarray:
    """Every frame's α = 0 leave-one-out correlation (scaled as ``irfft2``) at the integer lags
    −half … half around its current position: (n, 2·half + 1, 2·half + 1).

    As in :func:`loo_newton`, a_i·(T − a_i)* = G_i·T*·e^{2πi k·s_i} − |G_i|²: the first term is
    a patch of G_i·T* centred on s_i (a few rows of the inverse DFT), the second a patch that
    does not depend on the shifts (computed once per weight)."""
    store = as_store(spectra)
    ramp_y, ramp_x = phase_ramps(shifts, shape)
    weight = full_weight(shape, band, hermitian=False)
    conj_total = np.conj(aligned_total(store, ramp_y, ramp_x)) * weight

    def own() -> np.ndarray:
        out = np.empty((len(store), 2 * half + 1, 2 * half + 1), dtype=np.float32)
        zero = np.zeros((store.batch, 2))
        for start, block in store.blocks():
            power = ((block.real**2 + block.imag**2) * weight).astype(np.complex64)
            out[start : start + len(block)] = correlation_patches(
                power, zero[: len(block)], half, shape
            )
        return out

    self_part = store.memo(f"self_patches_{half}", band, own)
    out = np.empty((len(store), 2 * half + 1, 2 * half + 1))
    product = np.empty((store.batch, *store.shape[1:]), dtype=np.complex64)
    for start, block in store.blocks():
        part = slice(start, start + len(block))
        here = np.multiply(block, conj_total, out=product[: len(block)])
        out[part] = correlation_patches(here, shifts[part], half, shape)
    return out - self_part


def self_moments(spectra: Any, weight: np.ndarray, ky: np.ndarray, kx: np.ndarray) -> np.ndarray:
    """Σ w |G_i|² k_yᵖ k_xᵠ for p, q ≤ 2 of every frame, (n, 3, 3) float64: the part of a
    frame's leave-one-out cross-power G_i·(T − G_i)* that does not depend on the shifts."""
    store = as_store(spectra)
    left = np.stack([np.ones_like(ky), ky, ky * ky]).astype(np.float32)  # (3, ny)
    right = np.stack([np.ones_like(kx), kx, kx * kx], axis=1).astype(np.float64)  # (nkx, 3)
    out = np.empty((len(store), 3, 3))
    for start, block in store.blocks():
        power = (block.real**2 + block.imag**2) * weight
        rows = np.matmul(left, power).astype(np.float64)  # (k, 3, nkx)
        out[start : start + len(block)] = np.matmul(rows, right)
    return out


def loo_newton(
    spectra: Any, shifts: np.ndarray, alpha_fine: float, shape: tuple[int, int],
    band: np.ndarray | None, self_terms: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One Newton step for every frame against the leave-one-out average of the others, both
    at the current ``shifts``. Returns (steps (n, 2), correlation values at the current shifts).

    At α_fine = 0 the moments of c_i = w·a_i·(T − a_i)* (a_i = G_i·e^{2πi k·s_i}, T = Σ a) are
    those of w·a_i·T* minus the shift-independent w·|G_i|² (:func:`self_moments`, computed once
    when ``self_terms`` is given): one product per frame and two small matrix products, the
    phase ramps folded into the DFT vectors. No cross-power array is stored."""
    store = as_store(spectra)
    n = len(store)
    sp = Spectral(shape)
    if alpha_fine != 0:
        value, grad, hess = np.empty(n), np.empty((n, 2)), np.empty((n, 2, 2))
        for start, cross in loo_blocks(store, shifts, shape, alpha_fine, band):
            part = slice(start, start + len(cross))
            zero = np.zeros((len(cross), 2))
            value[part], grad[part], hess[part] = fourier_moments(
                cross / np.float32(n - 1), sp.ky, sp.kx, sp.weights, zero
            )
        return newton_step(grad, hess), value
    ramp_y, ramp_x = phase_ramps(shifts, shape)
    weight = full_weight(shape, band, hermitian=True)
    conj_total = np.conj(aligned_total(store, ramp_y, ramp_x)) * weight
    if self_terms is None:
        self_terms = store.memo(
            "self_moments", band, lambda: self_moments(store, weight, sp.ky, sp.kx)
        )
    ky, kx = sp.ky, sp.kx
    sums = np.empty((n, 3, 3))
    product = np.empty((store.batch, *store.shape[1:]), dtype=np.complex64)
    for start, block in store.blocks():
        part = slice(start, start + len(block))
        ry, rx = ramp_y[part], ramp_x[part]
        left = np.stack([ry, ry * ky, ry * ky * ky], axis=1)  # (k, 3, ny)
        right = np.stack([rx, rx * kx, rx * kx * kx], axis=2).astype(np.complex128)
        here = np.multiply(block, conj_total, out=product[: len(block)])
        rows = np.matmul(left, here).astype(np.complex128)  # (k, 3, nkx)
        s = np.matmul(rows, right)
        sums[part, :, :] = s.real
        sums[part, 1, 0], sums[part, 0, 1] = s[:, 1, 0].imag, s[:, 0, 1].imag
    sums[:, [0, 2, 1, 0], [0, 0, 1, 2]] -= self_terms[:, [0, 2, 1, 0], [0, 0, 1, 2]]
    sums /= n - 1
    two_pi = 2.0 * np.pi
    grad = -two_pi * np.stack([sums[:, 1, 0], sums[:, 0, 1]], axis=1)
    hyy, hyx, hxx = sums[:, 2, 0], sums[:, 1, 1], sums[:, 0, 2]
    hess = -(two_pi**2) * np.stack([np.stack([hyy, hyx], 1), np.stack([hyx, hxx], 1)], 1)
    return newton_step(grad, hess), sums[:, 0, 0]
