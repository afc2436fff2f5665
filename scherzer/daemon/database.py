"""The job database's health: an integrity check at start-up, ``db check`` and ``db recover``.

A corrupt ``jobs.sqlite`` (a disk error, a copy taken mid-write, a truncated file) must not give a
raw traceback or a daemon that answers ``internal`` later: :func:`ensure_database_ok` runs
SQLite's ``integrity_check`` before the store opens and raises :class:`DatabaseCorrupt` (a
:class:`~scherzer.config.ConfigError`, so the CLI prints one line) naming the file and what to do.

:func:`check_database` reports (``scherzer db check``); :func:`recover_database` moves the file
(and its ``-wal``/``-shm`` companions) aside as ``<name>.corrupt-<UTC time>`` and rebuilds the job
history from the job files in ``<data_dir>/jobs`` (``scherzer db recover``): every readable job
file gives back its job (id, kind, name, plan, submitter, frames on disk) as ``interrupted``, or
``done`` when its frames are complete.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from scherzer.config import ConfigError

__all__ = [
    "DatabaseCorrupt",
    "DbCheck",
    "DbRecovery",
    "check_database",
    "ensure_database_ok",
    "recover_database",
]

log = structlog.get_logger("scherzer.daemon")

#: Problems listed by ``integrity_check`` (it stops after this many).
MAX_PROBLEMS = 20
#: The tables a job database must hold.
REQUIRED_TABLES = frozenset({"jobs", "flags"})


class DatabaseCorrupt(ConfigError):
    """The job database cannot be used; the message names it and says what to run."""


@dataclass
class DbCheck:
    """The outcome of :func:`check_database`."""

    path: Path
    ok: bool
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "ok": self.ok, "problems": list(self.problems)}


@dataclass
class DbRecovery:
    """The outcome of :func:`recover_database`."""

    path: Path
    moved_to: list[Path]
    jobs_rebuilt: int
    unreadable_files: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "moved_to": [str(p) for p in self.moved_to],
            "jobs_rebuilt": self.jobs_rebuilt,
            "unreadable_files": list(self.unreadable_files),
        }


def check_database(path: str | Path) -> DbCheck:
    """Open ``path`` read-only and run ``PRAGMA integrity_check`` and a schema check. A missing
    or empty file is fine (a new database is created there)."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return DbCheck(p, True)
    try:
        db = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            rows = db.execute(f"PRAGMA integrity_check({MAX_PROBLEMS})").fetchall()
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            db.close()
    except sqlite3.Error as exc:
        return DbCheck(p, False, [f"{type(exc).__name__}: {exc}"])
    problems = [str(r[0]) for r in rows if str(r[0]) != "ok"]
    if tables and not REQUIRED_TABLES <= tables:
        problems.append(f"not a Scherzer job database (tables {sorted(tables)})")
    return DbCheck(p, not problems, problems)


def ensure_database_ok(path: str | Path) -> None:
    """Raise :class:`DatabaseCorrupt` with advice if ``path`` fails :func:`check_database`."""
    result = check_database(path)
    if result.ok:
        return
    raise DatabaseCorrupt(
        f"the job database {result.path} is damaged ({result.problems[0]}). Run "
        f"`scherzer db check` for details, then `scherzer db recover` to move it aside and "
        f"rebuild the job history from the job files (frames on disk are not touched)"
    )


def _move_aside(path: Path) -> list[Path]:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for suffix in ("", "-wal", "-shm"):
        src = path.with_name(path.name + suffix)
        if src.exists():
            dst = path.with_name(f"{path.name}.corrupt-{stamp}{suffix}")
            src.rename(dst)
            moved.append(dst)
    return moved


def _job_from_file(path: Path) -> dict[str, Any] | None:
    """What a job file says about its job (None if it is not a readable job file)."""
    from scherzer.io import describe

    try:
        groups = describe(path)["data"]
    except Exception:
        return None
    stacks = [g for g in groups.values() if g.get("kind") == "stack"]
    meta = next((g.get("metadata") or {} for g in stacks if g.get("metadata")), {})
    if not stacks or "job_id" not in meta:
        return None
    plan = meta.get("plan")
    if isinstance(plan, str):
        try:
            plan = json.loads(plan)
        except ValueError:
            plan = {}
    frames_done = max(int(g.get("frames_complete", 0)) for g in stacks)
    return {
        "job_id": int(meta["job_id"]),
        "kind": str(meta.get("kind") or (plan or {}).get("kind") or "unknown"),
        "name": str(meta.get("name") or ""),
        "plan": plan if isinstance(plan, dict) else {},
        "submitter": str(meta.get("submitter") or "unknown"),
        "frames_done": frames_done,
        "frames_total": _planned_frames(plan, frames_done),
        "output_file": str(path),
        "created_s": path.stat().st_mtime,
    }


def _planned_frames(plan: Any, fallback: int) -> int:
    from scherzer.daemon.plans import parse_plan

    try:
        return int(parse_plan(plan).n_frames())
    except Exception:
        return fallback


def recover_database(path: str | Path, data_dir: str | Path) -> DbRecovery:
    """Move the database aside and rebuild the job history from the job files
    ``<data_dir>/jobs/*.hspy`` (and older ``*.h5``).
    Never run while a daemon uses this data directory."""
    from scherzer.daemon.jobs import JobStore

    p = Path(path)
    moved = _move_aside(p)
    store = JobStore(p)
    rebuilt, unreadable = 0, []
    try:
        jobs = Path(data_dir) / "jobs"
        for file in sorted([*jobs.glob("*.hspy"), *jobs.glob("*.h5")]):
            job = _job_from_file(file)
            if job is None:
                unreadable.append(str(file))
                continue
            if store.restore_job(**job):
                rebuilt += 1
    finally:
        store.close()
    log.warning("job database rebuilt", path=str(p), moved_to=[str(m) for m in moved],
                jobs=rebuilt, unreadable=len(unreadable))  # fmt: skip
    return DbRecovery(p, moved, rebuilt, unreadable)
