"""Objective-lens physics: :class:`LensModel` (set-point, coil response, hysteresis, focal
drift, read-back, stigmator, beam tilt) and the limit checks the controller and driver share.

Conventions and physics: see :mod:`scherzer.simulators.lens_controller`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import structlog

from scherzer.drivers.base import LensLimits, LimitExceeded

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
