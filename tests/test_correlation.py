"""Correlation primitives against direct NumPy: the fused kernels and shortcuts the aligner's
speed rests on (leave-one-out cross-power and moments, pooled pair products, patch search,
sub-pixel peaks)."""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from scherzer.processing.correlation import (
    Spectral,
    fourier_moments,
    integer_peaks,
    loo_cross,
    loo_newton,
    newton_step,
    pair_cross,
    peaks_near,
    refine_peaks,
    shift_mask,
    shift_spectra,
)

SHAPE = (48, 40)


def random_spectra(n: int = 5, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    rng = np.random.default_rng(4)
    return sfft.rfft2(rng.normal(size=(n, *shape))).astype(np.complex64)


def test_fused_leave_one_out_kernels_match_direct_numpy() -> None:
    spectra = random_spectra()
    n = len(spectra)
    shifts = np.random.default_rng(5).normal(0.0, 2.0, (n, 2))
    band = np.random.default_rng(6).random((48, 21)).astype(np.float32)
    aligned = shift_spectra(spectra, shifts, SHAPE)
    direct = aligned * np.conj(aligned.sum(axis=0) - aligned)
    np.testing.assert_allclose(
        loo_cross(spectra, shifts, SHAPE, 0.0, band), direct * band, rtol=2e-4, atol=1e-2
    )
    normalised = direct / np.sqrt(np.abs(direct)) * band
    np.testing.assert_allclose(
        loo_cross(spectra, shifts, SHAPE, 0.5, band), normalised, rtol=2e-4, atol=1e-3
    )
    sp = Spectral(SHAPE)
    value, grad, hess = fourier_moments(
        direct * band / np.float32(n - 1), sp.ky, sp.kx, sp.weights, np.zeros((n, 2))
    )
    step, kernel_value = loo_newton(spectra, shifts, 0.0, SHAPE, band)
    np.testing.assert_allclose(kernel_value, value, rtol=1e-4)
    np.testing.assert_allclose(step, newton_step(grad, hess), atol=1e-5)


def test_pooled_pair_cross_is_the_sum_of_its_pairs() -> None:
    spectra = random_spectra()
    pairs = np.array([(0, 1), (1, 2), (2, 3), (0, 2), (1, 3)])
    single = pair_cross(spectra, pairs, 0.5, None)
    expected = spectra[pairs[:, 0]] * np.conj(spectra[pairs[:, 1]])
    np.testing.assert_allclose(single, expected / np.sqrt(np.abs(expected)), rtol=1e-3)
    pooled = pair_cross(spectra, pairs, 0.5, None, groups=np.array([0, 0, 0, 1, 1]))
    np.testing.assert_allclose(pooled[0], single[:3].sum(axis=0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(pooled[1], single[3:].sum(axis=0), rtol=1e-4, atol=1e-3)


def test_global_peak_search_stays_inside_the_allowed_shift() -> None:
    maps = np.random.default_rng(7).normal(0.0, 0.01, (3, 64, 60))
    maps[0, 5, 60 - 7] = 1.0  # lag (5, −7)
    maps[1, 64 - 3, 2] = 1.0  # lag (−3, 2)
    maps[1, 30, 30] = 5.0  # higher, but beyond the 16 px limit
    maps[2, 0, 0] = 1.0
    found = integer_peaks(maps, shift_mask((64, 60), 16.0))
    np.testing.assert_array_equal(found, [[5, -7], [-3, 2], [0, 0]])


def _blob_pair(offset: tuple[float, float], shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    """Cross-power of a smooth random image with itself moved by ``offset`` (content of the
    first frame sits at +offset relative to the second)."""
    rng = np.random.default_rng(8)
    image = sfft.irfft2(sfft.rfft2(rng.normal(size=shape)) * _gaussian(shape, 0.12), s=shape)
    spectrum = sfft.rfft2(image)
    sp = Spectral(shape)
    ramp = np.exp(-2j * np.pi * (sp.ky[:, None] * offset[0] + sp.kx[None, :] * offset[1]))
    return (spectrum * ramp * np.conj(spectrum))[None].astype(np.complex64)


def _gaussian(shape: tuple[int, int], sigma: float) -> np.ndarray:
    sp = Spectral(shape)
    return np.exp(-(sp.ky[:, None] ** 2 + sp.kx[None, :] ** 2) / (2 * sigma**2))


def test_patch_search_and_newton_find_a_known_sub_pixel_offset() -> None:
    """A patch search near a prediction 2 px off finds the integer peak; Newton steps on the
    exact Fourier series then land on the true sub-pixel offset."""
    cross = _blob_pair((3.3, -5.6))
    mask = shift_mask((64, 64), 20.0)
    coarse, _ = peaks_near(cross, np.array([[2.0, -4.0]]), np.array([3.0]), mask, (64, 64))
    assert np.abs(coarse[0] - [3.3, -5.6]).max() < 0.5
    fine, _ = refine_peaks(cross, (64, 64), coarse)
    np.testing.assert_allclose(fine[0], [3.3, -5.6], atol=1e-3)
