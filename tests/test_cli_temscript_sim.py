"""`scherzer temscript-sim`: the simulated microscope served through temscript's own HTTP server,
driven by Scherzer's temscript driver over loopback (a real process, a real server)."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import wait_for

from scherzer.drivers.temscript import TemscriptSettings, open_temscript


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_temscript_sim_command_serves_a_microscope_the_driver_can_drive():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "scherzer", "temscript-sim", "--port", str(port),
         "--camera-px", "64", "--specimen", "crystal_edge"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(lambda: _accepting(port) or proc.poll() is not None, timeout_s=120)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        ins = open_temscript(TemscriptSettings(url=f"http://127.0.0.1:{port}"))
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
