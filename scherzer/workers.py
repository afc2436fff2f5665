"""Thread counts for the numerical libraries: a leaf module (imports nothing from scherzer).

Kept apart from :mod:`scherzer.optics` so that the rigid alignment path (`scherzer align`) needs
neither the optics models nor pydantic at import time.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

__all__ = ["fft_workers", "one_blas_thread"]

P = ParamSpec("P")
R = TypeVar("R")


def fft_workers() -> int:
    """Worker threads for scipy.fft calls (all cores)."""
    return os.cpu_count() or 1


def one_blas_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run with BLAS limited to one thread (threadpoolctl; the FFT workers and numba
    threads are not affected).

    For engines whose BLAS work is many small products (matrix–vector products over a
    frequency band, small least-squares fits): BLAS threads gain nothing there, and between
    calls OpenBLAS's idle threads spin-wait beside the FFT and image threads. Measured, the
    focal registration and restoration of 20 × 512² from the CLI, 8 alternated runs on 2
    cores: CPU 4.67 → 4.33 s (median), results identical; at 11 × 1024² CPU 13.9 → 12.9 s
    (3 runs), results within 4e-14 nm (the multi-threaded sums' rounding). The limit also
    makes a result independent of the process's BLAS thread count (CLI, daemon, notebook)."""

    @functools.wraps(fn)
    def limited(*args: P.args, **kwargs: P.kwargs) -> R:
        from threadpoolctl import threadpool_limits  # only where an engine runs

        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return limited
