"""Ground-truth checks for scan-distortion correction: per-pixel residuals against the true
sampled positions, and column positions of a crystal image against an ideal lattice.

Units: px on the reference grid (the corrected images' pixels), pm for column positions.
Used by the tests and the benchmark; nothing here runs inside the engine.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "column_positions",
    "lattice_rms_pm",
    "ncc",
    "pixel_residual_px",
    "reference_positions_nm",
    "row_start_mask",
    "truth_positions_px",
]


def _turns(rotations_deg: np.ndarray) -> list[int]:
    rel = np.asarray(rotations_deg, float) - float(rotations_deg[0])
    return [round(r / 90.0) % 4 for r in rel]


def truth_positions_px(positions_nm: np.ndarray, rotations_deg, pixel_nm: float) -> np.ndarray:
    """True sampled positions (n, H, W, 2) in px, turned into the common orientation (the
    frames' as given by ``rotate_to_common``)."""
    out = []
    for p, k in zip(positions_nm, _turns(rotations_deg), strict=True):
        out.append(np.stack([np.rot90(p[..., a], -k) for a in range(2)], axis=-1))
    return np.asarray(out, dtype=np.float64) / pixel_nm


def row_start_mask(shape: tuple[int, int], rotations_deg, fraction: float = 0.05) -> np.ndarray:
    """(n, H, W) True away from the first ``fraction`` of each scan line (common orientation)."""
    out = []
    for k in _turns(rotations_deg):
        scan = np.ones(shape if k % 2 == 0 else shape[::-1], bool)
        scan[:, : int(np.ceil(fraction * scan.shape[1]))] = False
        out.append(np.rot90(scan, -k))
    return np.asarray(out)


def _similarity_design(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Rows for (Y, X) = (ty + a·y − b·x, tx + b·y + a·x) stacked [Y rows; X rows]."""
    one, zero = np.ones_like(y), np.zeros_like(y)
    top = np.stack([one, zero, y, -x], axis=-1)
    bottom = np.stack([zero, one, x, y], axis=-1)
    return np.concatenate([top, bottom])


def _affine_design(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    one, zero = np.ones_like(y), np.zeros_like(y)
    top = np.stack([one, y, x, zero, zero, zero], axis=-1)
    bottom = np.stack([zero, zero, zero, one, y, x], axis=-1)
    return np.concatenate([top, bottom])


def _fit_rms(design: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    sol, *_ = np.linalg.lstsq(design, target, rcond=None)
    res = (design @ sol - target).reshape(2, -1)
    return float(np.sqrt(np.mean(np.sum(res**2, axis=0)))), res


def pixel_residual_px(fields_px: np.ndarray, truth_px: np.ndarray, mask: np.ndarray) -> float:
    """RMS (px) over masked pixels of all frames of |sampled − true| after the best global
    similarity map from the reference grid to specimen px (the result's free gauge)."""
    _, _, h, w = fields_px.shape
    qy, qx = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    sy = (qy[None] - fields_px[:, 0])[mask]
    sx = (qx[None] - fields_px[:, 1])[mask]
    target = np.concatenate([truth_px[..., 0][mask], truth_px[..., 1][mask]])
    return _fit_rms(_similarity_design(sy, sx), target)[0]


def reference_positions_nm(
    fields_px: np.ndarray, truth_px: np.ndarray, mask: np.ndarray, pixel_nm: float
) -> np.ndarray:
    """Specimen position (H, W, 2) nm of every reference-grid pixel, by the global similarity
    fitted as in :func:`pixel_residual_px` (to sample the truth where the result is)."""
    _, _, h, w = fields_px.shape
    qy, qx = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    sy = (qy[None] - fields_px[:, 0])[mask]
    sx = (qx[None] - fields_px[:, 1])[mask]
    target = np.concatenate([truth_px[..., 0][mask], truth_px[..., 1][mask]])
    sol, *_ = np.linalg.lstsq(_similarity_design(sy, sx), target, rcond=None)
    ty, tx, a, b = sol
    return np.stack([ty + a * qy - b * qx, tx + b * qy + a * qx], axis=-1) * pixel_nm


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised cross-correlation of two images over ``mask`` (finite pixels by default)."""
    m = np.isfinite(a) & np.isfinite(b) if mask is None else mask
    x, y = a[m] - a[m].mean(), b[m] - b[m].mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def column_positions(
    image: np.ndarray, spacing_px: float, edge_px: int = 4, min_height: float = 0.5
) -> np.ndarray:
    """Sub-pixel (y, x) of the bright columns: maxima of the image smoothed by σ = spacing/8
    at least 0.6·``spacing_px`` apart and above ``min_height`` of the 90th-percentile peak
    (above the smoothed image's median), refined by an intensity-weighted centroid (radius
    spacing/3) of the background-subtracted smoothed image. NaN pixels get the median."""
    img = np.where(np.isfinite(image), image, np.nanmedian(image)).astype(np.float64)
    smooth = ndimage.gaussian_filter(img, max(spacing_px / 8.0, 0.7))
    size = max(3, int(0.6 * spacing_px) | 1)
    peaks = (smooth == ndimage.maximum_filter(smooth, size=size)) & np.isfinite(image)
    base = float(np.median(smooth))
    heights = smooth[peaks] - base
    # relative to the brightest columns (90th percentile): weak (e.g. O) columns stay out
    # however many there are
    keep = peaks & (smooth - base > min_height * float(np.percentile(heights[heights > 0], 90)))
    ys, xs = np.nonzero(keep)
    inner = (ys >= edge_px) & (ys < img.shape[0] - edge_px)
    inner &= (xs >= edge_px) & (xs < img.shape[1] - edge_px)
    ys, xs = ys[inner], xs[inner]
    rad = max(1, round(spacing_px / 3.0))
    oy, ox = np.mgrid[-rad : rad + 1, -rad : rad + 1]
    disc = (oy**2 + ox**2) <= rad**2
    out = []
    for y, x in zip(ys, xs, strict=True):
        patch = smooth[y - rad : y + rad + 1, x - rad : x + rad + 1]
        if patch.shape != disc.shape:
            continue
        wgt = np.clip(patch - base, 0.0, None) * disc
        s = wgt.sum()
        if s > 0:
            out.append((y + (wgt * oy).sum() / s, x + (wgt * ox).sum() / s))
    return np.asarray(out)


def lattice_rms_pm(
    positions_px: np.ndarray, basis_px: np.ndarray, pixel_nm: float, fit: str = "similarity"
) -> float:
    """RMS (pm) of column positions about the best ideal lattice n·b1 + m·b2 (``basis_px``
    rows b1, b2 in px, nominal) mapped by a similarity (or ``fit="affine"``) transform.
    Indices (n, m) come from the nominal basis and the first column; the fit is iterated."""
    p = np.asarray(positions_px, float)
    rel = p - p[np.argmin(np.sum((p - p.mean(axis=0)) ** 2, axis=1))]
    idx = np.round(rel @ np.linalg.inv(basis_px)).astype(float)
    nodes = idx @ basis_px
    design = (_similarity_design if fit == "similarity" else _affine_design)(
        nodes[:, 0], nodes[:, 1]
    )
    rms, _ = _fit_rms(design, np.concatenate([p[:, 0], p[:, 1]]))
    return rms * pixel_nm * 1000.0
