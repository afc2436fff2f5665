"""Job queue and history in SQLite (WAL): states, queue order, crash recovery, change counters.

One table holds every job ever submitted. A job is in the queue while ``state = 'queued'``; its
order is ``queue_pos`` (small = earlier). States::

    queued → running ⇄ paused → acquired → processing → done
                    ↘ failed | cancelled | interrupted  (interrupted: the daemon died/stopped)

Thread-safe: one connection guarded by a lock (the request loop and the executor share it).
Times are Unix seconds. The change counters (``jobs``, ``queue``) count modifications since this
store was opened; together with the daemon's instance id they tell a client what to reload.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from scherzer.daemon.protocol import (
    FINAL_STATES,
    ErrorBody,
    ErrorCode,
    JobInfo,
    ProtocolError,
)

__all__ = ["JobStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind          TEXT NOT NULL,
    name          TEXT NOT NULL DEFAULT '',
    plan          TEXT NOT NULL,
    state         TEXT NOT NULL,
    submitter     TEXT NOT NULL,
    created_s     REAL NOT NULL,
    started_s     REAL,
    finished_s    REAL,
    frames_done   INTEGER NOT NULL DEFAULT 0,
    frames_total  INTEGER NOT NULL DEFAULT 0,
    queue_pos     INTEGER,
    output_file   TEXT,
    error         TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(state, queue_pos);
CREATE TABLE IF NOT EXISTS flags (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
#: WAL pages between automatic checkpoints (4 KiB each: ~1 MiB of WAL at most, against
#: SQLite's 1000-page default; fewer pages = smaller WAL, more frequent checkpoints).
WAL_CHECKPOINT_PAGES = 256
_COLUMNS = (
    "job_id, kind, name, plan, state, submitter, created_s, started_s, finished_s, frames_done, "
    "frames_total, queue_pos, output_file, error, cancel_requested"
)


class JobStore:
    """Persistent jobs; every method is one transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable against process crashes in WAL
        self._db.execute("PRAGMA busy_timeout=5000")
        # checkpoint every WAL_CHECKPOINT_PAGES pages so the WAL (reused, not regrown) stays
        # well inside the executor's write headroom on a nearly full disk
        self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self.jobs_counter = 0
        self.queue_counter = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- internals -------------------------------------------------------------------------
    def _tx(self, fn: Callable[[sqlite3.Connection], Any], *, queue_changed: bool = False) -> Any:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self.jobs_counter += 1
            if queue_changed:
                self.queue_counter += 1
            return out

    def _row(self, db: sqlite3.Connection, job_id: int) -> tuple:
        row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no job {job_id}")
        return row

    def _info(self, db: sqlite3.Connection, row: tuple) -> JobInfo:
        (jid, kind, name, plan, state, submitter, created, started, finished, done, total, qpos,
         out, err, cancel) = row  # fmt: skip
        position = None
        if state == "queued":
            position = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND queue_pos < ?", (qpos,)
            ).fetchone()[0]
        return JobInfo(
            job_id=jid,
            kind=kind,
            name=name,
            state=state,
            plan=json.loads(plan),
            submitter=submitter,
            created_s=created,
            started_s=started,
            finished_s=finished,
            frames_done=done,
            frames_total=total,
            queue_position=position,
            output_file=out,
            error=ErrorBody(**json.loads(err)) if err else None,
            cancel_requested=bool(cancel),
        )

    def _queued_ids(self, db: sqlite3.Connection) -> list[int]:
        rows = db.execute(
            "SELECT job_id FROM jobs WHERE state = 'queued' ORDER BY queue_pos, job_id"
        )
        return [r[0] for r in rows]

    def _renumber(self, db: sqlite3.Connection, ids: list[int]) -> None:
        db.executemany("UPDATE jobs SET queue_pos = ? WHERE job_id = ?", list(enumerate(ids)))

    # --- queue -----------------------------------------------------------------------------
    def submit(
        self,
        plan: dict[str, Any],
        *,
        kind: str,
        submitter: str,
        frames_total: int,
        name: str = "",
        position: int | None = None,
    ) -> JobInfo:
        """Queue a plan at the end (or at queue index ``position``)."""

        def tx(db: sqlite3.Connection) -> JobInfo:
            top = db.execute("SELECT MAX(queue_pos) FROM jobs WHERE state='queued'").fetchone()[0]
            cur = db.execute(
                "INSERT INTO jobs (kind, name, plan, state, submitter, created_s, frames_total, "
                "queue_pos) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                (kind, name, json.dumps(plan), submitter, time.time(), frames_total,
                 (top + 1) if top is not None else 0),
            )  # fmt: skip
            jid = cur.lastrowid
            if position is not None:
                ids = [i for i in self._queued_ids(db) if i != jid]
                ids.insert(min(position, len(ids)), jid)
                self._renumber(db, ids)
            return self._info(db, self._row(db, jid))

        return self._tx(tx, queue_changed=True)

    def get(self, job_id: int) -> JobInfo:
        with self._lock:
            return self._info(self._db, self._row(self._db, job_id))

    def queue(self) -> list[JobInfo]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = 'queued' ORDER BY queue_pos, job_id"
            ).fetchall()
            return [_with_pos(self._info_fast(r), i) for i, r in enumerate(rows)]

    def _info_fast(self, row: tuple) -> JobInfo:
        """Like :meth:`_info` without the position query (the caller knows the position)."""
        return self._info(self._db, (*row[:11], None, *row[12:]))

    def bump_queue_counter(self) -> None:
        """The queue changed without a row changing (paused/resumed)."""
        with self._lock:
            self.queue_counter += 1

    def get_flag(self, name: str) -> bool:
        """A persistent switch (e.g. ``queue_paused``); False when never set."""
        with self._lock:
            row = self._db.execute("SELECT value FROM flags WHERE name = ?", (name,)).fetchone()
            return bool(row[0]) if row else False

    def set_flag(self, name: str, value: bool) -> None:
        self._tx(
            lambda db: db.execute(
                "INSERT INTO flags (name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (name, int(bool(value))),
            ),
            queue_changed=True,
        )

    def queued_ids(self) -> list[int]:
        """Ids of the queued jobs in run order (cheap: no plans are read)."""
        with self._lock:
            return self._queued_ids(self._db)

    def queued_count(self) -> int:
        with self._lock:
            q = "SELECT COUNT(*) FROM jobs WHERE state = 'queued'"
            return self._db.execute(q).fetchone()[0]

    def next_queued(self) -> JobInfo | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = 'queued' "
                "ORDER BY queue_pos, job_id LIMIT 1"
            ).fetchone()
            return None if row is None else _with_pos(self._info_fast(row), 0)

    def move(self, job_id: int, position: int) -> list[JobInfo]:
        def tx(db: sqlite3.Connection) -> None:
            state = self._row(db, job_id)[4]
            if state != "queued":
                raise ProtocolError(
                    ErrorCode.CONFLICT, f"job {job_id} is {state}; only queued jobs can be moved"
                )
            ids = [i for i in self._queued_ids(db) if i != job_id]
            ids.insert(min(position, len(ids)), job_id)
            self._renumber(db, ids)

        self._tx(tx, queue_changed=True)
        return self.queue()

    def history(
        self, limit: int = 50, before_id: int | None = None, states: Iterable[str] | None = None
    ) -> list[JobInfo]:
        sql = f"SELECT {_COLUMNS} FROM jobs WHERE 1=1"
        args: list[Any] = []
        if before_id is not None:
            sql += " AND job_id < ?"
            args.append(before_id)
        if states:
            states = list(states)
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += states
        sql += " ORDER BY job_id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            return [self._info(self._db, r) for r in self._db.execute(sql, args).fetchall()]

    # --- state changes ---------------------------------------------------------------------
    def cancel(self, job_id: int) -> JobInfo:
        """Queued → cancelled now; active → cancel flag (the executor stops at a boundary)."""

        def tx(db: sqlite3.Connection) -> JobInfo:
            state = self._row(db, job_id)[4]
            if state in FINAL_STATES:
                raise ProtocolError(ErrorCode.CONFLICT, f"job {job_id} is already {state}")
            if state == "queued":
                db.execute(
                    "UPDATE jobs SET state='cancelled', finished_s=?, queue_pos=NULL "
                    "WHERE job_id=?",
                    (time.time(), job_id),
                )
            else:
                db.execute("UPDATE jobs SET cancel_requested=1 WHERE job_id=?", (job_id,))
            return self._info(db, self._row(db, job_id))

        return self._tx(tx, queue_changed=True)

    def start(self, job_id: int, output_file: str) -> JobInfo:
        def tx(db: sqlite3.Connection) -> JobInfo:
            state = self._row(db, job_id)[4]
            if state != "queued":
                raise ProtocolError(ErrorCode.CONFLICT, f"job {job_id} is {state}, not queued")
            db.execute(
                "UPDATE jobs SET state='running', started_s=?, output_file=?, queue_pos=NULL "
                "WHERE job_id=?",
                (time.time(), output_file, job_id),
            )
            return self._info(db, self._row(db, job_id))

        return self._tx(tx, queue_changed=True)

    def set_state(self, job_id: int, state: str, *, error: ErrorBody | None = None) -> JobInfo:
        """Move an active job to ``state`` (final states stamp ``finished_s``)."""

        def tx(db: sqlite3.Connection) -> JobInfo:
            finished = time.time() if state in FINAL_STATES else None
            err = error.model_dump_json() if error else None
            db.execute(
                "UPDATE jobs SET state=?, finished_s=COALESCE(?, finished_s), "
                "error=COALESCE(?, error) WHERE job_id=?",
                (state, finished, err, job_id),
            )
            return self._info(db, self._row(db, job_id))

        return self._tx(tx)

    def set_output_file(self, job_id: int, output_file: str | None) -> None:
        """Name the job's file (None: the job wrote none)."""
        self._tx(lambda db: db.execute(
            "UPDATE jobs SET output_file=? WHERE job_id=?", (output_file, job_id)
        ))  # fmt: skip

    def set_progress(self, job_id: int, frames_done: int) -> None:
        self._tx(lambda db: db.execute(
            "UPDATE jobs SET frames_done=? WHERE job_id=?", (frames_done, job_id)
        ))  # fmt: skip

    def cancel_requested(self, job_id: int) -> bool:
        with self._lock:
            q = "SELECT cancel_requested FROM jobs WHERE job_id=?"
            return bool(self._db.execute(q, (job_id,)).fetchone()[0])

    def recover(self, count_frames: Callable[[str | None], int]) -> list[JobInfo]:
        """After a crash: a job that was acquiring (``running``/``paused``) becomes
        ``interrupted`` with the frames on disk; one whose frames were complete (``acquired``/
        ``processing``) goes back to ``acquired`` so its processing runs again
        (:meth:`awaiting_processing`). Returns the interrupted jobs."""

        def tx(db: sqlite3.Connection) -> list[int]:
            rows = db.execute(
                "SELECT job_id, output_file FROM jobs WHERE state IN ('running', 'paused')"
            ).fetchall()
            err = ErrorBody(
                code=ErrorCode.INTERNAL,
                message="the daemon stopped while this job was active; frames on disk are kept",
            ).model_dump_json()
            for jid, out in rows:
                exists = bool(out) and Path(out).exists()
                db.execute(
                    "UPDATE jobs SET state='interrupted', finished_s=?, frames_done=?, error=?, "
                    "output_file=? WHERE job_id=?",
                    (time.time(), count_frames(out), err, out if exists else None, jid),
                )
                if not exists and out:
                    _remove_empty_folder(Path(out).with_suffix(""))
            db.execute("UPDATE jobs SET state='acquired' WHERE state='processing'")
            return [r[0] for r in rows]

        ids = self._tx(tx, queue_changed=True)
        return [self.get(i) for i in ids]

    def restore_job(
        self,
        *,
        job_id: int,
        kind: str,
        name: str,
        plan: dict[str, Any],
        submitter: str,
        frames_done: int,
        frames_total: int,
        output_file: str,
        created_s: float,
    ) -> bool:
        """Put back a job known from its file (database recovery): ``done`` when its frames
        are complete, else ``interrupted``. False if the id is already taken."""
        complete = frames_total > 0 and frames_done >= frames_total
        err = None if complete else ErrorBody(
            code=ErrorCode.INTERNAL,
            message="job history rebuilt from its file after database recovery; "
            "frames on disk are kept",
        ).model_dump_json()  # fmt: skip

        def tx(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, kind, name, plan, state, submitter, "
                "created_s, finished_s, frames_done, frames_total, output_file, error) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, kind, name, json.dumps(plan), "done" if complete else "interrupted",
                 submitter, created_s, created_s, frames_done, frames_total, output_file, err),
            )  # fmt: skip
            return cur.rowcount == 1

        return self._tx(tx)

    def awaiting_processing(self) -> list[JobInfo]:
        """Jobs whose frames are complete and whose processing has not finished."""
        return self.history(limit=1000, states=["acquired"])[::-1]


def _remove_empty_folder(folder: Path) -> None:
    """The folder reserved beside a job file that was never written (kept if not empty)."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _with_pos(info: JobInfo, position: int) -> JobInfo:
    return info.model_copy(update={"queue_position": position})
