"""Job files on disk: output paths, job folders, counting frames, opening the stack writer.

Files are ``<data_dir>/jobs/<name>_<NNN>.hspy`` (HyperSpy's format and EMD 1.0 at once:
``hs.load`` opens them; docs/file-format.md) with the folder ``<name>_<NNN>/`` beside (plots),
numbered, never overwritten; the number is reserved by creating the folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import structlog

from scherzer.daemon.protocol import JobInfo
from scherzer.io import StackWriter

__all__ = [
    "count_frames_on_disk",
    "job_folder",
    "open_stack_writer",
    "output_path",
    "repair_job_file",
]

log = structlog.get_logger("scherzer.executor")


def open_stack_writer(path: Path, **kwargs: Any) -> StackWriter:
    """The job-file writer: EMD 1.0, flushed per frame, readable after a crash."""
    return StackWriter(path, **kwargs)


def count_frames_on_disk(path: str | Path | None) -> int:
    """Complete frames in a job file (largest signal); 0 if it is missing or unreadable."""
    if not path or not Path(path).exists():
        return 0
    from scherzer.io import describe

    try:
        groups = describe(path)["data"].values()  # reads records only, not the frames
        return max((g.get("frames_complete", 0) for g in groups if g["kind"] == "stack"), default=0)
    except Exception:
        log.warning("cannot count frames", path=str(path))
        return 0


def _slug(text: str, fallback: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:48] or fallback


#: Job files are HyperSpy .hspy files (also EMD 1.0); ``hs.load`` refuses ``.h5`` ("multiple
#: file readers"). Older job files were ``.h5``: they are still read and still block a number.
JOB_FILE_SUFFIX = ".hspy"
JOB_FILE_SUFFIXES = (".hspy", ".h5")


def output_path(data_dir: Path, job: JobInfo) -> Path:
    """``<data_dir>/jobs/<name>_<NNN>.hspy`` with the first number whose file (in this or the
    older ``.h5`` naming) and folder are all unused; the folder (:func:`job_folder`) is created
    here, which reserves the number."""
    directory = data_dir / "jobs"
    directory.mkdir(parents=True, exist_ok=True)
    slug = _slug(job.name or job.kind, job.kind)
    for number in range(1, 1_000_000):
        stem = f"{slug}_{number:03d}"
        path = directory / f"{stem}{JOB_FILE_SUFFIX}"
        if any((directory / f"{stem}{suffix}").exists() for suffix in JOB_FILE_SUFFIXES):
            continue
        try:
            (directory / stem).mkdir()
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"no free file number for {slug} in {directory}")


def job_folder(path: str | Path) -> Path:
    """The folder beside a job file that holds its plots (``<name>_<NNN>/``)."""
    p = Path(path)
    return p.with_suffix("")


def repair_job_file(path: str | Path | None) -> bool:
    """Make a job file a killed writer left readable by plain readers (clears the HDF5 "open
    for writing" flags, trims stacks to their complete frames: :func:`scherzer.io.repair`).
    Never raises; returns True if the file needed it."""
    if not path or not Path(path).exists():
        return False
    from scherzer.io import repair

    try:
        return bool(repair(path))
    except Exception as exc:
        log.warning("cannot repair a job file", path=str(path), error=str(exc))
        return False
