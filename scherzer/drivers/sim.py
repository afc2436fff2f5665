"""Drivers on the :class:`~scherzer.simulators.microscope.VirtualMicroscope`.

They satisfy the :mod:`scherzer.drivers.base` protocols and honour time: an exposure of
``exposure_s`` or a scan of ``ny·(nx·dwell + flyback)`` advances the microscope's simulated clock by
exactly that much (so records, drift and lens settling stay realistic) and sleeps
``simulated / speedup`` real seconds (tests use a large ``speedup``). Every wait is bounded.
Units: seconds, nm, µs, mrad as named.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np

from scherzer.drivers.base import (
    CameraFrame,
    DeviceDisconnected,
    DeviceError,
    DeviceReadOnly,
    DeviceTimeout,
    LensLimits,
    LimitExceeded,
    ScanFrame,
    ScanSettings,
)
from scherzer.stack import FrameRecord

__all__ = [
    "EFTEM_BEAM_E_PER_PX_S",
    "EFTEM_PIXEL_NM",
    "PatternBench",
    "PatternCamera",
    "PatternLens",
    "PatternScanGenerator",
    "SimBlanker",
    "SimCamera",
    "SimEnergyFilter",
    "SimFilterCamera",
    "SimLens",
    "SimScanGenerator",
    "SimTimer",
    "eftem_devices",
]


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
        real = max(duration_s, self.now_s() - since_s if since_s is not None else 0.0)
        if real > 0:
            time.sleep(real / self.speedup)


def _wrap_device_errors(name: str, exc: Exception) -> DeviceError:
    if isinstance(exc, DeviceError):
        if not exc.device:
            exc.device = name
        return exc
    return DeviceError(f"{name}: simulator failed: {exc}", device=name)


def _expose(name: str, timer: SimTimer, exposure_s: float, grab: Any) -> Any:
    """``grab()`` as an exposure of ``exposure_s`` on the simulated clock: the exposure checked
    first, any failure as a coded DeviceError of device ``name``, the clock advanced after."""
    if not exposure_s > 0:
        raise ValueError(f"exposure_s must be > 0, got {exposure_s}")
    t0 = timer.now_s()
    try:
        result = grab()
    except Exception as exc:
        raise _wrap_device_errors(name, exc) from exc
    timer.pass_s(exposure_s, since_s=t0)
    return result


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
        image, record, truth = _expose(
            self.name, self.timer, exposure_s,
            lambda: self.microscope.acquire_image(exposure_s, binning=binning, region=region),
        )  # fmt: skip
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


class SimStage:
    """The virtual microscope's specimen stage (absolute positions in nm, (y, x)); moving it
    moves the specimen content by the same amount (what drift tracking uses to re-centre)."""

    name = "sim-stage"
    LIMIT_NM = 1e6  # ± travel (1 mm)

    def __init__(self, scope: Any) -> None:
        self._scope = scope  # a VirtualMicroscope

    def get_position_nm(self) -> tuple[float, float]:
        return self._scope.stage_position_nm()

    def move_to_nm(self, y_nm: float, x_nm: float) -> None:
        for name, v in (("y", y_nm), ("x", x_nm)):
            if not (math.isfinite(v) and abs(v) <= self.LIMIT_NM):
                raise LimitExceeded(
                    f"stage {name} {v} nm outside ±{self.LIMIT_NM:g} nm", device=self.name
                )
        self._scope.move_stage_nm(float(y_nm), float(x_nm))


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


# --- EFTEM: the imaging filter, its camera and the beam blanker ----------------------------------
#: Pixel size of the simulated filter camera's EFTEM specimen (low magnification, as EFTEM is).
EFTEM_PIXEL_NM = 0.5
#: Vacuum electrons per pixel per second through the simulated filter: bright enough that a
#: series 100–600 eV stays under 32 s exposures with counts in the default band.
EFTEM_BEAM_E_PER_PX_S = 1.6e6
#: EFTEM specimen: spheres per (128 px)² field (density kept for other fields), their radii and
#: the carbon film's thickness (TiO2 and Fe2O3 particles; the Ti L2,3 edge stands out clearly).
EFTEM_PARTICLES_PER_128PX2 = 25
EFTEM_RADIUS_NM = (2.5, 6.0)
EFTEM_FILM_NM = 5.0


class _FilterState:
    """What the filter camera and the blanker share (beam blanked or not), and read-only mode."""

    def __init__(self, read_only: bool) -> None:
        self.blanked = False
        self.read_only = bool(read_only)
        self.lock = threading.Lock()


def _refuse_read_only(state: _FilterState, device: str, what: str) -> None:
    if state.read_only:
        raise DeviceReadOnly(
            f"{device}: connected read-only; {what} was refused and nothing was sent "
            "(set devices.read_only = false to allow changes)",
            device=device,
            details={"read_only": True},
        )


class SimEnergyFilter:
    """The ``EnergyFilter`` of the virtual microscope (a
    :class:`~scherzer.simulators.energy_filter.VirtualEnergyFilter`): settings outside its
    limits raise ``LimitExceeded``; in read-only mode every change that would alter a setting
    raises ``DeviceReadOnly`` (asking for the current value is allowed)."""

    def __init__(self, virtual: Any, state: _FilterState, name: str = "sim-energy-filter") -> None:
        self.name = name
        self.virtual = virtual
        self.limits = virtual.limits
        self._state = state

    def _change(self, what: str, same: bool, fn: Any, *args: Any) -> None:
        if same:
            return
        _refuse_read_only(self._state, self.name, what)
        try:
            fn(*args)
        except Exception as exc:
            raise _wrap_device_errors(self.name, exc) from exc

    def slit_in(self) -> None:
        self._change("slit in", self.is_slit_in(), self.virtual.slit_in)

    def slit_out(self) -> None:
        self._change("slit out", not self.is_slit_in(), self.virtual.slit_out)

    def is_slit_in(self) -> bool:
        return bool(self.virtual.is_slit_in())

    def get_slit_width_ev(self) -> float:
        return float(self.virtual.get_slit_width_ev())

    def set_slit_width_ev(self, width_ev: float) -> None:
        same = width_ev == self.get_slit_width_ev()
        self._change(f"slit width {width_ev} eV", same, self.virtual.set_slit_width_ev, width_ev)

    def get_energy_offset_ev(self) -> float:
        return float(self.virtual.get_energy_offset_ev())

    def set_energy_offset_ev(self, offset_ev: float) -> None:
        same = offset_ev == self.get_energy_offset_ev()
        what = f"energy offset {offset_ev} eV"
        self._change(what, same, self.virtual.set_energy_offset_ev, offset_ev)

    def wait_settled(self, timeout_s: float = 5.0) -> None:
        self.virtual.wait_settled(timeout_s)


class SimBlanker:
    """The virtual microscope's beam blanker (``BeamBlanker``): acts on the filter camera."""

    def __init__(self, state: _FilterState, name: str = "sim-blanker") -> None:
        self.name = name
        self._state = state

    def set_beam_blanked(self, blanked: bool) -> None:
        if bool(blanked) == self.is_beam_blanked():
            return
        _refuse_read_only(self._state, self.name, "blanking the beam" if blanked else "unblanking")
        with self._state.lock:
            self._state.blanked = bool(blanked)

    def is_beam_blanked(self) -> bool:
        with self._state.lock:
            return self._state.blanked


class SimFilterCamera:
    """The camera after the simulated filter (``Camera``): exposes the filter's EFTEM specimen
    (beam blanked: a dark reference), honours the microscope's injected camera faults and its
    clock (the exposure plus read-out pass, slept ``/ speedup``). Binning sums, a region
    (y0, x0, height, width) in unbinned px crops."""

    def __init__(
        self, virtual: Any, state: _FilterState, microscope: Any, *, speedup: float = 1.0,
        name: str = "sim-filter-camera",
    ) -> None:  # fmt: skip
        self.name = name
        self.virtual = virtual
        self.microscope = microscope
        self.timer = SimTimer(microscope, speedup)
        self._state = state

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.virtual.specimen.shape_px)

    def acquire(
        self,
        exposure_s: float,
        binning: int = 1,
        region: tuple[int, int, int, int] | None = None,
    ) -> CameraFrame:
        ny, nx = self.shape
        y0, x0, h, w = region if region is not None else (0, 0, ny, nx)
        if (
            binning < 1
            or h % binning
            or w % binning
            or min(y0, x0) < 0
            or y0 + h > ny
            or x0 + w > nx
        ):
            raise LimitExceeded(
                f"{self.name}: region {region} / binning {binning} do not fit the {ny}×{nx} camera",
                device=self.name,
            )
        image, record, truth = _expose(self.name, self.timer, exposure_s, self._grab(exposure_s))
        image = image[y0 : y0 + h, x0 : x0 + w]
        image = image.reshape(h // binning, binning, w // binning, binning).sum((1, 3))
        pixel = float(self.virtual.specimen.pixel_nm) * binning
        return CameraFrame(np.ascontiguousarray(image, np.float32), record, (pixel, pixel), truth)

    def _grab(self, exposure_s: float) -> Any:
        def grab() -> Any:
            check = getattr(self.microscope, "_check_faults", None)
            if check is not None:
                check("camera")
            return self.virtual.acquire(exposure_s, blanked=self.blanked)

        return grab

    @property
    def blanked(self) -> bool:
        with self._state.lock:
            return self._state.blanked


def eftem_devices(
    microscope: Any, *, speedup: float = 1.0, seed: int = 0, read_only: bool = False
) -> tuple[SimEnergyFilter, SimFilterCamera, SimBlanker]:
    """The simulated EFTEM devices on ``microscope``: a filter on its clock, drift and stage,
    imaging a seeded EFTEM specimen of the microscope's camera shape (``EFTEM_*`` constants)."""
    from scherzer.simulators.energy_filter import VirtualEnergyFilter, make_eftem_specimen

    shape = tuple(int(v) for v in microscope.camera_shape)
    area = shape[0] * shape[1] / 128.0**2
    specimen = make_eftem_specimen(
        shape, EFTEM_PIXEL_NM, seed=seed, radius_nm=EFTEM_RADIUS_NM,
        n_particles=max(1, round(EFTEM_PARTICLES_PER_128PX2 * area)),
        film_thickness_nm=EFTEM_FILM_NM,
    )  # fmt: skip
    virtual = VirtualEnergyFilter.on_microscope(
        microscope, specimen, beam_e_per_px_s=EFTEM_BEAM_E_PER_PX_S, seed=seed
    )
    state = _FilterState(read_only)
    camera = SimFilterCamera(virtual, state, microscope, speedup=speedup)
    return SimEnergyFilter(virtual, state), camera, SimBlanker(state)


# --- test-pattern devices (no physics: fast protocol tests, bench, CI without simulators) -------
class PatternClock:
    """A stand-in for the microscope clock of the pattern devices."""

    def __init__(self) -> None:
        self._t = 0.0
        self._lock = threading.Lock()

    def now_s(self) -> float:
        with self._lock:
            return self._t

    def advance(self, dt_s: float) -> float:
        with self._lock:
            self._t += float(dt_s)
            return self._t


class PatternBench:
    """Shared state of the pattern devices: clock, lens values, injected faults."""

    def __init__(self, camera_shape: tuple[int, int] = (64, 64), pixel_nm: float = 0.02) -> None:
        self.clock = PatternClock()
        self.camera_shape = (int(camera_shape[0]), int(camera_shape[1]))
        self.camera_pixel_nm = float(pixel_nm)
        self.defocus_nm = 0.0
        self.stigmator = (0.0, 0.0)
        self.beam_tilt_mrad = (0.0, 0.0)
        self.calls = 0
        self._faults: list[tuple[str, int]] = []

    def inject_fault(self, kind: str, after_calls: int = 0) -> None:
        """After ``after_calls`` more acquisitions the next raises (timeout|disconnected)."""
        if kind not in ("timeout", "disconnected"):
            raise ValueError(f"fault kind must be 'timeout' or 'disconnected'; got {kind!r}")
        self._faults.append((kind, self.calls + int(after_calls)))

    def check_faults(self, device: str) -> None:
        for fault in list(self._faults):
            kind, at = fault
            if self.calls >= at:
                self._faults.remove(fault)
                cls = DeviceTimeout if kind == "timeout" else DeviceDisconnected
                raise cls(
                    f"pattern {device}: injected {kind}; retry or check the connection",
                    device=f"pattern-{device}",
                    details={"injected": True, "kind": kind},
                )
        self.calls += 1

    def pattern(self, shape: tuple[int, int], t_s: float) -> np.ndarray:
        """A ramp plus a time stamp: frames differ, values are exact and easy to check."""
        ny, nx = shape
        img = np.add.outer(np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32))
        img[0, 0] = np.float32(t_s)
        return img


class PatternCamera:
    """``Camera`` returning :meth:`PatternBench.pattern` (binned by summing)."""

    def __init__(self, bench: PatternBench, *, speedup: float = 1.0, name: str = "pattern-camera"):
        self.name = name
        self.bench = bench
        self.timer = SimTimer(bench, speedup)

    def acquire(self, exposure_s: float, binning: int = 1, region=None) -> CameraFrame:
        if not exposure_s > 0:
            raise ValueError(f"exposure_s must be > 0, got {exposure_s}")
        self.bench.check_faults("camera")
        ny, nx = self.bench.camera_shape
        y0, x0, h, w = region if region is not None else (0, 0, ny, nx)
        t0 = self.timer.now_s()
        img = self.bench.pattern((ny, nx), t0)[y0 : y0 + h, x0 : x0 + w]
        img = img.reshape(h // binning, binning, w // binning, binning).sum((1, 3))
        record = FrameRecord(
            index=0,
            time_s=t0,
            defocus_nominal_nm=self.bench.defocus_nm,
            defocus_readback_nm=self.bench.defocus_nm,
            exposure_s=exposure_s,
            signal="image",
        )
        self.timer.pass_s(exposure_s)
        pixel = self.bench.camera_pixel_nm * binning
        return CameraFrame(np.ascontiguousarray(img, np.float32), record, (pixel, pixel))


class PatternScanGenerator:
    """``ScanGenerator`` returning one pattern per signal (signal k adds k)."""

    def __init__(self, bench: PatternBench, *, speedup: float = 1.0, name: str = "pattern-scan"):
        self.name = name
        self.bench = bench
        self.timer = SimTimer(bench, speedup)
        self.settings = ScanSettings()

    def configure(self, settings: ScanSettings) -> None:
        self.settings = settings

    def acquire(self) -> ScanFrame:
        self.bench.check_faults("scan")
        s = self.settings
        t0 = self.timer.now_s()
        base = self.bench.pattern(tuple(s.size_px), t0)
        images = {sig: base + k for k, sig in enumerate(s.signals)}
        records = {
            sig: FrameRecord(
                index=0,
                time_s=t0,
                scan_rotation_deg=s.rotation_deg,
                dwell_us=s.dwell_us,
                signal=sig,
            )
            for sig in s.signals
        }
        ny, nx = s.size_px
        self.timer.pass_s(ny * (nx * s.dwell_us + s.flyback_us) * 1e-6)
        return ScanFrame(images, records, (s.pixel_nm, s.pixel_nm))

    def abort(self) -> None:
        pass


class PatternLens:
    """``Lens`` that remembers its values (settles at once, limits enforced)."""

    def __init__(self, bench: PatternBench, *, name: str = "pattern-lens", limits=None):
        self.name = name
        self.bench = bench
        self.limits = limits or LensLimits()

    def get_defocus_nm(self) -> float:
        return self.bench.defocus_nm

    def set_defocus_nm(self, defocus_nm: float) -> None:
        lo, hi = self.limits.defocus_nm
        if not lo <= defocus_nm <= hi:
            raise LimitExceeded(f"defocus {defocus_nm} nm outside [{lo}, {hi}] nm; nothing changed")
        self.bench.defocus_nm = float(defocus_nm)

    def get_stigmator(self) -> tuple[float, float]:
        return self.bench.stigmator

    def set_stigmator(self, magnitude_nm: float, angle_deg: float) -> None:
        if not 0 <= magnitude_nm <= self.limits.stigmator_nm:
            raise LimitExceeded(
                f"stigmator {magnitude_nm} nm outside [0, "
                f"{self.limits.stigmator_nm}] nm; nothing changed"
            )
        self.bench.stigmator = (float(magnitude_nm), float(angle_deg) % 180.0)

    def get_beam_tilt_mrad(self) -> tuple[float, float]:
        return self.bench.beam_tilt_mrad

    def set_beam_tilt_mrad(self, tilt_y_mrad: float, tilt_x_mrad: float) -> None:
        self.bench.beam_tilt_mrad = (float(tilt_y_mrad), float(tilt_x_mrad))

    def wait_settled(self, timeout_s: float = 5.0) -> None:
        return None
