"""Linear drift search for orthogonal series (Ophus, Ciston & Nelson 2016, first step).

A steady drift shears the slow axis of every frame; frames scanned in different directions are
sheared differently, so with a large drift their plain cross-correlation has no clear peak and
the rigid start is wrong (measured: 4 × 192² pairs drifting 13.5 px per frame came out 21 px
off). The search tries drift velocities v (common px per scan line) on a grid, undoes the
shear each implies in every frame (2×2-binned down to about ``SEARCH_SIZE_PX``), and scores how
well the frames then agree: the mean peak of their normalised cross-correlation with the first
frame. The best v (refined on a finer grid) gives every frame's slow-axis shear and its
position at its time; the affine cycles take it from there.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from scherzer.optics import fft_workers
from scherzer.processing.scan_distortion.kernels import spline_coefficients
from scherzer.processing.scan_distortion.model import FrameModel, vec_to_scan

__all__ = ["search_linear_drift"]

SEARCH_SIZE_PX = 96  # frames binned down to about this size for the search (speed)
SEARCH_FRAMES = 4  # frames that score the candidates (the offsets then come for all frames)
SEARCH_STEPS = 7  # candidate velocities per axis on the coarse grid (and again when refining)
MAX_SHEAR = 0.12  # largest drift searched, as a fraction of the frame size per frame time
# the frames placed where a candidate drift puts them agree within this many (binned) px; the
# correlation peak is taken there (not at a crystal's equivalent peaks a period away)
RESIDUAL_PX = 3
MIN_GAIN = 1.05  # the best candidate must beat zero drift's score by this factor to be used


def _bin(frames: np.ndarray, factor: int) -> np.ndarray:
    n, h, w = frames.shape
    h2, w2 = h // factor * factor, w // factor * factor
    cut = frames[:, :h2, :w2].reshape(n, h2 // factor, factor, w2 // factor, factor)
    return cut.mean(axis=(2, 4), dtype=np.float32)


def _model(slope: np.ndarray, turns: list[int], shape, lines_per_frame: float) -> FrameModel:
    """Every frame sheared by the steady drift ``slope`` (common px per line) and, with
    ``lines_per_frame`` > 0, placed where the drift puts it at its time (mean frame at 0)."""
    n = len(turns)
    model = FrameModel.zeros(n, shape, dense=False)
    times = (np.arange(n) - (n - 1) / 2.0) * lines_per_frame
    for i, k in enumerate(turns):
        cy, cx = vec_to_scan(slope[0] * times[i], slope[1] * times[i], k)
        sy, sx = vec_to_scan(slope[0], slope[1], k)
        model.affine[i] = [cy, sy, sy / shape[1], cx, sx, sx / shape[1]]
    return model


def _score(model: FrameModel, coeffs, turns, shape) -> tuple[float, np.ndarray]:
    """Mean normalised cross-correlation peak (anywhere: how well the shapes agree, whatever
    the frames' placement) of every frame with the first, pulled through ``model``; and each
    frame's integer offset from the first within ``RESIDUAL_PX`` of where the model placed
    it (common px, binned)."""
    vals = []
    for i, k in enumerate(turns):
        v, seen = model.pull(i, coeffs[i], shape)
        v = np.rot90(np.where(seen, v - v[seen].mean() if seen.any() else v, 0.0), -k)
        vals.append(v * _window(v.shape))
    spectra = sfft.rfft2(np.asarray(vals), workers=fft_workers())
    norms = np.sqrt(np.sum(np.asarray(vals) ** 2, axis=(1, 2))) + 1e-12
    cross = sfft.irfft2(spectra[1:] * np.conj(spectra[:1]), s=vals[0].shape,
                        workers=fft_workers())  # fmt: skip
    peaks = np.max(cross, axis=(1, 2)) / (norms[1:] * norms[0])
    r = RESIDUAL_PX
    near = np.roll(np.roll(cross, r, axis=1), r, axis=2)[:, : 2 * r + 1, : 2 * r + 1]
    offsets = [np.zeros(2)]
    for c in near:
        offsets.append(np.array(np.unravel_index(int(np.argmax(c)), c.shape), float) - r)
    return float(np.mean(peaks)), np.asarray(offsets)


def _window(shape: tuple[int, int]) -> np.ndarray:
    return np.outer(np.hanning(shape[0]), np.hanning(shape[1])).astype(np.float32)


def search_linear_drift(
    work: np.ndarray, turns: list[int], lines_per_frame: float, known: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """(drift slope (2,) common px per full-resolution line, rigid shifts (n, 2) px in the
    convention of :func:`~scherzer.processing.registration.measure_shifts`) for an
    orthogonal series, or None when the best drift does not beat zero drift and ``known``
    (the slope another start implies) by ``MIN_GAIN``."""
    factor = max(1, round(min(work.shape[1:]) / SEARCH_SIZE_PX))
    small = _bin(work, factor)
    shape = small.shape[1:]
    coeffs = [spline_coefficients(np.rot90(f, k)) for f, k in zip(small, turns, strict=True)]
    lines = lines_per_frame / factor
    few = min(len(turns), SEARCH_FRAMES)
    # the first frames find the drift (each frame placed at its own time, so the time axis is
    # the whole series')
    limit = MAX_SHEAR * min(shape) / lines  # px per binned line
    step = 2 * limit / (SEARCH_STEPS - 1)
    best = (-np.inf, np.zeros(2), None)

    def score(slope: np.ndarray, m: int) -> tuple[float, np.ndarray]:
        model = _model(slope, turns, shape, lines)
        return _score(model, coeffs[:m], turns[:m], shape)

    zero_score = score(np.zeros(2), few)[0]
    if known is not None and np.all(np.isfinite(known)):
        zero_score = max(zero_score, score(np.asarray(known, float), few)[0])
    centre = np.zeros(2)
    for span in (limit, step):
        grid = np.linspace(-span, span, SEARCH_STEPS)
        for vy in centre[0] + grid:
            for vx in centre[1] + grid:
                value = score(np.array([vy, vx]), few)[0]
                if value > best[0]:
                    best = (value, np.array([vy, vx]), None)
        centre = best[1]
    value, slope, _ = best
    if not value > MIN_GAIN * zero_score:
        return None
    offsets = score(slope, len(turns))[1]
    times = (np.arange(len(turns)) - (len(turns) - 1) / 2.0) * lines
    # frame i placed at slope·t_i (its content at −that: the shift convention); what its
    # content still sits off the first frame's adds to its shift
    shifts = -slope[None, :] * times[:, None] + (offsets - offsets.mean(axis=0))
    return slope, shifts * factor
