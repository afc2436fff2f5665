"""Repair of a file a killed writer left, so that plain readers open it: ``h5py.File(path, "r")``
without SWMR, rosettasciio and ``hs.load``.

A writer killed with SIGKILL leaves the superblock's "open for writing" flags set (HDF5 then
refuses every open except in SWMR-read mode) and, for our files, the HyperSpy frame counts of
the acquisition start. :func:`repair` clears the flags as ``h5clear -s`` does
(:mod:`scherzer.io.superblock`) and then, for Scherzer files, trims each stack to its complete
frames and sets the HyperSpy views' frame counts and record-derived metadata
(:func:`scherzer.io.emd.finalize_stacks`). The daemon calls it when it recovers a job whose
writer died; ``scherzer repair FILE`` calls it by hand.
"""

from __future__ import annotations

from pathlib import Path

import h5py

from scherzer.io.emd import complete_rows, finalize_stacks, stack_names
from scherzer.io.errors import EmdError, existing_file
from scherzer.io.hdf5 import is_ours
from scherzer.io.hspy import EXPERIMENTS
from scherzer.io.superblock import clear_write_flags

__all__ = ["repair"]


def repair(path: str | Path) -> bool:
    """Make a file left by a killed writer openable by every HDF5 reader (rosettasciio,
    HyperSpy, h5py without SWMR) by clearing its "open for writing" flags, as ``h5clear -s``
    does; for Scherzer files also set the HyperSpy frame counts (stacks are trimmed to their
    complete frames, as every reader reads them).

    Call it only when no StackWriter is writing the file (a live SWMR writer holds no lock
    that could be checked). Returns True if flags were cleared, False if there were none.
    """
    p = existing_file(path)
    if not h5py.is_hdf5(p):
        raise EmdError(f"{p} is not an HDF5 file; nothing to repair")
    cleared = clear_write_flags(p, allow_swmr=True)
    try:
        with h5py.File(p, "r") as f:
            unfinished = is_ours(f) and _unfinished(f)
        if unfinished:
            with h5py.File(p, "a") as f:
                finalize_stacks(f)
    except OSError as exc:
        raise EmdError(f"cannot repair {p} ({exc}); is a writer still running?") from exc
    return cleared


def _unfinished(f: h5py.File) -> bool:
    """Whether a stack holds rows past its complete frames or a view has the wrong count."""
    views = f.get(EXPERIMENTS)
    for name in stack_names(f):
        g = f["data"][name]
        n = complete_rows(g)
        if any(g[key].shape[0] != n for key in ("data", "dim1", "records")):
            return True
        if views is not None and name in views and views[name]["axis-0"].attrs["size"] != n:
            return True
    return False
