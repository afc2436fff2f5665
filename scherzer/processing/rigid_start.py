"""Choosing the start of rigid registration's fine stage among competing candidates: what noise
alone gains a candidate's template scores (:class:`ScoreNoise`) and the smoothest trajectory
among those that fit as well as the best within noise (:func:`most_plausible`).

Conventions as in :mod:`scherzer.processing.registration` (shifts in px, (dy, dx), spectra as
rfft halves in a :class:`~scherzer.processing.chunked.Store`).
"""

from __future__ import annotations

import math

import numpy as np

from scherzer.processing.chunked import Store
from scherzer.processing.correlation import (
    aligned_total,
    full_weight,
    mean_power,
    noise_floor,
    phase_ramps,
)

__all__ = ["TIE_SIGMAS", "ScoreNoise", "most_plausible", "roughness"]

# Candidates whose mean template score is below the best by less than this many standard errors
# of the score difference (from the noise alone, :class:`ScoreNoise`, or from the frame-by-frame
# scatter of the difference, whichever is larger) fit equally well: only then may the smoothness
# prior choose. Larger values let the prior override real (if small) differences in fit; smaller
# values let noise decide between lattice-equivalent trajectories at low dose.
TIE_SIGMAS = 2.0


def roughness(shifts: np.ndarray) -> float:
    """RMS second difference of a trajectory (px): drift is smooth, lattice jumps are not."""
    if len(shifts) < 3:
        return 0.0
    return float(np.sqrt(np.mean(np.sum(np.diff(shifts, n=2, axis=0) ** 2, axis=1))))


class ScoreNoise:
    """Standard deviation, per frame, of the normalised template score that noise alone gives.

    Var Σ_k w Re[A_i T_i*] ≈ ½ N Σ_k w² (|T|² + |G_i|²/(n−1)) with N the white-noise power,
    T the mean of the aligned frames and G_i frame i. A frame that searched M lags for its
    best place gains about σ·√(2 ln M) from noise alone: candidates found by wider searches
    are marked down by that much before they are compared. The shift-independent terms are
    computed once; calling with shifts adds the template term.
    """

    def __init__(
        self, spectra: Store, shape: tuple[int, int], band: np.ndarray | None,
        energy: np.ndarray,
    ) -> None:  # fmt: skip
        self.spectra, self.shape = spectra, shape
        self.noise = noise_floor(mean_power(spectra))
        self.w2 = full_weight(shape, band, hermitian=True) ** 2
        self.g_term = np.empty(len(spectra))
        for first, block in spectra.blocks():
            power = block.real**2 + block.imag**2
            self.g_term[first : first + len(block)] = np.einsum("nyx,yx->n", power, self.w2)
        self.g_term /= max(len(spectra) - 1, 1)
        self.norm = np.sqrt(energy * energy.mean())

    def __call__(self, shifts: np.ndarray) -> np.ndarray:
        ramp_y, ramp_x = phase_ramps(shifts, self.shape)
        template = aligned_total(self.spectra, ramp_y, ramp_x) / np.float32(len(shifts))
        t_term = float(np.sum(self.w2 * (template.real**2 + template.imag**2)))
        return np.sqrt(0.5 * self.noise * (t_term + self.g_term)) / self.norm


def most_plausible(candidates: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Of (shifts, per-frame template scores, per-frame score noise σ) candidates, the
    smoothest trajectory among those that fit as well as the best *within noise*: a mean
    score deficit within ``TIE_SIGMAS`` standard errors of the difference — the larger of
    what noise alone gives (σ of both candidates' scores, per frame, over √n) and the
    frame-by-frame scatter of the deficits. At high dose σ is small and the better fit wins
    however rough its trajectory (real drift changes between frames); at low dose frames that
    search freely fit the noise of the others' average a little, so a small advantage over a
    smooth trajectory is no evidence and the prior breaks the tie."""
    means = [float(np.mean(score)) for _, score, _ in candidates]
    best = int(np.argmax(means))
    top, top_noise = candidates[best][1], candidates[best][2]
    near = []
    for shifts, score, noise in candidates:
        deficit = top - score
        n = len(deficit)
        from_noise = math.sqrt(float(np.mean(noise**2 + top_noise**2)) / n)
        from_scatter = float(np.std(deficit)) / math.sqrt(n)
        if float(np.mean(deficit)) <= TIE_SIGMAS * max(from_noise, from_scatter):
            near.append(shifts)
    return min(near, key=roughness)
