"""Data preparation (SmartAlign's "prepare data"): trim, reverse, transpose, offset/normalise,
resample and row-median equalisation, in that order. Frames (n, y, x) in, float32 out."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from scherzer.processing.scan_distortion.settings import NonrigidParams, ScanDistortionError

__all__ = ["as_frames", "prepare_frames"]


def as_frames(frames: object, what: str = "frames") -> np.ndarray:
    """A finite (n, y, x) float32 stack of at least 2 frames, or a clear error."""
    arr = np.asarray(frames)
    if arr.ndim != 3:
        raise ScanDistortionError(f"{what} must be a (frames, y, x) stack; got shape {arr.shape}")
    if len(arr) < 2:
        raise ScanDistortionError(f"non-rigid registration needs ≥ 2 frames; got {len(arr)}")
    if min(arr.shape[1:]) < 16:
        raise ScanDistortionError(f"frames must be at least 16×16 px; got {arr.shape[1:]}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ScanDistortionError(f"{what} must be real numbers; got {arr.dtype}")
    out = np.asarray(arr, dtype=np.float32)  # no copy of a float32 stack: it is only read
    if not np.all(np.isfinite(out)):
        raise ScanDistortionError(f"{what} contain NaN or infinite values")
    return out


def prepare_frames(frames: np.ndarray, params: NonrigidParams) -> np.ndarray:
    """Apply the preparation steps of ``params`` (see :class:`NonrigidParams`)."""
    top, bottom, left, right = params.trim_px
    ny, nx = frames.shape[1:]
    if top + bottom >= ny - 16 or left + right >= nx - 16:
        raise ScanDistortionError(f"trim_px {params.trim_px} leaves < 16 px of {ny}×{nx}")
    out = frames[:, top : ny - bottom, left : nx - right]
    if params.reverse:
        out = out[::-1]
    if params.transpose:
        out = out.transpose(0, 2, 1)
    out = np.ascontiguousarray(out, dtype=np.float32)
    if params.offset == "min":
        out = out - out.min()
    elif params.offset is not None:
        out = out - np.float32(params.offset)
    if params.normalise:
        mean = float(np.mean(out))
        out = out / np.float32(mean if mean != 0 else 1.0)
    if params.resample != 1.0:
        out = np.stack([ndimage.zoom(f, params.resample, order=3, mode="mirror") for f in out])
    if params.row_median:
        rows = np.median(out, axis=2, keepdims=True)
        out = out - rows + np.median(out, axis=(1, 2), keepdims=True)
    return np.asarray(out, dtype=np.float32)
