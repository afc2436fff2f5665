"""CURVE keys, the ZAP handler that identifies every client, and roles.

Why a module of its own: authentication is the one part of the daemon where a mistake exposes a
microscope, so it is kept small, separate and testable; ``server.py`` only asks it for sockets'
options and for the identity behind a frame.

* Key pairs are ZeroMQ certificate files (``NAME.key`` public, ``NAME.key_secret`` secret).
* With CURVE on, a ZAP thread (RFC 27, ``inproc://zeromq.zap.01``) accepts a handshake only if the
  client's public key is on the allow-list; the reply's user id is the client's configured name,
  which ZeroMQ then attaches to every message of that connection (``User-Id`` frame property). A
  refused client gets no reply at all (the handshake fails).
* Without CURVE (loopback only) every client is ``local`` with the configured ``local_role``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import structlog
import zmq
import zmq.auth
from zmq.utils import z85

from scherzer.config import ClientKey, ConfigError, Settings
from scherzer.daemon.protocol import Role

__all__ = [
    "Identity",
    "ServerKeys",
    "ZapHandler",
    "apply_client_curve",
    "load_keypair",
    "load_public_key",
    "new_keypair",
]

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "scherzer"
log = structlog.get_logger("scherzer.security")


@dataclass(frozen=True)
class Identity:
    user: str
    role: Role


LOCAL_USER = "local"


def new_keypair(name: str, directory: str | Path) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` into ``directory``; refuse to overwrite."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"key name {name!r} must be a plain file name (e.g. 'alice')")
    d = Path(directory).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if (d / f"{name}{suffix}").exists():
            raise FileExistsError(f"{d / (name + suffix)} exists; choose another name or directory")
    public, secret = zmq.auth.create_certificates(str(d), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def load_keypair(secret_file: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``.key_secret`` file."""
    path = Path(secret_file).expanduser()
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read key pair {path}: {exc}") from exc
    if secret is None:
        raise ConfigError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def load_public_key(path: str | Path) -> bytes:
    p = Path(path).expanduser()
    try:
        public, _ = zmq.auth.load_certificate(str(p))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read public key {p}: {exc}") from exc
    return public


def _client_key(client: ClientKey) -> bytes:
    key = client.public_key.encode("ascii") if client.public_key else None
    key = key or load_public_key(client.public_key_file)
    if len(key) != 40:
        raise ConfigError(f"client {client.name!r}: public key must be 40 Z85 characters")
    return key


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    allowed: dict[bytes, Identity]

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerKeys | None:
        """Keys when CURVE is needed (None for a plain loopback daemon)."""
        settings.check_security()
        if not settings.needs_curve():
            return None
        public, secret = load_keypair(settings.security.server_secret_key_file)
        allowed = {
            _client_key(c): Identity(c.name, Role(c.role)) for c in settings.security.clients
        }
        return cls(public, secret, allowed)

    def apply(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE server authenticated through the ZAP handler."""
        socket.curve_server = True
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret
        socket.zap_domain = ZAP_DOMAIN.encode()

    def identity_of(self, user_id: str) -> Identity | None:
        for ident in self.allowed.values():
            if ident.user == user_id:
                return ident
        return None


def apply_client_curve(
    socket: zmq.Socket, client_secret_file: str | Path, server_public_file: str | Path
) -> None:
    """Configure a client socket for CURVE with its own key pair and the server's public key."""
    public, secret = load_keypair(client_secret_file)
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_serverkey = load_public_key(server_public_file)


class ZapHandler:
    """RFC 27 handler: CURVE clients on the allow-list pass with their name as user id."""

    def __init__(self, context: zmq.Context, keys: ServerKeys) -> None:
        self._context = context
        self._keys = keys
        self._socket = context.socket(zmq.REP)
        self._socket.linger = 0
        self._socket.bind(ZAP_ENDPOINT)  # bound before any server socket binds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zap", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(200):
                    frames = self._socket.recv_multipart()
                    try:
                        reply = self._answer(frames)
                    except Exception:
                        log.exception("ZAP request failed; refusing the client")
                        rid = frames[1] if len(frames) > 1 else b""
                        reply = [b"1.0", rid, b"500", b"internal error", b"", b""]
                    self._socket.send_multipart(reply)
        finally:
            self._socket.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            return [b"1.0", b"", b"400", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = frames[:6]
        if version != b"1.0":
            return [b"1.0", request_id, b"400", b"unsupported ZAP version", b"", b""]
        if mechanism == b"CURVE" and len(frames) >= 7:
            key = z85.encode(frames[6])
            ident = self._keys.allowed.get(key)
            if ident is not None:
                return [b"1.0", request_id, b"200", b"OK", ident.user.encode(), b""]
            log.warning("client refused", address=address.decode(errors="replace"),
                        key=key.decode())  # fmt: skip
        return [b"1.0", request_id, b"400", b"not allowed", b"", b""]
