"""Files a request may name: only by name, only inside a directory the configuration lists.

A processing parameter such as ``{"step": "restore", "mtf": "k2_300kv.csv"}`` names a camera curve
in ``calibrations_dir`` (:class:`~scherzer.config.Settings`); it is never a path. The name is
checked for form at submit (:func:`check_calibration_name`: one plain file name, no separators, no
``..``, not hidden) and, when the directory is known, resolved and checked
(:func:`resolve_calibration`: exists, a regular file after symlinks are followed, still inside
the directory, at most :data:`MAX_CALIBRATION_BYTES`). :func:`calibration_loader` gives the
pipeline's ``load_curve`` callable over that directory.

Error messages name the file and the directory, never the file's content: a parse error is
reported by its type only (numpy's messages quote the offending text).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "MAX_CALIBRATION_BYTES",
    "CalibrationError",
    "calibration_loader",
    "check_calibration_name",
    "resolve_calibration",
]

#: Largest calibration file read (a camera curve is a profile of some thousand numbers or a
#: 2-D grid of a few MB); bigger files are refused before they are opened.
MAX_CALIBRATION_BYTES = 64 << 20
#: A calibration name: letters, digits, ``_ . -``; starts with a letter or digit; ≤ 128 chars.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class CalibrationError(ValueError):
    """A named calibration file is refused or unreadable; the message never quotes content."""


def check_calibration_name(name: object) -> str:
    """``name`` if it is a plain calibration file name (no path, no ``..``, not hidden); else
    :class:`CalibrationError`. Touches no file: usable at plan validation."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        shown = name[:64] if isinstance(name, str) else type(name).__name__
        raise CalibrationError(
            f"a calibration is the name of a file in the daemon's calibrations directory "
            f"(letters, digits, '_', '.', '-'; no path), not {shown!r}"
        )
    return name


def resolve_calibration(
    name: object, directory: str | Path | None, *, max_bytes: int = MAX_CALIBRATION_BYTES
) -> Path:
    """The real path of calibration ``name`` inside ``directory``, checked: a plain name, the
    directory configured, the file existing, regular (no FIFO or device), inside the directory
    after symlinks are resolved, and at most ``max_bytes``."""
    name = check_calibration_name(name)
    if directory is None or str(directory) == "":
        raise CalibrationError(
            f"calibration {name!r} asked for, but no calibrations_dir is configured"
        )
    try:
        base = Path(directory).expanduser().resolve(strict=True)
        real = (base / name).resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise CalibrationError(
            f"calibration {name!r} not found in {directory} ({type(exc).__name__})"
        ) from None
    if not real.is_relative_to(base) or real == base:
        raise CalibrationError(f"calibration {name!r} leads outside {base}; refused")
    info = real.stat()
    if not stat.S_ISREG(info.st_mode):
        raise CalibrationError(f"calibration {name!r} in {base} is not a regular file")
    if info.st_size > max_bytes:
        raise CalibrationError(
            f"calibration {name!r} has {info.st_size} bytes; the limit is {max_bytes}"
        )
    return real


def _read_curve(path: Path, name: str) -> np.ndarray:
    """Parse a checked calibration file; errors say only the type (never the content)."""
    from scherzer.processing.spectral import load_camera_curve

    # Opened without following a last-moment swap to a FIFO: O_NONBLOCK + a regular-file check
    # on the open descriptor, so a replaced file cannot block the worker.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CalibrationError(f"calibration {name!r} is not a regular file")
    finally:
        os.close(fd)
    try:
        curve = np.asarray(load_camera_curve(path), dtype=np.float64)
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(
            f"calibration {name!r} is not a readable camera curve ({type(exc).__name__})"
        ) from None
    if curve.size == 0 or not np.all(np.isfinite(curve)):
        raise CalibrationError(f"calibration {name!r} is empty or holds non-finite values")
    return curve


def calibration_loader(
    directory: str | Path | None, *, max_bytes: int = MAX_CALIBRATION_BYTES
) -> Callable[[str], np.ndarray]:
    """A ``load_curve(name) -> array`` over ``directory`` (for
    :func:`scherzer.processing.steps.parse_step`)."""

    def load_curve(name: str) -> np.ndarray:
        path = resolve_calibration(name, directory, max_bytes=max_bytes)
        return _read_curve(path, name)

    return load_curve
