"""Live processing while a series is acquired: a running, drift-compensated average.

One job: fold each new frame into an average on the first frame's grid. The frame is registered
against the average so far (mutual correlation, α = ½, of Hann-windowed, mean-removed frames; the
integer peak refined by two rounds of a local matrix DFT of the correlation around it, as in
Guizar-Sicairos et al. 2008), moved back by a Fourier phase ramp and added. Cost per frame: a few
FFTs of one frame; memory: a few frames.

Conventions (ARCHITECTURE.md): ``shift_px = (dy, dx)`` is where the frame's content sits relative
to the average (frame(r) ≈ average(r − s)); the frame is moved by −s. Frames are float32 (y, x).
This is a preview: the offline alignment (:mod:`scherzer.processing.registration`) is the
measurement; the running average agrees with it to within noise away from the edges (content
wrapped in by the periodic shift sits within |s| of them).
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from scherzer.optics import fft_workers

__all__ = ["RunningAverage", "frame_shift_px", "preview"]

#: Exponent of the correlation's normalisation: ½ (mutual correlation) is robust both on
#: particles (where phase correlation chases noise) and on crystals (where cross-correlation
#: is dominated by the strongest spots).
ALPHA = 0.5
#: Largest preview side (px): events carry this small an image (block-averaged).
PREVIEW_PX = 128


def _hann(shape: tuple[int, int]) -> np.ndarray:
    wy = np.hanning(shape[0]).astype(np.float32)
    wx = np.hanning(shape[1]).astype(np.float32)
    return np.outer(wy, wx)


#: Sub-pixel refinement: rounds of (half-width px, step px) of the local DFT around the peak.
REFINE_ROUNDS = ((1.0, 0.1), (0.1, 0.005))


def _spectrum(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    f = np.asarray(image, np.float32)
    return sfft.fft2((f - f.mean()) * window, workers=fft_workers())


def _local_correlation(cross: np.ndarray, ly: np.ndarray, lx: np.ndarray) -> np.ndarray:
    """Re Σ_k X(k) exp(2πi k·l) on the lag grid ly × lx (a matrix DFT: no full upsampling)."""
    ky = sfft.fftfreq(cross.shape[0])
    kx = sfft.fftfreq(cross.shape[1])
    ey = np.exp(2j * np.pi * np.outer(ly, ky))
    ex = np.exp(2j * np.pi * np.outer(kx, lx))
    return (ey @ cross @ ex).real


def frame_shift_px(reference_spectrum: np.ndarray, frame_spectrum: np.ndarray,
                   shape: tuple[int, int]) -> tuple[np.ndarray, float]:  # fmt: skip
    """(shift (dy, dx) px of the frame relative to the reference, normalised peak height);
    spectra are full ``fft2`` of the windowed frames."""
    cross = frame_spectrum * np.conj(reference_spectrum)
    cross /= np.maximum(np.abs(cross), 1e-30) ** ALPHA
    corr = sfft.ifft2(cross, workers=fft_workers()).real
    iy, ix = np.unravel_index(int(np.argmax(corr)), corr.shape)
    ny, nx = shape
    best = np.array([(iy + ny // 2) % ny - ny // 2, (ix + nx // 2) % nx - nx // 2], float)
    for half, step in REFINE_ROUNDS:
        offsets = np.arange(-half, half + step / 2, step)
        local = _local_correlation(cross, best[0] + offsets, best[1] + offsets)
        jy, jx = np.unravel_index(int(np.argmax(local)), local.shape)
        best = best + np.array([offsets[jy], offsets[jx]])
    peak = float(corr[iy, ix] / max(float(np.sqrt(np.sum(corr**2))), 1e-30))
    return best, peak


def _moved(image: np.ndarray, shift_px: np.ndarray) -> np.ndarray:
    """``image`` moved by −shift (Fourier phase ramp; periodic at the edges)."""
    ny, nx = image.shape
    ky = sfft.fftfreq(ny)[:, None]
    kx = sfft.rfftfreq(nx)[None, :]
    ramp = np.exp(2j * np.pi * (ky * shift_px[0] + kx * shift_px[1])).astype(np.complex64)
    spec = sfft.rfft2(np.asarray(image, np.float32), workers=fft_workers()) * ramp
    return sfft.irfft2(spec, s=image.shape, workers=fft_workers()).astype(np.float32)


def preview(image: np.ndarray, max_px: int = PREVIEW_PX) -> np.ndarray:
    """A block-averaged copy no larger than ``max_px`` on either side (float32)."""
    f = np.asarray(image, np.float32)
    step = max(1, -(-max(f.shape) // max_px))
    ny, nx = (f.shape[0] // step) * step, (f.shape[1] // step) * step
    return f[:ny, :nx].reshape(ny // step, step, nx // step, step).mean(axis=(1, 3))


class RunningAverage:
    """The drift-compensated mean of the frames added so far (see the module docstring)."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.count = 0
        self.shifts_px: list[np.ndarray] = []
        self.peaks: list[float] = []
        self._window: np.ndarray | None = None

    @property
    def average(self) -> np.ndarray:
        if self.total is None:
            raise ValueError("no frame added yet")
        return (self.total / self.count).astype(np.float32)

    def add(self, frame: np.ndarray) -> np.ndarray:
        """Register ``frame`` against the average so far, fold it in, return its shift (dy, dx)."""
        f = np.asarray(frame, np.float32)
        if f.ndim != 2:
            raise ValueError(f"a frame is 2-D (y, x); got shape {f.shape}")
        if self.total is None:
            self.total, self._window = f.astype(np.float64), _hann(f.shape)
            shift, peak = np.zeros(2), 1.0
        else:
            if f.shape != self.total.shape:
                raise ValueError(f"frame shape {f.shape} differs from {self.total.shape}")
            assert self._window is not None
            ref = _spectrum(self.average, self._window)
            shift, peak = frame_shift_px(ref, _spectrum(f, self._window), f.shape)
            self.total += _moved(f, shift)
        self.count += 1
        self.shifts_px.append(shift)
        self.peaks.append(peak)
        return shift
