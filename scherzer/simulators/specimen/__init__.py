"""Specimens: atoms, projected potentials and exit waves (model, potential, catalogue modules).

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

from scherzer.simulators.specimen.catalogue import BUILTIN_SPECIMENS, amorphous_film, make_specimen
from scherzer.simulators.specimen.model import (
    BOHR_RADIUS_A,
    KIRKLAND_PARAMS,
    POTENTIAL_PREFACTOR_V_A2,
    Specimen,
    projected_potential_integral_VA3,
    scattering_factor_A,
)
from scherzer.simulators.specimen.potential import exit_wave, projected_potential

__all__ = [
    "BOHR_RADIUS_A",
    "BUILTIN_SPECIMENS",
    "KIRKLAND_PARAMS",
    "POTENTIAL_PREFACTOR_V_A2",
    "Specimen",
    "amorphous_film",
    "exit_wave",
    "make_specimen",
    "projected_potential",
    "projected_potential_integral_VA3",
    "scattering_factor_A",
]
