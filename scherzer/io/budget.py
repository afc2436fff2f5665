"""Memory budget for reading: every reader checks the shapes a file declares before allocating.

A file can declare any shape in a few bytes (an HDF5 dataset of 5×20000×20000 that was never
written takes no space on disk). Readers therefore add up what a call would allocate, from the
declared shapes and dtypes, and refuse with :class:`MemoryBudgetError` — naming the shape, the
dtype, the bytes and the budget — before reading anything that would exceed it.

The budget is the ``max_bytes`` argument of every reader (``read_stack``, ``read_stacks``,
``read_result``, ``read_table``, ``import_signals``, ``import_stack``, ``import_stacks``,
``describe``); None means :func:`default_budget_bytes`: :data:`DEFAULT_RAM_FRACTION` of the memory
available when the call starts (``MemAvailable`` in ``/proc/meminfo``, else physical memory).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from scherzer.io.errors import EmdError

__all__ = [
    "DEFAULT_RAM_FRACTION",
    "MemoryBudgetError",
    "ReadBudget",
    "available_ram_bytes",
    "default_budget_bytes",
]

#: Share of the available memory one read may allocate by default. Leaves room for the copies
#: processing makes (float32 conversion, FFT work arrays) and for the rest of the process.
DEFAULT_RAM_FRACTION = 0.25
#: Used when the memory size cannot be determined (no /proc, no sysconf): 4 GiB.
FALLBACK_RAM_BYTES = 4 << 30
_MEMINFO = "/proc/meminfo"
_KIB = 1024
_GB = 1e9


class MemoryBudgetError(EmdError):
    """A file declares more data than the read budget allows; nothing was allocated."""


def available_ram_bytes() -> int:
    """Memory available to a new allocation now (Linux ``MemAvailable``; else physical RAM)."""
    try:
        with open(_MEMINFO, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * _KIB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return FALLBACK_RAM_BYTES


def default_budget_bytes() -> int:
    """The budget when none is given: :data:`DEFAULT_RAM_FRACTION` of the available memory."""
    return int(DEFAULT_RAM_FRACTION * available_ram_bytes())


def _format_bytes(n: float) -> str:
    return f"{n / _GB:.3g} GB" if n >= _GB / 10 else f"{n / 1e6:.3g} MB"


class ReadBudget:
    """What one read call may still allocate; :meth:`take` before every array is read."""

    def __init__(self, max_bytes: int | None = None) -> None:
        if max_bytes is not None and not (
            isinstance(max_bytes, (int, np.integer)) and max_bytes > 0
        ):
            raise EmdError(f"max_bytes must be a positive integer (bytes); got {max_bytes!r}")
        self.explicit = max_bytes is not None
        self.max_bytes = int(max_bytes) if max_bytes is not None else default_budget_bytes()
        self.used = 0

    @classmethod
    def of(cls, budget: ReadBudget | int | None) -> ReadBudget:
        """A budget from a ``max_bytes`` value, or the given budget (shared by nested reads)."""
        return budget if isinstance(budget, ReadBudget) else cls(budget)

    def take(self, shape: Sequence[int], dtype: np.dtype | str, what: str) -> None:
        """Count an array of ``shape`` and ``dtype`` against the budget, or refuse it."""
        dt = np.dtype(dtype)
        n_bytes = math.prod(int(v) for v in shape) * dt.itemsize
        if self.used + n_bytes > self.max_bytes:
            source = (
                "max_bytes"
                if self.explicit
                else (f"default: {DEFAULT_RAM_FRACTION:g} of the available memory")
            )
            already = f" after {_format_bytes(self.used)} already read" if self.used else ""
            raise MemoryBudgetError(
                f"{what} declares shape {tuple(int(v) for v in shape)} {dt} = "
                f"{_format_bytes(n_bytes)}{already}, over the read budget of "
                f"{_format_bytes(self.max_bytes)} ({self.max_bytes} bytes, {source}); "
                "pass a larger max_bytes to read it"
            )
        self.used += n_bytes
