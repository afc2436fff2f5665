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
    add_keys,
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
    except (ConfigError, FileExistsError, ValueError, DeviceError) as exc:
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
