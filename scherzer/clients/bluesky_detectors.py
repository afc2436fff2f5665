"""The camera and the STEM scan generator as bluesky detectors whose frames go through the daemon.

Every ``trigger()`` submits a one-frame ``camera_image`` / ``scan_image`` job to the daemon's
queue and waits for it (its ``job``/``frame``/``progress`` events): the daemon sets nothing the
plan does not ask for (the lens stays where the lens positioners put it), acquires, appends the
frame and its record to a new job file (flushed), publishes the events and restores the scan
settings it changed. Nothing is acquired outside the job machinery.

What a reading holds, and why. The image is NOT copied into the event: like ophyd-async's own
area detectors, each detector describes its image key as external (``external="STREAM:"``,
shape ``[1, y, x]``, ``<f4``) and emits a ``StreamResource`` naming the job file
(``uri = file://localhost/<path>``, ``mimetype = application/x-hdf5``, ``parameters.dataset =
/data/<stack>/data``, ``chunk_shape = [1, y, x]``) and a ``StreamDatum`` with the frame's row
(``indices``). This is what Tiled/databroker and bluesky users of ophyd-async detectors expect:
the frame exists once, in the file that also holds its record and the job's metadata, and
consumers read it from there (a job file is an HDF5 file that h5py, HyperSpy and ncempy open).
The event itself carries the scalars of the daemon's per-frame record (job id, file, row, frame
id, time, nominal and read-back defocus, scan rotation, dose), so the table view shows them.

Units: s, nm, µs, degrees as named; dose in e/Å²; NaN where the record has no value.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import event_model
from bluesky.protocols import StreamAsset
from event_model import DataKey
from ophyd_async.core import (
    AsyncStatus,
    StandardReadable,
    StandardReadableFormat,
    soft_signal_r_and_setter,
    soft_signal_rw,
)

from scherzer.clients.bluesky_link import DaemonLink, FrameRef, JobOutcome

__all__ = ["AcquiringDetector", "Camera", "JobDetector", "ScanGenerator", "frame_uri"]

HDF5_MIMETYPE = "application/x-hdf5"


def frame_uri(path: str) -> str:
    """The ``file://localhost/...`` URI of a job file (an absolute path on the daemon's host)."""
    return "file://localhost" + Path(path).as_posix()


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


class JobDetector(StandardReadable):
    """Readings that refer to frames in daemon job files: the record scalars as signals and one
    external image key per stack (``<name>-<key>``), with their StreamResource/StreamDatum.

    ``stacks`` maps each image data-key suffix to the stack name in the job file (the camera's
    stack is ``frames``; the scan generator's are its signals).
    """

    def __init__(self, link: DaemonLink, stacks: dict[str, str], name: str = "") -> None:
        self._link = link
        self._stacks = dict(stacks)
        self._shapes: dict[str, tuple[int, int]] = {}
        self._assets: list[StreamAsset] = []
        self._resources: dict[tuple[str, str], Any] = {}  # (file, key) → StreamResource bundle
        self._index = 0
        self.last: JobOutcome | None = None
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.job_id, self._set_job_id = soft_signal_r_and_setter(int, 0)
        with self.add_children_as_readables():
            self.job_file, self._set_job_file = soft_signal_r_and_setter(str, "")
            self.frame_row, self._set_row = soft_signal_r_and_setter(int, 0)
            self.frame_id, self._set_frame_id = soft_signal_r_and_setter(int, 0)
            self.time_s, self._set_time = soft_signal_r_and_setter(float, math.nan, units="s")
            self.defocus_nominal_nm, self._set_nominal = soft_signal_r_and_setter(
                float, math.nan, units="nm"
            )
            self.defocus_readback_nm, self._set_readback = soft_signal_r_and_setter(
                float, math.nan, units="nm"
            )
            self.scan_rotation_deg, self._set_rotation = soft_signal_r_and_setter(
                float, math.nan, units="deg"
            )
            self.dose_e_per_A2, self._set_dose = soft_signal_r_and_setter(
                float, math.nan, units="e/A^2"
            )
        super().__init__(name=name)

    async def describe(self) -> dict[str, DataKey]:
        """The record scalars, and one external (``STREAM:``) image key per stack."""
        keys = await super().describe()
        for key, stack in self._stacks.items():
            if key not in self._shapes:
                raise RuntimeError(f"{self.name}: describe() before the first trigger()")
            ny, nx = self._shapes[key]
            keys[self._data_key(key)] = DataKey(
                source=f"scherzer:{stack}",
                shape=[1, ny, nx],
                dtype="array",
                dtype_numpy="<f4",
                external="STREAM:",
            )
        return keys

    async def collect_asset_docs(self, index: int | None = None) -> AsyncIterator[StreamAsset]:
        """The StreamResource/StreamDatum of the last triggered frame (once)."""
        assets, self._assets = self._assets, []
        for asset in assets:
            yield asset

    async def get_index(self) -> int:
        """Frames triggered so far."""
        return self._index

    # --- helpers -----------------------------------------------------------------------------
    def _data_key(self, key: str) -> str:
        return f"{self.name}-{key}"

    def _frame_of(self, outcome: JobOutcome, stack: str) -> FrameRef:
        frames = outcome.of_signal(stack)
        if not frames:
            raise RuntimeError(f"job {outcome.job.job_id} wrote no '{stack}' frame")
        return frames[-1]

    def _show(self, ref: FrameRef) -> None:
        rec = ref.record
        self._set_job_id(ref.job_id)
        self._set_job_file(ref.path)
        self._set_row(ref.row)
        self._set_frame_id(-1 if ref.frame_id is None else int(ref.frame_id))
        self._set_time(float(rec.time_s))
        self._set_nominal(_number(rec.defocus_nominal_nm))
        self._set_readback(_number(rec.defocus_readback_nm))
        self._set_rotation(float(rec.scan_rotation_deg))
        self._set_dose(_number(rec.dose_e_per_A2))

    def _docs(self, key: str, ref: FrameRef) -> Iterator[StreamAsset]:
        """A StreamResource the first time a (file, key) is referred to in this run, then the
        StreamDatum of the frame's row."""
        bundle = self._resources.get((ref.path, key))
        if bundle is None:
            ny, nx = self._shapes.get(key, (0, 0))
            bundle = event_model.compose_stream_resource(
                mimetype=HDF5_MIMETYPE,
                uri=frame_uri(ref.path),
                data_key=self._data_key(key),
                parameters={"dataset": ref.dataset, "chunk_shape": [1, ny, nx]},
            )
            self._resources[(ref.path, key)] = bundle
            yield "stream_resource", bundle.stream_resource_doc
        yield (
            "stream_datum",
            bundle.compose_stream_datum(indices={"start": ref.row, "stop": ref.row + 1}),
        )


class AcquiringDetector(JobDetector):
    """Base of :class:`Camera` and :class:`ScanGenerator`: one daemon job per ``trigger()``.
    Subclasses provide :meth:`job_plan` (the plan dict of one frame)."""

    # --- to be provided ----------------------------------------------------------------------
    async def job_plan(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- bluesky verbs -----------------------------------------------------------------------
    @AsyncStatus.wrap
    async def stage(self) -> None:
        """Check the daemon answers and subscribe to its events before the first trigger."""
        await self._link.open()
        self._resources = {}  # a new run names every file again
        await super().stage()

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        """Submit one frame as a daemon job, wait until it is ``done`` (raises
        :class:`~scherzer.clients.bluesky_link.JobFailed` otherwise) and note where it is."""
        outcome = await self._link.run_job(await self.job_plan())
        refs = {key: self._frame_of(outcome, stack) for key, stack in self._stacks.items()}
        for key, ref in refs.items():
            if key not in self._shapes:
                self._shapes[key] = await self._link.frame_shape(ref)
        self._show(next(iter(refs.values())))
        self._assets = [doc for key, ref in refs.items() for doc in self._docs(key, ref)]
        self._index += 1
        self.last = outcome


class Camera(AcquiringDetector):
    """The TEM camera: each trigger is a ``camera_image`` job of one frame.

    Configuration signals: ``exposure_s`` (s), ``binning`` (1..16). The image key is
    ``<name>-image`` (stack ``frames`` of the job file); the lens is left as it is, so a scan
    over the lens positioners images at their values.
    """

    def __init__(self, link: DaemonLink, name: str = "", exposure_s: float = 0.1) -> None:
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.exposure_s = soft_signal_rw(float, float(exposure_s), units="s")
            self.binning = soft_signal_rw(int, 1)
        super().__init__(link, {"image": "frames"}, name=name)

    async def job_plan(self) -> dict[str, Any]:
        return {
            "kind": "camera_image",
            "name": self.name or "camera",
            "exposure_s": await self.exposure_s.get_value(),
            "binning": await self.binning.get_value(),
        }


class ScanGenerator(AcquiringDetector):
    """The STEM scan generator: each trigger is a ``scan_image`` job of one frame.

    ``signals``: the detectors recorded at the same probe positions (fixed per device; one
    image key ``<name>-<signal>`` each). Configuration signals: ``size_y_px``, ``size_x_px``,
    ``pixel_nm`` (nm), ``dwell_us`` (µs), ``flyback_us`` (µs), ``rotation_deg`` (degrees).
    """

    def __init__(
        self,
        link: DaemonLink,
        name: str = "",
        signals: Sequence[str] = ("HAADF",),
        size_px: tuple[int, int] = (256, 256),
        dwell_us: float = 2.0,
    ) -> None:
        self.signals = tuple(signals)
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.size_y_px = soft_signal_rw(int, int(size_px[0]))
            self.size_x_px = soft_signal_rw(int, int(size_px[1]))
            self.pixel_nm = soft_signal_rw(float, 0.02, units="nm")
            self.dwell_us = soft_signal_rw(float, float(dwell_us), units="us")
            self.flyback_us = soft_signal_rw(float, 200.0, units="us")
            self.rotation_deg = soft_signal_rw(float, 0.0, units="deg")
        super().__init__(link, {s: s for s in self.signals}, name=name)

    async def job_plan(self) -> dict[str, Any]:
        return {
            "kind": "scan_image",
            "name": self.name or "scan",
            "signals": list(self.signals),
            "size_px": [await self.size_y_px.get_value(), await self.size_x_px.get_value()],
            "pixel_nm": await self.pixel_nm.get_value(),
            "dwell_us": await self.dwell_us.get_value(),
            "flyback_us": await self.flyback_us.get_value(),
            "rotation_deg": await self.rotation_deg.get_value(),
        }
