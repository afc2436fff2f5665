"""The one physics model of the electron optics: simulators (forward) and processing (inverse).

Conventions (read these before using anything here)
---------------------------------------------------
* Units inside this module: lengths in ångström (Å), spatial frequencies in 1/Å, angles in
  radians. The public `Optics` model carries boundary units in its field names (``defocus_nm``,
  ``cs_mm``, ``a1_deg`` ...); its properties convert them.
* Aberration function (Haider/Krivanek-style coefficients, θ = λk, azimuth φ)::

      χ = (2π/λ) [ ½θ²(C1 + A1 cos 2(φ−φA1)) + θ³ B2 cos(φ−φB2) + ⅓θ³ A2 cos 3(φ−φA2)
                   + ¼θ⁴ C3 + θ⁴ S3 cos 2(φ−φS3) + ¼θ⁴ A3 cos 4(φ−φA3) + ⅙θ⁶ C5 ]

  so that χ = π λ C1 k² + (π/2) C3 λ³ k⁴ + … . C1 < 0 is **underfocus** (Scherzer defocus < 0).
* Image wave: ψ_img(k) = ψ_exit(k) · exp(−iχ(k)) · aperture(k) · envelopes. For a weak phase object
  ψ = 1 + iσV the image spectrum is I(k) = 2σV(k) sin χ(k) E(k): atoms are dark at Scherzer defocus.
* Array coordinates: arrays are (…, y, x) with y the row index (increasing downwards) and x the
  column index. Frequencies follow ``numpy.fft.fftfreq`` order. The azimuth is φ = atan2(k_y, k_x):
  measured from the +x (column) axis towards +y (row) axis, i.e. clockwise as an image is shown
  on screen with row 0 at the top. Every aberration angle (``a1_deg`` …) uses this azimuth.
* Partial coherence (quasi-coherent envelopes, applied to the wave):
  - temporal: E_t = exp(−½ (π λ σ_f)² k⁴) where ``focal_spread_nm`` is the **standard deviation**
    σ_f of the Gaussian defocus distribution (the 1/e half-width is √2 σ_f);
  - spatial: E_s = exp(−(α/(2λ))² |∇_k χ|²) where ``beam_divergence_mrad`` is the **1/e
    semi-angle** α of the Gaussian illumination cone; for C1 and C3 alone this is
    exp(−(π α/λ)² (C1 λ k + C3 λ³ k³)²);
  - vibration: E_v = exp(−2π² σ_v² k²) for an isotropic Gaussian image vibration with standard
    deviation σ_v (``vibration_nm``) per axis.
* Precision: grids are float32 and transfer functions complex64 unless a caller asks otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scherzer.workers import fft_workers  # re-exported: the engines import it from here

# CODATA 2018 constants (SI)
PLANCK_J_S = 6.62607015e-34
ELECTRON_MASS_KG = 9.1093837015e-31
ELEMENTARY_CHARGE_C = 1.602176634e-19
SPEED_OF_LIGHT_M_S = 299792458.0

__all__ = [
    "AberrationTerm",
    "FrequencyGrid",
    "Optics",
    "aperture",
    "chi",
    "chi_gradient_sq",
    "ctf",
    "electron_wavelength_A",
    "fft_workers",
    "focal_spread_nodes",
    "image_intensity",
    "interaction_constant_per_V_A",
    "scherzer_defocus_nm",
    "spatial_envelope",
    "spatial_envelope_of_gradient",
    "temporal_envelope",
    "vibration_envelope",
    "wave_transfer",
]


def electron_wavelength_A(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å: λ = h / √(2 m₀ e U (1 + e U / (2 m₀ c²)))."""
    if not voltage_kv > 0:
        raise ValueError(f"voltage_kv must be positive, got {voltage_kv!r}")
    u = voltage_kv * 1e3
    e, m, c = ELEMENTARY_CHARGE_C, ELECTRON_MASS_KG, SPEED_OF_LIGHT_M_S
    lam_m = PLANCK_J_S / math.sqrt(2.0 * m * e * u * (1.0 + e * u / (2.0 * m * c * c)))
    return lam_m * 1e10


def interaction_constant_per_V_A(voltage_kv: float) -> float:
    """Interaction constant σ in 1/(V·Å): phase shift φ = σ V_projected (V·Å).

    σ = 2π m e λ / h² with the relativistic mass m = γ m₀ (Kirkland, Advanced Computing in EM).
    At 300 kV σ ≈ 6.526e-4 /(V·Å).
    """
    u = voltage_kv * 1e3
    e, m0, c = ELEMENTARY_CHARGE_C, ELECTRON_MASS_KG, SPEED_OF_LIGHT_M_S
    gamma = 1.0 + e * u / (m0 * c * c)
    lam_m = electron_wavelength_A(voltage_kv) * 1e-10
    sigma_per_V_m = 2.0 * math.pi * gamma * m0 * e * lam_m / PLANCK_J_S**2
    return sigma_per_V_m * 1e-10


def scherzer_defocus_nm(voltage_kv: float, cs_mm: float, extended: bool = True) -> float:
    """Scherzer defocus in nm (negative = underfocus).

    ``extended=True`` gives −(4/3 Cs λ)^½ (the widest band without a zero), ``False`` gives
    −(Cs λ)^½ (Scherzer's original).
    """
    lam = electron_wavelength_A(voltage_kv)
    cs_A = cs_mm * 1e7
    factor = 4.0 / 3.0 if extended else 1.0
    return -math.sqrt(factor * cs_A * lam) / 10.0


@dataclass(frozen=True)
class AberrationTerm:
    """One term p · C · θⁿ · cos(m(φ − φ₀)) of χ·λ/(2π); coefficient in Å, angle in radians."""

    coefficient_A: float
    power: int
    symmetry: int
    angle_rad: float
    prefactor: float


class Optics(BaseModel):
    """Instrument optics at the boundary: units in the field names (see module docstring).

    ``defocus_nm`` is C1 (negative = underfocus); ``cs_mm`` is C3. Two-fold astigmatism A1 is a
    magnitude in nm and an azimuth in degrees (array convention in the module docstring).
    ``objective_aperture_mrad`` = 0 means no aperture.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    voltage_kv: float = Field(300.0, gt=0, le=3000)
    defocus_nm: float = 0.0
    cs_mm: float = 0.0
    c5_mm: float = 0.0
    a1_nm: float = Field(0.0, ge=0)
    a1_deg: float = 0.0
    b2_nm: float = Field(0.0, ge=0)
    b2_deg: float = 0.0
    a2_nm: float = Field(0.0, ge=0)
    a2_deg: float = 0.0
    s3_um: float = Field(0.0, ge=0)
    s3_deg: float = 0.0
    a3_um: float = Field(0.0, ge=0)
    a3_deg: float = 0.0
    focal_spread_nm: float = Field(0.0, ge=0, description="standard deviation of defocus")
    beam_divergence_mrad: float = Field(0.0, ge=0, description="1/e semi-angle")
    vibration_nm: float = Field(0.0, ge=0, description="std. dev. per axis")
    objective_aperture_mrad: float = Field(0.0, ge=0, description="0 = no aperture")

    @cached_property
    def wavelength_A(self) -> float:
        return electron_wavelength_A(self.voltage_kv)

    @property
    def interaction_constant(self) -> float:
        """σ in 1/(V·Å)."""
        return interaction_constant_per_V_A(self.voltage_kv)

    def with_(self, **changes: float) -> Optics:
        """A copy with some fields changed (validated)."""
        return Optics(**{**self.model_dump(), **changes})

    def scherzer_defocus_nm(self, extended: bool = True) -> float:
        return scherzer_defocus_nm(self.voltage_kv, self.cs_mm, extended)

    def terms(self, include_defocus: bool = True) -> list[AberrationTerm]:
        """The non-zero aberration terms in Å and radians."""
        d = math.radians
        raw = [
            (self.defocus_nm * 10.0 if include_defocus else 0.0, 2, 0, 0.0, 0.5),
            (self.a1_nm * 10.0, 2, 2, d(self.a1_deg), 0.5),
            (self.b2_nm * 10.0, 3, 1, d(self.b2_deg), 1.0),
            (self.a2_nm * 10.0, 3, 3, d(self.a2_deg), 1.0 / 3.0),
            (self.cs_mm * 1e7, 4, 0, 0.0, 0.25),
            (self.s3_um * 1e4, 4, 2, d(self.s3_deg), 1.0),
            (self.a3_um * 1e4, 4, 4, d(self.a3_deg), 0.25),
            (self.c5_mm * 1e7, 6, 0, 0.0, 1.0 / 6.0),
        ]
        return [AberrationTerm(c, n, m, a, p) for c, n, m, a, p in raw if c != 0.0]

    def information_limit_nm(self) -> float:
        """Resolution (nm) where the temporal envelope falls to exp(−2) (a common definition)."""
        if self.focal_spread_nm == 0:
            return 0.0
        lam = self.wavelength_A
        sigma = self.focal_spread_nm * 10.0
        # ½ (π λ σ)² k⁴ = 2  →  k = (4/(πλσ)²)^(1/4)
        k = (4.0 / (math.pi * lam * sigma) ** 2) ** 0.25
        return 0.1 / k


@dataclass(frozen=True)
class FrequencyGrid:
    """Spatial frequencies (1/Å, float32) of an (ny, nx) image with pixel sizes in nm.

    ``ky`` has shape (ny, 1) and ``kx`` shape (1, nx) (or (1, nx//2+1) for ``rfft=True``) so that
    they broadcast; ``k2``, ``k`` and ``phi`` are full (ny, nx') arrays.
    """

    shape: tuple[int, int]
    pixel_nm: tuple[float, float]
    rfft: bool = False

    @cached_property
    def ky(self) -> np.ndarray:
        ny = self.shape[0]
        return (np.fft.fftfreq(ny, d=self.pixel_nm[0] * 10.0)).astype(np.float32)[:, None]

    @cached_property
    def kx(self) -> np.ndarray:
        nx = self.shape[1]
        f = np.fft.rfftfreq if self.rfft else np.fft.fftfreq
        return (f(nx, d=self.pixel_nm[1] * 10.0)).astype(np.float32)[None, :]

    @cached_property
    def k2(self) -> np.ndarray:
        return (self.ky**2 + self.kx**2).astype(np.float32)

    @cached_property
    def k(self) -> np.ndarray:
        return np.sqrt(self.k2)

    @cached_property
    def phi(self) -> np.ndarray:
        return np.arctan2(self.ky, self.kx).astype(np.float32)

    @property
    def nyquist_per_A(self) -> float:
        return 0.5 / (max(self.pixel_nm) * 10.0)


def _defocus_axis(defocus_nm: float | np.ndarray | None) -> np.ndarray | None:
    if defocus_nm is None:
        return None
    arr = np.asarray(defocus_nm, dtype=np.float64)
    if arr.ndim > 1:
        raise ValueError(f"defocus_nm must be a scalar or 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("defocus_nm contains non-finite values")
    return arr


@dataclass(frozen=True)
class _AberrationBase:
    """Defocus-free parts of χ and ∇χ on one grid (float32, read-only, cached).

    χ = ``chi0`` + π λ C1 k²; ∂χ/∂k = ``d_radial`` + 2π λ C1 k; (1/k)∂χ/∂φ = ``d_azimuthal``.
    """

    chi0: np.ndarray
    d_radial: np.ndarray
    d_azimuthal: np.ndarray


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    a.flags.writeable = False
    return a


@lru_cache(maxsize=16)
def _aberration_base(optics: Optics, grid: FrequencyGrid) -> _AberrationBase:
    """Sum the non-defocus terms once per (optics, grid): each term c·kⁿ·cos(m(φ−φ₀)) adds
    itself to χ, n c kⁿ⁻¹ cos(…) to ∂χ/∂k and −m c kⁿ⁻¹ sin(…) to (1/k)∂χ/∂φ."""
    lam = optics.wavelength_A
    k = grid.k.astype(np.float64)
    phi = grid.phi.astype(np.float64)
    chi0 = np.zeros_like(k)
    d_radial = np.zeros_like(k)
    d_azimuthal = np.zeros_like(k)
    for t in optics.terms(include_defocus=False):
        c = 2.0 * math.pi * t.prefactor * t.coefficient_A * lam ** (t.power - 1)
        kn1 = k ** (t.power - 1)
        ang = t.symmetry * (phi - t.angle_rad)
        cos_ang = np.cos(ang) if t.symmetry else 1.0
        chi0 += c * kn1 * k * cos_ang
        d_radial += t.power * c * kn1 * cos_ang
        if t.symmetry:
            d_azimuthal += -t.symmetry * c * kn1 * np.sin(ang)
    return _AberrationBase(_readonly(chi0), _readonly(d_radial), _readonly(d_azimuthal))


def _base_for(optics: Optics, grid: FrequencyGrid) -> _AberrationBase:
    return _aberration_base(_without_defocus(optics), grid)


@lru_cache(maxsize=64)
def _without_defocus(optics: Optics) -> Optics:
    return optics if optics.defocus_nm == 0 else optics.with_(defocus_nm=0.0)


def _c1_factor(optics: Optics, defocus_nm: float | np.ndarray | None) -> np.ndarray:
    """π λ C1 (1/Å·rad… per k²) for the optics' own defocus (None) or the given one(s)."""
    dfs = _defocus_axis(defocus_nm)
    d = np.float64(optics.defocus_nm) if dfs is None else dfs
    return (math.pi * optics.wavelength_A * d * 10.0).astype(np.float32)


def _series(base: np.ndarray, factor: np.ndarray, field: np.ndarray) -> np.ndarray:
    """base + factor·field, broadcast to (n, ny, nx) when factor is 1-D."""
    if factor.ndim == 0:
        return base + factor * field
    return base[None] + factor[:, None, None] * field[None]


def chi(
    optics: Optics, grid: FrequencyGrid, defocus_nm: float | np.ndarray | None = None
) -> np.ndarray:
    """Aberration function χ (radians, float32).

    With ``defocus_nm=None`` the optics' own defocus is used and the result is (ny, nx). With a
    scalar it replaces the optics' defocus; with a 1-D array of n defoci the result is (n, ny, nx)
    — the whole series in one vectorised evaluation. The defocus-free part is cached per
    (optics, grid), so a series costs one multiply-add per defocus.
    """
    base = _base_for(optics, grid)
    return _series(base.chi0, _c1_factor(optics, defocus_nm), grid.k2)


def chi_gradient_sq(
    optics: Optics, grid: FrequencyGrid, defocus_nm: float | np.ndarray | None = None
) -> np.ndarray:
    """|∇_k χ|² in (rad·Å)², float32, same shape rules as :func:`chi`.

    ∇χ = (∂χ/∂k, (1/k)∂χ/∂φ); defocus adds 2π λ C1 k to the radial derivative.
    """
    base = _base_for(optics, grid)
    radial = _series(base.d_radial, 2.0 * _c1_factor(optics, defocus_nm), grid.k)
    return (radial * radial + base.d_azimuthal * base.d_azimuthal).astype(np.float32)


def temporal_envelope(optics: Optics, grid: FrequencyGrid) -> np.ndarray:
    """E_t(k) = exp(−½ (π λ σ_f)² k⁴), σ_f = ``focal_spread_nm`` as a standard deviation."""
    lam = optics.wavelength_A
    s = optics.focal_spread_nm * 10.0
    return np.exp(-0.5 * (math.pi * lam * s) ** 2 * grid.k2**2).astype(np.float32)


def spatial_envelope(
    optics: Optics, grid: FrequencyGrid, defocus_nm: float | np.ndarray | None = None
) -> np.ndarray:
    """E_s(k) = exp(−(α/(2λ))² |∇χ|²), α = ``beam_divergence_mrad`` as the 1/e semi-angle."""
    alpha = optics.beam_divergence_mrad * 1e-3
    if alpha == 0:
        series = defocus_nm is not None and np.ndim(defocus_nm) == 1
        shape = (len(np.atleast_1d(defocus_nm)), *grid.k2.shape) if series else grid.k2.shape
        return np.ones(shape, dtype=np.float32)
    return spatial_envelope_of_gradient(optics, chi_gradient_sq(optics, grid, defocus_nm))


def spatial_envelope_of_gradient(optics: Optics, g2: np.ndarray) -> np.ndarray:
    """:func:`spatial_envelope` from |∇χ|² ((rad·Å)², as :func:`chi_gradient_sq` returns)."""
    alpha = optics.beam_divergence_mrad * 1e-3
    if alpha == 0:
        return np.ones(np.shape(g2), dtype=np.float32)
    return np.exp(-((alpha / (2.0 * optics.wavelength_A)) ** 2) * g2).astype(np.float32)


def focal_spread_nodes(focal_spread_nm: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Defocus offsets (nm) and weights (summing to 1) of the ``n``-point Gauss–Hermite rule
    for the incoherent average over a Gaussian focal spread of standard deviation
    ``focal_spread_nm``: ∫ f(C1 + δ) N(δ; 0, σ²) dδ ≈ Σ_j w_j f(C1 + δ_j), exact for f a
    polynomial of degree < 2n."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return focal_spread_nm * x, w / w.sum()


def vibration_envelope(optics: Optics, grid: FrequencyGrid) -> np.ndarray:
    """E_v(k) = exp(−2π² σ_v² k²) for isotropic image vibration σ_v = ``vibration_nm``."""
    s = optics.vibration_nm * 10.0
    return np.exp(-2.0 * math.pi**2 * s**2 * grid.k2).astype(np.float32)


def aperture(optics: Optics, grid: FrequencyGrid, edge_px: float = 1.0) -> np.ndarray:
    """Objective aperture A(k) in [0, 1] (float32): 1 inside θ = λk < α_obj.

    The edge is softened over ``edge_px`` frequency pixels (a raised-cosine) to avoid ringing;
    ``edge_px=0`` gives a hard edge. No aperture (``objective_aperture_mrad=0``) gives ones.
    """
    if optics.objective_aperture_mrad == 0:
        return np.ones(grid.k2.shape, dtype=np.float32)
    k_cut = optics.objective_aperture_mrad * 1e-3 / optics.wavelength_A
    if edge_px <= 0:
        return (grid.k <= k_cut).astype(np.float32)
    dk = edge_px / (max(grid.shape) * max(grid.pixel_nm) * 10.0)
    t = np.clip((grid.k - (k_cut - dk / 2)) / dk, 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(math.pi * t))).astype(np.float32)


def coherence_envelope(
    optics: Optics, grid: FrequencyGrid, defocus_nm: float | np.ndarray | None = None
) -> np.ndarray:
    """Aperture × E_t × E_s × E_v (float32), shape as :func:`chi`."""
    return (
        aperture(optics, grid)
        * temporal_envelope(optics, grid)
        * vibration_envelope(optics, grid)
        * spatial_envelope(optics, grid, defocus_nm)
    ).astype(np.float32)


def wave_transfer(
    optics: Optics,
    grid: FrequencyGrid,
    defocus_nm: float | np.ndarray | None = None,
    envelopes: bool = True,
) -> np.ndarray:
    """Wave transfer function T(k) = A(k) E(k) exp(−iχ(k)) (complex64); shape as :func:`chi`.

    The envelopes are quasi-coherent (applied to the wave). The vibration envelope is not part
    of the wave transfer (vibration blurs the intensity); it is in :func:`ctf`.
    """
    x = chi(optics, grid, defocus_nm)
    amp = _static_amplitude(_without_defocus(optics), grid, envelopes)
    if envelopes and optics.beam_divergence_mrad > 0:
        amp = amp * spatial_envelope(optics, grid, defocus_nm)
    out = np.empty(x.shape, dtype=np.complex64)
    out.real = np.cos(x) * amp
    out.imag = np.sin(x) * -amp
    return out


@lru_cache(maxsize=16)
def _static_amplitude(optics: Optics, grid: FrequencyGrid, envelopes: bool) -> np.ndarray:
    """Aperture (× E_t with ``envelopes``): the defocus-independent amplitude, cached."""
    amp = aperture(optics, grid)
    if envelopes:
        amp = amp * temporal_envelope(optics, grid)
    return _readonly(amp)


def ctf(
    optics: Optics, grid: FrequencyGrid, defocus_nm: float | np.ndarray | None = None
) -> np.ndarray:
    """Phase-contrast transfer function sin χ · A · E_t · E_s · E_v (float32).

    The linear image of a weak phase object ψ = 1 + iσV has spectrum I(k) = 2σV(k) · ctf(k).
    """
    envelope = coherence_envelope(optics, grid, defocus_nm)
    return (np.sin(chi(optics, grid, defocus_nm)) * envelope).astype(np.float32)


def image_intensity(
    wave_fft: np.ndarray,
    optics: Optics,
    grid: FrequencyGrid,
    defocus_nm: float | np.ndarray | None = None,
    *,
    envelopes: bool = True,
) -> np.ndarray:
    """Coherent image intensity |F⁻¹[ψ(k) T(k)]|² with quasi-coherent envelopes (float32).

    ``wave_fft`` is the full 2-D FFT (``scipy.fft.fft2``, unnormalised forward) of the exit wave,
    shape (ny, nx) matching ``grid`` (which must not be an rfft grid). With a 1-D ``defocus_nm``
    the result is (n, ny, nx): the whole focal series in one batched transform. Vacuum (ψ = 1)
    gives intensity 1. Vibration, if set, blurs the intensity by E_v(k).
    """
    if grid.rfft:
        raise ValueError("image_intensity needs a full (non-rfft) FrequencyGrid")
    if wave_fft.shape != grid.shape:
        raise ValueError(f"wave_fft shape {wave_fft.shape} does not match grid {grid.shape}")
    import scipy.fft as sfft  # here, not at import: `import scherzer.stack` stays light

    t = wave_transfer(optics, grid, defocus_nm, envelopes)
    img = sfft.ifft2(wave_fft.astype(np.complex64) * t, workers=fft_workers(), overwrite_x=True)
    out = (img.real * img.real + img.imag * img.imag).astype(np.float32)
    if envelopes and optics.vibration_nm > 0:
        rgrid = FrequencyGrid(grid.shape, grid.pixel_nm, rfft=True)
        ev = vibration_envelope(optics, rgrid)
        spec = sfft.rfft2(out, workers=fft_workers()) * ev
        out = sfft.irfft2(spec, s=grid.shape, workers=fft_workers()).astype(np.float32)
    return out
