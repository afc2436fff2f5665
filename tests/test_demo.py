"""`scherzer demo` at small sizes: runs through the embedded daemon, prints one JSON object with
--json, writes files and a report, and never leaves its daemon behind (normal exit, SIGTERM)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from scherzer.io import read_stack, read_stacks

pytestmark = pytest.mark.timeout(150)
SMALL = ["--size", "64", "--images", "5", "--frames", "4"]


def port_is_free(endpoint: str) -> bool:
    port = int(endpoint.rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_demo_runs_small_and_cleans_up(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "scherzer.cli", "demo", "--out", str(out), *SMALL, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=140)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr  # progress goes to stderr with --json
    summary = json.loads(lines[0])
    assert "focal series" in proc.stderr and "report:" in proc.stderr
    focal, scan = summary["focal_series"], summary["rotated_scan"]
    assert focal["state"] == "done", focal
    stack = read_stack(focal["file"])
    assert stack.n_frames == 5
    assert stack.column("defocus_nominal_nm").tolist() == [-100.0, -90.0, -80.0, -70.0, -60.0]
    assert len(focal["fitted_relative_nm"]) == 5 and "defocus_rms_error_nm" in focal
    scans = read_stacks(scan["file"])
    assert {"HAADF", "ABF"} <= set(scans) and scans["HAADF"].n_frames == 4
    assert scans["HAADF"].column("scan_rotation_deg").tolist() == [10.0, 100.0, 10.0, 100.0]
    report = Path(summary["report"])
    text = report.read_text()
    assert "| **done** |" in text and "Demo: fitted against the simulator's truth" in text
    assert any(report.with_suffix("").glob("*.png"))
    assert port_is_free(summary["endpoint"])  # the embedded daemon is gone
    assert proc.returncode == 0 and summary["ok"] and scan["state"] == "done"
    assert "rms_error_px" in scan


def test_demo_stops_its_daemon_on_sigterm(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "scherzer.cli", "demo", "--out", str(out), *SMALL,
           "--speedup", "0.5"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list((out / "data" / "jobs").glob("*.hspy")) and time.monotonic() < deadline:
            time.sleep(0.1)  # the daemon is up and acquiring
        config = tomllib.loads((out / "scherzer.toml").read_text())
        endpoint = config["server"]["endpoint"]
        assert not port_is_free(endpoint)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode != 0
    deadline = time.monotonic() + 10
    while not port_is_free(endpoint) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert port_is_free(endpoint)
