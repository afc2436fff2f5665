"""SerialLens driver against the emulated controller on a real pseudo-terminal (no mocks)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
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
from scherzer.drivers.serial_lens import BUSY_BACKOFF_S, SerialLens
from scherzer.simulators.lens_controller import LensControllerEmulator, LensModel

pytestmark = pytest.mark.timeout(30)

TIMEOUT_S = 0.2
RETRIES = 2
#: Documented bound of one exchange at 115200 baud:
#: (retries + 1) * (timeout + 50 ms poll + 22 ms line grace + busy back-off).
EXCHANGE_BOUND_S = (RETRIES + 1) * (TIMEOUT_S + 0.05 + 0.022 + BUSY_BACKOFF_S)


@pytest.fixture
def emulator() -> LensControllerEmulator:
    model = LensModel(
        time.monotonic,
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


def timed(fn: Callable[..., object], *args: object) -> tuple[object, float]:
    """Call ``fn``; return (result, seconds) or re-raise with ``elapsed_s`` on the exception."""
    t0 = time.monotonic()
    try:
        return fn(*args), time.monotonic() - t0
    except Exception as exc:
        exc.elapsed_s = time.monotonic() - t0  # type: ignore[attr-defined]
        raise


def test_implements_lens_protocol_and_reads_controller_limits(lens: SerialLens) -> None:
    assert isinstance(lens, Lens)
    assert lens.limits == LensLimits(defocus_nm=(-3000.0, 3000.0))
    assert lens.identify().startswith("SCHERZER,LC-EMU")


def test_set_get_defocus_settles_to_setpoint(
    lens: SerialLens, emulator: LensControllerEmulator
) -> None:
    lens.set_defocus_nm(-480.0)
    assert emulator.model.defocus_setpoint_nm() == -480.0
    early = lens.get_defocus_nm()
    assert early > -470.0  # settle 0.1 s: the read-back is still on its way
    lens.wait_settled(timeout_s=2.0)
    assert emulator.model.settle_remaining_s() == 0.0
    readings = [lens.get_defocus_nm() for _ in range(30)]
    # e^-5 residual of the step (3.2 nm) plus read-back noise (0.2 nm, 6 sigma)
    assert all(abs(r + 480.0) <= 480.0 * math.exp(-5.0) + 1.3 for r in readings)
    assert len(set(readings)) > 1  # noise is visible
    # the true focus carries the hysteresis offset (approached from above: +h/2)
    time.sleep(0.2)
    assert emulator.model.true_defocus_nm() == pytest.approx(-480.0 + 0.75, abs=0.05)


def test_stigmator_and_beam_tilt_round_trip(
    lens: SerialLens, emulator: LensControllerEmulator
) -> None:
    lens.set_stigmator(25.0, 190.0)
    lens.set_beam_tilt_mrad(-3.25, 7.5)
    lens.wait_settled(timeout_s=2.0)
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


def test_reply_delay_beyond_timeout_raises_timeout_in_bounded_time(
    lens: SerialLens, emulator: LensControllerEmulator
) -> None:
    emulator.set_reply_delay_s(TIMEOUT_S * 3)
    with pytest.raises(DeviceTimeout) as exc:
        timed(lens.get_defocus_nm)
    elapsed = exc.value.elapsed_s  # type: ignore[attr-defined]
    assert (RETRIES + 1) * TIMEOUT_S <= elapsed <= EXCHANGE_BOUND_S + 0.3
    message = str(exc.value)
    assert emulator.port in message and "3 attempts" in message and "powered" in message
    emulator.set_reply_delay_s(0.0)
    time.sleep(TIMEOUT_S * 3 * 2)  # let the late replies drain; the driver must skip them
    assert abs(lens.get_defocus_nm()) < 1.0


def test_short_reply_delay_is_fine(lens: SerialLens, emulator: LensControllerEmulator) -> None:
    emulator.set_reply_delay_s(TIMEOUT_S / 4)
    lens.set_defocus_nm(-10.0)
    assert emulator.model.defocus_setpoint_nm() == -10.0


def test_one_corrupt_checksum_is_retried_and_succeeds(
    lens: SerialLens, emulator: LensControllerEmulator
) -> None:
    emulator.inject("corrupt", count=RETRIES)
    value, elapsed = timed(lens.get_beam_tilt_mrad)
    assert value == (0.0, 0.0)
    assert elapsed < TIMEOUT_S  # a CRC error is detected at once, no timeout wait


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
        timed(lens.get_defocus_nm)
    assert exc.value.elapsed_s <= EXCHANGE_BOUND_S + 0.3  # type: ignore[attr-defined]
    emulator.inject("partial")
    assert lens.get_beam_tilt_mrad() == (0.0, 0.0)  # one partial line: the retry succeeds


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
        timed(lens.wait_settled, 5.0)
    assert exc.value.elapsed_s <= EXCHANGE_BOUND_S + 0.3  # type: ignore[attr-defined]
    emulator.clear_faults()
    lens.wait_settled(timeout_s=1.0)


def test_wait_settled_times_out_on_a_slow_lens() -> None:
    model = LensModel(time.monotonic, np.random.default_rng(0), settle_s=30.0)
    with LensControllerEmulator(model) as emu, SerialLens(emu.port, timeout_s=TIMEOUT_S) as lens:
        lens.set_defocus_nm(-100.0)
        with pytest.raises(DeviceTimeout, match="did not settle") as exc:
            timed(lens.wait_settled, 0.3)
        assert 0.3 <= exc.value.elapsed_s <= 0.3 + EXCHANGE_BOUND_S  # type: ignore[attr-defined]


def test_port_closed_mid_use_then_same_driver_reconnects(
    lens: SerialLens, emulator: LensControllerEmulator
) -> None:
    lens.set_defocus_nm(-150.0)
    emulator.disconnect()
    with pytest.raises(DeviceDisconnected) as exc:
        timed(lens.get_defocus_nm)
    assert exc.value.elapsed_s < 1.0  # type: ignore[attr-defined]
    assert emulator.port in str(exc.value) and "cable" in str(exc.value)
    with pytest.raises(DeviceDisconnected, match="cannot open"):
        lens.set_defocus_nm(-160.0)  # still gone
    emulator.reconnect()
    lens.wait_settled(timeout_s=2.0)
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
    time.sleep(0.05)
    _, elapsed = timed(lens.close)
    worker.join(timeout=5.0)
    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], (DeviceTimeout, DeviceDisconnected))
    assert elapsed <= EXCHANGE_BOUND_S + 0.3
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
    t0 = time.monotonic()
    try:
        value = lens.get_beam_tilt_mrad()
    except DeviceError:
        pass
    else:
        assert value == (1.25, -0.5)
    assert time.monotonic() - t0 <= EXCHANGE_BOUND_S + 0.3
    assert lens.get_beam_tilt_mrad() == (1.25, -0.5)  # the next call is clean
