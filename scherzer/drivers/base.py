"""Device contracts: typed protocols for Camera, ScanGenerator, Lens (and Stage, EnergyFilter,
BeamBlanker) and DeviceError.

Units are in the names (``defocus_nm``, ``exposure_s``, ``dwell_us``, ``rotation_deg``). Every
driver method either returns what it promises or raises a :class:`DeviceError` subclass whose
message says what went wrong and what the user can do; no driver call may block for longer than
its documented timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from scherzer.stack import FrameRecord

__all__ = [
    "BeamBlanker",
    "Camera",
    "CameraFrame",
    "DeviceBusy",
    "DeviceDisconnected",
    "DeviceError",
    "DeviceProtocolError",
    "DeviceReadOnly",
    "DeviceTimeout",
    "EnergyFilter",
    "EnergyFilterLimits",
    "Lens",
    "LensLimits",
    "LimitExceeded",
    "ScanFrame",
    "ScanGenerator",
    "ScanSettings",
    "Stage",
]


class DeviceError(RuntimeError):
    """A device failed; ``code`` is a stable machine-readable reason used in API error replies."""

    code = "device_error"

    def __init__(self, message: str, *, device: str = "", details: dict | None = None) -> None:
        super().__init__(message)
        self.device = device
        self.details = details or {}


class DeviceTimeout(DeviceError):
    """The device did not answer in time."""

    code = "device_timeout"


class DeviceDisconnected(DeviceError):
    """The link to the device is down (port closed, cable pulled, process gone)."""

    code = "device_disconnected"


class LimitExceeded(DeviceError):
    """A requested value is outside the device's limits; nothing was changed."""

    code = "limit_exceeded"


class DeviceBusy(DeviceError):
    """The device is in use (e.g. an acquisition is running)."""

    code = "device_busy"


class DeviceReadOnly(DeviceError):
    """The device is configured read-only (e.g. the first connection to a real instrument):
    a change was asked for and refused; nothing was sent."""

    code = "device_read_only"


class DeviceProtocolError(DeviceError):
    """The device answered with something that breaks its protocol (checksum, framing)."""

    code = "device_protocol_error"


@dataclass(frozen=True)
class CameraFrame:
    """One camera read-out: float32 counts (y, x), its record and (simulators only) truth."""

    image: np.ndarray
    record: FrameRecord
    pixel_size_nm: tuple[float, float]
    truth: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ScanSettings:
    """Scan-generator configuration (frame size in pixels as (ny, nx))."""

    size_px: tuple[int, int] = (512, 512)
    pixel_nm: float = 0.02
    dwell_us: float = 2.0
    flyback_us: float = 200.0
    rotation_deg: float = 0.0
    signals: tuple[str, ...] = ("HAADF",)


@dataclass(frozen=True)
class ScanFrame:
    """All signals of one scan frame, recorded at the same probe positions."""

    images: dict[str, np.ndarray]
    records: dict[str, FrameRecord]
    pixel_size_nm: tuple[float, float]
    truth: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LensLimits:
    """Allowed ranges; a set outside them raises :class:`LimitExceeded`."""

    defocus_nm: tuple[float, float] = (-5000.0, 5000.0)
    stigmator_nm: float = 500.0
    beam_tilt_mrad: float = 20.0


@runtime_checkable
class Camera(Protocol):
    """A TEM camera."""

    name: str

    def acquire(
        self,
        exposure_s: float,
        binning: int = 1,
        region: tuple[int, int, int, int] | None = None,
    ) -> CameraFrame:
        """Expose and read out one frame. ``region`` is (y0, x0, height, width) in unbinned px."""
        ...


@runtime_checkable
class ScanGenerator(Protocol):
    """A STEM scan generator with one or more detectors."""

    name: str

    def configure(self, settings: ScanSettings) -> None:
        """Set size, dwell, flyback, rotation and signals for the following frames."""
        ...

    def acquire(self) -> ScanFrame:
        """Scan one frame and return every configured signal."""
        ...

    def abort(self) -> None:
        """Stop a running scan at once (the frame in progress is discarded)."""
        ...


@runtime_checkable
class Lens(Protocol):
    """Objective lens control: defocus, two-fold stigmator, beam tilt."""

    name: str
    limits: LensLimits

    def get_defocus_nm(self) -> float:
        """Read-back defocus (nm, negative = underfocus)."""
        ...

    def set_defocus_nm(self, defocus_nm: float) -> None:
        """Request a defocus; returns once the command is accepted (not settled)."""
        ...

    def get_stigmator(self) -> tuple[float, float]:
        """Two-fold stigmation as (magnitude_nm, angle_deg)."""
        ...

    def set_stigmator(self, magnitude_nm: float, angle_deg: float) -> None: ...

    def get_beam_tilt_mrad(self) -> tuple[float, float]:
        """Beam tilt (y, x) in mrad."""
        ...

    def set_beam_tilt_mrad(self, tilt_y_mrad: float, tilt_x_mrad: float) -> None: ...

    def wait_settled(self, timeout_s: float = 5.0) -> None:
        """Block until the lens has settled; :class:`DeviceTimeout` after ``timeout_s``."""
        ...


@runtime_checkable
class Stage(Protocol):
    """Specimen stage (optional)."""

    name: str

    def get_position_nm(self) -> tuple[float, float]: ...

    def move_to_nm(self, y_nm: float, x_nm: float) -> None: ...


@dataclass(frozen=True)
class EnergyFilterLimits:
    """Allowed settings of an imaging energy filter; a set outside raises
    :class:`LimitExceeded` and changes nothing."""

    slit_width_ev: tuple[float, float] = (1.0, 100.0)
    energy_offset_ev: tuple[float, float] = (-100.0, 2500.0)


@runtime_checkable
class EnergyFilter(Protocol):
    """An imaging energy filter (EFTEM); its images come through a :class:`Camera`. Raises
    LimitExceeded (nothing changed), DeviceBusy, DeviceTimeout, DeviceDisconnected."""

    name: str
    limits: EnergyFilterLimits

    def slit_in(self) -> None: ...

    def slit_out(self) -> None: ...

    def is_slit_in(self) -> bool: ...

    def get_slit_width_ev(self) -> float: ...

    def set_slit_width_ev(self, width_ev: float) -> None: ...

    def get_energy_offset_ev(self) -> float: ...

    def set_energy_offset_ev(self, offset_ev: float) -> None: ...

    def wait_settled(self, timeout_s: float = 5.0) -> None: ...


@runtime_checkable
class BeamBlanker(Protocol):
    """Beam blanking (dark references: the camera exposed with no electrons on it). Raises
    DeviceReadOnly (nothing changed), DeviceTimeout, DeviceDisconnected."""

    name: str

    def set_beam_blanked(self, blanked: bool) -> None:
        """Blank (True) or unblank (False) the beam; returns once it has acted."""
        ...

    def is_beam_blanked(self) -> bool: ...
