"""The asynchronous link between ophyd-async devices and one Scherzer daemon.

ophyd-async devices run in the RunEngine's asyncio loop; :class:`~scherzer.clients.client.Client`
is synchronous and not thread-safe. :class:`DaemonLink` owns one client and one event
subscription and runs every call on ONE worker thread (so the ZeroMQ sockets never change
thread and the loop never blocks). :meth:`DaemonLink.run_job` submits a plan to the daemon's
queue and follows it through the daemon's own ``job``/``frame``/``progress`` events until it is
final: frames are written to the job file and recorded by the daemon exactly as for any other
job; the link only learns where they are (:class:`FrameRef`: job file, stack, row, record).

Units are the protocol's: nm, s, µs, degrees, e/Å².
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from scherzer.clients.client import Client, DaemonError, EventStream
from scherzer.daemon import protocol as P

__all__ = ["DaemonLink", "FrameRef", "JobFailed", "JobOutcome"]

T = TypeVar("T")

#: Seconds between job_get polls when no event arrives (a lost event cannot hang a wait;
#: shorter polls cost one loopback round trip each).
POLL_S = 0.5


class JobFailed(DaemonError):
    """A job ended ``failed``, ``cancelled`` or ``interrupted``; ``job`` is its final info."""

    def __init__(self, job: P.JobInfo) -> None:
        err = job.error
        code = err.code if err is not None else job.state
        why = err.message if err is not None else "no reason given"
        super().__init__(code, f"job {job.job_id} ({job.kind}) ended {job.state}: {why}")
        self.job = job


@dataclass(frozen=True)
class FrameRef:
    """Where one acquired frame lives: row ``row`` of stack ``signal`` in the job file ``path``
    (HDF5 dataset ``/data/<signal>/data``, shape (frames, y, x), float32), with the daemon's
    per-frame record. ``frame_id`` is the daemon's frame-cache id (``frame_get``) when known."""

    job_id: int
    path: str
    signal: str
    row: int
    record: P.FrameRecordModel
    frame_id: int | None = None

    @property
    def dataset(self) -> str:
        """The HDF5 dataset that holds this frame's stack inside the job file."""
        return f"/data/{self.signal}/data"


@dataclass(frozen=True)
class JobOutcome:
    """A finished (``done``) job and its frames in the order they were written."""

    job: P.JobInfo
    frames: tuple[FrameRef, ...]

    def of_signal(self, signal: str) -> list[FrameRef]:
        return [f for f in self.frames if f.signal == signal]


ProgressCallback = Callable[[int, int], None]


class DaemonLink:
    """One daemon connection shared by a set of devices (see module docstring).

    ``client``: an open :class:`Client` (it is used from the link's worker thread only from now
    on). ``job_timeout_s``: a job that is not final after this long fails the wait (None =
    wait as long as it takes).
    """

    def __init__(self, client: Client, *, job_timeout_s: float | None = None) -> None:
        self.client = client
        self.job_timeout_s = job_timeout_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scherzer-bluesky")
        self._events: EventStream | None = None

    @classmethod
    def connect_to(cls, endpoint: str, **client_kw: Any) -> DaemonLink:
        """A link over a new client (``client_kw``: keyword arguments of :class:`Client`)."""
        return cls(Client(endpoint, **client_kw))

    # --- running calls on the worker thread ------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """``fn(*args, **kw)`` on the link's worker thread, awaited from the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, partial(fn, *args, **kw))

    async def open(self) -> P.StatusResult:
        """Subscribe to events and check the daemon answers; its status."""
        return await self.run(self._open)

    def _open(self) -> P.StatusResult:
        if self._events is None:
            self._events = self.client.events(("job", "frame", "progress"))
        return self.client.status()  # the round trip also lets the subscription settle

    def close(self) -> None:
        """Close the event subscription and the client; the worker thread ends."""

        def shut() -> None:
            if self._events is not None:
                self._events.close()
                self._events = None
            self.client.close()

        self._pool.submit(shut).result()
        self._pool.shutdown(wait=True)

    # --- devices -----------------------------------------------------------------------------
    async def lens_get(self) -> P.LensState:
        return await self.run(self.client.lens_get)

    async def lens_set(self, **values: Any) -> P.LensState:
        """Set lens values (``LensSetParams``); replies with the read-back once settled."""
        return await self.run(self.client.lens_set, **values)

    async def frame_shape(self, ref: FrameRef) -> tuple[int, int]:
        """(y, x) of a frame: from the daemon's frame cache (``frame_get``), or, when the frame
        has left the cache (or its event was lost), from the job file if this host sees it."""
        if ref.frame_id is not None:
            try:
                image, _info = await self.run(self.client.frame_get, ref.frame_id)
                return (int(image.shape[0]), int(image.shape[1]))
            except DaemonError as exc:
                if exc.code != "not_found":
                    raise
        return await self.run(_shape_in_file, ref)

    # --- jobs --------------------------------------------------------------------------------
    async def run_job(
        self,
        plan: dict[str, Any],
        on_progress: ProgressCallback | None = None,
        abort: threading.Event | None = None,
    ) -> JobOutcome:
        """Submit ``plan`` and wait until the job is final; its outcome when ``done``.

        ``on_progress(frames_done, frames_total)`` is called (on the worker thread) at submit
        and at every ``progress`` event. Raises :class:`JobFailed` unless the job ends
        ``done``. Setting ``abort`` cancels the job on the daemon (at the next poll, within
        :data:`POLL_S`) and the wait ends with :class:`JobFailed` once the daemon reports it
        ``cancelled``; cancelling the awaiting task cancels the job too.
        """
        abort = abort or threading.Event()
        try:
            return await self.run(self._run_job, plan, on_progress, abort)
        except asyncio.CancelledError:
            abort.set()  # the worker cancels the job at its next poll
            raise

    def _run_job(
        self, plan: dict[str, Any], on_progress: ProgressCallback | None, abort: threading.Event
    ) -> JobOutcome:
        self._open()
        self._drain(None, [], None)  # events of earlier jobs
        job = self.client.submit(plan)
        if on_progress is not None:
            on_progress(0, job.frames_total)
        frames: list[FrameRef] = []
        job = self._follow(job, frames, on_progress, abort)
        self._drain(job, frames, on_progress)  # frame events that came with the final state
        if job.state != "done":
            raise JobFailed(job)
        path = job.output_file or ""
        if len({f.record.index for f in frames}) < job.frames_done:
            return JobOutcome(job, _frames_in_file(job))  # a frame event was lost
        return JobOutcome(job, tuple(dataclasses.replace(f, path=path) for f in frames))

    def _follow(
        self,
        job: P.JobInfo,
        frames: list[FrameRef],
        on_progress: ProgressCallback | None,
        abort: threading.Event,
    ) -> P.JobInfo:
        """Events (and ``job_get`` polls between them) until the job is final."""
        assert self._events is not None
        deadline = None if self.job_timeout_s is None else time.monotonic() + self.job_timeout_s
        while job.state not in P.FINAL_STATES:
            if abort.is_set():
                abort.clear()
                self._cancel(job.job_id)
            if deadline is not None and time.monotonic() > deadline:
                self._cancel(job.job_id)
                raise DaemonError("timeout", f"job {job.job_id} not final after "
                                  f"{self.job_timeout_s:g} s; cancelled")  # fmt: skip
            event = self._events.next(POLL_S)
            if event is None:
                job = self.client.job(job.job_id)
            else:
                job = self._apply(event, job, frames, on_progress)
        return job

    def _cancel(self, job_id: int) -> None:
        """Cancel a job; one that ended meanwhile (``conflict``) is left as it ended."""
        try:
            self.client.cancel(job_id)
        except DaemonError as exc:
            if exc.code != "conflict":
                raise

    def _drain(
        self, job: P.JobInfo | None, frames: list[FrameRef], on_progress: ProgressCallback | None
    ) -> None:
        """Apply (or, with ``job`` None, drop) the events already waiting."""
        assert self._events is not None
        while (event := self._events.next(0)) is not None:
            if job is not None:
                self._apply(event, job, frames, on_progress)

    @staticmethod
    def _apply(
        event: P.Event,
        job: P.JobInfo,
        frames: list[FrameRef],
        on_progress: ProgressCallback | None,
    ) -> P.JobInfo:
        """One event about ``job``: a new state, a frame on disk or progress."""
        data = event.data
        if event.topic == "job":
            info = P.JobInfo.model_validate(data["job"])
            return info if info.job_id == job.job_id else job
        if data.get("job_id") != job.job_id:
            return job
        if event.topic == "frame":
            signal = str(data["signal"])
            row = sum(1 for f in frames if f.signal == signal)
            record = P.FrameRecordModel.model_validate(data["record"])
            frames.append(FrameRef(job.job_id, "", signal, row, record, data.get("frame_id")))
        elif event.topic == "progress" and on_progress is not None:
            on_progress(int(data["frames_done"]), int(data["frames_total"]))
        return job


# --- the job file, when frame events were lost ---------------------------------------------------
def _frames_in_file(job: P.JobInfo) -> tuple[FrameRef, ...]:
    """Every frame of a finished job from its file's records (needs the file on this host)."""
    from scherzer.io import read_stacks

    path = job.output_file or ""
    if not path or not Path(path).is_file():
        raise DaemonError(
            "events_lost",
            f"job {job.job_id}: frame events were lost and its file {path!r} is not on this "
            "host; the frames are in the daemon's job file",
        )
    refs = []
    for signal, stack in read_stacks(path).items():
        for row, rec in enumerate(stack.records):
            refs.append(FrameRef(job.job_id, path, signal, row, P.record_model(rec)))
    return tuple(refs)


def _shape_in_file(ref: FrameRef) -> tuple[int, int]:
    """(y, x) of the frames of ``ref``'s stack, from the job file (on this host)."""
    import h5py

    with h5py.File(ref.path, "r") as f:
        shape = f[ref.dataset].shape
    return (int(shape[-2]), int(shape[-1]))
