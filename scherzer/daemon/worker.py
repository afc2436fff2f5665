"""Processing after acquisition: a job's pipeline steps in their own thread.

:class:`ProcessingWorker` runs :func:`run_processing` on a job that is ``acquired`` (so the next
job's acquisition can start): ``processing`` → ``done``, or ``failed`` with the reason (the frames
stay). Results go into the job's file, plots into its folder
(:func:`~scherzer.daemon.files.job_folder`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from scherzer.daemon.diskspace import is_disk_full
from scherzer.daemon.files import job_folder
from scherzer.daemon.jobs import JobStore
from scherzer.daemon.plans import BasePlan, FocalSeries
from scherzer.daemon.protocol import ErrorBody, ErrorCode, JobInfo
from scherzer.io import read_stacks

__all__ = ["ProcessingWorker", "Publish", "processing_steps", "run_processing"]

log = structlog.get_logger("scherzer.executor")
Publish = Callable[[str, dict[str, Any]], None]


def processing_steps(plan: BasePlan, load_curve: Callable[[str], Any] | None = None) -> list[Any]:
    """The plan's pipeline steps as typed settings (:mod:`scherzer.processing.steps`), with
    plan-level choices filled in (focal reference image) and camera-curve names resolved by
    ``load_curve`` (inside the configured calibrations directory only)."""
    from scherzer.processing.steps import parse_step

    steps = []
    for step in plan.processing:
        spec = {"step": step} if isinstance(step, str) else dict(step)
        if (
            isinstance(plan, FocalSeries)
            and spec["step"] == "focal_register"
            and plan.reference_index is not None
        ):
            spec.setdefault("reference", plan.reference_index)
        steps.append(parse_step(spec, load_curve))
    return steps


def run_processing(
    plan: BasePlan, path: str | Path, load_curve: Callable[[str], Any] | None = None
) -> dict[str, Any]:
    """Run the plan's steps on the job file's stacks; results into the file, plots into the
    job's folder. ``load_curve`` resolves camera-curve names
    (:func:`~scherzer.daemon.calibrations.calibration_loader`). Returns the JSON summary."""
    from scherzer.io import store_pipeline_result
    from scherzer.processing.pipeline import run_pipeline

    steps = processing_steps(plan, load_curve)
    stacks = read_stacks(path)
    ordered = {s: stacks[s] for s in plan.signals() if s in stacks}
    if not ordered:
        raise ValueError(f"{path} holds none of the plan's signals {list(plan.signals())}")
    folder = job_folder(path)
    folder.mkdir(parents=True, exist_ok=True)
    result = run_pipeline(ordered, steps, plot_dir=folder)
    store_pipeline_result(path, result)
    return result.summary()


class ProcessingWorker:
    """Runs a job's processing steps in its own thread, then marks the job done or failed.

    A full disk ends the job ``failed`` with ``disk_full`` and calls ``on_disk_full(reason)``
    (the executor holds the queue). If even the bookkeeping fails (the job database cannot be
    written), the worker survives: ``problem`` says what happened and the job stays
    ``processing``, which the next start turns back into ``acquired`` and processes again.
    """

    def __init__(
        self,
        store: JobStore,
        publish: Publish,
        runner: Callable | None = run_processing,
        on_disk_full: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._store = store
        self._publish = publish
        self._runner = runner
        self._on_disk_full = on_disk_full
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="processing")
        self.current_job: int | None = None
        self.problem: str | None = None

    def submit(self, job: JobInfo, plan: BasePlan, path: Path, note: ErrorBody | None) -> None:
        self._pool.submit(self._run, job, plan, path, note)

    def _run(self, job: JobInfo, plan: BasePlan, path: Path, note: ErrorBody | None) -> None:
        self.current_job = job.job_id
        try:
            self._process(job, plan, path, note)
        except BaseException as exc:  # the bookkeeping itself failed: keep the thread
            self.problem = f"job {job.job_id}: {type(exc).__name__}: {exc}"
            log.error("processing bookkeeping failed", job=job.job_id, error=str(exc))
        finally:
            self.current_job = None

    def _process(self, job: JobInfo, plan: BasePlan, path: Path, note: ErrorBody | None) -> None:
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
            info = self._store.set_state(job.job_id, "failed", error=self._failure(exc, plan, jlog))
        self._publish("job", {"job": info.model_dump(mode="json")})

    def _failure(self, exc: Exception, plan: BasePlan, jlog: Any) -> ErrorBody:
        steps = [str(s) for s in plan.processing]
        if is_disk_full(exc):
            jlog.error("processing failed: disk full", error=str(exc))
            self._on_disk_full(str(exc))
            return ErrorBody(
                code=ErrorCode.DISK_FULL,
                message=f"processing could not write its results: {exc}; the frames are on disk",
                details={"steps": steps},
            )
        jlog.exception("processing failed")
        return ErrorBody(
            code=ErrorCode.PROCESSING_FAILED,
            message=f"processing failed ({type(exc).__name__}): {exc}; the frames are on disk",
            details={"steps": steps},
        )

    def shutdown(self) -> None:
        """Finish the running step list; jobs still waiting stay ``acquired`` (→ interrupted)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
