"""Scan-distorted STEM series with per-pixel ground truth, and spectrum-image (EDS) series.

Units: nm, s, µs and degrees at the boundaries (names carry the unit); positions are (y, x).

Distortion model (all opt-in; :func:`scherzer.simulators.stem.simulate_rotated_scan` is
unchanged). The specimen moves by d(t) (nm) and the scan coils misplace the probe by e(t):

* drift d(t) = v·t + ½·a·t² + w(t): constant velocity ``drift_nm_per_s``, acceleration
  ``acceleration_nm_per_s2`` and a slow random walk w (Brownian, ``random_walk_nm_per_sqrt_s``,
  drawn on a grid of ``RANDOM_WALK_STEP_S`` and linearly interpolated);
* mains pick-up: a sinusoid in scan time, m(t) = A·sin(2π f t + φ) with amplitude
  ``mains_nm`` (y, x), frequency ``mains_hz`` and a random phase φ (probe error);
* flyback settling: at each row start the probe lags along the fast axis by
  ``flyback_settle_nm``·exp(−t_col/τ) with τ = ``flyback_settle_us`` (probe error);
* row jitter: one Gaussian fast-axis offset per row (σ = ``jitter_px``).

A scan pixel (row, col) at time t samples the specimen at r_lab(row, col) + e(t) − d(t). The
truth is exactly that position, per pixel, in specimen coordinates (float32 nm).

Spectrum images: element maps are the probe intensity convolved with the columns of one element
(like HAADF with weight 1 per atom, thermal smearing included); every element emits one
Gaussian line per listed energy, over a flat bremsstrahlung background; counts per channel are
Poisson draws of (electrons per pixel) × Σ_e yield_e · map_e(r) · line_e(E) + background.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.fft as sfft

from scherzer.optics import Optics, fft_workers, vibration_envelope
from scherzer.simulators import stem as _stem
from scherzer.simulators import stem_maps as _maps
from scherzer.simulators.specimen import Specimen, make_specimen
from scherzer.simulators.stem import ScanRaster, STEMImager, rotation_series
from scherzer.stack import FrameRecord, ImageStack

__all__ = [
    "EDS_LINES_KEV",
    "ScanDistortion",
    "SpectrumParams",
    "element_maps",
    "sample_truth",
    "series_from_image",
    "simulate_distorted_series",
]

RANDOM_WALK_STEP_S = 1e-3  # time step of the random-walk drift (interpolated between steps)

#: Characteristic X-ray lines (keV) with relative weights, per atomic number (a few).
EDS_LINES_KEV: Mapping[int, tuple[tuple[float, float], ...]] = {
    8: ((0.525, 1.0),),  # O Kα
    22: ((4.511, 1.0), (4.932, 0.13), (0.452, 0.3)),  # Ti Kα, Kβ, Lα
    38: ((1.806, 1.0), (14.165, 0.6)),  # Sr Lα, Kα
    14: ((1.740, 1.0),),  # Si Kα
    79: ((2.120, 1.0), (9.713, 0.8)),  # Au Mα, Lα
}


@dataclass(frozen=True)
class ScanDistortion:
    """What moves the probe relative to the specimen during a scan (see the module doc)."""

    drift_nm_per_s: tuple[float, float] = (0.05, -0.03)
    acceleration_nm_per_s2: tuple[float, float] = (0.0, 0.0)
    random_walk_nm_per_sqrt_s: float = 0.0
    mains_nm: tuple[float, float] = (0.0, 0.0)
    mains_hz: float = 50.0
    flyback_settle_nm: float = 0.0
    flyback_settle_us: float = 5.0
    jitter_px: float = 0.0

    def drift_fn(self, total_s: float, rng: np.random.Generator):
        """d(t) (nm) for 0 ≤ t ≤ ``total_s``: velocity, acceleration and the random walk."""
        v = np.asarray(self.drift_nm_per_s, float)
        a = np.asarray(self.acceleration_nm_per_s2, float)
        n_steps = max(2, math.ceil(total_s / RANDOM_WALK_STEP_S) + 2)
        grid_s = np.arange(n_steps) * RANDOM_WALK_STEP_S
        steps = rng.normal(0.0, 1.0, (n_steps, 2)) * (
            self.random_walk_nm_per_sqrt_s * math.sqrt(RANDOM_WALK_STEP_S)
        )
        steps[0] = 0.0
        walk = np.cumsum(steps, axis=0)

        def drift(t: np.ndarray) -> np.ndarray:
            t = np.asarray(t, dtype=np.float64)
            w = np.stack([np.interp(t, grid_s, walk[:, k]) for k in range(2)], axis=-1)
            return t[..., None] * v + 0.5 * (t**2)[..., None] * a + w

        return drift

    def probe_error_nm(
        self, times_s: np.ndarray, col_times_s: np.ndarray, fast: np.ndarray, phase: float
    ) -> np.ndarray:
        """e(t) (…, 2) nm: mains pick-up plus flyback settling along the fast axis."""
        mains = np.sin(2 * math.pi * self.mains_hz * times_s + phase)[..., None] * np.asarray(
            self.mains_nm, float
        )
        tau_s = max(self.flyback_settle_us, 1e-3) * 1e-6
        settle = self.flyback_settle_nm * np.exp(-col_times_s / tau_s)
        return mains + settle[..., None] * fast


@dataclass(frozen=True)
class SpectrumParams:
    """EDS-like spectrum images: ``n_channels`` of ``channel_kev`` from ``offset_kev``;
    ``cross_section_A2`` detected X-ray cross-section per atom (Å²; ionisation × fluorescence
    yield × detector solid angle, all elements alike): counts per electron = σ·Σ_atoms
    |ψ_p|²(R − r_a), shared among an element's lines by their weights; ``background`` counts
    per channel per electron (bremsstrahlung, flat); ``energy_resolution_kev`` line FWHM."""

    n_channels: int = 256
    channel_kev: float = 0.08
    offset_kev: float = 0.0
    cross_section_A2: float = 2e-4
    background: float = 2e-6
    energy_resolution_kev: float = 0.13
    elements: tuple[int, ...] = field(default=(38, 22, 8))

    def energies_kev(self) -> np.ndarray:
        return self.offset_kev + self.channel_kev * (np.arange(self.n_channels) + 0.5)

    def line_spectra(self) -> np.ndarray:
        """(elements, channels) normalised line shapes (sum of Gaussians per element)."""
        e = self.energies_kev()
        sigma = self.energy_resolution_kev / 2.3548
        out = np.zeros((len(self.elements), len(e)))
        for k, z in enumerate(self.elements):
            for energy, weight in EDS_LINES_KEV.get(z, ()):
                out[k] += weight * np.exp(-0.5 * ((e - energy) / sigma) ** 2)
        area = out.sum(axis=1, keepdims=True)
        return out / np.where(area > 0, area, 1.0)


def element_maps(imager: STEMImager, elements: Sequence[int]) -> np.ndarray:
    """Per-element maps (elements, H, W) on the imager's object grid: Σ_atoms of Z (probe
    intensity ⊛ thermal Gaussian)(R − r_a), in 1/Å² (probe intensity normalised to 1)."""
    grid, spec = imager.grid, imager.specimen
    otf = sfft.rfft2(
        _maps._probe_intensity(imager.optics, grid, imager.convergence_mrad * 1e-3),
        workers=fft_workers(),
    ) * vibration_envelope(imager.optics, grid.rfreq)
    maps = []
    for z in elements:
        weights = (spec.numbers == z).astype(np.float64)
        obj = _maps._column_object_ft(grid, spec, weights)
        img = sfft.irfft2(obj * otf, s=grid.shape, workers=fft_workers())
        maps.append(np.clip(img, 0.0, None).astype(np.float32))
    return np.stack(maps)


def _sample_maps(imager: STEMImager, coeffs: np.ndarray, pos_nm: np.ndarray) -> np.ndarray:
    """Cubic-spline samples (maps, …) of prefiltered maps at positions (…, 2) nm."""
    fy, fx = imager.grid.to_pixels(pos_nm.reshape(-1, 2) * 10.0)
    out = np.empty((len(coeffs), len(fy)), dtype=np.float32)
    _stem._sample_bspline(coeffs, fy, fx, out)
    return out.reshape((len(coeffs), *pos_nm.shape[:-1]))


def _scan_positions(
    raster: ScanRaster,
    t0_s: float,
    distortion: ScanDistortion,
    drift,
    phase: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Specimen positions (ny, nx, 2) nm sampled by every scan pixel, and per-row jitter."""
    jitter = raster.jitter_px(distortion.jitter_px, rng if distortion.jitter_px else None)
    times = raster.pixel_times_s(t0_s)
    pos = raster.nominal_positions_nm(jitter)
    col_times = times - times[:, :1]
    _, fast = _stem._scan_axes(raster.rotation_deg)
    pos += distortion.probe_error_nm(times, col_times, fast, phase)
    pos -= drift(times)
    return pos, jitter


def simulate_distorted_series(
    specimen: str | Specimen = "srtio3_001",
    *,
    n_frames: int = 6,
    rotation_mode: str = "none",
    base_rotation_deg: float = 0.0,
    size: int = 192,
    pixel_nm: float = 0.02,
    dwell_us: float = 2.0,
    flyback_us: float = 100.0,
    signals: Sequence[str] = ("HAADF", "ABF"),
    distortion: ScanDistortion | None = None,
    beam_current_pA: float = 20.0,
    spectrum: SpectrumParams | None = None,
    optics: Optics | None = None,
    convergence_mrad: float = 25.0,
    seed: int = 0,
) -> dict[str, object]:
    """A scan-distorted series: one :class:`ImageStack` per signal (frames as acquired, in scan
    coordinates, like :func:`~scherzer.simulators.stem.simulate_rotated_scan`) and, with
    ``spectrum``, key ``"SI"``: counts (n, ny, nx, channels) uint16 at the same probe positions.

    ``ground_truth`` (every stack): ``positions_nm`` (n, ny, nx, 2) float32, the specimen
    coordinate each scan pixel sampled; ``rotation_deg`` (n,); ``jitter_px`` (n, ny);
    ``pixel_nm``; ``scan_centre_nm``. Key ``"truth"`` holds the noise-free ``imager`` and, with
    ``spectrum``, ``element_maps`` coefficients to sample undistorted element maps
    (:func:`sample_truth`).
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1; got {n_frames}")
    dist = distortion or ScanDistortion()
    rng = np.random.default_rng(seed)
    rotations = rotation_series(rotation_mode, n_frames, base_rotation_deg)
    probe_raster = ScanRaster(size, pixel_nm, dwell_us, flyback_us)
    total_s = n_frames * probe_raster.frame_time_s
    reach_nm = (
        float(np.hypot(*dist.drift_nm_per_s)) * total_s
        + 0.5 * float(np.hypot(*dist.acceleration_nm_per_s2)) * total_s**2
    )
    field_nm = size * pixel_nm * math.sqrt(2) + reach_nm + 2.0
    spec = (
        specimen
        if isinstance(specimen, Specimen)
        else make_specimen(specimen, (field_nm, field_nm), seed=seed)
    )
    optics = optics if optics is not None else Optics(voltage_kv=300.0)
    imager = STEMImager(spec, optics, convergence_mrad, signals)
    centre = (spec.extent_A[0] / 20.0, spec.extent_A[1] / 20.0)
    drift = dist.drift_fn(total_s, rng)
    phase = float(rng.uniform(0, 2 * math.pi))
    n_e = beam_current_pA * 1e-12 * dwell_us * 1e-6 / _stem.ELEMENTARY_CHARGE_C
    si_coeffs = lines = None
    if spectrum is not None:
        from scipy import ndimage

        maps = element_maps(imager, spectrum.elements)
        si_coeffs = np.stack(
            [ndimage.spline_filter(m, order=3, mode="grid-wrap", output=np.float32) for m in maps]
        )
        lines = spectrum.line_spectra().astype(np.float32)
    frames: dict[str, list] = {s: [] for s in imager.signals}
    positions, jitters, si_frames, records = [], [], [], []
    for i, rot in enumerate(rotations):
        raster = ScanRaster(size, pixel_nm, dwell_us, flyback_us, float(rot), centre)
        t0 = i * raster.frame_time_s
        pos, jit = _scan_positions(raster, t0, dist, drift, phase, rng)
        for s, f in imager.sample(pos).items():
            lam = np.clip(f, 0.0, None) * (n_e * imager.efficiency[s])
            frames[s].append(rng.poisson(lam).astype(np.float32))
        if spectrum is not None:
            amounts = _sample_maps(imager, si_coeffs, pos) * (n_e * spectrum.cross_section_A2)
            lam = np.einsum("eyx,ec->yxc", amounts, lines) + n_e * spectrum.background
            si_frames.append(rng.poisson(lam).astype(np.uint16))
        positions.append(pos.astype(np.float32))
        jitters.append(jit)
        records.append((i, t0, float(rot), n_e / (pixel_nm * 10.0) ** 2))
    truth = {
        "positions_nm": np.stack(positions),
        "rotation_deg": rotations,
        "jitter_px": np.stack(jitters),
        "pixel_nm": pixel_nm,
        "scan_centre_nm": np.asarray(centre),
        "frame_time_s": probe_raster.frame_time_s,
        "line_time_s": probe_raster.line_time_s,
    }
    out: dict[str, object] = {}
    for s in imager.signals:
        recs = [
            FrameRecord(index=i, time_s=t, scan_rotation_deg=r, dwell_us=dwell_us,
                        dose_e_per_A2=d, signal=s)
            for i, t, r, d in records
        ]  # fmt: skip
        out[s] = ImageStack(
            frames=np.stack(frames[s]),
            pixel_size_nm=(pixel_nm, pixel_nm),
            records=recs,
            metadata={"specimen": spec.name, "rotation_mode": rotation_mode, "seed": seed,
                      "signal": s},
            ground_truth=dict(truth),
            intensity_units="counts",
        )  # fmt: skip
    if spectrum is not None:
        out["SI"] = np.stack(si_frames)
    out["truth"] = {
        "imager": imager,
        "si_coeffs": si_coeffs,
        "lines": lines,
        "electrons_per_pixel": n_e,
        "spectrum": spectrum,
    }
    return out


def sample_truth(truth: dict, positions_nm: np.ndarray, signal: str | None = None) -> np.ndarray:
    """Noise-free values at positions (…, 2) nm: a detector ``signal`` (expected counts), or,
    with ``signal=None``, the element amounts (elements, …) (X-ray counts in each element's
    lines summed over channels)."""
    imager: STEMImager = truth["imager"]
    n_e = truth["electrons_per_pixel"]
    if signal is not None:
        return imager.sample(positions_nm)[signal] * (n_e * imager.efficiency[signal])
    spectrum: SpectrumParams = truth["spectrum"]
    return _sample_maps(imager, truth["si_coeffs"], positions_nm) * (
        n_e * spectrum.cross_section_A2
    )


def series_from_image(
    image: np.ndarray,
    *,
    n_frames: int = 6,
    size: int = 192,
    step_px: float = 1.0,
    distortion: ScanDistortion | None = None,
    dwell_us: float = 2.0,
    flyback_us: float = 100.0,
    mean_counts: float = 20.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A scan-distorted series of a real image's content (e.g. an atomic-resolution STEM image
    as the specimen): every scan pixel samples ``image`` (cubic spline) at its distorted
    position, one scan pixel = ``step_px`` image pixels, scan centred on the image; counts
    scaled to ``mean_counts`` per pixel (dark level = image minimum) with Poisson noise.
    ``image`` (H, W), or (signals, H, W) for simultaneous signals (e.g. ADF and ABF) sampled
    at the same positions. Distances in ``distortion`` are in *image pixels* (its "nm").
    Returns (frames (n, size, size) — or (signals, n, size, size) — float32 in scan
    coordinates, truth (n, size, size, 2) float32: sampled position in scan pixels)."""
    from scipy import ndimage

    dist = distortion or ScanDistortion()
    rng = np.random.default_rng(seed)
    imgs = np.asarray(image, dtype=np.float64)
    single = imgs.ndim == 2
    imgs = imgs[None] if single else imgs
    centre = ((imgs.shape[1] - 1) / 2.0, (imgs.shape[2] - 1) / 2.0)
    raster = ScanRaster(size, step_px, dwell_us, flyback_us, 0.0, centre)
    drift = dist.drift_fn(n_frames * raster.frame_time_s, rng)
    phase = float(rng.uniform(0, 2 * math.pi))
    positions = [
        _scan_positions(raster, i * raster.frame_time_s, dist, drift, phase, rng)[0]
        for i in range(n_frames)
    ]  # all positions first: the noise draws below do not change them
    frames = np.empty((len(imgs), n_frames, size, size), np.float32)
    for k, img in enumerate(imgs):
        img = (img - img.min()) * (mean_counts / max(float(np.mean(img - img.min())), 1e-12))
        coeffs = ndimage.spline_filter(img, 3, mode="mirror")
        for i, pos in enumerate(positions):
            values = ndimage.map_coordinates(
                coeffs, [pos[..., 0], pos[..., 1]], order=3, prefilter=False, mode="mirror"
            )
            frames[k, i] = rng.poisson(np.clip(values, 0.0, None))
    truth = (np.stack(positions) / step_px).astype(np.float32)
    return (frames[0] if single else frames), truth
