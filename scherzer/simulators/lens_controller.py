"""Objective-lens physics and an emulated serial lens controller on a pseudo-terminal.

Units: nanometres for defocus C1 and two-fold astigmatism A1, degrees for the A1 angle, mrad for
beam tilt, seconds for time (``clock()`` returns seconds; it may be simulated time). Defocus is
negative for underfocus (DOMAIN.md).

Physics of :class:`LensModel`
-----------------------------
*Set-point and coil.* ``set_defocus_nm(x)`` changes the set-point ``x`` of the objective-lens
excitation. The excitation follows a first-order (exponential) response with time constant
``tau = settle_s / 5``: a step of size ``d`` leaves a residual ``d·exp(-t/tau)``, i.e. 0.7 % of the
step after ``settle_s``. After ``settle_s`` the lens counts as *settled*
(:meth:`LensModel.settle_remaining_s` reaches 0). ``settle_s = 0`` makes every change instantaneous.

*Hysteresis.* The magnetic focus lags the excitation with a play (backlash) operator of full width
``h = hysteresis_nm``: the magnetic set-point ``p`` stays inside ``[x - h/2, x + h/2]`` and moves
only when the excitation pushes it, ``p_new = clip(p_old, x - h/2, x + h/2)``. Approaching a value
from below therefore ends ``h/2`` short of it (``p = x - h/2``), approaching from above ends ``h/2``
beyond it (``p = x + h/2``); a reversal smaller than ``h`` leaves the focus unchanged. The lens
starts at ``p = x = 0`` (freshly normalised).

*Focal drift.* The column drifts in focus at ``focal_drift_nm_per_s`` from the model's creation:
``true = p(t) + drift·(t - t_created)``, where ``p(t)`` approaches ``p`` exponentially as above.

*Read-back.* The controller measures its own coil current, not the beam: the read-back is the
exponentially approached *set-point* ``x(t)`` (no hysteresis, no column drift) plus Gaussian noise
of standard deviation ``readback_noise_nm``, quantised to :data:`READBACK_QUANTUM_NM`. The
difference between true focus and read-back is what a focal-series restoration has to estimate.

*Stigmator.* Two-fold astigmatism A1 is set as (magnitude_nm, angle_deg); internally it is the
vector ``(m cos 2φ, m sin 2φ)`` (angles are 180°-periodic) whose components approach their targets
with the same time constant. No hysteresis on the stigmator. The read-back adds Gaussian noise of
``readback_noise_nm`` to each component and quantises magnitude to 0.1 nm and angle to 0.1°.
Angles are returned in [0, 180).

*Beam tilt.* Deflector coils are fast: the tilt (y, x) in mrad takes effect at once, no noise.

*Limits.* Defocus in ``limits.defocus_nm`` (inclusive), stigmator magnitude in
``[0, limits.stigmator_nm]``, each beam-tilt axis in ``[-limits.beam_tilt_mrad,
+limits.beam_tilt_mrad]``. A value outside (or not finite) raises
:class:`~scherzer.drivers.base.LimitExceeded` and changes nothing.

All public methods are thread-safe (one lock).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import select
import shutil
import tempfile
import threading
import time
import tty
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import structlog

from scherzer.drivers.base import LensLimits, LimitExceeded

__all__ = [
    "EMULATOR_IDN",
    "FAULT_KINDS",
    "MAX_LINE_BYTES",
    "READBACK_QUANTUM_NM",
    "ErrorCode",
    "Frame",
    "FrameError",
    "LensControllerEmulator",
    "LensModel",
    "check_beam_tilt_mrad",
    "check_defocus_nm",
    "check_stigmator",
    "crc16_ccitt",
    "decode_frame",
    "encode_frame",
    "parse_number",
    "parse_status",
]

_log = structlog.get_logger(__name__)

#: Resolution of the controller's defocus and stigmator read-back (nm).
READBACK_QUANTUM_NM = 0.1
#: Resolution of the stigmator angle read-back (degrees).
ANGLE_QUANTUM_DEG = 0.1
#: Number of time constants in ``settle_s``: tau = settle_s / SETTLE_TIME_CONSTANTS.
SETTLE_TIME_CONSTANTS = 5.0


def _quantise(value: float, quantum: float) -> float:
    """Round ``value`` to the nearest multiple of ``quantum`` (and avoid printing -0.0)."""
    return round(round(value / quantum) * quantum, 10) + 0.0


@dataclass
class _FirstOrder:
    """A quantity that approaches ``target`` exponentially from ``start`` since time ``t0``."""

    start: float
    target: float
    t0: float

    def value(self, t: float, tau: float) -> float:
        if tau <= 0.0:
            return self.target
        if t <= self.t0:
            return self.start
        return self.target + (self.start - self.target) * math.exp(-(t - self.t0) / tau)

    def retarget(self, target: float, t: float, tau: float) -> None:
        """Move toward a new target, starting from wherever the quantity is now."""
        self.start = self.value(t, tau)
        self.target = target
        self.t0 = t


def _stig_vector(magnitude_nm: float, angle_deg: float) -> tuple[float, float]:
    """(magnitude, angle) of two-fold astigmatism -> Cartesian (a1x, a1y) with angle doubled."""
    phi2 = math.radians(2.0 * angle_deg)
    return magnitude_nm * math.cos(phi2), magnitude_nm * math.sin(phi2)


def _stig_polar(a1x: float, a1y: float) -> tuple[float, float]:
    """Cartesian (a1x, a1y) -> (magnitude_nm, angle_deg in [0, 180))."""
    magnitude = math.hypot(a1x, a1y)
    angle = (math.degrees(math.atan2(a1y, a1x)) / 2.0) % 180.0
    return magnitude, angle


def _require_finite(name: str, value: float, unit: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LimitExceeded(f"{name} must be a number in {unit}, got {value!r}") from None
    if not math.isfinite(number):
        raise LimitExceeded(f"{name} must be a finite number in {unit}, got {value!r}")
    return number


def check_defocus_nm(limits: LensLimits, defocus_nm: float) -> float:
    """The defocus as float if finite and inside ``limits.defocus_nm``; else LimitExceeded."""
    value = _require_finite("defocus", defocus_nm, "nm")
    lo, hi = limits.defocus_nm
    if not lo <= value <= hi:
        raise LimitExceeded(
            f"defocus {value:g} nm is outside the lens limits [{lo:g}, {hi:g}] nm; "
            "nothing was changed",
            details={"defocus_nm": value, "limits_nm": [lo, hi]},
        )
    return value


def check_stigmator(
    limits: LensLimits, magnitude_nm: float, angle_deg: float
) -> tuple[float, float]:
    """(magnitude_nm, angle_deg) as floats if finite and 0 <= magnitude <= limit."""
    magnitude = _require_finite("stigmator magnitude", magnitude_nm, "nm")
    angle = _require_finite("stigmator angle", angle_deg, "degrees")
    limit = limits.stigmator_nm
    if not 0.0 <= magnitude <= limit:
        raise LimitExceeded(
            f"stigmator magnitude {magnitude:g} nm is outside [0, {limit:g}] nm; "
            "nothing was changed",
            details={"magnitude_nm": magnitude, "limit_nm": limit},
        )
    return magnitude, angle


def check_beam_tilt_mrad(
    limits: LensLimits, tilt_y_mrad: float, tilt_x_mrad: float
) -> tuple[float, float]:
    """(tilt_y, tilt_x) in mrad as floats if finite and each within +/-limit."""
    ty = _require_finite("beam tilt y", tilt_y_mrad, "mrad")
    tx = _require_finite("beam tilt x", tilt_x_mrad, "mrad")
    limit = limits.beam_tilt_mrad
    if abs(ty) > limit or abs(tx) > limit:
        raise LimitExceeded(
            f"beam tilt ({ty:g}, {tx:g}) mrad exceeds +/-{limit:g} mrad per axis; "
            "nothing was changed",
            details={"tilt_mrad": [ty, tx], "limit_mrad": limit},
        )
    return ty, tx


class LensModel:
    """Objective lens: defocus with settle, hysteresis and drift; stigmator; beam tilt.

    ``clock`` returns seconds (simulated or ``time.monotonic``); ``rng`` draws the read-back noise.
    See the module docstring for the physics and units.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        rng: np.random.Generator,
        *,
        settle_s: float = 0.05,
        hysteresis_nm: float = 1.5,
        readback_noise_nm: float = 0.2,
        focal_drift_nm_per_s: float = 0.0,
        limits: LensLimits = LensLimits(),  # noqa: B008 - frozen dataclass, safe default
    ) -> None:
        if settle_s < 0 or hysteresis_nm < 0 or readback_noise_nm < 0:
            raise ValueError(
                "settle_s, hysteresis_nm and readback_noise_nm must be >= 0, got "
                f"{settle_s}, {hysteresis_nm}, {readback_noise_nm}"
            )
        lo, hi = limits.defocus_nm
        if not lo <= 0.0 <= hi:
            raise ValueError(f"defocus limits {limits.defocus_nm} must contain 0 nm (start value)")
        self._clock = clock
        self._rng = rng
        self.settle_s = float(settle_s)
        self.hysteresis_nm = float(hysteresis_nm)
        self.readback_noise_nm = float(readback_noise_nm)
        self.focal_drift_nm_per_s = float(focal_drift_nm_per_s)
        self.limits = limits
        self._tau = self.settle_s / SETTLE_TIME_CONSTANTS
        self._lock = threading.Lock()
        now = clock()
        self._t_created = now
        self._setpoint_nm = 0.0
        self._magnetic_nm = 0.0  # hysteresis (play-operator) output
        self._coil = _FirstOrder(0.0, 0.0, now)  # approaches the set-point: read-back
        self._focus = _FirstOrder(0.0, 0.0, now)  # approaches the magnetic set-point: true C1
        self._stig_setpoint = (0.0, 0.0)
        self._stig_x = _FirstOrder(0.0, 0.0, now)
        self._stig_y = _FirstOrder(0.0, 0.0, now)
        self._tilt_mrad = (0.0, 0.0)
        self._last_change_s = now - self.settle_s

    # ---------------------------------------------------------------- defocus
    def set_defocus_nm(self, value: float) -> None:
        """Request defocus C1 (nm); :class:`LimitExceeded` outside ``limits.defocus_nm``."""
        value = check_defocus_nm(self.limits, value)
        with self._lock:
            now = self._clock()
            half = 0.5 * self.hysteresis_nm
            self._magnetic_nm = min(max(self._magnetic_nm, value - half), value + half)
            self._setpoint_nm = value
            self._coil.retarget(value, now, self._tau)
            self._focus.retarget(self._magnetic_nm, now, self._tau)
            self._last_change_s = now

    def defocus_setpoint_nm(self) -> float:
        """The last accepted defocus set-point (nm)."""
        with self._lock:
            return self._setpoint_nm

    def true_defocus_nm(self) -> float:
        """Physical C1 now (nm): settle response of the hysteretic focus plus column drift."""
        with self._lock:
            now = self._clock()
            drift = self.focal_drift_nm_per_s * (now - self._t_created)
            return self._focus.value(now, self._tau) + drift

    def readback_defocus_nm(self) -> float:
        """What the controller reports (nm): coil response + noise, quantised to 0.1 nm."""
        with self._lock:
            now = self._clock()
            value = self._coil.value(now, self._tau) + self._noise()
        return _quantise(value, READBACK_QUANTUM_NM)

    def settle_remaining_s(self) -> float:
        """Seconds until the last defocus or stigmator change counts as settled (0 if settled)."""
        with self._lock:
            return max(0.0, self._last_change_s + self.settle_s - self._clock())

    # ------------------------------------------------------------- stigmator
    def set_stigmator(self, magnitude_nm: float, angle_deg: float) -> None:
        """Set two-fold astigmatism A1 (nm, degrees); magnitude limited to the stigmator range."""
        magnitude_nm, angle_deg = check_stigmator(self.limits, magnitude_nm, angle_deg)
        ax, ay = _stig_vector(magnitude_nm, angle_deg)
        with self._lock:
            now = self._clock()
            self._stig_setpoint = (magnitude_nm, angle_deg % 180.0)
            self._stig_x.retarget(ax, now, self._tau)
            self._stig_y.retarget(ay, now, self._tau)
            self._last_change_s = now

    def true_stigmator(self) -> tuple[float, float]:
        """Physical A1 now as (magnitude_nm, angle_deg in [0, 180))."""
        with self._lock:
            now = self._clock()
            return _stig_polar(
                self._stig_x.value(now, self._tau), self._stig_y.value(now, self._tau)
            )

    def readback_stigmator(self) -> tuple[float, float]:
        """Controller read-back of A1: (magnitude_nm, angle_deg) with noise, quantised."""
        with self._lock:
            now = self._clock()
            ax = self._stig_x.value(now, self._tau) + self._noise()
            ay = self._stig_y.value(now, self._tau) + self._noise()
        magnitude, angle = _stig_polar(ax, ay)
        angle_q = _quantise(angle, ANGLE_QUANTUM_DEG) % 180.0
        return _quantise(magnitude, READBACK_QUANTUM_NM), angle_q

    # ------------------------------------------------------------- beam tilt
    def set_beam_tilt_mrad(self, tilt_y_mrad: float, tilt_x_mrad: float) -> None:
        """Set beam tilt (y, x) in mrad; each axis limited to +/-``limits.beam_tilt_mrad``."""
        ty, tx = check_beam_tilt_mrad(self.limits, tilt_y_mrad, tilt_x_mrad)
        with self._lock:
            self._tilt_mrad = (ty, tx)

    def beam_tilt_mrad(self) -> tuple[float, float]:
        """Beam tilt (y, x) in mrad."""
        with self._lock:
            return self._tilt_mrad

    # ---------------------------------------------------------------- status
    def status(self) -> dict:
        """Settle state, set-points and limits as plain JSON-able values."""
        remaining = self.settle_remaining_s()
        with self._lock:
            lo, hi = self.limits.defocus_nm
            return {
                "settled": remaining == 0.0,
                "settle_remaining_s": remaining,
                "defocus_setpoint_nm": self._setpoint_nm,
                "stigmator_setpoint": self._stig_setpoint,
                "beam_tilt_mrad": self._tilt_mrad,
                "limits": {
                    "defocus_nm": (lo, hi),
                    "stigmator_nm": self.limits.stigmator_nm,
                    "beam_tilt_mrad": self.limits.beam_tilt_mrad,
                },
                "time_s": self._clock(),
            }

    def _noise(self) -> float:
        """One read-back noise sample (nm); call with the lock held."""
        if self.readback_noise_nm == 0.0:
            return 0.0
        return float(self._rng.normal(0.0, self.readback_noise_nm))


# ====================================================================== wire protocol (codec)
# The line protocol is documented in docs/lens-protocol.md; the codec lives here (the emulator is
# the reference implementation) and the serial driver imports it (drivers -> simulators).

#: Longest accepted line in bytes, including the terminating LF (and CR, if sent).
MAX_LINE_BYTES = 128
#: Sequence numbers are decimal integers in [0, SEQ_MODULUS).
SEQ_MODULUS = 65536
#: Identification string of the emulated controller (reply to IDN).
EMULATOR_IDN = "SCHERZER,LC-EMU,0001,1.0"


class ErrorCode(IntEnum):
    """Numeric error codes of ``ERR`` replies (the name follows the number on the wire)."""

    CHECKSUM = 10
    FRAMING = 11
    LINE_TOO_LONG = 12
    ENCODING = 13
    UNKNOWN_COMMAND = 20
    BAD_ARGS = 21
    LIMIT = 30
    BUSY = 40


class FrameError(ValueError):
    """A line that is not a valid frame; ``code`` says why, ``seq`` is its seq if readable."""

    def __init__(self, code: ErrorCode, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.seq = seq


@dataclass(frozen=True)
class Frame:
    """A decoded line: ``seq`` (None for ``-``) and its words (command or OK/ERR and values)."""

    seq: int | None
    words: tuple[str, ...]


def crc16_ccitt(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: polynomial 0x1021, initial value 0xFFFF, no reflection, no final XOR.

    Check value: ``crc16_ccitt(b"123456789") == 0x29B1``.
    """
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def encode_frame(seq: int | None, text: str) -> bytes:
    """``<seq> <text> *<CRC as 4 upper-case hex digits>\\r\\n``; seq None is written ``-``."""
    seq_token = "-" if seq is None else str(seq)
    body = f"{seq_token} {text}".encode("ascii")
    return body + b" *%04X\r\n" % crc16_ccitt(body)


def _parse_seq(token: str) -> int | None:
    """Decimal seq in [0, 65535] or None for ``-``; ValueError otherwise."""
    if token == "-":
        return None
    if not (token.isdigit() and token.isascii() and len(token) <= 5):
        raise ValueError(token)
    value = int(token)
    if value >= SEQ_MODULUS:
        raise ValueError(token)
    return value


def decode_frame(line: bytes) -> Frame:
    """Decode one line (without LF; a trailing CR is ignored) or raise :class:`FrameError`."""
    if len(line) + 1 > MAX_LINE_BYTES:  # + 1 for the LF
        raise FrameError(ErrorCode.LINE_TOO_LONG, f"line longer than {MAX_LINE_BYTES} bytes")
    if line.endswith(b"\r"):
        line = line[:-1]
    if any(b < 0x20 or b > 0x7E for b in line):
        raise FrameError(ErrorCode.ENCODING, "non-printable or non-ASCII byte in line")
    star = line.rfind(b" *")
    checksum = line[star + 2 :]
    if star < 0 or len(checksum) != 4 or not _is_hex(checksum):
        raise FrameError(ErrorCode.FRAMING, "expected '<seq> <command> [args] *<CRC16 hex4>'")
    body = line[:star]
    words = tuple(body.decode("ascii").split())
    try:
        seq = _parse_seq(words[0]) if words else None
    except ValueError:
        raise FrameError(ErrorCode.FRAMING, "sequence number must be 0..65535 or '-'") from None
    if int(checksum, 16) != crc16_ccitt(body):
        raise FrameError(ErrorCode.CHECKSUM, f"CRC mismatch (want {crc16_ccitt(body):04X})", seq)
    if len(words) < 2:
        raise FrameError(ErrorCode.FRAMING, "missing command after sequence number", seq)
    return Frame(seq, words[1:])


def _is_hex(token: bytes) -> bool:
    return all(chr(b) in "0123456789abcdefABCDEF" for b in token)


_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,3})?")


def parse_number(token: str) -> float:
    """A finite decimal number (no inf/nan/underscores); ValueError otherwise."""
    if len(token) > 24 or not _NUMBER.fullmatch(token):
        raise ValueError(f"not a number: {token[:24]!r}")
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {token[:24]!r}")
    return value


def parse_status(words: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` words of a STATUS reply -> dict (other words are ignored)."""
    pairs = (w.split("=", 1) for w in words if "=" in w)
    return {key: value for key, value in pairs}


# ====================================================================== emulated controller
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
