"""Moving frames: input checks, apodisation windows and prefilters, applying shifts (Fourier or
spline, cropped or on an expanded canvas), combining, and turning scan-rotated frames back.

Conventions (ARCHITECTURE.md): frames are (n, y, x) float32; ``shifts_px[i] = (dy, dx)`` is where
frame i's content sits relative to the reference; aligning applies −s_i. Rotations are scan
rotations in degrees, multiples of 90° (undone exactly with ``np.rot90``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import scipy.fft as sfft

from scherzer.processing.align_params import OUTPUTS, AlignmentError, AlignParams
from scherzer.processing.correlation import rfft_frames, shift_spectra
from scherzer.workers import fft_workers

__all__ = [
    "aligned_blocks",
    "apply_shifts",
    "as_frames",
    "check_values",
    "combine",
    "common_area",
    "crop_roi",
    "prepare",
    "quarter_turns",
    "rotate_frame_back",
    "rotate_to_common",
    "wiener_prefilter",
    "window_1d",
    "window_2d",
]


#: Temporaries of one block when shifts are applied (spectra, moved frames): bounds the memory
#: :func:`apply_shifts` needs beyond its input and output.
APPLY_BLOCK_BYTES = 64 << 20


# --------------------------------------------------------------------------------------------
# windows and prefilters (numpy: no scipy.signal import at start-up)
# --------------------------------------------------------------------------------------------
def _periodic(n: int, symmetric: Any) -> np.ndarray:
    """A periodic window of length ``n``: the symmetric one of length n + 1, last sample
    dropped (what FFT-based correlation wants; scipy's ``sym=False``)."""
    return symmetric(n + 1)[:-1]


def _cosine(m: int, a: float) -> np.ndarray:
    """Symmetric generalised cosine window a − (1 − a) cos(2πk/(m − 1)) (Hann a = ½, Hamming
    a = 0.54)."""
    return a - (1.0 - a) * np.cos(2.0 * np.pi * np.arange(m) / max(m - 1, 1))


def _tukey(m: int, alpha: float) -> np.ndarray:
    """Symmetric Tukey window: cosine tapers over ``alpha`` of the length, flat between."""
    if alpha <= 0:
        return np.ones(m)
    if alpha >= 1:
        return _cosine(m, 0.5)
    k = np.arange(m, dtype=np.float64)
    width = int(np.floor(alpha * (m - 1) / 2.0))
    w = np.ones(m)
    w[: width + 1] = 0.5 * (1 + np.cos(np.pi * (-1 + 2.0 * k[: width + 1] / alpha / (m - 1))))
    tail = k[m - width - 1 :]
    w[m - width - 1 :] = 0.5 * (
        1 + np.cos(np.pi * (1 - 2.0 / alpha + 2.0 * tail / alpha / (m - 1)))
    )
    return w


def window_1d(n: int, kind: str, tukey_alpha: float = 0.25) -> np.ndarray:
    """Periodic apodisation window of length ``n``: hann | hamming | tukey | none."""
    make = {
        "hann": lambda m: _cosine(m, 0.5),
        "hamming": lambda m: _cosine(m, 0.54),
        "tukey": lambda m: _tukey(m, tukey_alpha),
        "none": np.ones,
    }[kind]
    return _periodic(n, make)


def wiener_prefilter(image: np.ndarray, size: int = 5) -> np.ndarray:
    """Adaptive Wiener filter over ``size``² neighbourhoods (local mean and variance, the noise
    the mean local variance; zero padding at the edges, as scipy.signal.wiener)."""
    from scipy import ndimage

    im = np.asarray(image, np.float64)
    mean = ndimage.uniform_filter(im, size, mode="constant", cval=0.0)
    var = ndimage.uniform_filter(im * im, size, mode="constant", cval=0.0) - mean**2
    noise = var.mean()
    filtered = mean + (im - mean) * (1.0 - noise / np.where(var == 0, 1.0, var))
    return np.where(var < noise, mean, filtered)


# --------------------------------------------------------------------------------------------
# input checks and preparation
# --------------------------------------------------------------------------------------------
def as_frames(frames: Any) -> np.ndarray:
    if isinstance(frames, (list, tuple)):
        shapes = {np.shape(f) for f in frames}
        if len(shapes) > 1:
            raise AlignmentError(f"frames have mismatched shapes: {sorted(shapes)}")
    arr = np.asarray(frames)
    if arr.dtype.kind not in "iuf":
        raise AlignmentError(f"frames must be real numbers; got dtype {arr.dtype}")
    if arr.ndim != 3:
        raise AlignmentError(
            f"frames must be a 3-D stack (frames, y, x); got {arr.ndim}-D shape {arr.shape}"
        )
    n, ny, nx = arr.shape
    if n < 2:
        raise AlignmentError(f"alignment needs at least 2 frames; got {n}")
    if ny < 8 or nx < 8:
        raise AlignmentError(f"frames must be at least 8×8 pixels; got {ny}×{nx}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    check_values(arr)
    return arr


def check_values(block: np.ndarray, start: int = 0) -> None:
    """Raise AlignmentError naming the frames (numbered from ``start``) of a block that hold
    NaN or infinite values or are constant."""
    finite = np.isfinite(block).all(axis=(1, 2))
    if not finite.all():
        raise AlignmentError(
            f"frames {(start + np.flatnonzero(~finite)).tolist()} contain NaN or infinite values"
        )
    flat = block.reshape(len(block), -1)
    constant = flat.max(axis=1) == flat.min(axis=1)
    if constant.any():
        raise AlignmentError(
            f"frames {(start + np.flatnonzero(constant)).tolist()} are constant: "
            "nothing to correlate"
        )


def crop_roi(frames: np.ndarray, roi: tuple[int, int, int, int] | None) -> np.ndarray:
    if roi is None:
        return frames
    y0, x0, h, w = (int(v) for v in roi)
    ny, nx = frames.shape[1:]
    if not (0 <= y0 and 0 <= x0 and h >= 8 and w >= 8 and y0 + h <= ny and x0 + w <= nx):
        raise AlignmentError(
            f"roi (y0, x0, height, width) = {roi} must lie inside the {ny}×{nx} frame "
            "and be at least 8×8"
        )
    return frames[:, y0 : y0 + h, x0 : x0 + w]


def window_2d(shape: tuple[int, int], kind: str, tukey_alpha: float = 0.25) -> np.ndarray:
    """Separable apodisation window (float32): hann | hamming | tukey | none (``tukey_alpha``:
    the tapered fraction of each axis)."""
    if kind == "none":
        return np.ones(shape, dtype=np.float32)
    wy, wx = (window_1d(n, kind, tukey_alpha) for n in shape)
    return np.outer(wy, wx).astype(np.float32)


def prepare(
    frames: np.ndarray, params: AlignParams, window: np.ndarray | None = None
) -> np.ndarray:
    """Correlation-only preparation: prefilter, mean removal, window (float32 copy).
    ``window``: the (y, x) window when already made (default: from ``params``)."""
    f = frames
    if params.prefilter == "median3":
        from scipy import ndimage

        f = ndimage.median_filter(f, size=(1, 3, 3), mode="reflect")
    elif params.prefilter == "wiener5":
        f = np.stack([wiener_prefilter(fr, 5) for fr in f])
    mean = f.mean(axis=(1, 2), keepdims=True, dtype=np.float64).astype(np.float32)
    f = np.subtract(f, mean, dtype=np.float32)  # the one copy
    if window is None:
        window = window_2d(f.shape[1:], params.window, params.tukey_alpha)
    f *= window
    return f


# --------------------------------------------------------------------------------------------
# applying shifts
# --------------------------------------------------------------------------------------------
def common_area(shape: tuple[int, int], shifts: np.ndarray) -> tuple[slice, slice]:
    """Pixels where every aligned frame has data: r + s_i inside the frame for all i."""
    out = []
    for axis, size in enumerate(shape):
        s = shifts[:, axis]
        lo = max(0, math.ceil(float(np.max(-s)) - 1e-9))
        hi = min(size, math.floor(float(np.min(size - s)) + 1e-9))
        if hi - lo < 1:
            raise AlignmentError("the frames share no common area after alignment")
        out.append(slice(lo, hi))
    return out[0], out[1]


def apply_shifts(
    frames: Any, shifts_px: np.ndarray, output: str = "crop", method: str = "fourier"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Move every frame by −s_i. Returns (aligned stack, count map or None).

    ``crop``: Fourier phase ramp (or cubic spline with ``method="spline"``) on the full field,
    cropped to the area every frame covers. ``expand`` / ``expand-mean``: a canvas holding every
    frame, by cubic spline; areas a frame does not cover are 0 and the count map says how many
    frames cover each pixel.
    """
    arr = as_frames(frames)
    s = np.asarray(shifts_px, dtype=np.float64).reshape(len(arr), 2)
    if output not in OUTPUTS:
        raise AlignmentError(f"output must be one of {OUTPUTS}; got {output!r}")
    if output == "crop":
        if method not in ("fourier", "spline"):
            raise AlignmentError(f"method must be 'fourier' or 'spline'; got {method!r}")
        ys, xs = common_area(arr.shape[1:], s)
        out = np.empty((len(arr), ys.stop - ys.start, xs.stop - xs.start), dtype=np.float32)
        for i, block in aligned_blocks(lambda a, b: arr[a:b], arr.shape, s, method):
            out[i : i + len(block)] = block
        return out, None
    from scipy import ndimage  # the expanded canvas only (crop moves frames by Fourier ramps)

    lo = np.floor(np.min(-s, axis=0)).astype(int)
    hi = np.ceil(np.max(-s, axis=0)).astype(int)
    pad = (max(0, -lo[0]), max(0, hi[0]), max(0, -lo[1]), max(0, hi[1]))
    canvas_shape = (arr.shape[1] + pad[0] + pad[1], arr.shape[2] + pad[2] + pad[3])
    out = np.zeros((len(arr), *canvas_shape), dtype=np.float32)
    count = np.zeros(canvas_shape, dtype=np.float32)
    for i, (f, d) in enumerate(zip(arr, s, strict=True)):
        placed = np.zeros(canvas_shape, dtype=np.float32)
        mask = np.zeros(canvas_shape, dtype=np.float32)
        placed[pad[0] : pad[0] + f.shape[0], pad[2] : pad[2] + f.shape[1]] = f
        mask[pad[0] : pad[0] + f.shape[0], pad[2] : pad[2] + f.shape[1]] = 1.0
        out[i] = ndimage.shift(placed, -d, order=3, mode="constant", cval=0.0)
        moved_mask = ndimage.shift(mask, -d, order=1, mode="constant", cval=0.0) > 0.999
        out[i] *= moved_mask
        count += moved_mask
    return out, count


def aligned_blocks(
    read: Callable[[int, int], np.ndarray], shape: tuple[int, int, int], shifts_px: np.ndarray,
    method: str = "fourier",
) -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
    """(start, frames start:start + k moved by −s_i and cropped to the area every frame covers)
    over a stack of ``shape`` (n, y, x) whose frames ``read(start, stop)`` gives: the ``crop``
    output of :func:`apply_shifts` a block at a time (:data:`APPLY_BLOCK_BYTES` of
    temporaries), for stacks that are not in memory."""
    n, ny, nx = shape
    s = np.asarray(shifts_px, dtype=np.float64).reshape(n, 2)
    ys, xs = common_area((ny, nx), s)
    step = max(1, APPLY_BLOCK_BYTES // max(ny * nx * 4 * 6, 1))
    for i in range(0, n, step):
        block = np.asarray(read(i, min(i + step, n)), dtype=np.float32)
        yield i, _moved(block, s[i : i + len(block)], method)[:, ys, xs]


def _moved(block: np.ndarray, shifts: np.ndarray, method: str) -> np.ndarray:
    """Frames of ``block`` moved by −shifts on the full field (Fourier ramp or cubic spline)."""
    if method == "fourier":
        shape = block.shape[1:]
        spectra = shift_spectra(rfft_frames(block), shifts, shape)
        return sfft.irfft2(spectra, s=shape, workers=fft_workers()).astype(np.float32)
    from scipy import ndimage

    return np.stack(
        [ndimage.shift(f, -d, order=3, mode="nearest") for f, d in zip(block, shifts, strict=True)]
    )


def combine(aligned: np.ndarray, count: np.ndarray | None, params: AlignParams) -> np.ndarray:
    """Average or sum of aligned frames; ``expand-mean`` divides by the count map."""
    total = aligned.sum(axis=0, dtype=np.float64)
    if params.combine == "sum":
        return total.astype(np.float32)
    if params.output == "expand-mean" and count is not None:
        return (total / np.maximum(count, 1.0)).astype(np.float32)
    return (total / len(aligned)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# rotated-scan series
# --------------------------------------------------------------------------------------------
def quarter_turns(rotation_deg: float) -> int:
    q = float(rotation_deg) / 90.0
    if abs(q - round(q)) > 1e-6:
        raise AlignmentError(
            f"only rotations by multiples of 90° can be undone exactly; got {rotation_deg}°"
        )
    return round(q) % 4


def rotate_frame_back(frame: np.ndarray, rotation_deg: float) -> np.ndarray:
    """Undo a scan rotation that is a multiple of 90° (exact, ``np.rot90``), into the
    orientation of a 0° frame — the scan geometry of :mod:`scherzer.simulators.stem`."""
    k = quarter_turns(rotation_deg)
    return np.ascontiguousarray(np.rot90(frame, k=-k % 4, axes=(-2, -1)))


def rotate_to_common(frames: np.ndarray, rotation_deg: Sequence[float]) -> np.ndarray:
    """Rotate every frame back by its scan rotation relative to the first frame's (rotations
    must differ by multiples of 90°). Square frames are required when any turn is odd."""
    arr = np.asarray(frames)
    rot = np.asarray(rotation_deg, dtype=float).reshape(-1)
    if arr.ndim != 3 or len(rot) != len(arr):
        raise AlignmentError(
            f"need a (frames, y, x) stack and one rotation per frame; "
            f"got {arr.shape} and {len(rot)}"
        )
    rel = rot - rot[0]
    turns = [quarter_turns(r) for r in rel]
    if any(t % 2 for t in turns) and arr.shape[1] != arr.shape[2]:
        raise AlignmentError(f"90° rotations need square frames; got {arr.shape[1:]}")
    return np.stack([rotate_frame_back(f, r) for f, r in zip(arr, rel, strict=True)])
