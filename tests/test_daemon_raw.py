"""A raw pyzmq peer that knows only docs/protocol.md (no scherzer imports for the wire format).

Hand-written JSON requests over DEALER and REQ sockets; replies parsed by hand; arrays rebuilt
from the documented `arrays` metadata. Several requests in flight at once, matched by id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import zmq

from scherzer.clients.client import LocalDaemon

pytestmark = pytest.mark.timeout(60)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    devices = {"kind": "pattern", "camera_shape": [32, 48], "speedup": 100.0}
    with LocalDaemon({"devices": devices}, tmp_path_factory.mktemp("raw")) as d:
        yield d


@pytest.fixture
def dealer(daemon):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(daemon.endpoint)
    yield sock
    sock.close()


def rpc(sock, method, params=None, rid="r1", timeout_ms=5000):
    sock.send(json.dumps({"v": 1, "id": rid, "method": method, "params": params or {}}).encode())
    assert sock.poll(timeout_ms), f"no reply to {method}"
    frames = sock.recv_multipart()
    return json.loads(frames[0]), frames[1:]


def documented_methods() -> list[str]:
    section = DOCS.read_text().split("## Methods")[1].split("## Shared models")[0]
    return re.findall(r"^### `([a-z_]+)`$", section, flags=re.M)


def documented_error_codes() -> set[str]:
    section = DOCS.read_text().split("## Error codes")[1].split("## Methods")[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M))


def test_status_reply_envelope_as_documented(dealer):
    reply, extra = rpc(dealer, "status", rid="abc")
    assert set(reply) == {"v", "id", "ok", "result"} and extra == []
    assert reply["v"] == 1 and reply["id"] == "abc" and reply["ok"] is True
    assert reply["result"]["state"] in ("idle", "running", "paused", "stopping")
    assert set(reply["result"]["counters"]) == {"jobs", "queue", "devices"}


def test_every_documented_method_answers_with_a_documented_shape(dealer):
    methods = documented_methods()
    assert "job_submit" in methods and "frame_get" in methods and "status" in methods
    codes = documented_error_codes()
    for m in methods:
        reply, _ = rpc(dealer, m, {"job_id": 999_999, "frame_id": 999_999, "plan": {}}, rid=m)
        assert reply["id"] == m and isinstance(reply["ok"], bool)
        if not reply["ok"]:
            assert reply["error"]["code"] in codes, reply
            assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]


def test_camera_acquire_array_frames_per_docs(dealer):
    reply, extra = rpc(dealer, "camera_acquire", {"exposure_s": 0.1})
    assert reply["ok"], reply
    (meta,) = reply["result"]["arrays"]
    assert meta["frame"] == 0 and meta["dtype"] == "<f4" and meta["shape"] == [32, 48]
    image = np.frombuffer(extra[meta["frame"]], dtype=meta["dtype"]).reshape(meta["shape"])
    assert image[3, 5] == 8.0  # the pattern ramp y + x
    frame_id = reply["result"]["frames"][0]["frame_id"]
    again, extra2 = rpc(dealer, "frame_get", {"frame_id": frame_id})
    assert again["ok"] and extra2[0] == extra[0]


def test_job_submit_and_poll_until_done(dealer):
    plan = {"kind": "scan_image", "size_px": [8, 8], "signals": ["HAADF"]}
    reply, _ = rpc(dealer, "job_submit", {"plan": plan})
    assert reply["ok"] and reply["result"]["job"]["state"] == "queued"
    job_id = reply["result"]["job"]["job_id"]
    for i in range(200):
        got, _ = rpc(dealer, "job_get", {"job_id": job_id}, rid=f"poll{i}")
        if got["result"]["job"]["state"] == "done":
            break
        dealer.poll(20)
    assert got["result"]["job"]["state"] == "done"
    assert got["result"]["job"]["output_file"].endswith(".hspy")


def test_pipelined_requests_are_matched_by_id(dealer):
    for i in range(20):
        dealer.send(json.dumps({"v": 1, "id": f"p{i}", "method": "status"}).encode())
    ids = set()
    for _ in range(20):
        assert dealer.poll(5000)
        ids.add(json.loads(dealer.recv_multipart()[0])["id"])
    assert ids == {f"p{i}" for i in range(20)}


def test_req_socket_is_served_too(daemon):
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.linger = 0
    sock.connect(daemon.endpoint)
    try:
        sock.send(b'{"v": 1, "id": "q", "method": "queue_list", "params": {}}')
        assert sock.poll(5000)
        reply = json.loads(sock.recv())
        assert reply["ok"] and reply["result"]["jobs"] == []
    finally:
        sock.close()


def test_events_on_the_pub_socket(daemon, dealer):
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"heartbeat")
    sub.connect(daemon.events_endpoint)
    try:
        assert sub.poll(5000), "no heartbeat within 5 s (default heartbeat_s = 2)"
        topic, body = sub.recv_multipart()
        event = json.loads(body)
        assert topic == b"heartbeat" and event["topic"] == "heartbeat" and event["v"] == 1
        assert {"seq", "time_s", "instance", "data"} <= set(event)
    finally:
        sub.close()
