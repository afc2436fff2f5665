"""The executor: one thread that owns the instruments and runs one plan at a time.

Per frame (:meth:`Executor._run_step`): frame boundary (cancel? stop? pause?) → set optics through
the ``Lens`` → wait to settle → acquire through ``Camera``/``ScanGenerator`` → append to the job's
EMD file (flushed per frame) → ``frame`` event. After the last frame the job is ``acquired``; its
processing steps (if any) go to :class:`ProcessingWorker` (a separate thread, so the next job's
acquisition can start) and the job becomes ``done``. A device error fails the job with the
device's error code; frames already written stay on disk.

Interactive device calls (``lens_set``, ``camera_acquire`` …) are queued to this same thread with
:meth:`Executor.call_device`, so only one thread ever touches a driver. Nothing here blocks the
request loop: results come back through callbacks that post to the loop's mailbox.

Extension points for the plans issue: :meth:`_run_step` (error policy: retry/skip/abort wraps it),
:meth:`_restore_optics` (restore what a plan changed), :class:`ProcessingWorker` (pipeline runner).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from scherzer.config import Settings
from scherzer.daemon.jobs import JobStore
from scherzer.daemon.plans import BasePlan, CameraShot, FrameStep, ScanShot, parse_plan
from scherzer.daemon.protocol import (
    ErrorBody,
    ErrorCode,
    FrameInfo,
    JobInfo,
    ProtocolError,
    record_model,
)
from scherzer.drivers.base import Camera, DeviceError, Lens, ScanGenerator
from scherzer.emd import StackWriter, read_stacks
from scherzer.stack import FrameRecord

__all__ = [
    "Executor",
    "FrameCache",
    "Instruments",
    "ProcessingWorker",
    "count_frames_on_disk",
    "open_instruments",
    "open_stack_writer",
]

log = structlog.get_logger("scherzer.executor")
Publish = Callable[[str, dict[str, Any]], None]


# --- instruments ------------------------------------------------------------------------------
@dataclass
class Instruments:
    """The devices the daemon drives (any may be missing)."""

    camera: Camera | None = None
    scan: ScanGenerator | None = None
    lens: Lens | None = None
    camera_shape: tuple[int, int] = (512, 512)
    wait_s: Callable[[float], None] = lambda s: None
    closers: tuple[Callable[[], None], ...] = ()

    def describe(self) -> dict[str, str]:
        return {
            kind: getattr(dev, "name", "?") if dev is not None else "none"
            for kind, dev in (("camera", self.camera), ("scan", self.scan), ("lens", self.lens))
        }

    def close(self) -> None:
        for close in self.closers:
            try:
                close()
            except Exception:
                log.exception("closing a device failed")


def _inject_fault(microscope: Any, spec: str) -> None:
    kind, _, after = spec.partition(":")
    microscope.inject_fault(kind, int(after or 0))


def open_instruments(settings: Settings) -> Instruments:
    """Build the configured devices (simulated microscope; sim or serial lens)."""
    from scherzer.drivers import sim

    dev = settings.devices
    if dev.kind == "pattern":
        scope: Any = sim.PatternBench(tuple(dev.camera_shape), dev.camera_pixel_nm)
        devices: tuple[type, type, type] = (
            sim.PatternCamera,
            sim.PatternScanGenerator,
            sim.PatternLens,
        )
    else:
        from scherzer.simulators.microscope import VirtualMicroscope

        scope = VirtualMicroscope(
            dev.specimen,
            camera_shape=tuple(dev.camera_shape),
            camera_pixel_nm=dev.camera_pixel_nm,
            seed=dev.seed,
        )
        devices = (sim.SimCamera, sim.SimScanGenerator, sim.SimLens)
    if dev.fault:
        _inject_fault(scope, dev.fault)
    camera_cls, scan_cls, lens_cls = devices
    lens: Lens
    closers: list[Callable[[], None]] = []
    if dev.lens == "serial":
        from scherzer.drivers.serial_lens import SerialLens

        serial = SerialLens(
            dev.serial_port,
            baudrate=dev.serial_baudrate,
            timeout_s=dev.serial_timeout_s,
            retries=dev.serial_retries,
        )
        closers.append(serial.close)
        lens = serial
    elif lens_cls is sim.PatternLens:
        lens = sim.PatternLens(scope)
    else:
        lens = sim.SimLens(scope, speedup=dev.speedup)
    return Instruments(
        camera=camera_cls(scope, speedup=dev.speedup),
        scan=scan_cls(scope, speedup=dev.speedup),
        lens=lens,
        camera_shape=tuple(dev.camera_shape),
        wait_s=sim.SimTimer(scope, dev.speedup).pass_s,
        closers=tuple(closers),
    )


# --- files ------------------------------------------------------------------------------------
def open_stack_writer(path: Path, **kwargs: Any) -> StackWriter:
    """The job-file writer: EMD 1.0, flushed per frame, readable after a crash."""
    return StackWriter(path, **kwargs)


def count_frames_on_disk(path: str | Path | None) -> int:
    """Complete frames in a job file (largest signal); 0 if it is missing or unreadable."""
    if not path or not Path(path).exists():
        return 0
    try:
        return max((s.n_frames for s in read_stacks(path).values()), default=0)
    except Exception:
        log.warning("cannot count frames", path=str(path))
        return 0


def output_path(data_dir: Path, job: JobInfo) -> Path:
    """``<data_dir>/jobs/<job id>_<name>.h5``; never an existing file (``_2``, ``_3`` … added)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", job.name or job.kind).strip("-.")[:48] or job.kind
    stem = data_dir / "jobs" / f"{job.job_id:06d}_{slug}"
    path, n = stem.with_suffix(".h5"), 1
    while path.exists():
        n += 1
        path = stem.parent / f"{stem.name}_{n}.h5"
    return path


# --- recent frames for frame_get --------------------------------------------------------------
class FrameCache:
    """The last ``size`` frames (interactive and from jobs), addressed by a frame id."""

    def __init__(self, size: int = 32) -> None:
        self._size = size
        self._frames: OrderedDict[int, tuple[np.ndarray, FrameInfo]] = OrderedDict()
        self._next = 1
        self._lock = threading.Lock()

    def put(
        self,
        image: np.ndarray,
        record: FrameRecord,
        pixel_size_nm: tuple[float, float],
        job_id: int | None = None,
    ) -> FrameInfo:
        image = np.ascontiguousarray(image, dtype=np.float32)
        with self._lock:
            frame_id = self._next
            self._next += 1
            info = FrameInfo(
                frame_id=frame_id,
                signal=record.signal,
                shape=list(image.shape),
                pixel_size_nm=pixel_size_nm,
                record=record_model(record),
                job_id=job_id,
            )
            self._frames[frame_id] = (image, info)
            while len(self._frames) > self._size:
                self._frames.popitem(last=False)
        return info

    def get(self, frame_id: int) -> tuple[np.ndarray, FrameInfo]:
        with self._lock:
            if frame_id not in self._frames:
                raise ProtocolError(
                    ErrorCode.NOT_FOUND,
                    f"frame {frame_id} is not among the last {self._size} frames",
                )
            return self._frames[frame_id]


# --- processing hand-off ----------------------------------------------------------------------
class ProcessingWorker:
    """Runs a job's processing steps in its own thread, then marks the job done or failed."""

    def __init__(self, store: JobStore, publish: Publish, runner: Callable | None = None) -> None:
        self._store = store
        self._publish = publish
        self._runner = runner
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="processing")

    def submit(self, job: JobInfo, plan: BasePlan, path: Path) -> None:
        self._pool.submit(self._run, job, plan, path)

    def _run(self, job: JobInfo, plan: BasePlan, path: Path) -> None:
        jlog = log.bind(job=job.job_id)
        self._publish("job", {"job": self._store.set_state(job.job_id, "processing").model_dump(
            mode="json")})  # fmt: skip
        try:
            if self._runner is None:
                raise RuntimeError(f"no processing runner for steps {plan.processing}")
            self._runner(plan, path)
            info = self._store.set_state(job.job_id, "done")
        except Exception as exc:
            jlog.exception("processing failed")
            err = ErrorBody(code=ErrorCode.INTERNAL, message=f"processing failed: {exc}")
            info = self._store.set_state(job.job_id, "failed", error=err)
        self._publish("job", {"job": info.model_dump(mode="json")})

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)


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


class Executor:
    """The instrument thread; see the module docstring."""

    def __init__(
        self,
        store: JobStore,
        instruments: Instruments,
        settings: Settings,
        publish: Publish,
        frames: FrameCache,
    ) -> None:
        self.store = store
        self.instruments = instruments
        self.settings = settings
        self.publish = publish
        self.frames = frames
        self.processing = ProcessingWorker(store, publish)
        self.on_queue_change: Callable[[], None] = lambda: None  # set by the server
        self.current_job: int | None = None
        self._nominal_defocus_nm: float | None = None
        self.job_paused = False
        self.queue_paused = False
        self._stopping = threading.Event()
        self._cond = threading.Condition()
        self._tasks: list[_Task] = []
        self._thread = threading.Thread(target=self._run, name="executor", daemon=True)

    # --- control from the request loop -----------------------------------------------------
    def start(self) -> None:
        self._thread.start()

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
        self.wake()

    def resume(self) -> None:
        self.queue_paused = False
        self.wake()

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

    def _run_once(self) -> None:
        self._serve_tasks()
        job = None if self.queue_paused else self.store.next_queued()
        if job is not None:
            self._run_job(job)
            return
        with self._cond:
            if not self._tasks and not self._stopping.is_set():
                self._cond.wait(timeout=0.5)

    # --- one job ---------------------------------------------------------------------------
    def _emit_job(self, info: JobInfo) -> None:
        self.publish("job", {"job": info.model_dump(mode="json")})

    def _run_job(self, job: JobInfo) -> None:
        jlog = log.bind(job=job.job_id, client=job.submitter)
        path = output_path(self.settings.data_path, job)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            info = self.store.start(job.job_id, str(path))
        except ProtocolError:  # cancelled between next_queued() and now
            return
        self.current_job = job.job_id
        self._nominal_defocus_nm = None
        self._emit_job(info)
        self.on_queue_change()
        jlog.info("job started", kind=job.kind, output=str(path))
        writer_box: list[Any] = []
        try:
            plan = parse_plan(job.plan)
            for step in plan.steps():
                self._frame_boundary(job.job_id)
                self._run_step(job, plan, step, path, writer_box)
            self._finish_acquisition(job, plan, path, writer_box)
        except _StopJob as stop:
            self._close_writers(writer_box)
            err = ErrorBody(code=ErrorCode.SHUTTING_DOWN, message=str(stop))
            self.store.set_progress(job.job_id, count_frames_on_disk(path))
            info = self.store.set_state(
                job.job_id, stop.state, error=err if stop.state == "interrupted" else None
            )
            jlog.info("job stopped", state=stop.state, reason=str(stop))
            self._emit_job(info)
        except Exception as exc:
            self._close_writers(writer_box)
            self._fail(job, exc, jlog)
        finally:
            self._close_writers(writer_box)
            self.current_job = None
            self.job_paused = False

    def _close_writers(self, writer_box: list[Any]) -> None:
        for w in writer_box:
            try:
                w.close()
            except Exception:
                log.exception("closing the job file failed")
        writer_box.clear()

    def _fail(self, job: JobInfo, exc: Exception, jlog: Any) -> None:
        if isinstance(exc, DeviceError):
            code = ErrorCode.of_device(exc.code)
            err = ErrorBody(code=code, message=str(exc), details=exc.details or None)
            jlog.error("job failed: device error", code=exc.code, error=str(exc))
        elif isinstance(exc, ProtocolError):
            err = ErrorBody(code=exc.code, message=exc.message, details=exc.details)
            jlog.error("job failed", code=str(exc.code), error=exc.message)
        else:
            err = ErrorBody(
                code=ErrorCode.INTERNAL,
                message=f"{type(exc).__name__}: {exc}",
                details={"traceback": traceback.format_exception(exc)[-3:]},
            )
            jlog.exception("job failed: internal error")
        self.store.set_state(job.job_id, "failed", error=err)
        self._emit_job(self.store.get(job.job_id))

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

    def _set_optics(self, step: FrameStep) -> None:
        lens = self.instruments.lens
        if step.defocus_nm is not None:
            if lens is None:
                raise DeviceError("this plan sets defocus but no lens is configured")
            lens.set_defocus_nm(step.defocus_nm)
            lens.wait_settled(self.settings.devices.settle_timeout_s)
            self._nominal_defocus_nm = step.defocus_nm
        if step.settle_s > 0:
            self.instruments.wait_s(step.settle_s)

    def _acquire(
        self, shot: CameraShot | ScanShot
    ) -> tuple[dict[str, np.ndarray], dict[str, FrameRecord], tuple[float, float]]:
        if isinstance(shot, CameraShot):
            cam = self.instruments.camera
            if cam is None:
                raise DeviceError("no camera is configured")
            f = cam.acquire(shot.exposure_s, shot.binning, shot.region)
            return {"frames": f.image}, {"frames": f.record}, f.pixel_size_nm
        scan = self.instruments.scan
        if scan is None:
            raise DeviceError("no scan generator is configured")
        scan.configure(shot.settings)
        f = scan.acquire()
        return dict(f.images), dict(f.records), f.pixel_size_nm

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

    def _run_step(
        self, job: JobInfo, plan: BasePlan, step: FrameStep, path: Path, writer_box: list[Any]
    ) -> None:
        """One frame: optics → acquire → write → event (error policies wrap this)."""
        self._set_optics(step)
        lens = self.instruments.lens
        readback_nm = lens.get_defocus_nm() if lens is not None else None  # at exposure start
        images, records, pixel = self._acquire(step.shot)
        if not writer_box:
            first = next(iter(images.values()))
            writer_box.append(
                open_stack_writer(
                    path,
                    pixel_size_nm=pixel,
                    frame_shape=tuple(first.shape),
                    names=tuple(images),
                    metadata={"job_id": job.job_id, "plan": job.plan, "submitter": job.submitter},
                )
            )
        for name, image in images.items():
            record = self._complete_record(records[name], step.index, readback_nm)
            writer_box[0].append(np.asarray(image, dtype=np.float32), record, name=name)
            info = self.frames.put(image, record, pixel, job_id=job.job_id)
            self.publish(
                "frame",
                {
                    "job_id": job.job_id,
                    "frame_id": info.frame_id,
                    "index": step.index,
                    "total": plan.n_frames(),
                    "signal": name,
                    "record": info.record.model_dump(mode="json"),
                },
            )
        self.store.set_progress(job.job_id, step.index + 1)
        self.publish(
            "progress",
            {"job_id": job.job_id, "frames_done": step.index + 1, "frames_total": plan.n_frames()},
        )

    def _finish_acquisition(
        self, job: JobInfo, plan: BasePlan, path: Path, writer_box: list[Any]
    ) -> None:
        self._close_writers(writer_box)
        self._emit_job(self.store.set_state(job.job_id, "acquired"))
        if plan.processing:
            self.processing.submit(job, plan, path)
            return
        info = self.store.set_state(job.job_id, "done")
        log.info("job done", job=job.job_id, frames=info.frames_done)
        self._emit_job(info)
