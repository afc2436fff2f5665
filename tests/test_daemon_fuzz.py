"""Hypothesis fuzz of the request loop: every malformed request gets a well-formed error reply and
the next valid request is served (bounded: ~300 examples, a few seconds)."""

from __future__ import annotations

import json

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scherzer.clients.client import LocalDaemon
from scherzer.daemon.protocol import METHODS, ErrorCode

pytestmark = pytest.mark.timeout(120)
CODES = {str(c) for c in ErrorCode}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    devices = {"kind": "pattern", "camera_shape": [16, 16], "speedup": 1000.0}
    server = {"max_request_bytes": 65536}
    with LocalDaemon({"devices": devices, "server": server}, tmp_path_factory.mktemp("fz")) as d:
        yield d


@pytest.fixture(scope="module")
def sock(daemon):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.connect(daemon.endpoint)
    yield s
    s.close()


def _reply(sock) -> dict:
    assert sock.poll(5000), "no reply within 5 s"
    frames = sock.recv_multipart()
    while frames and frames[0] == b"":  # REQ-style delimiter echoed back
        frames = frames[1:]
    return json.loads(frames[0])


def exchange_then_check_alive(sock, frames: list[bytes]) -> dict:
    """Send junk, expect a well-formed reply, then a valid status must be served."""
    sock.send_multipart(frames)
    reply = _reply(sock)
    assert reply["v"] == 1 and isinstance(reply["ok"], bool) and "id" in reply
    if not reply["ok"]:
        err = reply["error"]
        assert err["code"] in CODES and isinstance(err["message"], str) and "details" in err
    sock.send(b'{"v":1,"id":"alive","method":"status","params":{}}')
    ok = _reply(sock)
    assert ok["id"] == "alive" and ok["ok"], ok
    return reply


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                       max_size=4),
    max_leaves=12,
)  # fmt: skip


@FUZZ
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=6))
def test_random_bytes_and_junk_multipart(sock, frames):
    exchange_then_check_alive(sock, frames)


@FUZZ
@given(json_values)
def test_any_json_value_as_request(sock, value):
    reply = exchange_then_check_alive(sock, [json.dumps(value).encode()])
    assert not reply["ok"]


@FUZZ
@given(
    v=st.one_of(st.just(1), json_values),
    rid=st.one_of(st.text(min_size=1, max_size=10), json_values),
    method=st.one_of(st.sampled_from(sorted(METHODS)), st.text(max_size=30), json_values),
    params=st.one_of(st.dictionaries(st.text(max_size=10), json_values, max_size=4), json_values),
    drop=st.sets(st.sampled_from(["v", "id", "method", "params"])),
)
def test_envelopes_with_wrong_types_missing_fields_and_unknown_methods(
    sock, v, rid, method, params, drop
):
    req = {"v": v, "id": rid, "method": method, "params": params}
    for key in drop:
        req.pop(key)
    if method in ("queue_pause",):  # a valid pause would hold the queue; not what we fuzz
        req["method"] = "status"
    reply = exchange_then_check_alive(sock, [json.dumps(req).encode()])
    if isinstance(rid, str) and "id" not in drop and not reply["ok"]:
        assert reply["id"] == rid  # the id is echoed whenever it could be read


@FUZZ
@given(st.sampled_from(sorted(METHODS)), st.lists(st.binary(max_size=50), min_size=1, max_size=3))
def test_valid_request_with_extra_binary_frames_is_refused(sock, method, extra):
    req = json.dumps({"v": 1, "id": "x", "method": method, "params": {}}).encode()
    reply = exchange_then_check_alive(sock, [req, *extra])
    if len(extra) <= 3 and method in METHODS:
        assert not reply["ok"] and reply["error"]["code"] in ("bad_request", "too_large")


def test_oversized_and_too_many_frames(sock):
    big = json.dumps({"v": 1, "id": "big", "method": "status", "params": {"x": "a" * 70000}})
    reply = exchange_then_check_alive(sock, [big.encode()])
    assert reply["error"]["code"] == "too_large" and reply["id"] is None
    assert reply["error"]["details"]["max_request_bytes"] == 65536
    many = [b'{"v":1,"id":"m","method":"status"}'] + [b"x"] * 10
    reply = exchange_then_check_alive(sock, many)
    assert reply["error"]["code"] == "too_large"


def test_specific_error_codes(sock):
    cases = [
        (b"\xff\xfe", "bad_request"),
        (b"[1,2]", "bad_request"),
        (b'{"v":2,"id":"a","method":"status"}', "unsupported_version"),
        (b'{"v":1,"id":"a","method":"__init__"}', "unknown_method"),
        (b'{"v":1,"id":"a","method":"job_get","params":{"job_id":"x"}}', "invalid_params"),
        (b'{"v":1,"id":"a","method":"job_get","params":{"job_id":12345}}', "not_found"),
        (b'{"v":1,"id":"a","method":"status","params":{},"extra":1}', "bad_request"),
        (b'{"v":1,"id":"a","method":"status","params":{"a":NaN}}', "bad_request"),
    ]
    for raw, code in cases:
        reply = exchange_then_check_alive(sock, [raw])
        assert reply["error"]["code"] == code, (raw, reply)
