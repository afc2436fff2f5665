"""What a plan must satisfy, beyond its schema, to be queued (``job_submit``, ``plan_validate``).

The plan's own limits (:meth:`BasePlan.problems` against ``[limits]``), then what the daemon knows
and the plan cannot: the estimate is finite and within ``limits.max_job_duration_s``;
``not_before_s`` is at most ``limits.max_start_delay_s`` ahead; the camera curves it names
resolve inside ``calibrations_dir`` (:mod:`scherzer.daemon.calibrations`); and the disk keeps
``limits.min_free_disk_bytes`` free after this plan **and every job already queued** (their
estimates; the running job's remaining part). Every problem is a sentence; nothing here raises
for any plan that passed the schema.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scherzer.config import Settings
from scherzer.daemon.calibrations import CalibrationError, resolve_calibration
from scherzer.daemon.plans import BasePlan, PlanEstimate
from scherzer.drivers.instruments import Instruments

__all__ = ["Admission", "calibration_names", "estimate_plan", "plan_problems"]

#: Processing-step keys whose string value names a file in ``calibrations_dir``.
CALIBRATION_KEYS = ("mtf", "nps")


@dataclass
class Admission:
    """A plan's verdict: ``problems`` (empty = accepted; limits, disk, time), ``invalid`` (what
    names something the daemon will not open: ``invalid_params`` at submit) and the estimate
    (None if not finite)."""

    problems: list[str]
    estimate: PlanEstimate | None
    invalid: list[str] = field(default_factory=list)

    @property
    def all_problems(self) -> list[str]:
        return [*self.invalid, *self.problems]


def estimate_plan(plan: BasePlan, instruments: Instruments) -> PlanEstimate | None:
    """The plan's estimate, or None if it cannot be computed or is not finite."""
    try:
        est = plan.estimate(
            instruments.camera_shape,
            dose_rate_e_per_A2_s=instruments.dose_rate_e_per_A2_s,
            probe_current_pA=instruments.probe_current_pA,
        )
    except (ArithmeticError, ValueError):
        return None
    numbers = (est.duration_s, est.disk_bytes, est.dose_e_per_A2 or 0.0)
    return est if all(math.isfinite(float(v)) for v in numbers) else None


def calibration_names(plan: BasePlan) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of every camera-curve setting in the plan's processing steps."""
    for step in plan.processing:
        if isinstance(step, dict):
            for key in CALIBRATION_KEYS:
                if key in step and step[key] is not None:
                    yield key, step[key]


def _calibration_problems(plan: BasePlan, directory: Path | None) -> list[str]:
    problems = []
    for key, value in calibration_names(plan):
        if not isinstance(value, str):
            continue  # an inline array: the plan validator checked it
        try:
            resolve_calibration(value, directory)
        except CalibrationError as exc:
            problems.append(f"processing {key}: {exc}")
    return problems


def _time_problems(
    plan: BasePlan, est: PlanEstimate, settings: Settings, now_s: float
) -> list[str]:
    limits = settings.limits
    problems = []
    if est.duration_s > limits.max_job_duration_s:
        problems.append(
            f"the plan would take {est.duration_s:.3g} s; at most "
            f"{limits.max_job_duration_s:g} s (limits.max_job_duration_s)"
        )
    not_before = getattr(plan, "not_before_s", None)
    if not_before is not None and not (
        math.isfinite(not_before) and not_before <= now_s + limits.max_start_delay_s
    ):
        problems.append(
            f"not_before_s {not_before:.6g} is more than {limits.max_start_delay_s:g} s ahead "
            "(limits.max_start_delay_s)"
        )
    return problems


def plan_problems(
    plan: BasePlan,
    settings: Settings,
    instruments: Instruments,
    *,
    now_s: float,
    free_bytes: int,
    committed_bytes: int,
) -> Admission:
    """Everything wrong with queueing ``plan`` now. ``committed_bytes``: the disk the queued
    (and running) jobs will still write."""
    try:
        problems = list(plan.problems(settings.limits, instruments.camera_shape))
    except (ArithmeticError, ValueError) as exc:
        problems = [f"the plan's numbers are out of range ({type(exc).__name__})"]
    problems += plan.device_problems(instruments)  # e.g. energies beyond the energy filter
    invalid = _calibration_problems(plan, settings.calibrations_path)
    est = estimate_plan(plan, instruments)
    if est is None:
        problems.append("the plan's estimate is not finite: a number in it is out of range")
        return Admission(problems, None, invalid)
    problems += _time_problems(plan, est, settings, now_s)
    keep = settings.limits.min_free_disk_bytes
    if free_bytes - committed_bytes - est.disk_bytes < keep:
        problems.append(
            f"not enough disk: {free_bytes / 1e6:.0f} MB free, the queued jobs need "
            f"{committed_bytes / 1e6:.1f} MB, this plan {est.disk_bytes / 1e6:.1f} MB and "
            f"{keep / 1e6:.0f} MB must stay free"
        )
    return Admission(problems, est, invalid)
