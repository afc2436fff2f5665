"""Density-weighted merge (Ophus, Ciston & Nelson 2016): every frame's pixels put where they
landed, no frame resampled.

With fields f_i (common orientation; frame_i(q) ≈ ref(q − f_i(q))), pixel q of frame i saw the
reference at q − f_i(q). Each pixel's value is spread onto the output grid at that position
with bilinear weights k and both sums are smoothed by a Gaussian of ``sigma_px`` (a kernel
density estimate of where the frames' pixels landed):

    density(r) = G ⊛ Σ_i Σ_q k(r − (q − f_i(q))),    merged(r) = G ⊛ Σ k·I_i(q) / density(r).

Where no frame's pixel landed within about a pixel (density below ``MIN_DENSITY`` of its
median) the merged image is NaN. Unlike the average of resampled frames this interpolates the
data once, at the end, and weights every pixel by how densely the frames sampled it (gaps and
overlaps of a distorted scan are counted, not smeared).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from scherzer.processing.scan_distortion.kernels import splat_bilinear
from scherzer.processing.scan_distortion.settings import ScanDistortionError

__all__ = ["MERGE_SIGMA_PX", "merge_density"]

MERGE_SIGMA_PX = 0.3  # Gaussian σ (px) of the density estimate: sharper against gap-free
MIN_DENSITY = 0.2  # below this fraction of the median density the merged image is NaN


def merge_density(
    frames: np.ndarray,
    fields: np.ndarray,
    *,
    flagged: Any = (),
    sigma_px: float = MERGE_SIGMA_PX,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge frames (n, H, W) in common orientation by their fields (n, 2, H, W). Returns
    (merged (H, W) float32, NaN where too few pixels landed; density (H, W) float32: frames'
    pixels per output pixel, smoothed — a frame that covers a pixel once adds 1)."""
    arr = np.asarray(frames, dtype=np.float32)
    if arr.ndim != 3 or tuple(fields.shape) != (arr.shape[0], 2, *arr.shape[1:]):
        raise ScanDistortionError(f"frames {arr.shape} do not match the fields {fields.shape}")
    h, w = arr.shape[1:]
    total = np.zeros((h, w), np.float64)
    weight = np.zeros((h, w), np.float64)
    qy = np.arange(h, dtype=np.float64)[:, None]
    qx = np.arange(w, dtype=np.float64)[None, :]
    skip = {int(f) for f in flagged}
    for i in range(len(arr)):
        if i in skip:
            continue
        f = fields[i]  # (2, H, W): an array's or a compact source's (expanded here)
        splat_bilinear(arr[i], qy - f[0], qx - f[1], total, weight)
    if sigma_px > 0:
        total = ndimage.gaussian_filter(total, sigma_px, mode="constant")
        weight = ndimage.gaussian_filter(weight, sigma_px, mode="constant")
    seen = weight > 0
    floor = MIN_DENSITY * float(np.median(weight[seen])) if seen.any() else np.inf
    merged = np.full((h, w), np.nan, np.float32)
    ok = weight >= floor
    merged[ok] = (total[ok] / weight[ok]).astype(np.float32)
    return merged, weight.astype(np.float32)
