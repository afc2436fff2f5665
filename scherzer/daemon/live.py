"""Live processing while a job acquires: a running, drift-compensated average per job.

For time series and rotated-scan series, every frame of the plan's first signal is folded into a
:class:`~scherzer.processing.live.RunningAverage` in a worker thread of its own, so acquisition is
never delayed: when the worker falls :data:`MAX_BACKLOG` frames behind (big frames, slow
machine), frames are left out of the preview and counted. After each fold the average is put in
the frame cache (clients fetch it with ``frame_get`` by the ``frame_id`` the ``live`` event
names) and a ``live`` event is published. When the job's file is closed the average is stored in
it as ``live_average_<signal>`` (with the frames folded and skipped as attributes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from scherzer.daemon.frames import FrameCache
from scherzer.processing.live import RunningAverage
from scherzer.stack import FrameRecord

__all__ = ["LIVE_KINDS", "MAX_BACKLOG", "LiveProcessing"]

log = structlog.get_logger("scherzer.live")

#: Plan kinds whose frames are averaged live (one field of view, drifting).
LIVE_KINDS = ("time_series", "rotated_scan")
#: Frames waiting for the live worker before new ones are left out of the preview.
MAX_BACKLOG = 4
#: Seconds to wait at the end of a job for the frames still being folded in.
FINISH_TIMEOUT_S = 60.0


@dataclass
class _LiveJob:
    signal: str
    average: RunningAverage = field(default_factory=RunningAverage)
    pending: int = 0
    skipped: int = 0
    last: Future | None = None


class LiveProcessing:
    """Running averages of the jobs being acquired (see the module docstring)."""

    def __init__(self, frames: FrameCache, publish: Callable[[str, dict[str, Any]], None]):
        self._frames = frames
        self._publish = publish
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="live")
        self._jobs: dict[int, _LiveJob] = {}
        self._lock = threading.Lock()

    def begin(self, job_id: int, kind: str, signals: tuple[str, ...]) -> None:
        """Start a running average for ``job_id`` if its kind is averaged live."""
        if kind in LIVE_KINDS and signals:
            with self._lock:
                self._jobs[job_id] = _LiveJob(signals[0])

    def add(self, job_id: int, signal: str, image: np.ndarray, pixel_nm: tuple) -> None:
        """Queue a frame for folding in (never blocks; left out when the worker lags)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or signal != job.signal:
                return
            if job.pending >= MAX_BACKLOG:
                job.skipped += 1
                return
            job.pending += 1
            job.last = self._pool.submit(self._fold, job_id, job, image.copy(), pixel_nm)

    def _fold(self, job_id: int, job: _LiveJob, image: np.ndarray, pixel_nm: tuple) -> None:
        try:
            shift = job.average.add(image)
            avg = job.average
            record = FrameRecord(index=avg.count - 1, signal=f"live_average_{job.signal}")
            info = self._frames.put(avg.average, record, pixel_nm, job_id=job_id)
            self._publish("live", {
                "job_id": job_id, "signal": job.signal, "frame_id": info.frame_id,
                "frames_averaged": avg.count, "frames_skipped": job.skipped,
                "shift_px": [float(shift[0]), float(shift[1])], "peak": float(avg.peaks[-1]),
            })  # fmt: skip
        except Exception:  # a preview must never disturb the acquisition
            log.exception("live average failed", job=job_id)
        finally:
            with self._lock:
                job.pending -= 1

    def latest_shift_px(self, job_id: int, timeout_s: float = FINISH_TIMEOUT_S) -> tuple:
        """(frames folded, the newest folded frame's shift (dy, dx) px relative to the average)
        once the frames queued so far are folded in; (0, None) for a job not averaged."""
        with self._lock:
            job = self._jobs.get(job_id)
            last = None if job is None else job.last
        if job is None or last is None:
            return 0, None
        last.result(timeout=timeout_s)
        return job.average.count, job.average.shifts_px[-1]

    def finish(self, job_id: int, path: Path) -> dict[str, Any] | None:
        """Wait for the frames still queued, store the average in the (closed) job file and
        forget the job. Returns its summary, or None if the job was not averaged."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
        if job is None or job.last is None:
            return None
        try:
            job.last.result(timeout=FINISH_TIMEOUT_S)
            if job.average.count == 0 or not path.exists():
                return None
            from scherzer.io import write_result

            attrs = {"frames_averaged": job.average.count, "frames_skipped": job.skipped}
            write_result(path, f"live_average_{job.signal}", job.average.average, attrs=attrs)
            return {"signal": job.signal, **attrs}
        except Exception:
            log.exception("storing the live average failed", job=job_id)
            return None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
