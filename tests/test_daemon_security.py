"""CURVE + ZAP: allowed keys are identified with their role; others get nothing; observers are
read-only; a non-loopback bind without keys refuses to start (before binding anything)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import zmq
import zmq.auth
from helpers import wait_for

from scherzer.clients.client import Client, DaemonError, DaemonTimeout, LocalDaemon
from scherzer.daemon.security import new_keypair

#: Hang guard per test (s): daemon processes and CLI subprocesses start several times slower on
#: a busy machine; a passing test never comes near it.
pytestmark = pytest.mark.timeout(300)
#: Hang guard (s) for something that will happen (a heartbeat, a log line): not an expected time.
EVENT_GUARD_S = 20.0
PATTERN = {"kind": "pattern", "camera_shape": [16, 16], "speedup": 1000.0}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return {name: new_keypair(name, d) for name in ("server", "alice", "bob", "mallory")}


@pytest.fixture(scope="module")
def secure(keys, tmp_path_factory):
    config = {
        "devices": dict(PATTERN),
        "security": {
            "curve": True,
            "server_secret_key_file": str(keys["server"][1]),
            "clients": [
                {"name": "alice", "role": "operator", "public_key_file": str(keys["alice"][0])},
                {"name": "bob", "role": "observer", "public_key_file": str(keys["bob"][0])},
            ],
        },
    }
    admin = {"client_key": keys["alice"][1], "server_key": keys["server"][0]}
    with LocalDaemon(config, tmp_path_factory.mktemp("secure"), **admin) as d:
        yield d


def as_user(daemon: LocalDaemon, keys: dict, name: str, **kw) -> Client:
    return daemon.client(client_key=keys[name][1], server_key=keys["server"][0], **kw)


def test_operator_is_identified_and_recorded_as_submitter(secure, keys):
    with as_user(secure, keys, "alice") as c:
        status = c.status()
        assert (status.user, status.role) == ("alice", "operator")
        job = c.submit({"kind": "camera_image", "exposure_s": 0.1})
        assert job.submitter == "alice"
        assert c.wait(job.job_id, timeout_s=10).state == "done"


def test_observer_reads_but_cannot_submit_or_drive_devices(secure, keys):
    with as_user(secure, keys, "bob") as c:
        assert c.status().role == "observer"
        assert isinstance(c.history(), list)
        for call in (lambda: c.submit({"kind": "camera_image", "exposure_s": 0.1}),
                     lambda: c.lens_set(defocus_nm=1.0), c.pause,
                     lambda: c.camera_acquire(0.1)):  # fmt: skip
            with pytest.raises(DaemonError) as e:
                call()
            assert e.value.code == "forbidden"


def refusals(daemon: LocalDaemon, keys: dict, name: str) -> int:
    """How often the daemon logged refusing ``name``'s public key (its ZAP handler's verdict)."""
    public, _ = zmq.auth.load_certificate(str(keys[name][0]))
    log = daemon.stderr_path.read_text(errors="replace").splitlines()
    return sum('"client refused"' in line and public.decode() in line for line in log)


def test_unknown_key_gets_no_reply_at_all(secure, keys):
    before = refusals(secure, keys, "mallory")
    with as_user(secure, keys, "mallory", timeout_s=1.0, retries=0) as c:
        with pytest.raises(DaemonTimeout, match=r"\(1 attempt"):  # one wait, no retries
            c.status()
    # no reply because the daemon refused the key (not because it was slow to answer)
    wait_for(lambda: refusals(secure, keys, "mallory") > before, EVENT_GUARD_S)


def test_plain_client_without_curve_gets_nothing(secure):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(secure.endpoint)
    try:
        sock.send(b'{"v":1,"id":"x","method":"status","params":{}}')
        assert sock.poll(1000) == 0
    finally:
        sock.close()


def test_events_need_an_allowed_key_too(secure, keys):
    with as_user(secure, keys, "bob") as c, c.events(("heartbeat",)) as stream:
        assert stream.next(EVENT_GUARD_S) is not None  # default heartbeat every 2 s
    before = refusals(secure, keys, "mallory")
    with as_user(secure, keys, "mallory") as c, c.events(("heartbeat",)) as stream:
        assert stream.next(2.5) is None  # longer than a heartbeat period
        wait_for(lambda: refusals(secure, keys, "mallory") > before, EVENT_GUARD_S)


def test_non_loopback_bind_without_keys_refuses_to_start(tmp_path):
    (tmp_path / "c.toml").write_text(
        f'data_dir = "{tmp_path / "data"}"\n[server]\nendpoint = "tcp://0.0.0.0:5577"\n'
    )
    cmd = [sys.executable, "-m", "scherzer.cli", "daemon", "--config", str(tmp_path / "c.toml")]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    err = json.loads(out.stdout)["error"]
    assert "not loopback" in err["message"] and "server_secret_key_file" in err["message"]


def test_keys_new_cli_makes_a_pair_and_refuses_to_overwrite(tmp_path):
    cmd = [sys.executable, "-m", "scherzer.cli", "keys", "new", "carol", "--dir", str(tmp_path)]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=30)
    made = json.loads(out.stdout)
    assert out.returncode == 0 and len(made["public_key"]) == 40
    assert (tmp_path / "carol.key_secret").stat().st_mode & 0o077 == 0
    again = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=30)
    assert again.returncode == 2 and "exists" in json.loads(again.stdout)["error"]["message"]
