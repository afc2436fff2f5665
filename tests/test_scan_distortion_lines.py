"""Scan-distortion correction: the line solver (second-difference penalty, jitter), the
density-weighted merge and the engine's working memory — against exact answers or the
simulator's truth.

Simulated series as in tests/test_scan_distortion.py (SrTiO3 [001] HAADF, 0.02 nm pixels,
≈18 counts/px); the per-pixel residual is the RMS of |sampled − true| position after the best
global similarity, away from the first 5 % of each scan line.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import linalg

from scherzer.processing.registration import rotate_to_common
from scherzer.processing.scan_distortion import (
    NonrigidParams,
    ScanDistortionError,
    correct_scan_distortion,
    merge_density,
)
from scherzer.processing.scan_distortion.line_prior import line_variances, second_difference_bands
from scherzer.processing.scan_distortion.update import penalised_rows, roughness_weight
from scherzer.simulators.scan_distortion import ScanDistortion, simulate_distorted_series
from scherzer.simulators.scan_truth import (
    column_positions,
    lattice_rms_pm,
    pixel_residual_px,
    row_start_mask,
    truth_positions_px,
)

CURRENT_PA = 600.0  # ≈18 HAADF counts per pixel at 2 µs


def _series(mode: str, n: int, size: int, distortion: ScanDistortion, base_deg: float = 0.0):
    series = simulate_distorted_series(
        n_frames=n, size=size, rotation_mode=mode, signals=("HAADF",), distortion=distortion,
        beam_current_pA=CURRENT_PA, seed=3, base_rotation_deg=base_deg,
    )  # fmt: skip
    stack = series["HAADF"]
    gt = stack.ground_truth
    rot = gt["rotation_deg"]
    frames = rotate_to_common(stack.frames, rot).astype(np.float32)
    truth = truth_positions_px(gt["positions_nm"], rot, gt["pixel_nm"])
    return frames, rot, truth, row_start_mask(frames.shape[1:], rot)


# --- the line solver -----------------------------------------------------------------------
def test_penalty_follows_a_ripple_by_its_transfer_function() -> None:
    """Evenly contrasted lines, noise-free: one solve from rest returns a ripple of period P
    scaled by 1/(1 + λ(2 sin π/P)⁴) away from the ends (λ = roughness_weight(σ))."""
    ny, period, sigma = 512, 18.0, 1.0
    r = np.arange(ny)
    signal = 0.2 * np.sin(2 * np.pi * r / period)
    h = np.tile(np.eye(2), (ny, 1, 1))
    b = np.stack([signal, 0.5 * signal], axis=1)
    step = penalised_rows(h, b, np.zeros((ny, 2)), roughness_weight(sigma))
    lam = roughness_weight(sigma)
    gain = 1.0 / (1.0 + lam * (2 * np.sin(np.pi / period)) ** 4)
    inner = slice(64, -64)
    np.testing.assert_allclose(step[inner, 0], gain * signal[inner], atol=2e-3)
    np.testing.assert_allclose(step[inner, 1], 0.5 * gain * signal[inner], atol=2e-3)


def test_penalty_interpolates_lines_without_contrast() -> None:
    """Only every fourth line has contrast (a crystal's atom rows along the scan): a smooth
    line function (a slow quadratic) comes back on every line, not just the contrasted ones
    (to 1e-3 px); a Gaussian window would leave a staircase."""
    ny = 256
    r = np.arange(ny, dtype=float)
    truth = 1e-5 * (r - 100.0) ** 2 + 0.01 * r
    h = np.zeros((ny, 2, 2))
    h[::4] = np.eye(2)
    b = np.einsum("rab,rb->ra", h, np.stack([truth, -truth], axis=1))
    step = penalised_rows(h, b, np.zeros((ny, 2)), roughness_weight(1.0))
    np.testing.assert_allclose(step[:, 0], truth, atol=1e-3)
    np.testing.assert_allclose(step[:, 1], -truth, atol=1e-3)


@pytest.fixture(scope="module")
def jittery_pairs():
    """0/90 pairs whose only distortion is line jitter (0.3 px σ) plus a slow drift, scanned
    10° off the lattice planes so that every line crosses columns (a line between atom rows
    has no fast-axis contrast: its jitter cannot be seen — scanned along the lattice the
    residual stays at 0.27 px, 0.38 without the jitter term)."""
    dist = ScanDistortion(drift_nm_per_s=(0.05, -0.03), jitter_px=0.3)
    return _series("orthogonal-pairs", 4, 160, dist, base_deg=10.0)


def test_line_jitter_comes_back(jittery_pairs) -> None:
    """The per-line jitter term (on by default for orthogonal series) recovers most of a
    0.3 px line jitter: per-pixel residual ≤ 0.15 px and ≤ 0.6 × that without it (measured
    0.095 against 0.235)."""
    frames, rot, truth, mask = jittery_pairs
    with_jitter = correct_scan_distortion(frames, NonrigidParams(), rot)
    without = correct_scan_distortion(frames, NonrigidParams(row_jitter=False), rot)
    ours = pixel_residual_px(with_jitter.fields_px, truth, mask)
    plain = pixel_residual_px(without.fields_px, truth, mask)
    assert ours <= 0.15
    assert ours <= 0.6 * plain


def test_smoothing_defaults_follow_the_scan_directions() -> None:
    p = NonrigidParams()
    assert p.smoothing_for([0, 1, 0, 1]) == 0.75 and p.jitter_for([0, 1]) is True
    assert p.smoothing_for([0, 1], line_px=128) == pytest.approx(0.75 * 4**0.75)
    assert p.smoothing_for([0, 0, 0]) == 4.0 and p.jitter_for([0, 0]) is False
    assert NonrigidParams(mode="unconstrained").smoothing_for([0, 1]) == 4.0
    assert NonrigidParams(smoothing_px=3.0, row_jitter=False).smoothing_for([0, 1]) == 3.0


# --- density-weighted merge ----------------------------------------------------------------
def test_density_merge_of_unmoved_frames_is_their_mean() -> None:
    """Zero fields: every pixel lands on its own grid point, so the merge is the plain mean
    and the density the number of frames (σ = 0); flagged frames stay out."""
    frames = np.random.default_rng(0).poisson(10.0, (3, 40, 48)).astype(np.float32)
    fields = np.zeros((3, 2, 40, 48), np.float32)
    merged, density = merge_density(frames, fields, sigma_px=0.0)
    np.testing.assert_allclose(merged, frames.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(density, 3.0)
    merged, density = merge_density(frames, fields, flagged=[1], sigma_px=0.0)
    np.testing.assert_allclose(merged, frames[[0, 2]].mean(axis=0), rtol=1e-6)
    with pytest.raises(ScanDistortionError, match="do not match"):
        merge_density(frames, fields[:2])


def test_density_merge_of_a_shifted_frame_puts_it_back() -> None:
    """A frame whose field says it is shifted by (1.5, −2) px merges onto the other frame's
    grid: the merged image equals the unshifted content where both landed."""
    rng = np.random.default_rng(1)
    base = rng.normal(0.0, 1.0, (64, 64)).astype(np.float32)
    shifted = np.roll(base, (3, -4), axis=(0, 1))  # content at q came from q − (3, −4)
    fields = np.zeros((2, 2, 64, 64), np.float32)
    fields[1, 0], fields[1, 1] = 3.0, -4.0  # frame 1 at q saw the reference at q − (3, −4)
    merged, density = merge_density(np.stack([base, shifted]), fields, sigma_px=0.0)
    inner = (slice(8, -8), slice(8, -8))
    np.testing.assert_allclose(merged[inner], base[inner], atol=1e-5)
    np.testing.assert_allclose(density[inner], 2.0)


def test_density_merge_in_the_engine() -> None:
    """merge="density" on 0/90 pairs (4 × 160², drift with acceleration, 50 Hz pick-up,
    jitter): the result's average is the density-weighted merge (columns within 2 pm of an
    ideal lattice after a similarity fit, measured 0.55) and count its density (≈ frames
    inside)."""
    dist = ScanDistortion(drift_nm_per_s=(0.25, -0.15), acceleration_nm_per_s2=(0.4, 0.3),
                          mains_nm=(0.004, 0.003), jitter_px=0.05)  # fmt: skip
    frames, rot, _, _ = _series("orthogonal-pairs", 4, 160, dist)
    result = correct_scan_distortion(frames, NonrigidParams(merge="density"), rot)
    a = 0.3905 / 0.02
    basis = np.array([[a / 2, a / 2], [a / 2, -a / 2]])
    pos = column_positions(result.average, a / np.sqrt(2))
    assert lattice_rms_pm(pos, basis, 0.02) <= 2.0
    inner = result.count[20:-20, 20:-20]
    assert abs(float(np.median(inner)) - len(frames)) <= 0.2
    assert np.all(np.isfinite(result.average[20:-20, 20:-20]))


# --- memory ---------------------------------------------------------------------------------
def test_working_memory_stays_within_four_stacks() -> None:
    """8 × 256² pairs, float32, the whole run (rigid start, drift search, cycles, the result
    it returns): peak traced memory ≤ 4 stacks — result included (measured 3.93; the result
    holds 1.5 stacks: corrected frames, valid masks, average, count; the fields are held
    compactly, one (dy, dx) per scan line, and expanded on demand). Before the compact fields
    the result alone held 3.5 stacks and the run peaked near 7."""
    dist = ScanDistortion(drift_nm_per_s=(0.05, -0.03), jitter_px=0.05)
    frames, rot, _, _ = _series("orthogonal-pairs", 8, 256, dist)
    params = NonrigidParams(nonlinear_cycles=2)
    correct_scan_distortion(frames[:2, :64, :64], params, rot[:2])  # compile the kernels
    tracemalloc.start()
    result = correct_scan_distortion(frames, params, rot)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= 4 * frames.nbytes, peak / frames.nbytes
    held = sum(a.nbytes for a in (result.corrected, result.valid, result.average, result.count))
    assert held <= 1.6 * frames.nbytes, held / frames.nbytes
    # the compact fields expand to what the per-frame expansion gives
    full = result.fields_px
    assert full.shape == (8, 2, 256, 256) and full.dtype == np.float32
    np.testing.assert_array_equal(full[3], result.field(3))


# --- linear drift search --------------------------------------------------------------------
def test_linear_drift_search_recovers_a_large_drift() -> None:
    """0/90 pairs (4 × 192²) drifting 13.5 px per frame (a 7 % shear of the slow axes, with
    50 Hz pick-up and jitter): the rigid start fails on the sheared crystal (measured 21.8 px
    per pixel) and the drift search finds the drift (measured 0.110 px); a small drift keeps
    the rigid start's result exactly (the search must beat it to be used)."""
    big = ScanDistortion(drift_nm_per_s=(2.5, -1.5), mains_nm=(0.004, 0.003), jitter_px=0.05)
    frames, rot, truth, mask = _series("orthogonal-pairs", 4, 192, big)
    searched = correct_scan_distortion(frames, NonrigidParams(), rot)
    plain = correct_scan_distortion(frames, NonrigidParams(drift_search=False), rot)
    assert pixel_residual_px(searched.fields_px, truth, mask) <= 0.15
    assert pixel_residual_px(plain.fields_px, truth, mask) > 5.0
    small = ScanDistortion(drift_nm_per_s=(0.25, -0.15), jitter_px=0.05)
    frames, rot, truth, mask = _series("orthogonal-pairs", 4, 128, small)
    a = correct_scan_distortion(frames, NonrigidParams(), rot)
    b = correct_scan_distortion(frames, NonrigidParams(drift_search=False), rot)
    np.testing.assert_allclose(a.fields_px, b.fields_px, atol=1e-6)


def test_compact_fields_expand_to_the_model_displacement() -> None:
    """The per-frame expansion (float32, line terms in float64) equals −u from the model's
    float64 grid displacement turned into the common frame, for all four scan directions and
    every line term (affine, lines, jitter, rotation per line): within 1e-4 px."""
    from scherzer.processing.scan_distortion.model import (
        FieldSource,
        FrameModel,
        vec_to_common,
    )

    rng = np.random.default_rng(3)
    shape = (48, 48)
    model = FrameModel.zeros(4, shape, dense=False)
    model.affine[:] = rng.normal(0, [2.0, 0.01, 0.005, 2.0, 0.01, 0.005], (4, 6))
    model.rows[:] = rng.normal(0, 0.3, model.rows.shape)
    model.theta[:] = rng.normal(0, 1e-3, model.theta.shape)
    model.jitter[:] = rng.normal(0, 0.05, model.jitter.shape)
    turns = [0, 1, 2, 3]
    source = FieldSource(model, turns, shape)
    assert source.shape == (4, 2, 48, 48)
    for i, k in enumerate(turns):
        dy, dx = model.grid_displacement(i, shape)
        cy, cx = vec_to_common(-dy, -dx, k)
        want = np.stack([np.rot90(cy, -k), np.rot90(cx, -k)])
        np.testing.assert_allclose(source[i], want, atol=1e-4)
        np.testing.assert_allclose(source[i, 1], want[1], atol=1e-4)


def test_line_prior_separates_smoothness_from_per_line_error() -> None:
    """Restricted likelihood on synthetic line estimates: a smooth function plus an error of
    0.1 px on every line plus noise of varying size gives τ back within 25 % and a smooth
    fit closer to the function than the lines; lines of noise alone give no error beyond it
    and a straight line (κ at its range's top)."""
    rng = np.random.default_rng(0)
    n = 400
    t = np.arange(n)
    smooth = 0.5 * np.sin(2 * np.pi * t / 150.0) + 0.2 * np.sin(2 * np.pi * t / 40.0)
    v = (0.03 + 0.3 * rng.random(n)) ** 2
    z = smooth + 0.1 * rng.standard_normal(n) + np.sqrt(v) * rng.standard_normal(n)
    kappa, tau2 = line_variances([(z, v)])
    assert abs(np.sqrt(tau2) - 0.1) <= 0.025
    d0, d1, d2 = second_difference_bands(n)
    w = 1.0 / (v + tau2)
    ab = np.zeros((3, n))
    ab[2], ab[1, 1:], ab[0, 2:] = w + kappa * d0, kappa * d1, kappa * d2
    fit = linalg.solveh_banded(ab, w * z)
    assert np.sqrt(np.mean((fit - smooth) ** 2)) < 0.5 * np.sqrt(np.mean((z - smooth) ** 2))
    kappa, tau2 = line_variances([(np.sqrt(v) * rng.standard_normal(n), v)])
    assert tau2 <= 0.01 * float(np.mean(v)) and kappa * float(np.mean(v)) >= np.exp(10.0)
