"""`scherzer demo`: the main job on the built-in simulators, end to end, through the daemon.

Starts an embedded daemon (:class:`~scherzer.clients.client.LocalDaemon`, a child process on free
loopback ports) whose instruments are the simulated microscope (a crystal edge under an
amorphous film, drifting), submits an 11-image focal series (focal-series registration and
exit-wave restoration) and an orthogonal-pairs HAADF + ABF scan series (rigid alignment measured
on HAADF and applied to ABF), shows progress bars while they run (the scan series acquires while
the focal series is processed), compares the fitted values with the simulator's ground truth
stored in the job files, and prints a summary table and where the report and files are. The
daemon is stopped on any exit (normal, error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from scherzer import io as sio
from scherzer.stack import ImageStack

__all__ = ["DemoSettings", "focal_comparison", "focal_table", "run_demo", "scan_comparison"]


@dataclass(frozen=True)
class DemoSettings:
    """Sizes, speed and seed of the demo (CI runs it small)."""

    out_dir: Path = Path("scherzer-demo")
    focal_images: int = 11
    focal_size_px: int = 512  # registration needs the field: 256² gives ~1–2 nm, 512² ~0.35 nm
    scan_frames: int = 8
    scan_size_px: int = 256
    seed: int = 1
    speedup: float = 20.0
    timeout_s: float = 600.0


def _relative(values: np.ndarray, ref: int) -> np.ndarray:
    return np.asarray(values, dtype=float) - np.asarray(values, dtype=float)[ref]


def focal_comparison(stack: ImageStack, summary: dict[str, Any]) -> dict[str, Any]:
    """Fitted against true relative defocus and drift (relative to the reference image).
    ``summary`` is the ``focal_register`` step summary."""
    ref = int(summary["reference_index"])
    fitted = np.asarray(summary["relative_defocus_nm"])
    truth = _relative(stack.ground_truth["defocus_nm"], ref)
    shifts = np.asarray(summary["shifts_px"])
    true_shifts = np.asarray(stack.ground_truth["shifts_px"], dtype=float)
    true_shifts = true_shifts - true_shifts[ref]
    return {
        "reference_index": ref,
        "nominal_nm": stack.column("defocus_nominal_nm").tolist(),
        "readback_nm": stack.column("defocus_readback_nm").tolist(),
        "true_relative_nm": truth.tolist(),
        "fitted_relative_nm": fitted.tolist(),
        "defocus_rms_error_nm": float(np.sqrt(np.mean((fitted - truth) ** 2))),
        "drift_rms_error_px": float(np.sqrt(np.mean(np.sum((shifts - true_shifts) ** 2, 1)))),
        "absolute_defocus_error_nm": float(
            summary["defocus_nm"][ref] - stack.ground_truth["defocus_nm"][ref]
        ),
        "shifts_px": shifts.tolist(),
        "true_shifts_px": true_shifts.tolist(),
        "astigmatism_nm": float(summary["astigmatism_nm"]),
        "astigmatism_deg": float(summary["astigmatism_deg"]),
    }


def scan_comparison(stack: ImageStack, summary: dict[str, Any]) -> dict[str, Any]:
    """Measured against true frame shifts (both relative to their mean); ``summary`` is the
    ``align`` step summary."""
    shifts = np.asarray(summary["shifts_px"], dtype=float)
    truth = np.asarray(stack.ground_truth["shifts_px"], dtype=float)
    err = (shifts - shifts.mean(0)) - (truth - truth.mean(0))
    return {
        "shifts_px": shifts.tolist(),
        "true_shifts_px": truth.tolist(),
        "rms_error_px": float(np.sqrt(np.mean(np.sum(err**2, 1)))),
        "rotation_deg": stack.column("scan_rotation_deg").tolist(),
    }


def focal_table(focal: dict[str, Any]) -> str:
    """Markdown table of fitted against true relative defocus and drift."""
    lines = [
        "| image | nominal (nm) | read-back (nm) | true rel. (nm) | fitted rel. (nm) "
        "| drift (px) | true drift (px) |",
        "|---:|---:|---:|---:|---:|---|---|",
    ]
    for i, nominal in enumerate(focal["nominal_nm"]):
        s, t = focal["shifts_px"][i], focal["true_shifts_px"][i]
        lines.append(
            f"| {i} | {nominal:.1f} | {focal['readback_nm'][i]:.1f} | "
            f"{focal['true_relative_nm'][i]:+.2f} | {focal['fitted_relative_nm'][i]:+.2f} | "
            f"({s[0]:+.2f}, {s[1]:+.2f}) | ({t[0]:+.2f}, {t[1]:+.2f}) |"
        )
    return "\n".join(lines)


# --- the run ----------------------------------------------------------------------------------
def daemon_config(settings: DemoSettings) -> dict[str, Any]:
    """Settings of the embedded daemon: simulated instruments on free loopback ports."""
    return {
        "devices": {
            "kind": "sim",
            "specimen": "crystal_edge",
            "camera_shape": [settings.focal_size_px, settings.focal_size_px],
            "speedup": settings.speedup,
            "seed": settings.seed,
            "drift_nm_per_s": [0.015, -0.01],
            "probe_current_pA": 200.0,
        },
        "server": {"heartbeat_s": 1.0},
        "logging": {"console": "json"},
    }


def plans(settings: DemoSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    focal = {
        "kind": "focal_series",
        "name": "demo_focal",
        "sample": "crystal edge under an amorphous film (simulated)",
        "n_images": settings.focal_images,
        "start_nm": -100.0,
        "step_nm": 10.0,
        "exposure_s": 0.5,
        "settle_s": 0.2,
    }
    scan = {
        "kind": "rotated_scan",
        "name": "demo_scan",
        "sample": "crystal edge under an amorphous film (simulated)",
        "n_frames": settings.scan_frames,
        "size_px": [settings.scan_size_px, settings.scan_size_px],
        "dwell_us": 2.0,
        "base_rotation_deg": 10.0,
        "rotation_mode": "orthogonal-pairs",
        "signals": ["HAADF", "ABF"],
    }
    return focal, scan


class _Bars:
    """Progress of one job on ``out``: a tqdm bar on a terminal; elsewhere (a log, a pipe) one
    plain line per change of state, so logs stay readable."""

    def __init__(self, out: TextIO, label: str, total: int) -> None:
        from tqdm import tqdm

        self.out, self.label, self.state = out, label, "queued"
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.bar = tqdm(
            total=max(total, 1), desc=f"  {label}", unit="frame", file=out, disable=not self.tty
        )

    def __call__(self, event: Any) -> None:
        d = event.data
        if event.topic == "progress":
            self.bar.n = int(d["frames_done"])
            self.bar.refresh()
            self._state("running" if self.state == "queued" else self.state)
        elif event.topic == "job":
            self.bar.n = int(d["job"].get("frames_done", self.bar.n))
            self._state(d["job"]["state"])

    def _state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        self.bar.set_postfix_str(state)
        if not self.tty:
            print(f"  {self.label:<14} {state} ({self.bar.n}/{self.bar.total} frames)",
                  file=self.out, flush=True)  # fmt: skip

    def close(self, final: Any) -> None:
        self.bar.n = int(final.frames_done)
        self._state(final.state)
        self.bar.close()


def _wait(client: Any, job: Any, label: str, settings: DemoSettings, out: TextIO) -> Any:
    bars = _Bars(out, label, job.frames_total)
    final = client.wait(job.job_id, timeout_s=settings.timeout_s, on_event=bars)
    bars.close(final)
    return final


def _seconds(job: Any) -> float:
    return float((job.finished_s or 0.0) - (job.started_s or 0.0))


def _job_result(
    job: Any, step: str, compare: Callable[[ImageStack, dict[str, Any]], dict[str, Any]],
    stack_name: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A finished demo job's file, state and times, and its ``step`` result against the truth
    (measured on the stack ``stack_name``; None: the first)."""
    out: dict[str, Any] = {"file": job.output_file, "state": job.state, "seconds": _seconds(job)}
    if job.state != "done":
        out["error"] = job.error.message if job.error else "?"
        return out
    summary = sio.read_processing_summary(job.output_file, step)
    out.update(compare(sio.read_stack(job.output_file, stack_name), summary))
    out["process_seconds"] = float(summary["seconds"])
    return out


def _demo_section(focal: dict[str, Any], scan: dict[str, Any]) -> str:
    parts = ["## Demo: fitted against the simulator's truth\n"]
    if "fitted_relative_nm" in focal:
        parts += [
            f"Focal series: reference image {focal['reference_index']}; relative defocus RMS "
            f"error {focal['defocus_rms_error_nm']:.3f} nm; drift RMS error "
            f"{focal['drift_rms_error_px']:.3f} px; absolute defocus error "
            f"{focal['absolute_defocus_error_nm']:+.2f} nm; A1 {focal['astigmatism_nm']:.2f} nm "
            f"at {focal['astigmatism_deg']:.1f}°.\n",
            focal_table(focal),
            "",
        ]
    else:
        parts.append(f"Focal series {focal['state']}: {focal.get('error')}\n")
    if "rms_error_px" in scan:
        parts.append(
            f"Rotated-scan series (rotations {scan['rotation_deg']}): shift RMS error against "
            f"truth {scan['rms_error_px']:.3f} px (HAADF measured, ABF carries the same shifts)."
        )
    else:
        parts.append(f"Rotated-scan series {scan['state']}: {scan.get('error')}")
    return "\n".join(parts) + "\n"


def _summary_lines(focal: dict[str, Any], scan: dict[str, Any]) -> list[str]:
    lines = ["", "| series | outcome | fitted vs truth | time (s) |", "|---|---|---|---:|"]
    if "fitted_relative_nm" in focal:
        quality = (f"defocus RMS {focal['defocus_rms_error_nm']:.2f} nm, drift RMS "
                   f"{focal['drift_rms_error_px']:.2f} px")  # fmt: skip
    else:
        quality = focal.get("error", "")
    lines.append(f"| focal series | {focal['state']} | {quality} | {focal['seconds']:.1f} |")
    if "rms_error_px" in scan:
        quality = f"drift RMS {scan['rms_error_px']:.2f} px"
    else:
        quality = scan.get("error", "")
    lines.append(f"| rotated scan | {scan['state']} | {quality} | {scan['seconds']:.1f} |")
    return lines


def _raise_on_sigterm() -> Any:
    """SIGTERM becomes KeyboardInterrupt so the daemon is stopped by the ``with`` block."""

    def handler(*_: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def run_demo(settings: DemoSettings = DemoSettings(), out: TextIO | None = None) -> dict[str, Any]:
    """Run both series through an embedded daemon, print the summary, return it (JSON-able).
    ``summary["ok"]`` is True when both series were acquired and processed."""
    from scherzer.clients.client import LocalDaemon

    out = out or sys.stdout
    t0 = time.perf_counter()
    previous = _raise_on_sigterm()
    directory = Path(settings.out_dir).resolve()
    print(f"Scherzer demo — daemon, files and report under {directory}/", file=out)
    try:
        with LocalDaemon(daemon_config(settings), directory) as daemon:
            with daemon.client(timeout_s=30.0) as client:
                print(f"  daemon on {daemon.endpoint} (simulated instruments)", file=out)
                focal_plan, scan_plan = plans(settings)
                focal_job = client.submit(focal_plan)
                scan_job = client.submit(scan_plan)
                focal_final = _wait(client, focal_job, "focal series", settings, out)
                scan_final = _wait(client, scan_job, "rotated scan", settings, out)
                focal = _job_result(focal_final, "focal_register", focal_comparison)
                scan = _job_result(scan_final, "align", scan_comparison, "HAADF")
                report = client.report(
                    [focal_final.job_id, scan_final.job_id], title="Scherzer demo", name="demo"
                )
        report_path = Path(report.path)
        with report_path.open("a", encoding="utf-8") as f:
            f.write("\n" + _demo_section(focal, scan))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    ok = focal["state"] == "done" and scan["state"] == "done"
    summary = {
        "ok": ok,
        "focal_series": focal,
        "rotated_scan": scan,
        "report": str(report_path),
        "endpoint": daemon.endpoint,
        "events_endpoint": daemon.events_endpoint,
        "seconds": time.perf_counter() - t0,
    }
    if "fitted_relative_nm" in focal:
        print("\n" + focal_table(focal), file=out)
    print("\n".join(_summary_lines(focal, scan)), file=out)
    print(f"\nfiles:  {focal['file']}\n        {scan['file']}\nreport: {report_path}", file=out)
    print(f"demo took {summary['seconds']:.1f} s{'' if ok else ' — NOT all series done'}",
          file=out)  # fmt: skip
    return summary
