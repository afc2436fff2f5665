"""Unattended runs: a ``runs.toml`` batch of plans, a queue-level preflight, submit, summary.

File format (TOML)::

    title = "night of 21 Nov"          # optional, used for the report
    [defaults]                          # optional: fields merged into every plan
    sample = "SrTiO3 lamella 3"
    on_error = "retry"                  # per-item policy below wins over this

    [[runs]]
    repeat = 3                          # submit the plan 3 times (default 1)
    not_before = 2026-11-21T22:00:00    # optional: local time (TOML datetime) or Unix seconds
    on_error = "skip"                   # optional: this item's error policy
    [runs.plan]
    kind = "focal_series"
    name = "edge"
    n_images = 11

The preflight validates every expanded plan with the daemon (``plan_validate``: limits and
estimates), adds up duration, dose and disk use and refuses the batch when one plan is refused or
the total would not fit on the disk (keeping the daemon's reserve free). After submitting, the
caller may wait for every job and ask the daemon for the summary report (``report_create``).
Units: s, e/Å², bytes as named.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scherzer.config import read_toml
from scherzer.daemon.plans import ErrorPolicy
from scherzer.validation import format_validation_error

__all__ = [
    "Preflight",
    "RunItem",
    "RunsFile",
    "expand_runs",
    "load_runs",
    "preflight",
    "run_batch",
]


class RunsError(ValueError):
    """The runs file cannot be used; the message says what to change."""


class RunItem(BaseModel):
    """One entry of ``[[runs]]``."""

    model_config = ConfigDict(extra="forbid")

    plan: dict[str, Any]
    repeat: int = Field(1, ge=1, le=10000)
    not_before: float | None = Field(None, description="Unix seconds (datetimes are converted)")
    on_error: ErrorPolicy | None = None

    @field_validator("not_before", mode="before")
    @classmethod
    def _to_unix(cls, value: Any) -> Any:
        if isinstance(value, _dt.datetime):
            return value.timestamp()  # naive datetimes are local time
        if isinstance(value, _dt.date):
            return _dt.datetime.combine(value, _dt.time()).timestamp()
        return value


class RunsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = "Scherzer run"
    defaults: dict[str, Any] = Field(default_factory=dict)
    runs: list[RunItem] = Field(min_length=1)


def load_runs(path: str | Path) -> RunsFile:
    """Read and check a runs file (:class:`RunsError` says what is wrong and where)."""
    p = Path(path)
    raw = read_toml(p, RunsError, "runs file")
    try:
        return RunsFile.model_validate(raw)
    except ValidationError as exc:
        raise RunsError(f"{p}: {format_validation_error(exc)}") from exc


def expand_runs(runs: RunsFile) -> list[dict[str, Any]]:
    """Every plan to submit, in order: defaults < plan < item policy/time, repeats expanded."""
    out = []
    for item in runs.runs:
        plan = {**runs.defaults, **item.plan}
        if item.on_error is not None:
            plan["on_error"] = item.on_error.model_dump()
        if item.not_before is not None:
            plan["not_before_s"] = item.not_before
        out += [dict(plan) for _ in range(item.repeat)]
    return out


@dataclass
class Preflight:
    """Totals of a batch and why it cannot run (``problems`` empty: it may)."""

    plans: int = 0
    frames: int = 0
    duration_s: float = 0.0
    dose_e_per_A2: float = 0.0
    disk_bytes: int = 0
    disk_free_bytes: int | None = None
    problems: list[str] = field(default_factory=list)
    earliest_end_s: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "plans": self.plans,
            "frames": self.frames,
            "duration_s": self.duration_s,
            "dose_e_per_A2": self.dose_e_per_A2,
            "disk_bytes": self.disk_bytes,
            "disk_free_bytes": self.disk_free_bytes,
            "earliest_end_s": self.earliest_end_s,
            "problems": self.problems,
        }

    def text(self) -> str:
        lines = [
            f"{self.plans} plans, {self.frames} frames, about {self.duration_s / 60:.1f} min of "
            f"acquisition, dose {self.dose_e_per_A2:.3g} e/Å² in total, "
            f"{self.disk_bytes / 1e6:.1f} MB on disk"
            + (f" ({self.disk_free_bytes / 1e9:.1f} GB free)" if self.disk_free_bytes else "")
        ]
        lines += [f"refused: {p}" for p in self.problems]
        return "\n".join(lines)


def preflight(client: Any, plans: list[dict[str, Any]]) -> Preflight:
    """Validate every plan with the daemon and add up time, dose and disk."""
    pf = Preflight(plans=len(plans))
    reserve = 0
    clock = time.time()
    for i, plan in enumerate(plans):
        res = client.plan_validate(plan)
        label = f"plan {i + 1} ({plan.get('kind', '?')} {plan.get('name', '')!s})".replace(
            " )", ")"
        )
        pf.problems += [f"{label}: {p}" for p in res.problems]
        if res.estimate is not None:
            pf.frames += res.estimate.frames
            pf.duration_s += res.estimate.duration_s
            pf.dose_e_per_A2 += res.estimate.dose_e_per_A2 or 0.0
            pf.disk_bytes += res.estimate.disk_bytes
            clock = max(clock, plan.get("not_before_s") or 0.0) + res.estimate.duration_s
        pf.disk_free_bytes = res.disk_free_bytes
        reserve = res.disk_reserve_bytes or 0
    pf.earliest_end_s = clock
    if pf.disk_free_bytes is not None and pf.disk_free_bytes - pf.disk_bytes < reserve:
        pf.problems.append(
            f"the batch needs {pf.disk_bytes / 1e6:.1f} MB but only "
            f"{(pf.disk_free_bytes - reserve) / 1e6:.1f} MB may be used "
            f"({reserve / 1e6:.0f} MB must stay free)"
        )
    return pf


def run_batch(
    client: Any,
    runs: RunsFile,
    *,
    wait: bool = True,
    timeout_s: float | None = None,
    on_event: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Preflight, submit every plan, optionally wait for all and have the report written.

    Returns ``{"preflight", "jobs": [JobInfo json], "report": path or None}``; a refused
    preflight submits nothing (``jobs`` empty).
    """
    plans = expand_runs(runs)
    pf = preflight(client, plans)
    out: dict[str, Any] = {"preflight": pf.to_json(), "jobs": [], "report": None}
    if not pf.ok:
        return out
    jobs = [client.submit(plan) for plan in plans]
    if wait:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        finished = []
        for job in jobs:
            left = None if deadline is None else max(0.1, deadline - time.monotonic())
            finished.append(client.wait(job.job_id, timeout_s=left, on_event=on_event))
        jobs = finished
        report = client.report([j.job_id for j in jobs], title=runs.title)
        out["report"] = report.path
        out["summary"] = report.jobs
    out["jobs"] = [j.model_dump(mode="json") for j in jobs]
    return out
