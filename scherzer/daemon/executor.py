"""The executor: one thread that owns the instruments and runs one plan at a time.

Per frame (:meth:`Executor._run_step`): frame boundary (cancel? stop? pause?) → wait the plan's
interval → set optics through the ``Lens`` (every focus set approached from the plan's side,
against hysteresis) → wait to settle → acquire through ``Camera``/``ScanGenerator`` → rotate a
scan-rotated frame back into the plan's base orientation → append to the job's EMD file (flushed
per frame) → ``frame`` event with the read-back values. A device error in a frame is handled by
the plan's :class:`~scherzer.daemon.plans.ErrorPolicy` (retry n times, then skip the frame or
abort the job; frames already written stay on disk). Whatever happens, the focus and scan
settings the plan changed are restored afterwards (``restore_optics``). Simulated instruments
report each frame's ground truth; it is stored with the frames (``/ground_truth``: true defocus,
true shifts in pixels of the stored orientation).

After the last frame the job is ``acquired``; its processing steps go to
:class:`ProcessingWorker` (a separate thread running :func:`run_processing`, so the next job's
acquisition can start): ``processing`` → ``done``, or ``failed`` with the reason (frames stay).
Results go into the job's file and its folder (PNG plots): files are
``<data_dir>/jobs/<name>_<NNN>.hspy`` with the folder ``<name>_<NNN>/`` beside, numbered, never
overwritten.

Interactive device calls (``lens_set``, ``camera_acquire`` …) are queued to this same thread with
:meth:`Executor.call_device`, so only one thread ever touches a driver. Nothing here blocks the
request loop: results come back through callbacks that post to the loop's mailbox.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from scherzer.config import Settings
from scherzer.daemon.calibrations import calibration_loader
from scherzer.daemon.diskspace import DiskGate, ensure_room, free_bytes, is_disk_full
from scherzer.daemon.eftem_run import run_eftem
from scherzer.daemon.files import (
    count_frames_on_disk,
    job_folder,
    open_stack_writer,
    output_path,
)
from scherzer.daemon.frames import FrameCache
from scherzer.daemon.jobrun import (
    Acquired,
    JobRun,
    SavedOptics,
    rotate_back,
    store_tracking,
    truth_shift_in_frame_px,
)
from scherzer.daemon.jobs import JobStore
from scherzer.daemon.live import LiveProcessing
from scherzer.daemon.optics_control import OpticsControl
from scherzer.daemon.plans import (
    CameraShot,
    EftemSeries,
    FrameStep,
    RotatedScanSeries,
    ScanShot,
    parse_plan,
)
from scherzer.daemon.protocol import ErrorBody, ErrorCode, JobInfo, ProtocolError
from scherzer.daemon.worker import ProcessingWorker, Publish, processing_steps, run_processing
from scherzer.drivers import registry
from scherzer.drivers.base import DeviceError
from scherzer.drivers.instruments import Instruments
from scherzer.io import StackWriter
from scherzer.stack import FrameRecord

# Re-exported: the names callers imported from here before the split.
__all__ = [
    "Executor",
    "FrameCache",
    "Instruments",
    "ProcessingWorker",
    "count_frames_on_disk",
    "job_folder",
    "open_instruments",
    "open_stack_writer",
    "output_path",
    "processing_steps",
    "rotate_back",
    "run_processing",
    "truth_shift_in_frame_px",
]

log = structlog.get_logger("scherzer.executor")


def open_instruments(settings: Settings) -> Instruments:
    """Build the configured devices (:func:`scherzer.drivers.registry.open_instruments`)."""
    return registry.open_instruments(settings.devices)


# --- the executor thread ----------------------------------------------------------------------
class _StopJob(Exception):
    """Raised at a frame boundary to end a job in ``state``."""

    def __init__(self, state: str, message: str) -> None:
        super().__init__(message)
        self.state = state


@dataclass
class _Task:
    fn: Callable[[Instruments], Any]
    done: Callable[[Any, BaseException | None], None]


class Executor(OpticsControl):
    """The instrument thread; see the module docstring."""

    def __init__(
        self,
        store: JobStore,
        instruments: Instruments,
        settings: Settings,
        publish: Publish,
        frames: FrameCache,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: Unix seconds now (``not_before_s`` is compared with it; tests inject one)."""
        self.store = store
        self.instruments = instruments
        self.settings = settings
        self.publish = publish
        self.frames = frames
        self.live = LiveProcessing(frames, publish)
        self.clock = clock
        self.disk = DiskGate(settings.data_path, settings.limits.min_free_disk_bytes)
        runner = functools.partial(
            run_processing, load_curve=calibration_loader(settings.calibrations_path)
        )
        self.processing = ProcessingWorker(
            store, publish, runner=runner, on_disk_full=self._hold_for_disk
        )
        self._unrecorded: list[tuple[int, str, ErrorBody | None]] = []  # states to retry
        self._last_defocus_nm: float | None = None
        self.on_queue_change: Callable[[], None] = lambda: None  # set by the server
        self.current_job: int | None = None
        self._nominal_defocus_nm: float | None = None
        self.job_paused = False
        self.queue_paused = store.get_flag("queue_paused")  # survives restarts
        self._stopping = threading.Event()
        self._cond = threading.Condition()
        self._tasks: list[_Task] = []
        self._thread = threading.Thread(target=self._run, name="executor", daemon=True)

    # --- control from the request loop -----------------------------------------------------
    def start(self) -> None:
        self._resume_processing()
        self._thread.start()

    def _resume_processing(self) -> None:
        """Jobs left ``acquired`` by a stop or crash get their processing run now."""
        for job in self.store.awaiting_processing():
            try:
                plan = parse_plan(job.plan)
            except Exception:
                log.exception("cannot resume processing", job=job.job_id)
                continue
            log.info("resuming processing after a restart", job=job.job_id)
            if plan.processing and job.output_file:
                self.processing.submit(job, plan, Path(job.output_file), job.error)
            else:
                self._emit_job(self.store.set_state(job.job_id, "done"))

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def stop(self) -> None:
        """Ask the thread to stop at the next frame boundary (returns at once)."""
        self._stopping.set()
        self.wake()

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def busy(self) -> bool:
        return self.current_job is not None

    def pause(self) -> None:
        self.queue_paused = True
        self.store.set_flag("queue_paused", True)
        self.wake()

    def resume(self) -> None:
        self.queue_paused = False
        self.disk.open()  # an operator's resume lifts a disk hold too (it comes back if full)
        self.store.set_flag("queue_paused", False)
        self.wake()

    @property
    def pause_reason(self) -> str | None:
        """Why the queue holds by itself (disk), or None."""
        return self.disk.reason

    def _hold_for_disk(self, reason: str) -> None:
        """A write found the disk full: hold the queue until space returns (any thread)."""
        if self.disk.reason is None:
            log.error("disk full: the queue holds until space returns", reason=reason)
        self.disk.close(reason)
        self.on_queue_change()

    def call_device(
        self, fn: Callable[[Instruments], Any], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        """Run ``fn(instruments)`` on the executor thread; ``done(result, error)`` afterwards."""
        if self._stopping.is_set():
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the daemon is stopping")
        if self.busy:
            raise ProtocolError(
                ErrorCode.BUSY, f"job {self.current_job} owns the instruments; try again later"
            )
        with self._cond:
            self._tasks.append(_Task(fn, done))
            self._cond.notify_all()

    # --- thread ----------------------------------------------------------------------------
    def _take_tasks(self) -> list[_Task]:
        with self._cond:
            tasks, self._tasks = self._tasks, []
        return tasks

    def _serve_tasks(self) -> None:
        for task in self._take_tasks():
            try:
                result = task.fn(self.instruments)
            except BaseException as exc:
                task.done(None, exc)
            else:
                task.done(result, None)

    def _refuse_tasks(self, code: ErrorCode, message: str) -> None:
        for task in self._take_tasks():
            task.done(None, ProtocolError(code, message))

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._run_once()
                except Exception:  # a bug: log it and keep the instrument thread alive
                    log.exception("executor error; continuing")
                    self._stopping.wait(1.0)
        finally:
            self._refuse_tasks(ErrorCode.SHUTTING_DOWN, "the daemon is stopping")
            self.processing.shutdown()
            self.live.shutdown()

    def _run_once(self) -> None:
        self._record_pending()
        self._serve_tasks()
        job = None if self.queue_paused or self._disk_blocked() else self.store.next_queued()
        if job is not None and not _too_early(job, self.clock()):
            self._run_job(job)
            return
        with self._cond:
            if not self._tasks and not self._stopping.is_set():
                self._cond.wait(timeout=0.5)

    def _disk_blocked(self) -> bool:
        blocked, changed = self.disk.blocked()
        if changed:
            log.warning("disk hold " + ("set" if blocked else "lifted"), reason=self.disk.reason)
            self.on_queue_change()
        return blocked

    def _record_pending(self) -> None:
        """Retry job states the store could not take (its disk was full)."""
        pending, self._unrecorded = self._unrecorded, []
        for job_id, state, err in pending:
            self._set_state(job_id, state, err)

    def _set_state(self, job_id: int, state: str, err: ErrorBody | None) -> JobInfo | None:
        """Record a state and publish it; if the store cannot write, keep it for a retry
        (never raises: the job must not stay ``running`` because SQLite hit a full disk)."""
        try:
            info = self.store.set_state(job_id, state, error=err)
        except Exception as exc:
            log.error("cannot record the job state; retrying", job=job_id, state=state,
                      error=str(exc))  # fmt: skip
            self._unrecorded.append((job_id, state, err))
            return None
        self._emit_job(info)
        return info

    # --- one job ---------------------------------------------------------------------------
    def _emit_job(self, info: JobInfo) -> None:
        self.publish("job", {"job": info.model_dump(mode="json")})

    def _run_job(self, job: JobInfo) -> None:
        jlog = log.bind(job=job.job_id, client=job.submitter)
        try:
            path = output_path(self.settings.data_path, job)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self._hold_for_disk(f"cannot create the job folder: {exc}")
            return
        try:
            info = self.store.start(job.job_id, str(path))
        except ProtocolError:  # cancelled between next_queued() and now
            job_folder(path).rmdir()
            return
        self.current_job = job.job_id
        self._nominal_defocus_nm = None
        self._last_defocus_nm = None
        self._emit_job(info)
        self.on_queue_change()
        jlog.info("job started", kind=job.kind, output=str(path))
        run: JobRun | None = None
        saved: SavedOptics | None = None
        outcome: tuple[str, ErrorBody | None]
        try:
            plan = parse_plan(job.plan)
            run = JobRun(job, plan, path)
            self.live.begin(job.job_id, plan.kind_name(), tuple(plan.signals()),
                            instrument=self.instruments.instrument)  # fmt: skip
            saved = self._snapshot(plan)
            if self.instruments.mark_truth_origin is not None:
                self.instruments.mark_truth_origin()
            if isinstance(plan, EftemSeries):  # exposures chosen as it goes: its own loop
                run_eftem(self, run, jlog)
            for step in () if isinstance(plan, EftemSeries) else plan.steps():
                self._frame_boundary(job.job_id)
                self._run_step_with_policy(run, step, jlog)
            outcome = ("acquired", None)
        except _StopJob as stop:
            jlog.info("job stopped", state=stop.state, reason=str(stop))
            err = ErrorBody(code=ErrorCode.SHUTTING_DOWN, message=str(stop))
            outcome = (stop.state, err if stop.state == "interrupted" else None)
        except Exception as exc:
            outcome = ("failed", self._error_body(exc, jlog))
        finally:
            self._restore_optics(run, saved, jlog)
            if run is not None:
                self._close_file(run, jlog)
                self.live.finish(job.job_id, path)
                store_tracking(run, path, jlog)
            self.current_job = None
            self.job_paused = False
        self._conclude(job, run, outcome, path, jlog)

    def _conclude(
        self,
        job: JobInfo,
        run: JobRun | None,
        outcome: tuple[str, ErrorBody | None],
        path: Path,
        jlog: Any,
    ) -> None:
        state, err = outcome
        frames = count_frames_on_disk(path)
        try:
            self.store.set_progress(job.job_id, frames)
            if frames == 0 and not path.exists():  # never opened: name no file
                self.store.set_output_file(job.job_id, None)
                _remove_empty_folder(job_folder(path))
        except Exception as exc:
            jlog.error("cannot record the frames on disk", error=str(exc))
        if state != "acquired":
            self._set_state(job.job_id, state, err)
            return
        assert run is not None
        note = run.skipped_note()
        if self._set_state(job.job_id, "acquired", note) is None:
            return  # recorded later; processing resumes from ``acquired`` at the next start
        if run.plan.processing and run.written:
            self.processing.submit(job, run.plan, path, note)
            return
        info = self._set_state(job.job_id, "done", note)
        jlog.info("job done", frames=info.frames_done if info else frames, skipped=run.skipped)

    def _error_body(self, exc: Exception, jlog: Any) -> ErrorBody:
        if is_disk_full(exc):
            jlog.error("job failed: disk full", error=str(exc))
            self._hold_for_disk(str(exc))
            return ErrorBody(
                code=ErrorCode.DISK_FULL,
                message=f"{exc}; the queue holds until space returns (or queue_resume)",
                details={"free_bytes": free_bytes(self.settings.data_path)},
            )
        if isinstance(exc, DeviceError):
            jlog.error("job failed: device error", code=exc.code, error=str(exc))
            return ErrorBody(
                code=ErrorCode.of_device(exc.code), message=str(exc), details=exc.details or None
            )
        if isinstance(exc, ProtocolError):
            jlog.error("job failed", code=str(exc.code), error=exc.message)
            return ErrorBody(code=exc.code, message=exc.message, details=exc.details)
        jlog.exception("job failed: internal error")
        return ErrorBody(
            code=ErrorCode.INTERNAL,
            message=f"{type(exc).__name__}: {exc}",
            details={"traceback": traceback.format_exception(exc)[-3:]},
        )

    def _frame_boundary(self, job_id: int) -> None:
        """Cancel, stop or pause between frames (never inside one)."""
        self._refuse_tasks(ErrorCode.BUSY, f"job {job_id} owns the instruments")
        self._check_stop(job_id)
        if not self.queue_paused:
            return
        self.job_paused = True
        self._emit_job(self.store.set_state(job_id, "paused"))
        with self._cond:
            while self.queue_paused and not self._stopping.is_set():
                if self.store.cancel_requested(job_id):
                    break
                self._cond.wait(timeout=0.5)
        self._check_stop(job_id)
        self.job_paused = False
        self._emit_job(self.store.set_state(job_id, "running"))

    def _check_stop(self, job_id: int) -> None:
        if self.store.cancel_requested(job_id):
            raise _StopJob("cancelled", "cancelled at a frame boundary")
        if self._stopping.is_set():
            raise _StopJob("interrupted", "the daemon stopped; frames on disk are kept")

    # --- frames ----------------------------------------------------------------------------
    def _acquire(self, shot: CameraShot | ScanShot) -> Acquired:
        if isinstance(shot, CameraShot):
            cam = self.instruments.camera
            if cam is None:
                raise DeviceError("no camera is configured")
            f = cam.acquire(shot.exposure_s, shot.binning, shot.region)
            return Acquired({"frames": f.image}, {"frames": f.record}, f.pixel_size_nm, f.truth)
        scan = self.instruments.scan
        if scan is None:
            raise DeviceError("no scan generator is configured")
        scan.configure(shot.settings)
        f = scan.acquire()
        return Acquired(dict(f.images), dict(f.records), f.pixel_size_nm, f.truth)

    def _complete_record(
        self, record: FrameRecord, index: int, readback_nm: float | None
    ) -> FrameRecord:
        """The plan's frame index, the defocus this job set and the lens driver's read-back."""
        changes: dict[str, Any] = {"index": index}
        if self._nominal_defocus_nm is not None:
            changes["defocus_nominal_nm"] = self._nominal_defocus_nm
        if readback_nm is not None:
            changes["defocus_readback_nm"] = readback_nm
        return dataclasses.replace(record, **changes)

    def _run_step_with_policy(self, run: JobRun, step: FrameStep, jlog: Any) -> None:
        """One frame under the plan's error policy (retries, then skip or abort)."""
        policy = run.plan.on_error
        for attempt in range(policy.retries + 1):
            try:
                self._run_step(run, step)
                return
            except DeviceError as exc:
                last = exc
                if attempt == policy.retries and policy.then == "abort":
                    raise  # the job failure is the log line
                jlog.warning("frame failed", index=step.index, attempt=attempt + 1,
                             code=exc.code, error=str(exc))  # fmt: skip
                self._check_stop(run.job.job_id)
        if policy.then == "skip":
            run.skipped.append(step.index)
            run.skip_reasons.append(str(last))
            jlog.warning("frame skipped", index=step.index, error=str(last))
            self._publish_progress(run)
            return
        raise last

    def _publish_progress(self, run: JobRun) -> None:
        self.store.set_progress(run.job.job_id, run.written)
        self.publish(
            "progress",
            {
                "job_id": run.job.job_id,
                "frames_done": run.written,
                "frames_total": run.plan.n_frames(),
                "skipped": list(run.skipped),
            },
        )

    def _run_step(self, run: JobRun, step: FrameStep) -> None:
        """One frame: wait → optics → acquire → rotate back → write → event."""
        if step.delay_s > 0:
            self.instruments.wait_s(step.delay_s)
        self._set_optics(step, run.plan)
        lens = self.instruments.lens
        readback_nm = lens.get_defocus_nm() if lens is not None else None  # at exposure start
        got = self._acquire(step.shot)
        images = {
            name: rotate_back(np.asarray(img, dtype=np.float32), step.derotate_deg)
            if step.derotate_deg
            else np.asarray(img, dtype=np.float32)
            for name, img in got.images.items()
        }
        ensure_room(run.path.parent, sum(img.nbytes for img in images.values()))
        writer = run.writer or self._open_writer(run, images, got.pixel_size_nm)
        for name, image in images.items():
            record = self._complete_record(got.records[name], step.index, readback_nm)
            writer.append(image, record, name=name)
            self.live.add(run.job.job_id, name, image, got.pixel_size_nm, record=record)
            info = self.frames.put(image, record, got.pixel_size_nm, job_id=run.job.job_id)
            self.publish(
                "frame",
                {
                    "job_id": run.job.job_id,
                    "frame_id": info.frame_id,
                    "index": step.index,
                    "total": run.plan.n_frames(),
                    "signal": name,
                    "record": info.record.model_dump(mode="json"),
                },
            )
        run.add_truth(got.truth)
        run.written += 1
        self._publish_progress(run)
        self._track_drift(run, got.pixel_size_nm[1])

    def _track_drift(self, run: JobRun, pixel_nm: float) -> None:
        """Drift tracking (time series with ``track_drift_nm``): once the newest frame is folded
        into the live average, move the stage against the content's displacement when it
        exceeds the threshold; every move is recorded (``drift_tracking`` table)."""
        threshold = getattr(run.plan, "track_drift_nm", None)
        stage = self.instruments.stage
        if threshold is None or stage is None:
            return
        folded, shift = self.live.latest_shift_px(run.job.job_id)
        if shift is None or folded <= run.tracked_after:
            return
        moved_nm = np.asarray(shift, dtype=np.float64) * pixel_nm
        if float(np.hypot(*moved_nm)) <= threshold:
            return
        y, x = stage.get_position_nm()
        stage.move_to_nm(y - moved_nm[0], x - moved_nm[1])
        run.tracked_after = folded + 1  # the next measurement must follow the move
        run.tracking.append((run.written - 1, float(moved_nm[0]), float(moved_nm[1])))

    def _open_writer(
        self, run: JobRun, images: dict[str, np.ndarray], pixel: tuple[float, float]
    ) -> StackWriter:
        plan = run.plan
        metadata: dict[str, Any] = {
            "job_id": run.job.job_id,
            "plan": run.job.plan,
            "submitter": run.job.submitter,
            "kind": plan.kind_name(),
            "name": plan.name,
            "sample": plan.sample,
            "notes": plan.notes,
        }
        if isinstance(plan, RotatedScanSeries):
            metadata |= {"derotated": True, "base_rotation_deg": plan.base_rotation_deg}
        first = next(iter(images.values()))
        run.writer = open_stack_writer(
            run.path,
            pixel_size_nm=pixel,
            frame_shape=tuple(first.shape),
            names=tuple(images),
            instrument=self.instruments.instrument,
            metadata=metadata,
        )
        return run.writer

    def _close_file(self, run: JobRun, jlog: Any) -> None:
        """Store the ground truth (simulators) and close the job file; never raises."""
        if run.writer is None:
            return
        try:
            truth = run.truth_arrays()
            if truth:
                run.writer.set_ground_truth(truth)
        except Exception:
            jlog.exception("storing the ground truth failed")
        try:
            run.writer.close()
        except Exception:
            jlog.exception("closing the job file failed")
        run.writer = None


def _too_early(job: JobInfo, now_s: float) -> bool:
    """The job's plan asks not to start before a time that has not come yet (``now_s``: Unix
    seconds). An unreadable value does not hold the queue (submit bounds it)."""
    not_before = job.plan.get("not_before_s")
    if not_before is None:
        return False
    try:
        return now_s < float(not_before)
    except (TypeError, ValueError):
        return False


def _remove_empty_folder(folder: Path) -> None:
    """Drop the job folder reserved for a file that was never written (if it is empty)."""
    try:
        folder.rmdir()
    except OSError:
        pass
