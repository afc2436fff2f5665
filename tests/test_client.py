"""The Python client: timeouts, bounded retries, reconnect across a daemon restart, wait() with
events and with its polling fallback."""

from __future__ import annotations

import time

import pytest

from scherzer.clients.client import (
    Client,
    DaemonTimeout,
    LocalDaemon,
    events_endpoint_for,
    free_tcp_port,
)

#: Hang guard per test (s): daemon processes and CLI subprocesses start several times slower on
#: a busy machine; a passing test never comes near it.
pytestmark = pytest.mark.timeout(300)
PATTERN = {"kind": "pattern", "camera_shape": [16, 16], "speedup": 100.0}


def test_events_endpoint_default_is_port_plus_one():
    assert events_endpoint_for("tcp://127.0.0.1:5577") == "tcp://127.0.0.1:5578"
    with pytest.raises(ValueError, match="explicitly"):
        events_endpoint_for("ipc:///tmp/x")


def test_no_daemon_times_out_after_bounded_retries(monkeypatch):
    c = Client(f"tcp://127.0.0.1:{free_tcp_port()}", timeout_s=0.2, retries=2)
    waits: list[float] = []  # one reply wait per request sent
    real_await = c._await

    def counted(sock, rid, timeout_s):
        waits.append(timeout_s)
        return real_await(sock, rid, timeout_s)

    monkeypatch.setattr(c, "_await", counted)
    t0 = time.monotonic()
    with pytest.raises(DaemonTimeout, match="3 attempt"):
        c.status()
    # a reply wait cannot end before its timeout: three of them take at least 3 x 0.2 s
    assert time.monotonic() - t0 >= 0.6
    assert waits == [0.2, 0.2, 0.2]  # bounded: the first try and two retries, then it gives up
    waits.clear()
    with pytest.raises(DaemonTimeout, match="1 attempt"):  # not idempotent: never re-sent
        c.submit({"kind": "camera_image"})
    assert waits == [0.2]
    c.close()


def test_client_reconnects_when_the_daemon_restarts(tmp_path):
    config = {"devices": dict(PATTERN)}
    with LocalDaemon(config, tmp_path) as d:
        c = d.client(timeout_s=1.0, retries=3)
        first = c.status().instance
    # same endpoints, new process
    with LocalDaemon(config, tmp_path):
        second = c.status().instance
    c.close()
    assert first != second


def test_wait_uses_events_and_falls_back_to_polling(tmp_path):
    with LocalDaemon({"devices": dict(PATTERN)}, tmp_path) as d:
        with d.client() as c:
            # five frames of 0.6 s (speed-up 100), so progress events go on well after wait()
            # subscribed (a subscription takes effect a moment after it is made)
            job = c.submit({"kind": "camera_image", "exposure_s": 60.0, "repeat": 5})
            seen = []
            done = c.wait(job.job_id, timeout_s=20, on_event=lambda e: seen.append(e.topic))
            assert done.state == "done" and "progress" in seen
        # events endpoint dead: only job_get polling can finish the wait
        dead = f"tcp://127.0.0.1:{free_tcp_port()}"
        with Client(d.endpoint, events_endpoint=dead) as blind:
            job = blind.submit({"kind": "camera_image", "exposure_s": 1.0, "repeat": 5})
            assert blind.wait(job.job_id, timeout_s=20, poll_s=0.1).state == "done"
            slow = blind.submit({"kind": "camera_image", "exposure_s": 60.0, "repeat": 50})
            with pytest.raises(DaemonTimeout, match="still"):
                blind.wait(slow.job_id, timeout_s=0.3, poll_s=0.1)
            blind.cancel(slow.job_id)


def test_local_daemon_restarts_on_new_ports_when_a_chosen_port_was_taken(tmp_path, monkeypatch):
    """Another process may bind a port between its choice and the daemon's bind (xdist workers,
    outgoing connections): the daemon must come up on fresh ports, not fail the test run."""
    import socket

    import scherzer.clients.client as client_module

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    real = client_module.free_tcp_port
    handed = iter([busy, real()])  # the first start gets the busy port for its request socket
    monkeypatch.setattr(client_module, "free_tcp_port", lambda: next(handed, None) or real())
    try:
        with LocalDaemon({"devices": dict(PATTERN)}, tmp_path) as d:
            assert d.endpoint != f"tcp://127.0.0.1:{busy}"
            assert "Address already in use" in d.stderr_path.read_text()
            with d.client() as c:
                assert c.status().state == "idle"
    finally:
        taken.close()


def test_free_tcp_port_avoids_the_ephemeral_range():
    from scherzer.clients.client import _ephemeral_range

    lo, hi = _ephemeral_range()
    ports = {free_tcp_port() for _ in range(20)}
    assert all(not lo <= p <= hi for p in ports), (lo, hi, sorted(ports))
