"""Unattended runs: `scherzer submit runs.toml` on a real daemon — 21 short plans with one
injected device fault, repeats, a not-before time, per-item error policies, the queue-level
preflight, and the summary report listing every job. Pattern devices (exact, fast)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scherzer.clients.client import LocalDaemon
from scherzer.daemon.runs import RunsError, expand_runs, load_runs
from scherzer.io import read_stacks

pytestmark = pytest.mark.timeout(300)  # a hang guard, not a speed check
PATTERN = {"kind": "pattern", "camera_shape": [32, 32], "speedup": 100.0}

RUNS = """
title = "night test"
[defaults]
sample = "pattern"

[[runs]]
repeat = 8
[runs.plan]
kind = "focal_series"
name = "focal"
n_images = 4
exposure_s = 0.2
processing = []

[[runs]]
repeat = 6
on_error = "skip"
plan = {{ kind = "camera_image", name = "shot", exposure_s = 0.1, repeat = 2 }}

[[runs]]
repeat = 4
[runs.plan]
kind = "time_series"
name = "scan-ts"
source = "scan"
n_frames = 3
interval_s = 0.5
size_px = [16, 16]
signals = ["HAADF", "BF"]

[[runs]]
repeat = 2
plan = {{ kind = "rotated_scan", name = "rot", n_frames = 4, size_px = [16, 16], processing = [] }}

[[runs]]
not_before = {not_before}
plan = {{ kind = "camera_image", name = "late", exposure_s = 0.1 }}
"""


def cli(daemon: LocalDaemon, *args: str, timeout: float = 90) -> tuple[int, dict, str]:
    cmd = [sys.executable, "-m", "scherzer.cli", *args, "--endpoint", daemon.endpoint,
           "--events", daemon.events_endpoint, "--json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout + out.stderr
    return out.returncode, json.loads(lines[0]), out.stderr


def test_runs_file_expands_repeats_defaults_and_policies(tmp_path):
    path = tmp_path / "runs.toml"
    path.write_text(RUNS.format(not_before=1e9), encoding="utf-8")
    plans = expand_runs(load_runs(path))
    assert len(plans) == 21
    assert all(p["sample"] == "pattern" for p in plans)
    assert [p["on_error"] for p in plans if p["name"] == "shot"] == [
        {"retries": 0, "then": "skip"}
    ] * 6
    assert plans[-1]["not_before_s"] == 1e9 and "not_before_s" not in plans[0]
    path.write_text("[[runs]]\nrepeat = 0\nplan = {}\n", encoding="utf-8")
    with pytest.raises(RunsError, match="repeat"):
        load_runs(path)


def test_a_batch_of_21_plans_runs_unattended_through_a_device_fault(tmp_path):
    not_before = time.time() + 2.0
    runs = tmp_path / "runs.toml"
    runs.write_text(RUNS.format(not_before=not_before), encoding="utf-8")
    devices = {**PATTERN, "fault": "timeout:23"}  # one acquisition in the middle times out
    with LocalDaemon({"devices": devices}, tmp_path / "d") as d:
        code, dry, _ = cli(d, "submit", str(runs), "--dry-run")
        assert code == 0 and dry["preflight"]["plans"] == 21 and dry["preflight"]["ok"]
        assert dry["preflight"]["frames"] == 8 * 4 + 6 * 2 + 4 * 3 + 2 * 4 + 1
        code, out, _ = cli(d, "submit", str(runs))
        with d.client() as c:
            history = c.history(limit=100)
    assert code == 0, out
    jobs = out["jobs"]
    assert len(jobs) == 21 and all(j["state"] == "done" for j in jobs), [
        (j["name"], j["state"], j["error"]) for j in jobs
    ]
    assert len(history) == 21
    # no frame lost: every planned frame of every signal is on disk
    for job in jobs:
        stacks = read_stacks(job["output_file"])
        assert job["frames_done"] == job["frames_total"]
        assert all(s.n_frames == job["frames_total"] for s in stacks.values()), job["name"]
    # the fault happened and was retried (default policy: retry once, then abort)
    log = (tmp_path / "d/data/logs/daemon.jsonl").read_text().splitlines()
    failed = [json.loads(x) for x in log if '"frame failed"' in x]
    assert len(failed) == 1 and failed[0]["code"] == "device_timeout"
    # not-before held the last job back
    late = next(j for j in jobs if j["name"] == "late")
    assert late["started_s"] >= not_before
    # the summary report lists every job with its outcome
    report = Path(out["report"])
    assert report.is_file() and report.parent == tmp_path / "d/data/reports"
    text = report.read_text()
    for job in jobs:
        assert f"| {job['job_id']} | {job['name']} |" in text
    assert text.count("| **done** |") == 21
    assert "21 jobs: 21 done" in text and "frames written 65 of 65 planned" in text
    assert [s["state"] for s in out["summary"]] == ["done"] * 21


def test_preflight_refuses_the_whole_batch_with_the_reason(tmp_path):
    runs = tmp_path / "runs.toml"
    runs.write_text(
        "[[runs]]\nrepeat = 2\nplan = { kind = 'focal_series', n_images = 3, processing = [] }\n"
        "[[runs]]\nplan = { kind = 'focal_series', name = 'far', start_nm = 9000.0 }\n",
        encoding="utf-8",
    )
    with LocalDaemon({"devices": dict(PATTERN)}, tmp_path / "d") as d:
        code, out, _ = cli(d, "submit", str(runs))
        assert code == 1 and out["jobs"] == []
        problems = out["preflight"]["problems"]
        assert len(problems) == 1 and "plan 3 (focal_series far)" in problems[0]
        assert "outside the limits" in problems[0]
        with d.client() as c:
            assert c.history() == []  # nothing was submitted


def test_plan_commands_submit_and_wait(tmp_path):
    with LocalDaemon({"devices": dict(PATTERN)}, tmp_path / "d") as d:
        code, out, _ = cli(d, "focal-series", "--n-images", "3", "--start-nm", "-20",
                           "--step-nm", "5", "--processing", "[]", "--name", "cli",
                           "--on-error", "skip", "--no-restore-optics", "--wait")  # fmt: skip
        assert code == 0 and out["job"]["state"] == "done", out
        plan = out["job"]["plan"]
        assert plan["defocus_list_nm"] is None and plan["on_error"]["then"] == "skip"
        assert plan["restore_optics"] is False and out["job"]["frames_done"] == 3
        assert Path(out["job"]["output_file"]).name == "cli_001.hspy"
        code, out, _ = cli(d, "rotated-scan", "--n-frames", "2", "--size-px", "8,8",
                           "--signals", "HAADF,ABF", "--processing", "[]", "--wait")  # fmt: skip
        assert code == 0 and set(read_stacks(out["job"]["output_file"])) == {"HAADF", "ABF"}
        code, out, _ = cli(d, "time-series", "--n-frames", "2", "--interval-s", "1",
                           "--exposure-s", "0.5", "--wait")  # fmt: skip
        assert code == 0 and out["job"]["frames_done"] == 2
        code, out, _ = cli(d, "focal-series", "--start-nm", "-9000", "--validate-only")
        assert code == 1 and not out["valid"] and "outside the limits" in out["problems"][0]
