"""Faults: kill -9 mid-job, an injected camera timeout, and the serial lens port vanishing mid-job
(against the lens-controller emulator on a real pseudo-terminal)."""

from __future__ import annotations

import time

import pytest
from helpers import wait_for

from scherzer.clients.client import DaemonError, LocalDaemon
from scherzer.io import read_stack

#: Hang guard per test (s): daemon processes and CLI subprocesses start several times slower on
#: a busy machine; a passing test never comes near it.
pytestmark = pytest.mark.timeout(300)
PATTERN = {"kind": "pattern", "camera_shape": [32, 32], "speedup": 100.0}


def test_kill_9_mid_job_leaves_an_interrupted_job_and_a_readable_file(tmp_path):
    config = {"devices": dict(PATTERN), "server": {}}
    d = LocalDaemon(config, tmp_path).start()
    try:
        with d.client() as c:
            first = c.submit({"kind": "camera_image", "exposure_s": 3.0, "repeat": 500})
            queued = [
                c.submit({"kind": "camera_image", "exposure_s": 0.1, "name": n}) for n in "ab"
            ]
            wait_for(lambda: c.job(first.job_id).frames_done >= 3)
        d.kill()  # SIGKILL: no clean-up at all
    finally:
        d.kill()
    config["server"].pop("endpoint"), config["server"].pop("events_endpoint")
    with LocalDaemon(config, tmp_path) as again, again.client() as c:
        job = c.job(first.job_id)
        assert job.state == "interrupted" and job.error is not None
        stack = read_stack(job.output_file)
        assert stack.n_frames == job.frames_done >= 3
        assert [r.index for r in stack.records] == list(range(stack.n_frames))
        # the queue kept its order and runs on
        finished = [c.wait(j.job_id, timeout_s=20) for j in queued]
        assert [j.state for j in finished] == ["done", "done"]
        assert finished[0].started_s <= finished[1].started_s


def test_camera_timeout_fails_the_job_cleanly_and_the_daemon_lives(tmp_path):
    devices = {**PATTERN, "fault": "timeout:2"}  # the third acquisition times out
    config = {"devices": devices, "server": {"heartbeat_s": 0.2}}
    with LocalDaemon(config, tmp_path) as d, d.client() as c, c.events(EVENTS) as ev:
        # a heartbeat shows the subscription has reached the daemon (no log event is missed)
        assert ev.next(EVENT_GUARD_S) is not None
        plan = {"kind": "camera_image", "exposure_s": 0.5, "repeat": 5, "on_error": "abort"}
        job = c.wait(c.submit(plan).job_id, 20)  # no retry: the one-shot fault fails the job
        assert job.state == "failed" and job.error.code == "device_timeout"
        log = next_log(ev)  # warnings and errors are published as log events
        assert log is not None and log.data["level"] == "error" and log.data["job"] == job.job_id
        assert "injected" in job.error.message and job.frames_done == 2
        assert read_stack(job.output_file).n_frames == 2  # frames already written stay
        assert c.status().state == "idle"
        retry = c.wait(c.submit({"kind": "camera_image", "exposure_s": 0.5}).job_id, 20)
        assert retry.state == "done"


EVENTS = ["log", "heartbeat"]
#: Hang guard (s) for an event that will come.
EVENT_GUARD_S = 20.0


def next_log(stream):
    """The next log event (heartbeats skipped), or None within the hang guard."""
    deadline = time.monotonic() + EVENT_GUARD_S
    while (left := deadline - time.monotonic()) > 0:
        event = stream.next(left)
        if event is not None and event.topic == "log":
            return event
    return None


@pytest.fixture
def emulator():
    from scherzer.simulators.lens_controller import LensControllerEmulator

    emu = LensControllerEmulator(seed=0)
    emu.start()
    yield emu
    emu.stop()


def test_serial_lens_port_closed_mid_job_fails_the_job_then_reconnects(tmp_path, emulator):
    # a reply timeout generous for a busy machine: a vanished port fails at once regardless
    devices = {**PATTERN, "lens": "serial", "serial_port": emulator.port, "serial_timeout_s": 2.0,
               "serial_retries": 1}  # fmt: skip
    with LocalDaemon({"devices": devices}, tmp_path) as d, d.client(timeout_s=10) as c:
        assert c.lens_set(defocus_nm=-25.0).defocus_nm == pytest.approx(-25.0, abs=2.0)
        job = c.submit({"kind": "camera_image", "exposure_s": 5.0, "repeat": 400,
                        "defocus_nm": -40.0})  # fmt: skip
        wait_for(lambda: c.job(job.job_id).frames_done >= 2)
        emulator.disconnect()
        failed = c.wait(job.job_id, timeout_s=30)
        assert failed.state == "failed"
        assert failed.error.code in ("device_disconnected", "device_timeout", "device_error")
        stack = read_stack(failed.output_file)
        assert stack.n_frames == failed.frames_done >= 2
        assert abs(stack.column("defocus_readback_nm")[0] - -40.0) < 2.0
        assert c.status().state == "idle"  # the daemon lives
        with pytest.raises(DaemonError) as e:
            c.lens_get()
        assert e.value.code.startswith("device_")
        emulator.reconnect()
        state = wait_for(lambda: _try_lens(c), timeout_s=15)
        assert state.defocus_nm == pytest.approx(-40.0, abs=2.0)


def _try_lens(c):
    try:
        return c.lens_get()
    except DaemonError:
        return None
