"""End to end: a real `scherzer daemon` process on loopback, driven by the client and the CLI.

Devices are the exact test-pattern drivers (no physics) at speed-up 100, so values can be checked
exactly and the file is fast. Every spawned daemon is stopped (SIGTERM, then SIGKILL) in teardown.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import wait_for

from scherzer.clients.client import DaemonError, LocalDaemon
from scherzer.io import read_stack, read_stacks

#: Hang guard per test (s): daemon processes and CLI subprocesses start several times slower on
#: a busy machine; a passing test never comes near it.
pytestmark = pytest.mark.timeout(300)

PATTERN = {"kind": "pattern", "camera_shape": [64, 64], "speedup": 100.0}


def ramp(ny: int, nx: int) -> np.ndarray:
    return np.add.outer(np.arange(ny), np.arange(nx)).astype(np.float32)


@pytest.fixture
def daemon(tmp_path):
    with LocalDaemon({"devices": dict(PATTERN), "server": {"heartbeat_s": 0.2}}, tmp_path) as d:
        yield d


@pytest.fixture
def client(daemon):
    with daemon.client(timeout_s=5.0) as c:
        yield c


def test_camera_job_runs_to_done_and_file_holds_the_frames(client):
    job = client.submit({"kind": "camera_image", "exposure_s": 0.5, "defocus_nm": -42.0,
                         "repeat": 3, "name": "edge"})  # fmt: skip
    assert job.state == "queued" and job.submitter == "local" and job.frames_total == 3
    done = client.wait(job.job_id, timeout_s=20)
    assert done.state == "done" and done.frames_done == 3 and done.error is None
    stack = read_stack(done.output_file)
    assert stack.frames.shape == (3, 64, 64)
    expected = ramp(64, 64)
    # frame k of the pattern stores its simulated start time in pixel (0, 0)
    np.testing.assert_array_equal(
        stack.frames[:, 1:, :], np.broadcast_to(expected[1:], (3, 63, 64))
    )
    np.testing.assert_allclose(np.diff(stack.column("time_s")), 0.5)
    assert stack.column("defocus_nominal_nm").tolist() == [-42.0] * 3
    assert Path(done.output_file).name == "edge_001.hspy"  # <name>_<NNN>.hspy, numbered


def test_scan_job_writes_every_signal(client):
    plan = {"kind": "scan_image", "size_px": [16, 24], "dwell_us": 1.0, "signals": ["HAADF", "BF"]}
    done = client.wait(client.submit(plan).job_id, timeout_s=20)
    assert done.state == "done"
    stacks = read_stacks(done.output_file)
    assert set(stacks) == {"HAADF", "BF"}
    np.testing.assert_array_equal(stacks["BF"].frames[0] - stacks["HAADF"].frames[0],
                                  np.ones((16, 24), np.float32))  # fmt: skip
    assert stacks["BF"].records[0].signal == "BF"
    assert stacks["HAADF"].records[0].dwell_us == 1.0


def test_interactive_devices_and_frame_get(client):
    state = client.lens_set(defocus_nm=-12.5, stigmator_nm=3.0, stigmator_deg=30.0)
    assert state.defocus_nm == -12.5 and state.stigmator_nm == 3.0
    assert client.lens_get().stigmator_deg == 30.0
    image, info = client.camera_acquire(0.2, binning=2)
    assert image.dtype == np.float32 and image.shape == (32, 32)
    assert image[1, 1] == ramp(64, 64).reshape(32, 2, 32, 2).sum((1, 3))[1, 1]
    assert info.record.defocus_nominal_nm == -12.5 and info.pixel_size_nm == (0.04, 0.04)
    again, info2 = client.frame_get(info.frame_id)
    np.testing.assert_array_equal(again, image)
    assert info2 == info
    scans = client.scan_acquire(size_px=(8, 12), signals=["HAADF", "ABF"])
    assert scans["ABF"][0].shape == (8, 12)
    with pytest.raises(DaemonError) as e:
        client.lens_set(defocus_nm=1e6)
    assert e.value.code == "limit_exceeded"
    with pytest.raises(DaemonError) as e:
        client.frame_get(10_000)
    assert e.value.code == "not_found"
    assert client.status().counters.devices == 3  # lens_set, camera, scan (not the refused set)


#: Speed-up of the busy test's camera: its 60 s frame lasts 6 s, far longer than the few
#: round trips made while it is acquired, even on a busy machine.
SLOW_FRAME_SPEEDUP = 10.0


def test_device_methods_refused_busy_while_a_job_runs(tmp_path):
    devices = {**PATTERN, "speedup": SLOW_FRAME_SPEEDUP}
    with LocalDaemon({"devices": devices}, tmp_path) as d, d.client(timeout_s=5.0) as client:
        job = client.submit({"kind": "camera_image", "exposure_s": 60.0, "repeat": 2})
        wait_for(lambda: client.status().current_job == job.job_id)
        for call in (lambda: client.lens_set(defocus_nm=1.0),
                     lambda: client.camera_acquire(0.1), client.lens_get):  # fmt: skip
            with pytest.raises(DaemonError) as e:
                call()
            assert e.value.code == "busy"
        # the loop is not blocked by the acquisition: it answers while the first frame is
        # still being acquired (a blocked loop could only answer after it)
        status = client.status()
        assert status.state == "running" and status.current_job == job.job_id
        assert client.job(job.job_id).frames_done == 0
        client.cancel(job.job_id)
        assert client.wait(job.job_id, timeout_s=60).state == "cancelled"


def test_queue_pause_move_cancel_and_resume(client):
    client.pause()
    a = client.submit({"kind": "camera_image", "exposure_s": 0.1, "name": "a"})
    b = client.submit({"kind": "camera_image", "exposure_s": 0.1, "name": "b"})
    c = client.submit({"kind": "camera_image", "exposure_s": 0.1, "name": "c"}, position=0)
    assert [j.name for j in client.queue().jobs] == ["c", "a", "b"]
    assert [j.name for j in client.move(c.job_id, 2)] == ["a", "b", "c"]
    assert client.cancel(b.job_id).state == "cancelled"
    time.sleep(0.3)
    assert client.job(a.job_id).state == "queued"  # held while paused
    with pytest.raises(DaemonError) as e:
        client.cancel(b.job_id)
    assert e.value.code == "conflict"
    client.resume()
    assert client.wait(c.job_id, timeout_s=20).state == "done"
    assert client.job(a.job_id).state == "done"
    finished = [client.job(j.job_id) for j in (a, c)]
    assert finished[0].finished_s <= finished[1].started_s  # a ran before c


def test_pause_stops_a_running_job_at_a_frame_boundary(client):
    job = client.submit({"kind": "camera_image", "exposure_s": 5.0, "repeat": 40})
    wait_for(lambda: client.job(job.job_id).frames_done >= 2)
    client.pause()
    paused = wait_for(lambda: (j := client.job(job.job_id)).state == "paused" and j)
    time.sleep(0.3)
    assert client.job(job.job_id).frames_done == paused.frames_done
    assert client.status().state == "paused"
    client.resume()
    assert client.wait(job.job_id, timeout_s=30).frames_done == 40


def test_events_carry_job_states_frames_and_heartbeats(client):
    with client.events() as stream:
        # a heartbeat (every 0.2 s here) shows the subscription has reached the daemon
        seen: dict[str, list] = {}

        def heard_a_heartbeat() -> bool:
            ev = stream.next(1.0)
            if ev is not None:
                seen.setdefault(ev.topic, []).append(ev)
            return "heartbeat" in seen

        wait_for(heard_a_heartbeat, timeout_s=30)
        job = client.submit({"kind": "camera_image", "exposure_s": 0.1, "repeat": 2})
        deadline = time.monotonic() + 30  # a hang guard
        while time.monotonic() < deadline and "done" not in seen.get("states", []):
            ev = stream.next(1.0)
            if ev is None:
                continue
            seen.setdefault(ev.topic, []).append(ev)
            if ev.topic == "job" and ev.data["job"]["job_id"] == job.job_id:
                seen.setdefault("states", []).append(ev.data["job"]["state"])
        seqs = [e.seq for evs in seen.values() if isinstance(evs[0], object) for e in evs
                if hasattr(e, "seq")]  # fmt: skip
    assert seen["states"][0] == "queued" and seen["states"][-1] == "done"
    assert "running" in seen["states"] and "acquired" in seen["states"]
    assert [e.data["index"] for e in seen["frame"]] == [0, 1]
    assert "heartbeat" in seen
    assert len(set(seqs)) == len(seqs)
    assert all(set(e.data) == {"paused", "queued", "counters"} for e in seen["queue"])
    assert seen["queue"][-1].data["queued"] == 0  # the job left the queue when it started
    # a frame event's frame_id fetches that very frame
    image, info = client.frame_get(seen["frame"][-1].data["frame_id"])
    assert info.job_id == job.job_id and info.record.index == 1
    np.testing.assert_array_equal(image[1:], ramp(64, 64)[1:])


def test_many_clients_at_once(daemon):
    import threading

    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with daemon.client() as c:
                for _ in range(30):
                    assert c.status().state in ("idle", "running")
                    c.queue()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []


def test_status_counters_and_validation(client):
    s0 = client.status()
    client.submit({"kind": "camera_image", "exposure_s": 0.1})
    s1 = client.status()
    assert s1.counters.jobs > s0.counters.jobs and s1.counters.queue > s0.counters.queue
    assert s1.instance == s0.instance
    ok = client.plan_validate({"kind": "scan_image", "size_px": [64, 64], "dwell_us": 10.0})
    assert ok.valid and ok.estimate.frames == 1
    assert ok.estimate.duration_s == pytest.approx(64 * (64 * 10 + 200) * 1e-6)
    bad = client.plan_validate({"kind": "scan_image", "dwell_us": 1e5})
    assert not bad.valid and "dwell_us" in bad.problems[0]
    with pytest.raises(DaemonError) as e:
        client.submit({"kind": "camera_image", "exposure_s": 0.1, "defocus_nm": -1e5})
    assert e.value.code == "limit_exceeded"
    for plan in ({"kind": "no_such_kind"}, {"kind": "focal_series", "n_images": 1}):
        with pytest.raises(DaemonError) as e:
            client.submit(plan)
        assert e.value.code == "invalid_params"


def test_sigterm_mid_job_interrupts_at_a_frame_boundary_and_exits_0(tmp_path):
    d = LocalDaemon({"devices": dict(PATTERN)}, tmp_path).start()
    try:
        with d.client() as c:
            job = c.submit({"kind": "camera_image", "exposure_s": 5.0, "repeat": 200})
            wait_for(lambda: c.job(job.job_id).frames_done >= 2)
        assert d.stop(timeout_s=20) == 0
    finally:
        d.kill()
    log = [json.loads(x) for x in (tmp_path / "data/logs/daemon.jsonl").read_text().splitlines()]
    stopped = [r for r in log if r.get("event") == "job stopped"]
    assert stopped and stopped[0]["state"] == "interrupted" and stopped[0]["job"] == job.job_id
    assert stopped[0]["client"] == "local"  # job lines are bound to job and submitter
    queued = [r for r in log if r.get("event") == "job queued"]
    assert queued[0]["client"] == "local" and queued[0]["method"] == "job_submit"
    assert all("timestamp" in r and "level" in r for r in log)
    with LocalDaemon({"devices": dict(PATTERN)}, tmp_path / "again") as d2:
        pass
    del d2
    from scherzer.daemon.jobs import JobStore

    store = JobStore(tmp_path / "data/jobs.sqlite")
    info = store.get(job.job_id)
    store.close()
    assert info.state == "interrupted" and 2 <= info.frames_done < 200
    assert read_stack(info.output_file).n_frames == info.frames_done


def _cli(daemon: LocalDaemon, *args: str) -> tuple[int, dict]:
    cmd = [sys.executable, "-m", "scherzer.cli", *args, "--endpoint", daemon.endpoint,
           "--events", daemon.events_endpoint, "--json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # hang guard
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout + out.stderr
    return out.returncode, json.loads(lines[0])


def test_cli_commands_print_one_json_object(daemon, client):
    code, status = _cli(daemon, "status")
    assert code == 0 and status["state"] == "idle" and status["protocol"] == 1
    assert _cli(daemon, "pause") == (0, {"paused": True})
    job = client.submit({"kind": "camera_image", "exposure_s": 0.1})
    code, jobs = _cli(daemon, "jobs")
    assert code == 0 and jobs["paused"] and [j["job_id"] for j in jobs["jobs"]] == [job.job_id]
    assert _cli(daemon, "resume") == (0, {"paused": False})
    code, waited = _cli(daemon, "wait", str(job.job_id))
    assert code == 0 and waited["job"]["state"] == "done"
    code, err = _cli(daemon, "cancel", str(job.job_id))
    assert code == 2 and err["error"]["code"] == "conflict"
    code, hist = _cli(daemon, "jobs", "--history")
    assert hist["jobs"][0]["job_id"] == job.job_id


def test_every_cli_command_has_help(capsys):
    from scherzer.cli import build_parser

    # the entry point itself, once, in a process of its own
    out = subprocess.run([sys.executable, "-m", "scherzer.cli", "status", "--help"],
                         capture_output=True, text=True, timeout=50)  # fmt: skip
    assert out.returncode == 0 and "--json" in out.stdout
    # every command's help from the same parser, in this process: one interpreter start per
    # command (~25 of them) outgrew the test's time guard on a busy machine
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([name, "--help"])
        assert done.value.code == 0 and "--json" in capsys.readouterr().out, name


def test_job_files_open_with_a_plain_hyperspy_load(client):
    """The daemon's job files are .hspy (and EMD): `hs.load(path)` gives the stack as Signal2D
    with the frame axis navigating, calibrated in nm (issue #12)."""
    hs = pytest.importorskip("hyperspy.api", reason="HyperSpy is a test dependency")
    job = client.submit({"kind": "camera_image", "exposure_s": 0.5, "repeat": 2, "name": "hs"})
    done = client.wait(job.job_id, timeout_s=20)
    assert done.state == "done" and Path(done.output_file).suffix == ".hspy"
    loaded = hs.load(done.output_file)
    signals = loaded if isinstance(loaded, list) else [loaded]
    stack = next(s for s in signals if s.data.shape == (2, 64, 64))
    assert stack.axes_manager.navigation_shape == (2,)
    assert [a.units for a in stack.axes_manager.signal_axes] == ["nm", "nm"]
