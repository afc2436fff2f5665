"""Specimen physics: scattering factors, projected potentials, exit waves, built-in specimens."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from scherzer.optics import FrequencyGrid, electron_wavelength_A, interaction_constant_per_V_A
from scherzer.simulators import specimen as S

PIXEL_NM = 0.02
PIXEL_A = PIXEL_NM * 10


def one_atom(z: int, pos_yx: tuple[float, float], periodic: bool = True, u2: float = 0.0):
    return S.Specimen(
        "one",
        [(pos_yx[0], pos_yx[1], 1.0)],
        [z],
        (64 * PIXEL_A, 64 * PIXEL_A),
        2.0,
        periodic=periodic,
        debye_waller_A2=[u2] if u2 else None,
    )


# ------------------------------------------------------------------ scattering factors


def test_required_elements_present():
    required = set(range(1, 31)) | {38, 41, 56, 74, 78, 79}
    assert required <= set(S.KIRKLAND_PARAMS)
    assert all(len(p) == 12 for p in S.KIRKLAND_PARAMS.values())


def test_hydrogen_fe0_is_bohr_radius():
    # hydrogenic 1s: f_e(0) = Z<r²>/(3 a0) = a0 exactly; Kirkland's fit reproduces it to 0.2 %
    assert S.scattering_factor_A(1, 0.0) == pytest.approx(S.BOHR_RADIUS_A, rel=2e-3)


@pytest.mark.parametrize("z", sorted(S.KIRKLAND_PARAMS))
def test_large_k_limit_is_mott_bethe(z):
    # Mott–Bethe: f_e(k) → Z / (2π² a0 k²) as k → ∞ (f_x → 0). The Lorentzian terms carry it,
    # so Σ a_i must be Z/(2π² a0) within a few % — catches typos in a_i.
    a_sum = sum(S.KIRKLAND_PARAMS[z][0:6:2])
    assert a_sum == pytest.approx(z / (2 * math.pi**2 * S.BOHR_RADIUS_A), rel=0.06)
    k = 200.0  # k² ≫ every b_i (≤ 167 /Å²), Gaussian terms gone
    assert S.scattering_factor_A(z, k) * k * k == pytest.approx(a_sum, rel=0.01)


@pytest.mark.parametrize("z", sorted(S.KIRKLAND_PARAMS))
def test_scattering_factor_positive_and_decreasing(z):
    k = np.linspace(0, 6, 400)
    f = S.scattering_factor_A(z, k)
    assert np.all(f > 0)
    assert np.all(np.diff(f) < 0)


def test_known_fe0_values():
    # f_e(0) of the Kirkland fit (Å): C 2.511, O 1.990, Si 5.814, Au 10.553 (computed from the
    # published parameters; cross-checked against a second public copy of the table)
    for z, ref in [(6, 2.5114), (8, 1.9897), (14, 5.8143), (38, 13.0552), (79, 10.5534)]:
        assert S.scattering_factor_A(z, 0.0) == pytest.approx(ref, abs=2e-4)


def test_unknown_element_error():
    with pytest.raises(ValueError, match="Z=92"):
        S.scattering_factor_A(92, 0.0)


# ------------------------------------------------------------------ projected potentials


@pytest.mark.parametrize("z", [6, 38, 79])
def test_projected_potential_integral_and_position(z):
    rng = np.random.default_rng(z)
    pos = tuple(20.0 * PIXEL_A + rng.random(2) * 24 * PIXEL_A)
    v = S.projected_potential(one_atom(z, pos), (64, 64), PIXEL_NM)
    assert v.dtype == np.float32 and v.shape == (64, 64)
    integral = float(v.sum(dtype=np.float64)) * PIXEL_A**2
    expected = S.POTENTIAL_PREFACTOR_V_A2 * S.scattering_factor_A(z, 0.0)
    assert integral == pytest.approx(expected, rel=1e-4)
    assert S.projected_potential_integral_VA3(z) == pytest.approx(expected)
    # centroid at the atom to 0.005 Å: exact sub-pixel placement
    yy, xx = np.mgrid[:64, :64] * PIXEL_A
    w = v.astype(np.float64)
    assert (w * yy).sum() / w.sum() == pytest.approx(pos[0], abs=5e-3)
    assert (w * xx).sum() / w.sum() == pytest.approx(pos[1], abs=5e-3)


def test_whole_pixel_shift_equals_roll():
    a = S.projected_potential(one_atom(8, (6.13, 5.77)), (64, 64), PIXEL_NM)
    b = S.projected_potential(one_atom(8, (6.13 + 3 * PIXEL_A, 5.77 - 2 * PIXEL_A)), (64, 64), 0.02)
    np.testing.assert_allclose(b, np.roll(a, (3, -2), axis=(0, 1)), atol=1e-3 * a.max())


def test_periodic_wraps_non_periodic_does_not():
    pos = (6.4, 0.3)  # 1.5 px from the left edge
    per = S.projected_potential(one_atom(79, pos, periodic=True), (64, 64), PIXEL_NM)
    non = S.projected_potential(one_atom(79, pos, periodic=False), (64, 64), PIXEL_NM)
    row = 32
    assert per[row, -1] > 0.05 * per.max()  # 0.5 Å from the atom across the edge: wraps
    assert abs(non[row, -1]) < 1e-3 * non.max()  # but not for an isolated atom
    # close to the atom both agree
    np.testing.assert_allclose(per[20:44, :10], non[20:44, :10], rtol=0.02, atol=0.01 * per.max())


def test_debye_waller_smears_but_conserves():
    sharp = S.projected_potential(one_atom(38, (6.4, 6.4)), (64, 64), PIXEL_NM)
    warm = S.projected_potential(one_atom(38, (6.4, 6.4), u2=0.02), (64, 64), PIXEL_NM)
    assert warm.max() < 0.8 * sharp.max()
    assert warm.sum() == pytest.approx(sharp.sum(), rel=1e-4)


def test_z_range_selects_atoms():
    sp = S.Specimen("two", [(6.4, 6.4, 1.0), (6.4, 6.4, 5.0)], [6, 6], (12.8, 12.8), 8.0, True)
    full = S.projected_potential(sp, (64, 64), PIXEL_NM)
    half = S.projected_potential(sp, (64, 64), PIXEL_NM, z_range_A=(0.0, 3.0))
    np.testing.assert_allclose(2 * half, full, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="z_range_A"):
        S.projected_potential(sp, (64, 64), PIXEL_NM, z_range_A=(3.0, 1.0))


@pytest.mark.parametrize(
    "shape,pixel,match",
    [((0, 64), 0.02, "shape"), ((64,), 0.02, "shape"), ((64, 64), 0.0, "pixel_nm")],
)
def test_projected_potential_bad_input(shape, pixel, match):
    with pytest.raises(ValueError, match=match):
        S.projected_potential(one_atom(6, (1.0, 1.0)), shape, pixel)


def test_projected_potential_needs_specimen():
    with pytest.raises(TypeError, match="Specimen"):
        S.projected_potential("amorphous_carbon", (64, 64), PIXEL_NM)


# ------------------------------------------------------------------ exit waves


@pytest.mark.parametrize("method", ["multislice", "phase_object"])
def test_vacuum_exit_wave_is_one(method):
    vac = S.Specimen("vacuum", np.zeros((0, 3)), [], (12.8, 12.8), 20.0, periodic=True)
    psi = S.exit_wave(vac, (64, 64), PIXEL_NM, 300.0, method=method)
    assert psi.dtype == np.complex64
    np.testing.assert_allclose(psi, 1.0, atol=1e-6)


def test_phase_object_is_exp_i_sigma_v():
    a = S.make_specimen("amorphous_carbon", (12.8, 12.8), seed=1, thickness_nm=0.5)
    v = S.projected_potential(a, (64, 64), PIXEL_NM)
    psi = S.exit_wave(a, (64, 64), PIXEL_NM, 300.0, method="phase_object")
    sigma = interaction_constant_per_V_A(300.0)
    np.testing.assert_allclose(np.angle(psi * np.exp(-1j * sigma * v)), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.abs(psi), 1.0, atol=1e-6)


def _back_propagated(psi: np.ndarray, distance_A: float) -> np.ndarray:
    """Spectrum of ψ propagated by −distance (Fresnel), same convention as multislice."""
    k2 = FrequencyGrid(psi.shape, (PIXEL_NM, PIXEL_NM)).k2
    return np.fft.fft2(psi) * np.exp(1j * np.pi * electron_wavelength_A(300.0) * distance_A * k2)


def test_multislice_of_one_atomic_plane_is_propagated_phase_object():
    # all atoms in one plane at z = 0.5 Å inside a 4 Å thick specimen (1 Å slices): multislice
    # = transmission at the slice entrance (z = 0) then 4 Å of free propagation. Propagated back,
    # it must equal the phase object inside the 2/3-Nyquist band.
    rng = np.random.default_rng(3)
    pos = np.column_stack([rng.random((60, 2)) * 12.8, np.full(60, 0.5)])
    sp = S.Specimen("plane", pos, np.full(60, 6), (12.8, 12.8), 4.0, periodic=True)
    ms = S.exit_wave(sp, (64, 64), PIXEL_NM, 300.0, slice_A=1.0)
    po = S.exit_wave(sp, (64, 64), PIXEL_NM, 300.0, method="phase_object")
    k2 = FrequencyGrid((64, 64), (PIXEL_NM, PIXEL_NM)).k2
    band = k2 < (0.6 * 2.5) ** 2  # inside the multislice band limit (2/3 of 2.5 /Å)
    fp = np.fft.fft2(po)
    err = np.linalg.norm((_back_propagated(ms, 4.0) - fp)[band])
    assert err < 2e-3 * np.linalg.norm(fp[band & (k2 > 0)])


def test_thin_film_multislice_agrees_with_phase_object():
    # 0.4 nm a-C film in 1 Å slices. Multislice returns the wave at the exit surface with each
    # slice's potential at its entrance plane, so the phase object corresponds to the exit wave
    # propagated back by t/2 + Δz/2. What remains is the atoms' spread in depth: at most
    # π λ k² σ_z ≈ 0.07 at k = 1 /Å (σ_z = t/√12), so within k < 1 /Å they agree to 5 % of the
    # scattered wave; without the back-propagation they do not (Fresnel propagation is physics).
    t, dz = 4.0, 1.0
    a = S.make_specimen("amorphous_carbon", (12.8, 12.8), seed=2, thickness_nm=t / 10)
    ms = S.exit_wave(a, (64, 64), PIXEL_NM, 300.0, method="multislice", slice_A=dz)
    po = S.exit_wave(a, (64, 64), PIXEL_NM, 300.0, method="phase_object")
    k2 = FrequencyGrid((64, 64), (PIXEL_NM, PIXEL_NM)).k2
    band = k2 < 1.0
    fp = np.fft.fft2(po)
    scattered = np.linalg.norm(fp[band & (k2 > 0)])
    assert np.linalg.norm((_back_propagated(ms, t / 2 + dz / 2) - fp)[band]) < 0.05 * scattered
    assert np.linalg.norm((np.fft.fft2(ms) - fp)[band]) > 0.06 * scattered


def test_thicker_multislice_differs_from_phase_object():
    # dynamical scattering in 4 nm SrTiO3 [001] must not equal the phase object
    s = S.make_specimen("srtio3_001", (3.905, 3.905), thickness_nm=4.0)
    ms = S.exit_wave(s, (48, 48), 3.905 / 480, 300.0)
    po = S.exit_wave(s, (48, 48), 3.905 / 480, 300.0, method="phase_object")
    assert np.abs(ms - po).max() > 0.2
    assert abs(np.mean(np.abs(ms) ** 2) - 1.0) < 0.02  # flux conserved within the band


def test_exit_wave_bad_method():
    with pytest.raises(ValueError, match="method"):
        S.exit_wave(one_atom(6, (1, 1)), (64, 64), PIXEL_NM, 300.0, method="bloch")
    with pytest.raises(ValueError, match="slice_A"):
        S.exit_wave(one_atom(6, (1, 1)), (64, 64), PIXEL_NM, 300.0, slice_A=0.0)


# ------------------------------------------------------------------ built-ins


def test_unknown_specimen_lists_names():
    with pytest.raises(ValueError) as exc:
        S.make_specimen("graphene", (2.0, 2.0))
    for name in S.BUILTIN_SPECIMENS:
        assert name in str(exc.value)


def test_bad_specimen_parameter():
    with pytest.raises(ValueError, match="amorphous_carbon"):
        S.make_specimen("amorphous_carbon", (2.0, 2.0), colour="blue")
    with pytest.raises(ValueError, match="field_nm"):
        S.make_specimen("amorphous_carbon", (-1.0, 2.0))


def test_amorphous_carbon_density_separation_and_seed():
    a = S.make_specimen("amorphous_carbon", (3.0, 3.0), seed=4, thickness_nm=2.0)
    vol = 30.0 * 30.0 * 20.0
    n_expected = 2.0 / 12.011 * 6.02214076e23 * 1e-24 * vol
    assert len(a.numbers) == pytest.approx(n_expected, abs=1)
    assert np.all(a.numbers == 6)
    pos = a.positions_A.copy()
    assert pos[:, 2].min() >= 0 and pos[:, 2].max() < 20.0
    tree = cKDTree(np.mod(pos, [30.0, 30.0, 1000.0]), boxsize=[30.0, 30.0, 1000.0])
    d, _ = tree.query(pos % [30.0, 30.0, 1000.0], k=2)
    assert d[:, 1].min() >= 1.4 - 1e-9
    b = S.make_specimen("amorphous_carbon", (3.0, 3.0), seed=4, thickness_nm=2.0)
    c = S.make_specimen("amorphous_carbon", (3.0, 3.0), seed=5, thickness_nm=2.0)
    np.testing.assert_array_equal(a.positions_A, b.positions_A)
    assert not np.array_equal(a.positions_A, c.positions_A)


def test_srtio3_composition_and_lattice():
    s = S.make_specimen("srtio3_001", (0.3905 * 4, 0.3905 * 4), thickness_nm=3.905)
    counts = {z: int(np.sum(s.numbers == z)) for z in (38, 22, 8)}
    assert counts == {38: 16 * 10, 22: 16 * 10, 8: 48 * 10}
    sr = s.positions_A[s.numbers == 38]
    np.testing.assert_allclose(np.mod(sr + 1e-6, 3.905), 1e-6, atol=1e-6)  # Sr on the lattice
    ti = s.positions_A[s.numbers == 22]
    np.testing.assert_allclose(np.mod(ti - 3.905 / 2 + 1e-6, 3.905), 1e-6, atol=1e-6)
    assert s.periodic and s.debye_waller_A2 is not None


def test_si110_dumbbells():
    a = 5.431
    box = (a * 4, a / math.sqrt(2) * 5, a / math.sqrt(2) * 5)  # commensurate with the cell
    s = S.make_specimen("si_110", (box[0] / 10, box[1] / 10), thickness_nm=box[2] / 10)
    cols = np.unique(np.round(s.positions_A[:, :2], 3), axis=0)
    d, _ = cKDTree(cols).query(cols, k=2)
    assert d[:, 1].min() == pytest.approx(5.431 / 4, abs=1e-3)  # the 1.36 Å dumbbell
    assert len(s.numbers) / np.prod(box) == pytest.approx(8 / a**3, rel=1e-9)


def test_au_particle_and_crystal_edge():
    p = S.make_specimen("au_particle_on_carbon", (4.0, 4.0), particle_diameter_nm=2.0)
    au = p.positions_A[p.numbers == 79]
    assert len(au) > 100 and np.any(p.numbers == 6)
    centre = au[:, :2].mean(axis=0)
    np.testing.assert_allclose(centre, [20.0, 20.0], atol=1.0)
    assert np.linalg.norm(au - au.mean(axis=0), axis=1).max() <= 10.0 + 1e-6
    e = S.make_specimen("crystal_edge", (4.0, 4.0))
    xtal = e.positions_A[e.numbers != 6]
    carbon = e.positions_A[e.numbers == 6]
    assert xtal[:, 1].max() < 20.0  # crystal only in the left half
    assert carbon[:, 1].max() > 39.0 and carbon[:, 1].min() < 1.0  # film over everything
    assert carbon[:, 2].min() >= xtal[:, 2].max() - 1e-9


def test_gridded_structure_factor_matches_direct_sum():
    # the Gaussian-gridding NUFFT must reproduce the exact Fourier series of the potential:
    # X(k) = Σ_atoms 47.878·f_e(k)·exp(−2π²⟨u²⟩k²)·exp(−2πi k·r)·taper(k) / area
    rng = np.random.default_rng(5)
    n, ny, nx = 40, 48, 64
    ext = (ny * PIXEL_A, nx * PIXEL_A)
    pos = np.column_stack([rng.random(n) * ext[0], rng.random(n) * ext[1], np.zeros(n)])
    num = rng.choice([8, 38, 79], size=n)
    u2 = np.where(num == 8, 0.0085, 0.006)
    sp = S.Specimen("random", pos, num, ext, 1.0, periodic=True, debye_waller_A2=u2)
    v = S.projected_potential(sp, (ny, nx), PIXEL_NM).astype(np.float64)
    fg = FrequencyGrid((ny, nx), (PIXEL_NM, PIXEL_NM))
    ky, kx = fg.ky.astype(np.float64), fg.kx.astype(np.float64)
    k2 = ky**2 + kx**2
    spec = np.zeros((ny, nx), dtype=np.complex128)
    for (y, x, _), z, u in zip(pos, num, u2, strict=True):
        kernel = S.POTENTIAL_PREFACTOR_V_A2 * S.scattering_factor_A(z, np.sqrt(k2))
        spec += kernel * np.exp(-2 * np.pi**2 * u * k2) * np.exp(-2j * np.pi * (ky * y + kx * x))
    nyq = 0.5 / PIXEL_A
    taper = np.ones_like(k2)
    for k in (np.abs(ky), np.abs(kx)):
        t = np.clip((k / nyq - 0.75) / 0.25, 0, 1)
        taper = taper * 0.5 * (1 + np.cos(np.pi * t))
    expected = np.fft.ifft2(spec * taper).real / PIXEL_A**2
    assert np.abs(v - expected).max() < 2e-5 * np.abs(expected).max()
