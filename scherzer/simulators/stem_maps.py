"""STEM object-space signal maps: the probe and what each detector sees (HAADF, ABF, BF).

Used by :class:`scherzer.simulators.stem.STEMImager`, which samples these maps at the probe
positions of a timed raster. Units: Å inside (maps, atom positions, 1/Å frequencies).

Physics model (and what it is *not*)
------------------------------------
* **Probe.** ψ_p(r) = F⁻¹[A_α(k) exp(−iχ(k))] with the aberration function χ of
  :mod:`scherzer.optics` (same :class:`~scherzer.optics.Optics`: defocus, A1, B2, A2, C3, …),
  a hard probe-forming aperture of semi-angle α = ``convergence_mrad`` and normalisation
  ∫|ψ_p|² d²r = 1. Focal spread (``focal_spread_nm``, a standard deviation) is an *incoherent*
  average of the probe intensity over defocus (5-point Gauss–Hermite quadrature). Image vibration
  (``vibration_nm``) blurs every signal by the Gaussian envelope of optics.py.
  ``beam_divergence_mrad`` (a TEM illumination property) is not used; no finite source size.
* **HAADF** (incoherent imaging): fraction of the beam reaching the annular detector
  f_HAADF(R) = Σ_atoms s·Z^1.7 · (|ψ_p|² ⊛ G_a)(R − r_a) with s = :data:`HAADF_CROSS_SECTION_A2`
  (Å², Rutherford-like high-angle cross-section per Z^1.7) and G_a a normalised 2-D Gaussian of
  variance ⟨u²⟩ (``Specimen.debye_waller_A2``; default :data:`DEFAULT_MSD_A2`) — thermal smearing.
  Atoms are projected along z (columns are sums of their atoms; no channelling, no
  cross-talk, no saturation: thick heavy columns are overestimated).
* **Phase object** for the coherent signals: t(r) = exp[(i − κ) σ V(r)], V the projected potential
  of :func:`scherzer.simulators.specimen.projected_potential` and κ = :data:`ABSORPTION_RATIO`
  (an absorptive potential V′ = κV standing for electrons scattered out of the bright-field
  disc). Single slice: no propagation inside the specimen.
* **BF** by reciprocity: a small axial detector of semi-angle β = ``bf_fraction``·α is equivalent
  to a TEM image with objective aperture α and illumination semi-angle β. We compute
  I_BF = |F⁻¹[T(k) A_α(k) e^{−iχ(k)} E_t E_s]|² with optics.image_intensity (quasi-coherent
  envelopes: β enters as a Gaussian 1/e divergence β/√2 with the same second moment as the
  uniform disc; focal spread as E_t). Fraction of the beam collected: (β/α)² · I_BF (vacuum:
  (β/α)²).
* **ABF** by *linear* (weak-object) STEM imaging theory for an arbitrary detector D(q): with
  P(q) = A(q) e^{iχ(q)} and C(g) = ∫ D(q) P(q) P*(q − g) dq / ∫|A|² dq, a weak object
  t ≈ 1 + iφ − μ gives f(R) = C(0) + F⁻¹[Φ(g)·i(C(g) − C*(−g)) − M(g)·(C(g) + C*(−g))](R), with
  φ = σV and μ = κσV, detector annulus [``abf_inner_fraction``·α, α]. For a symmetric detector
  and an aberration-free probe the phase term vanishes and contrast comes from μ (the
  "absorptive" ABF contrast: columns, light ones included, appear dark). The linear model is only
  right for σV ≪ 1; strong columns can drive it below zero, where it is clipped to 0. Real ABF
  contrast comes largely from channelling, which this model does not contain.

Maps and speed: each signal is evaluated once per (specimen, optics) as a finely sampled
object-space map (pitch min(1/(8 k_α), 0.2 Å), k_α = α/λ, so Nyquist is ≥ 2× the 2k_α band limit
of the images) over the specimen field plus a margin (10 Å + twice the geometric probe radius);
atoms are deposited bilinearly and the deposit kernel (sinc²) is divided out in Fourier space.
Periodic specimens: positions are wrapped into the field and periodic images fill the margin.
Non-periodic: beyond the margin the map edge (vacuum) is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

from scherzer.optics import (
    FrequencyGrid,
    Optics,
    aperture,
    chi,
    fft_workers,
    focal_spread_nodes,
    image_intensity,
    vibration_envelope,
)
from scherzer.simulators.specimen import Specimen, projected_potential

__all__ = ["ABSORPTION_RATIO", "DEFAULT_MSD_A2", "HAADF_CROSS_SECTION_A2", "HAADF_Z_EXPONENT"]

#: High-angle (HAADF) cross-section per Z^1.7 in Å². Unscreened Rutherford scattering into
#: 70–200 mrad at 300 kV gives σ ≈ 1.95e-6·Z² Å²; matched to Z^1.7 near Z = 50 this is ≈6e-6.
#: Au: 8.4e-3 Å² per atom (≈3 % of a 25 mrad probe on a single atom).
HAADF_CROSS_SECTION_A2 = 5.0e-6
#: Exponent of the atomic number in HAADF contrast.
HAADF_Z_EXPONENT = 1.7
#: Mean-square thermal displacement ⟨u²⟩ (Å², per axis) when the specimen gives none.
DEFAULT_MSD_A2 = 0.006
#: Absorptive potential as a fraction of the real projected potential (V′ = κV).
ABSORPTION_RATIO = 0.1
_GH_NODES = 5  # Gauss–Hermite nodes for the incoherent focal-spread average


# --------------------------------------------------------------------------------------------
# Object-space maps
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _MapGrid:
    """A sampled object-space field: (ny, nx) square pixels of ``pitch_A`` starting at
    ``origin_A`` (Å). It covers the specimen field plus a margin on every side; for a periodic
    specimen (``period_A`` set) positions are wrapped into [0, period) before sampling."""

    shape: tuple[int, int]
    pitch_A: float
    origin_A: tuple[float, float]
    period_A: tuple[float, float] | None = None

    @property
    def pixel_A(self) -> tuple[float, float]:
        return (self.pitch_A, self.pitch_A)

    @property
    def freq(self) -> FrequencyGrid:
        return FrequencyGrid(self.shape, (self.pitch_A / 10.0,) * 2)

    @property
    def rfreq(self) -> FrequencyGrid:
        return FrequencyGrid(self.shape, (self.pitch_A / 10.0,) * 2, rfft=True)

    def to_pixels(self, pos_A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional (row, col) map coordinates of (…, 2) positions in Å."""
        y, x = pos_A[..., 0], pos_A[..., 1]
        if self.period_A is not None:
            y, x = np.mod(y, self.period_A[0]), np.mod(x, self.period_A[1])
        return (y - self.origin_A[0]) / self.pitch_A, (x - self.origin_A[1]) / self.pitch_A


def _make_grid(specimen: Specimen, pitch_A: float, margin_A: float) -> _MapGrid:
    ly, lx = (float(v) for v in specimen.extent_A)
    n = tuple(
        sfft.next_fast_len(math.ceil((v + 2 * margin_A) / pitch_A), real=True) for v in (ly, lx)
    )
    period = (ly, lx) if specimen.periodic else None
    return _MapGrid(n, pitch_A, (-margin_A, -margin_A), period)


def _atoms_in_grid(specimen: Specimen, grid: _MapGrid) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) positions (Å) and indices of the atoms (periodic images included) on the grid."""
    pos = specimen.positions_A[:, :2]
    idx = np.arange(len(pos))
    if grid.period_A is not None:
        ly, lx = grid.period_A
        ry = math.ceil(-grid.origin_A[0] / ly)
        rx = math.ceil(-grid.origin_A[1] / lx)
        shifts = [(a * ly, b * lx) for a in range(-ry, ry + 1) for b in range(-rx, rx + 1)]
        pos = np.concatenate([pos + np.asarray(s) for s in shifts])
        idx = np.tile(idx, len(shifts))
    fy, fx = _unwrapped(grid, pos)
    keep = (fy >= 0) & (fy < grid.shape[0] - 1) & (fx >= 0) & (fx < grid.shape[1] - 1)
    return pos[keep], idx[keep]


def _unwrapped(grid: _MapGrid, pos_A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (
        (pos_A[:, 0] - grid.origin_A[0]) / grid.pitch_A,
        (pos_A[:, 1] - grid.origin_A[1]) / grid.pitch_A,
    )


def _probe_extent_A(optics: Optics, alpha: float) -> float:
    """Upper bound (Å) of the geometric probe radius: ray displacement |∇χ|/(2π) at θ = α."""
    a = alpha
    c = optics.model_dump()
    return (
        abs(c["defocus_nm"]) * 10 * a
        + c["a1_nm"] * 10 * a
        + (c["b2_nm"] + c["a2_nm"]) * 10 * a**2
        + (abs(c["cs_mm"]) * 1e7 + 4 * c["s3_um"] * 1e4 + c["a3_um"] * 1e4) * a**3
        + abs(c["c5_mm"]) * 1e7 * a**5
    )


def _focal_nodes(optics: Optics) -> tuple[np.ndarray, np.ndarray]:
    """Defocus values (nm) and weights for the incoherent focal-spread average."""
    if optics.focal_spread_nm == 0:
        return np.array([optics.defocus_nm]), np.array([1.0])
    offsets, w = focal_spread_nodes(optics.focal_spread_nm, _GH_NODES)
    return optics.defocus_nm + offsets, w


def _splat(grid: _MapGrid, pos_A: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Bilinear deposit of point weights (atoms inside the grid) onto the grid (float64)."""
    ny, nx = grid.shape
    fy, fx = _unwrapped(grid, pos_A)
    iy, ix = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    ty, tx = fy - iy, fx - ix
    out = np.zeros(ny * nx)
    for dy, wy in ((0, 1 - ty), (1, ty)):
        for dx, wx in ((0, 1 - tx), (1, tx)):
            flat = (iy + dy) * nx + (ix + dx)
            out += np.bincount(flat, weights * wy * wx, ny * nx)
    return out.reshape(ny, nx)


def _linear_kernel_ft(grid: _MapGrid) -> np.ndarray:
    """Fourier transform of the bilinear deposit kernel on the rfft grid (sinc² per axis)."""
    f = grid.rfreq
    sy = np.sinc(f.ky * grid.pitch_A) ** 2
    sx = np.sinc(f.kx * grid.pitch_A) ** 2
    return (sy * sx).astype(np.float32)


def _thermal_groups(msd: np.ndarray | None, n: int) -> list[tuple[float, np.ndarray]]:
    """Atoms grouped by mean-square displacement: [(⟨u²⟩ Å², mask)]."""
    if msd is None:
        return [(DEFAULT_MSD_A2, np.ones(n, dtype=bool))]
    keys = np.round(msd, 6)
    return [(float(k), keys == k) for k in np.unique(keys)]


def _column_object_ft(grid: _MapGrid, specimen: Specimen, weights: np.ndarray) -> np.ndarray:
    """rfft of Σ_atoms w·G_⟨u²⟩(r − r_a) on the grid (deposit kernel divided out)."""
    f = grid.rfreq
    total = np.zeros(f.k2.shape, dtype=np.complex64)
    pos, idx = _atoms_in_grid(specimen, grid)
    msd = None if specimen.debye_waller_A2 is None else specimen.debye_waller_A2[idx]
    for u2, mask in _thermal_groups(msd, len(idx)):
        dens = _splat(grid, pos[mask], weights[idx][mask])
        spec = sfft.rfft2(dens.astype(np.float32), workers=fft_workers())
        total += spec * np.exp(-2.0 * math.pi**2 * u2 * f.k2).astype(np.float32)
    return total / _linear_kernel_ft(grid)


def _probe_waves(optics: Optics, grid: _MapGrid, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Probe-forming pupil functions A_α e^{−iχ} (nodes, ny, nx) and node weights."""
    f = grid.freq
    dfs, w = _focal_nodes(optics)
    pupil = aperture(optics.with_(objective_aperture_mrad=alpha * 1e3), f, edge_px=0.0)
    x = chi(optics, f, dfs)
    return (pupil * np.exp(-1j * x)).astype(np.complex64), w


def _probe_intensity(optics: Optics, grid: _MapGrid, alpha: float) -> np.ndarray:
    """Focal-averaged probe intensity (1/Å², ∫ = 1) centred at pixel (0, 0) of the grid."""
    pupils, w = _probe_waves(optics, grid, alpha)
    psi = sfft.ifft2(pupils, axes=(-2, -1), workers=fft_workers())
    inten = np.tensordot(w, (psi.real**2 + psi.imag**2), axes=1)
    area = grid.pixel_A[0] * grid.pixel_A[1]
    return (inten / (inten.sum() * area)).astype(np.float32)


def _haadf_map(specimen, optics, grid, alpha) -> np.ndarray:
    z = specimen.numbers.astype(np.float64)
    obj = _column_object_ft(grid, specimen, HAADF_CROSS_SECTION_A2 * z**HAADF_Z_EXPONENT)
    otf = sfft.rfft2(_probe_intensity(optics, grid, alpha), workers=fft_workers())
    spec = obj * otf * vibration_envelope(optics, grid.rfreq)
    return sfft.irfft2(spec, s=grid.shape, workers=fft_workers()).astype(np.float32)


def _projected_potential_V_A(specimen: Specimen, grid: _MapGrid) -> np.ndarray:
    """Projected potential (V·Å) on the map grid (specimen module, Kirkland factors)."""
    return projected_potential(specimen, grid.shape, grid.pitch_A / 10.0, origin_A=grid.origin_A)


def _phase_maps(specimen, optics, grid) -> tuple[np.ndarray, np.ndarray]:
    """(φ, μ) = (σV, κσV) in radians on the grid."""
    phase = optics.interaction_constant * _projected_potential_V_A(specimen, grid)
    return phase.astype(np.float32), (ABSORPTION_RATIO * phase).astype(np.float32)


def _bf_map(phase, absorb, optics, grid, alpha, bf_fraction) -> np.ndarray:
    """Bright field by reciprocity, as a fraction of the beam current."""
    beta = bf_fraction * alpha
    bf_optics = optics.with_(
        objective_aperture_mrad=alpha * 1e3, beam_divergence_mrad=beta * 1e3 / math.sqrt(2.0)
    )
    wave = np.exp(-absorb + 1j * phase).astype(np.complex64)
    wave_ft = sfft.fft2(wave, workers=fft_workers())
    return (bf_fraction**2 * image_intensity(wave_ft, bf_optics, grid.freq)).astype(np.float32)


def _detector_overlap(optics, grid, alpha, inner, outer) -> np.ndarray:
    """C(g) = ∫ D(q) P(q) P*(q−g) dq / ∫|A|² (focal-averaged), P = A e^{iχ}; full FFT grid."""
    pupils, w = _probe_waves(optics, grid, alpha)
    p = np.conj(pupils)
    qk = grid.freq.k * optics.wavelength_A
    det = ((qk >= inner * alpha) & (qk <= outer * alpha)).astype(np.float32)
    n = grid.shape[0] * grid.shape[1]
    norm = float(np.sum(np.abs(p[0]) ** 2))
    fh = sfft.ifft2(det * p, axes=(-2, -1), workers=fft_workers())
    hh = sfft.ifft2(p, axes=(-2, -1), workers=fft_workers())
    c = sfft.fft2(fh * np.conj(hh), axes=(-2, -1), workers=fft_workers()) * (n / norm)
    return np.tensordot(w, c, axes=1).astype(np.complex64)


def _reversed(c: np.ndarray) -> np.ndarray:
    """c(−g) on an FFT-ordered grid."""
    return np.roll(c[::-1, ::-1], 1, axis=(0, 1))


def _abf_map(phase, absorb, optics, grid, alpha, inner) -> np.ndarray:
    """Annular bright field in linear (weak-object) theory, as a fraction of the beam."""
    c = _detector_overlap(optics, grid, alpha, inner, 1.0)
    cm = np.conj(_reversed(c))
    l_phase = 1j * (c - cm)
    l_abs = -(c + cm)
    ev = vibration_envelope(optics, grid.freq)
    spec = (sfft.fft2(phase) * l_phase + sfft.fft2(absorb) * l_abs) * ev
    img = float(c[0, 0].real) + sfft.ifft2(spec, workers=fft_workers()).real
    return np.clip(img, 0.0, None).astype(np.float32)
