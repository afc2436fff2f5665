"""The error every file operation raises, and the check that a path names an existing file.

Shared by every module of :mod:`scherzer.io`; it imports nothing from the package.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EmdError", "existing_file"]


class EmdError(ValueError):
    """A file could not be read or written as asked; the message says what is wrong."""


def existing_file(path: str | Path) -> Path:
    """``path`` as a Path, or FileNotFoundError/EmdError when it is missing or a directory."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    if p.is_dir():
        raise EmdError(f"{p} is a directory, not a file")
    return p
