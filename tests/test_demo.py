"""`scherzer demo` at small sizes: runs through the embedded daemon, prints one JSON object with
--json, writes files and a report, and never leaves its daemon behind (normal exit, SIGTERM)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import processes_with_argument, wait_for

from scherzer.io import read_stack, read_stacks

#: Hang guard per test (s): daemon processes and CLI subprocesses start several times slower on
#: a busy machine; a passing test never comes near it.
pytestmark = pytest.mark.timeout(600)
SMALL = ["--size", "64", "--images", "5", "--frames", "4"]


def daemons_of(out: Path) -> list[int]:
    """Live daemon processes started with the demo's config file (the embedded daemon).

    Asked of the process table rather than by binding the daemon's port: a port found bound
    may be another test's by now, and binding it could take it from a daemon that chose it.
    """
    return processes_with_argument(str(out / "scherzer.toml"))


def test_demo_runs_small_and_cleans_up(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "scherzer.cli", "demo", "--out", str(out), *SMALL, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)  # hang guard
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
    assert summary["endpoint"].startswith("tcp://127.0.0.1:")
    assert daemons_of(out) == []  # the embedded daemon is gone
    assert proc.returncode == 0 and summary["ok"] and scan["state"] == "done"
    assert "rms_error_px" in scan


def test_demo_stops_its_daemon_on_sigterm(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "scherzer.cli", "demo", "--out", str(out), *SMALL,
           "--speedup", "0.5"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the daemon is up and acquiring
        wait_for(lambda: list((out / "data" / "jobs").glob("*.hspy")), timeout_s=120)
        daemon_pids = daemons_of(out)
        assert len(daemon_pids) == 1, daemon_pids
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode != 0
    wait_for(lambda: daemons_of(out) == [], timeout_s=60)  # the daemon went with it
