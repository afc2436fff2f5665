"""Projected potentials (Gaussian gridding + per-element kernels) and exit waves (multislice or
phase object) of a :class:`~scherzer.simulators.specimen.model.Specimen`.

Conventions and physics: see :mod:`scherzer.simulators.specimen`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import scipy.fft as sfft

from scherzer.optics import (
    FrequencyGrid,
    electron_wavelength_A,
    fft_workers,
    interaction_constant_per_V_A,
)
from scherzer.simulators.specimen.model import (
    POTENTIAL_PREFACTOR_V_A2,
    Specimen,
    scattering_factor_A,
)

# --------------------------------------------------------------------------------------------
# Projected potentials: Gaussian gridding (type-1 NUFFT) + per-element kernels
# --------------------------------------------------------------------------------------------

_SPREAD_SIGMA_FINE_PX = 1.2  # Gaussian width on the 2× grid: aliasing ≈ exp(−π² σ²) ≈ 7e-7
_SPREAD_HALF_WIDTH = 7  # kernel support ±7 fine pixels: truncation ≈ exp(−49/(2σ²)) ≈ 4e-8
_PAD_A = 8.0  # non-periodic fields are computed with this margin so tails do not wrap


@numba.njit(cache=True)
def _spread_gaussian(out, fy, fx, sigma_px, half):  # pragma: no cover - numba
    """Add exp(−d²/(2σ²)) around each (fy, fx) (fine-grid pixel units) into ``out``, wrapping."""
    ny, nx = out.shape
    inv = -0.5 / (sigma_px * sigma_px)
    n = 2 * half
    gy = np.empty(n)
    gx = np.empty(n)
    for a in range(fy.size):
        y0 = int(np.floor(fy[a])) - half + 1
        x0 = int(np.floor(fx[a])) - half + 1
        for i in range(n):
            d = y0 + i - fy[a]
            gy[i] = np.exp(d * d * inv)
            d = x0 + i - fx[a]
            gx[i] = np.exp(d * d * inv)
        for i in range(n):
            row = (y0 + i) % ny
            for j in range(n):
                out[row, (x0 + j) % nx] += gy[i] * gx[j]


@dataclass(frozen=True)
class _Grid:
    """A pixel grid: (ny, nx) pixels of ``pixel_A``, pixel (0, 0) at ``origin_A`` (y, x)."""

    shape: tuple[int, int]
    pixel_A: float
    origin_A: tuple[float, float]

    @property
    def field_A(self) -> tuple[float, float]:
        return (self.shape[0] * self.pixel_A, self.shape[1] * self.pixel_A)

    def frequencies(self) -> FrequencyGrid:
        return FrequencyGrid(self.shape, (self.pixel_A / 10.0,) * 2, rfft=True)

    def padded(self, pad_px: int) -> _Grid:
        oy, ox = self.origin_A
        return _Grid(
            (self.shape[0] + 2 * pad_px, self.shape[1] + 2 * pad_px),
            self.pixel_A,
            (oy - pad_px * self.pixel_A, ox - pad_px * self.pixel_A),
        )


def _taper(fg: FrequencyGrid) -> np.ndarray:
    """Raised-cosine roll-off from 3/4 to 1 of Nyquist (per axis): no Gibbs ringing at Nyquist.

    Multislice uses only k < 2/3 Nyquist, where the taper is 1.
    """
    out = np.ones(fg.k2.shape, dtype=np.float64)
    for k in (np.abs(fg.ky), np.abs(fg.kx)):
        nyq = 0.5 / (fg.pixel_nm[0] * 10.0)
        u = np.clip((k / nyq - 0.75) / 0.25, 0.0, 1.0)
        out = out * (0.5 * (1.0 + np.cos(math.pi * u)))
    return out


class _Kernels:
    """Per-(element, ⟨u²⟩) Fourier kernels on one rfft grid, including the gridding deconvolution.

    X(k) = 47.878 f_e(k) exp(−2π²⟨u²⟩k²) / (4 G(k)), G(k) = 2π s² exp(−2π² s² k²) with s the
    gridding Gaussian width in Å; irfft2(X · F_fine) is then the projected potential in V·Å.
    """

    def __init__(self, grid: _Grid) -> None:
        self.grid = grid
        fg = grid.frequencies()
        self.k2 = fg.k2.astype(np.float64)
        s = _SPREAD_SIGMA_FINE_PX * grid.pixel_A / 2.0
        g = 2.0 * math.pi * s * s * np.exp(-2.0 * math.pi**2 * s * s * self.k2)
        self._inv4g = _taper(fg) / (4.0 * g)
        self._cache: dict[tuple[int, float], np.ndarray] = {}
        ny, nx = grid.shape
        self.rows = np.fft.fftfreq(ny, 1.0 / ny).astype(np.int64) % (2 * ny)
        self.cols = nx // 2 + 1

    def __call__(self, z: int, u2: float) -> np.ndarray:
        key = (int(z), float(u2))
        if key not in self._cache:
            f = scattering_factor_A(z, np.sqrt(self.k2))
            dw = np.exp(-2.0 * math.pi**2 * u2 * self.k2) if u2 > 0 else 1.0
            self._cache[key] = (POTENTIAL_PREFACTOR_V_A2 * f * dw * self._inv4g).astype(
                np.complex64
            )
        return self._cache[key]

    def structure_factor(self, yx_A: np.ndarray) -> np.ndarray:
        """Low-frequency rfft coefficients of the Gaussian-gridded atoms (complex64)."""
        ny, nx = self.grid.shape
        fine = np.zeros((2 * ny, 2 * nx), dtype=np.float64)
        scale = 2.0 / self.grid.pixel_A
        fy = (yx_A[:, 0] - self.grid.origin_A[0]) * scale
        fx = (yx_A[:, 1] - self.grid.origin_A[1]) * scale
        _spread_gaussian(fine, fy, fx, _SPREAD_SIGMA_FINE_PX, _SPREAD_HALF_WIDTH)
        spec = sfft.rfft2(fine.astype(np.float32), workers=fft_workers())
        return spec[self.rows, : self.cols]


def _validate_grid(shape: tuple[int, int], pixel_nm: float) -> tuple[int, int]:
    try:
        ny, nx = (int(v) for v in shape)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"shape must be two integers (ny, nx); got {shape!r}") from exc
    if ny < 4 or nx < 4 or (ny, nx) != tuple(shape):
        raise ValueError(f"shape must be two integers ≥ 4; got {shape!r}")
    if not (isinstance(pixel_nm, int | float) and math.isfinite(pixel_nm) and pixel_nm > 0):
        raise ValueError(f"pixel_nm must be a positive finite number; got {pixel_nm!r}")
    return ny, nx


def _centred_grid(specimen: Specimen, shape: tuple[int, int], pixel_A: float) -> _Grid:
    """The grid of ``shape`` pixels centred on the specimen field."""
    ly, lx = specimen.extent_A
    return _Grid(shape, pixel_A, ((ly - shape[0] * pixel_A) / 2.0, (lx - shape[1] * pixel_A) / 2.0))


def _is_exact_period(specimen: Specimen, grid: _Grid) -> bool:
    """True if the grid covers exactly one period of a periodic specimen (then FFTs wrap)."""
    if not specimen.periodic:
        return False
    fy, fx = grid.field_A
    ly, lx = specimen.extent_A
    return abs(fy - ly) <= 1e-6 * ly and abs(fx - lx) <= 1e-6 * lx


def _atoms_on_grid(specimen: Specimen, grid: _Grid, pad_A: float) -> tuple[np.ndarray, ...]:
    """Positions, numbers and ⟨u²⟩ of all atoms (periodic images included) near the grid."""
    pos, num = specimen.positions_A, specimen.numbers
    u2 = (
        specimen.debye_waller_A2
        if specimen.debye_waller_A2 is not None
        else np.zeros(len(num), dtype=np.float64)
    )
    y0, x0 = grid.origin_A[0] - pad_A, grid.origin_A[1] - pad_A
    y1, x1 = y0 + grid.field_A[0] + 2 * pad_A, x0 + grid.field_A[1] + 2 * pad_A
    if specimen.periodic:
        ly, lx = specimen.extent_A
        iy = range(math.floor(y0 / ly) - 1, math.ceil(y1 / ly) + 1)
        ix = range(math.floor(x0 / lx) - 1, math.ceil(x1 / lx) + 1)
        shifts = np.array([(a * ly, b * lx, 0.0) for a in iy for b in ix])
        pos = (pos[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
        num = np.tile(num, len(shifts))
        u2 = np.tile(u2, len(shifts))
    keep = (pos[:, 0] >= y0) & (pos[:, 0] < y1) & (pos[:, 1] >= x0) & (pos[:, 1] < x1)
    return pos[keep], num[keep], u2[keep]


class _SlicePotential:
    """Projected potentials of z-slices of one specimen on one grid (V·Å, float32)."""

    def __init__(self, specimen: Specimen, grid: _Grid) -> None:
        self.out_grid = grid
        if _is_exact_period(specimen, grid):
            self.pad_px = 0
            pos, num, u2 = specimen.positions_A, specimen.numbers, specimen.debye_waller_A2
            if u2 is None:
                u2 = np.zeros(len(num))
        else:
            self.pad_px = math.ceil(_PAD_A / grid.pixel_A)
            pos, num, u2 = _atoms_on_grid(specimen, grid, _PAD_A)
        self.grid = grid.padded(self.pad_px)
        self.kernels = _Kernels(self.grid)
        self.pos, self.num, self.u2 = pos, num, np.round(u2, 8)

    def spectrum(self, select: np.ndarray | None = None) -> np.ndarray | None:
        """rfft2 of the projected potential of the selected atoms; None if there are none."""
        pos, num, u2 = self.pos, self.num, self.u2
        if select is not None:
            pos, num, u2 = pos[select], num[select], u2[select]
        if len(num) == 0:
            return None
        total = None
        for z, w in sorted({(int(a), float(b)) for a, b in zip(num, u2, strict=True)}):
            idx = (num == z) & (u2 == w)
            term = self.kernels(z, w) * self.kernels.structure_factor(pos[idx, :2])
            total = term if total is None else total + term
        return total

    def real(self, spec: np.ndarray | None) -> np.ndarray:
        """The potential of a spectrum on the output grid (padding cropped), float32."""
        if spec is None:
            return np.zeros(self.out_grid.shape, dtype=np.float32)
        v = sfft.irfft2(spec, s=self.grid.shape, workers=fft_workers())
        p = self.pad_px
        if p:
            v = v[p : p + self.out_grid.shape[0], p : p + self.out_grid.shape[1]]
        return np.ascontiguousarray(v, dtype=np.float32)


def _grid_for(
    specimen: Specimen,
    shape: tuple[int, int],
    pixel_nm: float,
    origin_A: tuple[float, float] | None,
) -> _Grid:
    if not isinstance(specimen, Specimen):
        raise TypeError(f"specimen must be a Specimen; got {type(specimen).__name__}")
    ny, nx = _validate_grid(shape, pixel_nm)
    pixel_A = float(pixel_nm) * 10.0
    if origin_A is None:
        return _centred_grid(specimen, (ny, nx), pixel_A)
    return _Grid((ny, nx), pixel_A, (float(origin_A[0]), float(origin_A[1])))


def projected_potential(
    specimen: Specimen,
    shape: tuple[int, int],
    pixel_nm: float,
    *,
    z_range_A: tuple[float, float] | None = None,
    origin_A: tuple[float, float] | None = None,
) -> np.ndarray:
    """Projected potential v(y, x) = ∫ V dz in V·Å on an (ny, nx) grid, float32.

    The grid has square pixels of ``pixel_nm``; by default it is centred on the specimen field
    (``origin_A`` gives the (y, x) position in Å of pixel (0, 0) instead). Periodic specimens
    whose extent equals the grid field wrap exactly; otherwise the potential is computed with a
    margin and cropped (periodic specimens tiled, non-periodic ones absent outside their atoms).
    ``z_range_A = (z0, z1)`` restricts to atoms with z0 ≤ z < z1.
    """
    grid = _grid_for(specimen, shape, pixel_nm, origin_A)
    sp = _SlicePotential(specimen, grid)
    select = None
    if z_range_A is not None:
        z0, z1 = (float(v) for v in z_range_A)
        if not z1 > z0:
            raise ValueError(f"z_range_A must be (z0, z1) with z1 > z0; got {z_range_A!r}")
        select = (sp.pos[:, 2] >= z0) & (sp.pos[:, 2] < z1)
    return sp.real(sp.spectrum(select))


def _bandlimit_mask(shape: tuple[int, int], pixel_A: float) -> np.ndarray:
    """1 inside 2/3 of the smaller Nyquist frequency (full-FFT layout), else 0 (float32)."""
    fg = FrequencyGrid(shape, (pixel_A / 10.0,) * 2)
    k_max = (2.0 / 3.0) * fg.nyquist_per_A
    return (fg.k2 <= k_max * k_max).astype(np.float32)


def _slice_edges(thickness_A: float, slice_A: float) -> np.ndarray:
    if not (math.isfinite(slice_A) and slice_A > 0):
        raise ValueError(f"slice_A must be positive; got {slice_A!r}")
    n = max(1, math.ceil(thickness_A / slice_A - 1e-9))
    return np.linspace(0.0, thickness_A, n + 1)


def _multislice(
    sp: _SlicePotential, thickness_A: float, slice_A: float, voltage_kv: float
) -> np.ndarray:
    grid = sp.grid
    sigma = np.float32(interaction_constant_per_V_A(voltage_kv))
    mask = _bandlimit_mask(grid.shape, grid.pixel_A)
    propagator = _Propagator(grid, electron_wavelength_A(voltage_kv), mask)
    edges = _slice_edges(max(thickness_A, 1e-6), slice_A)
    z = np.clip(sp.pos[:, 2], edges[0], edges[-1] - 1e-9)
    which = np.searchsorted(edges, z, side="right") - 1
    psi = np.ones(grid.shape, dtype=np.complex64)
    w = fft_workers()
    pending_dz = 0.0
    for i in range(len(edges) - 1):
        dz = float(edges[i + 1] - edges[i])
        spec = sp.spectrum(which == i)
        if spec is None:
            pending_dz += dz
            continue
        if pending_dz > 0:
            psi = propagator(psi, pending_dz)
        phase = sfft.irfft2(spec, s=grid.shape, workers=w).astype(np.float32)
        phase *= sigma
        t = np.empty(grid.shape, dtype=np.complex64)
        np.cos(phase, out=t.real)
        np.sin(phase, out=t.imag)
        t = sfft.fft2(t, workers=w, overwrite_x=True)
        t *= mask
        t = sfft.ifft2(t, workers=w, overwrite_x=True)
        t *= psi
        psi = propagator(t, dz)
        pending_dz = 0.0
    if pending_dz > 0:
        psi = propagator(psi, pending_dz)
    return psi.astype(np.complex64, copy=False)


class _Propagator:
    """Fresnel propagation over dz (Å): P(k) = exp(−iπλ dz k²) × band limit, cached per dz."""

    def __init__(self, grid: _Grid, wavelength_A: float, mask: np.ndarray) -> None:
        self.k2 = FrequencyGrid(grid.shape, (grid.pixel_A / 10.0,) * 2).k2
        self.lam = wavelength_A
        self.mask = mask
        self._cache: dict[float, np.ndarray] = {}

    def kernel(self, dz: float) -> np.ndarray:
        key = round(dz, 9)
        if key not in self._cache:
            arg = (-math.pi * self.lam * dz) * self.k2.astype(np.float64)
            self._cache[key] = ((np.cos(arg) + 1j * np.sin(arg)) * self.mask).astype(np.complex64)
        return self._cache[key]

    def __call__(self, psi: np.ndarray, dz: float) -> np.ndarray:
        w = fft_workers()
        spec = sfft.fft2(psi, workers=w)
        spec *= self.kernel(dz)
        return sfft.ifft2(spec, workers=w, overwrite_x=True).astype(np.complex64, copy=False)


def exit_wave(
    specimen: Specimen,
    shape: tuple[int, int],
    pixel_nm: float,
    voltage_kv: float,
    *,
    method: str = "multislice",
    slice_A: float = 2.0,
    origin_A: tuple[float, float] | None = None,
) -> np.ndarray:
    """Exit wave ψ(y, x) (complex64, vacuum = 1) of a plane wave through the specimen.

    ``method="multislice"``: slices of ``slice_A`` Å (atoms assigned by z to slices spanning
    0…thickness_A), band-limited to 2/3 Nyquist. ``method="phase_object"``: the phase-object
    approximation ψ = exp(iσ v) with the full projected potential (no propagation inside the
    specimen). Grid placement as in :func:`projected_potential`.
    """
    if method not in ("multislice", "phase_object"):
        raise ValueError(f"method must be 'multislice' or 'phase_object'; got {method!r}")
    if not (isinstance(voltage_kv, int | float) and voltage_kv > 0):
        raise ValueError(f"voltage_kv must be positive; got {voltage_kv!r}")
    grid = _grid_for(specimen, shape, pixel_nm, origin_A)
    sp = _SlicePotential(specimen, grid)
    if method == "phase_object":
        v = sp.real(sp.spectrum())
        sigma = interaction_constant_per_V_A(voltage_kv)
        return np.exp(1j * sigma * v.astype(np.float64)).astype(np.complex64)
    psi = _multislice(sp, specimen.thickness_A, slice_A, voltage_kv)
    p = sp.pad_px
    if p:
        psi = psi[p : p + grid.shape[0], p : p + grid.shape[1]]
    return np.ascontiguousarray(psi, dtype=np.complex64)
