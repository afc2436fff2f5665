"""Lens physics model, wire codec and the emulated controller on a real pseudo-terminal."""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import serial
from helpers import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scherzer.drivers.base import LensLimits, LimitExceeded
from scherzer.simulators.lens_controller import (
    EMULATOR_IDN,
    MAX_LINE_BYTES,
    ErrorCode,
    FrameError,
    LensControllerEmulator,
    LensModel,
    crc16_ccitt,
    decode_frame,
    encode_frame,
    parse_status,
)

pytestmark = pytest.mark.timeout(60)
#: Read timeout of the raw pyserial clients (s): a hang guard for replies that will come. No
#: test waits for a reply NOT to come: each proves it by what arrives next instead.
REPLY_GUARD_S = 20.0


class FakeClock:
    """Simulated seconds, advanced by hand."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make_model(**kwargs: object) -> tuple[LensModel, FakeClock]:
    clock = FakeClock()
    return LensModel(clock, np.random.default_rng(1), **kwargs), clock


# ----------------------------------------------------------------------------- physics
def test_settle_is_first_order_with_tau_settle_over_5() -> None:
    model, clock = make_model(settle_s=0.5, hysteresis_nm=0.0)
    model.set_defocus_nm(-200.0)
    assert model.true_defocus_nm() == pytest.approx(0.0)
    assert model.settle_remaining_s() == pytest.approx(0.5)
    clock.t += 0.1  # one time constant
    assert model.true_defocus_nm() == pytest.approx(-200.0 * (1 - math.exp(-1.0)), rel=1e-9)
    assert model.status()["settled"] is False
    clock.t += 0.4  # settle_s after the set: residual e^-5 of the step
    assert model.true_defocus_nm() == pytest.approx(-200.0 * (1 - math.exp(-5.0)), rel=1e-9)
    assert model.settle_remaining_s() == 0.0
    assert model.status()["settled"] is True


def test_hysteresis_depends_on_approach_direction() -> None:
    h = 2.0
    model, _ = make_model(settle_s=0.0, hysteresis_nm=h)
    model.set_defocus_nm(-500.0)
    model.set_defocus_nm(-100.0)  # approach -100 from below
    from_below = model.true_defocus_nm()
    model.set_defocus_nm(300.0)
    model.set_defocus_nm(-100.0)  # approach -100 from above
    from_above = model.true_defocus_nm()
    assert from_below == pytest.approx(-100.0 - h / 2)
    assert from_above == pytest.approx(-100.0 + h / 2)
    model.set_defocus_nm(-100.0 + 0.8 * h)  # reversal smaller than h: the focus does not move
    assert model.true_defocus_nm() == pytest.approx(from_above)
    assert model.defocus_setpoint_nm() == pytest.approx(-100.0 + 0.8 * h)
    model.set_defocus_nm(-100.0 + 1.5 * h)  # a larger reversal drags it along, h/2 behind
    assert model.true_defocus_nm() == pytest.approx(-100.0 + 1.5 * h - h / 2)


def test_focal_drift_accumulates_from_creation() -> None:
    model, clock = make_model(settle_s=0.0, hysteresis_nm=0.0, focal_drift_nm_per_s=0.3)
    model.set_defocus_nm(-50.0)
    clock.t += 20.0
    assert model.true_defocus_nm() == pytest.approx(-50.0 + 0.3 * 20.0)
    # the controller reads its coil, not the column: no drift in the read-back
    assert abs(model.readback_defocus_nm() + 50.0) < 2.0


def test_readback_noise_and_quantisation() -> None:
    model, clock = make_model(settle_s=0.01, readback_noise_nm=0.5)
    model.set_defocus_nm(-321.0)
    clock.t += 1.0
    values = np.array([model.readback_defocus_nm() for _ in range(4000)])
    assert np.allclose(values * 10.0, np.round(values * 10.0), atol=1e-6)  # 0.1 nm steps
    assert values.mean() == pytest.approx(-321.0, abs=0.05)  # 4000 samples: sem 0.008 nm
    assert values.std() == pytest.approx(0.5, rel=0.06)
    quiet, clock2 = make_model(settle_s=0.01, readback_noise_nm=0.0)
    quiet.set_defocus_nm(12.34)
    clock2.t += 1.0
    assert quiet.readback_defocus_nm() == pytest.approx(12.3)


def test_readback_follows_setpoint_not_hysteresis() -> None:
    model, _ = make_model(settle_s=0.0, hysteresis_nm=4.0, readback_noise_nm=0.0)
    model.set_defocus_nm(-100.0)
    assert model.readback_defocus_nm() == pytest.approx(-100.0)
    assert model.true_defocus_nm() == pytest.approx(-98.0)


@pytest.mark.parametrize("value", [-5000.1, 5000.1, math.nan, math.inf, "abc"])
def test_defocus_limits_change_nothing(value: object) -> None:
    model, _ = make_model(settle_s=0.0)
    model.set_defocus_nm(-40.0)
    with pytest.raises(LimitExceeded):
        model.set_defocus_nm(value)  # type: ignore[arg-type]
    assert model.defocus_setpoint_nm() == -40.0


def test_custom_limits_are_inclusive() -> None:
    model, _ = make_model(limits=LensLimits(defocus_nm=(-10.0, 10.0)))
    model.set_defocus_nm(10.0)
    with pytest.raises(LimitExceeded, match="outside the lens limits"):
        model.set_defocus_nm(10.01)


def test_stigmator_settles_with_two_fold_symmetry() -> None:
    model, clock = make_model(settle_s=0.2, readback_noise_nm=0.1)
    model.set_stigmator(30.0, 200.0)  # 200 deg == 20 deg for two-fold astigmatism
    assert model.true_stigmator()[0] == pytest.approx(0.0)
    assert model.settle_remaining_s() == pytest.approx(0.2)
    clock.t += 2.0
    magnitude, angle = model.true_stigmator()
    assert magnitude == pytest.approx(30.0, rel=1e-6)
    assert angle == pytest.approx(20.0, abs=1e-6)
    rb_mag, rb_angle = model.readback_stigmator()
    assert rb_mag == pytest.approx(30.0, abs=0.6)
    assert rb_angle == pytest.approx(20.0, abs=1.0)
    for bad in (-1.0, 500.1, math.nan):
        with pytest.raises(LimitExceeded):
            model.set_stigmator(bad, 0.0)
    assert model.status()["stigmator_setpoint"] == (30.0, 20.0)


def test_beam_tilt_immediate_and_limited_per_axis() -> None:
    model, _ = make_model()
    model.set_beam_tilt_mrad(3.5, -19.9)
    assert model.beam_tilt_mrad() == (3.5, -19.9)
    with pytest.raises(LimitExceeded, match="per axis"):
        model.set_beam_tilt_mrad(0.0, 20.5)
    assert model.beam_tilt_mrad() == (3.5, -19.9)


def test_model_is_thread_safe() -> None:
    model = LensModel(time.monotonic, np.random.default_rng(0), settle_s=0.001)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(300):
                model.set_defocus_nm(-(k * 300 + i) % 4000)
                model.readback_defocus_nm()
                model.true_defocus_nm()
                model.set_stigmator(float(i % 50), float(i))
                model.readback_stigmator()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert math.isfinite(model.true_defocus_nm())


# ----------------------------------------------------------------------------- codec
def test_crc16_ccitt_false_check_value() -> None:
    assert crc16_ccitt(b"123456789") == 0x29B1
    assert crc16_ccitt(b"") == 0xFFFF


def test_frame_round_trip_and_errors() -> None:
    line = encode_frame(42, "SET DEF -12.500")
    assert line.endswith(b"\r\n")
    frame = decode_frame(line[:-1])
    assert frame.seq == 42 and frame.words == ("SET", "DEF", "-12.500")
    assert decode_frame(encode_frame(None, "ERR 11 FRAMING x")[:-2]).seq is None
    bad_crc = line[:-6] + b"0000"
    with pytest.raises(FrameError) as exc:
        decode_frame(bad_crc)
    assert exc.value.code == ErrorCode.CHECKSUM and exc.value.seq == 42
    cases = {
        b"42 GET DEF": ErrorCode.FRAMING,
        b"42 GET DEF *12": ErrorCode.FRAMING,
        b"4\xff2 GET DEF *1234": ErrorCode.ENCODING,
        b"x" * MAX_LINE_BYTES: ErrorCode.LINE_TOO_LONG,
    }
    for raw, code in cases.items():
        with pytest.raises(FrameError) as exc:
            decode_frame(raw)
        assert exc.value.code == code, raw


def test_protocol_doc_examples_have_valid_crcs() -> None:
    doc = Path(__file__).resolve().parents[1] / "docs" / "lens-protocol.md"
    lines = [ln[3:] for ln in doc.read_text().splitlines() if ln.startswith(("-> ", "<- "))]
    assert len(lines) >= 8
    for line in lines:
        frame = decode_frame(line.encode("ascii"))
        assert frame.seq is not None, line


# ----------------------------------------------------------------------------- emulator
@pytest.fixture
def lens_clock() -> FakeClock:
    """The emulated lens's clock: settling advances only when a test says so (never with the
    wall clock, so a busy machine cannot make a read-back look settled or unsettled)."""
    return FakeClock()


@pytest.fixture
def emulator(lens_clock: FakeClock) -> LensControllerEmulator:
    model = LensModel(lens_clock, np.random.default_rng(3), settle_s=0.3)
    emu = LensControllerEmulator(model).start()
    yield emu
    emu.stop()


@pytest.fixture
def client(emulator: LensControllerEmulator) -> serial.Serial:
    port = serial.Serial(emulator.port, 115200, timeout=REPLY_GUARD_S)
    yield port
    port.close()


def ask(port: serial.Serial, seq: int, command: str) -> tuple[str, ...]:
    """Send one framed request and return the words of its reply (checked CRC and seq)."""
    port.write(encode_frame(seq, command))
    return reply_for(port, seq)


def next_reply(port: serial.Serial) -> tuple[int | None, tuple[str, ...]]:
    """(seq, words) of the very next line on the port (checked CRC)."""
    line = port.readline()
    assert line.endswith(b"\r\n"), f"no complete reply (got {line!r})"
    frame = decode_frame(line[:-1])
    return frame.seq, frame.words


def reply_for(port: serial.Serial, seq: int | None) -> tuple[str, ...]:
    """Read lines until the reply with ``seq``; fail if none comes within the port timeout."""
    while True:
        line = port.readline()
        assert line.endswith(b"\r\n"), f"no complete reply (got {line!r})"
        frame = decode_frame(line[:-1])
        if frame.seq == seq:
            return frame.words


def test_pyserial_client_gets_and_sets_defocus(
    emulator: LensControllerEmulator, client: serial.Serial, lens_clock: FakeClock
) -> None:
    assert ask(client, 1, "IDN") == ("OK", *EMULATOR_IDN.split())
    assert ask(client, 2, "SET DEF -250.0") == ("OK", "-250.000")
    assert emulator.model.defocus_setpoint_nm() == -250.0
    early = float(ask(client, 3, "GET DEF")[1])
    status = parse_status(ask(client, 4, "STATUS"))
    assert status["SETTLED"] == "0" and int(status["REMAIN_MS"]) > 0
    assert early > -240.0  # still on its way (settle 0.3 s)
    lens_clock.t += 0.35
    assert parse_status(ask(client, 5, "STATUS"))["SETTLED"] == "1"
    late = [float(ask(client, 10 + i, "GET DEF")[1]) for i in range(40)]
    # after settling: set-point + e^-5 residual (1.7 nm) + noise (0.2 nm) within 6 sigma
    assert all(abs(v + 250.0) < 1.7 + 1.2 for v in late)
    assert len(set(late)) > 1  # read-back noise is visible at 0.1 nm resolution
    assert np.mean(late) == pytest.approx(-250.0 + 250.0 * math.exp(-5.0), abs=1.2)


def test_stigmator_tilt_and_status_over_pty(
    emulator: LensControllerEmulator, client: serial.Serial, lens_clock: FakeClock
) -> None:
    assert ask(client, 1, "SET STIG 40 95") == ("OK", "40.000", "95.000")
    assert ask(client, 2, "SET TILT 1.5 -2.25") == ("OK", "1.5000", "-2.2500")
    assert ask(client, 3, "GET TILT") == ("OK", "1.5000", "-2.2500")
    lens_clock.t += 0.35
    _, magnitude, angle = ask(client, 4, "GET STIG")
    assert float(magnitude) == pytest.approx(40.0, abs=1.5)
    assert float(angle) == pytest.approx(95.0, abs=2.0)
    status = parse_status(ask(client, 5, "STATUS"))
    assert float(status["DEF_MIN"]) == -5000.0 and float(status["TILT_MAX"]) == 20.0


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("SET DEF 9000", ErrorCode.LIMIT),
        ("SET STIG 600 0", ErrorCode.LIMIT),
        ("SET TILT 0 -25", ErrorCode.LIMIT),
        ("FOCUS 12", ErrorCode.UNKNOWN_COMMAND),
        ("GET ZOOM", ErrorCode.UNKNOWN_COMMAND),
        ("SET DEF", ErrorCode.BAD_ARGS),
        ("SET DEF abc", ErrorCode.BAD_ARGS),
        ("SET DEF inf", ErrorCode.BAD_ARGS),
        ("SET STIG 1", ErrorCode.BAD_ARGS),
        ("GET DEF 5", ErrorCode.BAD_ARGS),
    ],
)
def test_bad_commands_get_error_replies(
    emulator: LensControllerEmulator, client: serial.Serial, command: str, code: ErrorCode
) -> None:
    words = ask(client, 77, command)
    assert words[:3] == ("ERR", str(int(code)), code.name)
    assert emulator.model.defocus_setpoint_nm() == 0.0  # nothing changed
    assert emulator.model.beam_tilt_mrad() == (0.0, 0.0)
    assert ask(client, 78, "IDN")[0] == "OK"


def test_malformed_lines_get_error_replies(client: serial.Serial) -> None:
    client.write(b"5 GET DEF *0000\r\n")
    assert reply_for(client, 5)[:2] == ("ERR", "10")  # checksum, seq still echoed
    client.write(b"GET DEF\r\n")
    assert reply_for(client, None)[:2] == ("ERR", "11")
    client.write(b"1 GET \xc3\xa9 *1234\r\n")
    assert reply_for(client, None)[:2] == ("ERR", "13")
    client.write(b"7" * 500 + b"\r\n")
    assert reply_for(client, None)[:2] == ("ERR", "12")
    client.write(b"\r\n\r\n")  # empty lines are ignored (no reply)
    assert ask(client, 6, "IDN")[0] == "OK"
    assert client.in_waiting == 0


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(junk=st.binary(max_size=400))
def test_fuzz_random_bytes_never_kill_the_emulator(
    emulator: LensControllerEmulator, client: serial.Serial, junk: bytes
) -> None:
    client.write(junk)
    client.write(b"\r\n")  # documented resynchronisation
    seq = 1000 + len(junk)
    words = ask(client, seq, "SET TILT 0.5 -0.25")
    assert words == ("OK", "0.5000", "-0.2500")
    assert ask(client, seq + 1, "GET TILT") == ("OK", "0.5000", "-0.2500")
    assert emulator.running
    client.reset_input_buffer()


def test_fault_injection_seen_by_a_raw_client(
    emulator: LensControllerEmulator, client: serial.Serial
) -> None:
    idn = ("OK", *EMULATOR_IDN.split())
    emulator.inject("corrupt")
    client.write(encode_frame(1, "IDN"))
    with pytest.raises(FrameError) as exc:
        decode_frame(client.readline()[:-1])
    assert exc.value.code == ErrorCode.CHECKSUM
    emulator.inject("drop")
    client.write(encode_frame(2, "SET DEF -10"))
    client.write(encode_frame(3, "IDN"))
    # the controller answers in order: the next reply is to request 3, so none came for 2
    assert next_reply(client) == (3, idn)
    assert emulator.model.defocus_setpoint_nm() == -10.0  # executed, only the reply was lost
    emulator.inject("partial")
    client.write(encode_frame(4, "IDN"))
    full = encode_frame(4, f"OK {EMULATOR_IDN}")
    partial = client.read(len(full) // 2)
    assert partial == full[: len(full) // 2]  # the first half, without its line end
    client.write(b"\r\n")
    emulator.inject("busy")
    # the next line is the BUSY reply: nothing more of the partial line came
    assert ask(client, 5, "SET DEF -20")[:3] == ("ERR", "40", "BUSY")
    assert emulator.model.defocus_setpoint_nm() == -10.0  # busy: not executed
    lines = emulator.lines
    emulator.inject("silent")
    client.write(encode_frame(6, "IDN"))
    wait_for(lambda: emulator.lines == lines + 1, REPLY_GUARD_S)  # heard while silent
    emulator.clear_faults()
    client.write(encode_frame(7, "IDN"))
    assert next_reply(client) == (7, idn)  # request 6 was never answered
    with pytest.raises(ValueError, match="unknown fault"):
        emulator.inject("explode")


def test_reply_delay(emulator: LensControllerEmulator, client: serial.Serial) -> None:
    emulator.set_reply_delay_s(0.25)
    t0 = time.monotonic()
    assert ask(client, 1, "IDN")[0] == "OK"
    assert time.monotonic() - t0 >= 0.25


def test_disconnect_and_reconnect_keep_the_port_name(emulator: LensControllerEmulator) -> None:
    port = serial.Serial(emulator.port, 115200, timeout=REPLY_GUARD_S)
    assert ask(port, 1, "SET DEF -75") == ("OK", "-75.000")
    emulator.disconnect()
    assert not os.path.exists(emulator.port)
    with pytest.raises(serial.SerialException):
        port.write(encode_frame(2, "IDN"))
        port.read(1)
    port.close()
    with pytest.raises(serial.SerialException):
        serial.Serial(emulator.port, 115200, timeout=REPLY_GUARD_S)
    emulator.reconnect()
    assert os.path.realpath(emulator.port) == emulator.device
    port = serial.Serial(emulator.port, 115200, timeout=REPLY_GUARD_S)
    assert ask(port, 3, "STATUS")[0] == "OK"
    assert emulator.model.defocus_setpoint_nm() == -75.0  # the controller kept its state
    port.close()


def test_stop_is_prompt_and_cleans_up() -> None:
    emu = LensControllerEmulator(seed=5).start()
    # a reply delay far beyond the test's hang guard: only an interrupted wait can end in time
    emu.set_reply_delay_s(3600.0)
    port = serial.Serial(emu.port, 115200, timeout=REPLY_GUARD_S)
    port.write(encode_frame(1, "IDN"))
    wait_for(lambda: emu.requests == 1, REPLY_GUARD_S)  # executed: its reply is being delayed
    emu.stop()
    assert not emu.running  # the serving thread ended inside its hour-long reply delay
    assert emu.replies == 0
    assert not os.path.exists(os.path.dirname(emu.port))
    port.close()
    with emu:  # restartable after stop()
        emu.set_reply_delay_s(0.0)
        port = serial.Serial(emu.port, 115200, timeout=REPLY_GUARD_S)
        assert ask(port, 2, "IDN")[0] == "OK"
        port.close()


def test_line_length_limit_is_128_bytes_including_crlf(client: serial.Serial) -> None:
    body = b"9 IDN"
    pad = MAX_LINE_BYTES - len(body) - len(b" *XXXX\r\n")
    fits = body + b" " * pad
    line = fits + b" *%04X\r\n" % crc16_ccitt(fits)
    assert len(line) == MAX_LINE_BYTES
    client.write(line)
    assert reply_for(client, 9)[0] == "OK"
    longer = fits + b" "
    client.write(longer + b" *%04X\r\n" % crc16_ccitt(longer))
    assert reply_for(client, None)[:3] == ("ERR", "12", "LINE_TOO_LONG")
    assert ask(client, 10, "IDN")[0] == "OK"
