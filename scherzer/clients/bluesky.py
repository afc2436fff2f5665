"""bluesky / ophyd-async devices over the Scherzer daemon (optional extra ``scherzer[bluesky]``).

>>> from bluesky import RunEngine                                         # doctest: +SKIP
>>> from bluesky.plans import scan
>>> from scherzer.clients.bluesky import scherzer_devices, job_plan
>>> RE = RunEngine()
>>> dev = scherzer_devices("tcp://127.0.0.1:5577")   # lens, camera, scan, jobs (connected)
>>> RE(scan([dev.camera], dev.lens.defocus_nm, -80, -20, 7))
>>> RE(job_plan(dev.jobs, {"kind": "focal_series", "n_images": 11, "start_nm": -100}))

Everything goes through the daemon (:mod:`scherzer.clients.bluesky_link`), and so through its
queue, job files, per-frame records and events:

* :class:`~scherzer.clients.bluesky_lens.Lens` — defocus (nm, negative = underfocus),
  stigmator (nm, degrees) and beam tilt (mrad) as positioners; a set completes when the daemon
  has replied with the settled read-back.
* :class:`~scherzer.clients.bluesky_detectors.Camera`,
  :class:`~scherzer.clients.bluesky_detectors.ScanGenerator` — detectors whose every trigger is
  a one-frame job; readings refer to the frame in its job file (StreamResource/StreamDatum).
* :class:`JobRunner` and the plan stub :func:`job_plan` — a whole plan (``focal_series``,
  ``rotated_scan``, ``time_series``, …) as one job, with progress from the daemon's events;
  the run's documents name the job and its file, one event per frame with its record.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import Msg
from ophyd_async.core import (
    StandardReadable,
    StandardReadableFormat,
    WatchableAsyncStatus,
    WatcherUpdate,
    soft_signal_r_and_setter,
    soft_signal_rw,
)

from scherzer.clients.bluesky_detectors import (
    AcquiringDetector,
    Camera,
    JobDetector,
    ScanGenerator,
    frame_uri,
)
from scherzer.clients.bluesky_lens import Lens, LensAxis
from scherzer.clients.bluesky_link import DaemonLink, FrameRef, JobFailed, JobOutcome
from scherzer.clients.client import Client

__all__ = [
    "AcquiringDetector",
    "Camera",
    "DaemonLink",
    "FrameRef",
    "JobDetector",
    "JobFailed",
    "JobFrames",
    "JobOutcome",
    "JobRunner",
    "Lens",
    "LensAxis",
    "ScanGenerator",
    "ScherzerDevices",
    "frame_uri",
    "job_plan",
    "scherzer_devices",
]


class JobFrames(JobDetector):
    """The frames of the :class:`JobRunner`'s last job, one reading per frame.

    ``row`` (a soft signal) selects the frame; a reading holds that frame's record and its
    job-file reference (one external image key per stack: ``<name>-<stack>``). Used by
    :func:`job_plan` to emit one event per frame; it never acquires.
    """

    def __init__(self, link: DaemonLink, name: str = "") -> None:
        self.row = soft_signal_rw(int, 0)
        super().__init__(link, {}, name=name)

    def use(self, outcome: JobOutcome, shapes: dict[str, tuple[int, int]]) -> None:
        """Read from this job's frames from now on (its stacks and their (y, x) shapes)."""
        self.last = outcome
        stacks = list(dict.fromkeys(f.signal for f in outcome.frames))
        self._stacks = {s: s for s in stacks}
        self._shapes = {s: shapes[s] for s in stacks}
        self._resources = {}
        self._index = 0

    @property
    def n_rows(self) -> int:
        """Frames (rows) per stack in the last job."""
        if self.last is None or not self._stacks:
            return 0
        return len(self.last.of_signal(next(iter(self._stacks))))

    async def read(self) -> dict[str, Any]:
        """The selected row's record and, for the next save, its asset documents."""
        if self.last is None:
            raise RuntimeError(f"{self.name}: no job has run yet")
        row = await self.row.get_value()
        refs = {s: self.last.of_signal(s)[row] for s in self._stacks}
        self._show(next(iter(refs.values())))
        self._assets = [doc for key, ref in refs.items() for doc in self._docs(key, ref)]
        self._index = row + 1
        return await super().read()


class JobRunner(StandardReadable):
    """Runs whole acquisition plans as daemon jobs: ``set(plan)`` submits the plan (a dict as
    in ``docs/protocol.md``) and completes when the job is ``done`` (raises
    :class:`~scherzer.clients.bluesky_link.JobFailed` if it fails or is cancelled), reporting
    progress (frames done of total) to watchers from the daemon's ``progress`` events.

    A reading: ``job_id`` (hinted), ``job_file``, ``kind``, ``state``, ``frames_done``.
    ``frames`` (:class:`JobFrames`) reads the job's frames one by one.
    """

    def __init__(self, link: DaemonLink, name: str = "") -> None:
        self._link = link
        self.last: JobOutcome | None = None
        self._abort = threading.Event()  # set by stop(): cancel the running job
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.job_id, self._set_job_id = soft_signal_r_and_setter(int, 0)
        with self.add_children_as_readables():
            self.job_file, self._set_file = soft_signal_r_and_setter(str, "")
            self.kind, self._set_kind = soft_signal_r_and_setter(str, "")
            self.state, self._set_state = soft_signal_r_and_setter(str, "")
            self.frames_done, self._set_done = soft_signal_r_and_setter(int, 0)
        self.frames = JobFrames(link)
        super().__init__(name=name)

    @WatchableAsyncStatus.wrap
    async def set(self, plan: dict[str, Any]) -> AsyncIterator[WatcherUpdate[int]]:
        """Submit ``plan`` and wait for the job; yields progress in frames."""
        await self._link.open()
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

        def progress(done: int, total: int) -> None:  # on the link's worker thread
            loop.call_soon_threadsafe(updates.put_nowait, (done, total))

        self._abort = abort = threading.Event()
        task = asyncio.ensure_future(self._link.run_job(dict(plan), progress, abort))
        try:
            while not task.done() or not updates.empty():
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                done, total = getter.result()
                yield WatcherUpdate(current=done, initial=0, target=total, name=self.name,
                                    unit="frames")  # fmt: skip
            outcome = task.result()
        finally:
            task.cancel()  # no-op once done; cancels the daemon job if we are interrupted
        await self._use(outcome)

    async def stop(self, success: bool = True) -> None:
        """Cancel the running job on the daemon (bluesky calls this when a plan is paused,
        aborted or stopped): the ``set`` status then fails with
        :class:`~scherzer.clients.bluesky_link.JobFailed` once the daemon reports the job
        ``cancelled``, as a stopped motor's move fails. Frames written stay in the job file."""
        self._abort.set()

    async def _use(self, outcome: JobOutcome) -> None:
        job = outcome.job
        shapes: dict[str, tuple[int, int]] = {}
        for signal in dict.fromkeys(f.signal for f in outcome.frames):
            newest = outcome.of_signal(signal)[-1]  # the likeliest still in the frame cache
            shapes[signal] = await self._link.frame_shape(newest)
        self.frames.use(outcome, shapes)
        self._set_job_id(job.job_id)
        self._set_file(job.output_file or "")
        self._set_kind(job.kind)
        self._set_state(job.state)
        self._set_done(job.frames_done)
        self.last = outcome


def job_plan(
    runner: JobRunner, plan: dict[str, Any], *, md: dict[str, Any] | None = None
) -> Generator[Msg, Any, str]:
    """A bluesky plan: one run in which ``plan`` runs as one daemon job.

    Documents: the start document holds ``scherzer_plan`` (the plan) and ``plan_name``
    "scherzer_job"; the ``primary`` stream has one event per frame written (the frame's record,
    job id, job file, row, and the image as a StreamResource/StreamDatum into the job file); the
    ``job`` stream has one event with the job's id, file, kind, final state and frame count.
    Progress (frames done of total) is reported while the job runs (``bps.mv`` on a watchable
    status, so bluesky's progress bar shows it). Returns the run's uid.
    """
    _md = {
        "plan_name": "scherzer_job",
        "scherzer_plan": dict(plan),
        "detectors": [runner.frames.name],
        **(md or {}),
    }

    @bpp.stage_decorator([runner, runner.frames])
    @bpp.run_decorator(md=_md)
    def inner() -> Generator[Msg, Any, None]:
        yield from bps.mv(runner, dict(plan))
        for row in range(runner.frames.n_rows):
            yield from bps.mv(runner.frames.row, row)
            yield from bps.create("primary")
            yield from bps.read(runner.frames)
            yield from bps.save()
        yield from bps.create("job")
        yield from bps.read(runner)
        yield from bps.save()

    return (yield from inner())


@dataclass
class ScherzerDevices:
    """The device set over one daemon link (see :func:`scherzer_devices`)."""

    link: DaemonLink
    lens: Lens
    camera: Camera
    scan: ScanGenerator
    jobs: JobRunner

    def close(self) -> None:
        self.link.close()


def scherzer_devices(
    endpoint: str | Client,
    *,
    scan_signals: tuple[str, ...] = ("HAADF",),
    connect: bool = True,
    **client_kw: Any,
) -> ScherzerDevices:
    """Lens, camera, scan generator and job runner over one new link to ``endpoint`` (or an
    open :class:`Client`), named ``lens``, ``camera``, ``scan``, ``jobs``.

    ``connect``: connect the devices in bluesky's event loop (a RunEngine must exist, as
    ophyd-async's ``init_devices`` requires) and check the daemon answers.
    """
    client = endpoint if isinstance(endpoint, Client) else Client(endpoint, **client_kw)
    link = DaemonLink(client)
    devices = ScherzerDevices(
        link,
        Lens(link, name="lens"),
        Camera(link, name="camera"),
        ScanGenerator(link, name="scan", signals=scan_signals),
        JobRunner(link, name="jobs"),
    )
    if connect:
        from bluesky.run_engine import call_in_bluesky_event_loop

        async def connect_all() -> None:
            await link.open()
            for dev in (devices.lens, devices.camera, devices.scan, devices.jobs):
                await dev.connect()

        call_in_bluesky_event_loop(connect_all())
    return devices
