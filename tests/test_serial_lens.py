"""SerialLens driver against the emulated controller on a real pseudo-terminal (no mocks)."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
from helpers import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scherzer.drivers.base import (
    DeviceBusy,
    DeviceDisconnected,
    DeviceError,
    DeviceProtocolError,
    DeviceTimeout,
    Lens,
    LensLimits,
    LimitExceeded,
)
from scherzer.drivers.serial_lens import SerialLens
from scherzer.simulators.lens_controller import LensControllerEmulator, LensModel

#: Hang guard of every test here (s). No test measures how long a call took against a limit
#: (a busy machine stretches any time): each checks the mechanism instead (attempt counts and
#: their reasons, what reached the controller), and this guard catches a call that never ends.
HANG_GUARD_S = 60
pytestmark = pytest.mark.timeout(HANG_GUARD_S)

TIMEOUT_S = 0.2
RETRIES = 2
#: Generous driver timeout for replies that are only a little late (s): they must be accepted.
PATIENT_TIMEOUT_S = 5.0


class FakeClock:
    """The emulated lens's clock (s): settling advances only when a test says so, never with
    the wall clock, so a busy machine cannot make a read-back look settled or unsettled."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def lens_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def emulator(lens_clock: FakeClock) -> LensControllerEmulator:
    model = LensModel(
        lens_clock,
        np.random.default_rng(11),
        settle_s=0.1,
        hysteresis_nm=1.5,
        readback_noise_nm=0.2,
        limits=LensLimits(defocus_nm=(-3000.0, 3000.0)),
    )
    emu = LensControllerEmulator(model).start()
    yield emu
    emu.stop()


@pytest.fixture
def lens(emulator: LensControllerEmulator) -> SerialLens:
    driver = SerialLens(emulator.port, timeout_s=TIMEOUT_S, retries=RETRIES)
    yield driver
    driver.close()


def kinds(failures: list[str]) -> list[str]:
    """The kinds ('timeout', 'protocol', 'busy') of ``SerialLens.last_failures`` or of an
    error's ``details['attempts']``."""
    return [f.split(":", 1)[0] for f in failures]


def test_implements_lens_protocol_and_reads_controller_limits(lens: SerialLens) -> None:
    assert isinstance(lens, Lens)
    assert lens.limits == LensLimits(defocus_nm=(-3000.0, 3000.0))
    assert lens.identify().startswith("SCHERZER,LC-EMU")


def test_set_get_defocus_settles_to_setpoint(
    lens: SerialLens, emulator: LensControllerEmulator, lens_clock: FakeClock
) -> None:
    lens.set_defocus_nm(-480.0)
    assert emulator.model.defocus_setpoint_nm() == -480.0
    lens_clock.t += 0.1 / 5  # one time constant of the 0.1 s settle
    early = lens.get_defocus_nm()
    # on its way: 1 - e^-1 of the step, within the read-back noise (0.2 nm, 6 sigma)
    assert early == pytest.approx(-480.0 * (1.0 - math.exp(-1.0)), abs=1.3)
    status = lens.status()
    assert status["SETTLED"] == "0" and abs(int(status["REMAIN_MS"]) - 80) <= 1
    lens_clock.t += 0.08  # the rest of the settle time
    lens.wait_settled(timeout_s=HANG_GUARD_S / 2)
    assert emulator.model.settle_remaining_s() == 0.0
    readings = [lens.get_defocus_nm() for _ in range(30)]
    # e^-5 residual of the step (3.2 nm) plus read-back noise (0.2 nm, 6 sigma)
    assert all(abs(r + 480.0) <= 480.0 * math.exp(-5.0) + 1.3 for r in readings)
    assert len(set(readings)) > 1  # noise is visible
    # the true focus carries the hysteresis offset (approached from above: +h/2)
    lens_clock.t += 0.2
    assert emulator.model.true_defocus_nm() == pytest.approx(-480.0 + 0.75, abs=0.05)


def test_stigmator_and_beam_tilt_round_trip(
    lens: SerialLens, emulator: LensControllerEmulator, lens_clock: FakeClock
) -> None:
    lens.set_stigmator(25.0, 190.0)
    lens.set_beam_tilt_mrad(-3.25, 7.5)
    lens_clock.t += 0.1  # the settle time
    lens.wait_settled(timeout_s=HANG_GUARD_S / 2)
    magnitude, angle = lens.get_stigmator()
    assert magnitude == pytest.approx(25.0, abs=1.5)
    assert angle == pytest.approx(10.0, abs=2.0)
    assert lens.get_beam_tilt_mrad() == (-3.25, 7.5)
    assert emulator.model.beam_tilt_mrad() == (-3.25, 7.5)


def test_local_limits_refuse_without_sending(
    lens: SerialLens, emulator: LensControllerEmulator
) -> None:
    sent = emulator.requests
    with pytest.raises(LimitExceeded, match="outside the lens limits"):
        lens.set_defocus_nm(-3500.0)
    with pytest.raises(LimitExceeded):
        lens.set_stigmator(-1.0, 0.0)
    with pytest.raises(LimitExceeded):
        lens.set_beam_tilt_mrad(float("nan"), 0.0)
    assert emulator.requests == sent
    assert emulator.model.defocus_setpoint_nm() == 0.0


def test_controller_limits_become_limit_exceeded(emulator: LensControllerEmulator) -> None:
    wide = LensLimits(defocus_nm=(-9000.0, 9000.0))
    with SerialLens(emulator.port, timeout_s=TIMEOUT_S, limits=wide) as driver:
        with pytest.raises(LimitExceeded, match="refused") as exc:
            driver.set_defocus_nm(4000.0)
        assert emulator.port in str(exc.value)
        assert emulator.model.defocus_setpoint_nm() == 0.0
        driver.set_defocus_nm(2000.0)  # still usable
        assert emulator.model.defocus_setpoint_nm() == 2000.0


def test_reply_delay_beyond_timeout_raises_timeout_after_bounded_attempts(
    lens: SerialLens, emulator: LensControllerEmulator
) -> None:
    requests, replies = emulator.requests, emulator.replies
    emulator.set_reply_delay_s(TIMEOUT_S * 3)
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout) as exc:
        lens.get_defocus_nm()
    # each attempt waited out its timeout (an attempt cannot give up early)
    assert time.monotonic() - t0 >= (RETRIES + 1) * TIMEOUT_S
    # bounded: every attempt, then it gave up; the last one heard nothing (an earlier one may
    # have caught the start of a late reply to its predecessor as its deadline passed)
    attempts = kinds(exc.value.details["attempts"])
    assert len(attempts) == RETRIES + 1 and attempts[-1] == "timeout", attempts
    message = str(exc.value)
    assert emulator.port in message and "3 attempts" in message and "powered" in message
    # every attempt reached the controller
    wait_for(lambda: emulator.requests == requests + RETRIES + 1, HANG_GUARD_S / 2)
    emulator.set_reply_delay_s(0.0)
    # the late replies come out (the controller answers one request at a time); the driver
    # must not take any of them for the answer to its next request
    wait_for(lambda: emulator.replies == replies + RETRIES + 1, HANG_GUARD_S / 2)
    assert abs(lens.get_defocus_nm()) < 1.0


def test_reply_delay_within_the_timeout_is_fine(emulator: LensControllerEmulator) -> None:
    emulator.set_reply_delay_s(0.05)  # a slow controller, well inside the driver's patience
    with SerialLens(emulator.port, timeout_s=PATIENT_TIMEOUT_S, retries=0) as lens:
        lens.set_defocus_nm(-10.0)  # one attempt only: the late reply itself was accepted
        assert lens.last_failures == []
    assert emulator.model.defocus_setpoint_nm() == -10.0


def test_one_corrupt_checksum_is_retried_and_succeeds(
    lens: SerialLens, emulator: LensControllerEmulator
) -> None:
    emulator.inject("corrupt", count=RETRIES)
    assert lens.get_beam_tilt_mrad() == (0.0, 0.0)
    # each CRC error was seen as one (at once, not as a reply that never came)
    assert kinds(lens.last_failures) == ["protocol"] * RETRIES
    assert all("corrupt reply" in f for f in lens.last_failures), lens.last_failures


def test_persistent_corrupt_checksum_raises_protocol_error(
    lens: SerialLens, emulator: LensControllerEmulator
) -> None:
    emulator.inject("corrupt", count=RETRIES + 1)
    with pytest.raises(DeviceProtocolError, match="CRC mismatch") as exc:
        lens.get_defocus_nm()
    assert len(exc.value.details["attempts"]) == RETRIES + 1
    assert lens.get_defocus_nm() == pytest.approx(0.0, abs=1.0)  # next call is fine


def test_partial_lines_raise_protocol_error(
    lens: SerialLens, emulator: LensControllerEmulator
) -> None:
    emulator.inject("partial", count=RETRIES + 1)
    with pytest.raises(DeviceProtocolError, match="partial line") as exc:
        lens.get_defocus_nm()
    attempts = exc.value.details["attempts"]  # bounded: every attempt, then it gave up
    assert len(attempts) == RETRIES + 1 and all("partial line" in a for a in attempts), attempts
    emulator.inject("partial")
    assert lens.get_beam_tilt_mrad() == (0.0, 0.0)  # one partial line: the retry succeeds
    assert len(lens.last_failures) == 1 and "partial line" in lens.last_failures[0]


def test_dropped_reply_retried(lens: SerialLens, emulator: LensControllerEmulator) -> None:
    emulator.inject("drop")
    lens.set_defocus_nm(-42.0)
    assert emulator.model.defocus_setpoint_nm() == -42.0


def test_busy_controller(lens: SerialLens, emulator: LensControllerEmulator) -> None:
    emulator.inject("busy")
    lens.set_defocus_nm(-5.0)  # busy once: retried after the back-off
    assert emulator.model.defocus_setpoint_nm() == -5.0
    emulator.inject("busy", count=RETRIES + 1)
    with pytest.raises(DeviceBusy, match="busy"):
        lens.set_defocus_nm(-6.0)
    assert emulator.model.defocus_setpoint_nm() == -5.0


def test_silent_controller_times_out_then_recovers(
    lens: SerialLens, emulator: LensControllerEmulator
) -> None:
    emulator.inject("silent")
    with pytest.raises(DeviceTimeout) as exc:
        lens.wait_settled(HANG_GUARD_S / 2)
    # the STATUS exchange timed out after its attempts: wait_settled did not go on polling a
    # silent controller until its own (long) timeout
    assert "did not settle" not in str(exc.value)
    assert kinds(exc.value.details["attempts"]) == ["timeout"] * (RETRIES + 1)
    emulator.clear_faults()
    lens.wait_settled(timeout_s=HANG_GUARD_S / 2)


def test_wait_settled_times_out_on_a_slow_lens(lens_clock: FakeClock) -> None:
    model = LensModel(lens_clock, np.random.default_rng(0), settle_s=30.0)  # time stands still
    with LensControllerEmulator(model) as emu, SerialLens(emu.port, timeout_s=TIMEOUT_S) as lens:
        lens.set_defocus_nm(-100.0)
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match=r"did not settle within 0\.3 s") as exc:
            lens.wait_settled(0.3)
        assert time.monotonic() - t0 >= 0.3  # it waited its timeout (it cannot end earlier)
        assert "controller reports 30000 ms left" in str(exc.value)
        assert exc.value.details["status"]["SETTLED"] == "0"


def test_port_closed_mid_use_then_same_driver_reconnects(
    lens: SerialLens, emulator: LensControllerEmulator, lens_clock: FakeClock
) -> None:
    lens.set_defocus_nm(-150.0)
    emulator.disconnect()
    with pytest.raises(DeviceDisconnected) as exc:
        lens.get_defocus_nm()
    # the port error ends the call at once: no attempt waited for a reply and timed out
    assert lens.last_failures == []
    assert emulator.port in str(exc.value) and "cable" in str(exc.value)
    with pytest.raises(DeviceDisconnected, match="cannot open"):
        lens.set_defocus_nm(-160.0)  # still gone
    emulator.reconnect()
    lens_clock.t += 0.1  # the settle time
    lens.wait_settled(timeout_s=HANG_GUARD_S / 2)
    assert lens.get_defocus_nm() == pytest.approx(-150.0, abs=1.5)
    lens.set_defocus_nm(-170.0)
    assert emulator.model.defocus_setpoint_nm() == -170.0


def test_port_bounced_between_calls_is_invisible(
    lens: SerialLens, emulator: LensControllerEmulator
) -> None:
    lens.set_beam_tilt_mrad(1.0, 1.0)
    emulator.disconnect()
    emulator.reconnect()
    assert lens.get_beam_tilt_mrad() == (1.0, 1.0)


def test_missing_port_at_construction() -> None:
    with pytest.raises(DeviceDisconnected, match="cannot open lens controller port /nonexistent"):
        SerialLens("/nonexistent/tty-lens", timeout_s=TIMEOUT_S)


def test_unknown_command_is_a_protocol_error_without_retries(
    lens: SerialLens, emulator: LensControllerEmulator
) -> None:
    errors_before = emulator.errors
    with pytest.raises(DeviceProtocolError, match="disagree on the protocol"):
        lens._exchange("WARP 9")  # a firmware mismatch, reached through the private path
    assert emulator.errors == errors_before + 1  # sent once, not retried


def test_close_is_bounded_even_while_another_thread_waits(
    lens: SerialLens, emulator: LensControllerEmulator
) -> None:
    emulator.inject("silent")
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(lens.get_defocus_nm())
        except DeviceError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    wait_for(lambda: emulator.lines >= 1, HANG_GUARD_S / 4)  # the request is on the line
    closer = threading.Thread(target=lens.close)
    closer.start()
    closer.join(timeout=HANG_GUARD_S / 4)  # a hang guard: close waits at most one exchange
    worker.join(timeout=HANG_GUARD_S / 4)
    assert not closer.is_alive() and not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], (DeviceTimeout, DeviceDisconnected))
    assert lens._serial is None  # the port was released
    with pytest.raises(DeviceDisconnected, match="was closed"):
        lens.get_defocus_nm()


def test_concurrent_callers_each_get_their_own_reply(
    lens: SerialLens, emulator: LensControllerEmulator
) -> None:
    lens.set_beam_tilt_mrad(2.5, -1.5)
    results: list[object] = []

    def worker() -> None:
        for _ in range(50):
            results.append(lens.get_beam_tilt_mrad())
            results.append(lens.status()["TILT_MAX"])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20.0)
    assert len(results) == 400
    assert results.count((2.5, -1.5)) == 200
    assert results.count("20.000") == 200


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(noise=st.binary(min_size=1, max_size=300))
def test_line_noise_from_the_controller_gives_value_or_device_error(
    lens: SerialLens, emulator: LensControllerEmulator, noise: bytes
) -> None:
    """Random bytes on the line: the driver returns the right value or a DeviceError, quickly."""
    lens.set_beam_tilt_mrad(1.25, -0.5)
    emulator.emit_raw(noise, before_next_reply=True)
    try:
        value = lens.get_beam_tilt_mrad()
    except DeviceError as exc:
        attempts = (exc.details or {}).get("attempts", [])
        assert len(attempts) <= RETRIES + 1  # bounded: it gave up after its attempts
    else:
        assert value == (1.25, -0.5)
        assert len(lens.last_failures) <= RETRIES
    assert lens.get_beam_tilt_mrad() == (1.25, -0.5)  # the next call is clean
