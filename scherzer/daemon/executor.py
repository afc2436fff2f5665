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
``<data_dir>/jobs/<name>_<NNN>.h5`` with the folder ``<name>_<NNN>/`` beside, numbered, never
overwritten.

Interactive device calls (``lens_set``, ``camera_acquire`` …) are queued to this same thread with
:meth:`Executor.call_device`, so only one thread ever touches a driver. Nothing here blocks the
request loop: results come back through callbacks that post to the loop's mailbox.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from scherzer.config import ConfigError, Settings
from scherzer.daemon.jobs import JobStore
from scherzer.daemon.plans import (
    BasePlan,
    CameraShot,
    FocalSeries,
    FrameStep,
    RotatedScanSeries,
    ScanShot,
    approach_setpoints,
    parse_plan,
)
from scherzer.daemon.protocol import (
    ErrorBody,
    ErrorCode,
    FrameInfo,
    JobInfo,
    ProtocolError,
    record_model,
)
from scherzer.drivers.base import Camera, DeviceError, Lens, ScanGenerator, ScanSettings
from scherzer.emd import StackWriter, read_stacks
from scherzer.processing.registration import rotate_frame_back
from scherzer.stack import FrameRecord

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
Publish = Callable[[str, dict[str, Any]], None]


# --- instruments ------------------------------------------------------------------------------
@dataclass
class Instruments:
    """The devices the daemon drives (any may be missing).

    ``instrument``: what is known about the microscope (optics as an Optics dump, camera model,
    …), written to every job file's ``/microscope``; ``dose_rate_e_per_A2_s`` (camera) and
    ``probe_current_pA`` (scan) feed the dose estimates; ``mark_truth_origin`` (simulators)
    makes "now" the origin of the ground-truth shifts.
    """

    camera: Camera | None = None
    scan: ScanGenerator | None = None
    lens: Lens | None = None
    camera_shape: tuple[int, int] = (512, 512)
    wait_s: Callable[[float], None] = lambda s: None
    closers: tuple[Callable[[], None], ...] = ()
    instrument: dict[str, Any] = field(default_factory=dict)
    dose_rate_e_per_A2_s: float | None = None
    probe_current_pA: float | None = None
    mark_truth_origin: Callable[[], None] | None = None

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


def _inject_faults(microscope: Any, spec: str) -> None:
    """``"<kind>:<after_calls>[,<kind>:<after_calls>…]"`` (sim and pattern devices only)."""
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, after = item.partition(":")
        microscope.inject_fault(kind, int(after or 0))


def _virtual_microscope(dev: Any) -> Any:
    from scherzer.simulators.microscope import DriftModel, VirtualMicroscope

    drift = DriftModel(
        velocity_nm_per_s=tuple(dev.drift_nm_per_s),
        random_walk_nm_per_sqrt_s=dev.drift_random_walk_nm_per_sqrt_s,
        seed=dev.seed + 1,
    )
    return VirtualMicroscope(
        dev.specimen,
        camera_shape=tuple(dev.camera_shape),
        camera_pixel_nm=dev.camera_pixel_nm,
        seed=dev.seed,
        drift=drift,
        dose_rate_e_per_A2_s=dev.dose_rate_e_per_A2_s,
        probe_current_pA=dev.probe_current_pA,
        scan_jitter_px=dev.scan_jitter_px,
    )


def _sim_instrument(scope: Any, dev: Any) -> dict[str, Any]:
    from scherzer.simulators.detector import CameraModel

    camera = scope.camera if scope.camera is not None else CameraModel()
    return {
        "optics": scope.optics.with_(defocus_nm=0.0).model_dump(),
        "camera": camera.model_dump(),
        "convergence_mrad": float(scope.convergence_mrad),
        "probe_current_pA": float(scope.probe_current_pA),
        "simulated": True,
        "specimen": dev.specimen,
        "seed": dev.seed,
    }


class _SettleClock(threading.Thread):
    """While the simulated lens settles, simulated time follows real time × ``speedup`` (a real
    column keeps time while a serial client polls its lens); otherwise simulated time moves only
    with acquisitions, as everywhere in the simulator."""

    def __init__(self, scope: Any, speedup: float, tick_s: float = 0.002) -> None:
        super().__init__(name="scherzer-settle-clock", daemon=True)
        self._scope, self._speedup, self._tick_s = scope, speedup, tick_s
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self._tick_s):
            remaining = self._scope.lens.settle_remaining_s()
            if remaining > 0:
                self._scope.clock.advance(min(remaining, self._tick_s * self._speedup))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=1.0)


def _serve_simulated_lens(scope: Any, speedup: float, closers: list[Callable[[], None]]) -> str:
    """Serve the simulated microscope's own objective lens on a pseudo-terminal (the lens
    controller emulator) so the daemon drives it over a real serial link; returns the port."""
    from scherzer.simulators.lens_controller import LensControllerEmulator, LensModel

    if not isinstance(getattr(scope, "lens", None), LensModel):
        raise ConfigError("lens 'serial-sim' needs the simulated microscope (devices.kind 'sim')")
    emulator = LensControllerEmulator(scope.lens)
    emulator.start()
    clock = _SettleClock(scope, speedup)
    clock.start()
    closers.extend([emulator.stop, clock.stop])
    return emulator.port


def open_instruments(settings: Settings) -> Instruments:
    """Build the configured devices (simulated microscope; sim or serial lens)."""
    from scherzer.drivers import sim

    dev = settings.devices
    extra: dict[str, Any] = {}
    if dev.kind == "pattern":
        scope: Any = sim.PatternBench(tuple(dev.camera_shape), dev.camera_pixel_nm)
        devices: tuple[type, type, type] = (
            sim.PatternCamera,
            sim.PatternScanGenerator,
            sim.PatternLens,
        )
    else:
        scope = _virtual_microscope(dev)
        devices = (sim.SimCamera, sim.SimScanGenerator, sim.SimLens)
        extra = {
            "instrument": _sim_instrument(scope, dev),
            "dose_rate_e_per_A2_s": dev.dose_rate_e_per_A2_s,
            "probe_current_pA": dev.probe_current_pA,
            "mark_truth_origin": scope.reset_truth,
        }
    if dev.fault:
        _inject_faults(scope, dev.fault)
    camera_cls, scan_cls, lens_cls = devices
    lens: Lens
    closers: list[Callable[[], None]] = []
    if dev.lens in ("serial", "serial-sim"):
        from scherzer.drivers.serial_lens import SerialLens

        port = dev.serial_port
        if dev.lens == "serial-sim":
            port = _serve_simulated_lens(scope, dev.speedup, closers)
        serial = SerialLens(
            port,
            baudrate=dev.serial_baudrate,
            timeout_s=dev.serial_timeout_s,
            retries=dev.serial_retries,
        )
        closers.insert(0, serial.close)
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
        **extra,
    )


# --- geometry ---------------------------------------------------------------------------------
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


# --- files ------------------------------------------------------------------------------------
def open_stack_writer(path: Path, **kwargs: Any) -> StackWriter:
    """The job-file writer: EMD 1.0, flushed per frame, readable after a crash."""
    return StackWriter(path, **kwargs)


def count_frames_on_disk(path: str | Path | None) -> int:
    """Complete frames in a job file (largest signal); 0 if it is missing or unreadable."""
    if not path or not Path(path).exists():
        return 0
    from scherzer.emd import describe

    try:
        groups = describe(path)["data"].values()  # reads records only, not the frames
        return max((g.get("frames_complete", 0) for g in groups if g["kind"] == "stack"), default=0)
    except Exception:
        log.warning("cannot count frames", path=str(path))
        return 0


def _slug(text: str, fallback: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:48] or fallback


def output_path(data_dir: Path, job: JobInfo) -> Path:
    """``<data_dir>/jobs/<name>_<NNN>.h5`` with the first number whose file and folder are both
    unused; the folder (:func:`job_folder`) is created here, which reserves the number."""
    directory = data_dir / "jobs"
    directory.mkdir(parents=True, exist_ok=True)
    slug = _slug(job.name or job.kind, job.kind)
    for number in range(1, 1_000_000):
        stem = f"{slug}_{number:03d}"
        path = directory / f"{stem}.h5"
        if path.exists():
            continue
        try:
            (directory / stem).mkdir()
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"no free file number for {slug} in {directory}")


def job_folder(path: str | Path) -> Path:
    """The folder beside a job file that holds its plots (``<name>_<NNN>/``)."""
    p = Path(path)
    return p.with_suffix("")


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
def processing_steps(plan: BasePlan) -> list[str | dict[str, Any]]:
    """The plan's pipeline steps with plan-level choices filled in (focal reference image)."""
    steps: list[str | dict[str, Any]] = []
    for step in plan.processing:
        spec = {"step": step} if isinstance(step, str) else dict(step)
        if (
            isinstance(plan, FocalSeries)
            and spec["step"] == "focal_register"
            and plan.reference_index is not None
        ):
            spec.setdefault("reference", plan.reference_index)
        steps.append(spec if len(spec) > 1 else spec["step"])
    return steps


def run_processing(plan: BasePlan, path: str | Path) -> dict[str, Any]:
    """Run the plan's steps on the job file's stacks; results into the file, plots into the
    job's folder. Returns the pipeline's JSON summary."""
    from scherzer.emd import store_pipeline_result
    from scherzer.processing.pipeline import run_pipeline

    stacks = read_stacks(path)
    ordered = {s: stacks[s] for s in plan.signals() if s in stacks}
    if not ordered:
        raise ValueError(f"{path} holds none of the plan's signals {list(plan.signals())}")
    folder = job_folder(path)
    folder.mkdir(parents=True, exist_ok=True)
    result = run_pipeline(ordered, processing_steps(plan), plot_dir=folder)
    store_pipeline_result(path, result)
    return result.summary()


class ProcessingWorker:
    """Runs a job's processing steps in its own thread, then marks the job done or failed."""

    def __init__(
        self, store: JobStore, publish: Publish, runner: Callable | None = run_processing
    ) -> None:
        self._store = store
        self._publish = publish
        self._runner = runner
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="processing")

    def submit(self, job: JobInfo, plan: BasePlan, path: Path, note: ErrorBody | None) -> None:
        self._pool.submit(self._run, job, plan, path, note)

    def _run(self, job: JobInfo, plan: BasePlan, path: Path, note: ErrorBody | None) -> None:
        jlog = log.bind(job=job.job_id, client=job.submitter)
        info = self._store.set_state(job.job_id, "processing")
        self._publish("job", {"job": info.model_dump(mode="json")})
        try:
            if self._runner is None:
                raise RuntimeError(f"no processing runner for steps {plan.processing}")
            self._runner(plan, path)
            info = self._store.set_state(job.job_id, "done", error=note)
            jlog.info("processing done", steps=[str(s) for s in plan.processing])
        except Exception as exc:
            jlog.exception("processing failed")
            err = ErrorBody(
                code=ErrorCode.PROCESSING_FAILED,
                message=f"processing failed ({type(exc).__name__}): {exc}; the frames are on disk",
                details={"steps": [str(s) for s in plan.processing]},
            )
            info = self._store.set_state(job.job_id, "failed", error=err)
        self._publish("job", {"job": info.model_dump(mode="json")})

    def shutdown(self) -> None:
        """Finish the running step list; jobs still waiting stay ``acquired`` (→ interrupted)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


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
        self.store.set_flag("queue_paused", False)
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
        if job is not None and not _too_early(job):
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
        run: _JobRun | None = None
        saved: _Saved | None = None
        outcome: tuple[str, ErrorBody | None]
        try:
            plan = parse_plan(job.plan)
            run = _JobRun(job, plan, path)
            saved = self._snapshot(plan)
            if self.instruments.mark_truth_origin is not None:
                self.instruments.mark_truth_origin()
            for step in plan.steps():
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
            self.current_job = None
            self.job_paused = False
        self._conclude(job, run, outcome, path, jlog)

    def _conclude(
        self,
        job: JobInfo,
        run: _JobRun | None,
        outcome: tuple[str, ErrorBody | None],
        path: Path,
        jlog: Any,
    ) -> None:
        state, err = outcome
        self.store.set_progress(job.job_id, count_frames_on_disk(path))
        if state != "acquired":
            self._emit_job(self.store.set_state(job.job_id, state, error=err))
            return
        assert run is not None
        note = run.skipped_note()
        self._emit_job(self.store.set_state(job.job_id, "acquired", error=note))
        if run.plan.processing and run.written:
            self.processing.submit(job, run.plan, path, note)
            return
        info = self.store.set_state(job.job_id, "done", error=note)
        jlog.info("job done", frames=info.frames_done, skipped=run.skipped)
        self._emit_job(info)

    def _error_body(self, exc: Exception, jlog: Any) -> ErrorBody:
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

    # --- optics: set with approach, snapshot, restore --------------------------------------
    def _lens(self) -> Lens:
        lens = self.instruments.lens
        if lens is None:
            raise DeviceError("this plan sets defocus but no lens is configured")
        return lens

    def _set_defocus(self, target_nm: float, plan: BasePlan) -> None:
        """Go to ``target_nm`` from the plan's approach side, waiting to settle after each set."""
        lens = self._lens()
        direction, overshoot = plan.approach_rule()
        for value in approach_setpoints(target_nm, self._last_defocus_nm, direction, overshoot):
            lens.set_defocus_nm(value)
            self._last_defocus_nm = None  # unknown until the set has settled
            lens.wait_settled(self.settings.devices.settle_timeout_s)
            self._last_defocus_nm = value

    def _snapshot(self, plan: BasePlan) -> _Saved:
        """What the plan will change, as it is now (read before the first frame)."""
        saved = _Saved()
        if not plan.restore_optics:
            return saved
        if any(s.defocus_nm is not None for s in plan.steps()):
            saved.defocus_nm = self._lens().get_defocus_nm()
        if plan.scan_sets() and self.instruments.scan is not None:
            current = getattr(self.instruments.scan, "settings", None)
            saved.scan_settings = current if isinstance(current, ScanSettings) else None
        return saved

    def _restore_optics(self, run: _JobRun | None, saved: _Saved | None, jlog: Any) -> None:
        """Put back what the plan changed; never raises (a failure is logged as an error)."""
        if run is None or saved is None:
            return
        if saved.defocus_nm is not None and self._nominal_defocus_nm is not None:
            try:
                self._set_defocus(saved.defocus_nm, run.plan)
                jlog.info("focus restored", defocus_nm=saved.defocus_nm)
            except Exception as exc:
                jlog.error("could not restore the focus", defocus_nm=saved.defocus_nm,
                           error=str(exc))  # fmt: skip
        if saved.scan_settings is not None and self.instruments.scan is not None:
            try:
                self.instruments.scan.configure(saved.scan_settings)
            except Exception as exc:
                jlog.error("could not restore the scan settings", error=str(exc))

    # --- frames ----------------------------------------------------------------------------
    def _set_optics(self, step: FrameStep, plan: BasePlan) -> None:
        if step.defocus_nm is not None:
            self._nominal_defocus_nm = step.defocus_nm
            self._set_defocus(step.defocus_nm, plan)
        if step.settle_s > 0:
            self.instruments.wait_s(step.settle_s)

    def _acquire(self, shot: CameraShot | ScanShot) -> _Acquired:
        if isinstance(shot, CameraShot):
            cam = self.instruments.camera
            if cam is None:
                raise DeviceError("no camera is configured")
            f = cam.acquire(shot.exposure_s, shot.binning, shot.region)
            return _Acquired({"frames": f.image}, {"frames": f.record}, f.pixel_size_nm, f.truth)
        scan = self.instruments.scan
        if scan is None:
            raise DeviceError("no scan generator is configured")
        scan.configure(shot.settings)
        f = scan.acquire()
        return _Acquired(dict(f.images), dict(f.records), f.pixel_size_nm, f.truth)

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

    def _run_step_with_policy(self, run: _JobRun, step: FrameStep, jlog: Any) -> None:
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

    def _publish_progress(self, run: _JobRun) -> None:
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

    def _run_step(self, run: _JobRun, step: FrameStep) -> None:
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
        writer = run.writer or self._open_writer(run, images, got.pixel_size_nm)
        for name, image in images.items():
            record = self._complete_record(got.records[name], step.index, readback_nm)
            writer.append(image, record, name=name)
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

    def _open_writer(
        self, run: _JobRun, images: dict[str, np.ndarray], pixel: tuple[float, float]
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

    def _close_file(self, run: _JobRun, jlog: Any) -> None:
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


def _too_early(job: JobInfo) -> bool:
    """The job's plan asks not to start before a time that has not come yet."""
    not_before = job.plan.get("not_before_s")
    return not_before is not None and time.time() < float(not_before)


@dataclass
class _Acquired:
    images: dict[str, np.ndarray]
    records: dict[str, FrameRecord]
    pixel_size_nm: tuple[float, float]
    truth: dict[str, Any]


@dataclass
class _Saved:
    """Instrument state before a plan (None = not changed by the plan)."""

    defocus_nm: float | None = None
    scan_settings: ScanSettings | None = None


@dataclass
class _JobRun:
    """A running job: its plan, file, frames written, skipped frames and collected truth."""

    job: JobInfo
    plan: BasePlan
    path: Path
    writer: StackWriter | None = None
    written: int = 0
    skipped: list[int] = field(default_factory=list)
    skip_reasons: list[str] = field(default_factory=list)
    truth: list[dict[str, Any]] = field(default_factory=list)

    def add_truth(self, truth: dict[str, Any]) -> None:
        self.truth.append(truth or {})

    def truth_arrays(self) -> dict[str, Any]:
        """Per-frame truth of the written frames (only when every frame has it): true defocus
        (nm) and content shifts (px, in the stored orientation, ARCHITECTURE convention)."""
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
        return out

    def skipped_note(self) -> ErrorBody | None:
        if not self.skipped:
            return None
        return ErrorBody(
            code=ErrorCode.DEVICE_ERROR,
            message=f"frames {self.skipped} skipped after device errors ({self.skip_reasons[-1]})",
            details={"skipped": list(self.skipped)},
        )
