"""A frame as an 8-bit greyscale PNG with a percentile stretch, rendered on the server.

Why a PNG rather than raw float32 drawn on a canvas: a 512² float32 frame is 1 MiB, its PNG
~0.1–0.3 MiB; an ``<img>`` needs no JavaScript numerics, carries the browser's credentials by
itself and is what a user can save; and the stretch (robust to hot pixels and dead columns) is
computed once in numpy instead of in every browser. The page shows frames, it does not measure
them — measurements belong in the job file.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["frame_png", "stretch_u8"]

#: Percentiles mapped to black and white: clips the brightest/darkest 0.5 % (hot pixels, edges).
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
#: Longest side sent; larger frames are block-averaged (a 4k frame would be 16 MiB of pixels).
MAX_SIDE_PX = 1024


def _bin_down(image: np.ndarray, max_side: int) -> np.ndarray:
    factor = int(np.ceil(max(image.shape) / max_side))
    if factor <= 1:
        return image
    ny, nx = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    trimmed = image[:ny, :nx]
    return trimmed.reshape(ny // factor, factor, nx // factor, factor).mean(axis=(1, 3))


def stretch_u8(image: np.ndarray, max_side: int = MAX_SIDE_PX) -> np.ndarray:
    """``image`` (2-D, any real dtype) as uint8 with the percentile stretch; NaN → black."""
    data = np.asarray(image, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"a frame is 2-D; got shape {data.shape}")
    data = _bin_down(data, max_side)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(data.shape, np.uint8)
    lo, hi = np.percentile(data[finite], [LOW_PERCENTILE, HIGH_PERCENTILE])
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.clip((np.where(finite, data, lo) - lo) * scale, 0, 255)
    return out.astype(np.uint8)


def frame_png(image: np.ndarray) -> bytes:
    """The PNG bytes of :func:`stretch_u8` of ``image``."""
    buf = io.BytesIO()
    Image.fromarray(stretch_u8(image)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
