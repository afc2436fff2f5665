"""EFTEM processing numerics: edge windows, series alignment, three-window elemental maps.

Pure numerics; the conventions (three-window power-law background, jump ratio, shifts) are
stated in :mod:`scherzer.processing.eftem`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydantic
from scipy import ndimage

from scherzer.processing.registration import AlignParams, apply_shifts, measure_shifts

#: Gauss–Legendre nodes per energy window: the window integral of E^(−r) is exact to ~1e-12 for
#: windows narrower than E/2; more nodes only cost time.
WINDOW_NODES = 8
#: Newton steps on the exponent r from the centre-point estimate (each gains ~(w/E)² relative).
EXPONENT_NEWTON_STEPS = 3


# ------------------------------------------------------------------------------ windows
def edge_windows(
    energies: Sequence[float], slit_width_ev: float, edge_onset_ev: float, margin_ev: float = 0.0
) -> tuple[int, int, int]:
    """(pre1, pre2, post) image indices for the three-window method: the two highest-energy
    windows ending ≤ onset − margin and the lowest window starting ≥ onset."""
    e = np.asarray(energies, dtype=np.float64)
    half = 0.5 * slit_width_ev
    pre = np.flatnonzero(e + half <= edge_onset_ev - margin_ev)
    post = np.flatnonzero(e - half >= edge_onset_ev)
    if pre.size < 2 or post.size < 1:
        raise ValueError(
            f"need two windows ending below {edge_onset_ev - margin_ev} eV and one starting above"
            f" {edge_onset_ev} eV (slit {slit_width_ev} eV); energies are {e.tolist()}"
        )
    pre = pre[np.argsort(e[pre])]
    return int(pre[-2]), int(pre[-1]), int(post[np.argmin(e[post])])


def pre_edge_indices(
    energies: Sequence[float],
    slit_width_ev: float,
    edge_onset_ev: float,
    min_energy_ev: float = -math.inf,
) -> np.ndarray:
    """Indices of images whose window lies wholly in [min_energy_ev, edge onset)."""
    e = np.asarray(energies, dtype=np.float64)
    half = 0.5 * slit_width_ev
    return np.flatnonzero((e + half <= edge_onset_ev) & (e - half >= min_energy_ev))


# ------------------------------------------------------------------------------ alignment
@dataclass
class SeriesAlignSettings:
    """Rigid alignment of an EFTEM series measured on reference images and applied to all.

    ``drift_order``: polynomial degree in time of the drift model that carries the measured
    shifts to the other images (1: steady drift; 0: the mean shift); ``max_shift_px`` between
    two reference images (None: a quarter of the field); ``use_model_for_references``: give the
    references the fitted drift too (smoother) instead of their own measurements.
    """

    __pydantic_config__ = pydantic.ConfigDict(extra="forbid")

    drift_order: int = 1
    max_shift_px: float | None = None
    use_model_for_references: bool = False
    refine_passes: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.refine_passes <= 10:
            raise ValueError(f"refine_passes must be in 0..10; got {self.refine_passes}")
        if not 0 <= self.drift_order <= 3:
            raise ValueError(f"drift_order must be in 0..3; got {self.drift_order}")
        if self.max_shift_px is not None and not self.max_shift_px > 0:
            raise ValueError(f"max_shift_px must be > 0; got {self.max_shift_px}")


@dataclass
class AlignedSeries:
    """Aligned frames (cropped to the area all frames share, starting at ``crop_origin_px``
    (y0, x0) of the input grid), the shifts applied (n, 2; reference image at 0), the
    reference indices and the measured shifts of the references."""

    frames: np.ndarray
    shifts_px: np.ndarray
    reference_indices: np.ndarray
    measured_px: np.ndarray
    crop_origin_px: tuple[int, int]


def _drift_fit(times: np.ndarray, shifts: np.ndarray, order: int, at: np.ndarray) -> np.ndarray:
    """Least-squares polynomial (per axis) of ``order`` ≤ n−1 through (times, shifts) at ``at``."""
    order = min(order, len(times) - 1)
    t0, span = float(times.mean()), float(np.ptp(times)) or 1.0
    basis = np.vander((times - t0) / span, order + 1)
    coef, *_ = np.linalg.lstsq(basis, shifts, rcond=None)
    return np.vander((at - t0) / span, order + 1) @ coef


def _measure_references(frames: np.ndarray, settings: SeriesAlignSettings) -> np.ndarray:
    """Shifts of the reference frames (first at 0), refined on their common area."""
    if len(frames) == 1:
        return np.zeros((1, 2))
    params = AlignParams(reference=0, max_shift_px=settings.max_shift_px)
    shifts = measure_shifts(frames, params).shifts_px
    for _ in range(settings.refine_passes):
        moved, _ = apply_shifts(frames, shifts, output="crop")
        shifts = shifts + measure_shifts(moved, params).shifts_px
    return shifts - shifts[0]


def align_series(
    frames: np.ndarray,
    reference_indices: Sequence[int],
    times_s: Sequence[float] | None = None,
    settings: SeriesAlignSettings | None = None,
) -> AlignedSeries:
    """Measure shifts on ``reference_indices`` (e.g. :func:`pre_edge_indices`) and apply a
    drift model to all frames.

    Shifts of the references come from :func:`~scherzer.processing.registration.measure_shifts`
    (gauge: the first reference at 0); the others from a polynomial in ``times_s``
    (mid-exposure; default the image index) fitted to them. All frames are moved by
    :func:`~scherzer.processing.registration.apply_shifts` (Fourier, cropped to the common area).
    """
    s = settings or SeriesAlignSettings()
    arr = np.asarray(frames, dtype=np.float32)
    refs = np.asarray(reference_indices, dtype=int)
    if refs.size < 1 or refs.min() < 0 or refs.max() >= len(arr):
        raise ValueError(f"reference indices {refs.tolist()} must be in 0..{len(arr) - 1}")
    t = np.arange(len(arr), dtype=np.float64) if times_s is None else np.asarray(times_s, float)
    measured = _measure_references(arr[refs], s)
    shifts = _drift_fit(t[refs], measured, s.drift_order, t)
    if not s.use_model_for_references:
        shifts[refs] = measured
    shifts -= shifts[refs[0]]
    aligned, _ = apply_shifts(arr, shifts, output="crop")
    origin = tuple(max(0, math.ceil(float(np.max(-shifts[:, a])) - 1e-9)) for a in range(2))
    return AlignedSeries(aligned, shifts, refs, measured, origin)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ maps
@dataclass
class ThreeWindowSettings:
    """Three-window elemental map (module docstring). ``smoothing_px``: Gaussian σ applied to
    the two pre-edge images for the power-law fit only (the post-edge image is never smoothed;
    σ ≈ 1 px cuts the noise of the fitted exponent several-fold at the cost of fine detail in
    the background). ``floor_counts``: counts at or below this count as this (logarithms of zero
    or negative dark-subtracted counts). ``min_exponent``/``max_exponent``: the physical range
    of r (2–6 in practice) that a noisy fit is clamped to."""

    __pydantic_config__ = pydantic.ConfigDict(extra="forbid")

    smoothing_px: float = 1.0
    floor_counts: float = 1.0
    min_exponent: float = 1.0
    max_exponent: float = 8.0

    def __post_init__(self) -> None:
        if not (self.smoothing_px >= 0 and self.floor_counts > 0):
            raise ValueError("need smoothing_px ≥ 0 and floor_counts > 0")
        if not 0 < self.min_exponent < self.max_exponent:
            raise ValueError("need 0 < min_exponent < max_exponent")


@dataclass
class ThreeWindowResult:
    """float32 maps: ``signal`` = post − background (the elemental map, counts), ``background``
    extrapolated under the post-edge window, ``exponent`` r, ``jump_ratio`` post/pre2 and
    ``fit_ok`` (bool: no floor or clamp was needed)."""

    signal: np.ndarray
    background: np.ndarray
    exponent: np.ndarray
    jump_ratio: np.ndarray
    fit_ok: np.ndarray


def _window_moments(
    centre_ev: float, width_ev: float, r: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(∫_W E^(−r) dE, ∫_W E^(−r) ln E dE) over the window, Gauss–Legendre, per pixel."""
    x, w = np.polynomial.legendre.leggauss(WINDOW_NODES)
    f0 = np.zeros_like(r)
    f1 = np.zeros_like(r)
    for xi, wi in zip(x, w, strict=True):
        e = centre_ev + 0.5 * width_ev * xi
        term = (0.5 * width_ev * wi) * np.exp(-r * math.log(e))
        f0 += term
        f1 += term * math.log(e)
    return f0, f1


def power_law_background(
    pre1: np.ndarray,
    pre2: np.ndarray,
    energies_ev: tuple[float, float, float],
    slit_width_ev: float | tuple[float, float, float],
    settings: ThreeWindowSettings | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background extrapolated under the third window from two pre-edge window integrals.

    ``energies_ev`` = (E1, E2, E3) window centres (E1 < E2 < E3); widths one value or three.
    Returns float64 (background, exponent r, fit_ok) — see the module docstring."""
    s = settings or ThreeWindowSettings()
    e1, e2, e3 = (float(v) for v in energies_ev)
    w1, w2, w3 = (float(v) for v in np.broadcast_to(slit_width_ev, 3))
    if not (0 < e1 - 0.5 * w1 and e1 < e2 < e3):
        raise ValueError(f"need 0 < E1 − w/2 and E1 < E2 < E3; got {energies_ev}")
    i1 = np.asarray(pre1, dtype=np.float64)
    i2 = np.asarray(pre2, dtype=np.float64)
    ok = (i1 > s.floor_counts) & (i2 > s.floor_counts)
    i1, i2 = np.maximum(i1, s.floor_counts), np.maximum(i2, s.floor_counts)
    target = np.log(i1 / i2)
    r = target / math.log(e2 / e1) - math.log(w1 / w2) / math.log(e2 / e1)
    r = np.clip(r, s.min_exponent, s.max_exponent)
    for _ in range(EXPONENT_NEWTON_STEPS):
        a0, a1 = _window_moments(e1, w1, r)
        b0, b1 = _window_moments(e2, w2, r)
        g = np.log(a0 / b0) - target
        slope = b1 / b0 - a1 / a0  # d/dr ln(F1/F2) (> 0 for E1 < E2)
        r = np.clip(r - g / slope, s.min_exponent, s.max_exponent)
    ok &= (r > s.min_exponent) & (r < s.max_exponent)
    amplitude = i2 / _window_moments(e2, w2, r)[0]
    return amplitude * _window_moments(e3, w3, r)[0], r, ok


def jump_ratio_map(pre: np.ndarray, post: np.ndarray, floor_counts: float = 1.0) -> np.ndarray:
    """post / pre (float32); pre at or below ``floor_counts`` counts as the floor."""
    pre_f = np.maximum(np.asarray(pre, dtype=np.float64), floor_counts)
    return (np.asarray(post, dtype=np.float64) / pre_f).astype(np.float32)


def three_window_map(
    frames: np.ndarray,
    energies: Sequence[float],
    slit_width_ev: float,
    edge_onset_ev: float,
    settings: ThreeWindowSettings | None = None,
    margin_ev: float = 0.0,
) -> ThreeWindowResult:
    """Elemental and jump-ratio maps of the edge at ``edge_onset_ev`` from an aligned series
    whose images are scaled to a common exposure (windows chosen by :func:`edge_windows`)."""
    s = settings or ThreeWindowSettings()
    arr = np.asarray(frames)
    e = np.asarray(energies, dtype=np.float64)
    i1, i2, i3 = edge_windows(e, slit_width_ev, edge_onset_ev, margin_ev)
    pre1, pre2 = (arr[i].astype(np.float64) for i in (i1, i2))
    if s.smoothing_px > 0:
        pre1, pre2 = (
            ndimage.gaussian_filter(p, s.smoothing_px, mode="nearest") for p in (pre1, pre2)
        )
    post = arr[i3].astype(np.float64)
    bg, r, ok = power_law_background(pre1, pre2, (e[i1], e[i2], e[i3]), slit_width_ev, s)
    return ThreeWindowResult(
        signal=(post - bg).astype(np.float32), background=bg.astype(np.float32),
        exponent=r.astype(np.float32), jump_ratio=jump_ratio_map(arr[i2], post, s.floor_counts),
        fit_ok=ok,
    )  # fmt: skip


# ------------------------------------------------------------------------------ both, as one step
@dataclass
class EFTEMMapParams:
    """Settings of the processing after an EFTEM series (the pipeline's ``eftem_maps`` step):
    rigid alignment measured on the pre-edge images (window wholly in
    [``reference_min_energy_ev``, ``edge_onset_ev``); None: from the lowest) and applied to all
    (``align``; :class:`SeriesAlignSettings` fields), then the three-window elemental map and
    the jump-ratio map of the edge at ``edge_onset_ev`` (:class:`ThreeWindowSettings` fields;
    ``margin_ev`` kept free below the onset)."""

    __pydantic_config__ = pydantic.ConfigDict(extra="forbid")

    edge_onset_ev: float
    margin_ev: float = 0.0
    align: bool = True
    reference_min_energy_ev: float | None = None
    drift_order: int = 1
    max_shift_px: float | None = None
    refine_passes: int = 2
    smoothing_px: float = 1.0
    floor_counts: float = 1.0
    min_exponent: float = 1.0
    max_exponent: float = 8.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.edge_onset_ev) and self.edge_onset_ev > 0):
            raise ValueError(f"edge_onset_ev must be > 0; got {self.edge_onset_ev}")
        if not self.margin_ev >= 0:
            raise ValueError(f"margin_ev must be ≥ 0; got {self.margin_ev}")
        self.alignment()  # the nested settings validate their own fields
        self.three_window()

    def alignment(self) -> SeriesAlignSettings:
        return SeriesAlignSettings(
            drift_order=self.drift_order, max_shift_px=self.max_shift_px,
            refine_passes=self.refine_passes,
        )  # fmt: skip

    def three_window(self) -> ThreeWindowSettings:
        return ThreeWindowSettings(
            smoothing_px=self.smoothing_px, floor_counts=self.floor_counts,
            min_exponent=self.min_exponent, max_exponent=self.max_exponent,
        )  # fmt: skip


@dataclass
class EFTEMMaps:
    """What :func:`eftem_maps` found: the aligned series (None when not aligned: frames as
    given, no crop) and the three-window maps on its grid."""

    aligned: AlignedSeries | None
    maps: ThreeWindowResult

    @property
    def crop_origin_px(self) -> tuple[int, int]:
        return (0, 0) if self.aligned is None else self.aligned.crop_origin_px


def eftem_maps(
    frames: np.ndarray,
    energies: Sequence[float],
    slit_width_ev: float,
    params: EFTEMMapParams,
    times_s: Sequence[float] | None = None,
) -> EFTEMMaps:
    """Align the series on its pre-edge images (:func:`align_series`) and map the edge
    (:func:`three_window_map`). ``frames`` (n, y, x) scaled to one common exposure."""
    arr = np.asarray(frames, dtype=np.float32)
    aligned = None
    if params.align:
        low = (
            -math.inf if params.reference_min_energy_ev is None else params.reference_min_energy_ev
        )
        onset = params.edge_onset_ev - params.margin_ev
        refs = pre_edge_indices(energies, slit_width_ev, onset, min_energy_ev=low)
        if refs.size == 0:
            raise ValueError(
                f"no pre-edge image to align on: no window wholly in [{low}, {onset}) eV"
            )
        aligned = align_series(arr, refs, times_s, params.alignment())
        arr = aligned.frames
    maps = three_window_map(
        arr, energies, slit_width_ev, params.edge_onset_ev, params.three_window(), params.margin_ev
    )
    return EFTEMMaps(aligned, maps)
