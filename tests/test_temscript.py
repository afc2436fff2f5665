"""The Thermo Fisher / FEI adapter against temscript's real server on loopback (no mocks).

* ``temscript-server --null`` (temscript's NullMicroscope, its own console script) in a
  subprocess: round trips, a 5-image focal series, read-only mode, a server killed mid-call;
* tiny stdlib HTTP servers (threads) that answer 500, malformed JSON, a pickle, or nothing, and
  record what reached them: error mapping and "refused before it reaches the server".

The simulated microscope behind temscript's server is tested in test_temscript_sim.py.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import (
    PortTaken,
    lost_port_race,
    on_free_port,
    serve_process,
    serve_process_on_free_port,
)

from scherzer.clients.client import free_tcp_port
from scherzer.drivers.base import (
    Camera,
    DeviceDisconnected,
    DeviceError,
    DeviceProtocolError,
    DeviceTimeout,
    Lens,
    LimitExceeded,
    ScanGenerator,
    ScanSettings,
)
from scherzer.drivers.temscript import (
    ReadOnlyRefused,
    TemscriptSettings,
    open_temscript,
)

pytestmark = pytest.mark.timeout(60)

SERVER_SCRIPT = Path(sys.executable).parent / "temscript-server"
#: A NullMicroscope whose acquisition announces itself on stdout and then waits (for the kill
#: test); otherwise temscript's own server and handler.
ANNOUNCING_SERVER = """
import sys, time
from temscript import NullMicroscope
from temscript.server import MicroscopeServer

class Announcing(NullMicroscope):
    def acquire(self, *args):
        print("acquiring", flush=True)
        time.sleep(60)
        return super().acquire(*args)

server = MicroscopeServer(("127.0.0.1", int(sys.argv[1])), microscope_factory=Announcing)
print("ready", flush=True)
server.serve_forever()
"""


def null_server_command(port: int) -> list[str]:
    return [str(SERVER_SCRIPT), "--null", "--host", "127.0.0.1", "--port", str(port)]


def start_null_server(port: int) -> subprocess.Popen:
    """``temscript-server --null`` on 127.0.0.1:port, once that process listens there."""
    return serve_process(null_server_command, port)


def null_server_on_free_port() -> tuple[int, subprocess.Popen]:
    """``temscript-server --null`` on a free port (a new one when another process took it)."""
    return serve_process_on_free_port(null_server_command)


def script_server_on_free_port(script: str) -> tuple[int, subprocess.Popen]:
    """``python -c script PORT`` that prints ``ready`` once it listens (stdout: a text pipe for
    its announcements), on a free port (a new one when another process took it)."""

    def start(port: int) -> subprocess.Popen:
        err = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(port)], stdout=subprocess.PIPE, stderr=err, text=True
        )
        if proc.stdout.readline().strip() == "ready":
            return proc
        proc.wait(timeout=30)
        err.seek(0)
        text = err.read().decode(errors="replace")
        if lost_port_race(text):
            raise PortTaken(text[-500:])
        raise AssertionError(f"scripted server exited with {proc.returncode}: {text[-2000:]}")

    return on_free_port(start)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.fixture
def null_server() -> Iterator[str]:
    port, proc = null_server_on_free_port()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


# --- against temscript-server --null ------------------------------------------------------
def test_drivers_satisfy_the_protocols(null_server):
    ins = open_temscript(TemscriptSettings(url=null_server))
    assert isinstance(ins.lens, Lens)
    assert isinstance(ins.camera, Camera)
    assert isinstance(ins.scan, ScanGenerator)


def test_defocus_beam_tilt_and_image_shift_round_trip_in_scherzer_units(null_server):
    ins = open_temscript(TemscriptSettings(url=null_server))
    for defocus_nm in (-123.4, 0.0, 57.25):
        ins.lens.set_defocus_nm(defocus_nm)
        assert ins.lens.get_defocus_nm() == defocus_nm
    # what reached the NullMicroscope is in metres
    raw = ins.link.read("raw", lambda m: m.get_defocus())
    assert raw == pytest.approx(57.25e-9, rel=1e-12)
    ins.lens.set_beam_tilt_mrad(1.5, -2.0)  # Scherzer (y, x) mrad
    assert ins.lens.get_beam_tilt_mrad() == pytest.approx((1.5, -2.0))
    assert ins.link.read("raw", lambda m: m.get_beam_tilt()) == pytest.approx([-2e-3, 1.5e-3])
    ins.lens.set_image_shift_nm(30.0, -12.0)
    assert ins.lens.get_image_shift_nm() == (30.0, -12.0)


def test_focal_series_of_five_reads_back_each_request_and_restores_the_focus(null_server):
    ins = open_temscript(TemscriptSettings(url=null_server))
    ins.lens.set_defocus_nm(-20.0)
    start_nm = ins.lens.get_defocus_nm()
    requests = [-80.0, -60.0, -40.0, -20.0, 0.0]
    frames = []
    for defocus_nm in requests:
        ins.lens.set_defocus_nm(defocus_nm)
        ins.lens.wait_settled(5.0)
        frames.append(ins.camera.acquire(0.01, binning=8))
    ins.lens.set_defocus_nm(start_nm)
    assert ins.lens.get_defocus_nm() == start_nm
    assert [f.record.defocus_readback_nm for f in frames] == requests
    assert [f.record.defocus_nominal_nm for f in frames] == requests
    assert [f.record.index for f in frames] == list(range(5))
    for f in frames:
        assert f.image.shape == (256, 256) and f.image.dtype.name == "float32"
        assert f.record.exposure_s == 0.01
        inst = f.truth["instrument"]
        # NullMicroscope: 200 kV, magnification 100 000, 24 µm detector pixels, binning 8
        assert inst["voltage_kv"] == 200.0 and inst["magnification"] == 100000.0
        assert f.pixel_size_nm == pytest.approx((1.92, 1.92))
        assert inst["pixel_size_nm"] == pytest.approx(1.92)


def test_camera_region_uses_the_smallest_centred_image_size(null_server):
    ins = open_temscript(TemscriptSettings(url=null_server))
    frame = ins.camera.acquire(0.01, binning=4, region=(600, 800, 256, 128))
    assert frame.image.shape == (64, 32)
    assert frame.truth["instrument"]["image_size"] == "HALF"
    with pytest.raises(LimitExceeded):
        ins.camera.acquire(0.01, binning=3)
    with pytest.raises(LimitExceeded):
        ins.camera.acquire(0.01, region=(2000, 0, 100, 100))


def test_read_only_refuses_every_optics_change_but_reads_and_acquires(null_server):
    writer = open_temscript(TemscriptSettings(url=null_server))
    writer.lens.set_defocus_nm(-15.0)
    ro = open_temscript(
        TemscriptSettings(url=null_server, read_only=True, stigmator_nm_per_unit=100.0)
    )
    changes = [
        lambda: ro.lens.set_defocus_nm(-30.0),
        lambda: ro.lens.set_stigmator(5.0, 10.0),
        lambda: ro.lens.set_beam_tilt_mrad(0.5, 0.0),
        lambda: ro.lens.set_image_shift_nm(0.0, 3.0),
    ]
    for change in changes:
        with pytest.raises(ReadOnlyRefused) as err:
            change()
        assert err.value.code == "device_read_only" and "read-only" in str(err.value)
    assert writer.lens.get_defocus_nm() == -15.0
    assert writer.lens.get_beam_tilt_mrad() == (0.0, 0.0)
    assert writer.lens.get_image_shift_nm() == (0.0, 0.0)
    ro.lens.set_defocus_nm(-15.0)  # already there: accepted, nothing sent
    assert ro.lens.get_defocus_nm() == -15.0
    assert ro.camera.acquire(0.01, binning=8).image.shape == (256, 256)


def test_out_of_limit_values_are_refused_and_nothing_changes(null_server):
    ins = open_temscript(TemscriptSettings(url=null_server))
    ins.lens.set_defocus_nm(-10.0)
    for bad in (-2500.0, 1e9, float("nan")):
        with pytest.raises(LimitExceeded):
            ins.lens.set_defocus_nm(bad)
    with pytest.raises(LimitExceeded):
        ins.lens.set_beam_tilt_mrad(0.0, 50.0)
    assert ins.lens.get_defocus_nm() == -10.0
    assert ins.lens.get_beam_tilt_mrad() == (0.0, 0.0)


def test_stigmator_needs_a_calibration(null_server):
    ins = open_temscript(TemscriptSettings(url=null_server))
    with pytest.raises(DeviceError, match="stigmator_nm_per_unit"):
        ins.lens.get_stigmator()
    cal = open_temscript(TemscriptSettings(url=null_server, stigmator_nm_per_unit=100.0))
    cal.lens.set_stigmator(12.0, 30.0)
    magnitude, angle = cal.lens.get_stigmator()
    assert magnitude == pytest.approx(12.0) and angle == pytest.approx(30.0)
    sx, sy = cal.link.read("raw", lambda m: m.get_objective_stigmator())
    assert (sx, sy) == pytest.approx((0.12 * 0.5, 0.12 * 3**0.5 / 2))  # |A1|·(cos 2φ, sin 2φ)


def test_no_stem_detectors_on_the_null_microscope_is_a_clear_refusal(null_server):
    ins = open_temscript(TemscriptSettings(url=null_server))
    with pytest.raises(LimitExceeded, match="HAADF"):
        ins.scan.configure(ScanSettings(size_px=(512, 512), signals=("HAADF",)))


def test_server_killed_mid_call_is_device_disconnected_and_recovers():
    port, proc = script_server_on_free_port(ANNOUNCING_SERVER)
    try:
        ins = open_temscript(TemscriptSettings(url=f"http://127.0.0.1:{port}"))
        ins.lens.set_defocus_nm(-5.0)
        errors: list[BaseException] = []

        def acquire() -> None:
            try:
                ins.camera.acquire(0.01, binning=8)
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=acquire)
        worker.start()
        assert proc.stdout.readline().strip() == "acquiring"  # the call is inside the server
        proc.kill()
        worker.join(timeout=30)
        assert not worker.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], DeviceDisconnected)
        assert errors[0].code == "device_disconnected" and str(port) in str(errors[0])
        with pytest.raises(DeviceDisconnected):  # nothing listening now
            ins.lens.get_defocus_nm()
    finally:
        stop(proc)
    back = start_null_server(port)  # the server comes back: the same drivers work again
    try:
        ins.lens.set_defocus_nm(-7.0)
        assert ins.lens.get_defocus_nm() == -7.0
    finally:
        stop(back)


def test_unreachable_server_is_device_disconnected():
    with pytest.raises(DeviceDisconnected, match="refused"):
        open_temscript(TemscriptSettings(url=f"http://127.0.0.1:{free_tcp_port()}"))


# --- scripted stdlib servers: 500, malformed replies, silence ----------------------------
class Scripted:
    """A loopback HTTP server answering ``replies[path] = (status, content_type, body)``
    (``None`` = never answer until ``release``), recording every request."""

    def __init__(self, replies: dict[str, tuple[int, str, bytes] | None]) -> None:
        self.replies = replies
        self.requests: list[tuple[str, str]] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.requests.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                reply = outer.replies.get(self.path.split("?")[0], (404, "text/plain", b"no"))
                if reply is None:
                    outer.release.wait(30)
                    return
                status, ctype, body = reply
                self.send_response(status, "boom" if status == 500 else None)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


JSON = "application/json"
VERSION = {"/v1/version": (200, JSON, b'"2.1.0"')}


@pytest.fixture
def scripted():
    made: list[Scripted] = []

    def make(replies):
        made.append(Scripted({**VERSION, **replies}))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_http_500_is_a_device_error_with_the_servers_reason(scripted):
    server = scripted({"/v1/defocus": (500, "text/html", b"<html>COM error</html>")})
    ins = open_temscript(TemscriptSettings(url=server.url))
    with pytest.raises(DeviceError) as err:
        ins.lens.get_defocus_nm()
    assert err.value.code == "device_error" and "500" in str(err.value)
    assert "boom" in str(err.value) and "reading defocus" in str(err.value)


@pytest.mark.parametrize(
    "reply",
    [
        (200, JSON, b"{not json"),
        (200, JSON, b'"a string where a number belongs"'),
        (200, JSON, b"\xff\xfe"),
        (200, "application/python-pickle", pickle.dumps(-1e-8)),
    ],
    ids=["garbage", "wrong-type", "not-utf8", "pickle"],
)
def test_malformed_replies_are_protocol_errors(scripted, reply):
    server = scripted({"/v1/defocus": reply})
    ins = open_temscript(TemscriptSettings(url=server.url))
    with pytest.raises(DeviceProtocolError) as err:
        ins.lens.get_defocus_nm()
    assert err.value.code == "device_protocol_error" and server.url in str(err.value)


def test_requests_accept_json_only(scripted):
    server = scripted({"/v1/defocus": (200, JSON, b"0.0")})
    ins = open_temscript(TemscriptSettings(url=server.url))
    seen: list[str] = []
    ins.link.read("headers", lambda m: seen.append(",".join(m.accepted_content)))
    assert seen == [JSON]
    assert ins.lens.get_defocus_nm() == 0.0


def test_a_silent_server_times_out(scripted):
    server = scripted({"/v1/defocus": None})
    ins = open_temscript(TemscriptSettings(url=server.url, timeout_s=0.3))
    with pytest.raises(DeviceTimeout) as err:
        ins.lens.get_defocus_nm()
    assert err.value.code == "device_timeout"


def test_out_of_limit_defocus_never_reaches_the_server(scripted):
    server = scripted({"/v1/defocus": (200, JSON, json.dumps(0.0).encode())})
    ins = open_temscript(TemscriptSettings(url=server.url))
    before = list(server.requests)
    with pytest.raises(LimitExceeded):
        ins.lens.set_defocus_nm(-1e5)
    assert server.requests == before  # no request at all
    ro = open_temscript(TemscriptSettings(url=server.url, read_only=True))
    with pytest.raises(ReadOnlyRefused):
        ro.lens.set_defocus_nm(-10.0)
    assert not [r for r in server.requests if r[0] == "PUT"]


def test_a_clamped_set_is_caught_by_the_read_back(scripted):
    server = scripted({"/v1/defocus": (200, JSON, b"-5e-08")})  # always reads -50 nm
    ins = open_temscript(TemscriptSettings(url=server.url))
    with pytest.raises(DeviceError, match="reads back -50 nm"):
        ins.lens.set_defocus_nm(-80.0)


def test_bad_urls_are_refused():
    for url in ("https://127.0.0.1:8080", "ftp://x", "http://127.0.0.1:8080/path"):
        with pytest.raises(ValueError):
            open_temscript(TemscriptSettings(url=url), check=False)


# --- in-process microscopes (no server) ---------------------------------------------------
def test_null_in_process_runs_the_same_drivers():
    ins = open_temscript(TemscriptSettings(url="null"))
    ins.lens.set_defocus_nm(-42.5)
    assert ins.lens.get_defocus_nm() == -42.5
    assert ins.camera.acquire(0.001, binning=8).record.defocus_readback_nm == -42.5
    with pytest.raises(ReadOnlyRefused):
        open_temscript(TemscriptSettings(url="null", read_only=True)).lens.set_defocus_nm(-1.0)


@pytest.mark.skipif(sys.platform == "win32", reason="COM exists on Windows")
def test_local_com_off_windows_is_a_clear_disconnected_error():
    with pytest.raises(DeviceDisconnected, match="microscope PC"):
        open_temscript(TemscriptSettings(url="local"))
