"""The web view's connections to the daemon: one :class:`Client` per role.

The browser user's role is checked first (:mod:`scherzer.web.auth`); the request then
goes over the connection *of that role*: ``client_factory("observer")`` for everything an
observer may do, ``client_factory("operator")`` only for pause/resume/cancel. When the daemon
uses CURVE the two connections carry two key pairs, so the daemon itself refuses an operator
method sent over the observer connection — a bug in the web view cannot make an observer an
operator. On a plain loopback daemon both connections are ``local`` with ``server.local_role``
(the daemon cannot tell them apart), and the web view's own check is what separates the roles.
A Client is not thread-safe, so each is used under its own lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from scherzer.clients.client import Client

if TYPE_CHECKING:
    from scherzer.config import Settings
    from scherzer.web.settings import WebSettings

__all__ = ["ClientFactory", "DaemonLink", "connect_endpoint", "daemon_client_factory"]

Role = Literal["observer", "operator"]
ClientFactory = Callable[[Role], Client]
T = TypeVar("T")


class DaemonLink:
    """Lazily opened clients, one per role, each used by one thread at a time."""

    def __init__(self, client_factory: ClientFactory) -> None:
        self._factory = client_factory
        self._clients: dict[str, Client] = {}
        self._locks = {"observer": threading.Lock(), "operator": threading.Lock()}

    def call(self, role: Role, fn: Callable[[Client], T]) -> T:
        """``fn(client)`` on the connection of ``role``."""
        with self._locks[role]:
            client = self._clients.get(role)
            if client is None:
                client = self._clients[role] = self._factory(role)
            return fn(client)

    def close(self) -> None:
        for role, lock in self._locks.items():
            with lock:
                client = self._clients.pop(role, None)
                if client is not None:
                    client.close()


def connect_endpoint(endpoint: str) -> str:
    """Where to connect for a bind address: ``tcp://*:P`` / ``tcp://0.0.0.0:P`` → loopback."""
    parts = urlsplit(endpoint)
    if parts.scheme == "tcp" and parts.hostname in ("*", "0.0.0.0", "::"):
        return urlunsplit(parts._replace(netloc=f"127.0.0.1:{parts.port}"))
    return endpoint


def daemon_client_factory(
    settings: Settings, web: WebSettings | None = None, timeout_s: float = 10.0
) -> ClientFactory:
    """``role -> Client`` for the daemon configured in ``settings`` (its ``[web]`` keys).

    Without CURVE both roles are plain loopback clients. With CURVE the observer connection uses
    ``curve_observer_key`` and the operator one ``curve_operator_key``; with no operator key the
    operator connection also uses the observer key, so the daemon refuses every action
    (``forbidden`` → HTTP 403): the web view is read-only.
    """
    web = web if web is not None else settings.web  # type: ignore[attr-defined]
    endpoint = connect_endpoint(settings.server.endpoint)
    events = connect_endpoint(settings.server.events_endpoint)
    curve = settings.needs_curve()
    if curve and not (web.curve_observer_key and web.curve_server_key):
        from scherzer.config import ConfigError

        raise ConfigError(
            "the daemon uses CURVE: set web.curve_observer_key (and web.curve_operator_key for "
            "pause/resume/cancel) and web.curve_server_key"
        )

    def factory(role: Role) -> Client:
        keys = {}
        if curve:
            key = web.curve_operator_key if role == "operator" else ""
            keys = {"client_key": key or web.curve_observer_key, "server_key": web.curve_server_key}
        return Client(endpoint, events_endpoint=events, timeout_s=timeout_s, **keys)

    return factory
