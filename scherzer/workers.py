"""Thread counts for the numerical libraries: a leaf module (imports nothing from scherzer).

Kept apart from :mod:`scherzer.optics` so that the rigid alignment path (`scherzer align`) needs
neither the optics models nor pydantic at import time.
"""

from __future__ import annotations

import os

__all__ = ["fft_workers"]


def fft_workers() -> int:
    """Worker threads for scipy.fft calls (all cores)."""
    return os.cpu_count() or 1
