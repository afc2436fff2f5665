"""Focal-series registration and restoration against independent physics: an abTEM series.

tests/data/abtem_srtio3_edge_8cells_11x256.npz (900 kB) was made once by
``.venv-bench/bin/python benchmarks/crosscheck_abtem.py --focal-series testdata --focal-out …``
(abTEM 1.0.11, ase 3.29, seed 0): abTEM's Kirkland potential, multislice and CTF with an
incoherent focal-spread integral on a 512² field, cropped to 256² (tests/focal_abtem_metrics.py
has the parameters and loads it). Only the atom positions are ours. An 8-cell (3.1 nm) SrTiO3
[001] crystal scatters dynamically, so the one-object-term model of registration and restoration
does not hold on its Bragg spots: the registration must say so and fall back to a fit that holds.

Measured (2 cores): relative defocus RMS 1.24 nm without the fallback (the per-image estimates
share a −2 % step-scale trend), 0.23 nm with it; absolute RMS 0.68 → 0.26 nm; series spot
residual 20× the noise (a weak-phase film: 0.9); phase correlation with the true exit wave on the
band the series transfers 0.973 (linear restoration; 0.967 with the true parameters); on
the whole 8 nm⁻¹ disc 0.793 (0.718 with the true parameters).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from focal_abtem_metrics import (
    load_series,
    phase_correlation,
    registration_errors,
    transferred_phase_correlation,
)
from test_focal import angle_diff_deg
from test_restoration import synthetic_series

from scherzer.processing.focal import (
    FocalParams,
    instrument_from_stack,
    register_focal_series,
    restore_stack,
)
from scherzer.processing.focal.misfit import MAX_SPOT_RATIO


@pytest.fixture(scope="module")
def series():
    st = load_series()
    optics, _, nominal = instrument_from_stack(st)
    return st, optics, nominal


def _register(series, **kw):
    st, optics, nominal = series
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = register_focal_series(st, optics, FocalParams(**kw), nominal_defocus_nm=nominal)
    return reg, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def registered(series):
    return _register(series)


def test_thick_crystal_misfit_is_detected_reported_and_the_fallback_meets_the_issue(registered):
    """Issue #15's goals for an 8-cell crystal: relative defocus ≤ 0.3 nm RMS, absolute ≤ 0.8 nm
    RMS; A1 within 0.5 nm and 5°; the misfit in the JSON, per image and as a warning."""
    reg, messages = registered
    st = load_series()
    err = registration_errors(reg, st)
    assert err["relative_rms_nm"] <= 0.3, err
    assert err["absolute_rms_nm"] <= 0.8, err
    assert abs(reg.astigmatism_nm - 4.0) <= 0.5 and angle_diff_deg(reg.astigmatism_deg, 30.0) <= 5
    assert err["drift_rms_px"] <= 0.2, err  # 6 counts per pixel on a 5 nm field: 0.125 seen
    fit = reg.to_json()["model_fit"]
    assert fit["fits"] is False and fit["series_spot_ratio"] > 5 * MAX_SPOT_RATIO, fit
    assert 1.02 <= fit["fallback"]["step_scale"] <= 1.04, fit  # truth 1.03
    images = reg.to_json()["images"]
    assert all(im["spot_residual_ratio"] > MAX_SPOT_RATIO for im in images if im["used"])
    assert all(0.0 < im["model_residual"] < 1.0 for im in images)
    assert any("does not fit the Bragg spots" in m for m in messages), messages


def test_the_fallback_beats_reporting_only(series, registered):
    """Without the fallback the per-image estimates keep their shared step-scale trend (1.24 nm
    RMS seen); the step scale fitted on the spots removes most of it (0.23 nm)."""
    st = series[0]
    reg, _ = registered
    plain, messages = _register(series, model_fallback=False)
    assert "fallback" not in plain.to_json()["model_fit"]
    assert any("reported only" in m for m in messages), messages
    with_fb = registration_errors(reg, st)["relative_rms_nm"]
    without = registration_errors(plain, st)["relative_rms_nm"]
    assert with_fb <= 0.5 * without, (with_fb, without)


def test_restored_wave_matches_abtem_on_the_transferred_band(series, registered):
    """The linear restoration at the registered parameters against abTEM's exit wave, low-passed
    to 8 nm⁻¹: ≥ 0.95 on the frequencies some image transfers as phase (0.973 seen); the whole
    disc also holds the crystal's mean-inner-potential step at k < 0.33 nm⁻¹, which no image
    of the series transfers (0.793 seen): ≥ 0.65 there, and the non-linear refinement must not
    lose either."""
    st, optics, _ = series
    reg, _ = registered
    r = reg.reference_index
    lin = restore_stack(st, reg, optics)
    nl = restore_stack(st, reg, optics, iterations=2)
    t_lin = transferred_phase_correlation(lin.wave, st, r)
    t_nl = transferred_phase_correlation(nl.wave, st, r)
    assert t_lin >= 0.95 and t_nl >= t_lin - 0.01, (t_lin, t_nl)
    full = phase_correlation(lin.wave, st, r)
    assert full >= 0.65 and phase_correlation(nl.wave, st, r) >= full - 0.01
    assert nl.residual_history[-1] <= nl.residual_history[0]


def test_incoherent_quadratic_correction_restores_the_crystal_better(series, registered):
    """The quadratic correction averaged over the focal spread incoherently (abTEM integrates
    the focal spread incoherently, as a lens does): phase correlation with the true exit wave
    (8 nm⁻¹) ≥ 0.77 at the registered parameters (0.793 seen; the quasi-coherent correction
    gave 0.748) and ≥ 0.70 at the true ones (0.718; quasi-coherent 0.684)."""
    from scherzer.processing.restoration import restore_exit_wave

    st, optics, _ = series
    reg, _ = registered
    r = reg.reference_index
    assert phase_correlation(restore_stack(st, reg, optics, iterations=0).wave, st, r) >= 0.77
    gt = st.ground_truth
    true = restore_exit_wave(
        st.frames, optics, float(st.pixel_size_nm[1]), gt["defocus_nm"],
        gt["shifts_px"] - gt["shifts_px"][r], astigmatism=(gt["a1_nm"], gt["a1_deg"]),
        dose_weights=np.ones(st.n_frames), iterations=0,
    )  # fmt: skip
    assert phase_correlation(true.wave, st, r) >= 0.70


def test_the_model_fits_a_weak_phase_film():
    """A weak-phase object imaged by the model itself: the spot residual is noise (0.93 seen),
    nothing is reported as a misfit and no fallback runs."""
    st = synthetic_series(
        "weak_phase", n=9, size=128, start_nm=-100.0, step_nm=10.0, step_error_fraction=0.03,
        dose_e_per_A2=500.0, a1_nm=2.0, a1_deg=30.0, seed=1,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a misfit warning would fail here
        reg = register_focal_series(st, st.optics, FocalParams())
    fit = reg.to_json()["model_fit"]
    assert fit["fits"] is True and "fallback" not in fit, fit
    assert 0.5 <= fit["series_spot_ratio"] <= MAX_SPOT_RATIO, fit
    assert np.all(np.isfinite(reg.defocus_nm))
