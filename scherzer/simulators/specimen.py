"""Specimens: atoms, projected potentials and exit waves.

Conventions: lengths in Å inside this module; positions are (y, x, z) with z along the beam
(increasing downstream); the lateral field is ``extent_A = (ly, lx)``. Specimens are periodic
laterally when ``periodic`` is true (crystals tiled over the field); otherwise atoms outside the
field are simply absent. Potentials are in V, projected potentials in V·Å, spatial frequencies
k in 1/Å (no factor 2π), the interaction constant σ in 1/(V·Å) (from :mod:`scherzer.optics`).

Physics
-------
* Electron scattering factors f_e(k) (Å, first Born approximation, non-relativistic) use the
  parametrisation of E. J. Kirkland, *Advanced Computing in Electron Microscopy*, 2nd ed.
  (Springer 2010), Appendix C: ``f_e(k) = Σ_{i=1..3} a_i/(k² + b_i) + Σ_{i=1..3} c_i exp(−d_i k²)``
  with k in 1/Å. The table below (:data:`KIRKLAND_PARAMS`) holds H–Zn plus Sr, Nb, Ba, W, Pt, Au,
  transcribed from two independent public copies of Kirkland's ``fparams`` data (his C source and
  a Python dictionary conversion) and checked number-by-number against each other.
* The projected potential of one atom has the 2-D Fourier transform v̂(k) = (h²/(2π m₀ e)) f_e(k)
  = 2π a₀ e · f_e(k) ≈ 47.878 V·Å² · f_e(k); so ∫ v d²r = 47.878 · f_e(0) V·Å³.
* Thermal smearing: ``debye_waller_A2`` is the mean-square displacement ⟨u²⟩ along one axis
  (B = 8π²⟨u²⟩); each atom's kernel is multiplied by exp(−2π²⟨u²⟩k²) (static average).
* Atom placement is exact to sub-pixel precision: per slice and element the structure factor
  Σ exp(−2πi k·r_atom) is computed by Gaussian gridding on a 2× oversampled grid followed by
  deconvolution (a type-1 non-uniform FFT, relative error ≲ 1e-5), then multiplied by the
  element's kernel. The potential on the pixel grid is the band-limited Fourier series with a
  raised-cosine roll-off from 3/4 to 1 of the Nyquist frequency per axis (no Gibbs ringing; the
  multislice band, k < 2/3 Nyquist, is untouched).
* Exit waves: ``method="multislice"`` (default) — slices of ``slice_A``, transmission
  t = exp(iσ v_slice) band-limited to 2/3 of Nyquist, Fresnel propagator
  P(k) = exp(−iπλΔz k²) within the same 2/3 band (Kirkland 2010, ch. 6);
  ``method="phase_object"`` — the phase-object approximation ψ = exp(iσ v_total), no propagation
  inside the specimen (valid only for thin, weakly scattering specimens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numba
import numpy as np
import scipy.fft as sfft

from scherzer.optics import (
    FrequencyGrid,
    electron_wavelength_A,
    fft_workers,
    interaction_constant_per_V_A,
)

__all__ = [
    "BUILTIN_SPECIMENS",
    "KIRKLAND_PARAMS",
    "Specimen",
    "amorphous_film",
    "exit_wave",
    "make_specimen",
    "projected_potential",
    "projected_potential_integral_VA3",
    "scattering_factor_A",
]

#: Bohr radius (Å) and e/(4πε₀) in V·Å: the constants of Kirkland's potential formulae.
BOHR_RADIUS_A = 0.529177210903
E_4PIEPS0_V_A = 14.3996454784
#: v̂(k) = POTENTIAL_PREFACTOR_V_A2 · f_e(k):  2π a₀ e = h²/(2π m₀ e) ≈ 47.878 V·Å².
POTENTIAL_PREFACTOR_V_A2 = 2.0 * math.pi * BOHR_RADIUS_A * E_4PIEPS0_V_A
AVOGADRO_PER_MOL = 6.02214076e23
CARBON_MOLAR_MASS_G = 12.011


@dataclass
class Specimen:
    """An atomic model over a lateral field.

    ``positions_A``: (N, 3) float64 as (y, x, z) in Å. ``numbers``: (N,) atomic numbers.
    ``extent_A``: (ly, lx) of the field in Å. ``thickness_A``: extent along z.
    ``debye_waller_A2``: optional (N,) mean-square displacements ⟨u²⟩ in Å² (thermal smearing).
    """

    name: str
    positions_A: np.ndarray
    numbers: np.ndarray
    extent_A: tuple[float, float]
    thickness_A: float
    periodic: bool = False
    debye_waller_A2: np.ndarray | None = None
    description: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.positions_A = np.asarray(self.positions_A, dtype=np.float64).reshape(-1, 3)
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        if len(self.numbers) != len(self.positions_A):
            raise ValueError(
                f"{len(self.numbers)} atomic numbers for {len(self.positions_A)} positions"
            )
        if np.any(self.numbers < 1) or np.any(self.numbers > 103):
            raise ValueError("atomic numbers must be 1..103")
        if self.debye_waller_A2 is not None:
            self.debye_waller_A2 = np.asarray(self.debye_waller_A2, dtype=np.float64).reshape(-1)


# --------------------------------------------------------------------------------------------
# Scattering factors (Kirkland 2010): Z -> (a1 b1 a2 b2 a3 b3 c1 d1 c2 d2 c3 d3)
# --------------------------------------------------------------------------------------------

# fmt: off
KIRKLAND_PARAMS: dict[int, tuple[float, ...]] = {
    1: (  # H
        4.20298324e-03, 2.25350888e-01, 6.27762505e-02, 2.25366950e-01,
        3.00907347e-02, 2.25331756e-01, 6.77756695e-02, 4.38854001e+00,
        3.56609237e-03, 4.03884823e-01, 2.76135815e-02, 1.44490166e+00,
    ),
    2: (  # He
        1.87543704e-05, 2.12427997e-01, 4.10595800e-04, 3.32212279e-01,
        1.96300059e-01, 5.17325152e-01, 8.36015738e-03, 3.66668239e-01,
        2.95102022e-02, 1.37171827e+00, 4.65928982e-07, 3.75768025e+04,
    ),
    3: (  # Li
        7.45843816e-02, 8.81151424e-01, 7.15382250e-02, 4.59142904e-02,
        1.45315229e-01, 8.81301714e-01, 1.12125769e+00, 1.88483665e+01,
        2.51736525e-03, 1.59189995e-01, 3.58434971e-01, 6.12371000e+00,
    ),
    4: (  # Be
        6.11642897e-02, 9.90182132e-02, 1.25755034e-01, 9.90272412e-02,
        2.00831548e-01, 1.87392509e+00, 7.87242876e-01, 9.32794929e+00,
        1.58847850e-03, 8.91900236e-02, 2.73962031e-01, 3.20687658e+00,
    ),
    5: (  # B
        1.25716066e-01, 1.48258830e-01, 1.73314452e-01, 1.48257216e-01,
        1.84774811e-01, 3.34227311e+00, 1.95250221e-01, 1.97339463e+00,
        5.29642075e-01, 5.70035553e+00, 1.08230500e-03, 5.64857237e-02,
    ),
    6: (  # C
        2.12080767e-01, 2.08605417e-01, 1.99811865e-01, 2.08610186e-01,
        1.68254385e-01, 5.57870773e+00, 1.42048360e-01, 1.33311887e+00,
        3.63830672e-01, 3.80800263e+00, 8.35012044e-04, 4.03982620e-02,
    ),
    7: (  # N
        5.33015554e-01, 2.90952515e-01, 5.29008883e-02, 1.03547896e+01,
        9.24159648e-02, 1.03540028e+01, 2.61799101e-01, 2.76252723e+00,
        8.80262108e-04, 3.47681236e-02, 1.10166555e-01, 9.93421736e-01,
    ),
    8: (  # O
        3.39969204e-01, 3.81570280e-01, 3.07570172e-01, 3.81571436e-01,
        1.30369072e-01, 1.91919745e+01, 8.83326058e-02, 7.60635525e-01,
        1.96586700e-01, 2.07401094e+00, 9.96220028e-04, 3.03266869e-02,
    ),
    9: (  # F
        2.30560593e-01, 4.80754213e-01, 5.26889648e-01, 4.80763895e-01,
        1.24346755e-01, 3.95306720e+01, 1.24616894e-03, 2.62181803e-02,
        7.20452555e-02, 5.92495593e-01, 1.53075777e-01, 1.59127671e+00,
    ),
    10: (  # Ne
        4.08371771e-01, 5.88228627e-01, 4.54418858e-01, 5.88288655e-01,
        1.44564923e-01, 1.21246013e+02, 5.91531395e-02, 4.63963540e-01,
        1.24003718e-01, 1.23413025e+00, 1.64986037e-03, 2.05869217e-02,
    ),
    11: (  # Na
        1.36471662e-01, 4.99965301e-02, 7.70677865e-01, 8.81899664e-01,
        1.56862014e-01, 1.61768579e+01, 9.96821513e-01, 2.00132610e+01,
        3.80304670e-02, 2.60516254e-01, 1.27685089e-01, 6.99559329e-01,
    ),
    12: (  # Mg
        3.04384121e-01, 8.42014377e-02, 7.56270563e-01, 1.64065598e+00,
        1.01164809e-01, 2.97142975e+01, 3.45203403e-02, 2.16596094e-01,
        9.71751327e-01, 1.21236852e+01, 1.20593012e-01, 5.60865838e-01,
    ),
    13: (  # Al
        7.77419424e-01, 2.71058227e+00, 5.78312036e-02, 7.17532098e+01,
        4.26386499e-01, 9.13331555e-02, 1.13407220e-01, 4.48867451e-01,
        7.90114035e-01, 8.66366718e+00, 3.23293496e-02, 1.78503463e-01,
    ),
    14: (  # Si
        1.06543892e+00, 1.04118455e+00, 1.20143691e-01, 6.87113368e+01,
        1.80915263e-01, 8.87533926e-02, 1.12065620e+00, 3.70062619e+00,
        3.05452816e-02, 2.14097897e-01, 1.59963502e+00, 9.99096638e+00,
    ),
    15: (  # P
        1.05284447e+00, 1.31962590e+00, 2.99440284e-01, 1.28460520e-01,
        1.17460748e-01, 1.02190163e+02, 9.60643452e-01, 2.87477555e+00,
        2.63555748e-02, 1.82076844e-01, 1.38059330e+00, 7.49165526e+00,
    ),
    16: (  # S
        1.01646916e+00, 1.69181965e+00, 4.41766748e-01, 1.74180288e-01,
        1.21503863e-01, 1.67011091e+02, 8.27966670e-01, 2.30342810e+00,
        2.33022533e-02, 1.56954150e-01, 1.18302846e+00, 5.85782891e+00,
    ),
    17: (  # Cl
        9.44221116e-01, 2.40052374e-01, 4.37322049e-01, 9.30510439e+00,
        2.54547926e-01, 9.30486346e+00, 5.47763323e-02, 1.68655688e-01,
        8.00087488e-01, 2.97849774e+00, 1.07488641e-02, 6.84240646e-02,
    ),
    18: (  # Ar
        1.06983288e+00, 2.87791022e-01, 4.24631786e-01, 1.24156957e+01,
        2.43897949e-01, 1.24158868e+01, 4.79446296e-02, 1.36979796e-01,
        7.64958952e-01, 2.43940729e+00, 8.23128431e-03, 5.27258749e-02,
    ),
    19: (  # K
        6.92717865e-01, 7.10849990e+00, 9.65161085e-01, 3.57532901e-01,
        1.48466588e-01, 3.93763275e-02, 2.64645027e-02, 1.03591321e-01,
        1.80883768e+00, 3.22845199e+01, 5.43900018e-01, 1.67791374e+00,
    ),
    20: (  # Ca
        3.66902871e-01, 6.14274129e-02, 8.66378999e-01, 5.70881727e-01,
        6.67203300e-01, 7.82965639e+00, 4.87743636e-01, 1.32531318e+00,
        1.82406314e+00, 2.10056032e+01, 2.20248453e-02, 9.11853450e-02,
    ),
    21: (  # Sc
        3.78871777e-01, 6.98910162e-02, 9.00022505e-01, 5.21061541e-01,
        7.15288914e-01, 7.87707920e+00, 1.88640973e-02, 8.17512708e-02,
        4.07945949e-01, 1.11141388e+00, 1.61786540e+00, 1.80840759e+01,
    ),
    22: (  # Ti
        3.62383267e-01, 7.54707114e-02, 9.84232966e-01, 4.97757309e-01,
        7.41715642e-01, 8.17659391e+00, 3.62555269e-01, 9.55524906e-01,
        1.49159390e+00, 1.62221677e+01, 1.61659509e-02, 7.33140839e-02,
    ),
    23: (  # V
        3.52961378e-01, 8.19204103e-02, 7.46791014e-01, 8.81189511e+00,
        1.08364068e+00, 5.10646075e-01, 1.39013610e+00, 1.48901841e+01,
        3.31273356e-01, 8.38543079e-01, 1.40422612e-02, 6.57432678e-02,
    ),
    24: (  # Cr
        1.34348379e+00, 1.25814353e+00, 5.07040328e-01, 1.15042811e+01,
        4.26358955e-01, 8.53660389e-02, 1.17241826e-02, 6.00177061e-02,
        5.11966516e-01, 1.53772451e+00, 3.38285828e-01, 6.62418319e-01,
    ),
    25: (  # Mn
        3.26697613e-01, 8.88813083e-02, 7.17297000e-01, 1.11300198e+01,
        1.33212464e+00, 5.82141104e-01, 2.80801702e-01, 6.71583145e-01,
        1.15499241e+00, 1.26825395e+01, 1.11984488e-02, 5.32334467e-02,
    ),
    26: (  # Fe
        3.13454847e-01, 8.99325756e-02, 6.89290016e-01, 1.30366038e+01,
        1.47141531e+00, 6.33345291e-01, 1.03298688e+00, 1.16783425e+01,
        2.58280285e-01, 6.09116446e-01, 1.03460690e-02, 4.81610627e-02,
    ),
    27: (  # Co
        3.15878278e-01, 9.46683246e-02, 1.60139005e+00, 6.99436449e-01,
        6.56394338e-01, 1.56954403e+01, 9.36746624e-01, 1.09392410e+01,
        9.77562646e-03, 4.37446816e-02, 2.38378578e-01, 5.56286483e-01,
    ),
    28: (  # Ni
        1.72254630e+00, 7.76606908e-01, 3.29543044e-01, 1.02262360e-01,
        6.23007200e-01, 1.94156207e+01, 9.43496513e-03, 3.98684596e-02,
        8.54063515e-01, 1.04078166e+01, 2.21073515e-01, 5.10869330e-01,
    ),
    29: (  # Cu
        3.58774531e-01, 1.06153463e-01, 1.76181348e+00, 1.01640995e+00,
        6.36905053e-01, 1.53659093e+01, 7.44930667e-03, 3.85345989e-02,
        1.89002347e-01, 3.98427790e-01, 2.29619589e-01, 9.01419843e-01,
    ),
    30: (  # Zn
        5.70893973e-01, 1.26534614e-01, 1.98908856e+00, 2.17781965e+00,
        3.06060585e-01, 3.78619003e+01, 2.35600223e-01, 3.67019041e-01,
        3.97061102e-01, 8.66419596e-01, 6.85657228e-03, 3.35778823e-02,
    ),
    38: (  # Sr
        1.37373086e-02, 1.87469061e-02, 1.97548672e+00, 6.36079230e+00,
        1.59261029e+00, 2.21992482e-01, 1.73263882e-01, 2.01624958e-01,
        4.66280378e+00, 2.53027803e+01, 1.61265063e-03, 1.53610568e-02,
    ),
    41: (  # Nb
        6.59532875e-01, 8.66145490e-02, 1.84545854e+00, 5.94774398e+00,
        1.25584405e+00, 6.40851475e-01, 1.22253422e-01, 1.66646050e-01,
        7.06638328e-01, 1.62853268e+00, 2.62381591e-03, 8.26257859e-03,
    ),
    56: (  # Ba
        3.19434243e+00, 9.27352241e+00, 1.98289586e+00, 2.28741632e-01,
        1.55121052e-01, 3.82000231e-02, 6.73222354e-02, 7.30961745e-02,
        4.48474211e+00, 2.95703565e+01, 5.42674414e-01, 4.08647015e-01,
    ),
    74: (  # W
        9.24906855e-01, 1.28663377e-01, 2.75554557e+00, 7.65826479e-01,
        3.30440060e+00, 1.34471170e+01, 3.29973862e-01, 1.98218895e-01,
        1.09916444e+00, 1.35087534e+01, 2.06498883e-02, 3.38918459e-02,
    ),
    78: (  # Pt
        9.84697940e-01, 1.60910839e-01, 2.73987079e+00, 7.18971667e-01,
        3.61696715e+00, 1.29281016e+01, 3.02885602e-01, 1.70134854e-01,
        2.78370726e-01, 1.49862703e+00, 1.52124129e-02, 2.83510822e-02,
    ),
    79: (  # Au
        9.61263398e-01, 1.70932277e-01, 3.69581030e+00, 1.29335319e+01,
        2.77567491e+00, 6.89997070e-01, 2.95414176e-01, 1.63525510e-01,
        3.11475743e-01, 1.39200901e+00, 1.43237267e-02, 2.71265337e-02,
    ),
}
# fmt: on


def _params(z: int) -> np.ndarray:
    try:
        return np.asarray(KIRKLAND_PARAMS[int(z)], dtype=np.float64)
    except KeyError:
        raise ValueError(
            f"no scattering-factor parameters for Z={z}; available: "
            f"{sorted(KIRKLAND_PARAMS)} (H–Zn, Sr, Nb, Ba, W, Pt, Au)"
        ) from None


def scattering_factor_A(z: int, k_per_A: np.ndarray | float) -> np.ndarray:
    """Electron scattering factor f_e(k) in Å (Kirkland 2010), k in 1/Å (k = 2 sin θ / λ)."""
    p = _params(z)
    k2 = np.asarray(k_per_A, dtype=np.float64) ** 2
    a, b, c, d = p[0:6:2], p[1:6:2], p[6::2], p[7::2]
    out = np.zeros_like(k2)
    for i in range(3):
        out += a[i] / (k2 + b[i]) + c[i] * np.exp(-d[i] * k2)
    return out


def projected_potential_integral_VA3(z: int) -> float:
    """∫ v_z(x, y) dx dy of one atom in V·Å³ (= 47.878 V·Å² · f_e(0))."""
    return POTENTIAL_PREFACTOR_V_A2 * float(scattering_factor_A(z, 0.0))


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


# --------------------------------------------------------------------------------------------
# Built-in specimens
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def _rsa_place(cand, box, dmin, n_target, out):  # pragma: no cover - numba
    """Random sequential addition: accept candidates ≥ dmin from all accepted atoms.

    Periodic in y and x (box[0], box[1]), open in z. Returns the number placed in ``out``.
    """
    ncell = np.empty(3, dtype=np.int64)
    for d in range(3):
        ncell[d] = max(1, int(box[d] / dmin))
    cap = 32
    cells = -np.ones((ncell[0], ncell[1], ncell[2], cap), dtype=np.int64)
    count = np.zeros((ncell[0], ncell[1], ncell[2]), dtype=np.int64)
    d2min = dmin * dmin
    placed = 0
    for c in range(cand.shape[0]):
        if placed >= n_target:
            break
        p = cand[c]
        ci = np.empty(3, dtype=np.int64)
        for d in range(3):
            ci[d] = min(ncell[d] - 1, int(p[d] / box[d] * ncell[d]))
        ok = True
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                for dzc in range(-1, 2):
                    cz = ci[2] + dzc
                    if cz < 0 or cz >= ncell[2]:
                        continue
                    cy = (ci[0] + dy) % ncell[0]
                    cx = (ci[1] + dx) % ncell[1]
                    for m in range(count[cy, cx, cz]):
                        q = out[cells[cy, cx, cz, m]]
                        ry = p[0] - q[0]
                        ry -= box[0] * np.round(ry / box[0])
                        rx = p[1] - q[1]
                        rx -= box[1] * np.round(rx / box[1])
                        rz = p[2] - q[2]
                        if ry * ry + rx * rx + rz * rz < d2min:
                            ok = False
                            break
                    if not ok:
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok and count[ci[0], ci[1], ci[2]] < cap:
            out[placed] = p
            cells[ci[0], ci[1], ci[2], count[ci[0], ci[1], ci[2]]] = placed
            count[ci[0], ci[1], ci[2]] += 1
            placed += 1
    return placed


def amorphous_film(
    extent_A: tuple[float, float],
    thickness_A: float,
    rng: np.random.Generator,
    *,
    z0_A: float = 0.0,
    density_g_cm3: float = 2.0,
    min_distance_A: float = 1.4,
) -> np.ndarray:
    """Positions (N, 3) (y, x, z in Å) of an amorphous carbon film, laterally periodic.

    N = ρ N_A / M · volume (ρ in g/cm³; 2.0 g/cm³ → 0.1003 atoms/Å³); atoms are placed by random
    sequential addition with a minimum separation ``min_distance_A`` (minimum-image in y, x).
    """
    if thickness_A <= 0 or density_g_cm3 <= 0:
        raise ValueError("amorphous film thickness and density must be positive")
    ly, lx = extent_A
    n_per_A3 = density_g_cm3 / CARBON_MOLAR_MASS_G * AVOGADRO_PER_MOL * 1e-24
    n = round(n_per_A3 * ly * lx * thickness_A)
    box = np.array([ly, lx, thickness_A], dtype=np.float64)
    out = np.zeros((n, 3), dtype=np.float64)
    placed = 0
    for factor in (4, 8, 16):
        cand = rng.random((factor * n + 64, 3)) * box
        placed = int(_rsa_place(cand, box, float(min_distance_A), n, out))
        if placed >= n:
            break
    if placed < n:
        raise ValueError(
            f"could not place {n} atoms at {min_distance_A} Å separation; lower the density "
            "or min_distance_A"
        )
    out[:, 2] += z0_A
    return out


# Approximate room-temperature mean-square displacements ⟨u²⟩ (Å², one axis) per element.
_U2_A2 = {6: 0.0, 8: 0.0085, 14: 0.0059, 22: 0.0055, 38: 0.0075, 79: 0.0079}


def _u2(numbers: np.ndarray) -> np.ndarray:
    return np.array([_U2_A2.get(int(z), 0.006) for z in numbers], dtype=np.float64)


def _tile_cell(
    frac: np.ndarray,
    numbers: list[int],
    cell_A: tuple[float, float, float],
    box_A: tuple[float, float, float],
    origin_A: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Tile a rectangular unit cell (fractional (y, x, z) coordinates) over a box from origin."""
    by, bx, bz = box_A
    iy, ix, iz = (np.arange(math.ceil(b / c)) for b, c in zip(box_A, cell_A, strict=True))
    g = np.stack(np.meshgrid(iy, ix, iz, indexing="ij"), -1).reshape(-1, 1, 3)
    pos = ((g + frac[None]) * np.array(cell_A)).reshape(-1, 3)
    num = np.tile(np.asarray(numbers), len(g))
    keep = (pos[:, 0] < by - 1e-9) & (pos[:, 1] < bx - 1e-9) & (pos[:, 2] < bz - 1e-9)
    return pos[keep] + np.asarray(origin_A), num[keep]


def _srtio3_cell() -> tuple[np.ndarray, list[int], tuple[float, float, float]]:
    a = 3.905
    frac = np.array(
        [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], dtype=float
    )
    return frac, [38, 22, 8, 8, 8], (a, a, a)


def _si110_cell() -> tuple[np.ndarray, list[int], tuple[float, float, float]]:
    """Si (diamond, a = 5.431 Å) with y ∥ [001], x ∥ [1-10], z ∥ [110] (dumbbells along y)."""
    a = 5.431
    frac = np.array([[0, 0, 0], [0.25, 0, 0.5], [0.5, 0.5, 0.5], [0.75, 0.5, 0]], dtype=float)
    return frac, [14, 14, 14, 14], (a, a / math.sqrt(2), a / math.sqrt(2))


_CRYSTALS = {"srtio3_001": _srtio3_cell, "si_110": _si110_cell}


def _field_A(field_nm: tuple[float, float]) -> tuple[float, float]:
    try:
        fy, fx = (float(v) * 10.0 for v in field_nm)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"field_nm must be two numbers (y, x) in nm; got {field_nm!r}") from exc
    if not (fy > 0 and fx > 0 and math.isfinite(fy) and math.isfinite(fx)):
        raise ValueError(f"field_nm must be positive; got {field_nm!r}")
    return fy, fx


def _crystal(
    name: str, field_nm: tuple[float, float], seed: int, thickness_nm: float = 4.0
) -> Specimen:
    ext = _field_A(field_nm)
    frac, nums, cell = _CRYSTALS[name]()
    pos, num = _tile_cell(frac, nums, cell, (*ext, thickness_nm * 10.0))
    return Specimen(
        name=name,
        positions_A=pos,
        numbers=num,
        extent_A=ext,
        thickness_A=thickness_nm * 10.0,
        periodic=True,
        debye_waller_A2=_u2(num),
        description=f"{name} crystal, {thickness_nm} nm thick (seam at the field edge unless "
        "the field is a multiple of the cell)",
        metadata={"cell_A": cell, "seed": seed},
    )


def _srtio3_001(field_nm: tuple[float, float], seed: int = 0, thickness_nm: float = 4.0):
    """SrTiO3 (cubic perovskite, a = 3.905 Å) viewed along [001]."""
    return _crystal("srtio3_001", field_nm, seed, thickness_nm)


def _si_110(field_nm: tuple[float, float], seed: int = 0, thickness_nm: float = 4.0):
    """Si viewed along [110] (y ∥ [001], x ∥ [1-10])."""
    return _crystal("si_110", field_nm, seed, thickness_nm)


def _amorphous_carbon(
    field_nm: tuple[float, float],
    seed: int = 0,
    thickness_nm: float = 2.0,
    density_g_cm3: float = 2.0,
) -> Specimen:
    """A laterally periodic amorphous carbon film (weak-phase object when thin)."""
    ext = _field_A(field_nm)
    rng = np.random.default_rng(seed)
    pos = amorphous_film(ext, thickness_nm * 10.0, rng, density_g_cm3=density_g_cm3)
    return Specimen(
        name="amorphous_carbon",
        positions_A=pos,
        numbers=np.full(len(pos), 6),
        extent_A=ext,
        thickness_A=thickness_nm * 10.0,
        periodic=True,
        description=f"amorphous carbon film {thickness_nm} nm, {density_g_cm3} g/cm³",
        metadata={"seed": seed, "density_g_cm3": density_g_cm3},
    )


def _au_particle_on_carbon(
    field_nm: tuple[float, float],
    seed: int = 0,
    particle_diameter_nm: float = 3.0,
    film_thickness_nm: float = 3.0,
) -> Specimen:
    """A spherical Au fcc particle (a = 4.078 Å, [001] along the beam) on an a-C film.

    The particle sits on top of the film (its atoms downstream of the film), centred laterally.
    """
    ext = _field_A(field_nm)
    rng = np.random.default_rng(seed)
    t_film = film_thickness_nm * 10.0
    film = amorphous_film(ext, t_film, rng)
    a, r = 4.078, particle_diameter_nm * 5.0
    fcc = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], dtype=float)
    side = 2 * r + a
    au, _ = _tile_cell(fcc, [79] * 4, (a, a, a), (side, side, side))
    au -= au.mean(axis=0)
    au = au[np.sum(au**2, axis=1) <= r * r]
    au += np.array([ext[0] / 2, ext[1] / 2, t_film + r + 1.0])
    pos = np.concatenate([film, au])
    num = np.concatenate([np.full(len(film), 6), np.full(len(au), 79)])
    return Specimen(
        name="au_particle_on_carbon",
        positions_A=pos,
        numbers=num,
        extent_A=ext,
        thickness_A=t_film + 2 * r + 2.0,
        periodic=True,
        debye_waller_A2=_u2(num),
        description=f"Au particle ⌀{particle_diameter_nm} nm on {film_thickness_nm} nm a-C",
        metadata={"seed": seed, "n_au": len(au)},
    )


def _crystal_edge(
    field_nm: tuple[float, float],
    seed: int = 0,
    crystal: str = "srtio3_001",
    crystal_thickness_nm: float = 3.0,
    film_thickness_nm: float = 2.0,
) -> Specimen:
    """A crystal over the left half of the field (edge ∥ y) under an a-C film over everything.

    The crystal is upstream (z from 0), the film downstream of it.
    """
    if crystal not in _CRYSTALS:
        raise ValueError(f"crystal must be one of {sorted(_CRYSTALS)}; got {crystal!r}")
    ext = _field_A(field_nm)
    rng = np.random.default_rng(seed)
    frac, nums, cell = _CRYSTALS[crystal]()
    t_c = crystal_thickness_nm * 10.0
    xtal, xnum = _tile_cell(frac, nums, cell, (ext[0], ext[1] / 2.0, t_c))
    film = amorphous_film(ext, film_thickness_nm * 10.0, rng, z0_A=t_c)
    pos = np.concatenate([xtal, film])
    num = np.concatenate([xnum, np.full(len(film), 6)])
    return Specimen(
        name="crystal_edge",
        positions_A=pos,
        numbers=num,
        extent_A=ext,
        thickness_A=t_c + film_thickness_nm * 10.0,
        periodic=True,
        debye_waller_A2=_u2(num),
        description=f"{crystal} edge ({crystal_thickness_nm} nm) under {film_thickness_nm} nm a-C",
        metadata={"seed": seed, "crystal": crystal, "edge_x_A": ext[1] / 2.0},
    )


BUILTIN_SPECIMENS: dict[str, Callable[..., Specimen]] = {
    "srtio3_001": _srtio3_001,
    "si_110": _si_110,
    "au_particle_on_carbon": _au_particle_on_carbon,
    "crystal_edge": _crystal_edge,
    "amorphous_carbon": _amorphous_carbon,
}


def make_specimen(name: str, field_nm: tuple[float, float], seed: int = 0, **kw) -> Specimen:
    """Build a built-in specimen over ``field_nm`` (y, x) in nm; ``kw`` are its thickness etc.

    Names: see :data:`BUILTIN_SPECIMENS`. All built-ins are laterally periodic over the field.
    """
    try:
        builder = BUILTIN_SPECIMENS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown specimen {name!r}; built-in specimens are {sorted(BUILTIN_SPECIMENS)}"
        ) from None
    try:
        return builder(field_nm, seed, **kw)
    except TypeError as exc:
        raise ValueError(f"bad parameters for specimen {name!r}: {exc}") from exc
