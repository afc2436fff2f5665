"""Rigid registration of image series: measure every frame's shift, solve jointly, apply.

Conventions
-----------
* Frames are (n, y, x); shifts are in pixels, ``shifts_px[i] = (dy, dx)`` is where frame i's
  content sits relative to the reference: frame_i(r) ≈ ref(r − s_i). Aligning applies −s_i.
  ``reference="mean"`` puts the reference at the mean position (Σ s_i = 0); an integer N makes
  frame N the reference (s_N = 0).
* Pair offsets: ``pair_offsets[i, j] = s_i − s_j`` as measured from the pair alone (NaN where
  the pair graph has no edge).
* Frequencies are in cycles per pixel; spectra are single-precision ``rfft2`` of the prepared
  (mean-subtracted, optionally prefiltered, windowed) frames, computed once per frame and
  stage.
* Memory: frames come from a :class:`~scherzer.processing.chunked.FrameSource` and spectra live
  in a :class:`~scherzer.processing.chunked.Store` (in memory, or on disk when a scratch
  factory is given and they exceed half of ``memory_budget_mb``); every stream over frames or
  pairs holds one block of temporaries. The result does not depend on the budget.

Method (in the manner of SmartAlign, with our own estimator)
-----------------------------------------------------------
1. Correlation-only preparation: optional 3×3 median or 5×5 Wiener prefilter, mean removal and a
   Hann/Hamming/Tukey window. The output frames are never filtered.
2. (Coarse stage, on frames binned to at most ``COARSE_MAX_PX`` pixels along their longer side;
   positions are scaled back before the fine stage.) For every edge (i, j) of the pair graph
   (reference | sequential | k nearest neighbours | all pairs) the normalised correlation
   NCF = F⁻¹[G·H* / |G·H*|^α] (optionally band-passed) gives an integer peak inside the
   maximum shift. Pairs farther apart in the series search only near the
   offset predicted by the closer pairs, so a crystal's lattice-equivalent peaks are not chosen.
3. The peak is refined to sub-pixel precision on the band-limited correlation at α_fine (0 =
   plain cross-correlation, the efficient estimator under Poisson noise): Newton steps on the
   exact Fourier series of the correlation, whose moments are batched matrix products.
4. A weighted least-squares solution for all positions from all pair offsets
   (:mod:`~scherzer.processing.pair_positions`), with iterative outlier rejection (robust
   scale from the median absolute residual), so a unit-cell jump in a pair does not survive.
5. A robust start: every frame matched to the leave-one-out average of the others (√(n−1) the
   SNR of a pair). When the pairs disagree (low dose) or cannot show agreement (a tree graph),
   a steady-drift candidate (the correlations of all pairs up to 8 apart, summed along the
   offsets a drift v predicts, maximised over v) and a global search from rest compete with
   the pair solution; scores are marked down by what noise gains a search of each breadth,
   and only among the candidates that match the averages as well as the best within noise
   (``TIE_SIGMAS`` standard errors) does the smoothest trajectory win (drift is smooth, lattice
   jumps are not): a prior breaks ties, it never overrides a clearly better fit.
6. The fine stage, on the area every frame shares at the integer parts of the start
   (``fine_window``, a Tukey window that tapers only the edges: a Hann window on the whole
   field keeps Σw²/N = 14 % of a frame's pixels, this 71 %): spectra again, a weight
   S/(S + N/(n−1)) measured from the roughly aligned frames (the Wiener factor of the
   leave-one-out average), every frame moved to the highest point of its correlation with the
   others' average within 3 px (a few rows of the inverse DFT per frame), the pairs refined
   from there and solved, then refinement passes against the leave-one-out average until the
   largest update is below ``refine_tolerance_px``. The leave-one-out moments are one product
   per frame and two small matrix products (no cross-power array of the series is stored).
7. Low-SNR mode (``low_snr``): the pooled steady-drift rate guides every pair's first search.

The spectral primitives (weights, cross-power, peak search, Newton steps) live in
:mod:`scherzer.processing.correlation`, the frames-to-spectra side (region, binning, common crop)
in :mod:`scherzer.processing.rigid_spectra`; this module holds the method and its results.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import scipy.fft as sfft

from scherzer.processing.align_params import (
    AlignmentError,
    AlignmentResult,
    AlignParams,
)
from scherzer.processing.chunked import (
    ArraySource,
    FrameSource,
    MemoryPlan,
    Scratch,
    Store,
    plan_memory,
)
from scherzer.processing.correlation import (
    PEAK_TIE,
    Spectral,
    correlation_patches,
    fourier_moments,
    integer_peaks,
    loo_blocks,
    loo_newton,
    loo_patches,
    newton_step,
    pair_cross,
    parabolic_peaks,
    peak_energy,
    peaks_near,
    refine_peaks,
    shift_mask,
    template_weight,
)
from scherzer.processing.pair_positions import gauge, pair_graph, solve_positions
from scherzer.processing.rigid_spectra import (
    Crop,
    as_source,
    coarse_factor,
    common_crop,
    region,
)
from scherzer.processing.rigid_spectra import spectra as rigid_spectra
from scherzer.processing.rigid_start import ScoreNoise, most_plausible
from scherzer.processing.shifting import (  # noqa: F401 - re-exported for importers
    apply_shifts,
    as_frames,
    combine,
    common_area,
    crop_roi,
    prepare,
    rotate_frame_back,
    rotate_to_common,
)
from scherzer.stack import ImageStack
from scherzer.workers import fft_workers, one_blas_thread

_most_plausible = most_plausible  # the name tests and older callers import

__all__ = [
    "AlignParams",
    "AlignmentError",
    "AlignmentResult",
    "align_stack",
    "apply_shifts",
    "measure_shifts",
    "rotate_frame_back",
    "rotate_to_common",
]

# The pair solution alone is trusted when this fraction of pairs lies within CONSISTENT_PX of
# it (coarse offsets are good to ~0.1 px; at 1 e/px on a crystal, pairs locked onto lattice-
# equivalent peaks agree to within 1 px in 70–80 % of pairs but within 0.5 px in only 33–43 %).
CONSISTENT_PX = 0.5
CONSISTENT_FRACTION = 0.9
START_TOLERANCE_PX = 0.05  # template passes that only choose a start stop at this step size
GLOBAL_PASSES = 2  # passes of the global search from rest that may move frames to any lag


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------
RATE_GAPS = 8  # largest frame separation pooled by the steady-drift search
RATE_STEP_PX = 0.25  # grid step of the steady-drift search, px per frame


def _low_snr_rate(
    spectra: Store, params: AlignParams, band: np.ndarray | None, shape: tuple[int, int]
) -> np.ndarray:
    """Drift per frame v (px) under a steady drift, from all pairs up to ``RATE_GAPS`` apart.

    Under steady drift pair (i, j) is offset by d_ij = (i − j)·v, so the cross-correlations
    of all pairs, pooled by separation g into maps P_g, add up coherently only at the true
    drift: v maximises S(v) = Σ_g P_g(−g·v). S is searched on a grid of ``RATE_STEP_PX`` over
    |g_max·v| within the allowed shift (the smallest |v| among near-equal maxima, as for
    single peaks), then refined by Newton steps on the exact Fourier series of every P_g.
    """
    from scipy import ndimage  # here: the default path never loads scipy.ndimage

    n = len(spectra)
    g_max = min(n - 1, RATE_GAPS)
    pairs = np.array([(i, i + g) for g in range(1, g_max + 1) for i in range(n - g)])
    groups = pairs[:, 1] - pairs[:, 0] - 1
    pooled = np.zeros((g_max, *spectra.shape[1:]), dtype=np.complex64)
    step = spectra.pair_batch()
    for b in range(0, len(pairs), step):  # accumulated pair by pair, in order
        part = slice(b, b + step)
        pair_cross(spectra, pairs[part], params.alpha, band, groups[part], out=pooled)
    maps = sfft.irfft2(pooled, s=shape, workers=fft_workers())
    scale = -np.arange(1, g_max + 1, dtype=float)  # P_g peaks at d = −g·v
    reach = (params.max_shift_px or 0.25 * min(shape)) / g_max
    steps = np.arange(-reach, reach + RATE_STEP_PX / 2, RATE_STEP_PX)
    vy, vx = np.meshgrid(steps, steps, indexing="ij")
    inside = vy**2 + vx**2 <= reach**2
    total = np.zeros(vy.shape)
    for g_map, g in zip(maps, scale, strict=True):
        coords = np.stack([(g * vy) % shape[0], (g * vx) % shape[1]])
        total += ndimage.map_coordinates(g_map, coords, order=1, mode="grid-wrap")
    total = np.where(inside, total, -np.inf)
    top, floor = total[inside].max(), total[inside].mean()
    near = total >= floor + (1.0 - PEAK_TIE) * (top - floor)
    best = np.unravel_index(np.where(near, vy**2 + vx**2, np.inf).argmin(), total.shape)
    v = np.array([vy[best], vx[best]])
    sp = Spectral(shape)
    for _ in range(4):
        _, grad, hess = fourier_moments(pooled, sp.ky, sp.kx, sp.weights, scale[:, None] * v)
        total_grad = (scale[:, None] * grad).sum(axis=0, keepdims=True)
        total_hess = (scale[:, None, None] ** 2 * hess).sum(axis=0, keepdims=True)
        step = newton_step(total_grad, total_hess)[0]
        v = v + np.clip(step, -RATE_STEP_PX, RATE_STEP_PX)
        if np.abs(step).max() < 1e-3:
            break
    return v


def _measure_pairs(
    spectra: Store,
    pairs: np.ndarray,
    params: AlignParams,
    shape: tuple[int, int],
    rate: np.ndarray | None,
    band: np.ndarray | None,
    positions: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (m, 2) and normalised peak heights (m,) of every pair.

    Without ``positions``: the coarse measurement — integer peaks of the NCF at α (each pair
    searching near the offset a drift ``rate`` predicts, if given) and a parabola through each
    peak and its neighbours (≈ 0.1 px; the start of everything that follows). With
    ``positions``: Newton steps at α_fine from the offsets they predict (exact sub-pixel)."""
    sp = Spectral(shape)
    max_shift = params.max_shift_px or 0.25 * min(shape)
    mask = shift_mask(shape, max_shift)
    if positions is None:
        offsets, values = _coarse_peaks(spectra, pairs, params.alpha, band, rate, mask, shape)
        energy = peak_energy(spectra, sp.weights, params.alpha)
        size = shape[0] * shape[1]
        return offsets, values * size / np.sqrt(energy[pairs[:, 0]] * energy[pairs[:, 1]])
    starts = positions[pairs[:, 0]] - positions[pairs[:, 1]]
    offsets, values = np.zeros((len(pairs), 2)), np.zeros(len(pairs))
    step = spectra.pair_batch()
    for b in range(0, len(pairs), step):  # pairs a block at a time: no full set of spectra
        part = slice(b, b + step)
        fine = pair_cross(spectra, pairs[part], params.alpha_fine, band)
        offsets[part], values[part] = refine_peaks(fine, shape, starts[part])
    energy = peak_energy(spectra, sp.weights, params.alpha_fine)
    heights = values / np.sqrt(energy[pairs[:, 0]] * energy[pairs[:, 1]])
    return offsets, heights


def _coarse_peaks(
    spectra: Store, pairs: np.ndarray, alpha: float, band: np.ndarray | None,
    rate: np.ndarray | None, mask: np.ndarray, shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Coarse offsets and peak values of every pair's NCF at α. The closest pairs search the
    whole allowed range (whole maps); farther pairs search within 3 + g/2 px of the offset their
    closer pairs predict, so a lattice-equivalent peak is never taken (patches only). With a
    steady drift ``rate`` every pair searches near −g·rate. Pairs go a block at a time."""
    gaps = pairs[:, 1] - pairs[:, 0]
    radius = 3.0 + 0.5 * gaps.astype(float)
    offsets, values = np.zeros((len(pairs), 2)), np.zeros(len(pairs))
    step = spectra.pair_batch()

    def near(which: np.ndarray, predicted: np.ndarray) -> None:
        for b in range(0, len(which), step):
            idx = which[b : b + step]
            cross = pair_cross(spectra, pairs[idx], alpha, band)
            offsets[idx], values[idx] = peaks_near(
                cross, predicted[b : b + step], radius[idx], mask, shape
            )

    if rate is not None:
        near(np.arange(len(pairs)), -gaps[:, None] * rate[None, :])
        return offsets, values
    first = np.flatnonzero(gaps == gaps.min())
    for b in range(0, len(first), step):
        idx = first[b : b + step]
        cross = pair_cross(spectra, pairs[idx], alpha, band)
        maps = sfft.irfft2(cross, s=shape, workers=fft_workers())
        offsets[idx], values[idx] = parabolic_peaks(maps, integer_peaks(maps, mask))
    if len(first) == len(pairs):
        return offsets, values
    chain = [tuple(p) for p in pairs[first]]
    positions, _ = solve_positions(len(spectra), chain, offsets[first], np.ones(len(first)))
    rest = np.flatnonzero(gaps != gaps.min())
    near(rest, positions[pairs[rest, 0]] - positions[pairs[rest, 1]])
    return offsets, values


def _template_passes(
    spectra: Store, shifts: np.ndarray, params: AlignParams, shape: tuple[int, int],
    band: np.ndarray | None, energy: np.ndarray, search_px: float | None = None,
    passes: int = 6,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Match every frame to the leave-one-out average of the others: each pass rebuilds the
    averages and takes one Newton step at α_fine for every frame. Without ``search_px`` the
    first ``GLOBAL_PASSES`` passes begin with an integer search at α over the whole allowed
    range (frames jump to their best integer lag); with it, steps that would leave
    ``search_px`` of the start are refused. The average of n−1 frames has √(n−1) the SNR of
    one, which keeps the integer peak right where single pairs are too noisy. Passes stop when
    every step is below ``START_TOLERANCE_PX`` (a start; the fine stage refines it). Returns
    (shifts, normalised peak height of every frame)."""
    mask = shift_mask(shape, params.max_shift_px or 0.25 * min(shape))
    origin = shifts.copy()
    score = np.full(len(spectra), -np.inf)
    searching = search_px is None
    for k in range(passes):
        jumped = False
        if searching and k < GLOBAL_PASSES:
            start = np.zeros_like(shifts)
            for first, cross in loo_blocks(spectra, shifts, shape, params.alpha, band):
                maps = sfft.irfft2(cross, s=shape, workers=fft_workers())
                start[first : first + len(maps)] = integer_peaks(maps, mask)
            jumped = searching = bool(np.any(start != 0))
            shifts = shifts + start
        delta, values = loo_newton(spectra, shifts, params.alpha_fine, shape, band)
        shifts = shifts + delta
        if search_px is not None:
            far = np.linalg.norm(shifts - origin, axis=1) > search_px
            shifts[far] -= delta[far]
            delta[far] = 0.0
        score = values / np.sqrt(energy * energy.mean())
        if not jumped and np.abs(delta).max() < START_TOLERANCE_PX:
            break
    return shifts - shifts.mean(axis=0), score


BASIN_PX = 3  # radius of the fine stage's search around the start, px


def _basin_search(
    spectra: Store, shifts: np.ndarray, params: AlignParams, shape: tuple[int, int],
    band: np.ndarray | None, passes: int = 2,
) -> np.ndarray:  # fmt: skip
    """Move every frame to the highest point of its correlation with the leave-one-out average
    (at α_fine, fine-stage weights) within ``BASIN_PX`` of where it is, then a parabola.

    Newton steps climb the nearest hill; at low dose the surface near a start that is a pixel
    off carries noise bumps, and the highest point nearby is the better basin. Only the
    (2·BASIN_PX + 1)² lags around each frame are evaluated (a few rows of the inverse DFT)."""
    d = np.arange(-BASIN_PX, BASIN_PX + 1)
    disc = d[:, None] ** 2 + d[None, :] ** 2 <= BASIN_PX**2
    centre = np.array([BASIN_PX, BASIN_PX])
    for _ in range(passes):
        if params.alpha_fine == 0:
            patches = loo_patches(spectra, shifts, shape, band, BASIN_PX)
        else:
            patches = np.empty((len(shifts), len(d), len(d)))
            for first, cross in loo_blocks(spectra, shifts, shape, params.alpha_fine, band):
                zero = np.zeros((len(cross), 2), dtype=int)
                patches[first : first + len(cross)] = correlation_patches(
                    cross, zero, BASIN_PX, shape
                )
        best = np.where(disc[None], patches, -np.inf).reshape(len(patches), -1).argmax(axis=1)
        by, bx = np.unravel_index(best, disc.shape)
        inner = (np.abs(np.stack([by, bx], 1) - centre) < BASIN_PX).all(axis=1)
        lags = np.stack([by, bx], axis=1).astype(float)
        lags[inner], _ = parabolic_peaks(patches[inner], lags[inner].astype(int))
        moves = lags - centre
        shifts = shifts + moves
        if np.abs(moves).max() < 0.5:
            break
    return shifts


def _refine_against_average(
    spectra: Store,
    shifts: np.ndarray,
    params: AlignParams,
    shape: tuple[int, int],
    band: np.ndarray | None,
) -> tuple[np.ndarray, list[float]]:
    """Passes against the leave-one-out average until updates < ``refine_tolerance_px``.

    A pass is up to four Newton steps for every frame, each against the average rebuilt at the
    new shifts; a frame that a pass would move by 1 px or more keeps its place (a refinement
    never jumps). Returns (shifts, largest update of each pass)."""
    updates: list[float] = []
    for _ in range(params.refine):
        before = shifts
        for _ in range(4):  # Newton steps, each against the average rebuilt at the new shifts
            delta, _ = loo_newton(spectra, shifts, params.alpha_fine, shape, band)
            shifts = shifts + delta
            if np.abs(delta).max() < params.refine_tolerance_px:
                break
        moved = shifts - before
        far = np.abs(moved).max(axis=1) >= 1.0  # a refinement never jumps
        shifts[far] = before[far]
        updates.append(float(np.abs(np.where(far[:, None], 0.0, moved)).max()))
        if updates[-1] < params.refine_tolerance_px:
            break
    return shifts, updates


def _robust_start(
    spectra: Store,
    pair_positions: np.ndarray,
    consistent: float,
    params: AlignParams,
    shape: tuple[int, int],
    band: np.ndarray | None,
    pairs: np.ndarray,
) -> np.ndarray:
    """Positions to start the final measurement from.

    When the pairs agree with their joint solution (``consistent`` = fraction of pairs within
    ``CONSISTENT_PX`` of it ≥ ``CONSISTENT_FRACTION``) the pair solution is kept and only
    improved locally against the leave-one-out average: its pairs carry the continuity
    between neighbours that settles a crystal's lattice ambiguity. When they do not
    (noise-dominated pairs), two more candidates compete: a steady drift found by pooling all
    pairs (:func:`_low_snr_rate`, improved locally) and a global search from no shift at all.
    Each candidate's scores (how well its frames match the average of the others) are marked
    down by what noise alone gains a search of its breadth (:class:`.rigid_start.ScoreNoise`); the
    candidates that then score as well as the best within noise are equally likely, and of
    those the smoothest trajectory wins (drift is smooth, lattice jumps are not). A clearly
    better fit always wins (:func:`~scherzer.processing.rigid_start.most_plausible`).
    """
    local_px = 2.0
    energy = peak_energy(spectra, Spectral(shape).weights, params.alpha_fine)
    local = _template_passes(spectra, pair_positions, params, shape, band, energy, local_px)
    if consistent >= CONSISTENT_FRACTION:
        return local[0]
    n = len(spectra)
    mask = shift_mask(shape, params.max_shift_px or 0.25 * min(shape))
    rate = _low_snr_rate(spectra, params, band, shape)
    steady = np.arange(n)[:, None] * rate[None, :]
    searched = [
        (local, math.pi * local_px**2),
        (_template_passes(spectra, steady - steady.mean(axis=0), params, shape, band, energy,
                          local_px),
         math.pi * local_px**2),
        (_template_passes(spectra, np.zeros_like(pair_positions), params, shape, band, energy),
         float(mask.sum())),
    ]  # fmt: skip
    candidates = []
    score_noise = ScoreNoise(spectra, shape, band, energy)
    for (shifts, score), area_px2 in searched:
        noise = score_noise(shifts)
        marked = score - noise * math.sqrt(2.0 * math.log(max(area_px2, 1.0)))
        candidates.append((shifts, marked, noise))
    return most_plausible(candidates)


@one_blas_thread
def measure_shifts(
    frames: Any, params: AlignParams | None = None, *, scratch: Scratch | None = None
) -> AlignmentResult:
    """Measure every frame's shift (see the module docstring); no frames are moved.

    ``frames``: a (n, y, x) array or a :class:`~scherzer.processing.chunked.FrameSource` (e.g.
    ``scherzer.io.chunks.FileFrames``, read a block at a time). ``scratch``: a factory of
    frame-indexed scratch arrays (``scherzer.io.chunks.ScratchFactory``) where spectra go when
    they would take more than half of ``params.memory_budget_mb``; without it they stay in
    memory. Work blocks are sized from the budget; the shifts do not depend on it.

    BLAS runs single-threaded here (:func:`~scherzer.workers.one_blas_thread`): the correlation
    moments are many small batched products, for which BLAS threads cost more in start-up and,
    on a busy machine, in spin-waiting than they gain (measured: 0.45 s against 1.1–6 s for 16
    frames of 512² on 2 loaded cores). The FFTs keep their workers.
    """
    return _measure_shifts(frames, params or AlignParams(), scratch)


def _measure_shifts(frames: Any, p: AlignParams, scratch: Scratch | None) -> AlignmentResult:
    t0 = time.perf_counter()
    source, unchecked = as_source(frames)
    n = source.shape[0]
    p.check(n)
    plan = plan_memory(p.budget_bytes(), scratch)
    measured = region(p.roi, n, source.shape[1:])
    pairs = np.asarray(pair_graph(n, p), dtype=int)
    positions = _coarse_stage(source, measured, pairs, p, plan, unchecked)
    whole = np.zeros_like(positions, dtype=int)
    cut = common_crop(measured, positions) if p.fine_window is not None else None
    leave_one_out = p.snr_weighting and n > 2
    if cut is not None:
        whole, crop = cut
        spectra, band = rigid_spectra(source, crop, p, p.fine_window, plan, not leave_one_out)
    else:
        crop = measured
        spectra, band = rigid_spectra(source, crop, p, p.window, plan)
    shape = crop.shape
    if cut is not None and leave_one_out:
        weight = template_weight(spectra, positions - whole, shape)
        band = weight if band is None else band * weight
    residual_shifts = positions - whole
    if n > 2:
        residual_shifts = _basin_search(spectra, residual_shifts, p, shape, band)
    offsets, heights = _measure_pairs(spectra, pairs, p, shape, None, band, residual_shifts)
    positions, keep = _solve(n, pairs, offsets, heights, p)
    positions, updates = _refine_against_average(spectra, positions, p, shape, band)
    positions = positions + whole
    offsets = offsets + (whole[pairs[:, 0]] - whole[pairs[:, 1]])
    result = _result(n, pairs, offsets, heights, positions, keep, p)
    result.seconds = time.perf_counter() - t0
    result.refinement_updates_px = updates
    return result


def _coarse_stage(
    source: FrameSource, measured: Crop, pairs: np.ndarray, p: AlignParams, plan: MemoryPlan,
    check: bool,
) -> np.ndarray:  # fmt: skip
    """Positions (px of the measured region) to start the fine stage from: pairs measured at
    α on frames binned by :func:`coarse_factor`, solved, and a robust start (steps 1–5)."""
    n = source.shape[0]
    factor = coarse_factor(measured.size)
    binned = replace(measured, factor=factor)
    shape = binned.shape
    pc = replace(p, max_shift_px=None if p.max_shift_px is None else p.max_shift_px / factor)
    spectra, band = rigid_spectra(source, binned, pc, pc.window, plan, check=check)
    rate = None
    if pc.low_snr and n > 2:
        rate = _low_snr_rate(spectra, pc, band, shape)
    offsets, heights = _measure_pairs(spectra, pairs, pc, shape, rate, band)
    positions, _ = _solve(n, pairs, offsets, heights, pc)
    if n > 2:
        residual = np.linalg.norm(
            offsets - (positions[pairs[:, 0]] - positions[pairs[:, 1]]), axis=1
        )
        # a tree (sequential or reference graph) fits its pairs exactly: no evidence either way
        cycles = len(pairs) > n - 1
        consistent = float(np.mean(residual <= CONSISTENT_PX)) if cycles else 0.0
        positions = _robust_start(spectra, positions, consistent, pc, shape, band, pairs)
    return positions * factor


def _spectra(
    frames: np.ndarray, params: AlignParams, window: str, snr: bool = True
) -> tuple[Store, np.ndarray | None]:
    """Spectra of the prepared whole frames (in memory) and the correlation weight (band-pass ×
    SNR weight; ``snr=False``: the band-pass alone)."""
    arr = as_frames(frames)
    crop = region(None, len(arr), arr.shape[1:])
    plan = plan_memory(params.budget_bytes())
    return rigid_spectra(ArraySource(arr), crop, params, window, plan, snr)


def _common_crop(frames: np.ndarray, shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(integer offsets o_i, every frame cut to the area all share) of an in-memory stack, or
    None (see :func:`~scherzer.processing.rigid_spectra.common_crop`)."""
    arr = np.asarray(frames)
    cut = common_crop(region(None, len(arr), arr.shape[1:]), shifts)
    if cut is None:
        return None
    whole, crop = cut
    return whole, crop.cut(arr, 0)


def _result(
    n: int, pairs: np.ndarray, offsets: np.ndarray, heights: np.ndarray, positions: np.ndarray,
    keep: np.ndarray, p: AlignParams,
) -> AlignmentResult:  # fmt: skip
    """The result of a measurement from its pairs and positions."""
    shifts = gauge(positions, p.reference)
    pair_offsets = np.full((n, n, 2), np.nan)
    similarity = np.full((n, n), np.nan)
    np.fill_diagonal(similarity, 1.0)
    for (i, j), d, h in zip(pairs, offsets, heights, strict=True):
        pair_offsets[i, j], pair_offsets[j, i] = d, -d
        similarity[i, j] = similarity[j, i] = h
    predicted = positions[pairs[:, 0]] - positions[pairs[:, 1]]
    pair_residual = np.linalg.norm(offsets - predicted, axis=1)
    residuals = np.zeros(n)
    peak = np.zeros(n)
    for f in range(n):
        mine = (pairs[:, 0] == f) | (pairs[:, 1] == f)
        used = mine & keep
        residuals[f] = float(np.sqrt(np.mean(pair_residual[used] ** 2))) if used.any() else np.nan
        peak[f] = float(np.mean(heights[mine]))
    return AlignmentResult(
        shifts_px=shifts,
        peak_heights=peak,
        pair_offsets=pair_offsets,
        similarity=similarity,
        residuals_px=residuals,
        flagged=_flag(peak, residuals, p),
        reference=p.reference,
        params=p,
        seconds=0.0,
        rejected_pairs=[(int(i), int(j)) for (i, j), k in zip(pairs, keep, strict=True) if not k],
    )


def _solve(
    n: int, pairs: np.ndarray, offsets: np.ndarray, heights: np.ndarray, params: AlignParams
) -> tuple[np.ndarray, np.ndarray]:
    weights = np.clip(heights, 1e-3, None) ** 2
    return solve_positions(n, [tuple(q) for q in pairs], offsets, weights, params.outlier_px)


def _flag(peak: np.ndarray, residuals: np.ndarray, params: AlignParams) -> list[int]:
    """Frames whose similarity is far below the series' or whose pairs disagree."""
    med = np.median(peak)
    low = peak < 0.5 * med
    disagree = np.nan_to_num(residuals, nan=np.inf) > max(params.outlier_px, 0.5)
    return [int(i) for i in np.flatnonzero(low | disagree)]


# --------------------------------------------------------------------------------------------
# stacks
# --------------------------------------------------------------------------------------------
def align_stack(
    stack: ImageStack, params: AlignParams | None = None, *, others: Sequence[ImageStack] = ()
) -> tuple[AlignmentResult, list[ImageStack]]:
    """Measure on ``stack`` (its ROI), apply the same shifts to it and to ``others`` (e.g. the
    ABF recorded with the HAADF). Returns the result and the aligned stacks, ``stack`` first."""
    p = params or AlignParams()
    for o in others:
        if o.frames.shape != stack.frames.shape:
            raise AlignmentError(
                f"signals to align together must have the same shape; got {o.frames.shape} "
                f"and {stack.frames.shape}"
            )
    result = measure_shifts(stack.frames, p)
    aligned_stacks = []
    for s in (stack, *others):
        moved, count = apply_shifts(s.frames, result.shifts_px, p.output)
        meta = {**s.metadata, "aligned": True, "alignment_reference": str(p.reference)}
        aligned_stacks.append(replace(s, frames=moved, metadata=meta))
        if s is stack:
            result.aligned, result.count = moved, count
            result.average = combine(moved, count, p)
    return result, aligned_stacks


def params_dict(params: AlignParams) -> dict[str, Any]:
    """JSON-able parameters."""
    return asdict(params)
