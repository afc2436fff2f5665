"""EFTEM series: automatic exposure, dark references, scaled integer storage, alignment, maps.

Two modules: :mod:`.exposure` (what the acquisition needs: exposure rule, dark cache, storage;
light — the daemon's plan model imports it) and :mod:`.maps` (alignment and elemental maps).

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

from typing import TYPE_CHECKING

from scherzer.processing.eftem.exposure import (
    DarkCache,
    EFTEMSeries,
    ExposureSettings,
    SeriesAcquisition,
    acquire_series,
    energies_ev,
    exposure_schedule,
    next_exposure,
    stored_to_counts,
    to_stored,
)

if TYPE_CHECKING:
    from scherzer.processing.eftem.maps import (
        AlignedSeries,
        EFTEMMapParams,
        EFTEMMaps,
        SeriesAlignSettings,
        ThreeWindowResult,
        ThreeWindowSettings,
        align_series,
        edge_windows,
        eftem_maps,
        jump_ratio_map,
        power_law_background,
        pre_edge_indices,
        three_window_map,
    )

#: Names served by :mod:`.maps`, imported on first use (PEP 562) so that what the acquisition
#: needs (the daemon's plan model imports :class:`ExposureSettings`) does not load the
#: registration engine and scipy.ndimage.
_MAPS_NAMES = frozenset(
    {
        "AlignedSeries",
        "EFTEMMapParams",
        "EFTEMMaps",
        "SeriesAlignSettings",
        "ThreeWindowResult",
        "ThreeWindowSettings",
        "align_series",
        "edge_windows",
        "eftem_maps",
        "jump_ratio_map",
        "power_law_background",
        "pre_edge_indices",
        "three_window_map",
    }
)


def __getattr__(name: str) -> object:
    if name in _MAPS_NAMES:
        from scherzer.processing.eftem import maps

        return getattr(maps, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
