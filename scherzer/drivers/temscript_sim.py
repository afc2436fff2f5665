"""The simulated microscope served through temscript's own HTTP server.

:class:`SimulatedTemscriptMicroscope` is a temscript microscope (it extends temscript's
``NullMicroscope``, which supplies the parts Scherzer does not simulate: stage, vacuum,
condenser, …) whose objective lens, camera and STEM detectors are a
:class:`~scherzer.simulators.microscope.VirtualMicroscope`: defocus, objective stigmator, beam
tilt and specimen drift change the images exactly as in the built-in simulator. It is served by
temscript's ``MicroscopeServer``, so the Scherzer temscript drivers (and any temscript client)
exercise the real HTTP/JSON path with physics behind it. :func:`serve_simulated` is what
``scherzer temscript-sim --host 127.0.0.1 --port P`` runs; :func:`start_simulated` runs the same
server in a thread (tests, demo).

What the simulated instrument reports, in temscript's units:

* defocus ("Focus") in metres: the lens set-point (TEM Scripting reports set values, not a
  measurement); the images use the lens model's true C1 (hysteresis, settling, focal drift);
* objective stigmator in logical units, one unit = :data:`STIGMATOR_NM_PER_UNIT` nm of A1,
  (x, y) = |A1|·(cos 2φ, sin 2φ); beam tilt (x, y) in radians; image shift (x, y) in metres
  (stored, not simulated);
* one camera :data:`CAMERA_NAME` whose detector pixel is chosen so that detector pixel /
  :data:`MAGNIFICATION` equals the simulated camera pixel; images float32 counts, with the
  camera's dark offset removed under image correction DEFAULT (as the instrument's dark
  reference does), raw under UNPROCESSED;
* STEM detectors HAADF, ABF, BF acquired together; full scan :data:`STEM_FULL_SIZE_PX`² at
  binning 1 (only the frame asked for is simulated); pixel size =
  :data:`STEM_FIELD_NM_TIMES_MAG` / (STEM magnification · scan width); flyback
  :data:`FLYBACK_US`; scan rotation in radians.

Time: each acquisition first lets the lens settle on the simulated clock (the drivers' own
``settle_s`` is a real-time wait), then advances the clock by the exposure or frame time and
sleeps that time divided by ``speedup``. The server binds loopback only unless ``allow_remote``.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import structlog

from scherzer.drivers.base import ScanSettings

__all__ = [
    "CAMERA_NAME",
    "MAGNIFICATION",
    "STEM_FIELD_NM_TIMES_MAG",
    "STEM_FULL_SIZE_PX",
    "STIGMATOR_NM_PER_UNIT",
    "SimulatedTemscriptMicroscope",
    "serve_simulated",
    "sim_temscript_settings",
    "start_simulated",
]

log = structlog.get_logger("scherzer.temscript_sim")

CAMERA_NAME = "SimCamera"
#: Indicated magnification of the simulated TEM (sets the detector pixel, see module docstring).
MAGNIFICATION = 500_000.0
#: nm of two-fold astigmatism A1 per logical stigmator unit.
STIGMATOR_NM_PER_UNIT = 100.0
#: Full STEM scan (px) at image size FULL and binning 1 (the drivers' default); only the frame
#: asked for is simulated (e.g. QUARTER at binning 8 = 64²).
STEM_FULL_SIZE_PX = 2048
#: STEM field of view (nm) × STEM magnification: 10.24 nm at 1e6 (0.02 nm pixels at 512²).
STEM_FIELD_NM_TIMES_MAG = 10.24e6
#: Acquisitions whose ground truth is kept (:attr:`SimulatedTemscriptMicroscope.truths`).
TRUTHS_KEPT = 10_000
#: Flyback per scan line (µs); not settable through temscript.
FLYBACK_US = 200.0
_SIZE_FRACTION = {"FULL": 1, "HALF": 2, "QUARTER": 4}
_BINNINGS = [1, 2, 4, 8]


def _null_base() -> type:
    from temscript import NullMicroscope

    return NullMicroscope


class SimulatedTemscriptMicroscope(_null_base()):  # type: ignore[misc]
    """A temscript microscope backed by a VirtualMicroscope (see the module docstring)."""

    def __init__(self, scope: Any, *, speedup: float = 1.0) -> None:
        super().__init__(wait_exposure=False, voltage=float(scope.optics.voltage_kv))
        if speedup <= 0:
            raise ValueError(f"speedup must be > 0; got {speedup}")
        self.scope = scope
        self.speedup = float(speedup)
        self._lock = threading.RLock()
        self._ccd_param["binning"] = 1
        self._stem_magnification = STEM_FIELD_NM_TIMES_MAG / (0.02 * 512)
        self._mode = "TEM"
        #: Ground truth of every acquisition (simulator dicts: defocus_nm, shift_px, optics, …),
        #: oldest first; tests compare what travelled over HTTP with it.
        self.truths: deque[dict[str, Any]] = deque(maxlen=TRUTHS_KEPT)

    # --- identity ------------------------------------------------------------------------
    def get_family(self) -> str:
        return "SCHERZER_SIM"

    def is_stem_available(self) -> bool:
        return True

    def get_instrument_mode(self) -> str:
        return self._mode

    def set_instrument_mode(self, mode: str) -> None:
        if str(mode).upper() not in ("TEM", "STEM"):
            raise ValueError(f"unknown instrument mode {mode!r}")
        self._mode = str(mode).upper()

    def get_indicated_magnification(self) -> float:
        return MAGNIFICATION

    # --- objective lens ------------------------------------------------------------------
    def get_defocus(self) -> float:
        return self.scope.lens.defocus_setpoint_nm() / 1e9

    def set_defocus(self, value: float) -> None:
        self.scope.lens.set_defocus_nm(float(value) * 1e9)

    def get_objective_excitation(self) -> float:
        return self.get_defocus()

    def get_objective_stigmator(self) -> tuple[float, float]:
        magnitude, angle = self.scope.lens.status()["stigmator_setpoint"]
        phi2 = math.radians(2.0 * angle)
        scale = magnitude / STIGMATOR_NM_PER_UNIT
        return scale * math.cos(phi2), scale * math.sin(phi2)

    def set_objective_stigmator(self, value: Any) -> None:
        sx, sy = (float(v) for v in value)
        magnitude = math.hypot(sx, sy) * STIGMATOR_NM_PER_UNIT
        self.scope.lens.set_stigmator(magnitude, math.degrees(math.atan2(sy, sx)) / 2.0)

    def get_beam_tilt(self) -> tuple[float, float]:
        ty, tx = self.scope.lens.beam_tilt_mrad()
        return tx / 1e3, ty / 1e3

    def set_beam_tilt(self, tilt: Any) -> None:
        tx, ty = (float(v) for v in tilt)
        self.scope.lens.set_beam_tilt_mrad(ty * 1e3, tx * 1e3)

    # --- camera --------------------------------------------------------------------------
    def get_cameras(self) -> dict[str, Any]:
        ny, nx = self.scope.camera_shape
        pixel_um = self.scope.camera_pixel_nm * MAGNIFICATION / 1e3
        return {
            CAMERA_NAME: {
                "type": "CAMERA",
                "height": ny,
                "width": nx,
                "pixel_size(um)": (pixel_um, pixel_um),
                "binnings": _BINNINGS,
                "shutter_modes": ["POST_SPECIMEN"],
                "pre_exposure_limits(s)": (0.0, 0.0),
                "pre_exposure_pause_limits(s)": (0.0, 0.0),
            }
        }

    def get_camera_param(self, name: str) -> dict[str, Any]:
        if name != CAMERA_NAME:
            raise KeyError(f"unknown camera {name!r}")
        return super().get_camera_param("CCD")

    def set_camera_param(self, name: str, param: Any, ignore_errors: bool = False) -> None:
        if name != CAMERA_NAME:
            raise KeyError(f"unknown camera {name!r}")
        binning = int(dict(param).get("binning", self._ccd_param["binning"]))
        if binning not in _BINNINGS:
            raise ValueError(f"binning {binning} not in {_BINNINGS}")
        super().set_camera_param("CCD", param, ignore_errors=ignore_errors)

    # --- STEM ----------------------------------------------------------------------------
    def get_stem_detectors(self) -> dict[str, Any]:
        from scherzer.simulators.stem import SIGNALS

        return {s: {"type": "STEM_DETECTOR", "binnings": _BINNINGS} for s in SIGNALS}

    def get_stem_detector_param(self, name: str) -> dict[str, Any]:
        if name not in self.get_stem_detectors():
            raise KeyError(f"unknown detector {name!r}")
        return {"brightness": 0.5, "contrast": 0.5}

    def set_stem_acquisition_param(self, param: Any, ignore_errors: bool = False) -> None:
        param = dict(param)
        binning = int(param.get("binning", self._stem_acq_param["binning"]))
        if binning not in _BINNINGS:
            raise ValueError(f"binning {binning} not in {_BINNINGS}")
        self._stem_acq_param["binning"] = binning
        param.pop("binning", None)
        super().set_stem_acquisition_param(param, ignore_errors=ignore_errors)

    # --- acquisition ---------------------------------------------------------------------
    def acquire(self, *detectors: str) -> dict[str, np.ndarray]:
        wanted = tuple(dict.fromkeys(detectors))
        if not wanted:
            return {}
        with self._lock:
            self.scope.clock.advance(self.scope.lens.settle_remaining_s())
            if wanted == (CAMERA_NAME,):
                return {CAMERA_NAME: self._camera_frame()}
            if CAMERA_NAME in wanted:
                raise ValueError("a camera and STEM detectors cannot be acquired together")
            return self._scan_frame(wanted)

    def _camera_frame(self) -> np.ndarray:
        p = self._ccd_param
        ny, nx = self.scope.camera_shape
        frac = _SIZE_FRACTION[getattr(p["image_size"], "name", str(p["image_size"]))]
        h, w = ny // frac, nx // frac
        region = ((ny - h) // 2, (nx - w) // 2, h, w)
        exposure_s = float(p["exposure(s)"])
        binning = int(p["binning"])
        image, _, truth = self.scope.acquire_image(exposure_s, binning=binning, region=region)
        self.truths.append(truth)
        if getattr(p["correction"], "name", str(p["correction"])) == "DEFAULT":
            image = image - np.float32(self._offset_counts() * binning**2)
        time.sleep(exposure_s / self.speedup)
        return np.ascontiguousarray(image, dtype=np.float32)

    def _offset_counts(self) -> float:
        """The simulated camera's dark offset per unbinned pixel (what DEFAULT correction
        removes, as a TFS camera subtracts its dark reference)."""
        from scherzer.simulators.detector import CameraModel

        camera = self.scope.camera if self.scope.camera is not None else CameraModel()
        return float(camera.offset_counts)

    def _scan_frame(self, signals: tuple[str, ...]) -> dict[str, np.ndarray]:
        p = self._stem_acq_param
        frac = _SIZE_FRACTION[getattr(p["image_size"], "name", str(p["image_size"]))]
        n = STEM_FULL_SIZE_PX // (frac * int(p["binning"]))
        settings = ScanSettings(
            size_px=(n, n),
            pixel_nm=STEM_FIELD_NM_TIMES_MAG / (self._stem_magnification * n),
            dwell_us=float(p["dwell_time(s)"]) * 1e6,
            flyback_us=FLYBACK_US,
            rotation_deg=math.degrees(self._stem_rotation),
            signals=signals,
        )
        images, _, truth = self.scope.acquire_scan(settings)
        self.truths.append(truth)
        time.sleep(n * (n * settings.dwell_us + FLYBACK_US) * 1e-6 / self.speedup)
        return {s: np.ascontiguousarray(images[s], dtype=np.float32) for s in signals}


def sim_temscript_settings(url: str, **changes: Any) -> Any:
    """Driver settings that match this server's calibrations (stigmator, STEM size and field)."""
    from scherzer.drivers.temscript import TemscriptSettings

    base = {
        "url": url,
        "stigmator_nm_per_unit": STIGMATOR_NM_PER_UNIT,
        "camera": CAMERA_NAME,
        "stem_full_size_px": STEM_FULL_SIZE_PX,
        "stem_field_nm_times_mag": STEM_FIELD_NM_TIMES_MAG,
    }
    return TemscriptSettings(**(base | changes))


def _server(host: str, port: int, microscope: SimulatedTemscriptMicroscope, allow_remote: bool):
    from temscript.server import MicroscopeHandler, MicroscopeServer

    if not allow_remote and not _is_loopback(host):
        raise ValueError(
            f"refusing to serve the simulated microscope on {host!r}: temscript's "
            "server has no authentication; use 127.0.0.1 or allow_remote=True"
        )

    class QuietHandler(MicroscopeHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Silent: temscript's handler writes every request to stderr."""

    server = MicroscopeServer((host, port), microscope_factory=lambda: microscope)
    server.RequestHandlerClass = QuietHandler
    return server


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _microscope(scope: Any, speedup: float, **scope_kwargs: Any) -> SimulatedTemscriptMicroscope:
    if scope is None:
        from scherzer.simulators.microscope import VirtualMicroscope

        scope = VirtualMicroscope(**scope_kwargs)
    return SimulatedTemscriptMicroscope(scope, speedup=speedup)


def serve_simulated(
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    scope: Any = None,
    speedup: float = 1.0,
    allow_remote: bool = False,
    ready: threading.Event | None = None,
    **scope_kwargs: Any,
) -> None:
    """Serve a simulated microscope on ``host:port`` until interrupted (Ctrl-C).

    ``scope``: a VirtualMicroscope (default: one built from ``scope_kwargs``, e.g.
    ``specimen="crystal_edge", camera_shape=(256, 256), seed=0``). ``ready`` is set once the
    port is bound.
    """
    server = _server(host, port, _microscope(scope, speedup, **scope_kwargs), allow_remote)
    bound = server.server_address
    log.info("simulated temscript server listening", host=bound[0], port=bound[1])
    if ready is not None:
        ready.set()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("simulated temscript server stopped")
    finally:
        server.server_close()


class SimulatedServer:
    """A running :func:`start_simulated` server: ``url``, ``microscope``, ``stop()``."""

    def __init__(self, server: Any, microscope: SimulatedTemscriptMicroscope) -> None:
        self._server = server
        self.microscope = microscope
        host, port = server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=server.serve_forever, name="temscript-sim", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> SimulatedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_simulated(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    scope: Any = None,
    speedup: float = 1.0,
    allow_remote: bool = False,
    **scope_kwargs: Any,
) -> SimulatedServer:
    """The server of :func:`serve_simulated` in a background thread (port 0 = a free one)."""
    microscope = _microscope(scope, speedup, **scope_kwargs)
    return SimulatedServer(_server(host, port, microscope, allow_remote), microscope)
