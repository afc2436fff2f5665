"""The ``scherzer`` command: thin — parses, calls, prints.

Every subcommand is registered by a small ``add_<name>(subparsers)`` function listed in
:data:`COMMANDS`; to add one (``simulate``, ``align``, ``restore``, ``info``, ``demo`` …) write
such a function that sets ``func`` (``args -> (exit_code, result_dict, text)``) and add it to the
list. Every command accepts ``--json`` (exactly one JSON object on stdout) and ``--help``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["COMMANDS", "build_parser", "main"]

Outcome = tuple[int, dict[str, Any], str]


# --- shared options ---------------------------------------------------------------------------
def _output_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    return p


def _client_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--endpoint", default=None, help="daemon request endpoint "
                   "(default: $SCHERZER_SERVER__ENDPOINT or tcp://127.0.0.1:5577)")  # fmt: skip
    g.add_argument("--events", default=None, help="daemon events endpoint (default: port + 1)")
    g.add_argument("--timeout", type=float, default=5.0, help="seconds per request (default 5)")
    g.add_argument("--key", default=None, help="CURVE: your .key_secret file")
    g.add_argument("--server-key", default=None, help="CURVE: the daemon's public .key file")
    return p


def _client(args: argparse.Namespace) -> Any:
    import os

    from scherzer.clients.client import DEFAULT_ENDPOINT, Client

    endpoint = args.endpoint or os.environ.get("SCHERZER_SERVER__ENDPOINT", DEFAULT_ENDPOINT)
    events = args.events or os.environ.get("SCHERZER_SERVER__EVENTS_ENDPOINT")
    return Client(
        endpoint,
        events_endpoint=events,
        timeout_s=args.timeout,
        client_key=args.key,
        server_key=args.server_key,
    )


def _job_line(job: Any) -> str:
    where = f" pos {job.queue_position}" if job.queue_position is not None else ""
    err = f"  [{job.error.code}: {job.error.message}]" if job.error else ""
    return (
        f"{job.job_id:>6}  {job.state:<11} {job.kind:<14} {job.frames_done}/{job.frames_total}"
        f"  {job.submitter}{where}  {job.output_file or ''}{err}"
    )


# --- daemon -----------------------------------------------------------------------------------
def _run_daemon(args: argparse.Namespace) -> Outcome:
    from scherzer.config import load_settings
    from scherzer.daemon.server import run_daemon

    settings = load_settings(args.config)
    code = run_daemon(settings)
    return code, {"exit_code": code}, "daemon stopped"


def add_daemon(sub: Any) -> None:
    p = sub.add_parser(
        "daemon",
        help="run the daemon (simulated instruments by default)",
        parents=[_output_options()],
        description="Run the Scherzer daemon until SIGTERM/SIGINT (stops at a frame boundary).",
    )
    p.add_argument("--config", default=None, help="TOML settings file (env SCHERZER_… overrides)")
    p.set_defaults(func=_run_daemon, long_running=True)


# --- status / jobs ----------------------------------------------------------------------------
def _status(args: argparse.Namespace) -> Outcome:
    with _client(args) as c:
        s = c.status()
    text = (
        f"scherzer {s.version} (protocol {s.protocol})  state {s.state}"
        f"{'  queue PAUSED' if s.queue_paused else ''}\n"
        f"current job: {s.current_job if s.current_job is not None else '-'}  queued: {s.queued}"
        f"  you: {s.user} ({s.role})\ndevices: "
        + ", ".join(f"{k}={v}" for k, v in s.devices.items())
    )
    return 0, s.model_dump(mode="json"), text


def add_status(sub: Any) -> None:
    p = sub.add_parser(
        "status", help="daemon state", parents=[_output_options(), _client_options()]
    )
    p.set_defaults(func=_status)


def _jobs(args: argparse.Namespace) -> Outcome:
    with _client(args) as c:
        if args.history:
            jobs, paused = c.history(limit=args.limit), None
        else:
            q = c.queue()
            jobs, paused = q.jobs, q.paused
            active = c.status().current_job
            if active is not None:
                jobs = [c.job(active), *jobs]
    lines = [_job_line(j) for j in jobs] or ["(no jobs)"]
    if paused:
        lines.insert(0, "queue PAUSED")
    result = {"jobs": [j.model_dump(mode="json") for j in jobs], "paused": paused}
    return 0, result, "\n".join(lines)


def add_jobs(sub: Any) -> None:
    p = sub.add_parser(
        "jobs",
        help="the running job and the queue (or --history)",
        parents=[_output_options(), _client_options()],
    )
    p.add_argument("--history", action="store_true", help="all jobs, newest first")
    p.add_argument("--limit", type=int, default=50, help="with --history: how many")
    p.set_defaults(func=_jobs)


def _cancel(args: argparse.Namespace) -> Outcome:
    with _client(args) as c:
        job = c.cancel(args.job_id)
    note = " (stops at the next frame boundary)" if job.state not in ("cancelled",) else ""
    return 0, {"job": job.model_dump(mode="json")}, _job_line(job) + note


def add_cancel(sub: Any) -> None:
    p = sub.add_parser(
        "cancel", help="cancel a job", parents=[_output_options(), _client_options()]
    )
    p.add_argument("job_id", type=int)
    p.set_defaults(func=_cancel)


def _queue_switch(pause: bool) -> Callable[[argparse.Namespace], Outcome]:
    def run(args: argparse.Namespace) -> Outcome:
        with _client(args) as c:
            paused = c.pause() if pause else c.resume()
        return 0, {"paused": paused}, "queue paused" if paused else "queue running"

    return run


def add_pause(sub: Any) -> None:
    p = sub.add_parser(
        "pause",
        help="hold the queue; the running job pauses at its next frame boundary",
        parents=[_output_options(), _client_options()],
    )
    p.set_defaults(func=_queue_switch(True))


def add_resume(sub: Any) -> None:
    p = sub.add_parser(
        "resume", help="resume the queue", parents=[_output_options(), _client_options()]
    )
    p.set_defaults(func=_queue_switch(False))


def _wait(args: argparse.Namespace) -> Outcome:
    def show(event: Any) -> None:
        if not args.json and event.topic == "progress":
            d = event.data
            print(f"\rjob {d['job_id']}: {d['frames_done']}/{d['frames_total']} frames", end="",
                  file=sys.stderr, flush=True)  # fmt: skip

    with _client(args) as c:
        job = c.wait(args.job_id, timeout_s=args.wait_timeout, on_event=show)
    code = 0 if job.state == "done" else 1
    return code, {"job": job.model_dump(mode="json")}, _job_line(job)


def add_wait(sub: Any) -> None:
    p = sub.add_parser(
        "wait",
        help="wait until a job is finished (exit 0 if done, 1 otherwise)",
        parents=[_output_options(), _client_options()],
    )
    p.add_argument("job_id", type=int)
    p.add_argument("--wait-timeout", type=float, default=None, help="give up after seconds")
    p.set_defaults(func=_wait)


# --- plans: focal-series / rotated-scan / time-series / submit ---------------------------------
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
            g.add_argument(flag, dest=f"plan__{key}", default=None, metavar="VALUE",
                           type=_plan_type(f.annotation), help=help_text)  # fmt: skip


def _default_text(f: Any) -> str:
    value = f.default_factory() if f.default_factory is not None else f.default
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    return json.dumps(value, default=str)


def _plan_type(annotation: Any) -> Callable[[str], Any]:
    return lambda text: _plan_value(text, annotation)


def _plan_from_args(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    plan: dict[str, Any] = {"kind": kind}
    for key, value in vars(args).items():
        if key.startswith("plan__") and value is not None:
            plan[key[len("plan__") :]] = value
    if args.not_before:
        plan["not_before_s"] = _when(args.not_before)
    return plan


def _when(text: str) -> float:
    """Unix seconds from ISO 8601 local time (2026-11-21T22:00) or a number."""
    import datetime as dt

    try:
        return float(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise SystemExit(f"--not-before: expected ISO time or Unix seconds, got {text!r}") from None


class _ProgressBar:
    """One progress line on stderr per job (frames, then processing states)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, event: Any) -> None:
        if not self.enabled:
            return
        d = event.data
        if event.topic == "progress":
            n, total = d["frames_done"], max(d["frames_total"], 1)
            bar = "#" * int(24 * n / total) + "." * (24 - int(24 * n / total))
            line = f"job {d['job_id']}: [{bar}] {n}/{total} frames"
        elif event.topic == "job":
            job = d["job"]
            line = f"job {job['job_id']}: {job['state']:<40}"
        else:
            return
        print(f"\r{line}", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def _submit_plan(kind: str) -> Callable[[argparse.Namespace], Outcome]:
    def run(args: argparse.Namespace) -> Outcome:
        plan = _plan_from_args(args, kind)
        with _client(args) as c:
            if args.validate_only:
                res = c.plan_validate(plan)
                est = res.estimate
                lines = ["valid" if res.valid else "refused", *res.problems]
                if est is not None:
                    lines.append(
                        f"{est.frames} frames, {est.duration_s:.1f} s, "
                        f"{est.disk_bytes / 1e6:.1f} MB, dose {est.dose_e_per_A2} e/Å²"
                    )
                text = "\n".join(lines)
                return (0 if res.valid else 1), res.model_dump(mode="json"), text
            job = c.submit(plan)
            if not args.wait:
                return 0, {"job": job.model_dump(mode="json")}, _job_line(job)
            bar = _ProgressBar(not args.json)
            job = c.wait(job.job_id, timeout_s=args.wait_timeout, on_event=bar)
            bar.done()
        code = 0 if job.state == "done" else 1
        return code, {"job": job.model_dump(mode="json")}, _job_line(job)

    return run


def _plan_command(name: str, kind: str, help_text: str) -> Callable[[Any], None]:
    def add(sub: Any) -> None:
        from scherzer.daemon.plans import PLAN_MODELS

        model = next(m for m in PLAN_MODELS if m.kind_name() == kind)
        p = sub.add_parser(
            name,
            help=help_text,
            parents=[_output_options(), _client_options()],
            description=(model.__doc__ or help_text).strip(),
        )
        _add_plan_options(p, model)
        p.add_argument("--wait", action="store_true", help="show progress until the job ends")
        p.add_argument("--wait-timeout", type=float, default=None, help="with --wait: seconds")
        p.add_argument("--not-before", default=None, help="start no earlier (ISO time or Unix s)")
        p.add_argument("--validate-only", action="store_true",
                       help="only check the plan: limits, duration, dose, disk")  # fmt: skip
        p.set_defaults(func=_submit_plan(kind))

    return add


add_focal_series = _plan_command("focal-series", "focal_series", "submit a focal series")
add_rotated_scan = _plan_command("rotated-scan", "rotated_scan", "submit a rotated-scan series")
add_time_series = _plan_command("time-series", "time_series", "submit a time series")


def _submit(args: argparse.Namespace) -> Outcome:
    from scherzer.daemon.runs import expand_runs, load_runs, preflight, run_batch

    runs = load_runs(args.runs)
    with _client(args) as c:
        if args.dry_run:
            pf = preflight(c, expand_runs(runs))
            return (0 if pf.ok else 1), {"preflight": pf.to_json()}, pf.text()
        bar = _ProgressBar(not args.json and args.wait)
        out = run_batch(c, runs, wait=args.wait, timeout_s=args.wait_timeout, on_event=bar)
        bar.done()
    from scherzer.daemon.runs import Preflight

    pf = Preflight(**{k: v for k, v in out["preflight"].items() if k != "ok"})
    if not pf.ok:
        return 1, out, pf.text() + "\nnothing was submitted"
    lines = [pf.text()]
    lines += [_job_line(job) for job in _jobs_of(out)]
    if out["report"]:
        lines.append(f"report: {out['report']}")
    states = {j["state"] for j in out["jobs"]}
    code = 0 if not args.wait or states <= {"done"} else 1
    return code, out, "\n".join(lines)


def _jobs_of(out: dict[str, Any]) -> list[Any]:
    from scherzer.daemon.protocol import JobInfo

    return [JobInfo.model_validate(j) for j in out["jobs"]]


def add_submit(sub: Any) -> None:
    p = sub.add_parser(
        "submit",
        help="queue a runs.toml batch (preflight, repeats, not-before times, report)",
        parents=[_output_options(), _client_options()],
        description=(
            "Queue every plan of a runs.toml file after a preflight of total time, dose and "
            "disk (see scherzer/daemon/runs.py for the format). With --wait (default) it waits "
            "for every job and has the daemon write a summary report in its data directory."
        ),
    )
    p.add_argument("runs", type=Path, help="the runs.toml file")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="submit and return")
    p.add_argument("--wait-timeout", type=float, default=None, help="give up after seconds")
    p.add_argument("--dry-run", action="store_true", help="preflight only; submit nothing")
    p.set_defaults(func=_submit, wait=True)


# --- keys -------------------------------------------------------------------------------------
def _keys_new(args: argparse.Namespace) -> Outcome:
    from scherzer.daemon.security import new_keypair

    public, secret = new_keypair(args.name, args.dir)
    key = public.read_text().split('public-key = "')[1].split('"')[0]
    text = (
        f"public key: {public}\nsecret key: {secret} (keep it private)\n"
        f'allow it in the daemon config:\n[[security.clients]]\nname = "{args.name}"\n'
        f'role = "operator"  # or "observer"\npublic_key = "{key}"'
    )
    return (
        0,
        {"public_key_file": str(public), "secret_key_file": str(secret), "public_key": key},
        text,
    )


def add_keys(sub: Any) -> None:
    p = sub.add_parser("keys", help="CURVE key pairs", parents=[_output_options()])
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="{new}")
    n = ksub.add_parser(
        "new", help="make a key pair NAME.key / NAME.key_secret", parents=[_output_options()]
    )
    n.add_argument("name", help="who the key is for (e.g. alice, server)")
    n.add_argument("--dir", default="~/.scherzer/keys", help="directory (default ~/.scherzer/keys)")
    n.set_defaults(func=_keys_new)


# --- offline processing and simulation ----------------------------------------------------------
def _ints(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"expected comma-separated integers, got {text!r}") from None


def _box(text: str | None) -> tuple[int, int, int, int] | None:
    if text is None:
        return None
    values = _ints(text)
    if len(values) != 4:
        raise SystemExit(f"a region is y0,x0,height,width; got {text!r}")
    return values  # type: ignore[return-value]


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"{what}: expected {n} comma-separated numbers, got {text!r}") from None
    if len(values) != n:
        raise SystemExit(f"{what}: expected {n} comma-separated numbers, got {text!r}")
    return values


def _simulate_focal(args: argparse.Namespace) -> Outcome:
    from scherzer import emd
    from scherzer.simulators.hrtem import default_hrtem_optics, simulate_focal_series

    given = {
        k: getattr(args, k)
        for k in ("voltage_kv", "cs_mm", "focal_spread_nm", "beam_divergence_mrad")
        if getattr(args, k) is not None
    }
    optics = default_hrtem_optics().with_(**given)
    stack = simulate_focal_series(
        args.specimen,
        n=args.n,
        start_nm=args.start_nm,
        step_nm=args.step_nm,
        step_error_fraction=args.step_error,
        optics=optics,
        a1_nm=args.a1_nm,
        a1_deg=args.a1_deg,
        dose_e_per_A2=args.dose,
        drift_px_per_frame=_floats(args.drift_px, 2, "--drift-px"),
        size=args.size,
        pixel_nm=args.pixel_nm,
        seed=args.seed,
    )
    emd.write_stack(args.out, stack, name="frames")
    result = {"out": str(args.out), "frames": stack.n_frames, "shape": list(stack.frame_shape)}
    return 0, result, f"wrote {stack.n_frames} frames {stack.frame_shape} to {args.out}"


def _simulate_scan(args: argparse.Namespace) -> Outcome:
    from scherzer import emd
    from scherzer.simulators.stem import simulate_rotated_scan

    stacks = simulate_rotated_scan(
        args.specimen,
        n_frames=args.n,
        rotation_mode=args.rotation_mode,
        base_rotation_deg=args.base_rotation_deg,
        size=args.size,
        pixel_nm=args.pixel_nm,
        dwell_us=args.dwell_us,
        flyback_us=args.flyback_us,
        signals=tuple(s.strip() for s in args.signals.split(",") if s.strip()),
        drift_nm_per_s=_floats(args.drift_nm_per_s, 2, "--drift-nm-per-s"),
        seed=args.seed,
    )
    for i, (name, stack) in enumerate(stacks.items()):
        emd.write_stack(args.out, stack, name=name, mode="w" if i == 0 else "a")
    first = next(iter(stacks.values()))
    result = {"out": str(args.out), "signals": list(stacks), "frames": first.n_frames}
    return 0, result, f"wrote {first.n_frames} frames of {', '.join(stacks)} to {args.out}"


def add_simulate(sub: Any) -> None:
    p = sub.add_parser(
        "simulate", help="simulate a series offline into an EMD file", parents=[_output_options()]
    )
    ssub = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    f = ssub.add_parser(
        "focal-series", help="HRTEM focal series with ground truth", parents=[_output_options()]
    )
    f.add_argument("--specimen", default="crystal_edge")
    f.add_argument("--n", type=int, default=11, help="number of images")
    f.add_argument("--start-nm", type=float, default=-100.0)
    f.add_argument("--step-nm", type=float, default=10.0)
    f.add_argument("--step-error", type=float, default=0.0, help="true step = (1+e)·nominal")
    f.add_argument("--voltage-kv", type=float, default=None)
    f.add_argument("--cs-mm", type=float, default=None)
    f.add_argument("--focal-spread-nm", type=float, default=None, help="standard deviation")
    f.add_argument("--beam-divergence-mrad", type=float, default=None, help="1/e semi-angle")
    f.add_argument("--a1-nm", type=float, default=0.0)
    f.add_argument("--a1-deg", type=float, default=0.0)
    f.add_argument("--dose", type=float, default=500.0, help="e/Å² per image")
    f.add_argument("--drift-px", default="0.7,-0.4", help="dy,dx per frame")
    f.add_argument("--size", type=int, default=256)
    f.add_argument("--pixel-nm", type=float, default=0.02)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", type=Path, required=True)
    f.set_defaults(func=_simulate_focal)
    r = ssub.add_parser(
        "rotated-scan",
        help="STEM rotated-scan series with ground truth",
        parents=[_output_options()],
    )
    r.add_argument("--specimen", default="srtio3_001")
    r.add_argument("--n", type=int, default=8, help="number of frames")
    r.add_argument(
        "--rotation-mode", default="orthogonal-pairs",
        choices=["none", "orthogonal-pairs", "orthogonal-sets"],
    )  # fmt: skip
    r.add_argument("--base-rotation-deg", type=float, default=0.0)
    r.add_argument("--dwell-us", type=float, default=2.0)
    r.add_argument("--flyback-us", type=float, default=100.0)
    r.add_argument("--signals", default="HAADF,ABF")
    r.add_argument("--drift-nm-per-s", default="0.05,-0.03", help="dy,dx")
    r.add_argument("--size", type=int, default=256)
    r.add_argument("--pixel-nm", type=float, default=0.02)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", type=Path, required=True)
    r.set_defaults(func=_simulate_scan)


def _process(args: argparse.Namespace, steps: list[Any], signal: Any = None) -> Outcome:
    """Import FILE, run the pipeline, write OUT (input frames + results)."""
    import time

    from scherzer import emd
    from scherzer.processing.pipeline import run_pipeline

    t0 = time.perf_counter()
    stacks = emd.import_stacks(args.file)
    named = {}
    for i, s in enumerate(stacks):
        name = s.signal if s.signal and s.signal not in named else f"signal{i}"
        named[name] = s
    if signal is not None:
        if signal not in named:
            raise SystemExit(f"no signal {signal!r} in {args.file}; have {sorted(named)}")
        named = {signal: named[signal], **{k: v for k, v in named.items() if k != signal}}
    result = run_pipeline(named, steps, plot_dir=args.plot)
    for i, (name, stack) in enumerate(named.items()):
        emd.write_stack(args.out, stack, name=name, mode="w" if i == 0 else "a")
    emd.store_pipeline_result(args.out, result)
    seconds = time.perf_counter() - t0
    return 0, {"seconds": seconds, **result.summary()}, f"wrote {args.out}"


def _align(args: argparse.Namespace) -> Outcome:
    reference: Any = args.reference if args.reference == "mean" else int(args.reference)
    params = {
        "alpha": args.alpha,
        "neighbours": args.neighbours,
        "refine": args.refine,
        "roi": _box(args.roi),
        "reference": reference,
        "output": "expand" if args.expand else "crop",
    }
    code, result, text = _process(args, [{"step": "align", **params}], args.signal)
    a = result["align"]
    out = {k: a[k] for k in ("shifts_px", "peak_heights", "reference", "flagged")}
    out["seconds"] = result["seconds"]
    pairs = zip(a["shifts_px"], a["peak_heights"], strict=True)
    lines = [
        f"frame {i:3d}: dy {s[0]:+8.3f}  dx {s[1]:+8.3f} px  peak {p:.3f}"
        for i, (s, p) in enumerate(pairs)
    ]
    return code, out, "\n".join([*lines, text])


def add_align(sub: Any) -> None:
    p = sub.add_parser(
        "align", help="rigid alignment of any readable stack", parents=[_output_options()]
    )
    p.add_argument("file", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--alpha", type=float, default=0.5, help="0 cross, 0.5 mutual, 1 phase")
    p.add_argument("--neighbours", type=int, default=4)
    p.add_argument("--refine", type=int, default=2, help="refinement passes")
    p.add_argument("--roi", default=None, help="y0,x0,height,width measured region")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--crop", action="store_true", help="crop to the common area (default)")
    g.add_argument("--expand", action="store_true", help="expanded canvas")
    p.add_argument("--reference", default="mean", help="mean or a frame index")
    p.add_argument("--signal", default=None, help="signal to measure on (multi-signal files)")
    p.add_argument("--plot", type=Path, default=None, help="directory for PNG plots")
    p.set_defaults(func=_align)


def _restore(args: argparse.Namespace) -> Outcome:
    overrides = {
        k: getattr(args, k)
        for k in ("voltage_kv", "cs_mm", "focal_spread_nm", "beam_divergence_mrad",
                  "pixel_nm", "start_nm", "step_nm")
        if getattr(args, k) is not None
    }  # fmt: skip
    register: dict[str, Any] = {"step": "focal_register", **overrides}
    if args.reference is not None:
        register["reference"] = args.reference
    if args.crystal:
        register["crystal"] = True
    if args.thickness_nm is not None:
        register["thickness_nm"] = args.thickness_nm
    if args.exclude:
        register["exclude"] = _ints(args.exclude)
    if args.area:
        register["area"] = _box(args.area)
    for k in ("mtf", "nps"):
        if getattr(args, k) is not None:
            register[k] = str(getattr(args, k))
    restore: dict[str, Any] = {"step": "restore", **overrides, "iterations": args.iterations}
    if args.area:
        restore["area"] = _box(args.area)
    code, result, text = _process(args, [register, restore])
    reg = result["focal_register"]
    keys = ("reference_index", "defocus_nm", "relative_defocus_nm", "shifts_px",
            "peak_heights", "astigmatism_nm", "astigmatism_deg")  # fmt: skip
    out = {k: reg[k] for k in keys}
    out["seconds"] = result["seconds"]
    lines = [
        f"image {i:3d}: c1 {d:8.2f} nm, drift ({s[0]:+.2f}, {s[1]:+.2f}) px, peak {p:.3f}"
        for i, (d, s, p) in enumerate(
            zip(reg["defocus_nm"], reg["shifts_px"], reg["peak_heights"], strict=True)
        )
    ]
    lines.append(f"A1 {reg['astigmatism_nm']:.2f} nm at {reg['astigmatism_deg']:.1f}°")
    return code, out, "\n".join([*lines, text])


def add_restore(sub: Any) -> None:
    p = sub.add_parser(
        "restore",
        help="focal-series registration + exit-wave restoration",
        parents=[_output_options()],
    )
    p.add_argument("file", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reference", type=int, default=None, help="reference image index")
    p.add_argument("--exclude", default=None, help="image indices to leave out, e.g. 3,7")
    p.add_argument("--area", default=None, help="y0,x0,height,width restored region")
    p.add_argument("--mtf", type=Path, default=None, help="camera MTF file (.npy or text)")
    p.add_argument("--nps", type=Path, default=None, help="camera NPS file (.npy or text)")
    p.add_argument("--iterations", type=int, default=0, help="non-linear refinement steps")
    p.add_argument("--crystal", action="store_true", help="crystal-only field (no amorphous area)")
    p.add_argument(
        "--thickness-nm", type=float, default=None,
        help="specimen thickness: absolute defocus refers to the exit surface",
    )  # fmt: skip
    p.add_argument("--plot", type=Path, default=None, help="directory for PNG plots")
    g = p.add_argument_group("instrument (when the file does not record it)")
    for name, unit in (("voltage-kv", "kV"), ("cs-mm", "mm"), ("focal-spread-nm", "nm, std"),
                       ("beam-divergence-mrad", "mrad, 1/e"), ("pixel-nm", "nm"),
                       ("start-nm", "nm"), ("step-nm", "nm")):  # fmt: skip
        g.add_argument(f"--{name}", type=float, default=None, help=unit)
    p.set_defaults(func=_restore)


def _info(args: argparse.Namespace) -> Outcome:
    from scherzer import emd

    summary = emd.describe(args.file)
    return 0, summary, json.dumps(summary, indent=2, default=str)


def add_info(sub: Any) -> None:
    p = sub.add_parser("info", help="what a file holds", parents=[_output_options()])
    p.add_argument("file", type=Path)
    p.set_defaults(func=_info)


def _demo(args: argparse.Namespace) -> Outcome:
    from scherzer.demo import DemoSettings, run_demo

    sizes = {"focal_size_px": args.size, "scan_size_px": args.size} if args.size else {}
    settings = DemoSettings(
        out_dir=args.out,
        **sizes,
        focal_images=args.images,
        scan_frames=args.frames,
        speedup=args.speedup,
    )
    summary = run_demo(settings, out=sys.stderr if args.json else sys.stdout)
    return (0 if summary["ok"] else 1), summary, ""


def add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="the main job on the built-in simulators", parents=[_output_options()]
    )
    p.add_argument("--out", type=Path, default=Path("scherzer-demo"))
    p.add_argument(
        "--size", type=int, default=None, help="image size in pixels (default 512 focal, 256 scan)"
    )
    p.add_argument("--images", type=int, default=11, help="focal-series images")
    p.add_argument("--frames", type=int, default=8, help="scan frames")
    p.add_argument("--speedup", type=float, default=20.0, help="simulated time runs faster")
    p.set_defaults(func=_demo)


# --- assembly ---------------------------------------------------------------------------------
#: Subcommand registrars, in help order. Add new commands here.
COMMANDS: list[Callable[[Any], None]] = [
    add_daemon,
    add_status,
    add_jobs,
    add_cancel,
    add_pause,
    add_resume,
    add_wait,
    add_focal_series,
    add_rotated_scan,
    add_time_series,
    add_submit,
    add_keys,
    add_simulate,
    add_align,
    add_restore,
    add_info,
    add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    from scherzer import __version__

    parser = argparse.ArgumentParser(
        prog="scherzer", description="Scherzer: TEM/STEM control daemon, simulators, processing."
    )
    parser.add_argument("--version", action="version", version=f"scherzer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def _emit(args: argparse.Namespace, code: int, result: dict[str, Any], text: str) -> int:
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
    elif text:
        print(text)
    return code


def main(argv: list[str] | None = None) -> int:
    from scherzer.clients.client import DaemonError
    from scherzer.config import ConfigError
    from scherzer.drivers.base import DeviceError

    args = build_parser().parse_args(argv)
    try:
        code, result, text = args.func(args)
    except DaemonError as exc:
        result = {"error": {"code": exc.code, "message": exc.message, "details": exc.details}}
        if not args.json:
            print(f"error: {exc}", file=sys.stderr)
        return _emit(args, 2, result, "") if args.json else 2
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError, DeviceError) as exc:
        code = getattr(exc, "code", "bad_input")
        result = {"error": {"code": code, "message": str(exc)}}
        if not args.json:
            print(f"error: {exc}", file=sys.stderr)
        return _emit(args, 2, result, "") if args.json else 2
    except KeyboardInterrupt:
        return 130
    return _emit(args, code, result, text)


if __name__ == "__main__":
    sys.exit(main())
