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
    calls OpenBLAS's idle threads spin-wait beside the FFT and image threads. Measured on 2
    cores, ``scherzer restore`` (alternated runs, medians): 20 × 512², this limit with the
    command's one-thread start against neither, CPU 4.58 → 4.45 s (8 runs), results identical;
    11 × 1024², one BLAS thread from the start, CPU 13.9 → 12.9 s (3 runs), results within
    4e-14 nm (the multi-threaded sums' rounding). The limit also makes a result independent of
    the process's BLAS thread count (CLI, daemon, notebook). Costs ~0.3 ms per call."""

    @functools.wraps(fn)
    def limited(*args: P.args, **kwargs: P.kwargs) -> R:
        from threadpoolctl import threadpool_limits  # only where an engine runs

        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return limited
