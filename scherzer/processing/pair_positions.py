"""The pair graph of a rigid registration and the joint solution of positions from its pairs.

One job: which frame pairs are measured (:func:`pair_graph`: reference, sequential, k nearest
neighbours or all pairs), and the weighted least-squares positions that best explain the
measured pair offsets, with outlier pairs removed while the graph stays connected
(:func:`solve_positions`), put in the requested gauge (:func:`gauge`).

Conventions (as :mod:`scherzer.processing.registration`): positions in pixels, (n, 2) as
(dy, dx); a pair offset d_ij = s_i − s_j; edges (i, j) with i < j.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from scherzer.processing.align_params import AlignParams

__all__ = ["gauge", "pair_graph", "solve_positions"]


def pair_graph(n: int, params: AlignParams) -> list[tuple[int, int]]:
    """Edges (i, j), i < j, of the requested pair graph."""
    if params.pairs == "all":
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    if params.pairs == "sequential":
        return [(i, i + 1) for i in range(n - 1)]
    if params.pairs == "reference":
        ref = 0 if params.reference == "mean" else int(params.reference)
        return [(min(ref, j), max(ref, j)) for j in range(n) if j != ref]
    k = max(1, params.neighbours)
    return [(i, j) for i in range(n) for j in range(i + 1, min(n, i + k + 1))]


def gauge(shifts: np.ndarray, reference: str | int) -> np.ndarray:
    """Shifts in the reference's frame: ``"mean"`` (Σ s = 0) or frame N (s_N = 0)."""
    if reference == "mean":
        return shifts - shifts.mean(axis=0)
    return shifts - shifts[int(reference)]


def solve_positions(
    n: int,
    pairs: Sequence[tuple[int, int]],
    offsets: np.ndarray,
    weights: np.ndarray,
    outlier_px: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares positions from pair offsets d_ij = s_i − s_j, outliers removed.

    Iteratively: solve, compute residuals, drop pairs whose residual exceeds max(outlier_px,
    4 × robust σ) while every frame stays connected. Returns (positions (n, 2) with mean zero,
    boolean mask of kept pairs).
    """
    pairs_arr = np.asarray(pairs, dtype=int)
    keep = np.ones(len(pairs_arr), dtype=bool)
    a = np.zeros((len(pairs_arr), n))
    a[np.arange(len(pairs_arr)), pairs_arr[:, 0]] = 1.0
    a[np.arange(len(pairs_arr)), pairs_arr[:, 1]] = -1.0
    w = np.maximum(np.asarray(weights, dtype=float), 1e-6)
    positions = np.zeros((n, 2))
    for _ in range(10):
        sw = np.sqrt(w * keep)[:, None]
        lhs = np.vstack([a * sw, np.ones((1, n))])  # gauge row: Σ s = 0
        rhs = np.vstack([offsets * sw, np.zeros((1, 2))])
        positions = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
        residual = np.linalg.norm(offsets - a @ positions, axis=1)
        scale = 1.4826 * np.median(residual[keep]) if keep.any() else 0.0
        limit = max(outlier_px, 4.0 * scale)
        worst = np.argsort(-np.where(keep, residual, -1.0))
        changed = False
        for p in worst:
            if not keep[p] or residual[p] <= limit:
                break
            keep[p] = False
            if not _connected(n, pairs_arr[keep]):
                keep[p] = True
                continue
            changed = True
        if not changed:
            break
    return positions - positions.mean(axis=0), keep


def _connected(n: int, pairs: np.ndarray) -> bool:
    """Whether the edges ``pairs`` (k, 2) join all n frames into one graph (union–find)."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(int(i))] = find(int(j))
    return len({find(i) for i in range(n)}) == 1
