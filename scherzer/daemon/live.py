"""Live processing while a job acquires: a running, drift-compensated average per job, and for
focal series an incremental registration.

For time series and rotated-scan series, every frame of the plan's first signal is folded into a
:class:`~scherzer.processing.live.RunningAverage` in a worker thread of its own, so acquisition is
never delayed: when the worker falls :data:`MAX_BACKLOG` frames behind (big frames, slow
machine), frames are left out of the preview and counted. After each fold the average is put in
the frame cache (clients fetch it with ``frame_get`` by the ``frame_id`` the ``live`` event
names) and a ``live`` event is published. When the job's file is closed the average is stored in
it as ``live_average_<signal>`` (attributes: frames folded and skipped, and ``folded_frames``,
the indices of the frames in the average).

For focal series each image is registered once, as it arrives, against the images before it
(:class:`~scherzer.processing.live_focal.IncrementalFocal`: defocus relative to the first image,
the step from the previous one, the drift) in the same worker thread; images are never left out
(each estimate builds on the earlier ones; a focal series' images come seconds apart). Each
estimate is a ``live`` event with ``kind: "focal_registration"``; when the job ends the final
values are stored as the ``live_focal_registration`` table. A live estimate needs the recorded
optics (``instrument["optics"]``) and each frame's nominal defocus; without them the job simply
has none.
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

__all__ = ["FOCAL_KINDS", "LIVE_KINDS", "MAX_BACKLOG", "LiveProcessing"]

log = structlog.get_logger("scherzer.live")

#: Plan kinds whose frames are averaged live (one field of view, drifting).
LIVE_KINDS = ("time_series", "rotated_scan")
#: Plan kinds registered live as focal series.
FOCAL_KINDS = ("focal_series",)
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
    folded: list[int] = field(default_factory=list)  # frame indices in the average
    last: Future | None = None


@dataclass
class _LiveFocal:
    """A focal series registered live; the registrar is built at the first frame (its pixel)."""

    signal: str
    instrument: dict[str, Any]
    registrar: Any = None
    last: Future | None = None
    failed: bool = False


class LiveProcessing:
    """Running averages of the jobs being acquired (see the module docstring)."""

    def __init__(self, frames: FrameCache, publish: Callable[[str, dict[str, Any]], None]):
        self._frames = frames
        self._publish = publish
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="live")
        self._jobs: dict[int, _LiveJob] = {}
        self._focal: dict[int, _LiveFocal] = {}
        self._lock = threading.Lock()

    def begin(
        self, job_id: int, kind: str, signals: tuple[str, ...],
        instrument: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Start a running average for ``job_id`` if its kind is averaged live, or a live focal
        registration (``instrument``: what the job file records, with the optics)."""
        if kind in LIVE_KINDS and signals:
            with self._lock:
                self._jobs[job_id] = _LiveJob(signals[0])
        elif kind in FOCAL_KINDS and signals and (instrument or {}).get("optics"):
            with self._lock:
                self._focal[job_id] = _LiveFocal(signals[0], dict(instrument or {}))

    def add(
        self, job_id: int, signal: str, image: np.ndarray, pixel_nm: tuple,
        record: FrameRecord | None = None,
    ) -> None:  # fmt: skip
        """Queue a frame for folding in (never blocks; left out when the worker lags) or, for a
        focal series, for live registration (``record``: its nominal defocus)."""
        with self._lock:
            focal = self._focal.get(job_id)
            if focal is not None and signal == focal.signal and record is not None:
                focal.last = self._pool.submit(
                    self._register, job_id, focal, image.copy(), pixel_nm, record
                )
                return
            job = self._jobs.get(job_id)
            if job is None or signal != job.signal:
                return
            if job.pending >= MAX_BACKLOG:
                job.skipped += 1
                return
            job.pending += 1
            index = job.average.count + job.pending - 1 if record is None else record.index
            job.last = self._pool.submit(
                self._fold, job_id, job, image.copy(), pixel_nm, int(index)
            )

    def _fold(
        self, job_id: int, job: _LiveJob, image: np.ndarray, pixel_nm: tuple, index: int
    ) -> None:
        try:
            shift = job.average.add(image)
            job.folded.append(index)
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

    def _register(
        self, job_id: int, job: _LiveFocal, image: np.ndarray, pixel_nm: tuple,
        record: FrameRecord,
    ) -> None:  # fmt: skip
        """One image into the job's incremental focal registration, then a ``live`` event."""
        if job.failed:
            return
        try:
            if job.registrar is None:
                from scherzer.optics import Optics
                from scherzer.processing.live_focal import IncrementalFocal

                optics = Optics(**job.instrument["optics"]).with_(defocus_nm=0.0)
                offset = float((job.instrument.get("camera") or {}).get("offset_counts", 0.0))
                job.registrar = IncrementalFocal(optics, float(pixel_nm[1]),
                                                 camera_offset_counts=offset)  # fmt: skip
            est = job.registrar.add(image, record.defocus_nominal_nm)
            self._publish("live", {
                "job_id": job_id, "signal": job.signal, "kind": "focal_registration",
                "frames_registered": est.index + 1, **est.to_json(),
            })  # fmt: skip
        except Exception:  # a preview must never disturb the acquisition
            job.failed = True
            log.exception("live focal registration failed; none for the rest of the job",
                          job=job_id)  # fmt: skip

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
            focal = self._focal.pop(job_id, None)
        if focal is not None:
            return self._finish_focal(job_id, focal, path)
        if job is None or job.last is None:
            return None
        try:
            job.last.result(timeout=FINISH_TIMEOUT_S)
            if job.average.count == 0 or not path.exists():
                return None
            from scherzer.io import write_result

            attrs = {"frames_averaged": job.average.count, "frames_skipped": job.skipped,
                     "folded_frames": list(job.folded)}  # fmt: skip
            write_result(path, f"live_average_{job.signal}", job.average.average, attrs=attrs)
            return {"signal": job.signal, **attrs}
        except Exception:
            log.exception("storing the live average failed", job=job_id)
            return None

    def _finish_focal(self, job_id: int, job: _LiveFocal, path: Path) -> dict[str, Any] | None:
        """Wait for the images still queued; store the final estimates as the
        ``live_focal_registration`` table."""
        try:
            if job.last is not None:
                job.last.result(timeout=FINISH_TIMEOUT_S)
            if job.registrar is None or job.failed or not path.exists():
                return None
            from scherzer.io import write_table

            table = job.registrar.table()
            write_table(path, "live_focal_registration", table)
            return {"signal": job.signal, "frames_registered": len(table)}
        except Exception:
            log.exception("storing the live focal registration failed", job=job_id)
            return None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
