"""Focal-series registration: accuracy against ground truth, bad input, plots.

Series come from ``synthetic_series`` (tests/test_restoration.py: a known periodic exit wave
through scherzer.optics.image_intensity, Fourier-shift drift, Poisson noise) and, where noted,
from the project's simulator (scherzer.simulators.hrtem: multislice specimens, a camera, a
margin field). Tolerances are the issue's: relative defocus RMS ≤ 0.3 nm, drift RMS ≤ 0.05 px,
absolute defocus within 1 nm, |A1| within 0.5 nm and its angle within 5°.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_restoration import band_limited_phase_error, fourier_shift, synthetic_series

from scherzer.optics import Optics
from scherzer.processing.focal import (
    FocalParams,
    instrument_from_stack,
    plot_registration,
    register_focal_series,
    restore_exit_wave,
    restore_stack,
    structure_image,
)
from scherzer.stack import FrameRecord, ImageStack


def errors(reg, st):
    """(relative defocus RMS nm, drift RMS px, max absolute defocus error nm)."""
    gt = st.ground_truth
    r = reg.reference_index
    rel_true = gt["defocus_nm"] - gt["defocus_nm"][r]
    sh_true = gt["shifts_px"] - gt["shifts_px"][r]
    rel = float(np.sqrt(np.mean((reg.relative_defocus_nm - rel_true) ** 2)))
    drift = float(np.sqrt(np.mean((reg.shifts_px - sh_true) ** 2)))
    absolute = float(np.max(np.abs(reg.defocus_nm - gt["defocus_nm"])))
    return rel, drift, absolute


def angle_diff_deg(a, b):
    """Difference of two-fold angles (period 180°)."""
    return abs((a - b + 90.0) % 180.0 - 90.0)


def assert_issue_tolerances(reg, st, a1=(2.0, 30.0), rel_tol=0.3, label=None):
    """The issue's tolerances against ground truth: relative defocus RMS ≤ ``rel_tol`` (0.3 nm),
    drift RMS ≤ 0.05 px, absolute defocus within 1 nm, |A1| within 0.5 nm and (if A1 > 0) its
    angle within 5°."""
    rel, drift, absolute = errors(reg, st)
    assert rel <= rel_tol, (label, rel, reg.relative_defocus_nm)
    assert drift <= 0.05, (label, drift)
    assert absolute <= 1.0, (label, absolute)
    assert abs(reg.astigmatism_nm - a1[0]) <= 0.5, (label, reg.astigmatism_nm, a1)
    if a1[0] > 0:
        assert angle_diff_deg(reg.astigmatism_deg, a1[1]) <= 5.0, (label, reg.astigmatism_deg)


CASES = {
    # kind, dose, step error, A1 (nm, deg)
    "weak_phase_500": ("weak_phase", 500.0, 0.03, (2.0, 30.0)),
    "weak_phase_1000_no_a1": ("weak_phase", 1000.0, -0.04, (0.0, 0.0)),
    "crystal_edge_under_film_500": ("crystal_edge", 500.0, 0.03, (1.5, 120.0)),
    "strong_phase_1000": ("strong_phase", 1000.0, 0.02, (2.0, 75.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_registration_accuracy(case):
    kind, dose, step_err, (a1, a1_deg) = CASES[case]
    st = synthetic_series(
        kind,
        n=9,
        size=256,
        start_nm=-100.0,
        dose_e_per_A2=dose,
        step_error_fraction=step_err,
        a1_nm=a1,
        a1_deg=a1_deg,
        drift_px_per_frame=(0.9, -0.6),
        seed=7,
    )
    reg = register_focal_series(st, st.optics)
    assert_issue_tolerances(reg, st, (a1, a1_deg))
    assert reg.used.all() and not reg.flagged.any()
    assert 0.0 <= reg.astigmatism_deg < 180.0


LOW_DOSE = {
    "crystal_edge": pytest.param("crystal_edge", 7, (0.9, -0.6)),
    "strong_phase": pytest.param("strong_phase", 7, (0.9, -0.6)),
    # an 0.08-rad weak-phase film at 100 e/Å² (4 e/px): 0.44 nm before the weak registration
    # prior and the per-image delocalisation limit (FocalParams), now within 0.3 nm
    "weak_phase": pytest.param("weak_phase", 7, (0.9, -0.6)),
    # the benchmark's series: drift 0.052 px (over the limit) before the final shift
    # refinement against the restoration-prior prediction (FocalParams.shift_prior_scale);
    # measured after: 0.039 px
    "weak_phase_benchmark": pytest.param("weak_phase", 1, (0.7, -0.4)),
}


@pytest.mark.parametrize(("kind", "seed", "drift_px"), list(LOW_DOSE.values()), ids=list(LOW_DOSE))
def test_registration_at_100_e_per_A2(kind, seed, drift_px):
    """100 e/Å² (4 electrons per 0.02-nm pixel): 11 images of 512²."""
    st = synthetic_series(
        kind,
        n=11,
        size=512,
        start_nm=-100.0,
        dose_e_per_A2=100.0,
        step_error_fraction=0.03,
        a1_nm=2.0,
        a1_deg=30.0,
        drift_px_per_frame=drift_px,
        seed=seed,
    )
    # a strong pure-phase object: the weak-phase absolute fit is refined by minimum amplitude
    # variance of the full wave (without it: 1.24 nm absolute error at this dose)
    params = FocalParams(pure_phase_refinement=kind == "strong_phase")
    reg = register_focal_series(st, st.optics, params)
    assert_issue_tolerances(reg, st)


def test_simulator_amorphous_carbon_series():
    """The project's simulator: multislice a-C film, camera (MTF, offset), margin field.

    Absolute defocus: the weak-phase (minimum amplitude contrast) criterion finds the plane
    where the wave is most nearly a pure phase object, the film's mid-plane; the simulator's
    true defocus refers to its exit surface, t/2 downstream. So without the thickness the
    estimate is compared with true + t/2 (seen: +0.87 nm for t = 2 nm and +2.8 nm for t = 6 nm,
    i.e. it is this plane); with ``thickness_nm`` it is the exit surface, compared with the
    truth.
    """
    from scherzer.simulators.hrtem import simulate_focal_series
    from scherzer.simulators.specimen import Specimen, amorphous_film

    t_nm = 2.0
    field_A = (256 + 2 * 32) * 0.2
    pos = amorphous_film((field_A, field_A), t_nm * 10.0, np.random.default_rng(3))
    film = Specimen("a-C", pos, np.full(len(pos), 6), (field_A, field_A), t_nm * 10.0, True)
    st = simulate_focal_series(
        film,
        n=9,
        size=256,
        start_nm=-100.0,
        step_nm=10.0,
        step_error_fraction=0.03,
        dose_e_per_A2=1000.0,
        a1_nm=2.0,
        a1_deg=30.0,
        seed=3,
    )
    optics, _, nominal = instrument_from_stack(st)
    reg = register_focal_series(st, optics, FocalParams(), nominal_defocus_nm=nominal)
    rel, drift, _ = errors(reg, st)
    assert rel <= 0.3, rel
    assert drift <= 0.05, drift
    mid_plane = st.ground_truth["defocus_nm"] + t_nm / 2
    assert np.max(np.abs(reg.defocus_nm - mid_plane)) <= 1.0, reg.defocus_nm - mid_plane
    # with the thickness known, the absolute defocus refers to the exit surface (the truth's
    # plane and the restored exit wave's; seen: max error 0.45 nm)
    exit_reg = register_focal_series(st, optics, FocalParams(thickness_nm=t_nm))
    exit_err = np.max(np.abs(exit_reg.defocus_nm - st.ground_truth["defocus_nm"]))
    assert exit_err <= 1.0, exit_err
    assert np.allclose(exit_reg.defocus_nm, reg.defocus_nm - t_nm / 2, atol=0.05)
    assert abs(reg.astigmatism_nm - 2.0) <= 0.5
    assert angle_diff_deg(reg.astigmatism_deg, 30.0) <= 5.0
    # the pipeline's restore step: camera offset removed, registration applied
    res = restore_stack(st, reg, optics)
    r = reg.reference_index
    truth = st.ground_truth["exit_wave"]
    s_ref = np.asarray(st.ground_truth["shifts_px"][r])[None]
    truth = (
        fourier_shift(truth.real[None], s_ref)[0] + 1j * fourier_shift(truth.imag[None], s_ref)[0]
    )
    err = band_limited_phase_error(res.wave, truth, optics, 0.02)
    raw = restore_exit_wave(st.frames, optics, 0.02, reg.defocus_nm, reg.shifts_px)
    assert err <= 0.05 and err < band_limited_phase_error(raw.wave, truth, optics, 0.02)


def simulator_crystal_edge(size=512, dose=500.0, n=11):
    """The simulator's crystal edge (3 nm SrTiO3 [001] under 2 nm a-C, multislice, camera MTF),
    ``n`` images, start −100 nm, step 10 nm (real one 3 % larger), A1 2 nm at 30°; and its MTF
    (also the benchmark's --simulator series)."""
    from scherzer.simulators.detector import CameraModel
    from scherzer.simulators.hrtem import simulate_focal_series

    st = simulate_focal_series(
        "crystal_edge",
        n=n,
        size=size,
        start_nm=-100.0,
        step_nm=10.0,
        step_error_fraction=0.03,
        dose_e_per_A2=dose,
        a1_nm=2.0,
        a1_deg=30.0,
    )
    return st, CameraModel(**st.instrument["camera"]).mtf_2d((size, size))


@pytest.mark.parametrize(
    ("dose", "refs", "rel_tol"), [(500.0, (None, 8), 0.2), (100.0, (None,), 0.3)]
)
def test_simulator_crystal_edge_drift_absolute_defocus_and_a1(dose, refs, rel_tol):
    """The simulator's crystal edge, 11 × 512², for the default reference and another one.

    Relative defocus, before → after the automatic wide taper, spot clipping and whitening of
    non-periodic fields (FocalParams.for_field): 500 e/Å² 0.29 → 0.10 nm (reference 6), 0.13
    nm (reference 8); 100 e/Å² 0.35 → 0.18 nm. Hence 0.2 nm asserted at 500 e/Å² (the
    issue's 0.3 nm at 100 e/Å²). Its 3 nm SrTiO3 fails the one-object-term model on the Bragg
    spots (residual 42× the noise at 500 e/Å²), so the step scale comes from the spots
    (focal.misfit): 500 e/Å², default reference, 0.10 → 0.054 nm.
    """
    st, mtf = simulator_crystal_edge(512, dose)
    for ref in refs:
        reg = register_focal_series(st, st.optics, FocalParams(reference=ref), mtf=mtf)
        assert_issue_tolerances(reg, st, rel_tol=rel_tol, label=ref)


def test_simulator_crystal_edge_256_is_better_but_short_of_the_issue():
    """The same crystal edge on a 256² field (5 nm): NOT within the issue's 0.3 nm / 0.05 px
    (the delocalised border and the strong SrTiO3 spots dominate so small a field). A guard
    of the gain from FocalParams.for_field (no delocalisation limit on small non-periodic
    fields): before rel. 1.17 nm, drift 0.092 px, absolute 2.8 nm; measured after 0.36 nm,
    0.067 px, 0.69 nm (0.063 px with the camera NPS given); with the thick-crystal fallback
    (focal.misfit, spot residual 24–29× the noise) relative 0.16 nm."""
    st, mtf = simulator_crystal_edge(256, 500.0)
    reg = register_focal_series(st, st.optics, FocalParams(), mtf=mtf)
    rel, drift, absolute = errors(reg, st)
    assert rel <= 0.5, rel
    assert drift <= 0.075, drift
    assert absolute <= 1.0, absolute


def test_edge_discontinuity_tells_a_cropped_field_from_a_periodic_one():
    """The automatic settings of FocalParams.for_field hinge on this: the simulator's crop of
    a larger specimen vs the periodic synthetic series (measured 1.40 vs 1.02 at 500 e/Å²)."""
    from scherzer.processing.focal import NONPERIODIC_EDGE_RATIO, edge_discontinuity

    st, _ = simulator_crystal_edge(256, 500.0)
    periodic = synthetic_series("crystal_edge", n=5, size=256, dose_e_per_A2=500.0, seed=7)
    assert edge_discontinuity(st.frames - 100.0) > NONPERIODIC_EDGE_RATIO
    assert edge_discontinuity(periodic.frames) < NONPERIODIC_EDGE_RATIO
    auto = FocalParams().for_field(st.frames)
    assert auto.clip_spots_wave > 0 and auto.whiten > 0
    assert FocalParams().for_field(periodic.frames).taper_px == 12


def simulator_crystal_series(
    name, thickness_nm, size=256, a1=(2.0, 30.0), seed=1, n=9, dose_e_per_A2=1000.0
):
    """The simulator's crystal-only field (multislice, camera): ``n`` images, start −100 nm,
    nominal step 10 nm with the real one 3 % larger, drift (0.9, −0.6) px/image + 0.3 px
    jitter (also the benchmark's --crystal series)."""
    from scherzer.simulators.hrtem import simulate_focal_series
    from scherzer.simulators.specimen import make_specimen

    margin = 32  # simulate_focal_series' margin for this drift: the specimen spans the field
    spec = make_specimen(name, ((size + 2 * margin) * 0.02,) * 2, thickness_nm=thickness_nm)
    st = simulate_focal_series(
        spec,
        n=n,
        size=size,
        start_nm=-100.0,
        step_nm=10.0,
        step_error_fraction=0.03,
        dose_e_per_A2=dose_e_per_A2,
        a1_nm=a1[0],
        a1_deg=a1[1],
        drift_px_per_frame=(0.9, -0.6),
        seed=seed,
    )
    assert st.metadata["margin_px"] == margin
    return st


def test_simulator_crystal_only_srtio3_registration_absolute_defocus_and_a1():
    """SrTiO3 [001], 1 nm, no amorphous area (FocalParams(crystal=True)): drift chained image
    to image (sign-free), one step scale fitted on the Bragg spots, absolute defocus at the exit
    surface from ψ − 1 = c·R (channelling), A1 from rings of equal |g|.

    Measured: rel. 0.15 nm, drift 0.026 px, absolute 0.39 nm, A1 1.99 nm at 28.7°. (Before
    the crystal mode: rel. 6.9 nm, drift 12.7 px, absolute 19 nm.)"""
    st = simulator_crystal_series("srtio3_001", 1.0)
    optics, _, nominal = instrument_from_stack(st)
    reg = register_focal_series(st, optics, FocalParams(crystal=True), nominal_defocus_nm=nominal)
    assert_issue_tolerances(reg, st)
    assert not reg.flagged.any()


def test_simulator_crystal_only_srtio3_512_drift_chain():
    """The benchmark's crystal case (benchmarks/focal.py --crystal srtio3_001): SrTiO3 [001]
    1 nm, 11 × 512², 500 e/Å². Its low band holds only {110}-type reflections, whose squared
    correlation repeats every quarter lattice vector of the drift; the drift chain took the
    highest of those equivalent peaks and was 17 px off (rel. 2.4 nm). Measured with the
    nearest strong peak: rel. 0.035 nm, drift 0.016 px, absolute 0.07 nm."""
    st = simulator_crystal_series("srtio3_001", 1.0, size=512, n=11, dose_e_per_A2=500.0)
    reg = register_focal_series(st, st.optics, FocalParams(crystal=True))
    assert_issue_tolerances(reg, st)


def test_simulator_crystal_only_si110_drift_absolute_defocus_and_a1():
    """Si [110], 2 nm, crystal-only: a rectangular lattice, so rings of equal |g| cannot fix
    both A1 components and the joint free-phase fit is used (recorded in the history).

    Measured: rel. 0.14 nm, drift 0.035 px, absolute 0.42 nm, A1 1.91 nm at 31.7° (rel. 0.40
    nm with the delocalisation limit applied to all images at once)."""
    st = simulator_crystal_series("si_110", 2.0)
    optics, _, nominal = instrument_from_stack(st)
    reg = register_focal_series(st, optics, FocalParams(crystal=True), nominal_defocus_nm=nominal)
    assert_issue_tolerances(reg, st)
    methods = {h.get("a1_method") for h in reg.history} - {None}
    assert methods == {"joint free phase (rings ill-conditioned)"}, methods


def test_simulator_crystal_only_structure_image_start_defocus():
    """structure_image(crystal=True) on the simulator's SrTiO3 [001] 1 nm, drift, step +3 %,
    A1 2 nm at 30°: start defocus (exit surface) within 1 nm and A1 within 0.5 nm / 5°.
    Measured: start −0.39 nm off, A1 1.99 nm at 28.7°."""
    st = simulator_crystal_series("srtio3_001", 1.0)
    optics, _, _ = instrument_from_stack(st)
    res = structure_image(st, optics, 10.0, start_range_nm=(-115.0, -85.0), crystal=True)
    assert res.method == "crystal"
    assert abs(res.start_defocus_nm - st.ground_truth["defocus_nm"][0]) <= 1.0
    assert abs(res.astigmatism_nm - 2.0) <= 0.5, res.astigmatism_nm
    assert angle_diff_deg(res.astigmatism_deg, 30.0) <= 5.0, res.astigmatism_deg
    assert res.image.shape == (256, 256) and res.image.dtype == np.float32


@pytest.mark.parametrize(
    ("name", "thickness_nm", "a1_nm"), [("srtio3_001", 1.0, 0.0), ("si_110", 2.0, 2.0)]
)
def test_sector_a1_of_a_crystal_is_honest(name, thickness_nm, a1_nm):
    """QFocus-like phase agreement on a thin crystal: the start defocus within 1 nm; A1 by
    sectors either determined (then within 0.5 nm / 5° of the truth, with its 1σ uncertainty
    ≤ 0.5 nm) or reported as undetermined with A1 = 0 — never an invented value. (Before: ≈
    1.2 nm found where the truth is 0.) Measured: SrTiO3 0.14 ± 1.3 nm → undetermined;
    Si [110] too few sectors with signal → undetermined."""
    st = simulator_crystal_series(name, thickness_nm, a1=(a1_nm, 30.0))
    optics, _, _ = instrument_from_stack(st)
    res = structure_image(st, optics, 10.0, start_range_nm=(-115.0, -85.0))
    assert abs(res.start_defocus_nm - st.ground_truth["defocus_nm"][0]) <= 1.0
    if res.astigmatism_determined:
        assert res.astigmatism_uncertainty_nm <= 0.5
        assert abs(res.astigmatism_nm - a1_nm) <= 0.5, res.astigmatism_nm
        if a1_nm > 0:
            assert angle_diff_deg(res.astigmatism_deg, 30.0) <= 5.0
    else:
        assert res.astigmatism_nm == 0.0
        assert not res.astigmatism_uncertainty_nm <= 0.5  # NaN (no fit) or too large


def test_a_blank_frame_is_flagged_and_not_used():
    st = synthetic_series("weak_phase", n=8, size=128, dose_e_per_A2=1000.0, seed=8)
    frames = st.frames.copy()
    frames[2] = np.random.default_rng(0).poisson(frames.mean(), frames[2].shape)
    reg = register_focal_series(st.with_frames(frames), st.optics)
    assert reg.flagged[2] and not reg.used[2]
    assert reg.peak_heights[2] < 0.5 * np.delete(reg.peak_heights, 2).min()
    assert reg.flagged.sum() == 1


def test_reference_exclusion_table_and_json(tmp_path):
    st = synthetic_series("weak_phase", n=7, size=128, dose_e_per_A2=None, seed=9)
    reg = register_focal_series(st, st.optics, FocalParams(reference=2, exclude=(5,)))
    assert reg.reference_index == 2
    assert reg.relative_defocus_nm[2] == 0.0 and np.all(reg.shifts_px[2] == 0.0)
    assert not reg.used[5] and reg.used.sum() == 6
    table = reg.table()
    assert table.dtype.names == (
        "index",
        "nominal_defocus_nm",
        "fitted_defocus_nm",
        "shift_y_px",
        "shift_x_px",
        "peak_height",
        "used",
    )
    assert table["used"].tolist() == reg.used.tolist()
    js = reg.to_json()
    assert set(js) == {
        "reference_index",
        "defocus_nm",
        "relative_defocus_nm",
        "shifts_px",
        "peak_heights",
        "astigmatism_nm",
        "astigmatism_deg",
        "seconds",
        "suspect_below",
        "images",
        "absolute_model_agreement",
        "absolute_model_fits",
        "model_fit",
    }
    assert len(js["shifts_px"]) == 7 and len(js["shifts_px"][0]) == 2
    # per image as FTSR prints it: defocus, drift, peak, suspect below 0.01
    assert js["suspect_below"] == 0.01 and len(js["images"]) == 7
    five = js["images"][5]
    assert five["index"] == 5 and five["used"] is False and five["drift_px"] == js["shifts_px"][5]
    assert five["defocus_nm"] == js["defocus_nm"][5] and five["peak"] == js["peak_heights"][5]
    assert [im["suspect"] for im in js["images"]] == [p < 0.01 for p in js["peak_heights"]]
    paths = plot_registration(reg, tmp_path)
    assert [p.name for p in paths] == ["focus_vs_index.png", "peak_heights.png", "drift.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_default_reference_is_interior_near_scherzer():
    """The reference rule (issue #15): never the first or last image unless the user insists
    (then a warning); by default an interior image near Scherzer. Here the image nearest
    Scherzer (−39.7 nm) is the last (−40 nm)."""
    st = synthetic_series("weak_phase", n=7, size=128, start_nm=-100.0, dose_e_per_A2=None)
    reg = register_focal_series(st, st.optics, FocalParams(iterations=1, absolute="none"))
    sch = st.optics.scherzer_defocus_nm()
    nominal = -100.0 + 10.0 * np.arange(7)
    assert 0 < reg.reference_index < 6
    assert abs(nominal[reg.reference_index] - sch) <= 2.5 * 10.0
    with pytest.warns(UserWarning, match="first or last"):
        forced = register_focal_series(
            st, st.optics, FocalParams(reference=6, iterations=1, absolute="none")
        )
    assert forced.reference_index == 6


@pytest.mark.parametrize(("seed", "dose"), [(8, 200.0), (11, 300.0)])
def test_reference_rule_when_the_last_image_is_nearest_scherzer(seed, dose):
    """7 × 256² from −100 nm in 10-nm steps (3 % off): the last image is nearest Scherzer.
    The default reference is interior (the candidate near Scherzer whose neighbours match it
    best) and its relative defocus RMS is no worse than either hand-picked interior reference
    next to Scherzer (5: the nearest interior, 4). Measured (rel. RMS nm, default / 4 / 5 / the
    last): seed 8 0.101 / 0.101 / 0.465 / 0.631; seed 11 0.124 / 0.124 / 0.538 / —. (Seed 9 at
    100 e/Å² picks 5, which fails at this dose — a known limit of the peak rule.)"""
    st = synthetic_series(
        "weak_phase", n=7, size=256, start_nm=-100.0, dose_e_per_A2=dose,
        step_error_fraction=0.03, a1_nm=1.0, a1_deg=40.0, seed=seed,
    )  # fmt: skip
    auto = register_focal_series(st, st.optics)
    assert 0 < auto.reference_index < 6
    rel_auto = errors(auto, st)[0]
    for hand in (4, 5):
        rel_hand = errors(register_focal_series(st, st.optics, FocalParams(reference=hand)), st)[0]
        assert rel_auto <= rel_hand + 1e-9, (hand, rel_auto, rel_hand)


def test_structure_image_start_defocus_of_a_crystal_only_field():
    st = synthetic_series(
        "crystal", n=9, size=256, start_nm=-96.0, dose_e_per_A2=1000.0, a1_nm=0.0, seed=10
    )
    res = structure_image(st, st.optics, 10.0, start_range_nm=(-110.0, -85.0))
    assert abs(res.start_defocus_nm - st.ground_truth["defocus_nm"][0]) <= 1.0
    assert res.image.shape == (256, 256) and res.image.dtype == np.float32
    # atoms bright in the structure image: it correlates with the projected potential (the
    # exit-wave phase moved to the reference frame's position)
    s_ref = st.ground_truth["shifts_px"][res.reference_index][None]
    phase = fourier_shift(np.angle(st.ground_truth["exit_wave"])[None], s_ref)[0]
    c = np.corrcoef(res.image.ravel(), phase.ravel())[0, 1]
    assert c > 0.5, c


def test_registration_phase_agreement_on_a_crystal_only_field():
    st = synthetic_series("crystal", n=9, size=256, start_nm=-100.0, dose_e_per_A2=1000.0, seed=11)
    reg = register_focal_series(st, st.optics, FocalParams(absolute="phase_agreement"))
    _, _, absolute = errors(reg, st)
    assert absolute <= 1.0, absolute


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
def _stack(n=5, nominal=None, optics=True, pixel=(0.02, 0.02)):
    rng = np.random.default_rng(0)
    nominal = -50.0 + 10.0 * np.arange(n) if nominal is None else np.asarray(nominal)
    recs = [FrameRecord(index=i, defocus_nominal_nm=float(nominal[i])) for i in range(n)]
    inst = {"optics": Optics(voltage_kv=300, cs_mm=0.6).model_dump()} if optics else {}
    return ImageStack(
        frames=rng.poisson(50.0, (n, 64, 64)).astype(np.float32),
        pixel_size_nm=pixel,
        records=recs,
        instrument=inst,
    )


def test_too_few_images():
    with pytest.raises(ValueError, match="at least 3 images; got 2"):
        register_focal_series(_stack(2), Optics(cs_mm=0.6))
    with pytest.raises(ValueError, match="at least 3 images; 2 left"):
        register_focal_series(_stack(4), Optics(cs_mm=0.6), FocalParams(exclude=(0, 3)))


def test_non_monotonic_and_missing_defocus():
    with pytest.raises(ValueError, match=r"monotonic.*frames \[3\]"):
        register_focal_series(_stack(5, [-50, -40, -30, -35, -20]), Optics(cs_mm=0.6))
    with pytest.raises(ValueError, match=r"missing \(NaN\) for frames \[1\]"):
        register_focal_series(_stack(4, [-50, math.nan, -30, -20]), Optics(cs_mm=0.6))


def test_bad_reference_and_exclusions():
    with pytest.raises(ValueError, match="reference frame 9 out of range"):
        register_focal_series(_stack(5), Optics(cs_mm=0.6), FocalParams(reference=9))
    with pytest.raises(ValueError, match="reference frame 1 cannot be excluded"):
        register_focal_series(_stack(5), Optics(cs_mm=0.6), FocalParams(reference=1, exclude=[1]))
    with pytest.raises(ValueError, match="excluded frame 7 out of range"):
        register_focal_series(_stack(5), Optics(cs_mm=0.6), FocalParams(exclude=[7]))


def test_instrument_from_stack_names_every_missing_parameter():
    st = _stack(4, [-50, math.nan, -30, -20], optics=False, pixel=(1.0, 1.0))
    with pytest.raises(ValueError) as exc:
        instrument_from_stack(st)
    msg = str(exc.value)
    for word in (
        "voltage_kv",
        "cs_mm",
        "focal_spread_nm",
        "beam_divergence_mrad",
        "pixel size",
        "frames [1]",
    ):
        assert word in msg, (word, msg)
    optics, pixel, nominal = instrument_from_stack(
        st,
        voltage_kv=200.0,
        cs_mm=1.2,
        focal_spread_nm=3.0,
        beam_divergence_mrad=0.2,
        pixel_nm=0.05,
        start_nm=-60.0,
        step_nm=5.0,
    )
    assert optics.voltage_kv == 200.0 and optics.cs_mm == 1.2 and pixel == 0.05
    assert nominal.tolist() == [-60.0, -55.0, -50.0, -45.0]
    with pytest.raises(ValueError, match="both --start-nm and --step-nm"):
        instrument_from_stack(_stack(4), start_nm=-60.0)
    full = instrument_from_stack(_stack(4))
    assert full[1] == 0.02 and full[2].tolist() == [-50.0, -40.0, -30.0, -20.0]


def test_absolute_model_misfit_is_reported_on_a_thick_crystal():
    """A thick crystal registered as if it were a weak-phase object (SrTiO3 [001] 4 nm,
    crystal-only, 9 × 256²): its absolute defocus is far off (measured 6.6 nm) and the
    weak-phase model's agreement on the strongest frequencies is low (0.49) → reported as not
    fitting, in the result and its JSON; a thin film's fit is reported as fitting (0.99)."""
    st = simulator_crystal_series("srtio3_001", 4.0)
    reg = register_focal_series(st, st.optics, FocalParams())
    assert reg.absolute_model_fits is False, reg.absolute_model_agreement
    assert np.max(np.abs(reg.defocus_nm - st.ground_truth["defocus_nm"])) > 2.0
    js = reg.to_json()
    assert js["absolute_model_fits"] is False and js["absolute_model_agreement"] < 0.5
    film = synthetic_series("weak_phase", n=9, size=256, dose_e_per_A2=500.0, seed=7)
    ok = register_focal_series(film, film.optics)
    assert ok.absolute_model_fits is True and ok.absolute_model_agreement > 0.9
    none = register_focal_series(film, film.optics, FocalParams(absolute="none", iterations=1))
    assert none.absolute_model_fits is None and none.to_json()["absolute_model_agreement"] is None
