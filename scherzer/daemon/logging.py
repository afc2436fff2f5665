"""Daemon logging: structlog to JSON lines in the data directory and readable console output.

Why a module of its own: the daemon logs from three threads into two sinks (file, console) and
forwards warnings to the event bus; keeping the wiring here keeps ``server.py`` about requests.
Bind context per line with ``log.bind(job=…, client=…)``; every record is one JSON object in
``<data_dir>/logs/daemon.jsonl`` with an ISO-8601 UTC ``timestamp`` and a ``level``. The file
rotates (``daemon.jsonl.1`` … ``.N``) by the standard library's ``RotatingFileHandler`` at
``logging.file_max_mb``, keeping ``logging.file_backups`` old files.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import structlog

__all__ = ["configure_logging"]

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class _Sinks:
    """Final structlog processor: write to the file and the console, forward warnings."""

    def __init__(
        self,
        file: logging.handlers.RotatingFileHandler | None,
        console: TextIO | None,
        pretty: bool,
        min_level: int,
        forward: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self._file = file
        self._console = console
        self._pretty = structlog.dev.ConsoleRenderer(colors=False) if pretty else None
        self._min = min_level
        self._forward = forward
        self._lock = threading.Lock()
        self._file_failed = False

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> Any:
        """Write one record; never raises into the caller (only structlog's DropEvent)."""
        level = _LEVELS.get(event.get("level", "info"), 20)
        if level < self._min:
            raise structlog.DropEvent
        try:
            line = json.dumps(event, default=str)
        except Exception:  # an unserialisable or circular value: keep the event name at least
            line = json.dumps({"event": str(event.get("event")), "level": event.get("level")})
        with self._lock:
            wrote_file = self._write_file(line)
            if self._console is not None:
                self._write_console(logger, method, event, line)
            elif not wrote_file:  # no file or it failed (disk full): stderr instead
                _stderr(line + "\n")
        if self._forward is not None and level >= 30:
            try:
                self._forward(json.loads(line))
            except Exception:
                pass
        raise structlog.DropEvent

    def _write_file(self, line: str) -> bool:
        """Append to the log file; False if there is none or the write failed (disk full).
        The first failure is announced once on stderr."""
        if self._file is None:
            return False
        try:
            if self._file.shouldRollover(logging.makeLogRecord({"msg": line})):
                self._file.doRollover()
            self._file.stream.write(line + "\n")
            self._file.stream.flush()
        except Exception as exc:
            if not self._file_failed:
                self._file_failed = True
                _stderr(f"scherzer: cannot write the log file ({exc}); logging to stderr\n")
            return False
        self._file_failed = False
        return True

    def _write_console(self, logger: Any, method: str, event: dict[str, Any], line: str) -> None:
        assert self._console is not None
        try:
            text = self._pretty(logger, method, dict(event)) if self._pretty else line
            self._console.write(text + "\n")
            self._console.flush()
        except Exception:
            pass


def _stderr(text: str) -> None:
    """Last resort for log lines: stderr, and silence if even that fails."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except Exception:
        pass


def configure_logging(
    data_dir: Path,
    *,
    level: str = "info",
    console: str = "auto",
    forward: Callable[[dict[str, Any]], None] | None = None,
    max_bytes: int = 20 * 2**20,
    backups: int = 5,
) -> Path:
    """Set up structlog for the daemon; returns the JSON-lines log path (rotated at
    ``max_bytes``, ``backups`` old files kept)."""
    log_dir = Path(data_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "daemon.jsonl"
    try:
        file: logging.handlers.RotatingFileHandler | None = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
    except OSError as exc:  # a full or read-only disk must not stop the daemon starting
        _stderr(f"scherzer: cannot open the log file {path} ({exc}); logging to stderr\n")
        file = None
    stream = sys.stderr
    if console == "off":
        out, pretty = None, False
    elif console == "auto":
        out, pretty = stream, stream.isatty()
    else:
        out, pretty = stream, console == "pretty"
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _Sinks(file, out, pretty, _LEVELS[level], forward),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),  # _Sinks filters
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    return path
