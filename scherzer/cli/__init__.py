"""The ``scherzer`` command: thin — parses, builds settings, calls, prints.

Every subcommand is registered by a small ``add_<name>(subparsers)`` function listed in
:data:`COMMANDS`; to add one write such a function (in the module of its kind: daemon_cmds,
plan_cmds, offline, …) that sets ``func`` (``args -> (exit_code, result_dict, text)``) and add its
``"module:function"`` there. A command's module is imported only when that command runs (or for
``--help``): keep heavy imports inside the functions that need them. Every command accepts
``--json`` (exactly one JSON object on stdout, errors included) and ``--help``. Every error is one
``error: …`` line on stderr and exit code 2; a closed pipe (``scherzer info X | head``) ends
quietly.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from scherzer.cli.common import Outcome
from scherzer.cli.process import (
    leave_collector_out_of_teardown,
    one_blas_thread_at_start,
    tune_allocator,
)

__all__ = ["COMMANDS", "Outcome", "build_parser", "console_main", "main", "registrar"]

#: Exit code of every usage or input error.
EXIT_BAD_INPUT = 2

#: Subcommand registrars by command name, in help order, as ``"module:function"`` (resolved on
#: use by :func:`registrar`). Add new commands here. Only the invoked command's module is imported
#: and its registrar run (so ``scherzer align`` never imports the daemon's modules, pydantic or
#: the plan models); ``scherzer --help`` and unknown commands register them all.
COMMANDS: dict[str, str] = {
    "daemon": "daemon_cmds:add_daemon",
    "web": "daemon_cmds:add_web",
    "temscript-sim": "daemon_cmds:add_temscript_sim",
    "status": "daemon_cmds:add_status",
    "jobs": "daemon_cmds:add_jobs",
    "cancel": "daemon_cmds:add_cancel",
    "pause": "daemon_cmds:add_pause",
    "resume": "daemon_cmds:add_resume",
    "wait": "daemon_cmds:add_wait",
    "focal-series": "plan_cmds:add_focal_series",
    "rotated-scan": "plan_cmds:add_rotated_scan",
    "time-series": "plan_cmds:add_time_series",
    "eftem-series": "plan_cmds:add_eftem_series",
    "submit": "plan_cmds:add_submit",
    "keys": "daemon_cmds:add_keys",
    "simulate": "offline:add_simulate",
    "align": "align_cmds:add_align",
    "align-signal": "align_cmds:add_align_signal",
    "restore": "offline:add_restore",
    "calibrate": "calibrate_cmd:add_calibrate",
    "info": "offline:add_info",
    "repair": "maintenance_cmds:add_repair",
    "db": "maintenance_cmds:add_db",
    "demo": "offline:add_demo",
}


def registrar(name: str) -> Callable[[Any], None]:
    """The ``add_<name>(subparsers)`` function of command ``name`` (its module imported now)."""
    module, function = COMMANDS[name].split(":")
    return getattr(importlib.import_module(f"scherzer.cli.{module}"), function)


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
        registrar(name)(sub)
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
    result, and with ``--json`` exactly one JSON object). The daemon sets up its own logging.

    structlog is configured right after its first import, if any: most offline commands never
    import it (``scherzer align`` does not), and its import alone costs tens of milliseconds."""
    if "structlog" in sys.modules:
        _configure_structlog()
    elif not any(isinstance(f, _ConfigureOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _ConfigureOnImport())


def _configure_structlog() -> None:
    import logging

    import structlog

    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(_Stderr()),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )


class _ConfigureOnImport:
    """An import hook (first on ``sys.meta_path``, once): finds ``structlog`` as usual, and has
    :func:`_configure_structlog` run as soon as its module has been executed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "structlog":
            return None
        sys.meta_path.remove(self)  # one use; and the search below must not find us again
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenConfigure(spec.loader)
        return spec


class _ThenConfigure:
    """A module loader that configures structlog once it has loaded it."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _configure_structlog()


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


def console_main() -> int:
    """The ``scherzer`` program (console script and ``python -m scherzer``): the process
    settings of :mod:`scherzer.cli.process` (BLAS threads and allocator before NumPy loads,
    then :func:`main`, then the teardown without the collector). Embedding programs call
    :func:`main`, which leaves their process as it is."""
    one_blas_thread_at_start(sys.argv[1:])
    tune_allocator(sys.argv[1:])
    code = main()
    leave_collector_out_of_teardown()
    return code


if __name__ == "__main__":
    sys.exit(console_main())
