"""Serving the web view with uvicorn: in a thread (:func:`start_web`) or blocking (:func:`run_web`).

The listening socket is bound here (before uvicorn starts), so port 0 gives a free port without a
race and a refused bind fails at once. Stopping first ends every server-sent-event stream (they
would otherwise hold uvicorn's graceful shutdown open), then stops uvicorn.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import uvicorn

from scherzer.web.app import create_app
from scherzer.web.hub import EventHub
from scherzer.web.link import ClientFactory
from scherzer.web.settings import WebSettings

__all__ = ["WebServer", "run_web", "start_web"]

#: Seconds uvicorn waits for open requests when stopping before it cancels them.
GRACEFUL_S = 3


class _Uvicorn(uvicorn.Server):
    """uvicorn that also ends the SSE streams when asked to exit (SIGINT/SIGTERM included)."""

    def __init__(self, config: uvicorn.Config, hub: EventHub) -> None:
        super().__init__(config)
        self._hub = hub

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._hub.close(join=False)
        super().handle_exit(sig, frame)


def _bind(settings: WebSettings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host.strip("[]"), settings.port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _server(
    settings: WebSettings, client_factory: ClientFactory, data_dir: str | Path | None
) -> _Uvicorn:
    app = create_app(settings, client_factory, data_dir)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_S,
        ssl_certfile=settings.tls_certfile or None,
        ssl_keyfile=settings.tls_keyfile or None,
        lifespan="on",
    )
    return _Uvicorn(config, app.state.hub)


class WebServer:
    """A running web view (from :func:`start_web`): its ``url`` and :meth:`stop`."""

    def __init__(self, server: _Uvicorn, sock: socket.socket, tls: bool) -> None:
        self._server = server
        self._sock = sock
        self.app = server.config.app
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if tls else 'http'}://{host}:{port}"
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="web", daemon=True
        )

    def start(self, timeout_s: float = 20.0) -> WebServer:
        self._thread.start()
        if not _wait(lambda: self._server.started or not self._thread.is_alive(), timeout_s):
            self.stop()
            raise RuntimeError(f"web view did not start within {timeout_s} s")
        if not self._server.started:
            raise RuntimeError("web view failed to start (see the log)")
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the event streams, stop uvicorn, wait for its thread."""
        self._server.handle_exit(0, None)
        self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> WebServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait(predicate: Any, timeout_s: float) -> bool:
    done = threading.Event()
    for _ in range(int(timeout_s / 0.02) + 1):
        if predicate():
            return True
        done.wait(0.02)
    return bool(predicate())


def start_web(
    settings: WebSettings, client_factory: ClientFactory, data_dir: str | Path | None = None
) -> WebServer:
    """Serve the web view from a background thread; returns once it accepts connections.

    ``client_factory(role)`` opens a daemon client acting with that role (see :mod:`.link`);
    ``data_dir`` is the daemon's data directory (plots and reports). Raises
    :class:`scherzer.config.ConfigError` for unsafe settings, :class:`OSError` if the bind fails.
    """
    settings.check()
    sock = _bind(settings)
    try:
        server = _server(settings, client_factory, data_dir)
    except Exception:
        sock.close()
        raise
    return WebServer(server, sock, bool(settings.tls_certfile)).start()


def run_web(
    settings: WebSettings, client_factory: ClientFactory, data_dir: str | Path | None = None
) -> None:
    """Serve the web view in this thread until SIGINT/SIGTERM (uvicorn re-raises the signal
    after its graceful shutdown: SIGINT returns from here, SIGTERM ends the process)."""
    settings.check()
    sock = _bind(settings)
    try:
        _server(settings, client_factory, data_dir).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
