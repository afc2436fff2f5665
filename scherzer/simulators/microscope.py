"""VirtualMicroscope: the one shared state the simulated drivers act on, with ground truth.

Units: nm, s, µs, mrad, degrees, e/Å² as named. Times are seconds on the simulated clock
(:class:`SimClock`), which starts at 0 when the microscope is created.

What the microscope holds
-------------------------
* the specimen (a :class:`~scherzer.simulators.specimen.Specimen`) and the intrinsic optics
  (:class:`~scherzer.optics.Optics`: Cs, intrinsic A1/B2/A2, partial coherence);
* the objective lens (:class:`~scherzer.simulators.lens_controller.LensModel`): the *true* defocus
  of every image is the lens's true C1 at the start of the exposure/scan; the stigmator A1
  (a two-fold vector) adds to the intrinsic A1; beam tilt τ (azimuth φ_τ = atan2(τy, τx)) adds
  axial coma B2 = C3·τ, two-fold astigmatism C3·τ² (both at φ_τ) and defocus 2·C3·τ² — the
  leading terms of the aberration function about the tilted axis (image shift is ignored);
* a clock and a specimen drift model (:class:`DriftModel`) and a stage: the specimen content is
  displaced by d(t) + stage position (nm, (y, x)); frame(r) ≈ ref(r − d);
* the camera (HRTEM through :class:`~scherzer.simulators.hrtem.HRTEMImager`, built on a field
  :data:`HRTEM_MARGIN_PX` larger than the image on every side; when the content displacement
  exceeds half that margin the imager is rebuilt on the specimen translated by whole pixels, so
  drift and stage moves of any size stay exact) and the STEM scan
  (:class:`~scherzer.simulators.stem.STEMImager`, cached per optics state: C1/A1/B2 rounded to
  0.1 nm). Imagers are built lazily: the first frame after a change costs the exit wave or the
  STEM maps (≈0.5–4 s for 512² fields), later frames are fast.

Time: :meth:`VirtualMicroscope.acquire_image` advances the clock by the exposure (plus
``readout_s``) and :meth:`VirtualMicroscope.acquire_scan` by the frame time
ny·(nx·dwell + flyback); drivers sleep the scaled real time and must not advance the clock again.
A camera frame is rendered at the drift displacement of mid-exposure (no motion blur within one
exposure); a scan sees the drift at every pixel's own time.

Ground truth: ``shift_px`` is the content displacement (ARCHITECTURE convention) relative to the
state at the last :meth:`VirtualMicroscope.reset_truth` (or creation), in pixels of the frame
returned (camera: mid-exposure; scan: the first pixel, specimen-oriented axes).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import scipy.fft as sfft

from scherzer.drivers.base import DeviceDisconnected, DeviceTimeout, ScanSettings
from scherzer.optics import Optics
from scherzer.simulators.detector import CameraModel
from scherzer.simulators.hrtem import HRTEMImager, default_hrtem_optics
from scherzer.simulators.lens_controller import LensModel
from scherzer.simulators.specimen import Specimen, make_specimen
from scherzer.simulators.stem import SIGNALS, ScanRaster, STEMImager
from scherzer.stack import FrameRecord

__all__ = ["DriftModel", "SimClock", "VirtualMicroscope"]

FAULT_KINDS = {"timeout": DeviceTimeout, "disconnected": DeviceDisconnected}
FAULT_DEVICES = ("camera", "scan", "any")
#: STEM imagers kept (one per optics state and signal set).
STEM_CACHE_SIZE = 4
_STEM_ROUNDED_FIELDS = ("defocus_nm", "a1_nm", "a1_deg", "b2_nm", "b2_deg")
#: Margin (px) of the HRTEM field; the imager is re-centred when drift exceeds half of it.
HRTEM_MARGIN_PX = 64


class SimClock:
    """Simulated time in seconds; thread-safe; only moves forward."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._t = float(start_s)
        self._lock = threading.Lock()

    def now_s(self) -> float:
        with self._lock:
            return self._t

    def advance(self, dt_s: float) -> float:
        """Move the clock forward by ``dt_s`` ≥ 0 seconds; returns the new time."""
        if not (dt_s >= 0 and math.isfinite(dt_s)):
            raise ValueError(
                f"the clock only moves forward: dt_s must be finite and >= 0, got {dt_s}"
            )
        with self._lock:
            self._t += float(dt_s)
            return self._t


@dataclass
class DriftModel:
    """Specimen drift d(t) (nm, (y, x)) = v·t + W(t) + s·(1 − exp(−t/τ)).

    ``velocity_nm_per_s`` v: constant drift. ``random_walk_nm_per_sqrt_s``: a seeded Brownian
    walk W with per-axis standard deviation σ√t, sampled at knots every ``step_s`` and linearly
    interpolated between them (generated lazily, in order, so values do not depend on the order
    of queries). ``settle_nm`` s and ``settle_tau_s`` τ: a slowly settling creep (e.g. after a
    stage move). t < 0 is treated as 0.
    """

    velocity_nm_per_s: tuple[float, float] = (0.0, 0.0)
    random_walk_nm_per_sqrt_s: float = 0.0
    settle_nm: tuple[float, float] = (0.0, 0.0)
    settle_tau_s: float = 30.0
    seed: int = 0
    step_s: float = 0.01
    _walk: np.ndarray = field(init=False, repr=False)
    _rng: np.random.Generator = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.random_walk_nm_per_sqrt_s < 0 or self.step_s <= 0 or self.settle_tau_s <= 0:
            raise ValueError(
                "random_walk_nm_per_sqrt_s must be >= 0, step_s and settle_tau_s > 0; got "
                f"{self.random_walk_nm_per_sqrt_s}, {self.step_s}, {self.settle_tau_s}"
            )
        self._walk = np.zeros((1, 2))
        self._rng = np.random.default_rng(self.seed)
        self._lock = threading.Lock()

    def _walk_at(self, t: np.ndarray) -> np.ndarray:
        knots_needed = int(np.max(t, initial=0.0) / self.step_s) + 2
        with self._lock:
            while len(self._walk) < knots_needed:
                steps = self._rng.normal(0.0, 1.0, (4096, 2))
                steps *= self.random_walk_nm_per_sqrt_s * math.sqrt(self.step_s)
                self._walk = np.concatenate([self._walk, self._walk[-1] + np.cumsum(steps, 0)])
            walk = self._walk
        knots = np.arange(len(walk)) * self.step_s
        return np.stack([np.interp(t, knots, walk[:, a]) for a in range(2)], axis=-1)

    def displacement_nm(self, t_s: np.ndarray | float) -> np.ndarray:
        """d(t) in nm, shape (…, 2) for times of shape (…)."""
        t = np.maximum(np.asarray(t_s, dtype=np.float64), 0.0)
        d = t[..., None] * np.asarray(self.velocity_nm_per_s, dtype=np.float64)
        if any(self.settle_nm):
            creep = -np.expm1(-t / self.settle_tau_s)
            d = d + creep[..., None] * np.asarray(self.settle_nm, dtype=np.float64)
        if self.random_walk_nm_per_sqrt_s > 0:
            d = d + self._walk_at(t)
        return d


@dataclass
class _Fault:
    kind: str
    device: str
    remaining: int
    persistent: bool


def _translated(specimen: Specimen, offset_nm: np.ndarray) -> Specimen:
    """The specimen moved by ``offset_nm`` (y, x) (wrapped into the field if periodic)."""
    pos = specimen.positions_A.copy()
    pos[:, :2] += np.asarray(offset_nm, dtype=np.float64) * 10.0
    if specimen.periodic:
        pos[:, :2] %= np.asarray(specimen.extent_A, dtype=np.float64)
    return dataclasses.replace(specimen, positions_A=pos)


def _two_fold(magnitude: float, angle_deg: float) -> complex:
    return magnitude * complex(
        math.cos(2 * math.radians(angle_deg)), math.sin(2 * math.radians(angle_deg))
    )


def _one_fold(magnitude: float, angle_deg: float) -> complex:
    return magnitude * complex(math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg)))


def _optimal_convergence_mrad(optics: Optics) -> float:
    """25 mrad for a corrected probe (|Cs| < 0.01 mm), else 1.27 (λ/Cs)^¼."""
    if abs(optics.cs_mm) < 0.01:
        return 25.0
    return 1.27 * (optics.wavelength_A / (abs(optics.cs_mm) * 1e7)) ** 0.25 * 1e3


class VirtualMicroscope:
    """The simulated instrument: specimen, optics, lens, clock, drift, stage, camera, scan.

    ``specimen``: a built-in name (made over a square field of ``field_nm``, default the camera
    field + 4 nm) or a Specimen. ``optics``: intrinsic optics (default
    :func:`~scherzer.simulators.hrtem.default_hrtem_optics`); its ``defocus_nm`` becomes the
    initial lens set-point. ``drift``: default none. ``camera``: a CameraModel (default
    detector defaults). ``convergence_mrad``: STEM probe semi-angle (default 25 mrad for a
    corrected probe, else 1.27 (λ/Cs)^¼). ``probe_current_pA``, ``scan_jitter_px`` (σ per line):
    STEM beam and scan noise. ``readout_s``: extra clock advance per camera frame. ``lens``: an
    existing LensModel (it must read this microscope's ``clock``); default a new one.
    All public methods are thread-safe (one re-entrant lock).
    """

    def __init__(
        self,
        specimen: str | Specimen = "crystal_edge",
        *,
        optics: Optics | None = None,
        camera_shape: tuple[int, int] = (512, 512),
        camera_pixel_nm: float = 0.02,
        seed: int = 0,
        drift: DriftModel | None = None,
        dose_rate_e_per_A2_s: float = 1000.0,
        field_nm: float | None = None,
        camera: CameraModel | None = None,
        convergence_mrad: float | None = None,
        probe_current_pA: float = 20.0,
        scan_jitter_px: float = 0.1,
        readout_s: float = 0.0,
        lens: LensModel | None = None,
    ) -> None:
        if dose_rate_e_per_A2_s <= 0 or camera_pixel_nm <= 0:
            raise ValueError("dose_rate_e_per_A2_s and camera_pixel_nm must be > 0")
        self._lock = threading.RLock()
        seeds = np.random.SeedSequence(seed).spawn(4)
        self.seed = seed
        self.clock = SimClock()
        self.camera_shape = (int(camera_shape[0]), int(camera_shape[1]))
        self.camera_pixel_nm = float(camera_pixel_nm)
        self.dose_rate_e_per_A2_s = float(dose_rate_e_per_A2_s)
        self.optics = optics if optics is not None else default_hrtem_optics()
        self.drift = (
            drift if drift is not None else DriftModel(seed=int(seeds[0].generate_state(1)[0]))
        )
        self.camera = camera
        self.convergence_mrad = convergence_mrad or _optimal_convergence_mrad(self.optics)
        self.probe_current_pA = float(probe_current_pA)
        self.scan_jitter_px = float(scan_jitter_px)
        self.readout_s = float(readout_s)
        self.field_nm = field_nm or max(self.camera_shape) * self.camera_pixel_nm + 4.0
        self.specimen = self._resolve_specimen(specimen)
        self._camera_rng = np.random.default_rng(seeds[1])
        self._scan_rng = np.random.default_rng(seeds[2])
        self.lens = (
            lens
            if lens is not None
            else LensModel(self.clock.now_s, np.random.default_rng(seeds[3]))
        )
        if self.optics.defocus_nm != 0.0:
            self.lens.set_defocus_nm(self.optics.defocus_nm)
            self.clock.advance(self.lens.settle_remaining_s())
        self._stage_nm = np.zeros(2)
        self.scan_settings = ScanSettings()  # the last scan's settings
        self._hrtem_cache: dict = {}
        self._stem_cache: OrderedDict = OrderedDict()
        self._faults: list[_Fault] = []
        self.reset_truth()

    # ------------------------------------------------------------------ set-up helpers
    def _resolve_specimen(self, specimen: str | Specimen) -> Specimen:
        if isinstance(specimen, Specimen):
            return specimen
        return make_specimen(specimen, (self.field_nm, self.field_nm), seed=self.seed)

    # ------------------------------------------------------------------ state
    def stage_position_nm(self) -> tuple[float, float]:
        with self._lock:
            return float(self._stage_nm[0]), float(self._stage_nm[1])

    def move_stage_nm(self, y_nm: float, x_nm: float) -> None:
        """Move the stage (the specimen content moves by the same amount)."""
        if not (math.isfinite(y_nm) and math.isfinite(x_nm)):
            raise ValueError(f"stage position must be finite, got ({y_nm}, {x_nm})")
        with self._lock:
            self._stage_nm = np.array([y_nm, x_nm], dtype=np.float64)

    def displacement_nm(self, t_s: np.ndarray | float) -> np.ndarray:
        """Specimen content displacement (…, 2) nm: drift + stage."""
        return self.drift.displacement_nm(t_s) + self._stage_nm

    def effective_optics(self) -> Optics:
        """The optics now: intrinsic aberrations + lens defocus + stigmator + beam tilt."""
        with self._lock:
            base = self.optics
            c1 = self.lens.true_defocus_nm()
            a1 = _two_fold(base.a1_nm, base.a1_deg) + _two_fold(*self.lens.true_stigmator())
            b2 = _one_fold(base.b2_nm, base.b2_deg)
            ty, tx = (v * 1e-3 for v in self.lens.beam_tilt_mrad())
            tau = math.hypot(ty, tx)
            if tau > 0 and base.cs_mm != 0:
                c3_nm = base.cs_mm * 1e6
                phi_deg = math.degrees(math.atan2(ty, tx))
                b2 += _one_fold(c3_nm * tau, phi_deg)
                a1 += _two_fold(c3_nm * tau**2, phi_deg)
                c1 += 2 * c3_nm * tau**2
            return base.with_(
                defocus_nm=c1,
                a1_nm=abs(a1),
                a1_deg=math.degrees(0.5 * math.atan2(a1.imag, a1.real)),
                b2_nm=abs(b2),
                b2_deg=math.degrees(math.atan2(b2.imag, b2.real)),
            )

    def reset_truth(self) -> None:
        """Make the present state the truth origin: shifts are measured from now, indices from 0."""
        with self._lock:
            now = self.clock.now_s()
            self._truth_ref_nm = self.displacement_nm(now)
            self._truth_ref_s = now
            self._frame_index = 0

    # ------------------------------------------------------------------ faults
    def inject_fault(
        self, kind: str, after_calls: int = 0, *, device: str = "any", persistent: bool = False
    ) -> None:
        """Make an acquisition fail: after ``after_calls`` successful acquisitions on ``device``
        (camera | scan | any) the next raises DeviceTimeout (``kind="timeout"``) or
        DeviceDisconnected (``"disconnected"``); ``persistent`` keeps failing until
        :meth:`clear_faults`."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {sorted(FAULT_KINDS)}; got {kind!r}")
        if device not in FAULT_DEVICES:
            raise ValueError(f"fault device must be one of {FAULT_DEVICES}; got {device!r}")
        if after_calls < 0:
            raise ValueError(f"after_calls must be >= 0; got {after_calls}")
        with self._lock:
            self._faults.append(_Fault(kind, device, int(after_calls), persistent))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _check_faults(self, device: str) -> None:
        for fault in list(self._faults):
            if fault.device not in (device, "any"):
                continue
            if fault.remaining > 0:
                fault.remaining -= 1
                continue
            if not fault.persistent:
                self._faults.remove(fault)
            what = "did not answer in time" if fault.kind == "timeout" else "is disconnected"
            raise FAULT_KINDS[fault.kind](
                f"simulated {device} {what} (injected fault); retry or check the connection",
                device=f"sim-{device}",
                details={"injected": True, "kind": fault.kind},
            )

    # ------------------------------------------------------------------ camera
    def _hrtem_frame(self, optics: Optics, shift_nm: np.ndarray, dose: float):
        """One HRTEM frame at content displacement ``shift_nm`` (re-centring the imager's
        specimen by whole pixels whenever the displacement approaches its margin)."""
        pixel = self.camera_pixel_nm
        limit = 0.5 * HRTEM_MARGIN_PX * pixel
        key = (self.camera_shape, pixel)
        entry = self._hrtem_cache.get(key)
        if entry is None or np.any(np.abs(shift_nm - entry[0]) > limit):
            offset = np.round(shift_nm / pixel) * pixel
            moved = _translated(self.specimen, offset)
            imager = HRTEMImager(
                moved,
                self.optics,
                self.camera_shape,
                pixel,
                self.camera,
                margin_px=HRTEM_MARGIN_PX,
            )
            entry = self._hrtem_cache[key] = (offset, imager)
        offset, imager = entry
        rel = shift_nm - offset
        return imager.frame(
            optics.defocus_nm, (float(rel[0]), float(rel[1])), dose, self._camera_rng, optics
        )

    def _check_region(self, binning: int, region) -> tuple[int, int, int, int]:
        ny, nx = self.camera_shape
        if binning not in (1, 2, 4, 8):
            raise ValueError(f"binning must be 1, 2, 4 or 8; got {binning}")
        y0, x0, h, w = region if region is not None else (0, 0, ny, nx)
        if not (0 <= y0 and 0 <= x0 and h > 0 and w > 0 and y0 + h <= ny and x0 + w <= nx):
            raise ValueError(f"region {region} (y0, x0, height, width) must lie inside {ny}×{nx}")
        if h % binning or w % binning:
            raise ValueError(f"region size {h}×{w} must be divisible by binning {binning}")
        return int(y0), int(x0), int(h), int(w)

    def acquire_image(
        self,
        exposure_s: float,
        binning: int = 1,
        region: tuple[int, int, int, int] | None = None,
    ) -> tuple[np.ndarray, FrameRecord, dict]:
        """Expose the camera: image (float32 counts, binned by summing), record and truth.

        ``region`` is (y0, x0, height, width) in unbinned pixels. Dose = dose rate × exposure.
        Truth: ``defocus_nm`` (true C1), ``optics`` (effective, as a dict), ``shift_nm`` /
        ``shift_px`` (content displacement at mid-exposure; ``shift_px`` in binned pixels and
        relative to the truth origin), ``time_s``, ``t_mid_s`` and the imager's own truth.
        """
        if not (exposure_s > 0 and math.isfinite(exposure_s)):
            raise ValueError(f"exposure_s must be > 0, got {exposure_s}")
        with self._lock:
            self._check_faults("camera")
            y0, x0, h, w = self._check_region(binning, region)
            t0 = self.clock.now_s()
            optics = self.effective_optics()
            t_mid = t0 + 0.5 * exposure_s
            shift_nm = self.displacement_nm(t_mid)
            dose = self.dose_rate_e_per_A2_s * exposure_s
            image, info = self._hrtem_frame(optics, shift_nm, dose)
            image = np.asarray(image, dtype=np.float32)[y0 : y0 + h, x0 : x0 + w]
            if binning > 1:
                image = image.reshape(h // binning, binning, w // binning, binning).sum((1, 3))
            record = FrameRecord(
                index=self._frame_index,
                time_s=t0,
                defocus_nominal_nm=self.lens.defocus_setpoint_nm(),
                defocus_readback_nm=self.lens.readback_defocus_nm(),
                exposure_s=float(exposure_s),
                dose_e_per_A2=dose,
                signal="image",
            )
            self._frame_index += 1
            self.clock.advance(exposure_s + self.readout_s)
            pixel = self.camera_pixel_nm * binning
            truth = {
                **info,
                "defocus_nm": optics.defocus_nm,
                "optics": optics.model_dump(),
                "shift_nm": shift_nm,
                "shift_px": (shift_nm - self._truth_ref_nm) / pixel,
                "time_s": t0,
                "t_mid_s": t_mid,
                "region": (y0, x0, h, w),
                "binning": binning,
            }
            return np.ascontiguousarray(image, dtype=np.float32), record, truth

    # ------------------------------------------------------------------ scan
    def _stem_imager(self, optics: Optics, signals: tuple[str, ...]) -> STEMImager:
        """Cached per optics state; C1, A1 and B2 are rounded to 0.1 nm (angles to 0.1°) so a
        slowly drifting focus does not rebuild the maps for every frame."""
        rounded = {k: round(getattr(optics, k), 1) for k in _STEM_ROUNDED_FIELDS}
        optics = optics.with_(**rounded)
        key = (optics, signals, self.convergence_mrad)
        if key in self._stem_cache:
            self._stem_cache.move_to_end(key)
            return self._stem_cache[key]
        imager = STEMImager(self.specimen, optics, self.convergence_mrad, signals)
        self._stem_cache[key] = imager
        while len(self._stem_cache) > STEM_CACHE_SIZE:
            self._stem_cache.popitem(last=False)
        return imager

    def acquire_scan(
        self, settings: ScanSettings
    ) -> tuple[dict[str, np.ndarray], dict[str, FrameRecord], dict]:
        """Scan one frame with every signal of ``settings`` at the same probe positions.

        The scan is centred on the specimen field; the optics (lens state) are those at the scan
        start (no focus change during a frame); the clock advances by the frame time.
        Truth: ``shift_px`` (content displacement at the first pixel, relative to the truth
        origin, in specimen-oriented pixels), ``defocus_nm``, ``optics`` and the STEM imager's
        truth (positions, times, jitter, drift at start/centre, …).
        """
        signals = tuple(settings.signals)
        bad = [s for s in signals if s not in SIGNALS]
        if bad or not signals:
            raise ValueError(f"unknown scan signal(s) {bad}; available: {SIGNALS}")
        with self._lock:
            self._check_faults("scan")
            self.scan_settings = settings
            optics = self.effective_optics()
            imager = self._stem_imager(optics, signals)
            centre = (self.specimen.extent_A[0] / 20.0, self.specimen.extent_A[1] / 20.0)
            raster = ScanRaster(
                tuple(settings.size_px),
                settings.pixel_nm,
                settings.dwell_us,
                settings.flyback_us,
                settings.rotation_deg,
                centre,
            )
            t0 = self.clock.now_s()
            images, info = imager.scan(
                raster,
                t0,
                self.displacement_nm,
                self._scan_rng,
                self.probe_current_pA,
                self.scan_jitter_px,
            )
            records = {
                s: FrameRecord(
                    index=self._frame_index,
                    time_s=t0,
                    scan_rotation_deg=settings.rotation_deg,
                    dwell_us=settings.dwell_us,
                    dose_e_per_A2=info["dose_e_per_A2"],
                    signal=s,
                )
                for s in signals
            }
            self._frame_index += 1
            self.clock.advance(raster.frame_time_s)
            truth = {
                **info,
                "shift_px": (info["drift_start_nm"] - self._truth_ref_nm) / settings.pixel_nm,
                "defocus_nm": optics.defocus_nm,
                "optics": optics.model_dump(),
                "convergence_mrad": self.convergence_mrad,
            }
            return images, records, truth


def drifting_series_from_image(
    image: np.ndarray,
    *,
    n_frames: int = 16,
    size_px: int = 512,
    dose_e_per_px: float = 10.0,
    step_sigma_px: float = 1.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A real (or any) image as the specimen of a drifting series: (frames, true shifts_px).

    The specimen moves by a seeded Gaussian random walk (σ = ``step_sigma_px`` per frame,
    frame 0 at rest); frame_i(r) = image(r − s_i), shifted sub-pixel by a Fourier phase ramp on
    the whole image and cropped from its centre, so no wrapped content reaches the crop when the
    image is larger than ``size_px`` by more than the drift. The dark level (the image minimum)
    is removed, the mean scaled to ``dose_e_per_px`` and Poisson noise drawn. Frames float32
    (n, size, size); shifts (n, 2) in the ARCHITECTURE.md convention.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or min(img.shape) < size_px:
        raise ValueError(f"need a 2-D image of at least {size_px}² px; got shape {img.shape}")
    rng = np.random.default_rng(seed)
    steps = rng.normal(0.0, step_sigma_px, (n_frames, 2))
    steps[0] = 0.0
    shifts = np.cumsum(steps, axis=0)
    spectrum = sfft.fft2(img - img.min())
    ky = np.fft.fftfreq(img.shape[0])[:, None]
    kx = np.fft.fftfreq(img.shape[1])[None, :]
    y0, x0 = (img.shape[0] - size_px) // 2, (img.shape[1] - size_px) // 2
    frames = np.empty((n_frames, size_px, size_px), dtype=np.float32)
    for i, s in enumerate(shifts):
        moved = sfft.ifft2(spectrum * np.exp(-2j * np.pi * (ky * s[0] + kx * s[1]))).real
        crop = np.clip(moved[y0 : y0 + size_px, x0 : x0 + size_px], 0.0, None)
        frames[i] = rng.poisson(crop / crop.mean() * dose_e_per_px)
    return frames, shifts
