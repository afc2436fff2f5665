"""Protocol models, docs/protocol.md in step with them, the dispatch table, settings and plans."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from scherzer.config import ConfigError, Settings, is_loopback_endpoint, load_settings
from scherzer.daemon import protocol as P
from scherzer.daemon.plans import CameraImage, ScanImage, parse_plan
from scherzer.stack import FrameRecord

DOCS = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def test_docs_are_generated_from_the_models_and_up_to_date():
    assert DOCS.read_text() == P.protocol_markdown(), (
        "docs/protocol.md is stale: run `python -m scherzer.daemon.protocol > docs/protocol.md`"
    )


def test_docs_have_a_section_per_method_and_every_error_code():
    text = DOCS.read_text()
    methods = text.split("## Methods")[1].split("## Shared models")[0]
    assert re.findall(r"^### `([a-z_]+)`$", methods, flags=re.M) == list(P.METHODS)
    for code in P.ErrorCode:
        assert f"| `{code}` |" in text


def test_dispatch_table_is_exactly_the_documented_methods(tmp_path):
    from scherzer.daemon.server import Daemon

    daemon = Daemon(Settings(data_dir=tmp_path))
    assert set(daemon.dispatch) == set(P.METHODS)
    assert all(callable(h) for h in daemon.dispatch.values())


def test_device_error_codes_are_protocol_error_codes():
    from scherzer.drivers import base

    for cls in (base.DeviceError, base.DeviceTimeout, base.DeviceDisconnected,
                base.LimitExceeded, base.DeviceBusy, base.DeviceProtocolError):  # fmt: skip
        assert P.ErrorCode(cls.code)


def test_request_envelope_validation():
    req = P.Request.model_validate({"v": 1, "id": "a", "method": "status"})
    assert req.params == {}
    bad_envelopes = (
        {"v": 1, "id": "", "method": "status"},
        {"v": 1, "id": "a" * 200, "method": "x"},
        {"v": 1, "id": "a", "method": "status", "extra": 1},
        {"id": "a", "method": "s"},
    )
    for bad in bad_envelopes:
        with pytest.raises(ValidationError):
            P.Request.model_validate(bad)


def test_replies_and_json_encoding():
    ok = P.ok_reply("x", P.QueueStateResult(paused=True))
    assert ok == {"v": 1, "id": "x", "ok": True, "result": {"paused": True}}
    err = P.error_reply(None, P.ErrorCode.BUSY, "m", {"a": 1})
    assert err["error"] == {"code": "busy", "message": "m", "details": {"a": 1}}
    with pytest.raises(ValueError):
        P.encode_json({"x": math.nan})
    with pytest.raises(P.ProtocolError) as e:
        P.decode_json(b'{"a": Infinity}')
    assert e.value.code == P.ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("dtype", [np.float32, np.complex64, np.uint16, ">f8"])
def test_arrays_round_trip_through_raw_buffers(dtype):
    arr = (np.arange(12).reshape(3, 4) * 1.5).astype(dtype)
    meta = P.array_meta(arr, 0, "x")
    assert meta.dtype.startswith("<") or meta.dtype.startswith("|")
    back = P.array_from_buffer(meta, bytes(P.array_to_buffer(arr)))
    np.testing.assert_array_equal(back, arr)
    with pytest.raises(ValueError, match="bytes"):
        P.array_from_buffer(meta, b"123")


def test_record_model_maps_nan_to_null():
    rec = P.record_model(FrameRecord(index=2, time_s=1.0, defocus_nominal_nm=-5.0))
    assert rec.defocus_nominal_nm == -5.0 and rec.dwell_us is None and rec.index == 2


def test_roles():
    assert P.Role.OPERATOR.allows(P.Role.OBSERVER) and P.Role.OPERATOR.allows(P.Role.OPERATOR)
    assert P.Role.OBSERVER.allows(P.Role.OBSERVER)
    assert not P.Role.OBSERVER.allows(P.Role.OPERATOR)
    read_only = {m for m, s in P.METHODS.items() if s.role == P.Role.OBSERVER}
    assert "job_submit" not in read_only and "lens_set" not in read_only
    assert {"status", "job_get", "queue_list", "history_list", "frame_get"} <= read_only


# --- plans ------------------------------------------------------------------------------------
def test_plans_parse_by_kind_and_expand_into_steps():
    plan = parse_plan({"kind": "camera_image", "exposure_s": 0.5, "repeat": 3, "defocus_nm": -9})
    assert isinstance(plan, CameraImage)
    steps = list(plan.steps())
    assert [s.index for s in steps] == [0, 1, 2]
    assert [s.defocus_nm for s in steps] == [-9, None, None]
    scan = parse_plan({"kind": "scan_image", "signals": ["HAADF", "ABF"], "size_px": [10, 20]})
    assert isinstance(scan, ScanImage) and scan.signals() == ("HAADF", "ABF")
    assert scan.frame_time_s() == pytest.approx(10 * (20 * 2.0 + 200.0) * 1e-6)
    est = scan.estimate((512, 512))
    assert est.disk_bytes == 10 * 20 * 4 * 2 and est.frames == 1


def test_plan_problems_and_schema_errors():
    limits = Settings().limits
    plan = CameraImage(exposure_s=100.0, region=(0, 0, 600, 10), defocus_nm=-1e4)
    problems = plan.problems(limits, (512, 512))
    assert len(problems) == 3 and any("region" in p for p in problems)
    with pytest.raises(ValidationError, match="unknown processing"):
        parse_plan({"kind": "camera_image", "processing": ["align"]})
    with pytest.raises(ValidationError):
        parse_plan({"kind": "camera_image", "exposure_s": -1})


# --- settings ---------------------------------------------------------------------------------
def test_settings_from_toml_with_env_overrides(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('data_dir = "/x"\n[server]\nendpoint = "tcp://127.0.0.1:7000"\n'
                    '[devices]\nspeedup = 5.0\ncamera_shape = [64, 32]\n')  # fmt: skip
    env = {"SCHERZER_DEVICES__SPEEDUP": "50", "SCHERZER_SERVER__LOCAL_ROLE": "observer",
           "OTHER": "1"}  # fmt: skip
    s = load_settings(path, env=env)
    assert s.server.endpoint == "tcp://127.0.0.1:7000" and s.devices.camera_shape == (64, 32)
    assert s.devices.speedup == 50.0 and s.server.local_role == "observer"
    assert str(s.data_dir) == "/x"


def test_settings_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "none.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[devices]\nspeedup = -1\n")
    with pytest.raises(ConfigError, match=r"devices\.speedup"):
        load_settings(bad, env={})
    with pytest.raises(ConfigError, match="serial_port"):
        load_settings(None, env={"SCHERZER_DEVICES__LENS": "serial"})
    with pytest.raises(ConfigError, match=r"unknown_field|Extra inputs"):
        load_settings(None, env={"SCHERZER_SERVER__UNKNOWN_FIELD": "1"})


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [("tcp://127.0.0.1:5577", True), ("tcp://localhost:1", True), ("tcp://[::1]:1", True),
     ("ipc:///tmp/x", True), ("tcp://0.0.0.0:5577", False), ("tcp://*:5577", False),
     ("tcp://10.0.0.2:1", False)],
)  # fmt: skip
def test_loopback_detection(endpoint, loopback):
    assert is_loopback_endpoint(endpoint) is loopback


def test_remote_bind_requires_curve_keys():
    s = load_settings(None, env={"SCHERZER_SERVER__ENDPOINT": "tcp://0.0.0.0:5577"})
    assert s.needs_curve()
    with pytest.raises(ConfigError, match="not loopback"):
        s.check_security()
    local = Settings()
    assert not local.needs_curve()
    local.check_security()
