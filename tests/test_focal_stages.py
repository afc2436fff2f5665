"""Each stage of scherzer.processing.focal exercised alone on a small synthetic input.

The end-to-end accuracy of the registration is tested in test_focal.py; here every module of the
package (settings, inputs, search, problem, relative, crystal, absolute, agreement, register,
structure) is checked against ground truth it can be held to by itself, in seconds. Series come
from ``synthetic_series`` (test_restoration.py: a known periodic exit wave through
scherzer.optics.image_intensity, Fourier-shift drift, Poisson noise or none). Measured values
are quoted where a tolerance is set from them.
"""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
import scipy.fft as sfft
from test_restoration import synthetic_series

from scherzer.optics import FrequencyGrid, Optics
from scherzer.processing.focal import FocalParams, StructureParams, structure_image
from scherzer.processing.focal.absolute import (
    cartesian_a1,
    chi_basis,
    fit_chi_free_phase,
    fit_chi_weak_phase,
    polar_a1,
)
from scherzer.processing.focal.agreement import fit_sectors, fit_start_phase_agreement
from scherzer.processing.focal.crystal import CrystalStrategy, first_pass_crystal, fit_step_scale
from scherzer.processing.focal.inputs import (
    check_nominal_defocus,
    choose_reference,
    instrument_from_stack,
    used_mask,
)
from scherzer.processing.focal.joint import joint_defocus
from scherzer.processing.focal.problem import Correlator, Problem, loo_waves
from scherzer.processing.focal.register import choose_strategy, register_focal_series
from scherzer.processing.focal.relative import AmorphousStrategy, first_pass
from scherzer.processing.focal.search import (
    best_of_starts,
    local_grid_peak,
    parabolic_peak,
    search_defocus_shift,
    search_defocus_shift_local,
)
from scherzer.processing.restoration import RestoreParams, restore_exit_wave
from scherzer.processing.spectral import BandTransfer, SpectralBand, shift_phase

OPTICS = Optics(voltage_kv=300.0, cs_mm=0.6, focal_spread_nm=3.0, beam_divergence_mrad=0.1)
NOMINAL5 = -100.0 + 10.0 * np.arange(5)


def cc(a: np.ndarray, b: np.ndarray) -> complex:
    """Normalised complex correlation ⟨a, b⟩ / (‖a‖‖b‖)."""
    return complex(np.vdot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def ring_band(size: int = 64, k_max: float = 0.3) -> SpectralBand:
    """All frequencies 0 < |g| ≤ k_max cycles/px of a size² grid."""
    g = np.fft.fftfreq(size)
    q = np.hypot(g[:, None], g[None, :])
    return SpectralBand.from_mask((q > 0) & (q <= k_max))


# ------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------
def test_settings_validate_at_the_edge_and_name_unknown_keys():
    ta = pydantic.TypeAdapter(FocalParams)
    p = ta.validate_python({"crystal": True, "area": [0, 0, 64, 64], "exclude": [1, 2]})
    assert p.crystal and p.area == (0, 0, 64, 64) and p.exclude == (1, 2)
    with pytest.raises(pydantic.ValidationError, match="no_such_setting"):
        ta.validate_python({"no_such_setting": 1})
    with pytest.raises(pydantic.ValidationError, match="absolute"):
        ta.validate_python({"absolute": "sometimes"})
    with pytest.raises(pydantic.ValidationError, match="bogus"):
        pydantic.TypeAdapter(RestoreParams).validate_python({"iterations": 1, "bogus": 0})
    with pytest.raises(pydantic.ValidationError, match="bogus"):
        pydantic.TypeAdapter(StructureParams).validate_python({"bogus": 0})


def test_settings_automatic_rules():
    # field-independent: the registration prior of a crystal is the restoration's own
    assert FocalParams().resolved().prior_scale == 1e4
    assert FocalParams(crystal=True).resolved().prior_scale == 1.0
    assert FocalParams(prior_scale=3.0).resolved().prior_scale == 3.0
    # field-dependent: a periodic field keeps the plain settings, a cropped one is tapered
    # (edge_discontinuity measured 1.015 for the noisy periodic field, 2.27 for the crop of
    # the noise-free one: its wrap-around jumps where the smooth field has small steps)
    periodic = synthetic_series("weak_phase", n=3, size=128, dose_e_per_A2=500.0)
    auto = FocalParams().for_field(periodic.frames)
    assert (auto.taper_px, auto.clip_spots_wave, auto.whiten) == (12, 0.0, 0.0)
    smooth = synthetic_series("weak_phase", n=3, size=128, dose_e_per_A2=None)
    cropped = smooth.frames[:, :, :100]  # a crop of a periodic field is no longer periodic
    wide = FocalParams().for_field(cropped)
    assert wide.clip_spots_wave > 0 and wide.whiten > 0 and wide.max_delocalisation is None


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def test_inputs_reference_choice_and_checks():
    sch = OPTICS.scherzer_defocus_nm()  # ≈ −41 nm at 300 kV, Cs 0.6 mm
    nominal = -100.0 + 10.0 * np.arange(11)
    assert choose_reference(nominal, OPTICS, None) == int(np.argmin(np.abs(nominal - sch)))
    assert choose_reference(nominal, OPTICS, 3) == 3
    # Cs ≈ 0 puts Scherzer at 0 nm: never an image within one step of focus
    near_focus = -20.0 + 5.0 * np.arange(9)
    ref = choose_reference(near_focus, Optics(voltage_kv=300.0, cs_mm=0.0), None)
    assert abs(near_focus[ref]) >= 5.0
    with pytest.raises(ValueError, match="out of range"):
        choose_reference(nominal, OPTICS, 11)
    assert check_nominal_defocus(nominal[::-1], 11)[0] == nominal[-1]  # decreasing is fine
    with pytest.raises(ValueError, match=r"break the order"):
        check_nominal_defocus(np.array([0.0, 10.0, 5.0, 20.0]), 4)
    with pytest.raises(ValueError, match=r"NaN\) for frames \[1\]"):
        check_nominal_defocus(np.array([0.0, np.nan, 20.0]), 3)
    with pytest.raises(ValueError, match="3 values for 4 frames"):
        check_nominal_defocus(np.zeros(3), 4)
    assert used_mask(5, (1,), 2).tolist() == [True, False, True, True, True]
    with pytest.raises(ValueError, match="reference frame 2 cannot be excluded"):
        used_mask(5, (2,), 2)
    with pytest.raises(ValueError, match="at least 3 images"):
        used_mask(4, (0, 1), 2)


# ------------------------------------------------------------------------------------------
# search
# ------------------------------------------------------------------------------------------
def test_search_finds_a_known_defocus_and_shift():
    """A cross-power spectrum whose correlation peaks at shift s0 and defocus Δ0 by
    construction: Z(Δ) = w(g) e^{−2πi g·s0} cos(c q² (Δ − Δ0)); the search must return
    (Δ0, s0) and the peak 1."""
    band = ring_band(64, 0.25)
    corr = Correlator(band)
    q2 = (band.gy**2 + band.gx**2) * 64.0
    w = np.exp(-q2).astype(np.float32)
    s0, d0 = np.array([1.3, -0.7]), 1.37
    base = (w * np.exp(-2j * math.pi * (band.gy * s0[0] + band.gx * s0[1]))).astype(np.complex64)

    def z_of(trials):
        c = np.cos(0.6 * q2[None] * (np.asarray(trials)[:, None] - d0))
        return (base[None] * c).astype(np.complex64), np.full(len(trials), float(w.sum()))

    delta, s, peak = search_defocus_shift(corr, z_of, 0.0, 4.0, 9, 0.01)
    assert abs(delta - d0) <= 0.02, delta
    assert np.allclose(s, s0, atol=1e-3), s
    assert peak == pytest.approx(1.0, abs=1e-3)
    # the trust-region search of settled passes: the same maximum from a start 0.17 nm and
    # 0.2 px off; None (search the full range) when the maximum lies outside its region
    local = search_defocus_shift_local(corr, z_of, 1.2, 0.5, 0.01, s0 + 0.2)
    assert local is not None and abs(local[0] - d0) <= 0.02, local
    assert np.allclose(local[1], s0, atol=1e-3) and local[2] == pytest.approx(1.0, abs=1e-3)
    assert search_defocus_shift_local(corr, z_of, 0.3, 0.5, 0.01, s0) is None
    # the small helpers: a sampled parabola, a shift grid start, BFGS from several starts
    x = np.linspace(-2.0, 2.0, 9)
    assert parabolic_peak(x, -((x - 0.37) ** 2)) == pytest.approx(0.37, abs=1e-9)
    start = local_grid_peak(corr, base, np.array([1.0, -1.0]), 1.0)
    assert np.all(np.abs(start - s0) <= 0.25 / 2 + 1e-9), start  # within half a grid step

    def bowl(v):
        r = v - np.array([0.5, -1.5])
        return float(r @ r), 2 * r

    assert np.allclose(best_of_starts(bowl, ([0, 0], [3, 3])).x, [0.5, -1.5], atol=1e-5)


# ------------------------------------------------------------------------------------------
# problem
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weak_phase_noise_free():
    """5 × 128² weak-phase series, no noise, step 8 % off the nominal, drift + jitter."""
    return synthetic_series(
        "weak_phase", n=5, size=128, dose_e_per_A2=None, step_error_fraction=0.08, seed=3
    )


def test_problem_leave_one_out_wave_matches_the_truth(weak_phase_noise_free):
    """Each image's leave-one-out wave (restored from the other four at the true defocus and
    drift) against the true exit wave on the band, and the image it predicts against the
    image itself. Measured: wave correlation 0.90–0.92 with |global phase| ≤ 0.006 rad on
    the 96 % of the band the other images transfer (Σ s² > 2); predicted image 0.95–0.98."""
    st = weak_phase_noise_free
    gt = st.ground_truth
    params = FocalParams(max_delocalisation=None)  # a periodic field: nothing enters from outside
    prob = Problem(st.frames, OPTICS, 0.02, NOMINAL5, params)
    used = np.ones(5, bool)
    t, _, quad, loo = loo_waves(prob, gt["defocus_nm"], gt["shifts_px"], used, 1e4)
    truth = prob.band.gather(sfft.fft2(gt["exit_wave"]))
    aligned = prob.spectra * shift_phase(prob.band, gt["shifts_px"])
    s = 2 * np.sin(prob.bt.chi(gt["defocus_nm"])) * prob.bt.env_t
    for i in range(5):
        informed = (np.delete(s, i, axis=0) ** 2).sum(axis=0) > 2.0
        c = cc(truth[informed], loo[i][informed])
        assert abs(c) >= 0.85 and abs(np.angle(c)) <= 0.02, (i, c)
        lin = loo[i] * t[i] + prob.band.conj_neg(loo[i]) * prob.band.conj_neg(t[i])
        assert abs(cc(aligned[i], lin * prob.camera + quad[i])) >= 0.93, i


def test_problem_correlator_finds_a_known_shift():
    band = ring_band(64, 0.3)
    corr = Correlator(band)
    s0 = np.array([-4.3, 2.6])
    z = np.exp(-2j * math.pi * (band.gy * s0[0] + band.gx * s0[1])).astype(np.complex64)
    coarse, _ = corr.coarse(z[None], np.ones(1))  # the peak on the coarse box's pixels
    assert np.all(np.abs(coarse[0] - s0) <= 0.5 * max(corr.scale)), coarse
    s, peak = corr.refine(z, coarse[0], band.size, 8)
    assert np.allclose(s, s0, atol=1e-4) and peak == pytest.approx(1.0, abs=1e-4)


# ------------------------------------------------------------------------------------------
# relative (amorphous passes)
# ------------------------------------------------------------------------------------------
def test_relative_first_pass_follows_a_step_8_percent_off(weak_phase_noise_free):
    """The first pass alone on 5 × 128² (reference 2 at its true defocus): per-image defocus
    searched around the step fitted so far, shifts within the drift window. The nominal
    step is 1.6 nm off at the ends; measured first-pass error 0.37 nm, drift 0.043 px."""
    st = weak_phase_noise_free
    gt = st.ground_truth
    ref = 2
    nominal = NOMINAL5 + gt["defocus_nm"][ref] - NOMINAL5[ref]
    prob = Problem(st.frames, OPTICS, 0.02, nominal, FocalParams(max_delocalisation=None))
    d, s, peaks = first_pass(prob, ref, nominal, np.ones(5, bool), 4.0)
    rel_true = gt["defocus_nm"] - gt["defocus_nm"][ref]
    err = np.abs((d - d[ref]) - rel_true)
    assert err.max() <= 0.6, err
    assert err.max() < 0.5 * np.abs((nominal - nominal[ref]) - rel_true).max()
    assert np.abs(s - (gt["shifts_px"] - gt["shifts_px"][ref])).max() <= 0.1, s
    assert peaks[ref] == 1.0 and np.all(peaks > 0.8), peaks


# ------------------------------------------------------------------------------------------
# crystal
# ------------------------------------------------------------------------------------------
def test_crystal_drift_chain_and_step_scale():
    """Crystal-only synthetic series, 5 × 128², no noise, step 3 % off, drift (0.9, −0.6)
    px/image + jitter: the chained drift of the first pass, and the step scale κ fitted on
    the Bragg spots of the truly aligned series. Measured: drift ≤ 0.20 px, κ 1.0312."""
    st = synthetic_series(
        "crystal", n=5, size=128, dose_e_per_A2=None, step_error_fraction=0.03, seed=3,
        drift_px_per_frame=(0.9, -0.6),
    )  # fmt: skip
    gt = st.ground_truth
    ref = 2
    prob = Problem(st.frames, OPTICS, 0.02, NOMINAL5, FocalParams(crystal=True))
    d, s, _ = first_pass_crystal(prob, ref, NOMINAL5, np.ones(5, bool))
    assert np.array_equal(d, NOMINAL5)  # the first pass keeps the nominal step
    truth_s = gt["shifts_px"] - gt["shifts_px"][ref]
    assert np.abs(s - truth_s).max() <= 0.3, s - truth_s
    aligned = prob.spectra * shift_phase(prob.band, truth_s)
    kappa, resid = fit_step_scale(prob, aligned, NOMINAL5, ref, gt["defocus_nm"][ref])
    assert kappa == pytest.approx(1.03, abs=0.003) and resid < 0.01
    # the crystal strategy's flag level: a relative test against the median peak
    level = CrystalStrategy().flag_level(
        prob, np.array([0.9, 0.95, 1.0, 0.92, 0.1]), np.ones(5, bool)
    )
    assert level == pytest.approx(0.25 * 0.92)


# ------------------------------------------------------------------------------------------
# absolute (C1 / A1 from a wave)
# ------------------------------------------------------------------------------------------
def _wave_with_chi_error(kind: str, x_true: np.ndarray):
    """A band wave φ of a weak-phase object (φ = iP) or a channelling-like one (φ = c·R, one
    complex c) with a known χ error x·basis applied: φ e^{−iΔχ}."""
    grid = FrequencyGrid((128, 128), (0.02, 0.02))
    band = ring_band(128, 0.2)
    basis = chi_basis(OPTICS, grid, band)
    rng = np.random.default_rng(5)
    p = np.fft.fft2(rng.standard_normal((128, 128)))  # real object: P(−g) = P*(g)
    c = 1j if kind == "weak" else 0.3 * np.exp(0.7j)
    phi = c * band.gather(p) * np.exp(-1j * (x_true @ basis))
    return phi.astype(np.complex64), basis, band


@pytest.mark.parametrize("kind", ["weak", "free"])
def test_absolute_recovers_a_known_c1_and_a1(kind):
    """δC1 = 1.2 nm and A1 = 0.9 nm at 25° applied to a known wave; the weak-phase fit (φ = iP)
    and the free-phase fit (φ = c·R, c unknown) give them back."""
    a1 = cartesian_a1(0.9, 25.0)
    x_true = np.array([1.2, *a1])
    phi, basis, band = _wave_with_chi_error(kind, x_true)
    fit = (fit_chi_weak_phase if kind == "weak" else fit_chi_free_phase)(phi, basis, band, 5.0)
    assert fit.delta_nm == pytest.approx(1.2, abs=0.01)
    mag, ang = polar_a1(fit.a1_cartesian_nm)
    assert mag == pytest.approx(0.9, abs=0.01) and ang == pytest.approx(25.0, abs=0.5)
    assert (fit.details() == {}) == (kind == "weak")


# ------------------------------------------------------------------------------------------
# agreement (QFocus-like)
# ------------------------------------------------------------------------------------------
def test_agreement_sector_fit_and_start_defocus():
    angles = (np.arange(6) + 0.5) * 30.0
    t = np.radians(2 * angles)
    c1, a1c, a1s = -60.0, 0.8, -0.5
    noise = np.array([0.02, -0.03, 0.01, 0.0, -0.02, 0.03])
    sector = c1 + a1c * np.cos(t) + a1s * np.sin(t) + noise
    fit = fit_sectors(sector, angles, np.ones(6), np.full(6, 10), np.ones(6, bool))
    assert fit.determined and np.allclose(fit.coef, [c1, a1c, a1s], atol=0.05), fit.coef
    assert fit.sigma_nm < 0.05
    few = fit_sectors(sector, angles, np.ones(6), np.array([10, 10, 10, 0, 0, 0]), np.ones(6, bool))
    assert not few.determined  # three sectors cannot fix C1 and both A1 components honestly
    # start defocus of CTF-modulated spectra S_n = P · sin χ_n · E (known start −71.3 nm)
    grid = FrequencyGrid((128, 128), (0.02, 0.02))
    band = ring_band(128, 0.2)
    bt = BandTransfer(OPTICS, grid, band)
    rel = 10.0 * np.arange(5)
    p = band.gather(np.fft.fft2(np.random.default_rng(2).standard_normal((128, 128))))
    env = bt.env_t * bt.spatial(-71.3 + rel)
    spectra = (p[None] * np.sin(bt.chi(-71.3 + rel)) * env).astype(np.complex64)
    basis = chi_basis(OPTICS, grid, band)
    res = fit_start_phase_agreement(spectra, bt, basis, band, rel, -68.0, 8.0)
    assert res.start_nm == pytest.approx(-71.3, abs=0.05), res.start_nm


# ------------------------------------------------------------------------------------------
# register (the loop) and structure
# ------------------------------------------------------------------------------------------
def test_register_chooses_the_strategy_once():
    assert isinstance(choose_strategy(FocalParams()), AmorphousStrategy)
    assert isinstance(choose_strategy(FocalParams(crystal=True)), CrystalStrategy)


def test_register_loop_on_a_small_series(weak_phase_noise_free):
    """The whole loop on the 5 × 128² noise-free series: every pass recorded, the reference's
    shift 0, relative defocus and drift near the truth (measured 0.40 nm, 0.03 px)."""
    st = weak_phase_noise_free
    reg = register_focal_series(st, OPTICS, FocalParams(reference=2, max_delocalisation=None))
    gt = st.ground_truth
    rel_true = gt["defocus_nm"] - gt["defocus_nm"][2]
    assert np.abs(reg.relative_defocus_nm - rel_true).max() <= 0.6
    assert np.abs(reg.shifts_px - (gt["shifts_px"] - gt["shifts_px"][2])).max() <= 0.1
    assert reg.history[0]["pass"] == 0 and reg.passes >= 1
    assert any("absolute_correction_nm" in h for h in reg.history)


def test_structure_image_with_known_drift_and_typed_params():
    """5 × 128² crystal series, no noise, start −96 nm, true drift given (no registration):
    the start defocus from phase agreement, and the same result through StructureParams as
    through the keyword form (both at once is refused)."""
    st = synthetic_series("crystal", n=5, size=128, start_nm=-96.0, dose_e_per_A2=None, seed=10)
    shifts = st.ground_truth["shifts_px"] - st.ground_truth["shifts_px"][0]
    kw = {"start_range_nm": (-106.0, -86.0), "fit_astigmatism": False}
    res = structure_image(st, OPTICS, 10.0, shifts_px=shifts, **kw)
    assert abs(res.start_defocus_nm - st.ground_truth["defocus_nm"][0]) <= 0.5, res
    typed = structure_image(st, OPTICS, 10.0, StructureParams(**kw), shifts_px=shifts)
    assert typed.start_defocus_nm == res.start_defocus_nm
    assert np.array_equal(typed.image, res.image)
    with pytest.raises(TypeError, match="not both"):
        structure_image(st, OPTICS, 10.0, StructureParams(), shifts_px=shifts, n_sectors=4)


def test_restore_params_equal_the_keyword_form():
    st = synthetic_series("weak_phase", n=5, size=64, dose_e_per_A2=None, seed=1)
    gt = st.ground_truth
    args = (st.frames, OPTICS, 0.02, gt["defocus_nm"], gt["shifts_px"])
    kw = restore_exit_wave(*args, used=np.array([1, 1, 1, 0, 1], bool), iterations=1)
    typed = restore_exit_wave(*args, RestoreParams(iterations=1, exclude=(3,)))
    assert np.array_equal(kw.wave, typed.wave) and kw.params == typed.params
    with pytest.raises(TypeError, match="not both"):
        restore_exit_wave(*args, RestoreParams(), iterations=2)
    with pytest.raises(ValueError, match="out of range"):
        restore_exit_wave(*args, RestoreParams(exclude=(7,)))


def test_joint_defocus_pulls_noisy_estimates_onto_the_line():
    """Noisy per-image estimates (σ 0.5 nm) of a straight focus line: the joint solution with
    the linear-drift prior is closer to the truth; switched off it returns the estimates; a
    series already on its line within σ_p is left unchanged."""
    nominal = -100.0 + 10.0 * np.arange(11)
    truth = -99.0 + 10.3 * np.arange(11)
    rng = np.random.default_rng(4)
    m = truth + rng.normal(0.0, 0.5, 11)
    peaks, ok = np.full(11, 0.5), np.ones(11, bool)
    d, info = joint_defocus(m, nominal, peaks, ok, 0.1)
    rms = lambda x: float(np.sqrt(np.mean((x - truth) ** 2)))  # noqa: E731
    assert rms(d) < 0.6 * rms(m) and info["shrink"] < 0.2, (rms(d), rms(m), info)
    assert np.array_equal(joint_defocus(m, nominal, peaks, ok, None)[0], m)
    on_line = truth + rng.normal(0.0, 0.02, 11)
    assert np.allclose(joint_defocus(on_line, nominal, peaks, ok, 0.3)[0], on_line)
    # an image not used keeps its own estimate and does not pull the line
    ok[3] = False
    m2 = m.copy()
    m2[3] += 50.0
    d2, _ = joint_defocus(m2, nominal, peaks, ok, 0.1)
    keep = np.arange(11) != 3
    assert d2[3] == m2[3] and np.allclose(d2[keep], d[keep], atol=0.3)


def test_inputs_ftsr_instrument_parameters():
    """FTSR's parameter set through instrument_from_stack: A2 and vibration as optics, the
    information limit as a cut-off, the nominal defocus from start/end or a list."""
    st = synthetic_series("weak_phase", n=5, size=64, dose_e_per_A2=None)
    optics, pixel, nominal = instrument_from_stack(
        st, a2_nm=850.0, a2_deg=-100.0, vibration_nm=0.03, information_limit_nm=0.1,
        start_nm=-150.0, end_nm=50.0,
    )  # fmt: skip
    assert (optics.a2_nm, optics.a2_deg, optics.vibration_nm) == (850.0, -100.0, 0.03)
    # an aperture at θ = λ/d: k_max = 1/d = 10 nm⁻¹
    k_cut_per_nm = optics.objective_aperture_mrad * 1e-3 / optics.wavelength_A * 10.0
    assert k_cut_per_nm == pytest.approx(10.0)
    assert np.allclose(nominal, np.linspace(-150.0, 50.0, 5)) and pixel == pytest.approx(0.02)
    listed = [-100.0, -91.0, -79.0, -70.0, -62.0]
    assert np.array_equal(instrument_from_stack(st, defocus_list_nm=listed)[2], listed)
    with pytest.raises(ValueError, match="4 values for 5 frames"):
        instrument_from_stack(st, defocus_list_nm=listed[:4])
    with pytest.raises(ValueError, match="disagrees"):
        instrument_from_stack(st, start_nm=-150.0, end_nm=50.0, step_nm=10.0)
    with pytest.raises(ValueError, match="unknown instrument override"):
        instrument_from_stack(st, a7_nm=1.0)


def test_joint_defocus_with_a_step_scale_measured_elsewhere():
    """Per-image estimates sharing a −2 % trend (a thick crystal's, :mod:`.misfit`) plus a real
    bend (focal hysteresis, 0.4 nm at one image): with the true step scale given, the trend goes
    and the bend stays; the mean defocus is kept; without a prior the tilt alone is applied."""
    nominal = -150.0 + 10.0 * np.arange(11)
    truth = -150.0 + 10.3 * np.arange(11)
    truth[6] += 0.4
    m = -148.0 + 10.1 * np.arange(11)  # the trend: step 10.1 instead of 10.3, offset
    m[6] += 0.4
    peaks, ok = np.full(11, 0.5), np.ones(11, bool)
    for sigma in (0.3, None):
        d, _ = joint_defocus(m, nominal, peaks, ok, sigma, slope=1.03)
        rel = (d - d[0]) - (truth - truth[0])
        assert np.max(np.abs(rel)) < 0.05, (sigma, rel)
        assert abs(d.mean() - m.mean()) < 1e-9
    plain, _ = joint_defocus(m, nominal, peaks, ok, 0.3)
    assert np.max(np.abs((plain - plain[0]) - (truth - truth[0]))) > 1.5  # the trend stays


def test_band_kernels_split_over_threads_equal_the_single_pass():
    """A large band (≥ PARALLEL_MIN_BAND, e.g. 1024² fields) is split into chunks handled by
    threads: the Newton moments and the wave correlation must equal the single pass (the sums
    in another order: 1e-9 relative), Z element for element exactly."""
    from scherzer.processing.focal.kernels import (
        PARALLEL_MIN_BAND,
        band_chunks,
        newton_moments,
        over_chunks,
        wave_correlation,
    )

    band = ring_band(512, 0.35)
    m = band.size
    assert m >= PARALLEL_MIN_BAND and band_chunks(m)[-1][1] == m
    assert band_chunks(100) == [(0, 100)]  # small bands: one pass
    corr = Correlator(band)
    rng = np.random.default_rng(3)
    cplx = lambda: (rng.normal(size=m) + 1j * rng.normal(size=m)).astype(np.complex64)  # noqa: E731
    z = cplx()
    chunks = [(0, m // 3), (m // 3, m)]  # two threads, whatever the machine's core count
    args = (z, 0.3, -1.7, corr.fy, corr.fx, corr.iy, corr.ix, *corr.moments_g)
    one = np.array(newton_moments(*args, 0, m))
    split = np.sum(over_chunks(lambda a, b: newton_moments(*args, a, b), chunks), axis=0)
    np.testing.assert_allclose(split, one, rtol=1e-9, atol=1e-9 * np.abs(one).max())
    phi, quad, spec = cplx(), cplx() * np.float32(0.01), cplx()
    real = lambda: rng.uniform(0.5, 1.0, m).astype(np.float32)  # noqa: E731
    amp, camera, mw = real(), real(), real()
    x = rng.uniform(-3, 3, (2, m)).astype(np.float32)
    wargs = (phi, band.conj_neg(phi), amp, np.cos(x), np.sin(x), band.neg32, camera, quad, mw,
             spec, 0.5)  # fmt: skip
    z1, z2 = np.empty((2, m), np.complex64), np.empty((2, m), np.complex64)
    n1 = wave_correlation(*wargs, z1, 0, m)
    n2 = np.sum(over_chunks(lambda a, b: wave_correlation(*wargs, z2, a, b), chunks), axis=0)
    np.testing.assert_array_equal(z2, z1)
    np.testing.assert_allclose(n2, n1, rtol=1e-9)


def test_images_on_threads_give_the_serial_result(weak_phase_noise_free, monkeypatch):
    """The images of a pass matched on two threads (``problem.IMAGE_THREADS``), whose kernels
    then run their band chunks one after the other: the same registration, bit for bit, as one
    thread (the serial loop)."""
    from scherzer.processing.focal import kernels, problem

    st = weak_phase_noise_free
    params = FocalParams(reference=2, max_delocalisation=None)
    regs = []
    for threads in (1, 2):
        monkeypatch.setattr(problem, "IMAGE_THREADS", threads)
        regs.append(register_focal_series(st, OPTICS, params))
    serial, threaded = regs
    for name in ("defocus_nm", "shifts_px", "peak_heights"):
        np.testing.assert_array_equal(getattr(threaded, name), getattr(serial, name))
    assert threaded.astigmatism_nm == serial.astigmatism_nm
    # a band split over the pool and the same chunks on an image thread: equal sums, and on the
    # image thread the chunks do not go to the band pool
    import threading

    chunks = [(0, 3), (3, 10)]
    x = np.linspace(0.1, 1.0, 10) ** 3
    names: list[str] = []

    def part(a: int, b: int) -> float:
        names.append(threading.current_thread().name)
        return float(x[a:b].sum())

    pooled = kernels.over_chunks(part, chunks)
    assert all(n.startswith("focal-band") for n in names)
    names.clear()
    inline = problem.map_images(lambda i: kernels.over_chunks(part, chunks), [0, 1])
    assert inline == [pooled, pooled]
    assert len(names) == 4 and not any(n.startswith("focal-band") for n in names)
