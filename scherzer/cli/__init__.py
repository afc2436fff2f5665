"""The ``scherzer`` command: thin — parses, builds settings, calls, prints.

Every subcommand is registered by a small ``add_<name>(subparsers)`` function listed in
:data:`COMMANDS`; to add one write such a function (in the module of its kind: daemon_cmds,
plan_cmds, offline, …) that sets ``func`` (``args -> (exit_code, result_dict, text)``) and add it
to the list. Every command accepts ``--json`` (exactly one JSON object on stdout, errors included)
and ``--help``. Every error is one ``error: …`` line on stderr and exit code 2; a closed pipe
(``scherzer info X | head``) ends quietly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from scherzer.cli.align_cmds import add_align, add_align_signal
from scherzer.cli.calibrate_cmd import add_calibrate
from scherzer.cli.common import Outcome
from scherzer.cli.daemon_cmds import (
    add_cancel,
    add_daemon,
    add_jobs,
    add_keys,
    add_pause,
    add_resume,
    add_status,
    add_temscript_sim,
    add_wait,
    add_web,
)
from scherzer.cli.maintenance_cmds import add_db, add_repair
from scherzer.cli.offline import add_demo, add_info, add_restore, add_simulate
from scherzer.cli.plan_cmds import (
    add_eftem_series,
    add_focal_series,
    add_rotated_scan,
    add_submit,
    add_time_series,
)

__all__ = ["COMMANDS", "Outcome", "build_parser", "main"]

#: Exit code of every usage or input error.
EXIT_BAD_INPUT = 2

#: Subcommand registrars by command name, in help order. Add new commands here. Only the
#: invoked command's registrar runs (so ``scherzer align`` never imports the daemon's plan
#: models); ``scherzer --help`` and unknown commands register them all.
COMMANDS: dict[str, Callable[[Any], None]] = {
    "daemon": add_daemon,
    "web": add_web,
    "temscript-sim": add_temscript_sim,
    "status": add_status,
    "jobs": add_jobs,
    "cancel": add_cancel,
    "pause": add_pause,
    "resume": add_resume,
    "wait": add_wait,
    "focal-series": add_focal_series,
    "rotated-scan": add_rotated_scan,
    "time-series": add_time_series,
    "eftem-series": add_eftem_series,
    "submit": add_submit,
    "keys": add_keys,
    "simulate": add_simulate,
    "align": add_align,
    "align-signal": add_align_signal,
    "restore": add_restore,
    "calibrate": add_calibrate,
    "info": add_info,
    "repair": add_repair,
    "db": add_db,
    "demo": add_demo,
}


class _Parser(argparse.ArgumentParser):
    """argparse with ``--json``-aware errors: one JSON object on stdout when ``--json`` is among
    the arguments, else argparse's usage line and ``error: …`` on stderr; exit 2 either way."""

    json_requested = False

    def error(self, message: str) -> NoReturn:
        if _Parser.json_requested:
            _print_json({"error": {"code": "bad_input", "message": message}})
            sys.exit(EXIT_BAD_INPUT)
        super().error(message)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``scherzer`` parser; with ``argv`` naming a command, only that command's options are
    built (the others stay unregistered: a light start)."""
    from scherzer import __version__

    parser = _Parser(
        prog="scherzer",
        description="Scherzer: TEM/STEM control daemon, simulators, processing.",
    )
    parser.add_argument("--version", action="version", version=f"scherzer {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    wanted = [argv[0]] if argv and argv[0] in COMMANDS else list(COMMANDS)
    for name in wanted:
        COMMANDS[name](sub)
    return parser


def _print_json(result: dict[str, Any]) -> None:
    print(json.dumps(result, default=str))


def _emit(args: argparse.Namespace, code: int, result: dict[str, Any], text: str) -> int:
    if getattr(args, "json", False):
        _print_json(result)
    elif text:
        print(text)
    return code


def _fail(args: argparse.Namespace, code: str, message: str, details: Any = None) -> int:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    if getattr(args, "json", False):
        _print_json({"error": error})
    else:
        print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _quiet_logging() -> None:
    """Offline commands log warnings and errors to stderr, never to stdout (which carries the
    result, and with ``--json`` exactly one JSON object). The daemon sets up its own logging."""
    import logging

    import structlog

    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(_Stderr()),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (a test harness or a library may
    replace it after logging was set up; binding the object would write to a closed file)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


#: Exceptions reported as one error line (by class name, so that catching them imports
#: nothing): the daemon's replies, device errors, settings errors; plus every ValueError/OSError.
_REPORTED = frozenset({"DaemonError", "DeviceError", "ConfigError"})


def _run(args: argparse.Namespace) -> int:
    if not getattr(args, "long_running", False):
        _quiet_logging()
    try:
        code, result, text = args.func(args)
    except BrokenPipeError:
        raise
    except Exception as exc:
        names = {c.__name__ for c in type(exc).__mro__}
        if not (names & _REPORTED or isinstance(exc, OSError | ValueError)):
            raise
        return _fail(
            args, getattr(exc, "code", "bad_input"), str(exc), getattr(exc, "details", None)
        )
    return _emit(args, code, result, text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _Parser.json_requested = "--json" in argv
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exc:  # usage errors (exit 2, already reported) and --help (exit 0)
        return int(exc.code or 0)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (``scherzer info X | head``): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
