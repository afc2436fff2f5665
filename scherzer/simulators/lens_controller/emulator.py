"""The emulated serial lens controller on a pseudo-terminal, with injectable faults.

Conventions: see :mod:`scherzer.simulators.lens_controller`; the protocol is
:mod:`scherzer.simulators.lens_controller.protocol`.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import shutil
import tempfile
import threading
import time
import tty
import weakref
from collections import deque
from collections.abc import Callable

import numpy as np
import structlog

from scherzer.drivers.base import LimitExceeded
from scherzer.simulators.lens_controller.model import LensModel
from scherzer.simulators.lens_controller.protocol import (
    EMULATOR_IDN,
    MAX_LINE_BYTES,
    ErrorCode,
    FrameError,
    decode_frame,
    encode_frame,
    parse_number,
)

_log = structlog.get_logger(__name__)


class _CommandError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


#: Fault kinds for :meth:`LensControllerEmulator.inject`.
FAULT_KINDS = ("drop", "corrupt", "partial", "busy", "silent")


class LensControllerEmulator:
    """A lens controller on a real pseudo-terminal, speaking the protocol of docs/lens-protocol.md.

    ``port`` is a stable symlink (in a private temporary directory) to the current pty slave; open
    it with pyserial. ``disconnect()`` closes the pty (the port errors and the symlink vanishes);
    ``reconnect()`` makes a new pty behind the same ``port`` name. The serving thread never dies on
    input: every malformed line gets an ``ERR`` reply and the loop continues.
    """

    def __init__(self, model: LensModel | None = None, *, seed: int = 0) -> None:
        if model is None:
            model = LensModel(time.monotonic, np.random.default_rng(seed))
        self.model = model
        self._tmpdir = tempfile.mkdtemp(prefix="scherzer-lens-")
        self.port = os.path.join(self._tmpdir, "lens-tty")
        weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
        self._lock = threading.Lock()  # fault state and counters
        self._master: int | None = None
        self._slave: int | None = None
        self._device = ""
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._reply_delay_s = 0.0
        self._faults: deque[str] = deque()
        self._silent = False
        self._noise_prefix = b""
        self.requests = 0
        self.errors = 0
        self.last_error = 0
        #: Non-empty lines received (answered or not) and replies put on the line: what tests
        #: wait for instead of sleeping.
        self.lines = 0
        self.replies = 0
        self._handlers: dict[str, Callable[[tuple[str, ...]], str]] = {
            "IDN": self._cmd_idn,
            "STATUS": self._cmd_status,
            "GET DEF": self._cmd_get_defocus,
            "SET DEF": self._cmd_set_defocus,
            "GET STIG": self._cmd_get_stigmator,
            "SET STIG": self._cmd_set_stigmator,
            "GET TILT": self._cmd_get_tilt,
            "SET TILT": self._cmd_set_tilt,
        }

    # ------------------------------------------------------------ lifecycle
    @property
    def device(self) -> str:
        """The current pty slave path (changes on reconnect; ``port`` does not)."""
        return self._device

    @property
    def running(self) -> bool:
        """True while the serving thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> LensControllerEmulator:
        """Open the pty (if closed) and start serving in a background thread."""
        if self._master is None:
            self._open_pty()
        if not self.running:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._serve, args=(self._master,), name="lens-emulator", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the pty and remove the temporary directory."""
        self.disconnect()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def disconnect(self) -> None:
        """Simulate a pulled cable: stop serving, close the pty, remove the ``port`` symlink."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.port)

    def reconnect(self) -> None:
        """Plug the cable back in: a new pty behind the same ``port`` path, serving again."""
        self.disconnect()
        self.start()

    def __enter__(self) -> LensControllerEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _open_pty(self) -> None:
        os.makedirs(self._tmpdir, exist_ok=True)  # stop() removed it; start() may follow
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no CR/LF translation, no signals
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self._device = os.ttyname(slave)
        tmp_link = self.port + ".new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_link)
        os.symlink(self._device, tmp_link)
        os.replace(tmp_link, self.port)

    # ------------------------------------------------------------ test controls
    def set_reply_delay_s(self, seconds: float) -> None:
        """Delay every reply by ``seconds`` (the controller processes one request at a time)."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"reply delay must be a finite number >= 0 s, got {seconds!r}")
        with self._lock:
            self._reply_delay_s = float(seconds)

    def inject(self, kind: str, count: int = 1) -> None:
        """Inject a fault into the next ``count`` replies.

        ``drop``: the request is executed, its reply is lost. ``corrupt``: executed, the reply's
        CRC is wrong. ``partial``: executed, only the first half of the reply is sent, without line
        end. ``busy``: not executed, reply ``ERR 40 BUSY``. ``silent``: nothing is executed or
        answered until :meth:`clear_faults` (``count`` is ignored).
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; choose one of {', '.join(FAULT_KINDS)}")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        with self._lock:
            if kind == "silent":
                self._silent = True
            else:
                self._faults.extend([kind] * count)

    def emit_raw(self, data: bytes, *, before_next_reply: bool = False) -> None:
        """Write raw bytes to the line (line noise): now, or just before the next reply."""
        if before_next_reply:
            with self._lock:
                self._noise_prefix += bytes(data)
        else:
            self._write(bytes(data))

    def clear_faults(self) -> None:
        """Remove pending faults and leave silent mode."""
        with self._lock:
            self._faults.clear()
            self._silent = False
            self._noise_prefix = b""

    # ------------------------------------------------------------ serving loop
    def _serve(self, master: int) -> None:
        buffer = bytearray()
        discarding = False  # inside an overlong line: drop bytes up to the next LF
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([master], [], [], 0.05)
                if not ready:
                    continue
                chunk = os.read(master, 4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:  # EIO: no slave open right now; keep waiting
                self._stop.wait(0.05)
                continue
            buffer += chunk
            try:
                discarding = self._consume(buffer, discarding)
            except Exception:  # a bug must not kill the controller: log, resynchronise, go on
                _log.exception("lens_emulator_internal_error")
                buffer.clear()
                discarding = False

    def _consume(self, buffer: bytearray, discarding: bool) -> bool:
        """Handle every complete line in ``buffer``; return the new ``discarding`` state."""
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                if len(buffer) >= MAX_LINE_BYTES:
                    if not discarding:
                        self._reply_error(None, ErrorCode.LINE_TOO_LONG, self._too_long_text())
                    buffer.clear()
                    return True
                return discarding
            line = bytes(buffer[:newline])
            del buffer[: newline + 1]
            if discarding:
                discarding = False
                continue
            self._handle_line(line)

    @staticmethod
    def _too_long_text() -> str:
        return f"line longer than {MAX_LINE_BYTES} bytes; discarded up to next LF"

    def _handle_line(self, line: bytes) -> None:
        if line in (b"", b"\r"):
            return  # empty lines resynchronise and are ignored
        with self._lock:
            self.lines += 1
            if self._silent:
                return
            fault = self._faults.popleft() if self._faults else None
        try:
            frame = decode_frame(line)
        except FrameError as exc:
            self._reply_error(exc.seq, exc.code, str(exc), fault)
            return
        if fault == "busy":
            self._reply_error(frame.seq, ErrorCode.BUSY, "busy (lens normalising); retry", None)
            return
        try:
            text = self._execute(frame.words)
        except _CommandError as exc:
            self._reply_error(frame.seq, exc.code, str(exc), fault)
            return
        self._send(encode_frame(frame.seq, text), fault)

    def _execute(self, words: tuple[str, ...]) -> str:
        with self._lock:
            self.requests += 1
        verb = words[0].upper()
        key = f"{verb} {words[1].upper()}" if verb in ("GET", "SET") and len(words) > 1 else verb
        handler = self._handlers.get(key)
        if handler is None:
            shown = " ".join(words[:2])[:24]
            raise _CommandError(ErrorCode.UNKNOWN_COMMAND, f"unknown command '{shown}'")
        n_verb_words = 2 if verb in ("GET", "SET") else 1
        try:
            return handler(words[n_verb_words:])
        except LimitExceeded as exc:
            raise _CommandError(ErrorCode.LIMIT, _shorten(str(exc))) from None

    def _reply_error(
        self, seq: int | None, code: ErrorCode, message: str, fault: str | None = None
    ) -> None:
        with self._lock:
            self.errors += 1
            self.last_error = int(code)
        text = _shorten(f"ERR {int(code)} {code.name} {message}")
        self._send(encode_frame(seq, text), fault)

    def _send(self, data: bytes, fault: str | None) -> None:
        with self._lock:
            delay = self._reply_delay_s
            noise, self._noise_prefix = self._noise_prefix, b""
        if delay > 0 and self._stop.wait(delay):
            return
        if noise:
            self._write(noise)
        if fault == "drop":
            return
        if fault == "corrupt":
            crc = int(data[-6:-2], 16) ^ 0x5A5A
            data = data[:-6] + b"%04X\r\n" % crc
        elif fault == "partial":
            data = data[: len(data) // 2]
        self._write(data)
        with self._lock:
            self.replies += 1

    def _write(self, data: bytes) -> None:
        """Write to the master without blocking; bytes nobody reads are lost, as on a wire."""
        master = self._master
        if master is None:
            return
        with contextlib.suppress(OSError):
            os.write(master, data)

    # ------------------------------------------------------------ commands
    def _cmd_idn(self, args: tuple[str, ...]) -> str:
        _expect_args(args, 0, "IDN")
        return f"OK {EMULATOR_IDN}"

    def _cmd_status(self, args: tuple[str, ...]) -> str:
        _expect_args(args, 0, "STATUS")
        status = self.model.status()
        lo, hi = status["limits"]["defocus_nm"]
        with self._lock:
            errors, last = self.errors, self.last_error
        return (
            f"OK SETTLED={int(status['settled'])}"
            f" REMAIN_MS={math.ceil(status['settle_remaining_s'] * 1000.0)}"
            f" ERRS={errors} LAST={last} DEF_MIN={lo:.1f} DEF_MAX={hi:.1f}"
            f" STIG_MAX={status['limits']['stigmator_nm']:.1f}"
            f" TILT_MAX={status['limits']['beam_tilt_mrad']:.3f}"
        )

    def _cmd_get_defocus(self, args: tuple[str, ...]) -> str:
        _expect_args(args, 0, "GET DEF")
        return f"OK {self.model.readback_defocus_nm():.1f}"

    def _cmd_set_defocus(self, args: tuple[str, ...]) -> str:
        (value,) = _numbers(args, 1, "SET DEF <defocus_nm>")
        self.model.set_defocus_nm(value)
        return f"OK {value:.3f}"

    def _cmd_get_stigmator(self, args: tuple[str, ...]) -> str:
        _expect_args(args, 0, "GET STIG")
        magnitude, angle = self.model.readback_stigmator()
        return f"OK {magnitude:.1f} {angle:.1f}"

    def _cmd_set_stigmator(self, args: tuple[str, ...]) -> str:
        magnitude, angle = _numbers(args, 2, "SET STIG <magnitude_nm> <angle_deg>")
        self.model.set_stigmator(magnitude, angle)
        return f"OK {magnitude:.3f} {angle % 180.0:.3f}"

    def _cmd_get_tilt(self, args: tuple[str, ...]) -> str:
        _expect_args(args, 0, "GET TILT")
        tilt_y, tilt_x = self.model.beam_tilt_mrad()
        return f"OK {tilt_y:.4f} {tilt_x:.4f}"

    def _cmd_set_tilt(self, args: tuple[str, ...]) -> str:
        tilt_y, tilt_x = _numbers(args, 2, "SET TILT <tilt_y_mrad> <tilt_x_mrad>")
        self.model.set_beam_tilt_mrad(tilt_y, tilt_x)
        return f"OK {tilt_y:.4f} {tilt_x:.4f}"


def _expect_args(args: tuple[str, ...], count: int, usage: str) -> None:
    if len(args) != count:
        raise _CommandError(ErrorCode.BAD_ARGS, f"expected {count} argument(s): {usage}")


def _numbers(args: tuple[str, ...], count: int, usage: str) -> list[float]:
    _expect_args(args, count, usage)
    try:
        return [parse_number(token) for token in args]
    except ValueError as exc:
        raise _CommandError(ErrorCode.BAD_ARGS, f"{exc}; usage: {usage}") from None


def _shorten(text: str, limit: int = 96) -> str:
    """Printable ASCII within the line limit (seq, CRC and CRLF take the rest)."""
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
