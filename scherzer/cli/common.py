"""What every ``scherzer`` subcommand shares: the outcome type, option groups, argument types,
the daemon client and progress display.

Argument types are ``argparse`` ``type=`` callables that raise :class:`argparse.ArgumentTypeError`,
so a bad value gives one ``error: …`` line (or one JSON object with ``--json``) and exit 2 from the
parser itself — never a ``SystemExit`` from inside a command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Outcome = tuple[int, dict[str, Any], str]
Command = Callable[[argparse.Namespace], Outcome]


# --- option groups ------------------------------------------------------------------------------
def output_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    return p


def client_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--endpoint", default=None, help="daemon request endpoint "
                   "(default: $SCHERZER_SERVER__ENDPOINT or tcp://127.0.0.1:5577)")  # fmt: skip
    g.add_argument("--events", default=None, help="daemon events endpoint (default: port + 1)")
    g.add_argument("--timeout", type=positive_float, default=5.0,
                   help="seconds per request (default 5)")  # fmt: skip
    g.add_argument("--key", default=None, help="CURVE: your .key_secret file")
    g.add_argument("--server-key", default=None, help="CURVE: the daemon's public .key file")
    return p


def client(args: argparse.Namespace) -> Any:
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


def job_line(job: Any) -> str:
    where = f" pos {job.queue_position}" if job.queue_position is not None else ""
    err = f"  [{job.error.code}: {job.error.message}]" if job.error else ""
    return (
        f"{job.job_id:>6}  {job.state:<11} {job.kind:<14} {job.frames_done}/{job.frames_total}"
        f"  {job.submitter}{where}  {job.output_file or ''}{err}"
    )


# --- argument types -----------------------------------------------------------------------------
def _numbers(text: str, convert: Callable[[str], Any], what: str) -> tuple[Any, ...]:
    try:
        return tuple(convert(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None


def int_list(text: str) -> tuple[int, ...]:
    """``3,7`` → (3, 7)."""
    return _numbers(text, int, "integers")


def box(text: str) -> tuple[int, int, int, int]:
    """A region ``y0,x0,height,width`` in pixels (non-negative origin, positive size)."""
    values = _numbers(text, int, "integers")
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"a region is y0,x0,height,width; got {text!r}")
    if min(values[:2]) < 0 or min(values[2:]) <= 0:
        raise argparse.ArgumentTypeError(
            f"a region needs y0, x0 ≥ 0 and height, width > 0; got {text!r}"
        )
    return values  # type: ignore[return-value]


def float_pair(text: str) -> tuple[float, float]:
    """``dy,dx`` → two finite floats."""
    values = _numbers(text, float, "numbers")
    if len(values) != 2 or not all(abs(v) < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _whole_number_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number ≥ {minimum}, got {text!r}")
        return value

    return parse


positive_int = _whole_number_at_least(1)
non_negative_int = _whole_number_at_least(0)


def when(text: str) -> float:
    """Unix seconds from ISO 8601 local time (2026-11-21T22:00) or a number."""
    import datetime as dt

    try:
        return float(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO time or Unix seconds, got {text!r}"
        ) from None


# --- progress -----------------------------------------------------------------------------------
def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal, never with ``--json``."""
    return not getattr(args, "json", False) and sys.stderr.isatty()


class JobProgress:
    """A tqdm bar on stderr following a daemon job's ``progress`` and ``job`` events."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None

    def __call__(self, event: Any) -> None:
        if not self.enabled:
            return
        d = event.data
        if event.topic == "progress":
            bar = self._ensure(d["job_id"], d["frames_total"])
            bar.n = int(d["frames_done"])
            bar.refresh()
        elif event.topic == "job" and self._bar is not None:
            self._bar.set_postfix_str(d["job"]["state"])

    def _ensure(self, job_id: int, total: int) -> Any:
        from tqdm import tqdm

        if self._bar is None or self._bar.total != total:
            self.done()
            self._bar = tqdm(total=total, desc=f"job {job_id}", unit="frame", file=sys.stderr)
        return self._bar

    def done(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextmanager
def step_progress(enabled: bool, what: str) -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(step, i, n)`` callback for :func:`run_pipeline`, drawn with tqdm."""
    if not enabled:
        yield lambda step, i, n: None
        return
    from tqdm import tqdm

    bar = tqdm(total=None, desc=what, unit="step", file=sys.stderr)

    def progress(step: str, i: int, n: int) -> None:
        bar.total = n
        bar.n = i
        bar.set_postfix_str(step)

    try:
        yield progress
    finally:
        bar.n = bar.total or bar.n
        bar.close()


@contextmanager
def busy(enabled: bool, what: str) -> Iterator[None]:
    """An elapsed-time indicator on stderr (tqdm, no made-up percentage) while a step with no
    progress of its own runs (e.g. a simulation); nothing when ``enabled`` is false."""
    if not enabled:
        yield
        return
    import threading

    from tqdm import tqdm

    bar = tqdm(total=None, desc=what, bar_format="{desc}: {elapsed}", file=sys.stderr)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.close()
