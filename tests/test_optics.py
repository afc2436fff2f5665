"""The physics model against closed forms and independent numerical averages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft as sfft

from scherzer.optics import (
    FrequencyGrid,
    Optics,
    chi,
    ctf,
    electron_wavelength_A,
    image_intensity,
    interaction_constant_per_V_A,
    scherzer_defocus_nm,
    spatial_envelope,
    temporal_envelope,
    wave_transfer,
)

LAMBDA_300 = 0.019687  # Å, from DOMAIN.md (1.9687 pm)


def test_wavelength_300kv_matches_domain_value() -> None:
    assert electron_wavelength_A(300) == pytest.approx(LAMBDA_300, rel=5e-5)
    # 200 kV: 2.5079 pm (Kirkland's table)
    assert electron_wavelength_A(200) == pytest.approx(0.025079, rel=2e-4)


def test_interaction_constant_300kv() -> None:
    # Kirkland: σ(300 kV) = 6.526e-4 /(V·Å)
    assert interaction_constant_per_V_A(300) == pytest.approx(6.526e-4, rel=1e-3)


def test_scherzer_defocus_closed_form() -> None:
    lam, cs = electron_wavelength_A(300), 0.6e7
    assert scherzer_defocus_nm(300, 0.6) == pytest.approx(-math.sqrt(4 / 3 * cs * lam) / 10)
    assert scherzer_defocus_nm(300, 0.6) == pytest.approx(-39.69, abs=0.01)
    assert scherzer_defocus_nm(300, 0.6, extended=False) == pytest.approx(-34.37, abs=0.01)


def _line_grid(n: int = 8192, pixel_nm: float = 0.005) -> FrequencyGrid:
    return FrequencyGrid((1, n), (pixel_nm, pixel_nm))


def _zero_crossings(k: np.ndarray, y: np.ndarray) -> np.ndarray:
    s = np.sign(y)
    idx = np.nonzero(s[:-1] * s[1:] < 0)[0]
    return k[idx] - y[idx] * (k[idx + 1] - k[idx]) / (y[idx + 1] - y[idx])


@pytest.mark.parametrize("defocus_nm", [-39.69, -60.0, -120.0])
def test_ctf_zero_crossings_match_closed_form(defocus_nm: float) -> None:
    """Zeros of sin χ for C1 + C3 solve (π/2)C3λ³u² + πλC1u + nπ = 0, u = k²."""
    optics = Optics(voltage_kv=300, cs_mm=0.6, defocus_nm=defocus_nm)
    grid = _line_grid()
    half = grid.shape[1] // 2
    k = grid.kx[0, 1:half].astype(np.float64)
    values = ctf(optics, grid)[0, 1:half].astype(np.float64)
    measured = _zero_crossings(k, values)
    lam, c1, c3 = optics.wavelength_A, defocus_nm * 10, 0.6e7
    expected = []
    for n in range(-200, 201):
        disc = (lam * c1) ** 2 - 2 * c3 * lam**3 * n
        if disc < 0:
            continue
        for sign in (+1, -1):
            u = (-lam * c1 + sign * math.sqrt(disc)) / (c3 * lam**3)
            if u > 1e-12:
                expected.append(math.sqrt(u))
    expected = np.array(sorted(e for e in expected if e < k[-1]))
    first = expected[:6]
    assert len(measured) >= len(first)
    np.testing.assert_allclose(measured[: len(first)], first, rtol=2e-4)


def test_temporal_envelope_equals_numerical_focal_average() -> None:
    """focal_spread_nm is a standard deviation: E_t = |⟨exp(−iπλΔk²)⟩_Δ~N(0,σ)|."""
    optics = Optics(voltage_kv=300, focal_spread_nm=4.0)
    grid = _line_grid(2048, 0.01)
    k2 = grid.k2[0, :200].astype(np.float64)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    delta = nodes * optics.focal_spread_nm * 10
    average = weights[:, None] * np.exp(-1j * math.pi * optics.wavelength_A * delta[:, None] * k2)
    average = np.abs(average.sum(0) / weights.sum())
    np.testing.assert_allclose(temporal_envelope(optics, grid)[0, :200], average, atol=1e-5)
    # and the information limit definition: E_t = exp(-2) there
    k_info = 0.1 / optics.information_limit_nm()
    e = math.exp(-0.5 * (math.pi * optics.wavelength_A * 40.0) ** 2 * k_info**4)
    assert e == pytest.approx(math.exp(-2))


def test_spatial_envelope_closed_form_c1_c3() -> None:
    """E_s = exp(−(πα/λ)² (C1λk + C3λ³k³)²) for α the 1/e semi-angle."""
    optics = Optics(voltage_kv=300, cs_mm=0.6, defocus_nm=-50, beam_divergence_mrad=0.15)
    grid = _line_grid(2048, 0.01)
    k = grid.kx[0, :400].astype(np.float64)
    lam, a = optics.wavelength_A, 0.15e-3
    closed = np.exp(-((math.pi * a / lam) ** 2) * (-500 * lam * k + 0.6e7 * lam**3 * k**3) ** 2)
    np.testing.assert_allclose(spatial_envelope(optics, grid)[0, :400], closed, atol=2e-5)


def test_spatial_envelope_equals_numerical_tilt_average_for_defocus() -> None:
    """For pure defocus, averaging exp(−i[χ(k+θ/λ)−χ(k)]) over a Gaussian cone of 1/e semi-angle
    α gives E_s (the q² term is negligible for small α)."""
    optics = Optics(voltage_kv=300, defocus_nm=-200, beam_divergence_mrad=0.2)
    lam, c1, alpha = optics.wavelength_A, -2000.0, 0.2e-3
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    t = nodes * alpha / math.sqrt(2)  # each tilt component ~ N(0, α²/2)
    qy, qx = np.meshgrid(t / lam, t / lam, indexing="ij")
    w = np.outer(weights, weights)
    w /= w.sum()
    grid = _line_grid(2048, 0.01)
    for i in (20, 60, 120):
        k = float(grid.kx[0, i])
        dchi = math.pi * lam * c1 * ((k + qx) ** 2 + qy**2 - k**2)
        numeric = abs((w * np.exp(-1j * dchi)).sum())
        assert spatial_envelope(optics, grid)[0, i] == pytest.approx(numeric, abs=2e-3)


def test_astigmatism_azimuth_convention_and_rotation() -> None:
    """A1 at φ0 raises χ most along φ = φ0 (φ = atan2(ky, kx)); rotating φ0 by 90° rotates χ."""
    grid = FrequencyGrid((65, 65), (0.02, 0.02))
    base = Optics(voltage_kv=300, a1_nm=5.0, a1_deg=0.0)
    c0 = chi(base, grid)
    c90 = chi(base.with_(a1_deg=90.0), grid)
    k = float(grid.kx[0, 10])
    peak = math.pi * base.wavelength_A * 50.0 * k**2
    assert c0[0, 10] == pytest.approx(peak, rel=1e-5)  # along +kx
    assert c0[10, 0] == pytest.approx(-peak, rel=1e-5)  # along +ky
    assert c90[10, 0] == pytest.approx(peak, rel=1e-5)
    np.testing.assert_allclose(
        sfft.fftshift(c90), np.rot90(sfft.fftshift(c0)), atol=1e-4 * float(np.abs(c0).max())
    )
    c30 = chi(base.with_(a1_deg=30.0), grid)
    phi = np.arctan2(grid.ky, grid.kx)
    expected = math.pi * base.wavelength_A * 50.0 * grid.k2 * np.cos(2 * (phi - math.radians(30)))
    np.testing.assert_allclose(c30, expected, atol=1e-5)


def test_series_evaluation_equals_single_evaluations() -> None:
    optics = Optics(voltage_kv=300, cs_mm=0.6, focal_spread_nm=3, beam_divergence_mrad=0.1)
    grid = FrequencyGrid((32, 48), (0.03, 0.02))
    dfs = np.array([-80.0, -40.0, 0.0, 25.0])
    series = wave_transfer(optics, grid, dfs)
    assert series.shape == (4, 32, 48) and series.dtype == np.complex64
    for i, df in enumerate(dfs):
        single = wave_transfer(optics.with_(defocus_nm=df), grid)
        np.testing.assert_allclose(series[i], single, atol=2e-5)


def test_weak_phase_object_image_spectrum() -> None:
    """I(k) = 2σV(k) sin χ(k) E(k) for ψ = exp(iσV) with σV ≪ 1 (linear imaging)."""
    rng = np.random.default_rng(1)
    shape = (64, 64)
    phase = 0.002 * rng.standard_normal(shape).astype(np.float32)
    optics = Optics(voltage_kv=300, cs_mm=0.6, defocus_nm=-40, focal_spread_nm=3)
    grid = FrequencyGrid(shape, (0.02, 0.02))
    image = image_intensity(sfft.fft2(np.exp(1j * phase)), optics, grid)
    spec = sfft.fft2(image - image.mean())
    expected = 2 * sfft.fft2(phase - phase.mean()) * ctf(optics, grid)
    err = np.abs(spec - expected).max() / np.abs(expected).max()
    assert err < 0.01


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="voltage_kv"):
        electron_wavelength_A(-1)
    with pytest.raises(ValueError):
        Optics(voltage_kv=0)
    with pytest.raises(ValueError):
        Optics(a1_nm=-1)
    with pytest.raises(ValueError):
        Optics(unknown_field=1)  # type: ignore[call-arg]
    grid = FrequencyGrid((8, 8), (0.1, 0.1))
    with pytest.raises(ValueError, match="non-finite"):
        chi(Optics(), grid, np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="shape"):
        image_intensity(np.ones((4, 4), np.complex64), Optics(), grid)
