"""Unit tests of the daemon's reliability pieces (issue #13): what counts as a full disk, the
queue's disk hold, logging that never raises, and the executor's injectable clock."""

from __future__ import annotations

import errno
import io
import sqlite3
from pathlib import Path

import pytest
import structlog
from helpers import wait_for

from scherzer.config import Settings
from scherzer.daemon.diskspace import (
    RESUME_HEADROOM_BYTES,
    DiskFull,
    DiskGate,
    ensure_room,
    is_disk_full,
)
from scherzer.daemon.executor import Executor, FrameCache, _too_early, open_instruments
from scherzer.daemon.jobs import JobStore
from scherzer.daemon.logging import _Sinks
from scherzer.daemon.protocol import JobInfo

pytestmark = pytest.mark.timeout(60)


def test_disk_full_is_recognised_through_wrappers():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert is_disk_full(OSError("Can't write data (file write failed: errno = 28)"))
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as inner:
            raise RuntimeError("writer failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(OSError(errno.EACCES, "denied"))
    assert not is_disk_full(ValueError("No space left"))  # not an I/O error
    with pytest.raises(DiskFull, match="bytes free"):
        ensure_room(Path("/"), 1 << 62)


def test_disk_gate_holds_and_lifts_with_hysteresis():
    free = [10_000]
    gate = DiskGate(Path("."), reserve_bytes=5_000, free=lambda _: free[0])
    assert gate.blocked() == (False, False)
    free[0] = 4_000
    blocked, changed = gate.blocked()
    assert blocked and changed and "reserve" in gate.reason
    free[0] = 5_000 + RESUME_HEADROOM_BYTES - 1
    assert gate.blocked() == (True, False)  # not yet: space must come back with headroom
    free[0] += 1
    assert gate.blocked() == (False, True) and gate.reason is None
    gate.close("a job found the disk full")
    assert gate.blocked() == (False, True)  # plenty free: lifts by itself
    free[0] = 0
    gate.close("full")
    gate.open()  # queue_resume
    assert gate.reason is None


class _FullFile(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_logging_falls_back_to_stderr_and_never_raises(capsys):
    sinks = _Sinks(_FullFile(), None, pretty=False, min_level=10, forward=None)
    for _ in range(2):
        with pytest.raises(structlog.DropEvent):  # structlog's normal end, nothing else
            sinks(None, "error", {"event": "job failed", "level": "error", "job": 3})
    err = capsys.readouterr().err
    assert err.count("cannot write the log file") == 1 and err.count('"job failed"') == 2
    sinks = _Sinks(None, _FullFile(), pretty=False, min_level=10, forward=None)
    with pytest.raises(structlog.DropEvent):
        sinks(None, "info", {"event": "x", "level": "info", "bad": object()})


def _job(not_before_s: float | None) -> JobInfo:
    plan = {"kind": "camera_image", "not_before_s": not_before_s}
    return JobInfo(job_id=1, kind="camera_image", state="queued", plan=plan, submitter="t",
                   created_s=0.0)  # fmt: skip


def test_not_before_uses_the_given_clock():
    assert _too_early(_job(1000.0), now_s=999.0)
    assert not _too_early(_job(1000.0), now_s=1000.0)
    assert not _too_early(_job(None), now_s=0.0)


def test_the_executor_starts_a_delayed_job_when_its_clock_says_so(tmp_path):
    devices = {"kind": "pattern", "camera_shape": [8, 8], "speedup": 1000.0}
    settings = Settings(data_dir=tmp_path, devices=devices)
    store = JobStore(tmp_path / "jobs.sqlite")
    now = [1000.0]
    ex = Executor(store, open_instruments(settings), settings, lambda t, d: None, FrameCache(),
                  clock=lambda: now[0])  # fmt: skip
    plan = {"kind": "camera_image", "exposure_s": 0.01, "processing": [], "not_before_s": 2000.0}
    job = store.submit(plan, kind="camera_image", submitter="t", frames_total=1)
    assert _too_early(store.get(job.job_id), ex.clock())
    ex.start()
    try:
        now[0] = 2000.0  # the clock, not the wall, decides
        ex.wake()
        assert wait_for(lambda: store.get(job.job_id).state == "done", timeout_s=20)
    finally:
        ex.stop()
        ex.join(10.0)
        store.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # on purpose
def test_the_watchdog_fails_the_job_of_a_dead_executor(tmp_path, monkeypatch):
    from scherzer.daemon.server import Daemon

    # ports chosen by the kernel at bind time (nobody connects here): no port to lose to a race
    server = {"endpoint": "tcp://127.0.0.1:*", "events_endpoint": "tcp://127.0.0.1:*"}
    settings = Settings(data_dir=tmp_path, server=server, logging={"console": "off"},
                        devices={"kind": "pattern", "camera_shape": [8, 8]})  # fmt: skip
    logging_before = structlog.get_config()  # the daemon configures logging process-wide
    daemon = Daemon(settings)
    daemon._open()
    try:
        job = daemon.store.submit({"kind": "camera_image"}, kind="camera_image", submitter="t",
                                  frames_total=1)  # fmt: skip
        daemon.store.start(job.job_id, str(tmp_path / "x.h5"))  # as if the thread had it

        def die() -> None:
            raise SystemExit("simulated death of the executor thread")

        monkeypatch.setattr(daemon.executor, "_run_once", die)
        daemon.executor.wake()
        assert wait_for(lambda: not daemon.executor.alive, timeout_s=10)
        daemon._watchdog()
        assert daemon._state() == "error" and "executor" in daemon.problems[0]
        failed = daemon.store.get(job.job_id)
        assert failed.state == "failed" and "executor thread died" in failed.error.message
    finally:
        daemon.stopping = True
        daemon._close()
        structlog.configure(**logging_before)


def test_the_refusal_names_the_endpoint_that_is_not_loopback():
    from scherzer.config import ConfigError

    settings = Settings(server={"events_endpoint": "tcp://0.0.0.0:5578"})
    with pytest.raises(ConfigError, match=r"endpoint tcp://0\.0\.0\.0:5578 is not loopback"):
        settings.check_security()
    with pytest.raises(ConfigError, match=r"security\.curve is on"):
        Settings(security={"curve": True}).check_security()


def test_a_report_or_device_call_that_finds_the_disk_full_answers_disk_full():
    from scherzer.daemon.calls import error_fields

    code, message, _ = error_fields(OSError(errno.ENOSPC, "No space left on device"))
    assert code == "disk_full" and "full" in message
    assert error_fields(RuntimeError("bug"))[0] == "internal"
