"""Property test over every method and plan field (issue #13): whatever the values — ids beyond
SQLite's int64, 1e308, denormals, negative sizes, wrong types, paths — the daemon answers with a
well-formed reply whose error code is never ``internal``, and keeps serving.

A few hundred requests run in CI; the long run (≥ 20,000 requests, several minutes) is marked
slow and runs only with ``LONG_FUZZ=1`` (not part of ``make test``).
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scherzer.clients.client import LocalDaemon
from scherzer.daemon.plans import PLAN_MODELS
from scherzer.daemon.protocol import METHODS, ErrorCode

pytestmark = pytest.mark.timeout(1800)
CODES = {str(c) for c in ErrorCode}
LONG = os.environ.get("LONG_FUZZ") == "1"
#: Small limits so every accepted request is fast on the pattern devices.
LIMITS = {"max_scan_px": 64, "dwell_us": [0.05, 10.0], "max_exposure_s": 1.0, "max_frames": 40}

EXTREME_NUMBERS = st.sampled_from(
    [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1, 10**30,
     1e308, -1e308, 5e-324, 1e-300, 0.5, -0.0, 3600.0, 1e6, 1e12]
)  # fmt: skip
SCALARS = st.one_of(
    EXTREME_NUMBERS,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.sampled_from(["", "HAADF", "/etc/passwd", "../x", "a" * 300, "abort", "skip", "mtf.csv"]),
    st.text(max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _fields(model) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


@st.composite
def plans(draw) -> dict:
    model = draw(st.sampled_from(PLAN_MODELS))
    names = [n for n in _fields(model) if n != "kind"]
    plan = {"kind": model.model_fields["kind"].default}
    for name in draw(st.lists(st.sampled_from(names), max_size=6, unique=True)):
        if name == "processing":
            step = st.sampled_from(["align", "focal_register", "restore", "structure_image"])
            plan[name] = draw(
                st.lists(
                    st.one_of(
                        step,
                        st.fixed_dictionaries(
                            {"step": step}, optional={"mtf": VALUES, "nps": VALUES}
                        ),
                    ),
                    max_size=3,
                )
            )
        else:
            plan[name] = draw(VALUES)
    return plan


@st.composite
def requests(draw) -> tuple[str, dict]:
    method = draw(st.sampled_from(sorted(METHODS)))
    params: dict = {}
    for name in draw(st.lists(st.sampled_from(_fields(METHODS[method].params) or ["x"]),
                              max_size=4, unique=True)):  # fmt: skip
        params[name] = draw(plans()) if name == "plan" and draw(st.booleans()) else draw(VALUES)
    return method, params


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    config = {
        "devices": {"kind": "pattern", "camera_shape": [16, 16], "speedup": 1000.0},
        "limits": dict(LIMITS),
    }
    with LocalDaemon(config, tmp_path_factory.mktemp("props")) as d:
        yield d


@pytest.fixture(scope="module")
def sock(daemon):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.connect(daemon.endpoint)
    yield s
    s.close()


def _exchange(sock, method: str, params: dict) -> dict:
    rid = uuid.uuid4().hex
    body = {"v": 1, "id": rid, "method": method, "params": params}
    sock.send(json.dumps(body, allow_nan=False).encode())
    while True:
        assert sock.poll(30000), f"no reply to {method} {params!r} within 30 s"
        reply = json.loads(sock.recv_multipart()[0])
        if reply.get("id") == rid:
            return reply


def _check(daemon, sock, method: str, params: dict) -> None:
    reply = _exchange(sock, method, params)
    assert reply["v"] == 1 and isinstance(reply["ok"], bool)
    if not reply["ok"]:
        code = reply["error"]["code"]
        assert code in CODES and code != "internal", (method, params, reply["error"])
    assert daemon.proc.poll() is None, "the daemon died"


PROPERTY = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY
@given(requests())
def test_no_request_gets_an_internal_error(daemon, sock, request_):
    method, params = request_
    _check(daemon, sock, method, params)


@PROPERTY
@given(plans())
def test_no_plan_gets_an_internal_error(daemon, sock, plan):
    _check(daemon, sock, "plan_validate", {"plan": plan})
    _check(daemon, sock, "job_submit", {"plan": plan})


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="long fuzz: set LONG_FUZZ=1 (20,000 requests)")
@settings(PROPERTY, max_examples=20000, derandomize=False)
@given(requests())
def test_long_fuzz_over_every_method(daemon, sock, request_):
    method, params = request_
    _check(daemon, sock, method, params)


def test_the_daemon_still_serves_after_the_fuzz(daemon, sock):
    reply = _exchange(sock, "status", {})
    assert reply["ok"] and reply["result"]["state"] != "error", reply
