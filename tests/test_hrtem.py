"""HRTEM image formation against linear imaging theory, dose, drift ground truth and contracts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, optimize
from skimage.registration import phase_cross_correlation

from scherzer.optics import FrequencyGrid, Optics, ctf, interaction_constant_per_V_A
from scherzer.simulators.detector import CameraModel
from scherzer.simulators.hrtem import HRTEMImager, default_hrtem_optics, simulate_focal_series
from scherzer.simulators.specimen import Specimen, make_specimen, projected_potential
from scherzer.stack import ImageStack

PIXEL_NM = 0.02
N = 128


@pytest.fixture(scope="module")
def thin_carbon() -> Specimen:
    return make_specimen("amorphous_carbon", (N * PIXEL_NM,) * 2, seed=11, thickness_nm=0.5)


def optics() -> Optics:
    """The simulators' default 300 kV HRTEM with 2 nm of two-fold astigmatism at 30°."""
    return default_hrtem_optics().with_(a1_nm=2.0, a1_deg=30.0)


@pytest.mark.parametrize("coherence", ["quasi", "incoherent"])
def test_weak_phase_object_spectrum_is_linear_ctf(thin_carbon, coherence):
    # ψ = exp(iσv) of 0.5 nm a-C: I(k) = 2σV(k)·sin χ(k)·A·E_t·E_s·E_v to first order in σv
    # (for the incoherent focal average too: averaging sin χ over the Gaussian focal spread gives
    # E_t). The second-order term |σ v⊛h|² is ~σ·rms(v) ≈ 4 % of the linear one; tolerance 6 %.
    opt = optics()
    img = HRTEMImager(
        thin_carbon,
        opt,
        (N, N),
        PIXEL_NM,
        margin_px=0,
        exit_wave_method="phase_object",
        coherence=coherence,
    )
    df = opt.scherzer_defocus_nm()
    intensity = img.noiseless(df)[0].astype(np.float64)
    v = projected_potential(thin_carbon, (N, N), PIXEL_NM).astype(np.float64)
    sigma = interaction_constant_per_V_A(300.0)
    grid = FrequencyGrid((N, N), (PIXEL_NM, PIXEL_NM))
    predicted = 2 * sigma * np.fft.fft2(v - v.mean()) * ctf(opt, grid, df)
    measured = np.fft.fft2(intensity - intensity.mean())
    band = (grid.k > 0) & (grid.k < 1.0)
    rel = np.linalg.norm((measured - predicted)[band]) / np.linalg.norm(predicted[band])
    assert rel < 0.06
    assert sigma * v.std() < 0.06  # the specimen really is a weak phase object
    # atoms dark at Scherzer defocus: intensity anticorrelates with the (low-passed) potential
    lp = np.fft.ifft2(np.fft.fft2(v) * (grid.k < 0.5)).real
    assert np.corrcoef(lp.ravel(), intensity.ravel())[0, 1] < -0.5


def test_vacuum_gives_one():
    vac = Specimen("vacuum", np.zeros((0, 3)), [], (N * PIXEL_NM * 10,) * 2, 10.0, periodic=True)
    for coherence in ("quasi", "incoherent"):
        img = HRTEMImager(vac, optics(), (N, N), PIXEL_NM, margin_px=16, coherence=coherence)
        out = img.noiseless(np.array([-80.0, 20.0]), np.array([[0.1, -0.2], [0.05, 0.0]]))
        assert out.shape == (2, N, N) and out.dtype == np.float32
        np.testing.assert_allclose(out, 1.0, atol=1e-5)


def test_incoherent_focal_integration(thin_carbon):
    opt = optics()
    quasi = HRTEMImager(thin_carbon, opt, (N, N), PIXEL_NM, margin_px=0)
    inco = HRTEMImager(thin_carbon, opt, (N, N), PIXEL_NM, margin_px=0, coherence="incoherent")
    a, b = quasi.noiseless(-60.0)[0], inco.noiseless(-60.0)[0]
    # weak object: both agree to first order (contrast difference well below the contrast)
    assert np.std(a - b) < 0.15 * np.std(a)
    assert not np.allclose(a, b, atol=1e-6)
    # without focal spread the two modes are the same calculation
    sharp = opt.with_(focal_spread_nm=0.0)
    np.testing.assert_allclose(
        quasi.noiseless(-60.0, optics=sharp), inco.noiseless(-60.0, optics=sharp), atol=1e-5
    )


def test_whole_pixel_shift_moves_content(thin_carbon):
    img = HRTEMImager(thin_carbon, optics(), (64, 64), PIXEL_NM, margin_px=16)
    a = img.noiseless(-50.0)[0]
    b = img.noiseless(-50.0, np.array([[2 * PIXEL_NM, -3 * PIXEL_NM]]))[0]
    # frame(r) = ref(r − s): content moved by +2 rows and −3 columns
    np.testing.assert_allclose(b[2:, :-3], a[:-2, 3:], atol=1e-4)


def test_mean_counts_follow_dose(thin_carbon):
    cam = CameraModel(gain_counts_per_e=2.5, offset_counts=80.0, readout_noise_counts=1.5)
    img = HRTEMImager(thin_carbon, optics(), (N, N), PIXEL_NM, cam, margin_px=8)
    counts, truth = img.frame(-60.0, (0.0, 0.0), 400.0, np.random.default_rng(0))
    mean_i = img.noiseless(-60.0)[0].mean()
    assert counts.shape == (N, N) and np.all(counts == np.round(counts))
    electrons = 400.0 * (PIXEL_NM * 10) ** 2 * mean_i
    assert counts.mean() == pytest.approx(2.5 * electrons + 80.0, abs=0.3)
    assert truth["defocus_nm"] == -60.0
    assert truth["electrons_per_pixel_vacuum"] == pytest.approx(16.0)


@pytest.fixture(scope="module")
def drift_series() -> ImageStack:
    return simulate_focal_series(
        "crystal_edge",
        n=4,
        start_nm=-60.0,
        step_nm=0.0,
        size=128,
        seed=3,
        drift_px_per_frame=(1.3, -0.8),
        drift_jitter_px=0.4,
    )


def measure_shift_px(ref: np.ndarray, moving: np.ndarray, border: int = 16) -> np.ndarray:
    """s with moving(r) ≈ ref(r − s): least squares over the interior, quintic-spline shifts
    of ref, started from an upsampled cross-correlation (an image-only measurement)."""
    ref = ref.astype(np.float64)
    inner = (slice(border, -border),) * 2

    def cost(s: np.ndarray) -> float:
        shifted = ndimage.shift(ref, s, order=5, mode="nearest")
        return float(np.mean((shifted[inner] - moving[inner]) ** 2))

    start, _, _ = phase_cross_correlation(
        ref - ref.mean(), moving - moving.mean(), upsample_factor=20, normalization=None
    )
    opts = {"xatol": 1e-4, "fatol": 1e-14}
    return optimize.minimize(cost, -start, method="Nelder-Mead", options=opts).x


def test_ground_truth_drift_matches_measured_shift(drift_series):
    clean = drift_series.ground_truth["noiseless"]
    truth = drift_series.ground_truth["shifts_px"]
    np.testing.assert_array_equal(truth[0], [0.0, 0.0])
    assert np.all(np.abs(truth[1:]) > 0.5)  # the frames really moved
    for i in range(1, len(clean)):
        np.testing.assert_allclose(measure_shift_px(clean[0], clean[i]), truth[i], atol=0.02)


CONTRACT_SERIES = {
    "n": 5,
    "start_nm": -100.0,
    "step_nm": 8.0,
    "step_error_fraction": 0.05,
    "focal_drift_nm_per_frame": 0.5,
    "a1_nm": 3.0,
    "a1_deg": 20.0,
    "size": 64,
    "seed": 1,
}


def test_focal_series_contract(drift_series):
    st = simulate_focal_series("amorphous_carbon", **CONTRACT_SERIES)
    assert isinstance(st, ImageStack) and st.frames.shape == (5, 64, 64)
    assert np.all(st.frames == np.round(st.frames))
    gt = st.ground_truth
    idx = np.arange(5)
    np.testing.assert_allclose(gt["defocus_nm"], -100.0 + idx * 8.0 * 1.05 + idx * 0.5)
    assert gt["exit_wave"].dtype == np.complex64 and gt["exit_wave"].shape == (64, 64)
    assert gt["shifts_px"].shape == (5, 2) and gt["a1_nm"] == 3.0 and gt["a1_deg"] == 20.0
    assert gt["noiseless"].shape == (5, 64, 64)
    for i, r in enumerate(st.records):
        assert r.index == i and r.signal == "HRTEM" and r.dose_e_per_A2 == 500.0
        assert r.defocus_nominal_nm == -100.0 + i * 8.0
        assert abs(r.defocus_readback_nm - r.defocus_nominal_nm) < 1.0
    assert [r.time_s for r in st.records] == sorted(r.time_s for r in st.records)
    ins = st.instrument
    assert ins["optics"]["cs_mm"] == 0.6 and ins["optics"]["voltage_kv"] == 300.0
    assert ins["optics"]["a1_nm"] == 3.0 and ins["pixel_nm"] == PIXEL_NM
    assert ins["camera"]["gain_counts_per_e"] == CameraModel().gain_counts_per_e
    assert st.pixel_size_nm == (PIXEL_NM, PIXEL_NM)
    # same seed → same stack
    again = simulate_focal_series("amorphous_carbon", **CONTRACT_SERIES)
    np.testing.assert_array_equal(st.frames, again.frames)


def test_default_optics_resolve_information_limit():
    opt = default_hrtem_optics()
    assert 0.09 < opt.information_limit_nm() < 0.11
    assert opt.voltage_kv == 300.0 and opt.cs_mm == 0.6
    # default pixel (0.02 nm) samples the information limit: Nyquist 0.04 nm < 0.1 nm
    assert 2 * PIXEL_NM < opt.information_limit_nm()


def test_bad_input(thin_carbon):
    img = HRTEMImager(thin_carbon, optics(), (32, 32), PIXEL_NM, margin_px=4)
    with pytest.raises(ValueError, match="margin"):
        img.noiseless(-50.0, np.array([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="shift_nm"):
        img.noiseless(np.array([-50.0, -40.0]), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="defocus_nm"):
        img.noiseless(np.array([np.nan]))
    with pytest.raises(ValueError, match="voltage"):
        img.noiseless(-50.0, optics=optics().with_(voltage_kv=200.0))
    with pytest.raises(ValueError, match="coherence"):
        HRTEMImager(thin_carbon, optics(), (32, 32), PIXEL_NM, coherence="partial")
    with pytest.raises(TypeError, match="Specimen"):
        HRTEMImager("amorphous_carbon", optics(), (32, 32), PIXEL_NM)
    with pytest.raises(ValueError, match="unknown specimen"):
        simulate_focal_series("graphite", n=2, size=32)
    with pytest.raises(ValueError, match="n must"):
        simulate_focal_series(n=0)


def test_repeated_single_defocus_is_reproducible(thin_carbon):
    # single-defocus transfers are cached: the cache must not be modified by image formation
    img = HRTEMImager(thin_carbon, optics(), (32, 32), PIXEL_NM, margin_px=8)
    first = img.noiseless(-40.0)
    img.noiseless(-20.0, np.array([[0.05, 0.0]]))
    np.testing.assert_array_equal(img.noiseless(-40.0), first)
    batch = img.noiseless(np.array([-40.0, -20.0]))
    np.testing.assert_allclose(batch[0], first[0], atol=1e-6)
