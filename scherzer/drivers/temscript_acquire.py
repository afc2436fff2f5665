"""Camera and STEM acquisition over temscript (see :mod:`scherzer.drivers.temscript`).

:class:`TemscriptCamera` sets exposure, binning, the smallest centred image size (FULL, HALF,
QUARTER) holding the requested region and image correction ``DEFAULT`` (dark/gain-corrected by the
instrument), reads the parameters back, acquires and crops the region. The pixel size is the
calibration if one is set, else the detector pixel / the indicated magnification.
:class:`TemscriptScanGenerator` acquires several STEM detectors at once; the frame size must be the
full scan (``stem_full_size_px``) divided by the image-size fraction and a binning; the dwell
recorded is the instrument's read-back. Units: s, µs, nm, degrees at this boundary; temscript's
seconds, metres and radians inside the calls.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from scherzer.drivers.base import CameraFrame, DeviceError, ScanFrame, ScanSettings
from scherzer.drivers.temscript_link import (
    NM_PER_UM,
    US_PER_S,
    TemscriptLink,
    TemscriptPart,
    TemscriptSettings,
)
from scherzer.stack import FrameRecord

if TYPE_CHECKING:
    from scherzer.drivers.temscript import TemscriptLens

__all__ = ["IMAGE_SIZES", "TemscriptCamera", "TemscriptScanGenerator"]

#: Centred sub-frames temscript offers, as the fraction of the full detector they cover.
IMAGE_SIZES = (("QUARTER", 4), ("HALF", 2), ("FULL", 1))
#: Binnings tried when matching a requested scan size.
SCAN_BINNINGS = (1, 2, 4, 8)


class _Acquirer(TemscriptPart):
    """What camera and scan share: the series clock, frame numbers and instrument parameters."""

    def __init__(
        self,
        link: TemscriptLink,
        settings: TemscriptSettings,
        name: str,
        lens: TemscriptLens | None,
    ) -> None:
        super().__init__(link, settings, name)
        self.lens = lens
        self._t0 = time.monotonic()
        self._index = 0

    def _next_index(self) -> int:
        self._index += 1
        return self._index - 1

    def _now_s(self) -> float:
        return time.monotonic() - self._t0

    def instrument_state(self) -> dict[str, Any]:
        """Voltage, mode and magnification/camera length as the instrument reports them now."""

        def read(m: Any) -> dict[str, Any]:
            return {
                "voltage": m.get_voltage(),
                "mode": m.get_instrument_mode(),
                "projection": m.get_projection_mode(),
                "magnification": m.get_indicated_magnification(),
                "camera_length_m": m.get_indicated_camera_length(),
            }

        raw = self.link.read("reading voltage and magnification", read)
        return {
            "voltage_kv": self._float(raw["voltage"], "voltage"),
            "instrument_mode": str(raw["mode"]),
            "projection_mode": str(raw["projection"]),
            "magnification": self._float(raw["magnification"], "magnification"),
            "camera_length_mm": self._float(raw["camera_length_m"], "camera length") * 1e3,
        }

    def _defocus_fields(self) -> dict[str, float]:
        if self.lens is None:
            return {}
        nominal = self.lens.last_setpoint_nm
        out = {"defocus_readback_nm": self.lens.get_defocus_nm()}
        return out | ({"defocus_nominal_nm": nominal} if nominal is not None else {})

    def _image(self, images: Any, detector: str) -> np.ndarray:
        from temscript.marshall import unpack_array

        if not isinstance(images, dict) or detector not in images:
            got = sorted(images) if isinstance(images, dict) else type(images).__name__
            raise DeviceError(
                f"{self.name}: the server returned no image for {detector!r} (got {got})",
                device=self.name,
            )
        image = images[detector]
        if isinstance(image, dict):  # a packed array the client did not unpack
            image = unpack_array(image)
        return np.asarray(image, dtype=np.float32)


class TemscriptCamera(_Acquirer):
    """A CCD/CMOS camera over temscript (``Camera`` protocol; see the module docstring)."""

    def __init__(
        self, link: TemscriptLink, settings: TemscriptSettings, lens: TemscriptLens | None = None
    ) -> None:
        super().__init__(link, settings, f"{settings.name}-camera", lens)
        self._info: tuple[str, dict[str, Any]] | None = None

    def info(self) -> tuple[str, dict[str, Any]]:
        """(camera name, what the server reports about it), read once."""
        if self._info is None:
            cams = self.link.read("listing cameras", lambda m: m.get_cameras())
            if not isinstance(cams, dict) or not cams:
                raise DeviceError(f"{self.name}: the server lists no camera", device=self.name)
            chosen = self.cfg.camera or next(iter(cams))
            if chosen not in cams:
                raise DeviceError(
                    f"{self.name}: no camera {chosen!r}; the server has {sorted(cams)}",
                    device=self.name,
                )
            self._info = (chosen, dict(cams[chosen]))
        return self._info

    @property
    def shape(self) -> tuple[int, int]:
        _, info = self.info()
        return int(info["height"]), int(info["width"])

    def _window(self, binning: int, region: tuple[int, int, int, int] | None):
        """The smallest centred image size holding ``region``: (size name, y0, x0 of it)."""
        ny, nx = self.shape
        y0, x0, h, w = region if region is not None else (0, 0, ny, nx)
        if not (0 <= y0 and 0 <= x0 and h > 0 and w > 0 and y0 + h <= ny and x0 + w <= nx):
            raise self._limit(f"region {region} (y0, x0, height, width) must lie in {ny}×{nx}")
        if h % binning or w % binning:
            raise self._limit(f"region {h}×{w} is not divisible by binning {binning}")
        for size, frac in IMAGE_SIZES:
            wy, wx = ny // frac, nx // frac
            oy, ox = (ny - wy) // 2, (nx - wx) // 2
            if oy <= y0 and ox <= x0 and y0 + h <= oy + wy and x0 + w <= ox + wx:
                if (y0 - oy) % binning == 0 and (x0 - ox) % binning == 0:
                    return size, oy, ox
        raise self._limit(f"region {region} is not aligned to binning {binning}")

    def pixel_size_nm(self, binning: int, magnification: float) -> tuple[float, str]:
        """Specimen pixel (nm) at ``binning`` and where it comes from."""
        if self.cfg.pixel_size_nm is not None:
            return self.cfg.pixel_size_nm * binning, "calibration (devices settings)"
        _, info = self.info()
        pixel = info.get("pixel_size(um)")
        pixel_um = pixel[0] if isinstance(pixel, list | tuple) else pixel
        if not magnification > 0 or not isinstance(pixel_um, int | float) or not pixel_um > 0:
            raise DeviceError(
                f"{self.name}: no pixel size: the indicated magnification is {magnification:g} "
                "(diffraction mode or old software); set devices.temscript_pixel_size_nm",
                device=self.name,
            )
        return pixel_um * NM_PER_UM / magnification * binning, "detector pixel / magnification"

    def acquire(
        self, exposure_s: float, binning: int = 1, region: tuple[int, int, int, int] | None = None
    ) -> CameraFrame:
        if not (
            isinstance(exposure_s, int | float) and math.isfinite(exposure_s) and exposure_s > 0
        ):
            raise self._limit(f"exposure_s must be > 0; got {exposure_s}")
        camera, info = self.info()
        if binning not in info.get("binnings", [1]):
            raise self._limit(f"binning {binning} is not one of {info.get('binnings')}")
        size, oy, ox = self._window(binning, region)
        params = {
            "exposure(s)": float(exposure_s),
            "binning": int(binning),
            "image_size": size,
            "correction": "DEFAULT",
        }
        self.link.read(f"configuring camera {camera}", lambda m: m.set_camera_param(camera, params))
        got = self.link.read("reading camera parameters", lambda m: m.get_camera_param(camera))
        exposure = self._float(
            got.get("exposure(s)") if isinstance(got, dict) else None, "exposure read-back"
        )
        state = self.instrument_state()
        defocus = self._defocus_fields()
        t0 = self._now_s()
        images = self.link.read(
            f"acquiring from {camera}",
            lambda m: m.acquire(camera),
            timeout_s=exposure + self.cfg.acquire_margin_s,
        )
        image = self._image(images, camera)
        ny, nx = self.shape
        y0, x0, h, w = region if region is not None else (0, 0, ny, nx)
        iy, ix = (y0 - oy) // binning, (x0 - ox) // binning
        crop = image[iy : iy + h // binning, ix : ix + w // binning]
        if crop.shape != (h // binning, w // binning):
            raise DeviceError(
                f"{self.name}: image of shape {image.shape} does not hold region "
                f"{region} at binning {binning} ({size})",
                device=self.name,
            )
        pixel, source = self.pixel_size_nm(binning, state["magnification"])
        record = FrameRecord(
            index=self._next_index(),
            time_s=t0,
            exposure_s=exposure,
            signal="image",
            **defocus,
            **_optics_record(state),
        )
        state |= {
            "pixel_size_nm": pixel,
            "pixel_size_source": source,
            "camera": camera,
            "image_size": size,
            "correction": got.get("correction", ""),
        }
        return CameraFrame(
            np.ascontiguousarray(crop), record, (pixel, pixel), truth={"instrument": state}
        )


def _optics_record(state: dict[str, Any]) -> dict[str, float]:
    """The record fields of the instrument state read with each frame (NaN where unknown)."""
    keys = ("voltage_kv", "magnification", "camera_length_mm")
    return {k: float(state[k]) for k in keys if isinstance(state.get(k), int | float)}


class TemscriptScanGenerator(_Acquirer):
    """STEM detectors over temscript (``ScanGenerator`` protocol; see the module docstring)."""

    def __init__(
        self, link: TemscriptLink, settings: TemscriptSettings, lens: TemscriptLens | None = None
    ) -> None:
        super().__init__(link, settings, f"{settings.name}-scan", lens)
        self._settings: ScanSettings | None = None
        self._configured = False
        self._pixel_nm = ScanSettings().pixel_nm
        self._dwell_us = ScanSettings().dwell_us
        self._abort = threading.Event()

    @property
    def settings(self) -> ScanSettings | None:
        """The settings in force: the last configured, else what the instrument has now (None
        when it cannot tell: no STEM detectors, no answer). The daemon restores these after a
        plan, so a plan never leaves the instrument at settings it did not have."""
        if self._settings is None:
            self._settings = self._read_settings()
        return self._settings

    def _read_settings(self) -> ScanSettings | None:
        try:
            known = self.detectors()
            got = self.link.read(
                "reading STEM parameters", lambda m: m.get_stem_acquisition_param()
            )
            rotation_rad = self._float(
                self.link.read("reading scan rotation", lambda m: m.get_stem_rotation()),
                "scan rotation",
            )
            n = self.cfg.stem_full_size_px // (
                dict(IMAGE_SIZES)[str(got["image_size"])] * int(got["binning"])
            )
            pixel_nm = ScanSettings().pixel_nm
            if self.cfg.stem_field_nm_times_mag is not None:
                pixel_nm = self.cfg.stem_field_nm_times_mag / (self._magnification() * n)
            dwell_us = self._float(got["dwell_time(s)"], "dwell") * US_PER_S
        except (DeviceError, KeyError, TypeError, ValueError, ZeroDivisionError):
            return None
        if not known or n < 1:
            return None
        signal = "HAADF" if "HAADF" in known else next(iter(known))
        return ScanSettings(
            size_px=(n, n),
            pixel_nm=pixel_nm,
            dwell_us=dwell_us,
            rotation_deg=math.degrees(rotation_rad),
            signals=(signal,),
        )

    def _stem_params(self) -> Any:
        return self.link.read("reading STEM parameters", lambda m: m.get_stem_acquisition_param())

    def _rotation_rad(self) -> float:
        reply = self.link.read("reading scan rotation", lambda m: m.get_stem_rotation())
        return self._float(reply, "scan rotation")

    def _magnification(self) -> float:
        reply = self.link.read("reading STEM magnification", lambda m: m.get_stem_magnification())
        return self._float(reply, "STEM magnification")

    def detectors(self) -> dict[str, Any]:
        found = self.link.read("listing STEM detectors", lambda m: m.get_stem_detectors())
        if not isinstance(found, dict):
            raise DeviceError(f"{self.name}: malformed detector list {found!r}", device=self.name)
        return found

    def _size(self, size_px: tuple[int, int]) -> tuple[str, int]:
        ny, nx = size_px
        full = self.cfg.stem_full_size_px
        for name, frac in IMAGE_SIZES[::-1]:
            for binning in SCAN_BINNINGS:
                if ny == nx == full // (frac * binning) and full % (frac * binning) == 0:
                    return name, binning
        sizes = sorted({full // (f * b) for _, f in IMAGE_SIZES for b in SCAN_BINNINGS})
        raise self._limit(f"scan size {size_px} is not reachable; square sizes {sizes} are")

    def configure(self, settings: ScanSettings) -> None:
        if settings.dwell_us <= 0 or not settings.signals or settings.pixel_nm <= 0:
            raise self._limit(f"invalid scan settings {settings}")
        known = self.detectors()
        missing = [s for s in settings.signals if s not in known]
        if missing:
            raise self._limit(f"no STEM detector {missing}; the server has {sorted(known)}")
        size, binning = self._size(tuple(settings.size_px))
        self._set_rotation(settings.rotation_deg)
        self._pixel_nm = self._set_pixel(settings)
        params = {
            "image_size": size,
            "binning": binning,
            "dwell_time(s)": settings.dwell_us / US_PER_S,
        }
        self.link.read(
            "setting STEM acquisition parameters", lambda m: m.set_stem_acquisition_param(params)
        )
        got = self._stem_params()
        dwell_s = got.get("dwell_time(s)") if isinstance(got, dict) else None
        self._dwell_us = self._float(dwell_s, "dwell read-back") * US_PER_S
        self._settings = settings
        self._configured = True

    def _set_pixel(self, settings: ScanSettings) -> float:
        """The pixel size (nm) the scan will have: with a field calibration, the STEM
        magnification is set for the requested size and the read-back decides; else as asked."""
        field = self.cfg.stem_field_nm_times_mag
        if field is None:
            return settings.pixel_nm
        width = settings.size_px[1]
        want = field / (settings.pixel_nm * width)
        current = self._magnification()
        if not math.isclose(current, want, rel_tol=1e-9):
            self.link.change(
                f"setting STEM magnification to {want:g}",
                lambda m: m.set_stem_magnification(want),
            )
            current = self._magnification()
        return field / (current * width)

    def _set_rotation(self, rotation_deg: float) -> None:
        now = self._rotation_rad()
        want = math.radians(rotation_deg)
        if math.isclose(now, want, abs_tol=1e-9):
            return
        self.link.change(
            f"setting scan rotation to {rotation_deg:g}°", lambda m: m.set_stem_rotation(want)
        )

    def frame_time_s(self) -> float:
        s = self._settings or ScanSettings()
        ny, nx = s.size_px
        return ny * (nx * self._dwell_us + s.flyback_us) / US_PER_S

    def acquire(self) -> ScanFrame:
        if not self._configured:
            current = self.settings
            if current is None:
                raise DeviceError(
                    f"{self.name}: configure the scan first (the instrument's "
                    "STEM settings cannot be read)",
                    device=self.name,
                )
            self.configure(current)
        self._abort.clear()
        s = self._settings
        assert s is not None
        state = self.instrument_state()
        t0 = self._now_s()
        images = self.link.read(
            f"scanning {list(s.signals)}",
            lambda m: m.acquire(*s.signals),
            timeout_s=self.frame_time_s() + self.cfg.acquire_margin_s,
        )
        frames = {sig: self._image(images, sig) for sig in s.signals}
        if self._abort.is_set():
            raise DeviceError(
                f"{self.name}: scan aborted; the frame was discarded", device=self.name
            )
        index = self._next_index()
        records = {
            sig: FrameRecord(
                index=index,
                time_s=t0,
                scan_rotation_deg=s.rotation_deg,
                dwell_us=self._dwell_us,
                signal=sig,
                **_optics_record(state),
            )
            for sig in s.signals
        }
        state |= {"pixel_size_nm": self._pixel_nm, "stem_rotation_deg": s.rotation_deg}
        return ScanFrame(
            frames, records, (self._pixel_nm, self._pixel_nm), truth={"instrument": state}
        )

    def abort(self) -> None:
        """temscript cannot stop a scan: the frame in progress is discarded when it returns."""
        self._abort.set()
