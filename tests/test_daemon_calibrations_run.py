"""A plan naming a camera curve in ``calibrations_dir`` is processed with that curve: the daemon
resolves the name inside the directory when the processing runs (real daemon, loopback)."""

from __future__ import annotations

import numpy as np

from scherzer.clients.client import LocalDaemon
from scherzer.io import read_processing_summary, read_result

DEVICES = {"kind": "sim", "camera_shape": [128, 128], "speedup": 1000.0, "seed": 3,
           "specimen": "amorphous_carbon"}  # fmt: skip


def test_named_mtf_is_loaded_from_the_calibrations_directory(tmp_path):
    cal = tmp_path / "calibrations"
    cal.mkdir()
    np.save(cal / "k2.npy", np.linspace(1.0, 0.3, 64))
    steps = [{"step": "focal_register", "mtf": "k2.npy"}, {"step": "restore", "iterations": 0}]
    plan = {"kind": "focal_series", "n_images": 5, "start_nm": -80.0, "step_nm": 10.0,
            "exposure_s": 1.0, "processing": steps, "name": "named"}  # fmt: skip
    config = {"devices": dict(DEVICES), "calibrations_dir": str(cal)}
    with LocalDaemon(config, tmp_path / "run") as d, d.client(timeout_s=30) as c:
        job = c.wait(c.submit(plan).job_id, timeout_s=120)
    assert job.state == "done", job.error
    assert read_result(job.output_file, "exit_wave").shape == (128, 128)
    assert len(read_processing_summary(job.output_file, "focal_register")["defocus_nm"]) == 5


def test_a_named_curve_that_disappeared_fails_the_job_not_the_daemon(tmp_path):
    cal = tmp_path / "calibrations"
    cal.mkdir()
    np.save(cal / "gone.npy", np.linspace(1.0, 0.3, 64))
    steps = [{"step": "focal_register", "mtf": "gone.npy"}]
    plan = {"kind": "focal_series", "n_images": 4, "start_nm": -80.0, "step_nm": 10.0,
            "exposure_s": 1.0, "processing": steps}  # fmt: skip
    config = {"devices": dict(DEVICES), "calibrations_dir": str(cal)}
    with LocalDaemon(config, tmp_path / "run") as d, d.client(timeout_s=30) as c:
        submitted = c.submit(plan)
        (cal / "gone.npy").unlink()  # removed after submit, before the processing runs
        job = c.wait(submitted.job_id, timeout_s=120)
        assert job.state == "failed" and "gone.npy" in job.error.message
        assert job.frames_done == 4  # the frames are kept
        assert c.status().state != "error"  # the daemon is fine
