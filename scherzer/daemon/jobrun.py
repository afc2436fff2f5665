"""A running job's bookkeeping: frames written and skipped, the optics to restore, ground truth.

Geometry: frames scanned at a multiple of 90° are turned back exactly (:data:`rotate_back`);
simulated ground-truth shifts are expressed in the stored frame's (rows, columns) px
(:func:`truth_shift_in_frame_px`, ARCHITECTURE's shift convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scherzer.daemon.plans import BasePlan
from scherzer.daemon.protocol import ErrorBody, ErrorCode, JobInfo
from scherzer.drivers.base import ScanSettings
from scherzer.io import StackWriter
from scherzer.processing.registration import rotate_frame_back
from scherzer.stack import FrameRecord

__all__ = ["Acquired", "JobRun", "SavedOptics", "rotate_back", "truth_shift_in_frame_px"]

#: Frames scanned at a multiple of 90° are turned back exactly (the simulator's scan geometry).
rotate_back = rotate_frame_back


def truth_shift_in_frame_px(shift_yx_px: Any, base_rotation_deg: float) -> np.ndarray:
    """A specimen-axes content displacement (y, x) px as (rows, columns) of a frame scanned at
    ``base_rotation_deg``: the fast (column) axis runs along (sin θ, cos θ) and the slow (row)
    axis along (cos θ, −sin θ) in specimen (y, x) (see :mod:`scherzer.simulators.stem`)."""
    d = np.asarray(shift_yx_px, dtype=np.float64)
    t = math.radians(base_rotation_deg)
    slow = np.array([math.cos(t), -math.sin(t)])
    fast = np.array([math.sin(t), math.cos(t)])
    return np.array([d @ slow, d @ fast])


@dataclass
class Acquired:
    images: dict[str, np.ndarray]
    records: dict[str, FrameRecord]
    pixel_size_nm: tuple[float, float]
    truth: dict[str, Any]


@dataclass
class SavedOptics:
    """Instrument state before a plan (None = not changed by the plan)."""

    defocus_nm: float | None = None
    scan_settings: ScanSettings | None = None


@dataclass
class JobRun:
    """A running job: its plan, file, frames written, skipped frames and collected truth."""

    job: JobInfo
    plan: BasePlan
    path: Path
    writer: StackWriter | None = None
    written: int = 0
    skipped: list[int] = field(default_factory=list)
    skip_reasons: list[str] = field(default_factory=list)
    truth: list[dict[str, Any]] = field(default_factory=list)
    tracking: list[tuple[int, float, float]] = field(default_factory=list)  # frame, dy, dx nm
    tracked_after: int = 0  # live frames folded before the last stage move
    extra_truth: dict[str, Any] = field(default_factory=dict)  # series-wide truth (e.g. maps)

    def add_truth(self, truth: dict[str, Any]) -> None:
        self.truth.append(truth or {})

    def truth_arrays(self) -> dict[str, Any]:
        """Per-frame truth of the written frames (only when every frame has it): true defocus
        (nm) and content shifts (px, in the stored orientation, ARCHITECTURE convention), plus
        ``extra_truth`` (what a plan's runner adds, e.g. the EFTEM element maps)."""
        if not self.truth or not all("shift_px" in t for t in self.truth):
            return {}
        base = getattr(self.plan, "base_rotation_deg", 0.0)
        scan = self.plan.scan_sets()
        shifts = [
            truth_shift_in_frame_px(t["shift_px"], base) if scan else np.asarray(t["shift_px"])
            for t in self.truth
        ]
        out: dict[str, Any] = {
            "shifts_px": np.asarray(shifts, dtype=np.float64),
            "defocus_nm": np.array([float(t.get("defocus_nm", np.nan)) for t in self.truth]),
            "frame_index": np.array(
                [i for i in range(self.written + len(self.skipped)) if i not in self.skipped]
            ),
        }
        if not np.all(np.isfinite(out["defocus_nm"])):
            del out["defocus_nm"]
        return {**out, **self.extra_truth}

    def skipped_note(self) -> ErrorBody | None:
        if not self.skipped:
            return None
        return ErrorBody(
            code=ErrorCode.DEVICE_ERROR,
            message=f"frames {self.skipped} skipped after device errors ({self.skip_reasons[-1]})",
            details={"skipped": list(self.skipped)},
        )


def store_tracking(run: JobRun, path: Path, jlog: Any) -> None:
    """The stage moves of drift tracking as the ``drift_tracking`` table (after the frame index:
    the content displacement in nm that each move undid); never raises."""
    if not run.tracking or not path.exists():
        return
    table = np.array(
        run.tracking, dtype=[("after_frame", "<i8"), ("moved_y_nm", "<f8"), ("moved_x_nm", "<f8")]
    )
    try:
        from scherzer.io import write_table

        write_table(path, "drift_tracking", table)
    except Exception:
        jlog.exception("storing the drift-tracking moves failed")
