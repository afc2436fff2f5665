"""Settings and results of rigid alignment: :class:`AlignParams` (typed, checked, built once at
the edge), :class:`AlignmentResult` and :class:`AlignmentError`.

Conventions (ARCHITECTURE.md): ``shifts_px[i] = (dy, dx)`` is where frame i's content sits
relative to the reference (frame_i(r) ≈ ref(r − s_i)); aligning applies −s_i.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["OUTPUTS", "PAIR_GRAPHS", "WINDOWS", "AlignParams", "AlignmentError", "AlignmentResult"]

WINDOWS = ("hann", "hamming", "tukey", "none")
PAIR_GRAPHS = ("reference", "sequential", "neighbours", "all")
OUTPUTS = ("crop", "expand", "expand-mean")
#: Default memory budget of one alignment as a share of the machine's physical memory: room for
#: the frames, their spectra and the work blocks, with the rest left to the process and others.
DEFAULT_RAM_FRACTION = 0.5
FALLBACK_RAM_MB = 4096.0  # when the physical memory cannot be determined
_MB = 1 << 20


def physical_ram_mb() -> float:
    """The machine's physical memory in MB (2²⁰ bytes), or :data:`FALLBACK_RAM_MB`."""
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) / _MB
    except (AttributeError, OSError, ValueError):
        return FALLBACK_RAM_MB


class AlignmentError(ValueError):
    """The frames or parameters cannot be aligned; the message says what is wrong."""


@dataclass
class AlignParams:
    """Alignment settings (see the module docstring for the method).

    ``alpha``: normalisation exponent of the correlation used to *find* peaks (0 cross-, 0.5
    mutual, 1 phase correlation); ``alpha_fine``: exponent used to *refine* them. ``neighbours``:
    k of the k-nearest-neighbour graph. ``refine``: maximum passes against the leave-one-out
    average. ``max_shift_px``: largest offset searched between two frames (default: a quarter of
    the measured field). ``window``: hann | hamming | tukey | none. ``prefilter``: None | "median3"
    | "wiener5". ``bandpass``: (low, high) as fractions of Nyquist applied to the correlation.
    ``roi``: (y0, x0, height, width) measured region (applied to the full field). ``reference``:
    "mean" or a frame index. ``output``: crop (common area) | expand (canvas filled with zeros) |
    expand-mean (canvas, average over valid observations with a count map). ``combine``: mean |
    sum. ``snr_weighting``: weight the correlations by each frequency's signal fraction.
    ``fine_window``: window for the final sub-pixel measurement, made on the area every frame
    shares once the frames are roughly aligned (None: on the whole field with ``window``);
    ``tukey_alpha``: the tapered fraction of each axis of a Tukey window.
    ``memory_budget_mb``: memory (MB = 2²⁰ bytes) the measurement may use for its spectra and
    work blocks (None: :data:`DEFAULT_RAM_FRACTION` of physical memory); a stack whose spectra
    exceed half of it is measured in chunks when a scratch store is given. It bounds memory, it
    never changes a result.
    """

    alpha: float = 0.5
    alpha_fine: float = 0.0
    neighbours: int = 4
    pairs: str = "neighbours"
    refine: int = 2
    refine_tolerance_px: float = 0.01
    max_shift_px: float | None = None
    window: str = "hann"
    prefilter: str | None = None
    bandpass: tuple[float, float] | None = None
    roi: tuple[int, int, int, int] | None = None
    reference: str | int = "mean"
    low_snr: bool = False
    output: str = "crop"
    combine: str = "mean"
    outlier_px: float = 1.0
    snr_weighting: bool = True
    fine_window: str | None = "tukey"
    tukey_alpha: float = 0.25
    memory_budget_mb: float | None = None

    def budget_bytes(self) -> int:
        """The memory budget in bytes (default: a fraction of physical memory)."""
        mb = self.memory_budget_mb
        if mb is None:
            mb = DEFAULT_RAM_FRACTION * physical_ram_mb()
        return int(mb * _MB)

    def check(self, n_frames: int) -> None:
        """Raise AlignmentError naming every invalid setting."""
        problems = []
        for name in ("alpha", "alpha_fine"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1]; got {getattr(self, name)}")
        if self.neighbours < 1:
            problems.append(f"neighbours must be ≥ 1; got {self.neighbours}")
        if self.pairs not in PAIR_GRAPHS:
            problems.append(f"pairs must be one of {PAIR_GRAPHS}; got {self.pairs!r}")
        if self.refine < 0:
            problems.append(f"refine must be ≥ 0; got {self.refine}")
        if self.window not in WINDOWS:
            problems.append(f"window must be one of {WINDOWS}; got {self.window!r}")
        if self.fine_window is not None and self.fine_window not in WINDOWS:
            problems.append(
                f"fine_window must be None or one of {WINDOWS}; got {self.fine_window!r}"
            )
        if not 0.0 <= self.tukey_alpha <= 1.0:
            problems.append(f"tukey_alpha must be in [0, 1]; got {self.tukey_alpha}")
        if self.prefilter not in (None, "median3", "wiener5"):
            problems.append(
                f"prefilter must be None, 'median3' or 'wiener5'; got {self.prefilter!r}"
            )
        if self.output not in OUTPUTS:
            problems.append(f"output must be one of {OUTPUTS}; got {self.output!r}")
        if self.combine not in ("mean", "sum"):
            problems.append(f"combine must be 'mean' or 'sum'; got {self.combine!r}")
        if self.bandpass is not None:
            lo, hi = self.bandpass
            if not 0.0 <= lo < hi:
                problems.append(
                    f"bandpass must be (low, high) with 0 ≤ low < high; got {self.bandpass}"
                )
        if isinstance(self.reference, str):
            if self.reference != "mean":
                problems.append(
                    f"reference must be 'mean' or a frame index; got {self.reference!r}"
                )
        elif not 0 <= int(self.reference) < n_frames:
            problems.append(f"reference frame {self.reference} out of range 0..{n_frames - 1}")
        if self.max_shift_px is not None and not self.max_shift_px > 0:
            problems.append(f"max_shift_px must be positive; got {self.max_shift_px}")
        budget = self.memory_budget_mb
        if budget is not None and not 0 < budget < float("inf"):
            problems.append(f"memory_budget_mb must be positive; got {budget}")
        if problems:
            raise AlignmentError("invalid alignment parameters: " + "; ".join(problems))


@dataclass
class AlignmentResult:
    """Measured shifts and everything that went into them (see module docstring)."""

    shifts_px: np.ndarray
    peak_heights: np.ndarray
    pair_offsets: np.ndarray
    similarity: np.ndarray
    residuals_px: np.ndarray
    flagged: list[int]
    reference: str | int
    params: AlignParams
    seconds: float
    rejected_pairs: list[tuple[int, int]] = field(default_factory=list)
    refinement_updates_px: list[float] = field(default_factory=list)
    aligned: np.ndarray | None = None
    average: np.ndarray | None = None
    count: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        """The keys of ``scherzer align --json``."""
        return {
            "shifts_px": [[float(a), float(b)] for a, b in self.shifts_px],
            "peak_heights": [float(v) for v in self.peak_heights],
            "reference": self.reference,
            "flagged": [int(i) for i in self.flagged],
            "seconds": float(self.seconds),
        }
