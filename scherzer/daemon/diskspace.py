"""Disk space: what counts as "the disk is full", and the room a write needs before it starts.

Why check before writing: when the disk fills inside an HDF5 write the library's behaviour is
unreliable (an error, a half-written chunk, or a crash of the whole process), so the executor
refuses to start a frame unless :data:`WRITE_HEADROOM_BYTES` beyond the frame's own bytes are
free (:func:`ensure_room`), and treats any write error that still says "no space" as
:class:`DiskFull` (:func:`is_disk_full`). A disk-full job ends ``failed`` with code
``disk_full``; the executor then pauses the queue until space returns.
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "WRITE_HEADROOM_BYTES",
    "DiskFull",
    "DiskGate",
    "ensure_room",
    "free_bytes",
    "is_disk_full",
]

#: Free bytes a frame write must leave behind: the file's HDF5 metadata and records, the
#: ground truth and close, the job database's WAL and the log lines that follow. Larger is
#: safer against other writers on the same disk; smaller lets a nearly full disk take more frames.
WRITE_HEADROOM_BYTES = 4 << 20
#: Free bytes (beyond the reserve) before a disk hold lifts by itself: twice the write headroom,
#: so the next job does not start only to stop at its first frame.
RESUME_HEADROOM_BYTES = 2 * WRITE_HEADROOM_BYTES
#: errno values that mean "no room" (full disk, exhausted quota).
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: Text of errors that lost their errno on the way (HDF5, SQLite).
_FULL_TEXTS = ("no space left", "errno = 28", "disk is full", "disk quota exceeded")


class DiskFull(OSError):
    """Not enough free space to write safely (raised before the write, or wrapping it)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def is_disk_full(exc: BaseException | None) -> bool:
    """True if ``exc`` (or an exception it was raised from) means the disk or quota is full."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DiskFull):
            return True
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if isinstance(exc, OSError | sqlite3.Error):
            text = str(exc).lower()
            if any(t in text for t in _FULL_TEXTS):
                return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def free_bytes(path: str | Path) -> int:
    """Free bytes for this user on the file system holding ``path`` (0 if it cannot be read)."""
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return 0


def ensure_room(
    path: str | Path, needed_bytes: int, headroom_bytes: int = WRITE_HEADROOM_BYTES
) -> None:
    """Raise :class:`DiskFull` unless ``needed_bytes + headroom_bytes`` are free at ``path``."""
    free = free_bytes(path)
    if free < needed_bytes + headroom_bytes:
        raise DiskFull(
            f"the disk holding {path} is full: {free} bytes free, a write of {needed_bytes} "
            f"bytes needs {headroom_bytes} more to stay free; frames already written are kept"
        )


class DiskGate:
    """The queue's hold for disk space (thread-safe enough: one writer, the executor thread).

    Closed (``reason`` set) when a job ended ``disk_full`` or when less than ``reserve_bytes``
    is free before a job starts; it opens by itself once ``reserve_bytes`` +
    :data:`RESUME_HEADROOM_BYTES` are free again, or at once on :meth:`open` (``queue_resume``).
    """

    def __init__(
        self,
        path: Path,
        reserve_bytes: int,
        free: Callable[[Path], int] = free_bytes,
    ) -> None:
        self.path = path
        self.reserve_bytes = reserve_bytes
        self.reason: str | None = None
        self._free = free

    def close(self, reason: str) -> None:
        self.reason = reason

    def open(self) -> None:
        self.reason = None

    def blocked(self) -> tuple[bool, bool]:
        """``(blocked, changed)``: whether a job may start now, and whether the hold was just
        set or lifted (the caller announces the queue change)."""
        free = self._free(self.path)
        if self.reason is not None:
            if free >= self.reserve_bytes + RESUME_HEADROOM_BYTES:
                self.reason = None
                return False, True
            return True, False
        if free < self.reserve_bytes:
            self.reason = (
                f"the data disk has {free} bytes free, below the reserve of "
                f"{self.reserve_bytes} (limits.min_free_disk_bytes); the queue waits for space"
            )
            return True, True
        return False, False
