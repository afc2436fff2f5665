"""Lens driver for the Scherzer lens-controller line protocol over a serial port (pyserial).

Units: defocus and stigmator magnitude in nm, stigmator angle in degrees, beam tilt in mrad,
times in seconds. The wire protocol (framing, CRC-16/CCITT-FALSE, commands, error codes) is in
``docs/lens-protocol.md``; the codec is shared with the emulator in
:mod:`scherzer.simulators.lens_controller`.

Time bounds. One exchange (request + reply) makes at most ``retries + 1`` attempts. Each attempt
waits at most ``timeout_s`` for its reply, plus one poll interval (at most 50 ms), plus -- only if
a line is arriving just as the deadline passes -- a grace of two line times at the baud rate
(at least ``LINE_GRACE_MIN_S`` = 20 ms; 22 ms at 115200 baud). A ``BUSY`` reply waits
``BUSY_BACKOFF_S`` before the next attempt. So at 115200 baud every call returns or raises within
``(retries + 1) * (timeout_s + 0.05 + 0.022 + BUSY_BACKOFF_S)`` seconds (1.87 s with the
defaults), plus one more attempt when an open port failed and was reopened within the call;
:meth:`SerialLens.wait_settled` adds its own ``timeout_s``. Nothing blocks forever, not
even :meth:`SerialLens.close`.

Failures (all :class:`~scherzer.drivers.base.DeviceError`):

* no complete reply in time on every attempt -> :class:`DeviceTimeout`;
* corrupt replies (CRC, framing, a partial line, a foreign sequence number) or ``ERR`` 10-13 from
  the controller (it got a damaged request) on every attempt -> :class:`DeviceProtocolError`;
  ``ERR`` 20/21 (unknown command, bad arguments) -> :class:`DeviceProtocolError` at once;
* ``ERR 30 LIMIT`` -> :class:`LimitExceeded` (limits are also checked locally first);
* ``ERR 40 BUSY`` on every attempt -> :class:`DeviceBusy`;
* the port cannot be opened or fails mid-exchange -> :class:`DeviceDisconnected`. The next call
  reopens the port by name; when an already-open port fails, the driver reopens it once within
  the same call, so a controller that came back between two calls just works.

The last failure of an exchange decides the exception type. Retried requests are idempotent
(``SET`` of the same value twice leaves the lens where one ``SET`` did).
"""

from __future__ import annotations

import math
import termios
import threading
import time
from collections import deque
from dataclasses import dataclass

import serial
import structlog

from scherzer.drivers.base import (
    DeviceBusy,
    DeviceDisconnected,
    DeviceError,
    DeviceProtocolError,
    DeviceTimeout,
    LensLimits,
    LimitExceeded,
)
from scherzer.simulators.lens_controller import (
    MAX_LINE_BYTES,
    SEQ_MODULUS,
    ErrorCode,
    Frame,
    FrameError,
    check_beam_tilt_mrad,
    check_defocus_nm,
    check_stigmator,
    decode_frame,
    encode_frame,
    parse_number,
    parse_status,
)

__all__ = ["BUSY_BACKOFF_S", "LINE_GRACE_MIN_S", "SerialLens"]

_log = structlog.get_logger(__name__)

#: Wait before retrying after a BUSY reply (s).
BUSY_BACKOFF_S = 0.05
#: Least extra wait for a line that is arriving when the reply deadline passes (s).
LINE_GRACE_MIN_S = 0.02
#: Longest single blocking read (s); the exchange deadline is checked between reads.
_POLL_S = 0.05
#: Errors that mean the port itself failed (not the controller's answer).
_PORT_ERRORS = (serial.SerialException, OSError, termios.error)
#: Controller error codes that mean "your request arrived damaged": worth a retry.
_RETRYABLE_CODES = {ErrorCode.CHECKSUM, ErrorCode.FRAMING, ErrorCode.LINE_TOO_LONG}
_RETRYABLE_CODES |= {ErrorCode.ENCODING}


@dataclass
class _Failure:
    """Why one attempt failed: kind is 'timeout', 'protocol' or 'busy'."""

    kind: str
    detail: str


class _AttemptFailed(Exception):
    def __init__(self, failure: _Failure) -> None:
        super().__init__(failure.detail)
        self.failure = failure


class SerialLens:
    """:class:`~scherzer.drivers.base.Lens` over a serial line; thread-safe, never hangs.

    The constructor opens the port (:class:`DeviceDisconnected` if it cannot) and, with
    ``limits=None``, reads the controller's limits from ``STATUS`` (so a silent controller gives
    :class:`DeviceTimeout`). Given limits are enforced locally; the controller still enforces its
    own. After a failure the next call reopens the port by name.
    """

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 115200,
        timeout_s: float = 0.5,
        retries: int = 2,
        limits: LensLimits | None = None,
        name: str = "serial-lens",
    ) -> None:
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a finite number > 0 s, got {timeout_s!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        self.port = port
        self.baudrate = int(baudrate)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.name = name
        self.limits = limits or LensLimits()
        self._lock = threading.RLock()
        self._serial: serial.Serial | None = None
        self._closed = False
        self._seq = 0
        self._sent: deque[int] = deque(maxlen=32)  # recent seqs, to skip their late replies
        self._resync = True  # send a bare CR LF before the next request
        #: Why each failed attempt of the most recent exchange failed ("kind: detail"; empty
        #: when the first attempt succeeded): diagnostics without timing.
        self.last_failures: list[str] = []
        try:
            if limits is None:
                self.limits = self._limits_from_controller()
            else:
                with self._lock:
                    self._ensure_open()
        except BaseException:
            self._drop_port()
            raise

    # ------------------------------------------------------------ Lens protocol
    def get_defocus_nm(self) -> float:
        """Read-back defocus (nm, negative = underfocus)."""
        (value,) = self._numbers(self._exchange("GET DEF"), 1, "GET DEF")
        return value

    def set_defocus_nm(self, defocus_nm: float) -> None:
        """Request a defocus (nm); returns once the controller accepted it (not settled)."""
        value = check_defocus_nm(self.limits, defocus_nm)
        self._set("SET DEF", f"{value:.3f}")

    def get_stigmator(self) -> tuple[float, float]:
        """Two-fold stigmation read-back as (magnitude_nm, angle_deg)."""
        magnitude, angle = self._numbers(self._exchange("GET STIG"), 2, "GET STIG")
        return magnitude, angle

    def set_stigmator(self, magnitude_nm: float, angle_deg: float) -> None:
        """Set two-fold stigmation (nm, degrees)."""
        magnitude, angle = check_stigmator(self.limits, magnitude_nm, angle_deg)
        self._set("SET STIG", f"{magnitude:.3f}", f"{angle % 180.0:.3f}")

    def get_beam_tilt_mrad(self) -> tuple[float, float]:
        """Beam tilt (y, x) in mrad."""
        tilt_y, tilt_x = self._numbers(self._exchange("GET TILT"), 2, "GET TILT")
        return tilt_y, tilt_x

    def set_beam_tilt_mrad(self, tilt_y_mrad: float, tilt_x_mrad: float) -> None:
        """Set beam tilt (y, x) in mrad."""
        tilt_y, tilt_x = check_beam_tilt_mrad(self.limits, tilt_y_mrad, tilt_x_mrad)
        self._set("SET TILT", f"{tilt_y:.4f}", f"{tilt_x:.4f}")

    def wait_settled(self, timeout_s: float = 5.0) -> None:
        """Poll ``STATUS`` until ``SETTLED=1``; :class:`DeviceTimeout` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if status.get("SETTLED") == "1":
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceTimeout(
                    f"lens on {self.port} did not settle within {timeout_s:g} s "
                    f"(controller reports {status.get('REMAIN_MS', '?')} ms left): check for a "
                    "stuck lens supply or a set-point that keeps changing",
                    device=self.name,
                    details={"status": status},
                )
            remain_s = _remaining_ms(status) / 1000.0
            time.sleep(min(max(remain_s, 0.002), 0.1, left))

    def _set(self, command: str, *args: str) -> None:
        """Send a SET and check that the controller echoes the values it accepted."""
        sent = [float(a) for a in args]
        echoed = self._numbers(self._exchange(" ".join((command, *args))), len(args), command)
        if any(abs(e - v) > 1e-3 for e, v in zip(echoed, sent, strict=True)):
            raise DeviceProtocolError(
                f"lens controller on {self.port} echoed {echoed} for {command} {sent}: it "
                "accepted a different value; check the controller firmware and set it again",
                device=self.name,
                details={"sent": sent, "echoed": echoed},
            )

    # ------------------------------------------------------------ extras
    def status(self) -> dict[str, str]:
        """The controller's ``STATUS`` as a dict of strings (SETTLED, REMAIN_MS, ERRS, ...)."""
        return parse_status(self._exchange("STATUS"))

    def identify(self) -> str:
        """The controller's ``IDN`` string."""
        return " ".join(self._exchange("IDN"))

    def close(self) -> None:
        """Release the port; later calls raise :class:`DeviceDisconnected`. Bounded in time."""
        self._closed = True  # refuse new exchanges at once
        if not self._lock.acquire(timeout=self._exchange_bound_s()):
            return  # a stuck caller holds the port; it closes the port when its exchange ends
        try:
            self._drop_port()
        finally:
            self._lock.release()

    def __enter__(self) -> SerialLens:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SerialLens({self.port!r}, name={self.name!r})"

    # ------------------------------------------------------------ exchanges
    def _exchange(self, command: str) -> tuple[str, ...]:
        """Send one command and return the words after ``OK``; raises DeviceError subclasses."""
        with self._lock:
            try:
                return self._exchange_locked(command)
            finally:
                if self._closed:
                    self._drop_port()

    def _exchange_locked(self, command: str) -> tuple[str, ...]:
        """Attempts of one exchange (lock held); the last failure decides the exception."""
        failures: list[_Failure] = []
        self.last_failures = []
        for attempt in range(self.retries + 1):
            if failures and failures[-1].kind == "busy":
                time.sleep(BUSY_BACKOFF_S)
            try:
                frame = self._attempt_reopening(command)
            except _AttemptFailed as exc:
                failures.append(exc.failure)
                self.last_failures.append(f"{exc.failure.kind}: {exc.failure.detail}")
                self._resync = True
                _log.warning(
                    "lens_retry",
                    device=self.name,
                    port=self.port,
                    command=command,
                    attempt=attempt + 1,
                    reason=exc.failure.detail,
                )
                continue
            return frame.words[1:]
        raise self._final_error(command, failures)

    def _attempt_reopening(self, command: str) -> Frame:
        """One attempt; if an open port fails, reopen it once and try that attempt again."""
        was_open = self._serial is not None
        try:
            return self._attempt(command)
        except DeviceDisconnected as lost:
            if not was_open or self._closed:
                raise
            first = lost
        try:
            return self._attempt(command)
        except DeviceDisconnected as again:
            raise DeviceDisconnected(
                f"lens controller link on {self.port} went down ({first.details.get('error')}) "
                f"and reopening failed ({again.details.get('error', again)}): check the cable "
                "or USB adapter and that the controller is powered; the next call tries again",
                device=self.name,
                details={"port": self.port, "error": str(again)},
            ) from again

    def _attempt(self, command: str) -> Frame:
        port = self._ensure_open()
        seq = self._next_seq()
        try:
            if self._resync:
                port.write(b"\r\n")  # ends any half line the controller holds
                self._resync = False
            port.reset_input_buffer()
            port.write(encode_frame(seq, command))
            frame = self._read_reply(port, seq, time.monotonic() + self.timeout_s)
        except serial.SerialTimeoutException:
            raise _AttemptFailed(_Failure("timeout", "write blocked (flow control?)")) from None
        except _PORT_ERRORS as exc:
            self._drop_port()
            raise DeviceDisconnected(
                f"lens controller port {self.port} failed ({exc}): check the cable or USB "
                "adapter and that the controller is powered; the driver reopens the port on "
                "the next call",
                device=self.name,
                details={"port": self.port, "error": str(exc)},
            ) from exc
        return self._check_reply(frame, command)

    def _read_reply(self, port: serial.Serial, seq: int, deadline: float) -> Frame:
        """Read lines until the reply to ``seq``; skip late replies to earlier requests."""
        buffer = bytearray()
        grace_used = False
        while True:
            while (newline := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:newline])
                del buffer[: newline + 1]
                frame = self._decode_reply(line)
                if frame.seq == seq:
                    return frame
                if frame.seq is not None and frame.seq not in self._sent:
                    raise _AttemptFailed(
                        _Failure("protocol", f"reply carries seq {frame.seq}, expected {seq}")
                    )
                # a late reply to an earlier attempt, or an unsequenced error about line noise
            if len(buffer) >= MAX_LINE_BYTES:
                raise _AttemptFailed(_Failure("protocol", "reply line too long"))
            if time.monotonic() >= deadline:
                if buffer and not grace_used:  # a line is arriving: give it time to finish
                    grace_used = True
                    deadline += self._line_time_s()
                    continue
                if buffer:
                    partial = bytes(buffer[:40])
                    raise _AttemptFailed(_Failure("protocol", f"partial line {partial!r}"))
                raise _AttemptFailed(_Failure("timeout", "no reply"))
            buffer += port.read(max(1, port.in_waiting))

    def _line_time_s(self) -> float:
        """Time to receive two longest lines at the baud rate (10 bits a byte), at least 20 ms."""
        return max(LINE_GRACE_MIN_S, 2 * MAX_LINE_BYTES * 10 / self.baudrate)

    @staticmethod
    def _decode_reply(line: bytes) -> Frame:
        try:
            frame = decode_frame(line)
        except FrameError as exc:
            raise _AttemptFailed(_Failure("protocol", f"corrupt reply ({exc})")) from None
        if frame.words[0] not in ("OK", "ERR"):
            raise _AttemptFailed(_Failure("protocol", f"reply neither OK nor ERR: {line[:40]!r}"))
        return frame

    def _check_reply(self, frame: Frame, command: str) -> Frame:
        """Return an OK frame; turn ERR replies into a retry or a DeviceError."""
        if frame.words[0] == "OK":
            return frame
        code_token = frame.words[1] if len(frame.words) > 1 else ""
        message = " ".join(frame.words[3:]) or "(no message)"
        code = int(code_token) if code_token.isdigit() else -1
        if code == ErrorCode.LIMIT:
            raise LimitExceeded(
                f"lens controller on {self.port} refused {command!r}: {message}",
                device=self.name,
            )
        if code == ErrorCode.BUSY:
            raise _AttemptFailed(_Failure("busy", message))
        if code in _RETRYABLE_CODES:
            raise _AttemptFailed(_Failure("protocol", f"controller error {code}: {message}"))
        raise DeviceProtocolError(
            f"lens controller on {self.port} rejected {command!r} with error {code_token} "
            f"({message}): driver and controller firmware disagree on the protocol; check "
            "the controller's IDN and docs/lens-protocol.md",
            device=self.name,
            details={"code": code_token, "command": command},
        )

    def _final_error(self, command: str, failures: list[_Failure]) -> DeviceError:
        attempts = len(failures)
        last = failures[-1]
        details = {
            "port": self.port,
            "command": command,
            "attempts": [f"{f.kind}: {f.detail}" for f in failures],
        }
        where = f"lens controller on {self.port}"
        if last.kind == "timeout":
            return DeviceTimeout(
                f"no reply from {where} within {self.timeout_s:g} s after {attempts} attempts "
                f"({command!r}): is it powered and connected, and set to {self.baudrate} baud?",
                device=self.name,
                details=details,
            )
        if last.kind == "busy":
            return DeviceBusy(
                f"{where} stayed busy for {attempts} attempts ({command!r}): wait until it "
                "finishes (e.g. lens normalisation) and try again",
                device=self.name,
                details=details,
            )
        return DeviceProtocolError(
            f"garbled exchange with {where} in all {attempts} attempts ({command!r}; last: "
            f"{last.detail}): check the baud rate ({self.baudrate}), cable and grounding, and "
            "that nothing else uses the port",
            device=self.name,
            details=details,
        )

    # ------------------------------------------------------------ port handling
    def _ensure_open(self) -> serial.Serial:
        if self._closed:
            raise DeviceDisconnected(
                f"{self!r} was closed; create a new driver to use the lens again",
                device=self.name,
            )
        if self._serial is not None:
            return self._serial
        try:
            self._serial = serial.Serial(
                self.port,
                self.baudrate,
                timeout=min(_POLL_S, self.timeout_s),
                write_timeout=self.timeout_s,
            )
        except (*_PORT_ERRORS, ValueError) as exc:
            raise DeviceDisconnected(
                f"cannot open lens controller port {self.port} ({exc}): check that the "
                "controller is connected and powered and that the port name is right; the "
                "next call tries again",
                device=self.name,
                details={"port": self.port, "error": str(exc)},
            ) from exc
        self._resync = True
        _log.info("lens_port_open", device=self.name, port=self.port)
        return self._serial

    def _drop_port(self) -> None:
        """Close the port without waiting for pending output (never blocks)."""
        port, self._serial = self._serial, None
        if port is None:
            return
        try:
            port.reset_output_buffer()
        except _PORT_ERRORS:
            pass
        try:
            port.close()
        except _PORT_ERRORS:
            pass

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % SEQ_MODULUS
        self._sent.append(self._seq)
        return self._seq

    def _exchange_bound_s(self) -> float:
        per_attempt = self.timeout_s + _POLL_S + self._line_time_s() + BUSY_BACKOFF_S
        return (self.retries + 1) * per_attempt

    def _numbers(self, words: tuple[str, ...], count: int, command: str) -> list[float]:
        try:
            if len(words) != count:
                raise ValueError(f"expected {count} value(s), got {len(words)}")
            return [parse_number(word) for word in words]
        except ValueError as exc:
            raise DeviceProtocolError(
                f"lens controller on {self.port} answered {command!r} with "
                f"{' '.join(words)[:40]!r} ({exc}): check the controller firmware",
                device=self.name,
            ) from None

    def _limits_from_controller(self) -> LensLimits:
        status = self.status()
        try:
            return LensLimits(
                defocus_nm=(float(status["DEF_MIN"]), float(status["DEF_MAX"])),
                stigmator_nm=float(status["STIG_MAX"]),
                beam_tilt_mrad=float(status["TILT_MAX"]),
            )
        except (KeyError, ValueError) as exc:
            raise DeviceProtocolError(
                f"lens controller on {self.port} reported no usable limits in STATUS "
                f"({exc}); pass limits=LensLimits(...) explicitly",
                device=self.name,
            ) from None


def _remaining_ms(status: dict[str, str]) -> float:
    try:
        return max(0.0, float(status.get("REMAIN_MS", "10")))
    except ValueError:
        return 10.0
