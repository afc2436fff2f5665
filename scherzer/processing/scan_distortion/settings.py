"""Settings of the scan-distortion engine: one typed object, :class:`NonrigidParams`.

Validated by ``pydantic.TypeAdapter(NonrigidParams)`` (unknown keys are rejected) at the edge
(CLI, plan, API); :meth:`NonrigidParams.check` names every invalid value for the engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import ConfigDict

__all__ = ["MODES", "NonrigidParams", "ScanDistortionError"]

MODES = ("row-locked", "row-fitting", "unconstrained")
# default smoothing (lines) by scan directions, measured on 8 × 512² (pairs) and 12 × 512² (one
# direction) SrTiO3 series with 50 Hz pick-up, random-walk drift and jitter, per-pixel
# residual: pairs with the line penalty 0.096 px at 0.75 (0.097 at 0.65, 0.098 at 0.85,
# 0.102 at 1, 0.110 at 1.2; the Gaussian window of 4 gave 0.124); one direction with the
# Gaussian window 0.132 px at 4 (the penalty did no better than 0.135 at any weight: 0.155
# at 1, 0.140 at 2.5, 0.150 at 3); the window fitting a line instead of a constant: 0.116 px
# at 4 (seed 0; seed 1 0.132 → 0.122), 0.113 at 3 — 4 kept
SMOOTHING_MIXED_PX = 0.75
# ... for lines of this many px; shorter lines scale it by (this / length)^exponent (a line
# carries fewer pixels, so more noise, and a mains period spans more lines): measured optima
# ≈ 1.5 at 192 px (0.074 px against 0.077 at 1) and ≥ 2 at 128 px (0.086 against 0.105 at 1)
SMOOTHING_MIXED_LINE_PX = 512
SMOOTHING_LINE_EXPONENT = 0.75
SMOOTHING_SINGLE_PX = 4.0
SMOOTHING_DENSE_PX = 4.0  # unconstrained mode: σ (px) of the 2-D window of its local systems


class ScanDistortionError(ValueError):
    """The frames or settings cannot be corrected; the message says what is wrong."""


@dataclass
class NonrigidParams:
    """Non-rigid (scan-distortion) registration settings.

    Registration: ``affine_cycles`` (6 parameters per frame in scan coordinates),
    ``nonlinear_cycles`` in ``mode`` row-locked (one displacement per scan row) | row-fitting
    (plus a rotation per row) | unconstrained (a smooth 2-D field); ``smoothing_px`` how smooth
    the fields are along the slow axis (lines; both axes when unconstrained). Orthogonal series
    penalise the second differences of the line functions (each line keeps what its own
    contrast measures, lines without contrast are interpolated from their neighbours) with a
    weight whose half-power ripple frequency is a Gaussian σ's; one scan direction smooths
    the lines' normal equations with a Gaussian window of σ, fitting a line (not a constant)
    in the window: a crystal aligned with the scan has contrast on some lines only, and a
    local constant is pulled towards those lines' values wherever the function has a slope
    (measured: an error at the atom-plane period, mixed with the 50 Hz pick-up). Wider keeps
    noise out, narrower follows faster distortions (50 Hz pick-up is a ripple of ≈18 lines
    for 512-px lines at 2 µs). None (default) picks by the scan directions:
    ``SMOOTHING_MIXED_PX`` with orthogonal scans (the
    other direction's fast axis makes every line's slow-axis position sharp; scaled for
    lines shorter than ``SMOOTHING_MIXED_LINE_PX``),
    ``SMOOTHING_SINGLE_PX`` for one direction (row-locked: instead the line penalty with
    its weight, and a per-line error beyond the noise, chosen by restricted likelihood over
    the series' lines, see line_prior.py; 12 × 512² simulator 0.1115 → 0.0933 px, SrTiO3
    through a distorted scan 0.1343 → 0.1263), ``SMOOTHING_DENSE_PX`` (a Gaussian σ in 2-D)
    when unconstrained. ``row_jitter`` adds a fast-axis offset per row (line jitter; a Wiener
    estimate whose variance comes from the data) on top of the smooth line function; None
    (default): on for orthogonal series, off for one direction (measured: it helps the former,
    0.106 → 0.101 px; for the latter it helps on the simulator, 0.116 → 0.109 px at 12 ×
    512², but costs the real SrTiO3 image scanned through distortions 0.137 → 0.218 px).
    ``reference``: "mean" (all other frames), "index" (frame ``reference_index``) or "local"
    (the ``local_neighbours`` nearest frames on either side, for in-situ series).
    ``convergence_px``: mean |update| reached at the last cycle (the tolerance
    is lowered geometrically over the cycles); ``acceleration``: over-relaxation of every
    cycle's update, reduced by 10 % by itself whenever the updates grow. ``max_field_px``: a frame
    whose field exceeds this is flagged (diverged). ``frame_gap_lines``: scan lines' time between
    the last row of a frame and the first of the next (0: back to back). ``drift_gauge``: with
    one scan direction the series' mean slow axis (which relative registration cannot see)
    follows the drift between frames (their positions against time); False takes the mean
    frame as undistorted (no drift prior). ``rigid_start``: start from the rigid alignment
    (False: from rest). ``drift_search``: orthogonal series first search a steady drift
    (Ophus, Ciston & Nelson's linear drift search: the shear undone, the frames scored by how
    well they agree) and start from it when it beats zero drift; measured on 4 × 192² pairs
    drifting 13.5 px per frame: 0.11 px per pixel against 21.8 from the rigid start.

    Output: ``merge`` "average" (every frame resampled through its field onto the reference
    grid, averaged; ``count`` frames per pixel) or "density" (Ophus, Ciston & Nelson's
    density-weighted merge: every frame's pixels splatted where they landed, Σ w·I / Σ w,
    with the kernel density — smoothed by ``merge_sigma_px`` — as ``count``). Measured on
    8 × 512² pairs: the average is the better image (columns 0.53 pm, NCC 0.998 against
    0.62 pm, 0.990), the density map says where the distorted scans sampled densely.

    Preparation (recorded in the result): ``trim_px`` (top, bottom, left, right), ``reverse``,
    ``transpose``, ``offset`` (None | "min" | a number subtracted), ``normalise`` (divide by the
    series mean), ``resample`` (×0.25–4, before registration), ``row_median`` (equalise every
    row's median to the frame's).
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    affine_cycles: int = 2
    nonlinear_cycles: int = 4
    mode: Literal["row-locked", "row-fitting", "unconstrained"] = "row-locked"
    smoothing_px: float | None = None
    row_jitter: bool | None = None
    reference: Literal["mean", "index", "local"] = "mean"
    reference_index: int = 0
    local_neighbours: int = 2
    convergence_px: float = 1e-4
    acceleration: float = 1.0
    max_field_px: float = 50.0
    frame_gap_lines: float = 0.0
    drift_gauge: bool = True
    rigid_start: bool = True
    drift_search: bool = True
    merge: Literal["average", "density"] = "average"
    merge_sigma_px: float = 0.3
    trim_px: tuple[int, int, int, int] = (0, 0, 0, 0)
    reverse: bool = False
    transpose: bool = False
    offset: float | Literal["min"] | None = None
    normalise: bool = False
    resample: float = 1.0
    row_median: bool = False

    def check(self, n_frames: int) -> None:
        """Raise :class:`ScanDistortionError` naming every invalid setting."""
        problems = []
        for name in ("affine_cycles", "nonlinear_cycles"):
            if not 0 <= getattr(self, name) <= 100:
                problems.append(f"{name} must be in 0..100; got {getattr(self, name)}")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}; got {self.mode!r}")
        if self.smoothing_px is not None and not 0.0 <= self.smoothing_px <= 1000.0:
            problems.append(f"smoothing_px must be in [0, 1000]; got {self.smoothing_px}")
        if self.reference not in ("mean", "index", "local"):
            problems.append(f"reference must be mean | index | local; got {self.reference!r}")
        if self.reference == "index" and not 0 <= self.reference_index < n_frames:
            problems.append(f"reference_index {self.reference_index} not in 0..{n_frames - 1}")
        if self.local_neighbours < 1:
            problems.append(f"local_neighbours must be ≥ 1; got {self.local_neighbours}")
        if not 0.0 < self.convergence_px < 1.0:
            problems.append(f"convergence_px must be in (0, 1); got {self.convergence_px}")
        if not 1.0 <= self.acceleration <= 20.0:
            problems.append(f"acceleration must be in [1, 20]; got {self.acceleration}")
        if not 0.25 <= self.resample <= 4.0:
            problems.append(f"resample must be in [0.25, 4]; got {self.resample}")
        if any(t < 0 for t in self.trim_px) or len(self.trim_px) != 4:
            problems.append(f"trim_px must be 4 values ≥ 0; got {self.trim_px}")
        if self.max_field_px <= 0:
            problems.append(f"max_field_px must be > 0; got {self.max_field_px}")
        if not 0.0 <= self.merge_sigma_px <= 10.0:
            problems.append(f"merge_sigma_px must be in [0, 10]; got {self.merge_sigma_px}")
        if self.frame_gap_lines < 0:
            problems.append(f"frame_gap_lines must be ≥ 0; got {self.frame_gap_lines}")
        if problems:
            raise ScanDistortionError("; ".join(problems))

    def smoothing_for(self, turns: list[int], line_px: int = SMOOTHING_MIXED_LINE_PX) -> float:
        """``smoothing_px``, or the default for the scan directions of ``turns`` and scan
        lines of ``line_px`` pixels."""
        if self.smoothing_px is not None:
            return float(self.smoothing_px)
        if self.mode == "unconstrained":
            return SMOOTHING_DENSE_PX
        if len({t % 2 for t in turns}) <= 1:
            return SMOOTHING_SINGLE_PX
        scale = (SMOOTHING_MIXED_LINE_PX / max(line_px, 16)) ** SMOOTHING_LINE_EXPONENT
        return SMOOTHING_MIXED_PX * scale

    def jitter_for(self, turns: list[int]) -> bool:
        """``row_jitter``, or the default for the scan directions of ``turns``."""
        if self.row_jitter is not None:
            return bool(self.row_jitter)
        return len({t % 2 for t in turns}) > 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings."""
        return asdict(self)
