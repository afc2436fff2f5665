"""Apply measured fields to frames, other signals and spectrum-image series.

A field f_i (2, H, W) in common orientation says frame_i(q) ≈ ref(q − f_i(q)); the corrected
frame is C_i(q) = frame_i(p) with p − f_i(p) = q, found by fixed-point steps p ← q + f_i(p)
(fields are smooth, |∇f| ≪ 1). Images are resampled by cubic splines; spectrum images by
bilinear weights (counts stay non-negative, channel by channel, in chunks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from scherzer.processing.scan_distortion.kernels import (
    gather_bilinear,
    in_threads,
    sample_bilinear,
    sample_spline,
    spline_coefficients,
)
from scherzer.processing.scan_distortion.model import FieldSource
from scherzer.processing.scan_distortion.settings import NonrigidParams, ScanDistortionError

__all__ = ["apply_fields", "apply_fields_to_si", "source_positions"]

INVERSE_STEPS = 3  # fixed-point steps of the field inversion (|∇f| ≲ 0.05: error ×0.05 a step)
SI_CHUNK_CHANNELS = 128  # channels resampled at once: memory (H·W·chunk·4 B) against calls


def _fields_of(result: Any) -> tuple[Any, list[int], NonrigidParams | None]:
    """(fields indexable per frame — an (n, 2, H, W) array or a compact
    :class:`~.model.FieldSource` —, flagged frames, settings)."""
    if isinstance(result, (np.ndarray, FieldSource)):
        return result, [], None
    fields = getattr(result, "fields", None)
    if fields is None or not hasattr(fields, "shape"):
        fields = result.fields_px
    return fields, list(result.flagged), result.params


def source_positions(field: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(py, px, inside) for every reference pixel q: where in the frame its value was seen."""
    _, h, w = field.shape
    qy = np.arange(h, dtype=np.float32)[:, None]  # float32 positions: ≤ 2.4e-4 px at 4096
    qx = np.arange(w, dtype=np.float32)[None, :]
    py, px = qy + field[0], qx + field[1]
    for _ in range(INVERSE_STEPS):
        ny_, nx_ = (
            sample_bilinear(field[0], py, px, clamp=True),
            sample_bilinear(field[1], py, px, clamp=True),
        )
        np.add(qy, ny_, out=py)
        np.add(qx, nx_, out=px)
        del ny_, nx_
    inside = (py >= 0) & (py <= h - 1) & (px >= 0) & (px <= w - 1)
    return py, px, inside


def _geometry(frames: np.ndarray, params: NonrigidParams | None) -> np.ndarray:
    """The preparation's geometric steps (trim, reverse, transpose, resample) only."""
    if params is None:
        return frames
    top, bottom, left, right = params.trim_px
    out = frames[:, top : frames.shape[1] - bottom, left : frames.shape[2] - right]
    if params.reverse:
        out = out[::-1]
    if params.transpose:
        out = out.transpose(0, 2, 1)
    if params.resample != 1.0:
        out = np.stack([ndimage.zoom(f, params.resample, order=3, mode="mirror") for f in out])
    return np.ascontiguousarray(out, dtype=np.float32)


def apply_fields(
    signal_frames: object, result: Any, *, flagged: list[int] | None = None, prepare: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Correct frames recorded at the same probe positions as the measured ones (ABF from
    HAADF's fields). ``result``: a :class:`NonrigidResult` (its preparation geometry and
    flagged frames are used; its compact fields expanded one frame at a time) or fields
    (n, 2, H, W) (an array or a :class:`~.model.FieldSource`). Returns (corrected (n, H, W)
    float32, 0 where unseen; valid (n, H, W) bool; average (H, W) float32 of the unflagged
    frames, NaN where no frame saw; count (H, W) float32)."""
    fields, flags, params = _fields_of(result)
    flags = flags if flagged is None else list(flagged)
    arr = np.asarray(signal_frames, dtype=np.float32)
    if prepare:
        arr = _geometry(arr, params)
    if arr.ndim != 3 or arr.shape[0] != fields.shape[0] or arr.shape[1:] != tuple(fields.shape[2:]):
        raise ScanDistortionError(
            f"signal frames {arr.shape} do not match the fields {fields.shape} (n, 2, H, W)"
        )
    corrected = np.zeros(arr.shape, np.float32)
    valid = np.zeros(arr.shape, bool)

    def one(i: int) -> None:
        py, px, inside = source_positions(fields[i])
        (val,) = sample_spline(spline_coefficients(arr[i]), py, px)
        corrected[i] = np.where(inside, val, 0.0)
        valid[i] = inside

    in_threads(one, range(len(arr)))
    count = np.zeros(arr.shape[1:], np.float32)
    average = np.zeros(arr.shape[1:], np.float32)
    for i in [j for j in range(len(arr)) if j not in flags]:
        average += corrected[i]
        count += valid[i]
    np.divide(average, count, out=average, where=count > 0)
    average[count == 0] = np.nan
    return corrected, valid, average, count


def apply_fields_to_si(
    si: Any, result: Any, *, chunk_channels: int = SI_CHUNK_CHANNELS
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of a spectrum-image series (n, H, W, E) corrected frame by frame with the fields,
    read ``chunk_channels`` at a time (``si`` may be a memory map or an HDF5 dataset: only
    one frame's chunk is in memory). Returns (summed cube (H, W, E) float32, count (H, W)
    float32: unflagged frames that saw each pixel). Trim/reverse/transpose are applied;
    resampling is not (a spectrum image keeps its probe grid)."""
    fields, flags, params = _fields_of(result)
    n, h, w, channels = si.shape
    if params is not None and params.resample != 1.0:
        raise ScanDistortionError(
            "fields measured on resampled frames cannot move a spectrum image"
        )
    geo = params if params is not None else NonrigidParams()
    top, bottom, left, right = geo.trim_px
    order = range(n - 1, -1, -1) if geo.reverse else range(n)
    hh, ww = tuple(fields.shape[2:])
    if n != len(fields):
        raise ScanDistortionError(f"{n} spectrum-image frames for {len(fields)} fields")
    out = np.zeros((hh, ww, channels), np.float32)
    count = np.zeros((hh, ww), np.float32)
    for j, i in enumerate(order):
        if j in flags:
            continue
        py, px, inside = source_positions(fields[j])
        count += inside
        for c0 in range(0, channels, chunk_channels):
            chunk = np.asarray(si[i, top : h - bottom, left : w - right, c0 : c0 + chunk_channels])
            if geo.transpose:
                chunk = chunk.transpose(1, 0, 2)
            if chunk.shape[:2] != (hh, ww):
                raise ScanDistortionError(f"spectrum image {chunk.shape[:2]} ≠ fields {(hh, ww)}")
            gather_bilinear(chunk, py, px, inside, out[:, :, c0 : c0 + chunk_channels])
    return out, count
