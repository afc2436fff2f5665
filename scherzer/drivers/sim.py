"""Drivers on the :class:`~scherzer.simulators.microscope.VirtualMicroscope`.

They satisfy the :mod:`scherzer.drivers.base` protocols and honour time: an exposure of
``exposure_s`` or a scan of ``ny·(nx·dwell + flyback)`` advances the microscope's simulated clock by
exactly that much (so records, drift and lens settling stay realistic) and sleeps
``simulated / speedup`` real seconds (tests use a large ``speedup``). Every wait is bounded.
Units: seconds, nm, µs, mrad as named.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from scherzer.drivers.base import (
    CameraFrame,
    DeviceError,
    DeviceTimeout,
    LensLimits,
    ScanFrame,
    ScanSettings,
)

__all__ = ["SimCamera", "SimLens", "SimScanGenerator", "SimTimer"]


class SimTimer:
    """Advances the microscope clock and sleeps the scaled real time."""

    def __init__(self, microscope: Any, speedup: float = 1.0) -> None:
        if speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {speedup}")
        self.microscope = microscope
        self.speedup = float(speedup)

    def now_s(self) -> float:
        return float(self.microscope.clock.now_s())

    def pass_s(self, duration_s: float, since_s: float | None = None) -> None:
        """Let ``duration_s`` of simulated time pass (counting from ``since_s`` if given)."""
        elapsed = 0.0 if since_s is None else self.now_s() - since_s
        rest = max(0.0, duration_s - elapsed)
        if rest > 0:
            self.microscope.clock.advance(rest)
        if duration_s > 0:
            time.sleep(duration_s / self.speedup)


def _wrap_device_errors(name: str, exc: Exception) -> DeviceError:
    if isinstance(exc, DeviceError):
        if not exc.device:
            exc.device = name
        return exc
    return DeviceError(f"{name}: simulator failed: {exc}", device=name)


class SimCamera:
    """A TEM camera on the virtual microscope (``Camera`` protocol)."""

    def __init__(self, microscope: Any, *, speedup: float = 1.0, name: str = "sim-camera") -> None:
        self.name = name
        self.microscope = microscope
        self.timer = SimTimer(microscope, speedup)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.microscope.camera_shape)

    def acquire(
        self,
        exposure_s: float,
        binning: int = 1,
        region: tuple[int, int, int, int] | None = None,
    ) -> CameraFrame:
        if not exposure_s > 0:
            raise ValueError(f"exposure_s must be > 0, got {exposure_s}")
        t0 = self.timer.now_s()
        try:
            image, record, truth = self.microscope.acquire_image(
                exposure_s, binning=binning, region=region
            )
        except Exception as exc:
            raise _wrap_device_errors(self.name, exc) from exc
        self.timer.pass_s(exposure_s, since_s=t0)
        pixel = float(self.microscope.camera_pixel_nm) * binning
        return CameraFrame(image=image, record=record, pixel_size_nm=(pixel, pixel), truth=truth)


class SimScanGenerator:
    """A STEM scan generator with several detectors on the virtual microscope."""

    def __init__(self, microscope: Any, *, speedup: float = 1.0, name: str = "sim-scan") -> None:
        self.name = name
        self.microscope = microscope
        self.timer = SimTimer(microscope, speedup)
        self.settings = ScanSettings()
        self._abort = threading.Event()

    def configure(self, settings: ScanSettings) -> None:
        ny, nx = settings.size_px
        if ny < 1 or nx < 1 or settings.dwell_us <= 0 or settings.flyback_us < 0:
            raise ValueError(f"invalid scan settings {settings}")
        if not settings.signals:
            raise ValueError("scan settings need at least one signal (e.g. 'HAADF')")
        self.settings = settings

    def frame_time_s(self) -> float:
        ny, nx = self.settings.size_px
        return ny * (nx * self.settings.dwell_us + self.settings.flyback_us) * 1e-6

    def acquire(self) -> ScanFrame:
        self._abort.clear()
        t0 = self.timer.now_s()
        try:
            images, records, truth = self.microscope.acquire_scan(self.settings)
        except Exception as exc:
            raise _wrap_device_errors(self.name, exc) from exc
        self.timer.pass_s(self.frame_time_s(), since_s=t0)
        if self._abort.is_set():
            raise DeviceError(
                f"{self.name}: scan aborted; the frame was discarded", device=self.name
            )
        pixel = float(self.settings.pixel_nm)
        return ScanFrame(images=images, records=records, pixel_size_nm=(pixel, pixel), truth=truth)

    def abort(self) -> None:
        self._abort.set()


class SimLens:
    """The objective lens of the virtual microscope (``Lens`` protocol)."""

    def __init__(
        self,
        microscope: Any,
        *,
        speedup: float = 1.0,
        name: str = "sim-lens",
        limits: LensLimits | None = None,
    ) -> None:
        self.name = name
        self.microscope = microscope
        self.timer = SimTimer(microscope, speedup)
        self.limits = limits or getattr(microscope.lens, "limits", LensLimits())

    @property
    def _lens(self) -> Any:
        return self.microscope.lens

    def get_defocus_nm(self) -> float:
        return float(self._lens.readback_defocus_nm())

    def set_defocus_nm(self, defocus_nm: float) -> None:
        self._lens.set_defocus_nm(defocus_nm)

    def get_stigmator(self) -> tuple[float, float]:
        m, a = self._lens.readback_stigmator()
        return float(m), float(a)

    def set_stigmator(self, magnitude_nm: float, angle_deg: float) -> None:
        self._lens.set_stigmator(magnitude_nm, angle_deg)

    def get_beam_tilt_mrad(self) -> tuple[float, float]:
        ty, tx = self._lens.beam_tilt_mrad()
        return float(ty), float(tx)

    def set_beam_tilt_mrad(self, tilt_y_mrad: float, tilt_x_mrad: float) -> None:
        self._lens.set_beam_tilt_mrad(tilt_y_mrad, tilt_x_mrad)

    def wait_settled(self, timeout_s: float = 5.0) -> None:
        remaining = float(self._lens.settle_remaining_s())
        if remaining > timeout_s:
            self.timer.pass_s(timeout_s)
            raise DeviceTimeout(
                f"{self.name}: lens still settling after {timeout_s:g} s "
                f"({remaining - timeout_s:.3g} s to go); raise the settle timeout",
                device=self.name,
            )
        self.timer.pass_s(remaining)
