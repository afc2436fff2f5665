"""From frames to the spectra rigid registration correlates: the measured region, the coarse
stage's binning, the fine stage's common crop, and the spectra themselves — read from a
:class:`~scherzer.processing.chunked.FrameSource` a block at a time, never as a second copy of
the stack.

Conventions: frames (n, y, x) float32; a *crop* is one (y0, x0) origin per frame and a common
(height, width); binned pixels are means over ``factor``² pixels, and shifts measured on them
are multiplied by ``factor`` (a shift between frames does not depend on where a pixel's centre
is). Spectra are ``rfft2`` of the prepared (prefiltered, mean-removed, windowed) crops, complex64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import scipy.fft as sfft

from scherzer.processing.align_params import AlignmentError, AlignParams
from scherzer.processing.chunked import ArraySource, FrameSource, MemoryPlan, Store
from scherzer.processing.correlation import Spectral, rfft_frames, snr_weight
from scherzer.processing.shifting import (
    as_frames,
    check_values,
    common_area,
    crop_roi,
    prepare,
    window_2d,
)

__all__ = ["COARSE_MAX_PX", "MIN_COMMON_PX", "Crop", "coarse_factor", "common_crop", "spectra"]

#: The coarse stage (pair search, robust start) runs on frames binned to at most this many pixels
#: along their longer side: it only has to land within the fine stage's ±3 px basin, and binning
#: by b cuts its FFTs, products and maps b²-fold. Frames up to this size are not binned at all.
COARSE_MAX_PX = 1024
MIN_COMMON_PX = 8  # the fine stage needs this much shared field along each axis (as frames do)


@dataclass(frozen=True)
class Crop:
    """Frame i's measured pixels are ``frame_i[y0_i : y0_i + height, x0_i : x0_i + width]``,
    binned by ``factor``."""

    origins: np.ndarray  # (n, 2) int
    size: tuple[int, int]
    factor: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of a measured (binned) frame."""
        return self.size[0] // self.factor, self.size[1] // self.factor

    def cut(self, block: np.ndarray, first: int) -> np.ndarray:
        """The measured pixels of frames ``first : first + len(block)``."""
        h, w = self.size
        b = self.factor
        out = np.stack(
            [f[oy : oy + h, ox : ox + w] for f, (oy, ox) in
             zip(block, self.origins[first : first + len(block)], strict=True)]
        )  # fmt: skip
        if b == 1:
            return out
        hb, wb = h // b, w // b
        binned = np.zeros((len(out), hb, wb), dtype=np.float32)
        for dy in range(b):  # b² strided adds: faster than a mean over a 5-D view
            for dx in range(b):
                binned += out[:, dy : hb * b : b, dx : wb * b : b]
        binned *= np.float32(1.0 / (b * b))
        return binned


def region(roi: tuple[int, int, int, int] | None, n: int, frame: tuple[int, int]) -> Crop:
    """The measured region (``roi`` or the whole frame) of every frame, checked as
    :func:`~scherzer.processing.shifting.crop_roi` checks it."""
    ny, nx = frame
    if roi is None:
        return Crop(np.zeros((n, 2), dtype=int), (ny, nx))
    crop_roi(np.broadcast_to(np.zeros(1, np.uint8), (1, ny, nx)), roi)  # raises when outside
    y0, x0, h, w = (int(v) for v in roi)
    return Crop(np.tile([y0, x0], (n, 1)), (h, w))


def coarse_factor(size: tuple[int, int]) -> int:
    """Binning of the coarse stage: the smallest b with max(size)/b ≤ :data:`COARSE_MAX_PX`."""
    return max(1, math.ceil(max(size) / COARSE_MAX_PX))


def as_source(frames: object) -> tuple[FrameSource, bool]:
    """(a FrameSource, whether its values still need checking) for an array or a source."""
    if hasattr(frames, "read") and hasattr(frames, "shape"):
        n, ny, nx = frames.shape  # type: ignore[attr-defined]
        if n < 2:
            raise AlignmentError(f"alignment needs at least 2 frames; got {n}")
        if ny < 8 or nx < 8:
            raise AlignmentError(f"frames must be at least 8×8 pixels; got {ny}×{nx}")
        return frames, True  # type: ignore[return-value]
    return ArraySource(as_frames(frames)), False


def spectra(
    source: FrameSource, crop: Crop, params: AlignParams, window: str, plan: MemoryPlan,
    snr: bool = True, check: bool = False,
) -> tuple[Store, np.ndarray | None]:  # fmt: skip
    """Spectra of the prepared crops (a store chosen by ``plan``) and the correlation weight
    (band-pass × SNR weight; ``snr=False``: the band-pass alone). ``check``: raise
    AlignmentError for frames with NaN, infinities or constant values (sources not yet
    checked)."""
    shape = crop.shape
    half = (shape[0], shape[1] // 2 + 1)
    store = plan.store(source.shape[0], half, np.complex64)
    win = window_2d(shape, window, params.tukey_alpha)
    prep = replace(params, window=window)
    frame_bytes = 4 * source.shape[1] * source.shape[2]
    step = plan.frame_batch(frame_bytes)
    for first in range(0, source.shape[0], step):
        block = source.read(first, min(first + step, source.shape[0]))
        if check:
            check_values(block, first)
        store[first : first + len(block)] = rfft_frames(prepare(crop.cut(block, first), prep, win))
    band = Spectral(shape).bandpass(params.bandpass)
    if params.snr_weighting and snr:
        weight = snr_weight(store)
        band = weight if band is None else band * weight
    return store, band


def _fast_length_below(n: int) -> int:
    """The largest m ≤ n whose real FFT is fast (5-smooth)."""
    m = n
    while m > 8 and sfft.next_fast_len(m, real=True) != m:
        m -= 1
    return m


def common_crop(measured: Crop, shifts: np.ndarray) -> tuple[np.ndarray, Crop] | None:
    """The area all frames share at the integer parts of ``shifts`` (px of the unbinned
    ``measured`` region), or None when that is under ``MIN_COMMON_PX`` along an axis.

    Returns (integer offsets o_i, the crop); cropped frame i holds frame_i(r + lo + o_i), so its
    content sits at s_i − o_i relative to the common crop. The crop is trimmed symmetrically to
    a fast FFT length.
    """
    whole = np.rint(shifts).astype(int)
    try:
        area = common_area(measured.size, whole.astype(float))
    except AlignmentError:
        return None
    if min(a.stop - a.start for a in area) < MIN_COMMON_PX:
        return None
    starts, lengths = [], []
    for a in area:
        length = _fast_length_below(a.stop - a.start)
        starts.append(a.start + (a.stop - a.start - length) // 2)
        lengths.append(length)
    origins = measured.origins + np.array(starts)[None, :] + whole
    return whole, Crop(origins, (lengths[0], lengths[1]))
