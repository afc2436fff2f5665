"""Series plans end to end on a real daemon process: a focal series on the simulator (accuracy
against the simulator's truth, focus restored), an orthogonal-sets scan series (frames stored in
one orientation, truth in that orientation, alignment), pause/resume/cancel mid-series, a device
fault under each error policy, and kill -9 mid-series with a restart.

Physics tests use the VirtualMicroscope at speed-up 1000; control-flow tests use the exact
pattern devices (the pattern lens keeps exact values, so "restored" is checked exactly)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from helpers import wait_for

from scherzer.clients.client import LocalDaemon
from scherzer.io import read_processing_summary, read_stack, read_stacks

pytestmark = pytest.mark.timeout(300)  # a hang guard, not a speed check
PATTERN = {"kind": "pattern", "camera_shape": [32, 32], "speedup": 20.0}
NO_PROCESSING = {"processing": []}


def focal_plan(n: int, **extra) -> dict:
    return {"kind": "focal_series", "n_images": n, "start_nm": -60.0, "step_nm": 4.0,
            "exposure_s": 1.0, **NO_PROCESSING, **extra}  # fmt: skip


# --- physics on the simulator -----------------------------------------------------------------
def test_focal_series_on_the_simulator_matches_the_truth(tmp_path):
    devices = {"kind": "sim", "camera_shape": [256, 256], "speedup": 1000.0, "seed": 1,
               "specimen": "amorphous_carbon", "drift_nm_per_s": [0.01, -0.006]}  # fmt: skip
    with LocalDaemon({"devices": devices}, tmp_path) as d, d.client(timeout_s=30) as c:
        start = c.lens_set(defocus_nm=-7.0).defocus_nm
        plan = {"kind": "focal_series", "n_images": 11, "start_nm": -100.0, "step_nm": 10.0,
                "exposure_s": 1.0, "settle_s": 0.5, "name": "film"}  # fmt: skip
        first = c.submit(plan)
        after = c.submit({"kind": "camera_image", "exposure_s": 0.1, "name": "next"})
        job = c.wait(first.job_id, timeout_s=90)
        assert job.state == "done", job.error
        nxt = c.wait(after.job_id, timeout_s=30)
        # processing ran in the worker thread: the next acquisition started before it ended
        assert nxt.started_s < job.finished_s
        assert abs(c.lens_get().defocus_nm - start) < 1.0  # focus restored
    stack = read_stack(job.output_file)
    nominal = -100.0 + 10.0 * np.arange(11)
    assert stack.n_frames == 11 and job.frames_done == 11
    np.testing.assert_array_equal(stack.column("defocus_nominal_nm"), nominal)
    np.testing.assert_allclose(stack.column("defocus_readback_nm"), nominal, atol=1.0)
    truth = stack.ground_truth
    # one-sided approach: the true focus is the set-point minus one constant hysteresis offset
    offset = truth["defocus_nm"] - nominal
    assert np.ptp(offset) < 0.1, offset
    reg = read_processing_summary(job.output_file, "focal_register")
    ref = reg["reference_index"]
    rel_true = truth["defocus_nm"] - truth["defocus_nm"][ref]
    rel_err = np.asarray(reg["relative_defocus_nm"]) - rel_true
    drift_err = np.asarray(reg["shifts_px"]) - (truth["shifts_px"] - truth["shifts_px"][ref])
    assert np.ptp(truth["shifts_px"][:, 0]) > 3.0  # the specimen really drifted (0.5 px/frame)
    rms_nm = float(np.sqrt(np.mean(rel_err**2)))
    rms_px = float(np.sqrt(np.mean(np.sum(drift_err**2, axis=1))))
    print(f"focal series: relative defocus RMS {rms_nm:.3f} nm, drift RMS {rms_px:.3f} px")
    assert rms_nm <= 0.5, rel_err
    assert rms_px <= 0.1, drift_err
    stacks = read_stacks(job.output_file)
    assert "exit_wave" not in stacks  # results are not stacks …
    from scherzer.io import read_result

    assert read_result(job.output_file, "exit_wave").dtype == np.complex64  # … but results
    assert any(p.suffix == ".png" for p in (tmp_path / "data/jobs/film_001").iterdir())


SCAN_DEVICES = {"kind": "sim", "camera_shape": [64, 64], "speedup": 1000.0, "seed": 2,
                "specimen": "srtio3_001", "drift_nm_per_s": [0.3, -0.2],
                "scan_jitter_px": 0.0, "probe_current_pA": 400.0}  # fmt: skip


def orthogonal_sets(**extra) -> dict:
    return {"kind": "rotated_scan", "n_frames": 8, "size_px": [64, 64], "dwell_us": 2.0,
            "rotation_mode": "orthogonal-sets", "signals": ["HAADF", "ABF"], **extra}  # fmt: skip


def _residual(frame: np.ndarray, ref: np.ndarray, shift_px: np.ndarray) -> float:
    """Mean |frame − ref moved by shift_px| over the interior, in units of ref's std."""
    from scipy import ndimage

    moved = ndimage.shift(ref.astype(np.float64), shift_px, order=3, mode="nearest")
    inner = (slice(6, -6), slice(6, -6))
    return float(np.abs(frame[inner] - moved[inner]).mean() / ref[inner].std())


def test_orthogonal_sets_are_stored_in_one_orientation(tmp_path):
    with LocalDaemon({"devices": SCAN_DEVICES}, tmp_path) as d, d.client(timeout_s=30) as c:
        job = c.wait(c.submit(orthogonal_sets(processing=[])).job_id, timeout_s=60)
    assert job.state == "done", job.error
    stacks = read_stacks(job.output_file)
    haadf, abf = stacks["HAADF"], stacks["ABF"]
    assert haadf.n_frames == abf.n_frames == 8
    assert haadf.column("scan_rotation_deg").tolist() == [0, 90, 180, 270] * 2
    assert haadf.metadata["derotated"] is True and abf.metadata["derotated"] is True
    truth = haadf.ground_truth["shifts_px"]
    np.testing.assert_array_equal(truth, abf.ground_truth["shifts_px"])
    assert np.ptp(truth[:, 0]) > 1.0  # a drift of 0.2 px per frame
    # every stored frame is the first one moved by its true shift; other orientations and the
    # opposite shift are worse (measured on the noisy frames themselves; ABF has the SNR for a
    # clear margin, HAADF at 400 pA and 2 µs only a few counts per pixel; SrTiO3 [001] is
    # centrosymmetric, so 180° is the closest wrong orientation)
    for stack, margin in ((abf, 0.7), (haadf, 0.9)):
        for i in range(1, 8):
            delta = truth[i] - truth[0]
            good = _residual(stack.frames[i], stack.frames[0], delta)
            for k in (1, 2, 3):
                wrong = _residual(np.rot90(stack.frames[i], k), stack.frames[0], delta)
                assert good < margin * wrong, (stack.signal, i, k, good, wrong)
            if stack is abf and np.hypot(*delta) > 0.8:
                assert good < _residual(stack.frames[i], stack.frames[0], -delta), i


def test_orthogonal_sets_alignment_recovers_the_drift(tmp_path):
    with LocalDaemon({"devices": SCAN_DEVICES}, tmp_path) as d, d.client(timeout_s=30) as c:
        job = c.wait(c.submit(orthogonal_sets()).job_id, timeout_s=90)
    assert job.state == "done", job.error
    haadf = read_stack(job.output_file, "HAADF")
    align = read_processing_summary(job.output_file, "align")
    shifts = np.asarray(align["shifts_px"])
    truth = haadf.ground_truth["shifts_px"]
    err = (shifts - shifts.mean(0)) - (truth - truth.mean(0))
    assert np.sqrt(np.mean(np.sum(err**2, 1))) <= 0.3, err
    aligned = read_stacks(job.output_file)
    assert {"aligned_HAADF", "aligned_ABF"} <= set(aligned)
    assert aligned["aligned_ABF"].n_frames == aligned["aligned_HAADF"].n_frames == 8
    # ABF carries exactly the shifts measured on HAADF ...
    from scherzer.processing.registration import apply_shifts, measure_shifts

    abf = read_stack(job.output_file, "ABF")
    expected, _ = apply_shifts(abf.frames, shifts, "crop")
    np.testing.assert_allclose(aligned["aligned_ABF"].frames, expected, rtol=1e-5, atol=1e-4)
    # ... and those agree with ABF's own (noisier) measurement to within its noise
    own = measure_shifts(abf.frames).shifts_px
    diff = (own - own.mean(0)) - (shifts - shifts.mean(0))
    assert np.sqrt(np.mean(np.sum(diff**2, 1))) <= 0.3, diff


# --- control flow on pattern devices ----------------------------------------------------------
@pytest.fixture
def pattern_daemon(tmp_path):
    with LocalDaemon({"devices": dict(PATTERN)}, tmp_path) as d:
        yield d


def test_pause_resume_and_cancel_mid_series(pattern_daemon):
    with pattern_daemon.client() as c:
        c.lens_set(defocus_nm=12.5)
        job = c.submit(focal_plan(200, exposure_s=1.0))
        wait_for(lambda: c.job(job.job_id).frames_done >= 3)
        c.pause()
        paused = wait_for(lambda: (j := c.job(job.job_id)).state == "paused" and j)
        time.sleep(0.4)
        assert c.job(job.job_id).frames_done == paused.frames_done  # held at a frame boundary
        c.resume()
        wait_for(lambda: c.job(job.job_id).frames_done >= paused.frames_done + 3)
        c.cancel(job.job_id)
        done = c.wait(job.job_id, timeout_s=20)
        assert done.state == "cancelled" and paused.frames_done + 3 <= done.frames_done < 200
        assert c.lens_get().defocus_nm == 12.5  # restored exactly (pattern lens)
    stack = read_stack(done.output_file)
    assert stack.n_frames == done.frames_done
    nominal = stack.column("defocus_nominal_nm")
    np.testing.assert_array_equal(nominal, -60.0 + 4.0 * np.arange(stack.n_frames))
    np.testing.assert_array_equal(stack.column("defocus_readback_nm"), nominal)
    assert [r.index for r in stack.records] == list(range(stack.n_frames))


POLICIES = {
    # policy, faults, expected state, frames written, skipped
    "default_retry_once": (None, "timeout:2", "done", 6, []),
    "retry_exhausted": ({"retries": 1}, "timeout:2,timeout:2", "failed", 2, []),
    "skip": ("skip", "timeout:2", "done", 5, [2]),
    "abort": ("abort", "timeout:2", "failed", 2, []),
}


@pytest.mark.parametrize("case", list(POLICIES))
def test_device_fault_mid_series_under_each_error_policy(tmp_path, case):
    policy, faults, state, written, skipped = POLICIES[case]
    devices = {**PATTERN, "fault": faults}  # the 3rd acquisition (index 2) fails
    plan = focal_plan(6, **({"on_error": policy} if policy else {}))
    with LocalDaemon({"devices": devices}, tmp_path) as d, d.client() as c:
        c.lens_set(defocus_nm=-3.0)
        job = c.wait(c.submit(plan).job_id, timeout_s=30)
        assert job.state == state and job.frames_done == written
        assert c.lens_get().defocus_nm == -3.0  # restored, on failure too
        if state == "failed":
            assert job.error.code == "device_timeout" and "injected" in job.error.message
        elif skipped:
            assert job.error.details == {"skipped": skipped}  # done, with a note
        else:
            assert job.error is None
        again = c.wait(c.submit(focal_plan(2)).job_id, timeout_s=20)
        assert again.state == "done"  # the daemon lives on
    stack = read_stack(job.output_file)
    assert stack.n_frames == written
    expected = [i for i in range(6) if i not in skipped][:written]
    assert [r.index for r in stack.records] == expected
    np.testing.assert_array_equal(
        stack.column("defocus_nominal_nm"), -60.0 + 4.0 * np.asarray(expected)
    )


def test_daemon_killed_mid_series_and_restarted(tmp_path):
    config = {"devices": dict(PATTERN), "server": {}}
    d = LocalDaemon(config, tmp_path).start()
    try:
        with d.client() as c:
            job = c.submit(focal_plan(300))
            wait_for(lambda: c.job(job.job_id).frames_done >= 3)
        d.kill()
    finally:
        d.kill()
    config["server"].pop("endpoint"), config["server"].pop("events_endpoint")
    with LocalDaemon(config, tmp_path) as again, again.client() as c:
        lost = c.job(job.job_id)
        assert lost.state == "interrupted" and lost.error is not None
        stack = read_stack(lost.output_file)
        assert stack.n_frames == lost.frames_done >= 3
        np.testing.assert_array_equal(
            stack.column("defocus_nominal_nm"), -60.0 + 4.0 * np.arange(stack.n_frames)
        )
        nxt = c.wait(c.submit(focal_plan(3)).job_id, timeout_s=20)
        assert nxt.state == "done" and read_stack(nxt.output_file).n_frames == 3
        assert nxt.output_file != lost.output_file  # numbered, never overwritten


def test_processing_failure_fails_the_job_with_the_reason_and_keeps_the_frames(pattern_daemon):
    """Pattern frames carry no optics: focal registration cannot run."""
    with pattern_daemon.client() as c:
        plan = focal_plan(3, processing=["focal_register"])
        job = c.wait(c.submit(plan).job_id, timeout_s=30)
        assert job.state == "failed" and job.error.code == "processing_failed"
        assert "missing instrument parameters" in job.error.message
        assert job.frames_done == 3 and read_stack(job.output_file).n_frames == 3
        assert c.wait(c.submit(focal_plan(2)).job_id, timeout_s=20).state == "done"


def test_plan_validate_refuses_when_the_disk_would_fill(tmp_path):
    config = {"devices": dict(PATTERN), "limits": {"min_free_disk_bytes": 1 << 62}}
    with LocalDaemon(config, tmp_path) as d, d.client() as c:
        res = c.plan_validate(focal_plan(5))
        assert not res.valid and "not enough disk" in res.problems[0]
        assert res.estimate.disk_bytes == 5 * 32 * 32 * 4
        assert res.estimate.duration_s == pytest.approx(5 * 1.0)


def test_queue_pause_survives_a_restart(tmp_path):
    config = {"devices": dict(PATTERN), "server": {}}
    with LocalDaemon(config, tmp_path) as d, d.client() as c:
        c.pause()
        job = c.submit(focal_plan(2))
    config["server"].pop("endpoint"), config["server"].pop("events_endpoint")
    with LocalDaemon(config, tmp_path) as d, d.client() as c:
        assert c.status().queue_paused
        time.sleep(0.3)
        assert c.job(job.job_id).state == "queued"
        c.resume()
        assert c.wait(job.job_id, timeout_s=20).state == "done"


def test_processing_interrupted_by_a_kill_runs_again_after_restart(tmp_path):
    devices = {"kind": "sim", "camera_shape": [256, 256], "speedup": 1000.0, "seed": 1,
               "specimen": "amorphous_carbon"}  # fmt: skip
    config = {"devices": devices, "server": {}}
    plan = {"kind": "focal_series", "n_images": 9, "start_nm": -90.0, "step_nm": 10.0,
            "processing": ["focal_register", {"step": "restore", "iterations": 5}]}  # fmt: skip
    d = LocalDaemon(config, tmp_path).start()
    try:
        with d.client(timeout_s=30) as c:
            job = c.submit(plan)
            wait_for(lambda: c.job(job.job_id).state == "processing", timeout_s=60)
        d.kill()
    finally:
        d.kill()
    config["server"].pop("endpoint"), config["server"].pop("events_endpoint")
    with LocalDaemon(config, tmp_path) as again, again.client(timeout_s=30) as c:
        done = c.wait(job.job_id, timeout_s=90)
        assert done.state == "done", done.error
    log = (tmp_path / "data/logs/daemon.jsonl").read_text()
    assert "resuming processing after a restart" in log
    assert read_processing_summary(done.output_file, "restore")["images_used"] == 9


def test_scan_settings_a_plan_changed_are_restored_in_process(tmp_path):
    """The executor without a server: the scan generator's settings (rotation included) are put
    back after a rotated-scan series, and after one that fails."""
    from scherzer.config import Settings
    from scherzer.daemon.executor import Executor, FrameCache, open_instruments
    from scherzer.daemon.jobs import JobStore
    from scherzer.daemon.plans import RotatedScanSeries, plan_to_json
    from scherzer.drivers.base import ScanSettings

    settings = Settings(data_dir=tmp_path, devices={**PATTERN, "fault": "timeout:5,timeout:5"})
    instruments = open_instruments(settings)
    before = ScanSettings(size_px=(8, 8), rotation_deg=33.0, signals=("BF",))
    instruments.scan.configure(before)
    store = JobStore(tmp_path / "jobs.sqlite")
    events: list = []
    ex = Executor(store, instruments, settings, lambda t, d: events.append((t, d)), FrameCache())
    ex.start()
    try:
        ids = []
        for n in (4, 4):  # the second one hits the double fault on its 2nd frame and fails
            plan = RotatedScanSeries(n_frames=n, size_px=(16, 16), processing=[])
            ids.append(store.submit(plan_to_json(plan), kind=plan.kind, submitter="t",
                                    frames_total=n).job_id)  # fmt: skip
            ex.wake()
            final = wait_for(lambda: (j := store.get(ids[-1])).state in ("done", "failed") and j)
            assert instruments.scan.settings == before
        assert [store.get(i).state for i in ids] == ["done", "failed"]
        assert any(t == "frame" and d["record"]["scan_rotation_deg"] == 90.0 for t, d in events)
    finally:
        ex.stop()
        assert ex.join(10)
        store.close()
    assert final.error.code == "device_timeout"
