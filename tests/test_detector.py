"""Camera model: dose, Poisson statistics, gain/offset/readout, MTF and NPS, binning, limits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from scherzer.simulators.detector import CameraModel

PIXEL_NM = 0.02  # 0.04 Å² per pixel
DOSE = 500.0  # → 20 e per pixel in vacuum


def flat(n: int = 256, value: float = 1.0) -> np.ndarray:
    return np.full((n, n), value, dtype=np.float32)


def test_mean_counts_match_dose():
    cam = CameraModel(gain_counts_per_e=3.0, offset_counts=100.0, readout_noise_counts=2.0)
    counts = cam.expose(flat(value=0.8), DOSE, PIXEL_NM, np.random.default_rng(0))
    assert counts.dtype == np.float32 and counts.shape == (256, 256)
    assert np.all(counts == np.round(counts))
    electrons = 0.8 * DOSE * (PIXEL_NM * 10) ** 2
    assert cam.electrons_per_pixel(DOSE, PIXEL_NM) == pytest.approx(20.0)
    # standard error of the mean ≈ √(9·16)/256 ≈ 0.05 counts
    assert counts.mean() == pytest.approx(3.0 * electrons + 100.0, abs=0.25)


def test_variance_is_poisson_times_gain_squared_without_mtf():
    cam = CameraModel(
        gain_counts_per_e=3.0, offset_counts=50.0, readout_noise_counts=2.0, mtf_model="none"
    )
    counts = cam.expose(flat(512), DOSE, PIXEL_NM, np.random.default_rng(1))
    expected = 9.0 * 20.0 + 4.0 + 1.0 / 12.0  # g²λ + σ_r² + rounding
    # relative standard error of a variance from 262144 samples ≈ 0.3 %
    assert counts.var() == pytest.approx(expected, rel=0.015)


def test_poisson_statistics_low_and_high_dose():
    cam = CameraModel(
        gain_counts_per_e=1.0, offset_counts=0.0, readout_noise_counts=0.0, mtf_model="none"
    )
    rng = np.random.default_rng(2)
    low = cam.expose(flat(512, 0.5 / 20.0), DOSE, PIXEL_NM, rng)  # λ = 0.5
    assert np.mean(low == 0) == pytest.approx(math.exp(-0.5), abs=0.004)
    assert np.mean(low == 1) == pytest.approx(0.5 * math.exp(-0.5), abs=0.004)
    high = cam.expose(flat(512, 22.0 / 20.0), DOSE, PIXEL_NM, rng).astype(np.float64)  # λ = 22
    assert high.mean() == pytest.approx(22.0, abs=0.05)
    assert high.var() == pytest.approx(22.0, rel=0.015)
    skew = np.mean((high - high.mean()) ** 3) / high.var() ** 1.5
    assert skew == pytest.approx(1 / math.sqrt(22.0), abs=0.03)  # Poisson, not Gaussian


def test_reproducible_with_seed():
    cam = CameraModel()
    a = cam.expose(flat(64), DOSE, PIXEL_NM, np.random.default_rng(7))
    b = cam.expose(flat(64), DOSE, PIXEL_NM, np.random.default_rng(7))
    c = cam.expose(flat(64), DOSE, PIXEL_NM, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_mtf_curve():
    cam = CameraModel(mtf_sharp_fraction=0.3, mtf_half_width_nyquist=0.5)
    f = np.array([0.0, 0.5, 1.0])
    b = 0.7 / (1 + (f / 0.5) ** 2) + 0.3
    np.testing.assert_allclose(cam.mtf(f), b * np.sinc(f / 2), rtol=1e-12)
    assert cam.mtf(1.0) == pytest.approx(0.44 * 2 / math.pi)
    assert CameraModel(mtf_model="none").mtf(0.7) == 1.0
    table = CameraModel(mtf_model="table", mtf_table=(1.0, 0.6, 0.3))
    assert table.mtf(0.25) == pytest.approx(0.8)
    m2 = cam.mtf_2d((64, 64))
    assert m2.shape == (64, 33) and m2[0, 0] == pytest.approx(1.0)
    assert m2[0, 32] == pytest.approx(float(cam.mtf(1.0)), rel=1e-6)
    full = cam.mtf_2d((64, 64), rfft=False)
    assert full.shape == (64, 64)
    np.testing.assert_allclose(full[:, :33], m2)
    np.testing.assert_allclose(full[1:, 33:], full[1:, 31:0:-1][::-1])  # even: MTF(−f) = MTF(f)


def test_signal_transfer_follows_mtf():
    # a cosine at half Nyquist is attenuated by MTF(0.5) (high dose, averaged)
    cam = CameraModel(gain_counts_per_e=1.0, offset_counts=0.0, readout_noise_counts=0.0)
    n = 256
    x = np.arange(n)
    img = (1.0 + 0.5 * np.cos(2 * np.pi * 64 * x / n))[None, :].repeat(n, 0).astype(np.float32)
    counts = cam.expose(img, 50000.0, PIXEL_NM, np.random.default_rng(3))
    amp = np.abs(np.fft.rfft(counts.mean(axis=0)))[64] / (n / 2)
    lam = 50000.0 * 0.04
    assert amp / (0.5 * lam) == pytest.approx(float(cam.mtf(0.5)), rel=0.01)


def test_noise_power_spectrum_matches_model():
    cam = CameraModel(gain_counts_per_e=2.0, readout_noise_counts=3.0)
    n = 256
    rng = np.random.default_rng(4)
    frames = np.stack([cam.expose(flat(n), DOSE, PIXEL_NM, rng) for _ in range(8)])
    d = frames - frames.mean()
    nps = np.mean(np.abs(np.fft.rfft2(d)) ** 2, axis=0) / (n * n)
    fy = np.abs(np.fft.fftfreq(n))[:, None] * 2
    fx = np.fft.rfftfreq(n)[None, :] * 2
    f = np.sqrt(fy**2 + fx**2)
    for lo, hi in [(0.05, 0.15), (0.45, 0.55), (0.9, 1.0)]:
        ring = (f >= lo) & (f < hi)
        model = cam.nps(f[ring], 20.0).mean()
        assert nps[ring].mean() == pytest.approx(model, rel=0.05), (lo, hi)
    assert cam.nps(0.0, 20.0) == pytest.approx(4.0 * 20.0 + 9.0)


def test_binning_and_saturation():
    cam = CameraModel(
        binning=2,
        mtf_model="none",
        readout_noise_counts=0.0,
        offset_counts=0.0,
        gain_counts_per_e=1.0,
    )
    counts = cam.expose(flat(64), DOSE, PIXEL_NM, np.random.default_rng(5))
    assert counts.shape == (32, 32)
    assert counts.mean() == pytest.approx(80.0, abs=1.0)
    sat = CameraModel(bit_depth=8, gain_counts_per_e=20.0, mtf_model="none")
    c = sat.expose(flat(32), DOSE, PIXEL_NM, np.random.default_rng(6))
    assert c.max() == 255.0
    dark = CameraModel(offset_counts=0.0, readout_noise_counts=5.0, mtf_model="none")
    d = dark.expose(flat(32, 0.0), DOSE, PIXEL_NM, np.random.default_rng(6))
    assert d.min() == 0.0


def test_bad_input():
    cam = CameraModel()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="2-D"):
        cam.expose(np.ones((2, 4, 4)), DOSE, PIXEL_NM, rng)
    with pytest.raises(ValueError, match="non-finite"):
        cam.expose(np.full((4, 4), np.nan), DOSE, PIXEL_NM, rng)
    with pytest.raises(ValueError, match="dose"):
        cam.expose(flat(4), -1.0, PIXEL_NM, rng)
    with pytest.raises(ValueError, match="pixel_nm"):
        cam.expose(flat(4), DOSE, 0.0, rng)
    with pytest.raises(TypeError, match="Generator"):
        cam.expose(flat(4), DOSE, PIXEL_NM, 42)
    with pytest.raises(ValidationError):
        CameraModel(gain_counts_per_e=0.0)
    with pytest.raises(ValidationError):
        CameraModel(mtf_table=(0.0, 1.0))


def test_poisson_independent_of_thread_split():
    from scherzer.simulators.detector import _in_row_blocks, _poisson

    lam = np.random.default_rng(9).random((200, 64)).astype(np.float32) * 30
    serial, threaded = np.empty_like(lam), np.empty_like(lam)
    _poisson(lam, serial, 0, 12345)
    _in_row_blocks(_poisson, (lam, threaded), 12345)
    np.testing.assert_array_equal(serial, threaded)
    assert abs(serial.mean() - lam.mean()) < 0.1


def test_shift_bound_matches_the_fisher_information_of_a_cosine():
    """λ = λ0(1 + c cos 2πfx) with white noise of variance λ0 + (σ_r/g)² electrons² has
    F_x = N λ0² c² (2πf)² / (2 (λ0 + (σ_r/g)²)); the bound along y (no structure) is infinite."""
    cam = CameraModel(mtf_model="none", readout_noise_counts=3.0, gain_counts_per_e=2.0)
    n, f, c, dose = 128, 8 / 128, 0.1, 4.0  # 0.1 nm pixels: 1 Å², so λ0 = 4 e/px
    image = np.tile(1.0 + c * np.cos(2 * np.pi * f * np.arange(n)), (n, 1))
    sigma_y, sigma_x = cam.shift_bound_px(image, dose, 0.1)
    variance = dose + (3.0 / 2.0) ** 2
    fisher = n * n * dose**2 * c**2 * (2 * np.pi * f) ** 2 / (2 * variance)
    assert sigma_x == pytest.approx(1.0 / np.sqrt(fisher), rel=1e-6)
    assert sigma_y == np.inf
    blurred = CameraModel(readout_noise_counts=3.0, gain_counts_per_e=2.0)
    assert blurred.shift_bound_px(image, dose, 0.1)[1] > sigma_x  # the MTF costs information
