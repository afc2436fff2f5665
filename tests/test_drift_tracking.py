"""Drift tracking (issue #17): a time series with ``track_drift_nm`` keeps a drifting specimen
within the threshold over 50 frames by moving the stage against the displacement the live
average measures (real daemon, simulated microscope and stage, ground truth from the simulator).
Without tracking the same drift carries the content ~8× the threshold away."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scherzer import io as sio
from scherzer.clients.client import LocalDaemon

PIXEL_NM = 0.05
DRIFT_NM_PER_S = (0.012, -0.009)  # 0.015 nm per 1-s frame interval (0.3 px)
THRESHOLD_NM = 0.1
DEVICES = {"kind": "sim", "camera_shape": [96, 96], "camera_pixel_nm": PIXEL_NM,
           "speedup": 1000.0, "seed": 7, "specimen": "au_particle_on_carbon",
           "drift_nm_per_s": list(DRIFT_NM_PER_S)}  # fmt: skip


def _series(track: float | None) -> dict:
    plan = {"kind": "time_series", "source": "camera", "n_frames": 50, "exposure_s": 0.5,
            "interval_s": 1.0, "processing": [], "name": "track"}  # fmt: skip
    if track is not None:
        plan["track_drift_nm"] = track
    return plan


def _content_excursion_nm(path: str) -> float:
    """Largest distance (nm) of the content from where it was in frame 0 (simulator truth:
    drift plus stage)."""
    truth = sio.read_stack(path, "frames").ground_truth["shifts_px"]
    return float(np.max(np.hypot(*(truth - truth[0]).T)) * PIXEL_NM)


def test_tracking_keeps_the_content_within_the_threshold(tmp_path: Path):
    with LocalDaemon({"devices": dict(DEVICES)}, tmp_path) as d, d.client(timeout_s=30) as c:
        tracked = c.wait(c.submit(_series(THRESHOLD_NM)).job_id, timeout_s=180)
        free = c.wait(c.submit(_series(None)).job_id, timeout_s=180)
    assert tracked.state == "done" and free.state == "done"
    moves = sio.read_table(tracked.output_file, "drift_tracking")
    assert len(moves) >= 3  # the stage really moved, several times
    # the threshold plus the drift during the one frame that measures it before the move
    step_nm = float(np.hypot(*DRIFT_NM_PER_S)) * 1.0
    assert _content_excursion_nm(tracked.output_file) <= THRESHOLD_NM + 2 * step_nm
    assert _content_excursion_nm(free.output_file) > 5 * THRESHOLD_NM
