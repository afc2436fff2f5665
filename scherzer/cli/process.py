"""How the ``scherzer`` process starts and ends: BLAS threads, the C allocator, the teardown.

One job: settings of the process itself, which the program (:func:`scherzer.cli.console_main`)
owns and a library must not touch. Each is applied only where it was measured to help, and
never over a setting the user made in the environment. Light: standard library only (ctypes
on use).
"""

from __future__ import annotations

import gc
import os
import sys

__all__ = [
    "PROCESSING_COMMANDS",
    "leave_collector_out_of_teardown",
    "one_blas_thread_at_start",
    "tune_allocator",
]

#: The commands whose process is set up for their engines (:func:`one_blas_thread_at_start`,
#: :func:`tune_allocator`) — in a fresh process only, and not ``align --nonrigid`` (the
#: scan-distortion engine wants BLAS threads and was not measured with the allocator settings).
PROCESSING_COMMANDS = frozenset({"align", "restore"})

# mallopt(3) parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8

#: glibc malloc settings of the processing commands, as (mallopt parameter, value). Their
#: arrays of a few to 32 MB are allocated and freed many times (band spectra, FFT boxes, pair
#: blocks). glibc's defaults map each from the system and unmap it on free, or keep it in one
#: of several per-thread arenas whose free tops are trimmed. Every reuse then faults fresh
#: zeroed pages, which cost 1.9 s of system time in an 11 × 1024² restore on this 2-core
#: machine. These settings keep that memory for reuse:
#:
#: - one arena for all threads (the image and FFT threads allocate big blocks, rarely);
#: - blocks up to 32 MB from the heap (glibc's largest allowed mmap threshold);
#: - up to 256 MB of free heap top kept;
#: - the heap grown 64 MB at a time.
#:
#: Measured, alternated runs (median wall seconds; ``seconds`` processing; peak RSS):
#:
#: - ``restore`` 11 × 1024², 3 runs: seconds 7.47 → 6.21, system 1.90 → 0.75 s,
#:   peak 1066 → 930 MB;
#: - ``restore`` 20 × 512², 6 runs: seconds 1.93 → 1.80, system 0.47 → 0.33 s,
#:   peak 575 → 500 MB;
#: - ``align`` 16 × 512², 8 runs: wall 0.77 → 0.69 s, peak 151 → 157 MB;
#: - ``align`` 16 × 2048², 3 runs: seconds 4.76 → 4.16, peak 743 → 749 MB.
#:
#: The single arena matters most (without it: 11 × 1024² system time 1.46 s, peak 1361 MB). It
#: was measured on 2 cores; on many cores every thread takes that one arena's lock, which the
#: engines' few, large allocations hold briefly (re-measure there before widening the list).
MALLOC_SETTINGS = (
    (_M_ARENA_MAX, 1),
    (_M_MMAP_THRESHOLD, 32 * 2**20),
    (_M_TRIM_THRESHOLD, 256 * 2**20),
    (_M_TOP_PAD, 64 * 2**20),
)


def _fresh_processing_command(argv: list[str]) -> bool:
    """``argv`` runs one of :data:`PROCESSING_COMMANDS` (not ``--nonrigid``) and NumPy is not
    loaded yet (a fresh process: an embedding program is left alone)."""
    return (
        bool(argv)
        and argv[0] in PROCESSING_COMMANDS
        and "--nonrigid" not in argv
        and "numpy" not in sys.modules
    )


def one_blas_thread_at_start(argv: list[str]) -> None:
    """Start OpenBLAS with one thread for a :func:`_fresh_processing_command`, never over the
    user's own ``OPENBLAS_NUM_THREADS``. Their engines run BLAS on one thread anyway
    (:func:`scherzer.workers.one_blas_thread`); started with more, OpenBLAS's idle pool starts
    and spin-waits beside the FFT workers (measured: cold ``scherzer align`` of 16 × 512², 2
    cores at a load of 4–5: CPU 1.26 → 1.16 s, wall 2.23 → 1.79 s, medians of 9 alternated
    runs)."""
    if _fresh_processing_command(argv):
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def tune_allocator(argv: list[str]) -> list[int]:
    """Apply :data:`MALLOC_SETTINGS` for a :func:`_fresh_processing_command`.

    Only with glibc (``libc.so.6``; not musl, macOS or Windows), and not when the user set the
    allocator up in the environment (``GLIBC_TUNABLES`` or any ``MALLOC_*`` variable). Returns
    the parameters glibc accepted (empty when none were applied)."""
    if not _fresh_processing_command(argv):
        return []
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return []
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return []
    return [param for param, value in MALLOC_SETTINGS if mallopt(param, value) == 1]


def leave_collector_out_of_teardown() -> None:
    """Spare the ending process the garbage collector's passes over every live object.

    The interpreter's teardown clears every module and runs the collector over what is left:
    after a numba kernel is loaded that is ~1.3·10⁵ tracked objects and took 0.31–0.35 s of
    ``scherzer restore``'s wall time (0.03 s without; measured from the parent, 2 runs each).
    :func:`gc.freeze` moves the live objects out of the collector's reach, so teardown only
    drops references. Nothing is skipped that writes data: exit handlers (``atexit``, logging,
    ``weakref.finalize``) still run and objects are still freed by reference counting; only
    reference cycles still alive at exit stay uncollected as the process ends (our files are
    closed by their owners, and the HDF5 library closes any open file at exit). Only for a
    process about to end: the collector stays off."""
    gc.disable()
    gc.freeze()
