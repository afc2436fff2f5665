"""STEM image formation: probe, detector signals (HAADF/ABF/BF) and a timed raster.

Units: Å inside the numerics (object-space maps, atom positions, frequencies in 1/Å); nm, µs,
s, pA and degrees at the boundaries (names carry the unit). Positions are (y, x).

Physics model: the probe and the detector signals are in :mod:`scherzer.simulators.stem_maps`;
this module adds the timed raster, the sampling and the noise.

* **Raster.** Pixel (row, col) is visited at t = t₀ + row·(W·dwell + flyback) + col·dwell (flyback
  in µs per line). Scan pixel offsets (u, v) = ((row − (H−1)/2)·p, (col − (W−1)/2 + j_row)·p),
  j_row the line jitter (Gaussian, σ = ``jitter_px``, one value per row, along the fast axis).
  A scan rotation θ puts the fast axis along (sin θ, cos θ) and the slow axis along
  (cos θ, −sin θ) in specimen (y, x) (θ measured from +x towards +y, as optics azimuths). The
  specimen moves by d(t) (nm), so the probe at lab position r = c + u·e_slow + v·e_fast samples
  the specimen at r − d(t): each pixel at its own time (slow scans shear and stretch). Frames
  are stored as acquired (scan coordinates); :func:`derotate` turns a multiple-of-90° frame back
  into specimen orientation.
* **Noise.** Electrons per pixel N = I·dwell/e; counts ~ Poisson(N · f · efficiency) per signal
  (independent detectors, same positions).

A frame is one cubic-B-spline interpolation of all signals (object-space maps of
:mod:`~scherzer.simulators.stem_maps`) at the probe positions (numba, parallel) plus Poisson draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numba
import numpy as np
from scipy import ndimage

from scherzer.optics import (
    Optics,
)
from scherzer.processing.registration import rotate_frame_back
from scherzer.simulators.specimen import Specimen, make_specimen
from scherzer.simulators.stem_maps import (
    ABSORPTION_RATIO,
    DEFAULT_MSD_A2,
    HAADF_CROSS_SECTION_A2,
    _abf_map,
    _bf_map,
    _haadf_map,
    _make_grid,
    _phase_maps,
    _probe_extent_A,
)
from scherzer.stack import FrameRecord, ImageStack

__all__ = [
    "ABSORPTION_RATIO",
    "DEFAULT_EFFICIENCY",
    "DEFAULT_MSD_A2",
    "HAADF_CROSS_SECTION_A2",
    "SIGNALS",
    "STEMImager",
    "ScanRaster",
    "constant_drift",
    "derotate",
    "rotation_series",
    "simulate_rotated_scan",
]

ELEMENTARY_CHARGE_C = 1.602176634e-19
#: Detector collection efficiencies (fraction of arriving electrons that are counted).
DEFAULT_EFFICIENCY: Mapping[str, float] = {"HAADF": 0.9, "ABF": 0.9, "BF": 0.9}
SIGNALS = ("HAADF", "ABF", "BF")


# --------------------------------------------------------------------------------------------
# Raster
# --------------------------------------------------------------------------------------------
DriftFn = Callable[[np.ndarray], np.ndarray]


def constant_drift(velocity_nm_per_s: tuple[float, float], t_ref_s: float = 0.0) -> DriftFn:
    """d(t) = v·(t − t_ref) in nm as (…, 2) (y, x)."""
    v = np.asarray(velocity_nm_per_s, dtype=np.float64).reshape(2)

    def drift(t: np.ndarray) -> np.ndarray:
        return (np.asarray(t, dtype=np.float64) - t_ref_s)[..., None] * v

    return drift


def _scan_axes(rotation_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """(slow, fast) unit vectors of the scan in specimen (y, x) coordinates."""
    th = math.radians(rotation_deg)
    slow = np.array([math.cos(th), -math.sin(th)])
    fast = np.array([math.sin(th), math.cos(th)])
    return slow, fast


@dataclass(frozen=True)
class ScanRaster:
    """A scan frame: size (ny, nx) px, pixel (nm), dwell (µs), flyback (µs per line),
    rotation (deg) and centre (y, x) in specimen coordinates (nm)."""

    size_px: tuple[int, int] | int = (256, 256)
    pixel_nm: float = 0.02
    dwell_us: float = 2.0
    flyback_us: float = 100.0
    rotation_deg: float = 0.0
    center_nm: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        size = self.size_px
        size = (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size_px must be a positive int or (ny, nx); got {self.size_px!r}")
        object.__setattr__(self, "size_px", size)
        if not self.pixel_nm > 0:
            raise ValueError(f"pixel_nm must be > 0; got {self.pixel_nm}")
        if not self.dwell_us > 0:
            raise ValueError(f"dwell_us must be > 0; got {self.dwell_us}")
        if not self.flyback_us >= 0:
            raise ValueError(f"flyback_us must be >= 0; got {self.flyback_us}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.size_px  # type: ignore[return-value]

    @property
    def line_time_s(self) -> float:
        """Time from one line start to the next: W·dwell + flyback."""
        return (self.shape[1] * self.dwell_us + self.flyback_us) * 1e-6

    @property
    def frame_time_s(self) -> float:
        """Time of one frame including the flyback after the last line."""
        return self.shape[0] * self.line_time_s

    def pixel_times_s(self, t0_s: float) -> np.ndarray:
        """t = t₀ + row·(W·dwell + flyback) + col·dwell, shape (ny, nx), seconds."""
        ny, nx = self.shape
        rows = np.arange(ny, dtype=np.float64)[:, None] * self.line_time_s
        cols = np.arange(nx, dtype=np.float64)[None, :] * (self.dwell_us * 1e-6)
        return t0_s + rows + cols

    def nominal_positions_nm(self, jitter_row_px: np.ndarray | None = None) -> np.ndarray:
        """Lab positions (ny, nx, 2) (y, x) nm of the probe, without drift."""
        ny, nx = self.shape
        u = (np.arange(ny, dtype=np.float64) - (ny - 1) / 2.0) * self.pixel_nm
        v = (np.arange(nx, dtype=np.float64) - (nx - 1) / 2.0)[None, :]
        if jitter_row_px is not None:
            v = v + np.asarray(jitter_row_px, dtype=np.float64)[:, None]
        v = np.broadcast_to(v * self.pixel_nm, (ny, nx))
        slow, fast = _scan_axes(self.rotation_deg)
        pos = np.empty((ny, nx, 2), dtype=np.float64)
        for a in range(2):
            pos[..., a] = self.center_nm[a] + u[:, None] * slow[a] + v * fast[a]
        return pos

    def affine_nm(
        self, velocity_nm_per_s: tuple[float, float] = (0.0, 0.0), t0_s: float = 0.0
    ) -> np.ndarray:
        """Analytic affine map (2, 3): specimen position (nm) sampled at pixel (row, col, 1)
        for a constant drift d(t) = v·t and no jitter (the shear/stretch of a slow scan)."""
        ny, nx = self.shape
        slow, fast = _scan_axes(self.rotation_deg)
        v = np.asarray(velocity_nm_per_s, dtype=np.float64)
        p = self.pixel_nm
        a = np.empty((2, 3))
        a[:, 0] = p * slow - v * self.line_time_s
        a[:, 1] = p * fast - v * self.dwell_us * 1e-6
        a[:, 2] = (
            np.asarray(self.center_nm) - (ny - 1) / 2 * p * slow - (nx - 1) / 2 * p * fast
        ) - v * t0_s
        return a

    def jitter_px(self, jitter_px: float, rng: np.random.Generator | None) -> np.ndarray:
        """Per-row fast-axis offsets (px): Gaussian with σ = ``jitter_px`` (zeros if 0)."""
        if jitter_px < 0:
            raise ValueError(f"jitter_px must be >= 0; got {jitter_px}")
        if jitter_px == 0:
            return np.zeros(self.shape[0])
        if rng is None:
            raise ValueError("line jitter needs an rng (np.random.default_rng(seed))")
        return rng.normal(0.0, jitter_px, self.shape[0])

    def positions_nm(
        self,
        t0_s: float,
        drift_nm: DriftFn | None = None,
        jitter_px: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Probe positions in specimen coordinates (ny, nx, 2) (y, x) nm and pixel times (s).

        The specimen displacement ``drift_nm(times) -> (ny, nx, 2)`` is subtracted at each
        pixel's own time.
        """
        pos, times, _ = self._positions(t0_s, drift_nm, self.jitter_px(jitter_px, rng))
        return pos, times

    def _positions(
        self, t0_s: float, drift_nm: DriftFn | None, jitter_row_px: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        times = self.pixel_times_s(t0_s)
        pos = self.nominal_positions_nm(jitter_row_px)
        if drift_nm is not None:
            d = np.asarray(drift_nm(times), dtype=np.float64)
            if d.shape != pos.shape:
                raise ValueError(f"drift_nm(times) must return shape {pos.shape}; got {d.shape}")
            pos -= d
        return pos, times, jitter_row_px


def derotate(frame: np.ndarray, rotation_deg: float) -> np.ndarray:
    """Turn a frame acquired at a multiple of 90° scan rotation into specimen orientation."""
    return rotate_frame_back(frame, rotation_deg)


def rotation_series(mode: str, n_frames: int, base_rotation_deg: float = 0.0) -> np.ndarray:
    """Scan rotation per frame: none | orthogonal-pairs (0, 90, 0, …) | orthogonal-sets
    (0, 90, 180, 270, …), each offset by ``base_rotation_deg``."""
    i = np.arange(n_frames)
    steps = {"none": np.zeros(n_frames), "orthogonal-pairs": i % 2, "orthogonal-sets": i % 4}
    if mode not in steps:
        raise ValueError(f"rotation_mode must be one of {sorted(steps)}; got {mode!r}")
    return base_rotation_deg + 90.0 * steps[mode]


# --------------------------------------------------------------------------------------------
# Interpolation (numba)
# --------------------------------------------------------------------------------------------
@numba.njit(cache=True, inline="always")
def _bspline3_weights(t):
    t2 = t * t
    t3 = t2 * t
    w0 = (1.0 - t) ** 3 / 6.0
    w1 = (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0
    w2 = (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0
    w3 = t3 / 6.0
    return w0, w1, w2, w3


@numba.njit(cache=True, inline="always")
def _index(i, n):
    return min(max(i, 0), n - 1)


@numba.njit(parallel=True, cache=True)
def _sample_bspline(coeffs, fy, fx, out):  # pragma: no cover - numba
    """Cubic B-spline interpolation of every map in ``coeffs`` (s, H, W) at (fy, fx) px;
    indices beyond the map are clamped to its edge (the margin is vacuum)."""
    ns, h, w = coeffs.shape
    for p in numba.prange(fy.shape[0]):
        y, x = fy[p], fx[p]
        iy, ix = math.floor(y), math.floor(x)
        wy = _bspline3_weights(y - iy)
        wx = _bspline3_weights(x - ix)
        for s in range(ns):
            acc = 0.0
            for a in range(4):
                yy = _index(iy - 1 + a, h)
                row = 0.0
                for b in range(4):
                    row += wx[b] * coeffs[s, yy, _index(ix - 1 + b, w)]
                acc += wy[a] * row
            out[s, p] = acc


# --------------------------------------------------------------------------------------------
# Imager
# --------------------------------------------------------------------------------------------
class STEMImager:
    """STEM signals of one specimen under one optics state (maps built once, frames cheap).

    ``sampling_nm`` is the object-map pitch (default 1/(8 k_α) with k_α = α/λ, at most 0.02 nm).
    ``efficiency`` overrides :data:`DEFAULT_EFFICIENCY` per detector. The physics of each signal
    is in :mod:`~scherzer.simulators.stem_maps`.
    """

    def __init__(
        self,
        specimen: Specimen,
        optics: Optics,
        convergence_mrad: float = 25.0,
        signals: Sequence[str] = ("HAADF", "ABF", "BF"),
        sampling_nm: float | None = None,
        *,
        efficiency: Mapping[str, float] | None = None,
        abf_inner_fraction: float = 0.5,
        bf_fraction: float = 0.25,
    ) -> None:
        if isinstance(signals, str):
            signals = (signals,)
        bad = [s for s in signals if s not in SIGNALS]
        if bad or not signals:
            raise ValueError(f"unknown STEM signal(s) {bad}; choose from {SIGNALS}")
        if not 0 < convergence_mrad < 200:
            raise ValueError(f"convergence_mrad must be in (0, 200); got {convergence_mrad}")
        self.specimen = specimen
        self.optics = optics
        self.convergence_mrad = float(convergence_mrad)
        self.signals = tuple(signals)
        self.efficiency = {**DEFAULT_EFFICIENCY, **(efficiency or {})}
        alpha = self.convergence_mrad * 1e-3
        k_alpha = alpha / optics.wavelength_A
        pitch_A = min(1.0 / (8.0 * k_alpha), 0.2) if sampling_nm is None else sampling_nm * 10
        margin_A = 10.0 + 2.0 * _probe_extent_A(optics, alpha)
        self.grid = _make_grid(specimen, pitch_A, margin_A)
        maps = self._build_maps(alpha, abf_inner_fraction, bf_fraction)
        self._coeffs = np.stack(
            [ndimage.spline_filter(m, order=3, mode="grid-wrap", output=np.float32) for m in maps]
        )
        self.maps = dict(zip(self.signals, maps, strict=True))

    def _build_maps(self, alpha: float, abf_inner: float, bf_fraction: float) -> list:
        sp, op, g = self.specimen, self.optics, self.grid
        out = {}
        if "HAADF" in self.signals:
            out["HAADF"] = _haadf_map(sp, op, g, alpha)
        if "ABF" in self.signals or "BF" in self.signals:
            phase, absorb = _phase_maps(sp, op, g)
            if "ABF" in self.signals:
                out["ABF"] = _abf_map(phase, absorb, op, g, alpha, abf_inner)
            if "BF" in self.signals:
                out["BF"] = _bf_map(phase, absorb, op, g, alpha, bf_fraction)
        return [out[s] for s in self.signals]

    def sample(self, positions_nm: np.ndarray) -> dict[str, np.ndarray]:
        """Noise-free beam fractions of every signal at positions (…, 2) (y, x) nm."""
        pos = np.asarray(positions_nm, dtype=np.float64)
        fy, fx = self.grid.to_pixels(pos.reshape(-1, 2) * 10.0)
        out = np.empty((len(self.signals), len(fy)), dtype=np.float32)
        _sample_bspline(self._coeffs, fy, fx, out)
        return {s: out[i].reshape(pos.shape[:-1]) for i, s in enumerate(self.signals)}

    def scan(
        self,
        raster: ScanRaster,
        t0_s: float,
        drift_nm: DriftFn | None,
        rng: np.random.Generator | None,
        beam_current_pA: float = 20.0,
        jitter_px: float = 0.0,
        noise: bool = True,
    ) -> tuple[dict[str, np.ndarray], dict]:
        """Scan one frame; every signal at the same probe positions.

        Returns float32 images (counts if ``noise``, else expected counts) in scan coordinates
        and the truth: ``positions_nm`` (ny, nx, 2) sampled specimen positions, ``times_s``,
        ``jitter_px`` (ny,), ``drift_start_nm`` / ``drift_centre_nm`` (specimen displacement at
        the first and the centre pixel), ``rotation_deg``, ``t0_s``, ``line_time_s``,
        ``frame_time_s``, ``electrons_per_pixel`` and ``dose_e_per_A2``.
        """
        if beam_current_pA <= 0:
            raise ValueError(f"beam_current_pA must be > 0; got {beam_current_pA}")
        if noise and rng is None:
            raise ValueError("noise=True needs an rng (np.random.default_rng(seed))")
        jit = raster.jitter_px(jitter_px, rng)
        pos, times, jit = raster._positions(t0_s, drift_nm, jit)
        fractions = self.sample(pos)
        n_e = beam_current_pA * 1e-12 * raster.dwell_us * 1e-6 / ELEMENTARY_CHARGE_C
        images = {}
        for s, f in fractions.items():
            lam = np.clip(f, 0.0, None) * (n_e * self.efficiency[s])
            images[s] = (rng.poisson(lam) if noise else lam).astype(np.float32)
        ny, nx = raster.shape
        centre_t = times[ny // 2, nx // 2]
        zero = np.zeros(2)
        d = (lambda t: np.asarray(drift_nm(np.asarray(t)), float)) if drift_nm else None
        truth = {
            "positions_nm": pos,
            "times_s": times,
            "jitter_px": jit,
            "drift_start_nm": d(times[0, 0]) if d else zero,
            "drift_centre_nm": d(centre_t) if d else zero,
            "rotation_deg": raster.rotation_deg,
            "t0_s": t0_s,
            "line_time_s": raster.line_time_s,
            "frame_time_s": raster.frame_time_s,
            "electrons_per_pixel": n_e,
            "dose_e_per_A2": n_e / (raster.pixel_nm * 10.0) ** 2,
        }
        return images, truth


# --------------------------------------------------------------------------------------------
# Rotated-scan series
# --------------------------------------------------------------------------------------------
def _resolve_specimen(specimen: str | Specimen, field_nm: float, seed: int) -> Specimen:
    if isinstance(specimen, Specimen):
        return specimen
    return make_specimen(specimen, (field_nm, field_nm), seed=seed)


def simulate_rotated_scan(
    specimen: str | Specimen = "srtio3_001",
    *,
    n_frames: int = 8,
    rotation_mode: str = "orthogonal-pairs",
    base_rotation_deg: float = 0.0,
    size: int = 256,
    pixel_nm: float = 0.02,
    dwell_us: float = 2.0,
    flyback_us: float = 100.0,
    signals: Sequence[str] = ("HAADF", "ABF"),
    drift_nm_per_s: tuple[float, float] = (0.05, -0.03),
    jitter_px: float = 0.2,
    beam_current_pA: float = 20.0,
    optics: Optics | None = None,
    convergence_mrad: float = 25.0,
    seed: int = 0,
) -> dict[str, ImageStack]:
    """A series of STEM frames with scan rotations, constant drift and line jitter.

    Frames follow each other without gaps (frame i starts at i·frame_time). The scan is centred
    on the specimen field. Returns one :class:`ImageStack` per signal (frames as acquired, in scan
    coordinates). ``ground_truth`` (same for every signal): ``rotation_deg`` (n,); ``shifts_px``
    (n, 2) = (d(t_i) − d(t_0)) / pixel, the specimen displacement at each frame's *first pixel*
    relative to frame 0, in pixels of the unrotated (specimen-oriented, see :func:`derotate`)
    frame; ``displacement_nm`` (n, 2) absolute; ``drift_nm_per_s``; ``frame_start_s`` (n,);
    ``line_time_s``, ``dwell_s``; ``scan_affine_nm`` (n, 2, 3) mapping (row, col, 1) to the sampled
    specimen position (nm) — the analytic shear/stretch; ``jitter_px`` (n, ny) per-row offsets.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1; got {n_frames}")
    rng = np.random.default_rng(seed)
    rotations = rotation_series(rotation_mode, n_frames, base_rotation_deg)
    probe_raster = ScanRaster(size, pixel_nm, dwell_us, flyback_us)
    total_s = n_frames * probe_raster.frame_time_s
    field_nm = size * pixel_nm * math.sqrt(2) + float(np.hypot(*drift_nm_per_s)) * total_s + 1.0
    spec = _resolve_specimen(specimen, field_nm, seed)
    optics = optics if optics is not None else Optics(voltage_kv=300.0)
    imager = STEMImager(spec, optics, convergence_mrad, signals)
    centre = (spec.extent_A[0] / 20.0, spec.extent_A[1] / 20.0)
    drift = constant_drift(drift_nm_per_s)
    frames: dict[str, list[np.ndarray]] = {s: [] for s in imager.signals}
    records: dict[str, list[FrameRecord]] = {s: [] for s in imager.signals}
    starts, disp, affines, jitters = [], [], [], []
    for i, rot in enumerate(rotations):
        raster = ScanRaster(size, pixel_nm, dwell_us, flyback_us, float(rot), centre)
        t0 = i * raster.frame_time_s
        images, truth = imager.scan(raster, t0, drift, rng, beam_current_pA, jitter_px)
        for s, img in images.items():
            frames[s].append(img)
            records[s].append(
                FrameRecord(
                    index=i,
                    time_s=t0,
                    scan_rotation_deg=float(rot),
                    dwell_us=dwell_us,
                    dose_e_per_A2=truth["dose_e_per_A2"],
                    signal=s,
                )
            )
        starts.append(t0)
        disp.append(truth["drift_start_nm"])
        affines.append(raster.affine_nm(drift_nm_per_s, 0.0))
        jitters.append(truth["jitter_px"])
    disp_arr = np.asarray(disp)
    ground_truth = {
        "rotation_deg": rotations,
        "shifts_px": (disp_arr - disp_arr[0]) / pixel_nm,
        "displacement_nm": disp_arr,
        "drift_nm_per_s": np.asarray(drift_nm_per_s, dtype=np.float64),
        "frame_start_s": np.asarray(starts),
        "line_time_s": probe_raster.line_time_s,
        "dwell_s": dwell_us * 1e-6,
        "scan_affine_nm": np.asarray(affines),
        "jitter_px": np.asarray(jitters),
    }
    instrument = {
        "optics": optics.model_dump(),
        "convergence_mrad": convergence_mrad,
        "beam_current_pA": beam_current_pA,
        "flyback_us": flyback_us,
    }
    meta = {"specimen": spec.name, "rotation_mode": rotation_mode, "seed": seed}
    return {
        s: ImageStack(
            frames=np.stack(frames[s]),
            pixel_size_nm=(pixel_nm, pixel_nm),
            records=records[s],
            instrument=instrument,
            metadata={**meta, "signal": s},
            ground_truth=dict(ground_truth),
            intensity_units="counts",
        )
        for s in imager.signals
    }
