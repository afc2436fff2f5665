"""Files a request names (issue #13): only by name, only inside ``calibrations_dir``.

Unit tests of :mod:`scherzer.daemon.calibrations` (names, ``..``, symlink escapes, FIFOs, size
cap, no file content in messages) and a real daemon refusing hostile ``mtf``/``nps`` values at
submit, with a marker string from a file outside never appearing in any reply or event.
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest
import zmq

from scherzer.clients.client import LocalDaemon
from scherzer.daemon.calibrations import (
    CalibrationError,
    calibration_loader,
    check_calibration_name,
    resolve_calibration,
)

pytestmark = pytest.mark.timeout(120)
MARKER = "SCHERZER-MARKER-7f3a9c"  # must never leave the daemon


@pytest.fixture
def dirs(tmp_path):
    cal = tmp_path / "calibrations"
    cal.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text(f"{MARKER}\n1\n2\n")
    np.savetxt(cal / "mtf.csv", np.linspace(1.0, 0.2, 50))
    (cal / "bad.csv").write_text(f"{MARKER} is not a number\n")
    (cal / "link.csv").symlink_to(outside / "secret.csv")
    os.mkfifo(cal / "pipe.csv")
    return cal, outside


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "../outside/secret.csv", "a/b.csv", ".hidden", "..", "", "x" * 200]
)
def test_names_that_are_paths_are_refused_without_touching_a_file(name):
    with pytest.raises(CalibrationError):
        check_calibration_name(name)


def test_resolution_stays_inside_the_directory(dirs):
    cal, _ = dirs
    assert resolve_calibration("mtf.csv", cal) == (cal / "mtf.csv").resolve()
    for name, why in [("link.csv", "outside"), ("pipe.csv", "regular"), ("nope.csv", "not found")]:
        with pytest.raises(CalibrationError, match=why):
            resolve_calibration(name, cal)
    with pytest.raises(CalibrationError, match="limit"):
        resolve_calibration("mtf.csv", cal, max_bytes=10)
    with pytest.raises(CalibrationError, match="no calibrations_dir"):
        resolve_calibration("mtf.csv", None)


def test_loader_reads_curves_and_never_quotes_content(dirs):
    cal, _ = dirs
    load = calibration_loader(cal)
    assert load("mtf.csv").shape == (50,)
    with pytest.raises(CalibrationError) as err:
        load("bad.csv")
    assert MARKER not in str(err.value) and "bad.csv" in str(err.value)


def _raw(sock, method: str, params: dict) -> bytes:
    rid = uuid.uuid4().hex
    sock.send(json.dumps({"v": 1, "id": rid, "method": method, "params": params}).encode())
    assert sock.poll(20000), "no reply"
    return b"".join(sock.recv_multipart())


def _plan(mtf) -> dict:
    steps = ["focal_register", {"step": "restore", "mtf": mtf}]
    return {"kind": "focal_series", "n_images": 3, "start_nm": -60.0, "step_nm": 4.0,
            "exposure_s": 0.1, "processing": steps}  # fmt: skip


def test_hostile_curve_names_are_refused_at_submit_and_never_echoed(tmp_path, dirs):
    cal, outside = dirs
    config = {
        "devices": {"kind": "pattern", "camera_shape": [16, 16], "speedup": 1000.0},
        "calibrations_dir": str(cal),
    }
    hostile = [str(outside / "secret.csv"), "../outside/secret.csv", "link.csv", "pipe.csv",
               "/proc/self/environ", "/etc/passwd", "bad.csv/..", "nope.csv"]  # fmt: skip
    with LocalDaemon(config, tmp_path / "run") as d:
        ctx = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(d.events_endpoint)
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(d.endpoint)
        try:
            seen = []
            for name in hostile:
                for step in ({"step": "restore", "mtf": name}, {"step": "restore", "nps": name}):
                    plan = _plan(name)
                    plan["processing"][1] = step
                    raw = _raw(sock, "job_submit", {"plan": plan})
                    reply = json.loads(raw)
                    assert not reply["ok"], (name, reply)
                    assert reply["error"]["code"] in ("invalid_params", "forbidden"), reply
                    seen.append(raw)
                    seen.append(_raw(sock, "plan_validate", {"plan": plan}))
            valid = json.loads(_raw(sock, "plan_validate", {"plan": _plan("mtf.csv")}))
            assert not any("calibration" in p for p in valid["result"]["problems"]), valid
            history = _raw(sock, "history_list", {"limit": 100})
            assert json.loads(history)["result"]["jobs"] == []  # nothing was queued
            seen.append(history)
            while sub.poll(200):
                seen.append(b"".join(sub.recv_multipart()))
        finally:
            sock.close()
            sub.close()
        blob = b"".join(seen) + d.stderr_tail().encode()
        assert MARKER.encode() not in blob
        log = (d.dir / "data" / "logs" / "daemon.jsonl").read_bytes()
        assert MARKER.encode() not in log
