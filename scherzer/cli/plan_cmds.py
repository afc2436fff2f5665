"""Commands that queue plans: ``focal-series``, ``rotated-scan``, ``time-series`` (one flag per
plan field, generated from the plan's pydantic model) and ``submit`` (a runs.toml batch)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from scherzer.cli.common import (
    Command,
    JobProgress,
    Outcome,
    client,
    client_options,
    job_line,
    output_options,
    positive_float,
    progress_enabled,
    when,
)

__all__ = [
    "add_eftem_series",
    "add_focal_series",
    "add_rotated_scan",
    "add_submit",
    "add_time_series",
]


def _plan_value(text: str, annotation: Any) -> Any:
    """A command-line value: JSON when it parses, comma lists for list/tuple fields, else text."""
    if annotation is str:
        return text
    kind = str(annotation)
    if ("list" in kind or "tuple" in kind) and not text.lstrip().startswith(("[", "{")):
        return [_plan_value(part.strip(), Any) for part in text.split(",") if part.strip()]
    try:
        return json.loads(text)
    except ValueError:
        return text


def _default_text(f: Any) -> str:
    value = f.default_factory() if f.default_factory is not None else f.default
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    return json.dumps(value, default=str)


def _add_plan_options(p: argparse.ArgumentParser, model: Any) -> None:
    g = p.add_argument_group(f"{model.kind_name()} plan (defaults in docs/protocol.md)")
    for name, f in model.model_fields.items():
        if name in ("kind", "not_before_s"):  # --not-before takes a time
            continue
        key = f.alias or name
        flag = "--" + key.replace("_", "-")
        default = "required" if f.is_required() else _default_text(f)
        help_text = f"{f.description or key} (default {default})"
        if f.annotation is bool:
            g.add_argument(flag, dest=f"plan__{key}", action=argparse.BooleanOptionalAction,
                           default=None, help=help_text)  # fmt: skip
        else:
            annotation = f.annotation
            g.add_argument(flag, dest=f"plan__{key}", default=None, metavar="VALUE",
                           type=lambda text, a=annotation: _plan_value(text, a),
                           help=help_text)  # fmt: skip


def _plan_from_args(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    plan: dict[str, Any] = {"kind": kind}
    for key, value in vars(args).items():
        if key.startswith("plan__") and value is not None:
            plan[key[len("plan__") :]] = value
    if args.not_before is not None:
        plan["not_before_s"] = args.not_before
    return plan


def _validate_only(c: Any, plan: dict[str, Any]) -> Outcome:
    res = c.plan_validate(plan)
    est = res.estimate
    lines = ["valid" if res.valid else "refused", *res.problems]
    if est is not None:
        lines.append(
            f"{est.frames} frames, {est.duration_s:.1f} s, "
            f"{est.disk_bytes / 1e6:.1f} MB, dose {est.dose_e_per_A2} e/Å²"
        )
    return (0 if res.valid else 1), res.model_dump(mode="json"), "\n".join(lines)


def _submit_plan(kind: str) -> Command:
    def run(args: argparse.Namespace) -> Outcome:
        plan = _plan_from_args(args, kind)
        with client(args) as c:
            if args.validate_only:
                return _validate_only(c, plan)
            job = c.submit(plan)
            if not args.wait:
                return 0, {"job": job.model_dump(mode="json")}, job_line(job)
            bar = JobProgress(progress_enabled(args))
            job = c.wait(job.job_id, timeout_s=args.wait_timeout, on_event=bar)
            bar.done()
        code = 0 if job.state == "done" else 1
        return code, {"job": job.model_dump(mode="json")}, job_line(job)

    return run


def _plan_command(name: str, kind: str, help_text: str) -> Any:
    def add(sub: Any) -> None:
        from scherzer.daemon.plans import PLAN_MODELS

        model = next(m for m in PLAN_MODELS if m.kind_name() == kind)
        p = sub.add_parser(
            name,
            help=help_text,
            parents=[output_options(), client_options()],
            description=(model.__doc__ or help_text).strip(),
        )
        _add_plan_options(p, model)
        p.add_argument("--wait", action="store_true", help="show progress until the job ends")
        p.add_argument("--wait-timeout", type=positive_float, default=None,
                       help="with --wait: give up after this many seconds")  # fmt: skip
        p.add_argument("--not-before", type=when, default=None,
                       help="start no earlier (ISO time or Unix seconds)")  # fmt: skip
        p.add_argument("--validate-only", action="store_true",
                       help="only check the plan: limits, duration, dose, disk")  # fmt: skip
        p.set_defaults(func=_submit_plan(kind))

    return add


add_focal_series = _plan_command("focal-series", "focal_series", "submit a focal series")
add_rotated_scan = _plan_command("rotated-scan", "rotated_scan", "submit a rotated-scan series")
add_time_series = _plan_command("time-series", "time_series", "submit a time series")
add_eftem_series = _plan_command(
    "eftem-series", "eftem_series", "submit an EFTEM series (automatic exposure)"
)


def _submit(args: argparse.Namespace) -> Outcome:
    from scherzer.daemon.protocol import JobInfo
    from scherzer.daemon.runs import Preflight, expand_runs, load_runs, preflight, run_batch

    runs = load_runs(args.runs)
    with client(args) as c:
        if args.dry_run:
            pf = preflight(c, expand_runs(runs))
            return (0 if pf.ok else 1), {"preflight": pf.to_json()}, pf.text()
        bar = JobProgress(progress_enabled(args) and args.wait)
        out = run_batch(c, runs, wait=args.wait, timeout_s=args.wait_timeout, on_event=bar)
        bar.done()
    pf = Preflight(**{k: v for k, v in out["preflight"].items() if k != "ok"})
    if not pf.ok:
        return 1, out, pf.text() + "\nnothing was submitted"
    lines = [pf.text()]
    lines += [job_line(JobInfo.model_validate(j)) for j in out["jobs"]]
    if out["report"]:
        lines.append(f"report: {out['report']}")
    states = {j["state"] for j in out["jobs"]}
    code = 0 if not args.wait or states <= {"done"} else 1
    return code, out, "\n".join(lines)


def add_submit(sub: Any) -> None:
    p = sub.add_parser(
        "submit",
        help="queue a runs.toml batch (preflight, repeats, not-before times, report)",
        parents=[output_options(), client_options()],
        description=(
            "Queue every plan of a runs.toml file after a preflight of total time, dose and "
            "disk (see scherzer/daemon/runs.py for the format). With --wait (default) it waits "
            "for every job and has the daemon write a summary report in its data directory."
        ),
    )
    p.add_argument("runs", type=Path, help="the runs.toml file")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="submit and return")
    p.add_argument("--wait-timeout", type=positive_float, default=None,
                   help="give up after this many seconds")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="preflight only; submit nothing")
    p.set_defaults(func=_submit, wait=True)
