"""Summary report of a batch of jobs: Markdown with PNG plots, written in the data directory.

For every job: a line in the outcome table (id, name, kind, state, frames written of planned,
time taken, file, error). For jobs whose processing ran: focal series — fitted focus against
image index, peak heights, drift y/x, a thumbnail of the exit-wave phase; scan series — drift
(the alignment shifts) and a thumbnail of the average. Where the file carries simulator ground
truth, the fitted values are compared with it (RMS errors in the table).

Files: ``<data_dir>/reports/<name>_<NNN>.md`` and the folder ``<name>_<NNN>/`` with the PNGs
(links in the Markdown are relative). Never overwrites. Units: nm, px, s as named.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from scherzer.daemon.protocol import JobInfo

__all__ = ["JobSummary", "summarise_job", "write_report"]

log = structlog.get_logger("scherzer.report")


@dataclass
class JobSummary:
    """What the report says about one job (all JSON-able)."""

    job_id: int
    name: str
    kind: str
    state: str
    frames_done: int
    frames_total: int
    seconds: float | None
    output_file: str | None
    error: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "name": self.name,
            "kind": self.kind,
            "state": self.state,
            "frames_done": self.frames_done,
            "frames_total": self.frames_total,
            "seconds": self.seconds,
            "output_file": self.output_file,
            "error": self.error,
            "metrics": self.metrics,
        }


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


def _focal_part(path: str, out: JobSummary) -> None:
    from scherzer.io import read_processing_summary, read_result, read_stack

    reg = read_processing_summary(path, "focal_register")
    ref = int(reg["reference_index"])
    out.series = {
        "defocus_nm": np.asarray(reg["defocus_nm"]),
        "peak_heights": np.asarray(reg["peak_heights"]),
        "shifts_px": np.asarray(reg["shifts_px"]),
    }
    out.metrics["reference_index"] = ref
    out.metrics["astigmatism_nm"] = float(reg["astigmatism_nm"])
    truth = read_stack(path).ground_truth
    if "defocus_nm" in truth and len(truth["defocus_nm"]) == len(reg["defocus_nm"]):
        rel_true = np.asarray(truth["defocus_nm"]) - truth["defocus_nm"][ref]
        out.metrics["defocus_rms_error_nm"] = _rms(
            np.asarray(reg["relative_defocus_nm"]) - rel_true
        )
    if "shifts_px" in truth and len(truth["shifts_px"]) == len(reg["shifts_px"]):
        true_shifts = np.asarray(truth["shifts_px"]) - np.asarray(truth["shifts_px"])[ref]
        err = np.linalg.norm(out.series["shifts_px"] - true_shifts, axis=1)
        out.metrics["drift_rms_error_px"] = _rms(err)
    try:
        out.images["exit-wave phase"] = np.angle(read_result(path, "exit_wave"))
    except Exception:
        pass


def _align_part(path: str, out: JobSummary, signal: str) -> None:
    from scherzer.io import read_processing_summary, read_result, read_stack

    summary = read_processing_summary(path, "align")
    shifts = np.asarray(summary["shifts_px"], dtype=float)
    out.series = {"shifts_px": shifts}
    truth = read_stack(path, signal).ground_truth
    if "shifts_px" in truth and len(truth["shifts_px"]) == len(shifts):
        t = np.asarray(truth["shifts_px"], dtype=float)
        err = (shifts - shifts.mean(0)) - (t - t.mean(0))
        out.metrics["drift_rms_error_px"] = _rms(np.linalg.norm(err, axis=1))
    try:
        out.images[f"average {signal}"] = read_result(path, f"average_{signal}")
    except Exception:
        pass


def summarise_job(job: JobInfo) -> JobSummary:
    """A job's outcome, and its processing results when it has any (never raises)."""
    seconds = None
    if job.started_s is not None and job.finished_s is not None:
        seconds = job.finished_s - job.started_s
    out = JobSummary(
        job_id=job.job_id,
        name=job.name,
        kind=job.kind,
        state=job.state,
        frames_done=job.frames_done,
        frames_total=job.frames_total,
        seconds=seconds,
        output_file=job.output_file,
        error=f"{job.error.code}: {job.error.message}" if job.error else None,
    )
    path = job.output_file
    steps = [s if isinstance(s, str) else s.get("step") for s in job.plan.get("processing", [])]
    if job.state != "done" or not path or not Path(path).exists():
        return out
    try:
        if "focal_register" in steps or "restore" in steps:
            _focal_part(path, out)
        elif "align" in steps:
            from scherzer.daemon.plans import parse_plan

            _align_part(path, out, parse_plan(job.plan).signals()[0])
    except Exception as exc:  # a report never fails because one file is odd
        log.warning("report: cannot read results", job=job.job_id, error=str(exc))
        out.metrics["report_error"] = str(exc)
    return out


# --- plots ------------------------------------------------------------------------------------
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    _plt().close(fig)
    return path


def _series_plots(s: JobSummary, folder: Path) -> list[Path]:
    plt = _plt()
    paths = []
    stem = f"job{s.job_id:06d}"
    if "defocus_nm" in s.series:
        idx = np.arange(len(s.series["defocus_nm"]))
        fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
        a.plot(idx, s.series["defocus_nm"], "o-")
        a.set(xlabel="image index", ylabel="fitted focus (nm)", title="focus vs index")
        b.bar(idx, s.series["peak_heights"])
        b.set(xlabel="image index", ylabel="peak height", title="correlation peaks")
        paths.append(_save(fig, folder / f"{stem}_focus.png"))
    if "shifts_px" in s.series:
        shifts = s.series["shifts_px"]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(shifts[:, 0], "o-", label="y")
        ax.plot(shifts[:, 1], "s-", label="x")
        ax.set(xlabel="frame index", ylabel="drift (px)", title="drift")
        ax.legend()
        paths.append(_save(fig, folder / f"{stem}_drift.png"))
    for label, image in s.images.items():
        fig, ax = plt.subplots(figsize=(3, 3))
        ax.imshow(image, cmap="gray")
        ax.set(title=label, xticks=[], yticks=[])
        slug = label.replace(" ", "_").replace("-", "_")
        paths.append(_save(fig, folder / f"{stem}_{slug}.png"))
    return paths


# --- the report -------------------------------------------------------------------------------
def _markdown_path(stem: Path) -> Path:
    """``<stem>.md`` (the stem may hold dots: ``run.v2_001`` → ``run.v2_001.md``)."""
    return stem.with_name(stem.name + ".md")


def _free_stem(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for number in range(1, 1_000_000):
        stem = directory / f"{name}_{number:03d}"
        if _markdown_path(stem).exists():
            continue
        try:
            stem.mkdir()
        except FileExistsError:
            continue
        return stem
    raise RuntimeError(f"no free report number in {directory}")


def _cell(value: Any, fmt: str = "{}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value).replace("|", "/")


def outcome_table(summaries: Sequence[JobSummary]) -> str:
    """The Markdown table listing every job and its outcome."""
    lines = [
        "| job | name | kind | outcome | frames | time (s) | defocus RMS err (nm) "
        "| drift RMS err (px) | file | error |",
        "|---:|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for s in summaries:
        file = Path(s.output_file).name if s.output_file else None
        lines.append(
            f"| {s.job_id} | {_cell(s.name)} | {s.kind} | **{s.state}** | "
            f"{s.frames_done}/{s.frames_total} | {_cell(s.seconds, '{:.1f}')} | "
            f"{_cell(s.metrics.get('defocus_rms_error_nm'), '{:.3f}')} | "
            f"{_cell(s.metrics.get('drift_rms_error_px'), '{:.3f}')} | {_cell(file)} | "
            f"{_cell(s.error)} |"
        )
    return "\n".join(lines)


def write_report(
    jobs: Sequence[JobInfo], data_dir: str | Path, title: str = "Scherzer run", name: str = "report"
) -> tuple[Path, list[JobSummary]]:
    """Write the Markdown report (and its PNGs) for ``jobs``; returns its path and summaries."""
    stem = _free_stem(Path(data_dir) / "reports", name)
    summaries = [summarise_job(j) for j in jobs]
    counts: dict[str, int] = {}
    for s in summaries:
        counts[s.state] = counts.get(s.state, 0) + 1
    parts = [
        f"# {title}\n",
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}; {len(summaries)} jobs: "
        + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        + f"; frames written {sum(s.frames_done for s in summaries)} of "
        f"{sum(s.frames_total for s in summaries)} planned.\n",
        outcome_table(summaries),
        "",
    ]
    for s in summaries:
        try:
            plots = _series_plots(s, stem)
        except Exception as exc:
            log.warning("report: plotting failed", job=s.job_id, error=str(exc))
            plots = []
        if not plots:
            continue
        parts.append(f"## Job {s.job_id}: {s.name or s.kind}\n")
        extra = ", ".join(f"{k} {_cell(v, '{:.3g}')}" for k, v in s.metrics.items()
                          if isinstance(v, int | float))  # fmt: skip
        if extra:
            parts.append(extra + "\n")
        parts += [f"![{p.stem}]({stem.name}/{p.name})" for p in plots]
        parts.append("")
    path = _markdown_path(stem)
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path, summaries
