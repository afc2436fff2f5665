"""EFTEM series on the executor thread (plan :class:`~scherzer.daemon.plans.EftemSeries`).

The executor hands an ``eftem_series`` job to :func:`run_eftem` instead of running its frame
steps. Per image, at a frame boundary (cancel, stop, pause): set the filter's energy offset,
expose through the camera after the filter, retake shorter while saturated, subtract the dark
reference of that exposure — taken with the beam blanked (the ``BeamBlanker``) the first time
the exposure is used, then reused (:class:`~scherzer.processing.eftem.DarkCache`) — store the
net counts as int32 scaled to ``max_exposure_s`` (exact), choose the next exposure (changes by
powers of two only: :class:`~scherzer.processing.eftem.SeriesAcquisition`), append the image to
the job file (flushed: an abort keeps every image taken) and publish ``frame`` and ``progress``
events. A device error in an image follows the plan's retries, then aborts (an EFTEM series
never skips an image: its energy-loss axis would be wrong).

The job file's stack ``eftem`` is int32 with an "Energy loss" (eV) first axis; its metadata
``eftem`` says how to read it: counts at the first image's exposure = stored × quantum_counts
(= first exposure / max_exposure_s), counts of image i at its own exposure = stored ×
exposure_s[i] / max_exposure_s (exposures are in the per-frame records, so a killed job's file
reads correctly). When the job ends, the ``eftem_series`` table (per image: energy, exposure,
scale to the first, counts per stored unit, net-count statistic, dark taken, retakes) and the
counts (darks acquired and reused, retakes) are added. The filter's slit, width and energy
offset are restored afterwards (``restore_optics``); the beam is never left blanked.
Simulated instruments add the true shifts and each element's true map (atoms/nm², at the first
image's content position) as ground truth. Units: eV, s, counts (ADU) as named.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from scherzer.daemon.diskspace import ensure_room
from scherzer.daemon.files import open_stack_writer
from scherzer.daemon.jobrun import JobRun
from scherzer.daemon.plans import EftemSeries
from scherzer.daemon.protocol import ErrorCode, ProtocolError
from scherzer.drivers.base import CameraFrame, DeviceError
from scherzer.processing.eftem.exposure import SeriesAcquisition

if TYPE_CHECKING:
    from scherzer.daemon.executor import Executor

__all__ = ["EFTEM_SIGNAL", "ENERGY_AXIS", "run_eftem"]

#: The stack an EFTEM job writes, and the name/units of its first (navigation) axis.
EFTEM_SIGNAL = "eftem"
ENERGY_AXIS = ("Energy loss", "eV")
#: How the stored integers read, written into every EFTEM job file.
STORAGE_RULE = (
    "int32 stored = round(net counts × max_exposure_s / exposure_s); counts at the first "
    "image's exposure = stored × quantum_counts; at image i's own exposure = stored × "
    "exposure_s[i] / max_exposure_s"
)
#: The stored stack's intensity units (HyperSpy's ``Signal.quantity`` says "Intensity (…)").
STORED_UNITS = "counts × max_exposure_s / exposure_s (metadata eftem.storage)"
_TABLE_DTYPE = np.dtype(
    [("index", "<i8"), ("energy_ev", "<f8"), ("exposure_s", "<f8"), ("time_s", "<f8"),
     ("scale_to_first", "<f8"), ("counts_per_unit", "<f8"), ("statistic", "<f8"),
     ("dark_acquired", "?"), ("retakes", "<i8")]
)  # fmt: skip


@dataclass
class _Series:
    """One EFTEM job's state between images."""

    ex: Executor
    run: JobRun
    plan: EftemSeries
    last: CameraFrame | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    acquisition: SeriesAcquisition | None = None

    @property
    def ins(self) -> Any:
        return self.ex.instruments

    def acquire(self, energy_ev: float, exposure_s: float) -> tuple[np.ndarray, float]:
        """Set the energy offset, settle, expose: (raw counts, mid-exposure time s)."""
        filt = self.ins.energy_filter
        filt.set_energy_offset_ev(energy_ev)
        filt.wait_settled(self.ex.settings.devices.settle_timeout_s)
        if self.plan.settle_s > 0:
            self.ins.wait_s(self.plan.settle_s)
        frame = self.ins.eftem_camera().acquire(exposure_s)
        self.last = frame
        return frame.image, frame.record.time_s + 0.5 * exposure_s

    def acquire_dark(self, exposure_s: float) -> np.ndarray:
        """One read-out with the beam blanked (unblanked again whatever happens)."""
        blanker = self.ins.blanker
        blanker.set_beam_blanked(True)
        try:
            return self.ins.eftem_camera().acquire(exposure_s).image
        finally:
            blanker.set_beam_blanked(False)


def _check_devices(plan: EftemSeries, ins: Any) -> None:
    problems = plan.device_problems(ins)
    if problems:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, "; ".join(problems), problems)


def _saved_filter(filt: Any) -> tuple[bool, float, float]:
    return filt.is_slit_in(), filt.get_slit_width_ev(), filt.get_energy_offset_ev()


def _restore_filter(s: _Series, saved: tuple[bool, float, float] | None, jlog: Any) -> None:
    """Unblank (always) and put the slit, its width and the energy offset back; never raises."""
    ins = s.ins
    try:
        if ins.blanker is not None and ins.blanker.is_beam_blanked():
            ins.blanker.set_beam_blanked(False)
    except Exception as exc:
        jlog.error("could not unblank the beam", error=str(exc))
    if saved is None:
        return
    slit_in, width, offset = saved
    filt = ins.energy_filter
    try:
        filt.set_energy_offset_ev(offset)
        filt.set_slit_width_ev(width)
        filt.slit_in() if slit_in else filt.slit_out()
        jlog.info("energy filter restored", energy_offset_ev=offset, slit_width_ev=width)
    except Exception as exc:
        jlog.error("could not restore the energy filter", error=str(exc))


def run_eftem(ex: Executor, run: JobRun, jlog: Any) -> None:
    """Acquire ``run.plan`` (an :class:`EftemSeries`) on the executor thread (module doc).
    Raises what stops the job (``_StopJob`` at a boundary, DeviceError after the retries); the
    images written so far stay in the file either way."""
    plan = run.plan
    assert isinstance(plan, EftemSeries)
    _check_devices(plan, ex.instruments)
    s = _Series(ex, run, plan)
    filt = ex.instruments.energy_filter
    saved = _saved_filter(filt) if plan.restore_optics else None
    try:
        filt.set_slit_width_ev(plan.slit_width_ev)
        filt.slit_in()
        s.acquisition = SeriesAcquisition(s.acquire, s.acquire_dark, plan.exposure_settings())
        for i, energy in enumerate(plan.energies_ev()):
            ex._frame_boundary(run.job.job_id)
            stored, row = _take_with_policy(s, i, energy, jlog)
            _write_image(s, i, stored, row)
    finally:
        _restore_filter(s, saved, jlog)
        _finish_file(s, jlog)


def _take_with_policy(s: _Series, i: int, energy: float, jlog: Any) -> tuple[np.ndarray, dict]:
    """One image under the plan's retries (then the error ends the job)."""
    policy = s.plan.on_error
    assert s.acquisition is not None
    for attempt in range(policy.retries + 1):
        try:
            return s.acquisition.take(energy)
        except DeviceError as exc:
            if attempt == policy.retries:
                raise
            jlog.warning("EFTEM image failed", index=i, attempt=attempt + 1, code=exc.code,
                         error=str(exc))  # fmt: skip
            s.ex._check_stop(s.run.job.job_id)
    raise AssertionError("unreachable")  # pragma: no cover


def _metadata(s: _Series, first_exposure_s: float) -> dict[str, Any]:
    plan, job = s.plan, s.run.job
    settings = plan.exposure_settings()
    axis = [ENERGY_AXIS[0], plan.step_ev or 1.0, plan.start_ev, ENERGY_AXIS[1]]
    return {
        "job_id": job.job_id, "plan": job.plan, "submitter": job.submitter,
        "kind": plan.kind_name(), "name": plan.name, "sample": plan.sample, "notes": plan.notes,
        "frame_axis": axis,
        "eftem": {
            "energies_ev": plan.energies_ev(), "start_ev": plan.start_ev, "step_ev": plan.step_ev,
            "slit_width_ev": plan.slit_width_ev, "max_exposure_s": settings.max_exposure_s,
            "first_exposure_s": first_exposure_s,
            "quantum_counts": first_exposure_s / settings.max_exposure_s,
            "storage": STORAGE_RULE, "exposure": dataclasses.asdict(settings),
        },
    }  # fmt: skip


def _write_image(s: _Series, i: int, stored: np.ndarray, row: dict[str, Any]) -> None:
    """Append image i to the job file (opened at the first), events, truth."""
    ex, run, frame = s.ex, s.run, s.last
    assert frame is not None and s.acquisition is not None
    ensure_room(run.path.parent, stored.nbytes)
    if run.writer is None:
        md = _metadata(s, row["exposure_s"])
        axis = md["frame_axis"]
        run.writer = open_stack_writer(
            run.path, pixel_size_nm=frame.pixel_size_nm, frame_shape=tuple(stored.shape),
            names=(EFTEM_SIGNAL,), instrument=ex.instruments.instrument, metadata=md,
            dtype=np.int32, frame_axis=(axis[0], float(axis[1]), float(axis[2]), axis[3]),
            intensity_units=STORED_UNITS,
        )  # fmt: skip
    record = dataclasses.replace(frame.record, index=i, signal=EFTEM_SIGNAL)
    run.writer.append(stored, record, name=EFTEM_SIGNAL)
    s.rows.append(row)
    _add_truth(s, frame.truth)
    run.written += 1
    preview = stored.astype(np.float32) * np.float32(s.acquisition.quantum_counts)
    info = ex.frames.put(preview, record, frame.pixel_size_nm, job_id=run.job.job_id)
    darks = s.acquisition.darks
    ex.publish("frame", {
        "job_id": run.job.job_id, "frame_id": info.frame_id, "index": i,
        "total": s.plan.n_frames(), "signal": EFTEM_SIGNAL,
        "record": info.record.model_dump(mode="json"),
        "eftem": {
            "energy_ev": row["energy_ev"], "exposure_s": row["exposure_s"],
            "scale_to_first": row["scale_to_first"], "statistic": row["statistic"],
            "dark_acquired": row["dark_acquired"], "darks_acquired": darks.acquired,
        },
    })  # fmt: skip
    ex._publish_progress(run)


#: Per-image truth values kept (simulators): the true energy offset and the field means of the
#: noiseless net counts and of the expected dark read-out (offset + dark current), ADU.
_TRUTH_SERIES = {
    "energy_ev": lambda t: float(t.get("energy_ev", np.nan)),
    "expected_counts_mean": lambda t: float(np.mean(t.get("expected_counts", np.nan))),
    "expected_dark_counts_mean": lambda t: float(np.mean(t.get("expected_dark_counts", np.nan))),
}


def _add_truth(s: _Series, truth: dict[str, Any]) -> None:
    """Simulators: per image the true shift, energy and mean expected counts; the element maps
    (atoms/nm²) at the first image's content position."""
    if "shift_px" not in truth:
        return
    s.run.add_truth({"shift_px": np.asarray(truth["shift_px"], dtype=np.float64)})
    for key, value in _TRUTH_SERIES.items():
        s.run.extra_truth.setdefault(key, []).append(value(truth))
    if len(s.run.extra_truth["energy_ev"]) == 1:
        for element, amap in (truth.get("element_maps") or {}).items():
            s.run.extra_truth[f"element_map_{element}"] = np.asarray(amap, dtype=np.float32)


def _finish_file(s: _Series, jlog: Any) -> None:
    """Close the file (ground truth in), then add the per-image table and the counts; never
    raises (the images are on disk whatever happens here)."""
    run = s.run
    for key in _TRUTH_SERIES:
        if key in run.extra_truth:
            run.extra_truth[key] = np.asarray(run.extra_truth[key], dtype=np.float64)
    s.ex._close_file(run, jlog)
    if not s.rows or not run.path.exists() or s.acquisition is None:
        return
    from scherzer.io import update_stack_metadata, write_table

    table = np.zeros(len(s.rows), dtype=_TABLE_DTYPE)
    for name in _TABLE_DTYPE.names:
        table[name] = [r[name] for r in s.rows]
    darks = s.acquisition.darks
    counts = {
        "darks_acquired": darks.acquired, "darks_reused": darks.reused,
        "dark_exposures_s": darks.exposures_s(), "retakes": s.acquisition.retakes,
        "images": len(s.rows),
    }  # fmt: skip
    try:
        write_table(run.path, "eftem_series", table)
        update_stack_metadata(run.path, EFTEM_SIGNAL, {"eftem_counts": counts})
        jlog.info("EFTEM series stored", **counts)
    except Exception:
        jlog.exception("storing the EFTEM table failed (the images are on disk)")
