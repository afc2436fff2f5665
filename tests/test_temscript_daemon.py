"""End to end: a real `scherzer daemon` with ``devices.kind = "temscript"`` driving temscript's own
server on loopback (``temscript-server --null``, a subprocess), through the driver registry.

Runs once config.py declares ``devices.kind = "temscript"`` and ``devices.temscript_url``
(skipped with that reason until then).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import wait_for
from test_temscript import free_port, start_null_server, stop

from scherzer.clients.client import LocalDaemon
from scherzer.emd import read_stack


def _config_knows_temscript() -> bool:
    from scherzer.config import DeviceSettings

    try:
        DeviceSettings(
            kind="temscript",
            temscript_url="http://127.0.0.1:8080",
            read_only=False,
            temscript_timeout_s=5.0,
            temscript_stigmator_nm_per_unit=100.0,
        )
    except Exception:
        return False
    return True


pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not _config_knows_temscript(),
        reason="config.py does not declare devices.kind='temscript' and its fields yet",
    ),
]

#: A NullMicroscope whose 3rd acquisition announces itself and hangs (killed there).
HANGS_AT_THIRD = """
import sys, time
from temscript import NullMicroscope
from temscript.server import MicroscopeServer

class HangsAtThird(NullMicroscope):
    calls = 0
    def acquire(self, *args):
        HangsAtThird.calls += 1
        if HangsAtThird.calls == 3:
            print("acquiring 3", flush=True)
            time.sleep(120)
        return super().acquire(*args)

server = MicroscopeServer(("127.0.0.1", int(sys.argv[1])), microscope_factory=HangsAtThird)
print("ready", flush=True)
server.serve_forever()
"""

FOCAL = {"kind": "focal_series", "n_images": 5, "start_nm": -80.0, "step_nm": 20.0,
         "exposure_s": 0.01, "binning": 8, "processing": [], "name": "tfs"}  # fmt: skip
REQUESTED = [-80.0, -60.0, -40.0, -20.0, 0.0]


def temscript_daemon(tmp_path, url: str, **devices) -> LocalDaemon:
    config = {
        "devices": {
            "kind": "temscript",
            "temscript_url": url,
            "temscript_stigmator_nm_per_unit": 100.0,  # lens_get reports the stigmator in nm
            **devices,
        },
        "server": {"heartbeat_s": 0.2},
    }
    return LocalDaemon(config, tmp_path)


def test_focal_series_of_five_through_the_registry(tmp_path):
    port = free_port()
    server = start_null_server(port)
    try:
        with temscript_daemon(tmp_path, f"http://127.0.0.1:{port}") as daemon:
            with daemon.client(timeout_s=10.0) as client:
                client.lens_set(defocus_nm=-10.0)
                done = client.wait(client.submit(FOCAL).job_id, timeout_s=60)
                assert done.state == "done" and done.frames_done == 5, done.error
                stack = read_stack(done.output_file)
                assert stack.frames.shape == (5, 256, 256)
                assert stack.column("defocus_nominal_nm").tolist() == REQUESTED
                assert stack.column("defocus_readback_nm").tolist() == REQUESTED
                assert client.lens_get().defocus_nm == -10.0  # restored afterwards
    finally:
        stop(server)


def test_server_killed_mid_series_fails_the_job_keeps_frames_and_the_next_job_runs(tmp_path):
    port = free_port()
    hanging = subprocess.Popen(
        [sys.executable, "-c", HANGS_AT_THIRD, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert hanging.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{port}"
        with temscript_daemon(tmp_path, url, temscript_timeout_s=5.0) as daemon:
            with daemon.client(timeout_s=10.0) as client:
                job = client.submit(FOCAL | {"on_error": "abort"})
                assert hanging.stdout.readline().strip() == "acquiring 3"
                hanging.kill()
                failed = client.wait(job.job_id, timeout_s=60)
                assert failed.state == "failed"
                assert failed.error.code == "device_disconnected", failed.error
                assert failed.frames_done == 2
                assert read_stack(failed.output_file).frames.shape[0] == 2
                assert client.status() is not None  # the daemon is alive
                back = start_null_server(port)
                try:
                    again = client.wait(client.submit(FOCAL).job_id, timeout_s=60)
                    assert again.state == "done" and again.frames_done == 5, again.error
                finally:
                    stop(back)
    finally:
        stop(hanging)


def test_read_only_daemon_acquires_but_refuses_the_focal_series(tmp_path):
    port = free_port()
    server = start_null_server(port)
    try:
        url = f"http://127.0.0.1:{port}"
        with temscript_daemon(tmp_path, url, read_only=True) as daemon:
            with daemon.client(timeout_s=10.0) as client:
                shot = {"kind": "camera_image", "exposure_s": 0.01, "binning": 8}
                done = client.wait(client.submit(shot).job_id, timeout_s=60)
                assert done.state == "done", done.error
                failed = client.wait(client.submit(FOCAL).job_id, timeout_s=60)
                assert failed.state == "failed" and failed.frames_done == 0
                assert "read-only" in failed.error.message
                wait_for(lambda: client.lens_get().defocus_nm == 0.0)  # nothing changed
    finally:
        stop(server)
