"""Processing plots and reports, served only from the daemon's data directory, by name.

A request names a job (whose folder the daemon reports through ``job_get``) or a report stem and
a file name matching :data:`NAME`; never a path. Every resolved file must sit directly in its
folder, and that folder inside the data directory (so ``..``, absolute names and symlinks out of
the tree are refused), with a suffix from :data:`SUFFIXES`.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["NAME", "DataFiles"]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SUFFIXES = {".png": "image/png"}


class DataFiles:
    """Look-ups inside one data directory (``jobs/<stem>/`` plots, ``reports/`` reports)."""

    def __init__(self, data_dir: str | Path | None) -> None:
        self.root = None if data_dir is None else Path(data_dir).expanduser().resolve()

    def _inside(self, folder: Path) -> Path | None:
        if self.root is None:
            return None
        folder = folder.resolve()
        return folder if folder.is_dir() and folder.is_relative_to(self.root) else None

    def job_folder(self, output_file: str | None) -> Path | None:
        """The plots folder beside a job file (``<name>_<NNN>/``), if inside the data dir."""
        return None if not output_file else self._inside(Path(output_file).with_suffix(""))

    def report_folder(self) -> Path | None:
        return None if self.root is None else self._inside(self.root / "reports")

    @staticmethod
    def listing(folder: Path | None) -> list[str]:
        """Servable file names in ``folder``, sorted."""
        if folder is None:
            return []
        return sorted(
            p.name
            for p in folder.iterdir()
            if p.suffix.lower() in SUFFIXES and NAME.match(p.name) and p.is_file()
        )

    @staticmethod
    def file(folder: Path | None, name: str) -> tuple[Path, str] | None:
        """(path, media type) of ``name`` directly inside ``folder``, or None."""
        if folder is None or not NAME.match(name) or Path(name).suffix.lower() not in SUFFIXES:
            return None
        path = (folder / name).resolve()
        if path.parent != folder or not path.is_file():
            return None
        return path, SUFFIXES[path.suffix.lower()]

    def reports(self) -> list[str]:
        """Report stems (``<name>_<NNN>``), newest first."""
        folder = self.report_folder()
        if folder is None:
            return []
        found = [p for p in folder.glob("*.md") if NAME.match(p.stem) and p.is_file()]
        return [p.stem for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def report(self, stem: str) -> tuple[str, Path | None] | None:
        """(Markdown text, its image folder) of report ``stem``, or None."""
        folder = self.report_folder()
        if folder is None or not NAME.match(stem):
            return None
        md = (folder / f"{stem}.md").resolve()
        if md.parent != folder or not md.is_file():
            return None
        images = folder / stem
        return md.read_text(encoding="utf-8", errors="replace"), self._inside(images)
