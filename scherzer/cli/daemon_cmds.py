"""Commands that run or talk to the daemon: ``daemon``, ``status``, ``jobs``, ``cancel``,
``pause``, ``resume``, ``wait``, ``keys``."""

from __future__ import annotations

import argparse
import sys
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
    positive_int,
    progress_enabled,
)

__all__ = [
    "add_cancel",
    "add_daemon",
    "add_jobs",
    "add_keys",
    "add_pause",
    "add_resume",
    "add_status",
    "add_temscript_sim",
    "add_wait",
    "add_web",
]


def _run_daemon(args: argparse.Namespace) -> Outcome:
    from scherzer.config import load_settings
    from scherzer.daemon.server import run_daemon

    settings = load_settings(args.config)
    web = None
    if settings.web.enabled:  # the web view in the daemon's process, as a client of it
        from scherzer.web import start_web
        from scherzer.web.link import daemon_client_factory

        settings.web.check()
        web = start_web(settings.web, daemon_client_factory(settings, settings.web),
                        settings.data_path)  # fmt: skip
    try:
        code = run_daemon(settings)
    finally:
        if web is not None:
            web.stop()
    return code, {"exit_code": code}, "daemon stopped"


def _web(args: argparse.Namespace) -> Outcome:
    from scherzer.config import load_settings
    from scherzer.web import run_web
    from scherzer.web.link import daemon_client_factory

    settings = load_settings(args.config)
    given = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    web = settings.web.model_copy(update=given)
    web.check()
    scheme = "https" if web.tls_certfile else "http"
    print(f"web view on {scheme}://{web.host}:{web.port}; Ctrl-C stops it", file=sys.stderr,
          flush=True)  # fmt: skip
    run_web(web, daemon_client_factory(settings, web), settings.data_path)
    return 0, {"stopped": True}, "web view stopped"


def add_web(sub: Any) -> None:
    p = sub.add_parser(
        "web",
        help="serve the live web view of a running daemon (see docs/web.md)",
        parents=[output_options()],
        description="The queue, the current job, its frames, plots and reports in a browser; "
        "roles as the API's. Settings: the [web] section of the daemon's config.",
    )
    p.add_argument("--config", default=None, help="the daemon's TOML settings file")
    p.add_argument("--host", default=None, help="address to bind (default from [web]: 127.0.0.1)")
    p.add_argument("--port", type=positive_int, default=None, help="TCP port (default from [web])")
    p.set_defaults(func=_web, long_running=True)


def add_daemon(sub: Any) -> None:
    p = sub.add_parser(
        "daemon",
        help="run the daemon (simulated instruments by default)",
        parents=[output_options()],
        description="Run the Scherzer daemon until SIGTERM/SIGINT (stops at a frame boundary).",
    )
    p.add_argument("--config", default=None, help="TOML settings file (env SCHERZER_… overrides)")
    p.set_defaults(func=_run_daemon, long_running=True)


def _temscript_sim(args: argparse.Namespace) -> Outcome:
    from scherzer.drivers.temscript_sim import serve_simulated

    print(
        f"simulated TFS microscope (temscript server) on http://{args.host}:{args.port}; "
        "Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    serve_simulated(
        args.host,
        args.port,
        speedup=args.speedup,
        specimen=args.specimen,
        camera_shape=(args.camera_px, args.camera_px),
        seed=args.seed,
    )
    return 0, {"stopped": True}, "server stopped"


def add_temscript_sim(sub: Any) -> None:
    p = sub.add_parser(
        "temscript-sim",
        help="serve the simulated microscope through temscript's own HTTP server",
        parents=[output_options()],
        description=(
            "The virtual microscope behind temscript's MicroscopeServer, so a daemon with "
            "devices.kind = 'temscript' (or any temscript client) drives it over the real HTTP "
            "path. Loopback only. See docs/instruments.md."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=positive_int, default=8080, help="TCP port (default 8080)")
    p.add_argument("--specimen", default="crystal_edge", help="specimen (default crystal_edge)")
    p.add_argument("--camera-px", type=positive_int, default=512,
                   help="camera side in pixels (default 512)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--speedup", type=positive_float, default=1.0,
                   help="simulated time runs this many times faster (default 1)")  # fmt: skip
    p.set_defaults(func=_temscript_sim, long_running=True)


def _status(args: argparse.Namespace) -> Outcome:
    with client(args) as c:
        s = c.status()
    reason = s.queue_pause_reason or "by an operator"
    paused = f"  queue PAUSED ({reason})" if s.queue_paused else ""
    lines = [
        f"scherzer {s.version} (protocol {s.protocol})  state {s.state}{paused}",
        f"current job: {s.current_job if s.current_job is not None else '-'}  queued: {s.queued}"
        f"  you: {s.user} ({s.role})",
        "devices: " + ", ".join(f"{k}={v}" for k, v in s.devices.items()),
        *(f"PROBLEM: {p}" for p in s.problems),
    ]
    return (1 if s.state == "error" else 0), s.model_dump(mode="json"), "\n".join(lines)


def _connected(sub: Any, name: str, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help_text, parents=[output_options(), client_options()], **kwargs
    )


def add_status(sub: Any) -> None:
    _connected(sub, "status", "daemon state").set_defaults(func=_status)


def _jobs(args: argparse.Namespace) -> Outcome:
    with client(args) as c:
        if args.history:
            jobs, paused = c.history(limit=args.limit), None
        else:
            q = c.queue()
            jobs, paused = q.jobs, q.paused
            active = c.status().current_job
            if active is not None:
                jobs = [c.job(active), *jobs]
    lines = [job_line(j) for j in jobs] or ["(no jobs)"]
    if paused:
        lines.insert(0, "queue PAUSED")
    result = {"jobs": [j.model_dump(mode="json") for j in jobs], "paused": paused}
    return 0, result, "\n".join(lines)


def add_jobs(sub: Any) -> None:
    p = _connected(sub, "jobs", "the running job and the queue (or --history)")
    p.add_argument("--history", action="store_true", help="all jobs, newest first")
    p.add_argument("--limit", type=positive_int, default=50,
                   help="with --history: how many (default 50)")  # fmt: skip
    p.set_defaults(func=_jobs)


def _cancel(args: argparse.Namespace) -> Outcome:
    with client(args) as c:
        job = c.cancel(args.job_id)
    note = " (stops at the next frame boundary)" if job.state not in ("cancelled",) else ""
    return 0, {"job": job.model_dump(mode="json")}, job_line(job) + note


def add_cancel(sub: Any) -> None:
    p = _connected(sub, "cancel", "cancel a job")
    p.add_argument("job_id", type=positive_int, help="the job number")
    p.set_defaults(func=_cancel)


def _queue_switch(pause: bool) -> Command:
    def run(args: argparse.Namespace) -> Outcome:
        with client(args) as c:
            paused = c.pause() if pause else c.resume()
        return 0, {"paused": paused}, "queue paused" if paused else "queue running"

    return run


def add_pause(sub: Any) -> None:
    p = _connected(
        sub, "pause", "hold the queue; the running job pauses at its next frame boundary"
    )
    p.set_defaults(func=_queue_switch(True))


def add_resume(sub: Any) -> None:
    _connected(sub, "resume", "resume the queue").set_defaults(func=_queue_switch(False))


def _wait(args: argparse.Namespace) -> Outcome:
    bar = JobProgress(progress_enabled(args))
    with client(args) as c:
        job = c.wait(args.job_id, timeout_s=args.wait_timeout, on_event=bar)
    bar.done()
    code = 0 if job.state == "done" else 1
    return code, {"job": job.model_dump(mode="json")}, job_line(job)


def add_wait(sub: Any) -> None:
    p = _connected(sub, "wait", "wait until a job is finished (exit 0 if done, 1 otherwise)")
    p.add_argument("job_id", type=positive_int, help="the job number")
    p.add_argument("--wait-timeout", type=positive_float, default=None,
                   help="give up after this many seconds (default: no limit)")  # fmt: skip
    p.set_defaults(func=_wait)


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
    p = sub.add_parser("keys", help="CURVE key pairs", parents=[output_options()])
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="{new}")
    n = ksub.add_parser(
        "new", help="make a key pair NAME.key / NAME.key_secret", parents=[output_options()]
    )
    n.add_argument("name", help="who the key is for (e.g. alice, server)")
    n.add_argument("--dir", default="~/.scherzer/keys", help="directory (default ~/.scherzer/keys)")
    n.set_defaults(func=_keys_new)
