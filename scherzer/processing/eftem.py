"""EFTEM series: automatic exposure, dark references, scaled integer storage, alignment, maps.

Pure numerics: devices enter only as callables passed in; no files, sockets or global state.
Units in names: ``energy_ev``, ``slit_width_ev``, ``exposure_s``, counts in ADU. Images are
(n, y, x) float32 unless stated; shifts follow ARCHITECTURE.md (frame_i(r) ≈ ref(r − s_i)).

Exposure (:func:`next_exposure`): the statistic is the ``percentile`` of an image's net
(dark-subtracted) counts. It changes only when the statistic leaves [``low_counts``,
``high_counts``], and then by a factor 2^k (k ≠ 0 integer) chosen to bring the statistic
nearest ``target_counts`` while staying inside the band, within [``min_exposure_s``,
``max_exposure_s``]. All exposures are powers of two seconds (2^k s, k may be negative).

Dark references (:class:`DarkCache`): one per exposure, acquired the first time an exposure is
needed and reused whenever the series returns to it (counted: ``acquired``, ``reused``).

Storage (:func:`to_stored`): image i's net counts N_i at exposure t_i are kept as int32
``stored_i = round(N_i · t_max / t_i)`` with t_max = ``max_exposure_s``. Since t_max/t_i is a
power of two ≥ 1, this is exact for integer net counts (single dark frames) and never overflows
when ``camera_bit_depth + log2(t_max/t_min) ≤ 31`` (validated). Read back:

* counts scaled to the first image's exposure t_0 (the series reads directly):
  ``stored_i · quantum_counts`` with ``quantum_counts = t_0 / t_max`` (the same for all images:
  the stored stack *is* the series scaled to t_0, in fixed point with log2(t_max/t_0) fraction
  bits);
* the physical net counts of image i at its own exposure: ``stored_i · counts_per_unit[i]``
  with ``counts_per_unit[i] = t_i / t_max`` (the per-image scale factor).

Three-window method (:func:`three_window_map`): the background under an edge is A·E^(−r) per
pixel; r and A come from two pre-edge windows of width w at centres E1 < E2 by solving
∫_{W1} E^(−r) / ∫_{W2} E^(−r) = I1/I2 exactly (Gauss–Legendre window integrals, Newton steps
from the centre-point estimate r0 = ln(I1/I2)/ln(E2/E1)); the background in the post-edge
window W3 is A·∫_{W3} E^(−r). Counts at or below ``floor_counts`` (zero or negative after dark
subtraction) are raised to the floor, and r is clamped to [``min_exponent``,
``max_exponent``]; such pixels are marked in ``fit_ok``. The jump ratio is post / pre2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pydantic
from scipy import ndimage

from scherzer.processing.registration import AlignParams, apply_shifts, measure_shifts

__all__ = [
    "AlignedSeries",
    "DarkCache",
    "EFTEMMapParams",
    "EFTEMMaps",
    "EFTEMSeries",
    "ExposureSettings",
    "SeriesAcquisition",
    "SeriesAlignSettings",
    "ThreeWindowResult",
    "ThreeWindowSettings",
    "acquire_series",
    "align_series",
    "edge_windows",
    "eftem_maps",
    "energies_ev",
    "exposure_schedule",
    "jump_ratio_map",
    "next_exposure",
    "power_law_background",
    "pre_edge_indices",
    "stored_to_counts",
    "three_window_map",
    "to_stored",
]

#: Gauss–Legendre nodes per energy window: the window integral of E^(−r) is exact to ~1e-12 for
#: windows narrower than E/2; more nodes only cost time.
WINDOW_NODES = 8
#: Newton steps on the exponent r from the centre-point estimate (each gains ~(w/E)² relative).
EXPONENT_NEWTON_STEPS = 3
#: Retakes of one image whose raw counts saturate before giving up (each halves the exposure
#: at least once).
MAX_RETAKES = 8


def _is_power_of_two(value: float) -> bool:
    if not (value > 0 and math.isfinite(value)):
        return False
    mantissa, _ = math.frexp(value)
    return mantissa == 0.5


@dataclass
class ExposureSettings:
    """Automatic exposure of an EFTEM series (see the module docstring).

    Exposures (``initial_exposure_s``, ``min_exposure_s``, ``max_exposure_s``) must be powers of
    two seconds. Thresholds are net counts (ADU) of the ``percentile`` statistic.
    """

    __pydantic_config__ = pydantic.ConfigDict(extra="forbid")

    initial_exposure_s: float = 1.0
    min_exposure_s: float = 2.0**-6
    max_exposure_s: float = 128.0
    # the statistic: a high percentile follows the bright features without letting a few hot or
    # saturated pixels decide (99.9 guards saturation better, 95 tracks the mean better)
    percentile: float = 99.0
    # below this the shot-noise SNR of the bright features (√(counts/gain)) is too low: lengthen
    low_counts: float = 4000.0
    # above this a brighter next image (an edge onset) could saturate 16 bits with the offset
    # and dark: shorten. Must exceed 2 × low_counts so one doubling cannot overshoot the band.
    high_counts: float = 32000.0
    # a change aims here (geometric middle of the band: fewest changes for a monotonic series)
    target_counts: float = 11000.0
    # raw counts at which a pixel is saturated, and the fraction that forces a retake
    saturation_counts: float = 65535.0
    max_saturated_fraction: float = 1e-4
    # camera ADC bits: with log2(max/min exposure) it must fit int32 storage
    camera_bit_depth: int = 16
    # dark frames averaged per reference (1 keeps the stored integers exact)
    dark_frames: int = 1

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be a power of two seconds (2^k s); got {getattr(self, name)}"
            for name in ("initial_exposure_s", "min_exposure_s", "max_exposure_s")
            if not _is_power_of_two(getattr(self, name))
        ]
        if not problems and not (
            self.min_exposure_s <= self.initial_exposure_s <= self.max_exposure_s
        ):
            problems.append("need min_exposure_s ≤ initial_exposure_s ≤ max_exposure_s")
        if not (0 < self.low_counts and 2 * self.low_counts < self.high_counts):
            problems.append("need 0 < low_counts and 2 × low_counts < high_counts")
        elif not self.low_counts <= self.target_counts <= self.high_counts < self.saturation_counts:
            problems.append("need low_counts ≤ target_counts ≤ high_counts < saturation_counts")
        if not 0 < self.percentile <= 100:
            problems.append(f"percentile must be in (0, 100]; got {self.percentile}")
        if self.dark_frames < 1 or not 0 <= self.max_saturated_fraction < 1:
            problems.append("need dark_frames ≥ 1 and 0 ≤ max_saturated_fraction < 1")
        if not problems:
            span = math.log2(self.max_exposure_s / self.min_exposure_s)
            if self.camera_bit_depth + span > 31:
                problems.append(
                    f"camera_bit_depth {self.camera_bit_depth} + log2(max/min exposure) {span:g}"
                    " exceeds 31 bits: stored integers could overflow int32"
                )
        if problems:
            raise ValueError("invalid exposure settings: " + "; ".join(problems))


def energies_ev(start_ev: float, step_ev: float, n: int) -> np.ndarray:
    """Energy offsets start + i·step, i = 0..n−1 (float64)."""
    if n < 1 or not (math.isfinite(start_ev) and math.isfinite(step_ev)):
        raise ValueError(f"need n ≥ 1 and finite start/step; got {start_ev}, {step_ev}, {n}")
    return start_ev + step_ev * np.arange(n, dtype=np.float64)


def exposure_statistic(net_counts: np.ndarray, settings: ExposureSettings) -> float:
    """The ``percentile`` of the finite net counts of one image."""
    values = np.asarray(net_counts, dtype=np.float32)
    return float(np.percentile(values[np.isfinite(values)], settings.percentile))


def next_exposure(
    counts: np.ndarray | float, exposure_s: float, settings: ExposureSettings
) -> float:
    """The exposure for the next image after one at ``exposure_s`` gave ``counts``.

    ``counts``: the net (dark-subtracted) image or its statistic already computed. Unchanged
    while the statistic stays inside [low, high]; else ``exposure_s`` × 2^k, k the integer whose
    prediction (statistic × 2^k) is nearest ``target_counts`` inside the band, clipped to the
    bounds. The result is always a power of two seconds when ``exposure_s`` is.
    """
    stat = counts if np.ndim(counts) == 0 else exposure_statistic(counts, settings)  # type: ignore[arg-type]
    stat = float(stat)
    if settings.low_counts <= stat <= settings.high_counts:
        return float(exposure_s)
    if not stat > 0:  # no signal (or NaN): as long as allowed
        k = math.inf
    elif math.isinf(stat):
        k = -math.inf
    else:
        k = round(math.log2(settings.target_counts / stat))
        while stat * 2.0**k > settings.high_counts:
            k -= 1
        while stat * 2.0**k < settings.low_counts:
            k += 1
    lo_k = math.log2(settings.min_exposure_s / exposure_s)
    hi_k = math.log2(settings.max_exposure_s / exposure_s)
    k = min(max(k, math.ceil(lo_k)), math.floor(hi_k))
    return float(exposure_s * 2.0 ** int(k))


def exposure_schedule(
    count_rates_per_s: Sequence[float], settings: ExposureSettings
) -> list[float]:
    """Exposures a series would use for images whose statistic is ``count_rates_per_s``
    (net counts per second, noiseless) — for planning and time estimates."""
    exposures, t = [], settings.initial_exposure_s
    for rate in count_rates_per_s:
        exposures.append(t)
        t = next_exposure(float(rate) * t, t, settings)
    return exposures


class DarkCache:
    """Dark references per exposure: acquired only for an exposure not seen before.

    ``acquire_dark(exposure_s)`` returns one beam-blanked read-out; ``n_frames`` are averaged.
    ``acquired`` counts references taken, ``reused`` the requests served from the cache.
    """

    def __init__(self, acquire_dark: Callable[[float], np.ndarray], n_frames: int = 1) -> None:
        if n_frames < 1:
            raise ValueError(f"n_frames must be ≥ 1; got {n_frames}")
        self._acquire = acquire_dark
        self.n_frames = int(n_frames)
        self._darks: dict[float, np.ndarray] = {}
        self.acquired = 0
        self.reused = 0
        self.order: list[float] = []  # exposures in the order their darks were taken

    def get(self, exposure_s: float) -> np.ndarray:
        key = float(exposure_s)
        if key in self._darks:
            self.reused += 1
            return self._darks[key]
        frames = [np.asarray(self._acquire(key), dtype=np.float64) for _ in range(self.n_frames)]
        dark = np.mean(frames, axis=0)
        self._darks[key] = dark
        self.acquired += 1
        self.order.append(key)
        return dark

    def exposures_s(self) -> list[float]:
        return list(self.order)


def to_stored(net_counts: np.ndarray, exposure_s: float, settings: ExposureSettings) -> np.ndarray:
    """int32 ``round(net · max_exposure_s / exposure_s)`` (module docstring: read-back rules).

    Raises ValueError if a value would not fit int32 (cannot happen for read-outs within
    ``camera_bit_depth`` with validated settings)."""
    factor = settings.max_exposure_s / float(exposure_s)
    if not (_is_power_of_two(factor) and factor >= 1):
        raise ValueError(f"exposure {exposure_s} s is not max_exposure_s / 2^k")
    scaled = np.rint(np.asarray(net_counts, dtype=np.float64) * factor)
    if scaled.size and np.max(np.abs(scaled)) > np.iinfo(np.int32).max:
        raise ValueError("scaled counts overflow int32; lower max_exposure_s / min_exposure_s")
    return scaled.astype(np.int32)


def stored_to_counts(stored: np.ndarray, counts_per_unit: np.ndarray | float) -> np.ndarray:
    """float32 counts from stored integers: per image ``stored[i] · counts_per_unit[i]``
    (``counts_per_unit = exposure/max_exposure`` gives physical counts at each image's own
    exposure; the scalar ``quantum_counts`` gives the series scaled to the first exposure)."""
    s = np.asarray(stored)
    c = np.asarray(counts_per_unit, dtype=np.float64)
    c = c.reshape(c.shape + (1,) * (s.ndim - c.ndim)) if c.ndim else c
    return (s * c).astype(np.float32)


@dataclass
class EFTEMSeries:
    """An acquired series: int32 ``stored`` (n, y, x) and how to read it (module docstring).

    ``exposures_s``/``times_s`` (mid-exposure)/``energies_ev`` per image; ``counts_per_unit``
    (n,) and ``scale_to_first`` (n,) = t_0/t_i; ``quantum_counts`` = t_0/t_max; darks acquired
    and reused; retakes of saturated images; ``statistics`` (net counts per image)."""

    stored: np.ndarray
    energies_ev: np.ndarray
    exposures_s: np.ndarray
    times_s: np.ndarray
    counts_per_unit: np.ndarray
    scale_to_first: np.ndarray
    quantum_counts: float
    darks_acquired: int
    darks_reused: int
    retakes: int
    statistics: np.ndarray
    dark_exposures_s: list[float] = field(default_factory=list)

    def scaled(self) -> np.ndarray:
        """float32 series scaled to the first image's exposure (counts)."""
        return stored_to_counts(self.stored, self.quantum_counts)

    def counts(self) -> np.ndarray:
        """float32 net counts of each image at its own exposure."""
        return stored_to_counts(self.stored, self.counts_per_unit)


def _unsaturated(
    acquire: Callable[[float, float], tuple[np.ndarray, float]],
    energy_ev: float,
    exposure_s: float,
    settings: ExposureSettings,
) -> tuple[np.ndarray, float, float, int]:
    """Acquire, halving (at least) and retaking while too many raw pixels saturate."""
    for retakes in range(MAX_RETAKES + 1):
        raw, time_s = acquire(energy_ev, exposure_s)
        raw = np.asarray(raw)
        saturated = float(np.mean(raw >= settings.saturation_counts))
        if saturated <= settings.max_saturated_fraction or exposure_s <= settings.min_exposure_s:
            return raw, exposure_s, float(time_s), retakes
        exposure_s = max(exposure_s / 2.0, settings.min_exposure_s)
    raise RuntimeError(f"image at {energy_ev} eV still saturated after {MAX_RETAKES} retakes")


class SeriesAcquisition:
    """The acquisition loop of :func:`acquire_series` one image at a time, for callers that
    act between images (an executor: cancel, pause, write each image as it comes).

    ``acquire(energy_ev, exposure_s) -> (raw counts, mid-exposure time s)`` sets the energy
    offset and exposes; ``acquire_dark(exposure_s) -> raw counts`` with the beam blanked.
    :meth:`take` exposes one image (retaking shorter while saturated), subtracts the cached dark
    of its exposure (:class:`DarkCache`), stores it as int32 (:func:`to_stored`) and chooses the
    next exposure (:func:`next_exposure`). ``exposure_s``: the exposure the next image will use.
    """

    def __init__(
        self,
        acquire: Callable[[float, float], tuple[np.ndarray, float]],
        acquire_dark: Callable[[float], np.ndarray],
        settings: ExposureSettings,
    ) -> None:
        self.settings = settings
        self._acquire = acquire
        self.darks = DarkCache(acquire_dark, settings.dark_frames)
        self.exposure_s = float(settings.initial_exposure_s)
        self.first_exposure_s: float | None = None
        self.retakes = 0
        self.count = 0

    @property
    def quantum_counts(self) -> float:
        """Counts (at the first image's exposure) per stored unit: t_0 / t_max."""
        first = self.first_exposure_s or self.exposure_s
        return first / self.settings.max_exposure_s

    def take(self, energy_ev: float) -> tuple[np.ndarray, dict]:
        """One image at ``energy_ev``: (int32 stored image, record). The record holds index,
        energy_ev, exposure_s, time_s, counts_per_unit, scale_to_first, statistic (net counts),
        dark_acquired (a new dark reference was taken for it) and retakes."""
        st = self.settings
        raw, exposure, time_s, n_retakes = _unsaturated(
            self._acquire, float(energy_ev), self.exposure_s, st
        )
        self.retakes += n_retakes
        before = self.darks.acquired
        net = raw.astype(np.float64) - self.darks.get(exposure)
        stat = exposure_statistic(net, st)
        if self.first_exposure_s is None:
            self.first_exposure_s = exposure
        row = {
            "index": self.count, "energy_ev": float(energy_ev), "exposure_s": exposure,
            "time_s": time_s, "counts_per_unit": exposure / st.max_exposure_s,
            "scale_to_first": self.first_exposure_s / exposure, "statistic": stat,
            "dark_acquired": self.darks.acquired > before, "retakes": n_retakes,
        }  # fmt: skip
        stored = to_stored(net, exposure, st)
        self.count += 1
        self.exposure_s = next_exposure(stat, exposure, st)
        return stored, row


def acquire_series(
    energies: Sequence[float],
    acquire: Callable[[float, float], tuple[np.ndarray, float]],
    acquire_dark: Callable[[float], np.ndarray],
    settings: ExposureSettings,
    on_image: Callable[[int, np.ndarray, dict], None] | None = None,
) -> EFTEMSeries:
    """The reference EFTEM acquisition loop (devices as callables; :class:`SeriesAcquisition`
    for the per-image rules). ``on_image(i, stored_i, record)`` is called per image (record as
    :meth:`SeriesAcquisition.take` returns it)."""
    run = SeriesAcquisition(acquire, acquire_dark, settings)
    stored, rows = [], []
    for i, energy in enumerate(energies):
        image, row = run.take(float(energy))
        stored.append(image)
        rows.append(row)
        if on_image is not None:
            on_image(i, image, row)
    col = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]}
    return EFTEMSeries(
        stored=np.stack(stored), energies_ev=col["energy_ev"], exposures_s=col["exposure_s"],
        times_s=col["time_s"], counts_per_unit=col["counts_per_unit"],
        scale_to_first=col["scale_to_first"], quantum_counts=run.quantum_counts,
        darks_acquired=run.darks.acquired, darks_reused=run.darks.reused, retakes=run.retakes,
        statistics=col["statistic"], dark_exposures_s=run.darks.exposures_s(),
    )  # fmt: skip


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
