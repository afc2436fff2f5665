"""Thermo Fisher / FEI microscopes (Tecnai, Talos, Titan, Krios, Spectra) through temscript.

Optional extra ``scherzer[tfs]``. ``temscript-server`` runs on the microscope PC and exposes the
TEM Scripting interface over HTTP; these drivers talk to it through
:class:`~scherzer.drivers.temscript_link.TemscriptLink` (JSON only, bounded waits, every failure a
:class:`~scherzer.drivers.base.DeviceError`). :func:`open_temscript` builds the three devices on
one link:

* :class:`TemscriptLens` (``Lens``): defocus, objective stigmator, beam tilt, plus image shift.
  Every set is checked against the limits *before* anything is sent (:class:`LimitExceeded`),
  then read back; a read-back that disagrees with the request raises :class:`DeviceError`.
* :class:`TemscriptCamera` (``Camera``): CCD/CMOS frames with exposure, binning and region, image
  correction ``DEFAULT`` (dark/gain-corrected as the instrument does it).
* :class:`TemscriptScanGenerator` (``ScanGenerator``): STEM detectors acquired together, dwell,
  frame size (FULL/HALF/QUARTER × binning of the full scan), scan rotation.

Units. temscript speaks SI: metres, radians, seconds; the objective stigmator and (on most
families) the defocus ("Focus") are in the instrument's logical units. Conversion happens here
only, through calibrations in :class:`TemscriptSettings`: ``defocus_nm_per_unit`` (1e9, i.e.
metres, for temscript's NullMicroscope, the simulated server and Titan 1.1 software; measure it on
other instruments) with ``defocus_offset_nm`` (Scherzer's C1 when the instrument reads 0),
``stigmator_nm_per_unit`` (none = stigmator reads and sets refused until calibrated),
``pixel_size_nm`` (none = detector pixel / indicated magnification). temscript pairs are (x, y);
Scherzer's are (y, x). Read-backs are rounded to 1e-6 nm (float noise of the m ↔ nm conversion).

Read-only mode (``read_only=True``): reads and acquisitions work, every optics change (defocus,
stigmator, beam tilt, image shift, scan rotation, STEM magnification) raises
:class:`ReadOnlyRefused` before it is sent. A set to the value already there is accepted without
a call (plans restore what they read).

Per frame the instrument parameters read at acquisition (voltage, mode, magnification or camera
length, pixel size and its source) travel in ``frame.truth["instrument"]`` (they are what the
instrument reported, not simulator truth) and :meth:`TemscriptInstruments.describe_instrument`
gives the same once per job.

The daemon builds the devices through the driver registry (``devices.kind = "temscript"``):
:func:`open_bench` takes the typed ``[devices]`` settings, :func:`settings_from_devices` maps
its ``temscript_*`` fields (and ``read_only``) onto :class:`TemscriptSettings`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import structlog

from scherzer.drivers.base import DeviceError, DeviceTimeout
from scherzer.drivers.temscript_acquire import TemscriptCamera, TemscriptScanGenerator
from scherzer.drivers.temscript_link import (
    MRAD_PER_RAD,
    NM_PER_M,
    READBACK_DECIMALS_NM,
    ReadOnlyRefused,
    TemscriptLink,
    TemscriptPart,
    TemscriptSettings,
    check_finite,
)
from scherzer.settings import REQUIRED_OPTICS

__all__ = [
    "ReadOnlyRefused",
    "TemscriptCamera",
    "TemscriptInstruments",
    "TemscriptLens",
    "TemscriptScanGenerator",
    "TemscriptSettings",
    "open_bench",
    "open_temscript",
    "settings_from_devices",
]

log = structlog.get_logger("scherzer.temscript")


class TemscriptLens(TemscriptPart):
    """Objective lens over temscript (``Lens`` protocol; see the module docstring)."""

    def __init__(self, link: TemscriptLink, settings: TemscriptSettings) -> None:
        super().__init__(link, settings, f"{settings.name}-lens")
        self.limits = settings.limits
        self.last_setpoint_nm: float | None = None
        self._settled_at = 0.0  # time.monotonic() when the last change counts as settled

    # --- defocus -------------------------------------------------------------------------
    def get_defocus_nm(self) -> float:
        raw = self._float(self.link.read("reading defocus", lambda m: m.get_defocus()), "defocus")
        value = raw * self.cfg.defocus_nm_per_unit + self.cfg.defocus_offset_nm
        return round(value, READBACK_DECIMALS_NM)

    def set_defocus_nm(self, defocus_nm: float) -> None:
        check_finite("defocus_nm", defocus_nm)
        lo, hi = self.limits.defocus_nm
        if not lo <= defocus_nm <= hi:
            raise self._limit(
                f"defocus {defocus_nm:g} nm is outside [{lo:g}, {hi:g}] nm",
                defocus_nm=defocus_nm,
                limits_nm=[lo, hi],
            )
        if self.link.read_only and self._same(self.get_defocus_nm(), defocus_nm):
            return
        units = (defocus_nm - self.cfg.defocus_offset_nm) / self.cfg.defocus_nm_per_unit
        self.link.change(f"setting defocus to {defocus_nm:g} nm", lambda m: m.set_defocus(units))
        self._changed()
        self.last_setpoint_nm = float(defocus_nm)
        readback = self.get_defocus_nm()
        if not self._same(readback, defocus_nm):
            raise DeviceError(
                f"{self.name}: defocus reads back {readback:g} nm after a set of {defocus_nm:g} "
                "nm; the instrument may have clamped it — check the calibration and limits",
                device=self.name,
                details={"set_nm": defocus_nm, "readback_nm": readback},
            )

    def _same(self, a_nm: float, b_nm: float) -> bool:
        return abs(a_nm - b_nm) <= self.cfg.readback_tolerance_nm

    # --- stigmator -----------------------------------------------------------------------
    def _stig_scale(self) -> float:
        scale = self.cfg.stigmator_nm_per_unit
        if scale is None:
            raise DeviceError(
                f"{self.name}: the objective stigmator is not calibrated; set "
                "devices.temscript_stigmator_nm_per_unit (nm of A1 per stigmator unit)",
                device=self.name,
            )
        return scale

    def get_stigmator(self) -> tuple[float, float]:
        scale = self._stig_scale()
        reply = self.link.read(
            "reading the objective stigmator", lambda m: m.get_objective_stigmator()
        )
        sx, sy = self._pair(reply, "objective stigmator")
        magnitude = round(math.hypot(sx, sy) * scale, READBACK_DECIMALS_NM)
        angle = math.degrees(math.atan2(sy, sx)) / 2.0 + self.cfg.stigmator_angle_offset_deg
        return magnitude, round(angle % 180.0, READBACK_DECIMALS_NM)

    def set_stigmator(self, magnitude_nm: float, angle_deg: float) -> None:
        check_finite("stigmator", magnitude_nm, angle_deg)
        scale = self._stig_scale()
        if not 0 <= magnitude_nm <= self.limits.stigmator_nm:
            raise self._limit(
                f"stigmator {magnitude_nm:g} nm is outside [0, {self.limits.stigmator_nm:g}] nm"
            )
        phi2 = math.radians(2.0 * (angle_deg - self.cfg.stigmator_angle_offset_deg))
        xy = (magnitude_nm / scale * math.cos(phi2), magnitude_nm / scale * math.sin(phi2))
        if self.link.read_only and self._stig_same(self.get_stigmator(), magnitude_nm, angle_deg):
            return
        self.link.change(
            f"setting the stigmator to {magnitude_nm:g} nm at {angle_deg:g}°",
            lambda m: m.set_objective_stigmator(xy),
        )
        self._changed()
        got = self.get_stigmator()
        if not self._stig_same(got, magnitude_nm, angle_deg):
            raise DeviceError(
                f"{self.name}: stigmator reads back {got} after a set of "
                f"({magnitude_nm:g} nm, {angle_deg:g}°)",
                device=self.name,
            )

    def _stig_same(self, got: tuple[float, float], magnitude_nm: float, angle_deg: float) -> bool:
        want = magnitude_nm * complex(
            math.cos(math.radians(2 * angle_deg)), math.sin(math.radians(2 * angle_deg))
        )
        have = got[0] * complex(
            math.cos(math.radians(2 * got[1])), math.sin(math.radians(2 * got[1]))
        )
        return abs(want - have) <= self.cfg.readback_tolerance_nm

    # --- beam tilt and image shift -------------------------------------------------------
    def get_beam_tilt_mrad(self) -> tuple[float, float]:
        reply = self.link.read("reading beam tilt", lambda m: m.get_beam_tilt())
        tx, ty = self._pair(reply, "beam tilt")
        return ty * MRAD_PER_RAD, tx * MRAD_PER_RAD

    def set_beam_tilt_mrad(self, tilt_y_mrad: float, tilt_x_mrad: float) -> None:
        check_finite("beam tilt", tilt_y_mrad, tilt_x_mrad)
        top = self.limits.beam_tilt_mrad
        if max(abs(tilt_y_mrad), abs(tilt_x_mrad)) > top:
            raise self._limit(
                f"beam tilt ({tilt_y_mrad:g}, {tilt_x_mrad:g}) mrad exceeds ±{top:g} mrad per axis"
            )
        want = (tilt_y_mrad, tilt_x_mrad)
        tol = self.cfg.readback_tolerance_mrad
        if self.link.read_only and _close(self.get_beam_tilt_mrad(), want, tol):
            return
        rad = (tilt_x_mrad / MRAD_PER_RAD, tilt_y_mrad / MRAD_PER_RAD)  # temscript is (x, y)
        self.link.change(f"setting beam tilt to {want} mrad", lambda m: m.set_beam_tilt(rad))
        self._changed()
        got = self.get_beam_tilt_mrad()
        if not _close(got, want, tol):
            raise DeviceError(
                f"{self.name}: beam tilt reads back {got} mrad after a set of {want} mrad",
                device=self.name,
            )

    def get_image_shift_nm(self) -> tuple[float, float]:
        """Image shift (y, x) in nm (TEM Scripting's user image shift, calibrated in metres)."""
        reply = self.link.read("reading image shift", lambda m: m.get_image_shift())
        sx, sy = self._pair(reply, "image shift")
        return round(sy * NM_PER_M, READBACK_DECIMALS_NM), round(
            sx * NM_PER_M, READBACK_DECIMALS_NM
        )

    def set_image_shift_nm(self, y_nm: float, x_nm: float) -> None:
        check_finite("image shift", y_nm, x_nm)
        top = self.cfg.image_shift_limit_nm
        if max(abs(y_nm), abs(x_nm)) > top:
            raise self._limit(f"image shift ({y_nm:g}, {x_nm:g}) nm exceeds ±{top:g} nm per axis")
        tol = self.cfg.readback_tolerance_nm
        if self.link.read_only and _close(self.get_image_shift_nm(), (y_nm, x_nm), tol):
            return
        metres = (x_nm / NM_PER_M, y_nm / NM_PER_M)
        self.link.change(
            f"setting image shift to ({y_nm:g}, {x_nm:g}) nm", lambda m: m.set_image_shift(metres)
        )
        got = self.get_image_shift_nm()
        if not _close(got, (y_nm, x_nm), tol):
            raise DeviceError(
                f"{self.name}: image shift reads back {got} nm after a set of "
                f"({y_nm:g}, {x_nm:g}) nm",
                device=self.name,
            )

    # --- settling ------------------------------------------------------------------------
    def _changed(self) -> None:
        self._settled_at = time.monotonic() + self.cfg.settle_s

    def wait_settled(self, timeout_s: float = 5.0) -> None:
        """Wait out ``settle_s`` after the last change (TEM Scripting has no settled flag)."""
        remaining = self._settled_at - time.monotonic()
        if remaining > timeout_s:
            time.sleep(max(timeout_s, 0.0))
            raise DeviceTimeout(
                f"{self.name}: settle time {self.cfg.settle_s:g} s exceeds the timeout "
                f"{timeout_s:g} s; raise the settle timeout",
                device=self.name,
            )
        if remaining > 0:
            time.sleep(remaining)


def _close(a: tuple[float, float], b: tuple[float, float], tol: float) -> bool:
    return abs(a[0] - b[0]) <= tol and abs(a[1] - b[1]) <= tol


@dataclass
class TemscriptInstruments:
    """The three devices on one link, what the instrument is, and how to close the link."""

    link: TemscriptLink
    lens: TemscriptLens
    camera: TemscriptCamera
    scan: TemscriptScanGenerator
    settings: TemscriptSettings

    def describe_instrument(self) -> dict[str, Any]:
        """Family, id, version, voltage, cameras, detectors, the calibrations in use and
        ``optics`` (the voltage and whatever of Cs, focal spread, divergence the settings give)."""
        raw = self.link.read(
            "describing the instrument",
            lambda m: {
                "family": m.get_family(),
                "microscope_id": m.get_microscope_id(),
                "temscript_version": m.get_version(),
                "cameras": m.get_cameras(),
                "stem_detectors": m.get_stem_detectors(),
            },
        )
        cfg = self.settings
        state = self.camera.instrument_state()
        optics = {"voltage_kv": state["voltage_kv"]} | {
            key: getattr(cfg, key)
            for key in REQUIRED_OPTICS  # the instrument reports only the voltage
            if key != "voltage_kv" and getattr(cfg, key) is not None
        }
        calibrations = {
            "url": cfg.url,
            "read_only": cfg.read_only,
            "defocus_nm_per_unit": cfg.defocus_nm_per_unit,
            "defocus_offset_nm": cfg.defocus_offset_nm,
            "stigmator_nm_per_unit": cfg.stigmator_nm_per_unit,
            "pixel_size_nm_calibration": cfg.pixel_size_nm,
        }
        return raw | state | calibrations | {"optics": optics}

    def close(self) -> None:
        self.link.close()


def open_temscript(settings: TemscriptSettings, *, check: bool = True) -> TemscriptInstruments:
    """Lens, camera and scan generator on one link to ``settings.url``. ``check`` asks the server
    its version first (DeviceDisconnected/DeviceTimeout/DeviceProtocolError if that fails)."""
    link = TemscriptLink(
        settings.url, timeout_s=settings.timeout_s, read_only=settings.read_only, name=settings.name
    )
    if check:
        link.check_server()
    lens = TemscriptLens(link, settings)
    return TemscriptInstruments(
        link=link,
        lens=lens,
        camera=TemscriptCamera(link, settings, lens),
        scan=TemscriptScanGenerator(link, settings, lens),
        settings=settings,
    )


#: TemscriptSettings field → the ``[devices]`` setting it is read from (when present there).
DEVICE_SETTING_NAMES = {
    "url": "temscript_url",
    "read_only": "read_only",
    "timeout_s": "temscript_timeout_s",
    "acquire_margin_s": "temscript_acquire_margin_s",
    "camera": "temscript_camera",
    "defocus_nm_per_unit": "temscript_defocus_nm_per_unit",
    "defocus_offset_nm": "temscript_defocus_offset_nm",
    "stigmator_nm_per_unit": "temscript_stigmator_nm_per_unit",
    "pixel_size_nm": "temscript_pixel_size_nm",
    "settle_s": "temscript_settle_s",
    "stem_full_size_px": "temscript_stem_full_size_px",
    "stem_field_nm_times_mag": "temscript_stem_field_nm_times_mag",
    # optics TEM Scripting does not report, from the one instrument-setting declaration
    **{key: f"temscript_{key}" for key in REQUIRED_OPTICS if key != "voltage_kv"},
}


def settings_from_devices(dev: Any) -> TemscriptSettings:
    """TemscriptSettings from the typed ``[devices]`` settings: each field of
    :data:`DEVICE_SETTING_NAMES` the section declares; the rest keep their defaults.
    ``temscript_defocus_limits_nm`` (lo, hi), when declared, sets the lens's defocus limits."""
    values = {
        field_name: getattr(dev, setting)
        for field_name, setting in DEVICE_SETTING_NAMES.items()
        if getattr(dev, setting, None) is not None
    }
    limits = getattr(dev, "temscript_defocus_limits_nm", None)
    if limits is not None:
        values["limits"] = dataclasses.replace(
            TemscriptSettings().limits, defocus_nm=tuple(float(v) for v in limits)
        )
    return TemscriptSettings(**values)


def open_bench(dev: Any) -> Any:
    """The driver-registry factory for ``devices.kind = "temscript"`` (a ``Bench``).

    The server is asked what it is at start; if it cannot be reached the daemon still starts
    (the instrument record says why, the camera shape falls back to ``devices.camera_shape``)
    and the first device call reports the error — jobs fail with it until the server is back.
    """
    from scherzer.drivers.instruments import Instruments
    from scherzer.drivers.registry import Bench

    settings = settings_from_devices(dev)
    ins = open_temscript(settings, check=False)
    try:
        instrument = ins.describe_instrument()
        shape = ins.camera.shape
    except DeviceError as exc:
        log.warning("temscript server not available at start", url=settings.url, error=str(exc))
        instrument = {"url": settings.url, "read_only": settings.read_only, "error": str(exc)}
        shape = tuple(getattr(dev, "camera_shape", (2048, 2048)))
    instruments = Instruments(
        camera=ins.camera,
        scan=ins.scan,
        camera_shape=(int(shape[0]), int(shape[1])),
        wait_s=time.sleep,
        instrument=instrument,
    )
    return Bench(instruments, lambda: ins.lens, None, [ins.close])
