"""Synchronous Python client for the Scherzer daemon.

>>> with Client("tcp://127.0.0.1:5577") as c:                       # doctest: +SKIP
...     job = c.submit({"kind": "camera_image", "exposure_s": 0.5})
...     job = c.wait(job.job_id, timeout_s=60)
...     image, info = c.camera_acquire(0.1)

Requests go over a DEALER socket (no REQ lock-step): every request carries an id and stale replies
are discarded. A request that gets no answer within ``timeout_s`` drops the socket, reconnects and
is re-sent up to ``retries`` times when the method is idempotent (see ``docs/protocol.md``);
otherwise :class:`DaemonTimeout` is raised. Error replies raise :class:`DaemonError` with the
daemon's ``code``. Results are the pydantic models of :mod:`scherzer.daemon.protocol`; arrays
arrive as numpy arrays. :class:`LocalDaemon` starts a daemon process on this machine (tests,
``scherzer demo``).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import zmq
from pydantic import BaseModel

from scherzer.daemon import protocol as P

__all__ = [
    "Client",
    "DaemonError",
    "DaemonTimeout",
    "EventStream",
    "LocalDaemon",
    "events_endpoint_for",
    "free_tcp_port",
]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5577"


class DaemonError(RuntimeError):
    """An error reply (``code`` from the protocol's closed set) or a client-side failure."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


class DaemonTimeout(DaemonError):
    """No reply in time (after the allowed retries)."""

    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


def events_endpoint_for(endpoint: str) -> str:
    """The default events endpoint: same host, request port + 1."""
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or parts.port is None:
        raise ValueError(f"cannot derive an events endpoint from {endpoint!r}; give it explicitly")
    host = parts.netloc.rsplit(":", 1)[0]
    return f"tcp://{host}:{parts.port + 1}"


class EventStream:
    """A SUB socket on the daemon's events (topics: job, frame, progress, live, log, heartbeat,
    queue)."""

    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock

    def next(self, timeout_s: float) -> P.Event | None:
        """The next event, or None after ``timeout_s``."""
        if not self._sock.poll(int(max(timeout_s, 0) * 1000)):
            return None
        _topic, body = self._sock.recv_multipart()
        return P.Event.model_validate_json(body)

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A connection to one daemon; not thread-safe (one client per thread)."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        events_endpoint: str | None = None,
        timeout_s: float = 5.0,
        retries: int = 2,
        client_key: str | Path | None = None,
        server_key: str | Path | None = None,
    ) -> None:
        if (client_key is None) != (server_key is None):
            raise ValueError("CURVE needs both client_key (.key_secret) and server_key (.key)")
        self.endpoint = endpoint
        self.events_endpoint = events_endpoint or events_endpoint_for(endpoint)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self._keys = (client_key, server_key) if client_key else None
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    # --- plumbing --------------------------------------------------------------------------
    def _secure(self, sock: zmq.Socket) -> None:
        if self._keys:
            from scherzer.daemon.security import apply_client_curve

            apply_client_curve(sock, *self._keys)

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            self._secure(sock)
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        """Send one request; the raw result dict and its arrays. Raises :class:`DaemonError`."""
        spec = P.METHODS.get(method)
        attempts = 1 + (self.retries if spec is None or spec.idempotent else 0)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        for attempt in range(attempts):
            rid = uuid.uuid4().hex
            request = {"v": P.PROTOCOL_VERSION, "id": rid, "method": method, "params": params or {}}
            sock = self._socket()
            sock.send(P.encode_json(request))
            frames = self._await(sock, rid, timeout)
            if frames is not None:
                return self._unpack(frames)
            self._reset()  # lost or daemon restarted: reconnect before retrying
            if attempt + 1 < attempts:
                time.sleep(min(0.1 * 2**attempt, 1.0))
        raise DaemonTimeout(
            f"no reply to {method} from {self.endpoint} within {timeout:g} s "
            f"({attempts} attempt(s)); is the daemon running?"
        )

    def _await(self, sock: zmq.Socket, rid: str, timeout_s: float) -> list[bytes] | None:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                return None
            frames = sock.recv_multipart()
            try:
                head = P.decode_json(frames[0])
            except P.ProtocolError:
                continue
            if isinstance(head, dict) and head.get("id") == rid:
                return frames
        return None

    def _unpack(self, frames: list[bytes]) -> tuple[dict[str, Any], list[np.ndarray]]:
        head = P.decode_json(frames[0])
        if not head.get("ok"):
            err = head.get("error") or {}
            raise DaemonError(
                err.get("code", "internal"), err.get("message", "?"), err.get("details")
            )
        result = head.get("result") or {}
        arrays = []
        for meta in result.pop("arrays", None) or []:
            m = P.ArrayMeta.model_validate(meta)
            arrays.append(P.array_from_buffer(m, frames[1 + m.frame]))
        return result, arrays

    def _typed(self, method: str, params: BaseModel | dict | None = None, **kw: Any) -> Any:
        if isinstance(params, BaseModel):
            params = params.model_dump(mode="json", exclude_none=True, by_alias=True)
        result, arrays = self.call(method, params, **kw)
        model = P.METHODS[method].result.model_validate(result)
        return (model, arrays) if P.METHODS[method].binary_reply else model

    # --- jobs and queue --------------------------------------------------------------------
    def status(self) -> P.StatusResult:
        return self._typed("status")

    def submit(self, plan: BaseModel | dict[str, Any], position: int | None = None) -> P.JobInfo:
        if isinstance(plan, BaseModel):
            plan = plan.model_dump(mode="json", by_alias=True)
        params: dict[str, Any] = {"plan": plan}
        if position is not None:
            params["position"] = position
        return self._typed("job_submit", params).job

    def job(self, job_id: int) -> P.JobInfo:
        return self._typed("job_get", {"job_id": job_id}).job

    def cancel(self, job_id: int) -> P.JobInfo:
        return self._typed("job_cancel", {"job_id": job_id}).job

    def queue(self) -> P.JobsResult:
        return self._typed("queue_list")

    def move(self, job_id: int, position: int) -> list[P.JobInfo]:
        return self._typed("queue_move", {"job_id": job_id, "position": position}).jobs

    def pause(self) -> bool:
        return self._typed("queue_pause").paused

    def resume(self) -> bool:
        return self._typed("queue_resume").paused

    def history(
        self, limit: int = 50, before_id: int | None = None, states: Iterable[str] | None = None
    ) -> list[P.JobInfo]:
        params = P.HistoryParams(
            limit=limit, before_id=before_id, states=list(states) if states else None
        )
        return self._typed("history_list", params).jobs

    def plan_validate(self, plan: dict[str, Any]) -> P.PlanValidateResult:
        return self._typed("plan_validate", {"plan": plan})

    def report(
        self,
        job_ids: Iterable[int],
        title: str = "Scherzer run",
        name: str = "report",
        timeout_s: float = 120.0,
    ) -> P.ReportResult:
        """Have the daemon write a summary report of these jobs (in its data directory)."""
        params = P.ReportParams(job_ids=list(job_ids), title=title, name=name)
        return self._typed("report_create", params, timeout_s=timeout_s)

    # --- devices ---------------------------------------------------------------------------
    def lens_get(self) -> P.LensState:
        return self._typed("lens_get")

    def lens_set(self, **values: Any) -> P.LensState:
        """Keyword arguments of ``LensSetParams`` (defocus_nm, stigmator_nm, …)."""
        return self._typed("lens_set", P.LensSetParams(**values))

    def camera_acquire(
        self, exposure_s: float, binning: int = 1, region: tuple[int, int, int, int] | None = None
    ) -> tuple[np.ndarray, P.FrameInfo]:
        params = P.CameraAcquireParams(exposure_s=exposure_s, binning=binning, region=region)
        res, arrays = self._typed("camera_acquire", params, timeout_s=self.timeout_s + exposure_s)
        return arrays[0], res.frames[0]

    def scan_acquire(self, **settings: Any) -> dict[str, tuple[np.ndarray, P.FrameInfo]]:
        """Keyword arguments of ``ScanAcquireParams``; {signal: (image, info)}."""
        params = P.ScanAcquireParams(**settings)
        ny, nx = params.size_px
        frame_s = ny * (nx * params.dwell_us + params.flyback_us) * 1e-6
        res, arrays = self._typed("scan_acquire", params, timeout_s=self.timeout_s + frame_s)
        return {info.signal: (arr, info) for info, arr in zip(res.frames, arrays, strict=True)}

    def frame_get(self, frame_id: int) -> tuple[np.ndarray, P.FrameInfo]:
        res, arrays = self._typed("frame_get", {"frame_id": frame_id})
        return arrays[0], res.frames[0]

    # --- events ----------------------------------------------------------------------------
    def events(self, topics: Iterable[str] = ("",)) -> EventStream:
        """Subscribe to event topics ("" = all). Events published before this are not seen."""
        sock = self._ctx.socket(zmq.SUB)
        sock.linger = 0
        self._secure(sock)
        for topic in topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        sock.connect(self.events_endpoint)
        return EventStream(sock)

    def wait(
        self,
        job_id: int,
        timeout_s: float | None = None,
        *,
        poll_s: float = 1.0,
        on_event: Callable[[P.Event], None] | None = None,
    ) -> P.JobInfo:
        """Block until the job is done/failed/cancelled/interrupted; returns its final info.

        Driven by ``job`` events; every ``poll_s`` without one it asks ``job_get`` (so a lost
        event or a restarted daemon cannot make it hang). :class:`DaemonTimeout` after
        ``timeout_s``.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self.events(("job", "frame", "progress")) as stream:
            job = self.job(job_id)
            while job.state not in P.FINAL_STATES:
                left = poll_s if deadline is None else min(poll_s, deadline - time.monotonic())
                if left <= 0:
                    raise DaemonTimeout(f"job {job_id} still {job.state} after {timeout_s:g} s")
                event = stream.next(left)
                if event is None:
                    job = self.job(job_id)
                    continue
                about = (
                    event.data["job"]["job_id"]
                    if event.topic == "job"
                    else event.data.get("job_id")
                )
                if about != job_id:
                    continue
                if on_event is not None:
                    on_event(event)
                if event.topic == "job":
                    job = P.JobInfo.model_validate(event.data["job"])
            return job


# --- running a daemon locally -----------------------------------------------------------------
# Outgoing connections take their local port from the kernel's ephemeral range, so a port found
# free there can be taken by any connection before the daemon binds it. Ports are drawn from
# below that range instead (and a daemon that still loses the race is restarted on new ports).
_FALLBACK_EPHEMERAL = (32768, 60999)  # Linux's default ip_local_port_range
_LOW_PORT = 20000  # the lowest port drawn: above the well-known and most registered services


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return _FALLBACK_EPHEMERAL


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, outside the ephemeral range if it can."""
    lo, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(50):
        port = rng.randrange(_LOW_PORT, lo) if lo > _LOW_PORT + 100 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalDaemon:
    """A ``scherzer daemon`` child process on free loopback ports; always cleaned up on exit."""

    PORT_ATTEMPTS = 5  # starts on fresh ports when another process took a chosen one first

    def __init__(
        self,
        config: dict[str, Any],
        directory: str | Path,
        *,
        startup_timeout_s: float = 30.0,
        env: dict[str, str] | None = None,
        client_key: str | Path | None = None,
        server_key: str | Path | None = None,
    ) -> None:
        """``client_key``/``server_key``: CURVE keys used to check readiness (and by default in
        :meth:`client`) when the daemon is secured."""
        from scherzer.config import settings_to_toml

        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        server = config.setdefault("server", {})
        self._auto_ports = "endpoint" not in server and "events_endpoint" not in server
        config.setdefault("data_dir", str(self.dir / "data"))
        config.setdefault("logging", {}).setdefault("console", "json")
        self.config = config
        self.config_path = self.dir / "scherzer.toml"
        self._write_config(settings_to_toml, new_ports=self._auto_ports)
        self.startup_timeout_s = startup_timeout_s
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.stderr_path = self.dir / "daemon.stderr"
        self.keys = {"client_key": client_key, "server_key": server_key} if client_key else {}

    def client(self, **kw: Any) -> Client:
        """A client for this daemon (keyword arguments of :class:`Client` override)."""
        return Client(self.endpoint, events_endpoint=self.events_endpoint, **{**self.keys, **kw})

    def _write_config(self, to_toml: Any, *, new_ports: bool) -> None:
        server = self.config["server"]
        if new_ports:
            first = free_tcp_port()
            second = free_tcp_port()
            while second == first:
                second = free_tcp_port()
            server["endpoint"] = f"tcp://127.0.0.1:{first}"
            server["events_endpoint"] = f"tcp://127.0.0.1:{second}"
        server.setdefault("endpoint", f"tcp://127.0.0.1:{free_tcp_port()}")
        server.setdefault("events_endpoint", f"tcp://127.0.0.1:{free_tcp_port()}")
        self.config_path.write_text(to_toml(self.config), encoding="utf-8")
        self.endpoint = server["endpoint"]
        self.events_endpoint = server["events_endpoint"]

    def start(self) -> LocalDaemon:
        """Start the daemon and wait until it answers. When this object chose the ports and one
        was taken in the meantime, the daemon is started again on new ones (up to
        ``PORT_ATTEMPTS`` times)."""
        from scherzer.config import settings_to_toml

        cmd = [sys.executable, "-m", "scherzer.cli", "daemon", "--config", str(self.config_path)]
        for attempt in range(1, self.PORT_ATTEMPTS + 1):
            self._stderr_start = self.stderr_path.stat().st_size if self.stderr_path.exists() else 0
            with self.stderr_path.open("ab") as err:
                self.proc = subprocess.Popen(
                    cmd, stdout=subprocess.DEVNULL, stderr=err, env=self.env
                )
            try:
                self._wait_ready()
                return self
            except RuntimeError:
                lost_race = "Address already in use" in self.stderr_tail(since_start=True)
                if not (lost_race and self._auto_ports and attempt < self.PORT_ATTEMPTS):
                    raise
                self._write_config(settings_to_toml, new_ports=True)
        raise AssertionError("unreachable")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        with self.client(timeout_s=0.5, retries=0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"daemon exited with {self.proc.returncode}: {self.stderr_tail()}"
                    )
                try:
                    c.status()
                    return
                except DaemonTimeout:
                    continue
                except DaemonError:  # e.g. refused by CURVE rules: it is up
                    return
        self.kill()
        raise RuntimeError(
            f"daemon not ready after {self.startup_timeout_s} s: {self.stderr_tail()}"
        )

    def stderr_tail(self, n: int = 4000, *, since_start: bool = False) -> str:
        """The last ``n`` characters the daemon wrote to stderr (``since_start``: of this start)."""
        try:
            data = self.stderr_path.read_bytes()
        except OSError:
            return ""
        if since_start:
            data = data[getattr(self, "_stderr_start", 0) :]
        return data.decode(errors="replace")[-n:]

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> LocalDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
