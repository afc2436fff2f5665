"""EFTEM: the simulated energy filter and the series numerics (processing/eftem.py).

One simulated series (module fixture, ~2 s): 22 energies 100–520 eV, slit 20 eV, across C K
(284 eV) and Ti L2,3 (456 eV) on a carbon film with TiO2 and Fe2O3 particles, automatic exposure,
a steady specimen drift of (0.003, −0.002) nm/s on 0.5 nm pixels; the first exposure (8 s) is
too long at 100 eV, so the series shortens it once before lengthening it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pydantic
import pytest

from scherzer.drivers.base import LimitExceeded
from scherzer.processing import eftem
from scherzer.processing.eftem.exposure import _is_power_of_two
from scherzer.simulators.energy_filter import (
    EDGES,
    VirtualEnergyFilter,
    make_eftem_specimen,
)
from scherzer.simulators.microscope import DriftModel, SimClock, VirtualMicroscope

SLIT_EV = 20.0
TI_ONSET_EV = EDGES["Ti"].onset_ev
SETTINGS = eftem.ExposureSettings(
    initial_exposure_s=8.0, low_counts=5000, high_counts=16000, target_counts=9000
)


@pytest.fixture(scope="module")
def series():
    specimen = make_eftem_specimen(
        seed=1, n_particles=25, radius_nm=(2.5, 6.0), film_thickness_nm=5.0
    )
    clock = SimClock()
    drift = DriftModel(velocity_nm_per_s=(0.003, -0.002), seed=0)
    sim = VirtualEnergyFilter(
        specimen, clock=clock, displacement_nm=drift.displacement_nm, beam_e_per_px_s=4e5, seed=3
    )
    sim.set_slit_width_ev(SLIT_EV)
    truths, raws, darks = [], [], []

    def acquire(energy_ev: float, exposure_s: float):
        sim.set_energy_offset_ev(energy_ev)
        image, _, truth = sim.acquire(exposure_s)
        truths.append(truth)
        raws.append(image)
        return image, truth["t_mid_s"]

    def acquire_dark(exposure_s: float):
        image, record, _ = sim.acquire(exposure_s, blanked=True)
        assert record.signal == "dark" and record.dose_e_per_A2 == 0.0
        darks.append((exposure_s, image))
        return image

    energies = eftem.energies_ev(100.0, 20.0, 22)
    result = eftem.acquire_series(energies, acquire, acquire_dark, SETTINGS)
    return {"sim": sim, "series": result, "truths": truths, "raws": raws, "darks": darks}


# ------------------------------------------------------------------------------ exposure
def test_exposures_are_powers_of_two_and_change_only_across_thresholds(series) -> None:
    s = series["series"]
    assert all(_is_power_of_two(t) for t in s.exposures_s)
    ratios = s.exposures_s[1:] / s.exposures_s[:-1]
    assert all(_is_power_of_two(r) for r in ratios)
    inside = (s.statistics >= SETTINGS.low_counts) & (s.statistics <= SETTINGS.high_counts)
    changed = ratios != 1.0
    assert s.retakes == 0
    assert not np.any(changed & inside[:-1]), "an exposure changed while counts were in band"
    at_bound = s.exposures_s[:-1] >= SETTINGS.max_exposure_s
    assert np.all(changed | inside[:-1] | at_bound), "counts left the band, exposure kept"
    # the series falls by orders of magnitude and rises at the C K edge: both directions occur
    assert s.exposures_s.max() / s.exposures_s.min() >= 32
    assert np.any(ratios > 1) and np.any(ratios < 1)


def test_dark_references_only_for_new_exposures(series) -> None:
    s, darks = series["series"], series["darks"]
    exposures = s.exposures_s.tolist()
    changes = int(np.sum(np.diff(s.exposures_s) != 0))
    assert s.darks_acquired == len(darks) == len(set(exposures))
    assert s.darks_acquired <= changes + 1
    assert s.darks_reused == len(exposures) - s.darks_acquired
    # each dark was taken when its exposure was first used, in that order
    first_use = list(dict.fromkeys(exposures))
    assert [t for t, _ in darks] == first_use == s.dark_exposures_s


def test_dark_cache_reuses_a_seen_exposure() -> None:
    taken = []
    cache = eftem.DarkCache(lambda t: taken.append(t) or np.full((4, 4), 100.0 + t), n_frames=2)
    for t in (1.0, 2.0, 2.0, 1.0, 4.0, 1.0):
        assert cache.get(t)[0, 0] == 100.0 + t
    assert taken == [1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # two frames averaged per reference
    assert (cache.acquired, cache.reused, cache.exposures_s()) == (3, 3, [1.0, 2.0, 4.0])


def test_next_exposure_rules() -> None:
    st = SETTINGS
    assert eftem.next_exposure(8000.0, 2.0, st) == 2.0  # inside the band
    assert eftem.next_exposure(st.low_counts - 1, 2.0, st) == 4.0
    assert eftem.next_exposure(1200.0, 2.0, st) == 16.0  # 1200·8 = 9600 nearest the target
    assert eftem.next_exposure(40000.0, 2.0, st) == 0.5
    assert eftem.next_exposure(0.0, 2.0, st) == st.max_exposure_s  # no signal: longest
    assert eftem.next_exposure(1e9, 2.0, st) == st.min_exposure_s
    image = np.full((8, 8), 100.0)
    assert eftem.next_exposure(image, st.max_exposure_s, st) == st.max_exposure_s
    rates = [20000.0 / 2**k for k in range(12)]  # falls 2× per image
    schedule = eftem.exposure_schedule(rates, dataclasses.replace(st, initial_exposure_s=0.25))
    assert all(_is_power_of_two(t) for t in schedule)
    assert schedule[0] == 0.25 and schedule[-1] > 64 * schedule[0]


def test_settings_are_validated_by_pydantic() -> None:
    adapter = pydantic.TypeAdapter(eftem.ExposureSettings)
    assert adapter.validate_python({"initial_exposure_s": 0.5}).initial_exposure_s == 0.5
    for bad in (
        {"initial_exposure_s": 0.3},  # not a power of two
        {"low_counts": 9000, "high_counts": 16000},  # band narrower than one doubling
        {"min_exposure_s": 2.0**-10, "max_exposure_s": 2.0**10},  # int32 overflow possible
        {"thresholds": 3},  # unknown key
    ):
        with pytest.raises(pydantic.ValidationError):
            adapter.validate_python(bad)
    for cls in (eftem.ThreeWindowSettings, eftem.SeriesAlignSettings):
        with pytest.raises(pydantic.ValidationError):
            pydantic.TypeAdapter(cls).validate_python({"nonsense": 1})


def test_saturated_images_are_retaken_shorter() -> None:
    st = eftem.ExposureSettings(initial_exposure_s=8.0)
    calls = []

    def acquire(energy_ev, exposure_s):
        calls.append(exposure_s)
        return np.minimum(np.full((16, 16), 100.0 + 10000.0 * exposure_s), 65535.0), 0.0

    result = eftem.acquire_series([50.0], acquire, lambda t: np.full((16, 16), 100.0), st)
    assert calls == [8.0, 4.0] and result.retakes == 1 and result.exposures_s[0] == 4.0


# ------------------------------------------------------------------------------ storage
def test_integer_storage_is_exact_and_reads_back(series) -> None:
    s, raws, darks = series["series"], series["raws"], dict(series["darks"])
    assert s.stored.dtype == np.int32
    net = np.stack(
        [r.astype(np.float64) - darks[t] for r, t in zip(raws, s.exposures_s, strict=True)]
    )
    np.testing.assert_array_equal(s.counts(), net.astype(np.float32))  # no precision lost
    np.testing.assert_allclose(s.scaled(), net * s.scale_to_first[:, None, None], rtol=1e-6)
    assert s.quantum_counts == s.exposures_s[0] / SETTINGS.max_exposure_s
    # the largest possible read-out at the shortest exposure still fits int32
    extreme = eftem.to_stored(np.array([65535.0, -65535.0]), SETTINGS.min_exposure_s, SETTINGS)
    assert extreme.dtype == np.int32 and extreme[0] == 65535 * 2**13


def test_scaled_intensities_continuous_across_exposure_changes(series) -> None:
    """Statistic: z_i = (m_i − T_i)/σ_i with m_i the field mean of image i scaled to the first
    exposure, T_i the simulator's noiseless mean scaled alike and σ_i the standard error of m_i
    from Poisson (g·counts), readout (σ_r² for image and dark) and dark shot noise. Tolerance:
    |z_i| < 5 for every image and |z_{i+1} − z_i| < 5·√2 at every exposure change (a step from
    wrong scaling would be a factor 2, thousands of σ)."""
    s, truths, sim = series["series"], series["truths"], series["sim"]
    cam, n_px = sim.camera, s.stored[0].size
    scale = s.scale_to_first
    m = s.scaled().mean(axis=(1, 2), dtype=np.float64)
    truth = np.array([t["expected_counts"].mean(dtype=np.float64) for t in truths])
    dark_e = sim.dark_e_per_px_s.mean() * s.exposures_s
    g, sr = cam.gain_counts_per_e, cam.readout_noise_counts
    var = g * truth + 2 * (g * g * dark_e + sr * sr + 1 / 12)
    z = (m - truth * scale) / (scale * np.sqrt(var / n_px))
    assert np.all(np.abs(z) < 5), z
    change = np.flatnonzero(np.diff(s.exposures_s) != 0)
    assert change.size >= 5
    assert np.all(np.abs(z[change + 1] - z[change]) < 5 * math.sqrt(2)), z


# ------------------------------------------------------------------------------ alignment, maps
@pytest.fixture(scope="module")
def aligned(series):
    s = series["series"]
    refs = eftem.pre_edge_indices(s.energies_ev, SLIT_EV, TI_ONSET_EV, min_energy_ev=300.0)
    return eftem.align_series(s.scaled(), refs, s.times_s)


def test_drift_measured_on_pre_edge_images_removed_from_all(series, aligned) -> None:
    truths, refs = series["truths"], aligned.reference_indices
    assert np.all(series["series"].energies_ev[refs] + SLIT_EV / 2 <= TI_ONSET_EV)
    true = np.array([t["shift_px"] for t in truths])
    true -= true[refs[0]]
    assert np.ptp(true, axis=0).max() > 5.0  # the drift is real: several pixels
    # statistic: |applied − true| per image after removing the mean over the series (a common
    # offset of all frames is no misregistration); tolerance 0.1 px for every image, measured
    # and extrapolated alike (8 noise seeds: 0.03–0.08 px)
    error = aligned.shifts_px - true
    residual = np.hypot(*(error - error.mean(axis=0)).T)
    assert residual.max() < 0.1, residual


def _cropped_truth(series, aligned, element: str) -> np.ndarray:
    ref = series["truths"][aligned.reference_indices[0]]["element_maps"][element]
    y0, x0 = aligned.crop_origin_px
    h, w = aligned.frames.shape[1:]
    return ref[y0 : y0 + h, x0 : x0 + w]


def test_three_window_ti_map_correlates_with_truth(series, aligned) -> None:
    s = series["series"]
    result = eftem.three_window_map(aligned.frames, s.energies_ev, SLIT_EV, TI_ONSET_EV)
    truth = _cropped_truth(series, aligned, "Ti")
    assert result.signal.dtype == np.float32 and result.signal.shape == truth.shape
    corr = np.corrcoef(result.signal.ravel(), truth.ravel())[0, 1]
    assert corr >= 0.9, corr
    # the Ti map is not the thickness map: Fe2O3 particles (no Ti) stay dark
    fe = _cropped_truth(series, aligned, "Fe")
    assert np.corrcoef(result.signal.ravel(), fe.ravel())[0, 1] < 0.2
    on, off = truth > 0.3 * truth.max(), truth == 0
    assert result.jump_ratio[on].mean() > result.jump_ratio[off].mean() + 0.2
    assert np.median(result.jump_ratio[on]) > np.percentile(result.jump_ratio[off], 95)
    assert 2.0 < float(np.median(result.exponent)) < 5.0


# ------------------------------------------------------------------------------ power law alone
def _window(e: float, w: float, a: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Closed-form ∫ A E^(−r) dE over [e − w/2, e + w/2]."""
    lo, hi = e - w / 2, e + w / 2
    return a * (lo ** (1 - r) - hi ** (1 - r)) / (r - 1)


def test_power_law_extrapolation_on_synthetic_spectra() -> None:
    """Independent of the simulator: backgrounds A·E^(−r) with r ∈ [2, 5], integrated over the
    windows in closed form, plus a known edge signal in the post-edge window."""
    rng = np.random.default_rng(7)
    r = rng.uniform(2.0, 5.0, (32, 32))
    for (e1, e2, e3), w in (((400.0, 430.0, 470.0), 20.0), ((250.0, 270.0, 300.0), 10.0)):
        a = rng.uniform(1e2, 1e5, r.shape) * e1**r / w  # 100 … 100 000 counts in window 1
        pre1, pre2, bg3 = (_window(e, w, a, r) for e in (e1, e2, e3))
        edge = rng.uniform(0.0, 1.0, a.shape) * bg3
        est, r_fit, ok = eftem.power_law_background(pre1, pre2, (e1, e2, e3), w)
        np.testing.assert_allclose(r_fit, r, rtol=1e-7)
        np.testing.assert_allclose(est, bg3, rtol=1e-7)
        np.testing.assert_allclose((bg3 + edge) - est, edge, atol=1e-6 * bg3.max())
        assert ok.all()
    # zero and negative counts (after dark subtraction) give finite, flagged values
    pre1 = np.array([[0.0, -5.0], [100.0, 50.0]])
    pre2 = np.array([[10.0, 3.0], [-1.0, 60.0]])
    est, r_fit, ok = eftem.power_law_background(pre1, pre2, (400.0, 430.0, 470.0), 20.0)
    assert np.all(np.isfinite(est)) and np.all(np.isfinite(r_fit))
    assert ok.tolist() == [[False, False], [False, False]]
    assert np.all((r_fit >= 1.0) & (r_fit <= 8.0))
    jump = eftem.jump_ratio_map(np.array([0.0, 10.0]), np.array([5.0, 20.0]))
    assert jump.dtype == np.float32 and jump.tolist() == [5.0, 2.0]


def test_edge_windows_choose_pre_and_post() -> None:
    e = eftem.energies_ev(350.0, 20.0, 8)  # 350 … 490
    assert eftem.edge_windows(e, 20.0, 456.0) == (3, 4, 6)  # 410, 430 | 470
    with pytest.raises(ValueError, match="two windows"):
        eftem.edge_windows(e[4:], 20.0, 456.0)


# ------------------------------------------------------------------------------ the simulator
def test_filter_settings_limits_and_intensity_range() -> None:
    sim = VirtualEnergyFilter(make_eftem_specimen((32, 32), seed=2), seed=0)
    with pytest.raises(LimitExceeded) as err:
        sim.set_slit_width_ev(500.0)
    assert err.value.code == "limit_exceeded" and sim.get_slit_width_ev() == 20.0
    sim.set_energy_offset_ev(400.0)
    assert sim.get_energy_offset_ev() == 400.0 and sim.is_slit_in()
    zero = sim.expected_rate(0.0, 10.0).mean()
    core = sim.expected_rate(400.0, 10.0).mean()
    assert zero / core > 1e3  # orders of magnitude across a series
    filtered, _, _ = sim.acquire(1.0)
    sim.slit_out()
    unfiltered, _, truth = sim.acquire(1.0)
    assert truth["slit_width_ev"] is None and unfiltered.mean() > 100 * filtered.mean()
    dark, record, truth = sim.acquire(4.0, blanked=True)
    assert record.signal == "dark" and np.all(truth["expected_counts"] == 0)
    expected = truth["expected_dark_counts"]
    assert abs(dark.mean() - expected.mean()) < 0.5
    assert np.all(dark == np.rint(dark))  # integer read-out


def test_filter_on_the_virtual_microscope_shares_clock_drift_and_stage() -> None:
    scope = VirtualMicroscope(
        camera_shape=(64, 64), seed=4, drift=DriftModel(velocity_nm_per_s=(0.01, 0.0))
    )
    sim = VirtualEnergyFilter.on_microscope(scope, make_eftem_specimen((32, 32), seed=4))
    sim.set_energy_offset_ev(300.0)
    start = scope.clock.now_s()
    _, record, first = sim.acquire(10.0)
    assert scope.clock.now_s() == start + 10.0 and record.time_s == start
    scope.move_stage_nm(0.0, 1.0)  # 2 px at 0.5 nm/px
    _, _, second = sim.acquire(10.0)
    np.testing.assert_allclose(second["shift_px"] - first["shift_px"], [0.2, 2.0], atol=1e-9)


def test_the_simulated_filter_satisfies_the_device_contract():
    from scherzer.drivers.base import EnergyFilter, EnergyFilterLimits
    from scherzer.simulators.energy_filter import VirtualEnergyFilter

    f = VirtualEnergyFilter(make_eftem_specimen((32, 32), 0.5, seed=0))
    assert isinstance(f, EnergyFilter) and isinstance(f.limits, EnergyFilterLimits)


# ------------------------------------------------------------------------------ one step, one image
def test_series_acquisition_one_image_at_a_time_matches_the_loop(series) -> None:
    """SeriesAcquisition (what the daemon drives) replays the loop exactly: the same devices
    answers give the same stored images, exposures and dark counts."""
    s = series["series"]
    raws = iter(series["raws"])
    darks = iter(image for _, image in series["darks"])
    run = eftem.SeriesAcquisition(lambda e, t: (next(raws), 0.0), lambda t: next(darks), SETTINGS)
    for i, energy in enumerate(s.energies_ev):
        assert run.exposure_s == s.exposures_s[i]
        stored, row = run.take(energy)
        np.testing.assert_array_equal(stored, s.stored[i])
        assert row["index"] == i and row["scale_to_first"] == s.scale_to_first[i]
    assert (run.darks.acquired, run.darks.reused) == (s.darks_acquired, s.darks_reused)
    assert run.quantum_counts == s.quantum_counts


def test_eftem_maps_params_and_the_combined_step(series, aligned) -> None:
    s = series["series"]
    params = eftem.EFTEMMapParams(edge_onset_ev=TI_ONSET_EV, reference_min_energy_ev=300.0)
    both = eftem.eftem_maps(s.scaled(), s.energies_ev, SLIT_EV, params, s.times_s)
    np.testing.assert_array_equal(both.aligned.shifts_px, aligned.shifts_px)
    alone = eftem.three_window_map(aligned.frames, s.energies_ev, SLIT_EV, TI_ONSET_EV)
    np.testing.assert_array_equal(both.maps.signal, alone.signal)
    unaligned = eftem.eftem_maps(s.scaled(), s.energies_ev, SLIT_EV,
                                 dataclasses.replace(params, align=False))  # fmt: skip
    assert unaligned.aligned is None and unaligned.crop_origin_px == (0, 0)
    adapter = pydantic.TypeAdapter(eftem.EFTEMMapParams)
    for bad in ({}, {"edge_onset_ev": -5.0}, {"edge_onset_ev": 456.0, "drift_order": 9},
                {"edge_onset_ev": 456.0, "smoothing_px": -1.0}):  # fmt: skip
        with pytest.raises(pydantic.ValidationError):
            adapter.validate_python(bad)
    with pytest.raises(ValueError, match="no pre-edge image"):
        eftem.eftem_maps(s.scaled(), s.energies_ev, SLIT_EV,
                         dataclasses.replace(params, reference_min_energy_ev=450.0))  # fmt: skip
