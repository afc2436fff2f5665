"""`scherzer temscript-sim`: the simulated microscope served through temscript's own HTTP server,
driven by Scherzer's temscript driver over loopback (a real process, a real server)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from helpers import serve_process_on_free_port

from scherzer.drivers.temscript import TemscriptSettings, open_temscript

#: Driver deadlines (s) that are hang guards: the simulator computes each image inside the
#: request, which can take many seconds on a busy machine with cold caches (not the instrument
#: time the driver's defaults are made for).
SIM_DEADLINES = {"timeout_s": 120.0, "acquire_margin_s": 300.0}


def _sim_command(port: int) -> list[str]:
    return [sys.executable, "-m", "scherzer", "temscript-sim", "--port", str(port),
            "--camera-px", "64", "--specimen", "crystal_edge"]  # fmt: skip


def test_temscript_sim_command_serves_a_microscope_the_driver_can_drive():
    # the server process itself listens on the port (a new port if another process took it)
    port, proc = serve_process_on_free_port(_sim_command)
    try:
        ins = open_temscript(TemscriptSettings(url=f"http://127.0.0.1:{port}", **SIM_DEADLINES))
        ins.lens.set_defocus_nm(-42.0)
        assert ins.lens.get_defocus_nm() == pytest.approx(-42.0, abs=1e-6)
        frame = ins.camera.acquire(exposure_s=0.01)
        image = np.asarray(frame.image)
        assert image.shape == (64, 64) and np.isfinite(image).all() and image.std() > 0
        # the instrument parameters read with the frame are in its record (issue #14)
        assert frame.record.voltage_kv == pytest.approx(300.0)
        assert frame.record.magnification > 0
    finally:
        proc.kill()
        proc.wait(timeout=10)
