"""EFTEM acquisition numerics: automatic exposure, dark references, scaled integer storage.

Pure numerics: devices enter only as callables passed in; no files, sockets or global state.
The conventions (exposure rule, dark cache, int32 storage at the longest exposure's scale) are
stated in :mod:`scherzer.processing.eftem`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pydantic

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
