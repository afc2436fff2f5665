"""Incremental focal-series registration while a series is acquired: a live estimate.

One job: register each new image of a focal series once, as it arrives, against the images
before it — the first pass of the amorphous strategy (:mod:`scherzer.processing.focal.relative`)
run one image at a time, with the first image as the reference. Image 1 and 2 are matched to the
first through the weak-phase transfer (``match_reference``); every later image against its
prediction from the wave restored from the images registered so far (``solve_series`` +
``match_wave``), its defocus searched around the line through them (± 0.3 × the step + 1 nm, as
the offline registration) and its shift within ``max_drift_px`` of their drift line. An image
whose correlation peak falls below the registration's flag level is reported but kept out of
later waves. Earlier estimates are never revised: the offline registration
(:func:`~scherzer.processing.focal.register_focal_series`) refines them all with its
leave-one-out passes and absolute correction, and its reference is an interior image near
Scherzer; to compare, re-reference (subtract the values at its reference).

Cost per image: the frame spectra of the images so far (one rfft each, cheap next to an
exposure), one wave solve on the band and one defocus/shift search — constant in the series
length apart from the spectra. Fields larger than :data:`LIVE_AREA_PX` are registered on their
central square of that size (a live estimate; the offline registration uses the whole field).

Conventions (ARCHITECTURE.md and the focal package): defocus in nm (C1 < 0 underfocus);
``relative_defocus_nm[i] = defocus[i] − defocus[0]``; ``shifts_px[i] = (dy, dx)`` where image
i's content sits relative to image 0 (frame_i(r) ≈ frame_0(r − s_i)); frames float32 intensity
(camera offset removed by the caller or with ``camera_offset_counts``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from scherzer.optics import Optics
from scherzer.processing.focal import FocalParams
from scherzer.processing.focal.problem import Problem
from scherzer.processing.focal.register import SEARCH_RANGE_MARGIN_NM, SEARCH_RANGE_STEP_FRACTION
from scherzer.processing.focal.relative import (
    match_image,
    predict_defocus,
    predict_shift,
)
from scherzer.processing.focal.settings import MIN_IMAGES

__all__ = ["LIVE_AREA_PX", "FocalEstimate", "IncrementalFocal"]

#: Largest field registered live (px, a central square): bigger fields cost more per image than
#: a live preview is worth; 512 keeps the band's sampling fine enough for defocus to ~0.1 nm.
LIVE_AREA_PX = 512


@dataclass(frozen=True)
class FocalEstimate:
    """The live estimate after image ``index``: its defocus relative to image 0 and the step
    from the previous image (nm), its shift relative to image 0 and the drift since the previous
    image (px), its correlation peak and whether it enters later waves (``used``)."""

    index: int
    relative_defocus_nm: float
    defocus_step_nm: float
    shift_px: tuple[float, float]
    drift_step_px: tuple[float, float]
    peak: float
    used: bool

    def to_json(self) -> dict:
        return {
            "index": self.index, "relative_defocus_nm": self.relative_defocus_nm,
            "defocus_step_nm": self.defocus_step_nm, "shift_px": list(self.shift_px),
            "drift_step_px": list(self.drift_step_px), "peak": self.peak, "used": self.used,
        }  # fmt: skip


@dataclass
class IncrementalFocal:
    """Registers a focal series image by image (module docstring). ``optics`` (defocus
    ignored), ``pixel_nm``; ``params`` the registration settings (the first pass's: search
    trials, tolerance, ``max_drift_px``, prior); ``camera_offset_counts`` is removed from every
    frame."""

    optics: Optics
    pixel_nm: float
    params: FocalParams = field(default_factory=FocalParams)
    camera_offset_counts: float = 0.0
    frames: list[np.ndarray] = field(default_factory=list)
    nominal_nm: list[float] = field(default_factory=list)
    defocus_nm: list[float] = field(default_factory=list)  # absolute, first-pass scale
    shifts_px: list[np.ndarray] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)
    done: list[int] = field(default_factory=list)

    def add(self, frame: np.ndarray, nominal_defocus_nm: float) -> FocalEstimate:
        """Register the next image (nominal defocus as set); returns its estimate."""
        img = np.asarray(frame, dtype=np.float32)
        ny, nx = img.shape
        side = min(LIVE_AREA_PX, ny, nx)
        y0, x0 = (ny - side) // 2, (nx - side) // 2
        crop = img[y0 : y0 + side, x0 : x0 + side] - np.float32(self.camera_offset_counts)
        if not math.isfinite(nominal_defocus_nm):
            raise ValueError("a live focal registration needs each image's nominal defocus")
        self.frames.append(crop)
        self.nominal_nm.append(float(nominal_defocus_nm))
        i = len(self.frames) - 1
        if i == 0:
            d, s, h = self.nominal_nm[0], np.zeros(2), 1.0
        else:
            d, s, h = self._register(i)
        self.defocus_nm.append(float(d))
        self.shifts_px.append(np.asarray(s, dtype=np.float64))
        self.peaks.append(float(h))
        return self._estimate(i)

    def _register(self, i: int) -> tuple[float, np.ndarray, float]:
        nominal = np.asarray(self.nominal_nm)
        params = replace(self.params, area=None)
        prob = Problem(np.stack(self.frames), self.optics, self.pixel_nm, nominal, params)
        d_abs = np.append(np.asarray(self.defocus_nm), nominal[i])
        shifts = np.vstack([*self.shifts_px, np.zeros(2)])
        done = np.asarray(self.done or [0])
        rng_nm = prob.params.search_range_nm or (
            SEARCH_RANGE_STEP_FRACTION * float(np.median(np.abs(np.diff(nominal))))
            + SEARCH_RANGE_MARGIN_NM
        )
        env_s = prob.bt.spatial(nominal)
        center = predict_defocus(nominal, d_abs, i, 0, done)
        window = (predict_shift(shifts, i, done), prob.params.max_drift_px)
        near = len(done) < MIN_IMAGES or i <= 1  # two images restore no wave
        delta, s, h = match_image(
            prob, i, 0, np.sort(done), (d_abs, shifts, env_s), center, rng_nm, window,
            against_reference=near,
        )  # fmt: skip
        if not self.done:
            self.done.append(0)
        if h >= prob.flag_level or len(self.done) < MIN_IMAGES:  # as the offline first pass
            self.done.append(i)
        return float(delta), np.asarray(s), float(h)

    def _estimate(self, i: int) -> FocalEstimate:
        d, s = self.defocus_nm, self.shifts_px
        prev = max(i - 1, 0)
        return FocalEstimate(
            index=i,
            relative_defocus_nm=d[i] - d[0],
            defocus_step_nm=d[i] - d[prev],
            shift_px=(float(s[i][0]), float(s[i][1])),
            drift_step_px=(float(s[i][0] - s[prev][0]), float(s[i][1] - s[prev][1])),
            peak=self.peaks[i],
            used=i == 0 or i in self.done,
        )

    def table(self) -> np.ndarray:
        """Per-image structured table of the final live estimates."""
        dt = np.dtype([("index", "<i8"), ("nominal_defocus_nm", "<f8"),
                       ("relative_defocus_nm", "<f8"), ("shift_y_px", "<f8"),
                       ("shift_x_px", "<f8"), ("peak_height", "<f8"), ("used", "?")])  # fmt: skip
        out = np.zeros(len(self.frames), dtype=dt)
        out["index"] = np.arange(len(out))
        out["nominal_defocus_nm"] = self.nominal_nm
        out["relative_defocus_nm"] = np.asarray(self.defocus_nm) - self.defocus_nm[0]
        shifts = np.asarray(self.shifts_px).reshape(-1, 2)
        out["shift_y_px"], out["shift_x_px"] = shifts[:, 0], shifts[:, 1]
        out["peak_height"] = self.peaks
        out["used"] = [self._estimate(k).used for k in range(len(out))]
        return out
