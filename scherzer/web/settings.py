"""Typed settings of the web view (the daemon config's ``[web]`` section) and its users.

A browser user is an ``observer`` or an ``operator``, exactly the API's roles, identified by a
secret token kept in a file (``token_file``, one line, at least :data:`MIN_TOKEN_CHARS`
characters; make one with ``python -c "import secrets; print(secrets.token_urlsafe(32))"``).
Tokens live in files rather than in the TOML so the config can be shared or committed.

The bind mirrors :mod:`scherzer.config` for the API: loopback by default; any other address is
refused unless ``allow_remote = true`` *and* TLS (``tls_certfile``/``tls_keyfile``) is set, the
way a non-loopback API endpoint needs CURVE — tokens must not cross a network in clear text.

This module imports nothing from ``scherzer`` at import time, so ``scherzer.config`` can import
:class:`WebSettings` for its ``[web]`` section without an import cycle.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MIN_TOKEN_CHARS", "WebSettings", "WebUser", "WebUserToken", "load_users"]

#: Shortest accepted token: 16 characters of token_urlsafe are 96 bits; shorter ones are guessable.
MIN_TOKEN_CHARS = 16

Role = Literal["observer", "operator"]


class WebUser(BaseModel):
    """One browser user: a name (shown, logged), a role, and the file holding the token."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    role: Role = "observer"
    token_file: str = Field(min_length=1)


class WebSettings(BaseModel):
    """The ``[web]`` section: where the web view listens and who may use it."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="start the web view beside `scherzer daemon`")
    host: str = "127.0.0.1"
    port: int = Field(8577, ge=0, le=65535, description="0 = any free port")
    allow_remote: bool = Field(False, description="permit a non-loopback host (needs TLS too)")
    tls_certfile: str = ""
    tls_keyfile: str = ""
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host headers accepted (DNS-rebinding guard); empty = loopback names + host",
    )
    users: list[WebUser] = Field(default_factory=list)
    # The web view's own daemon connections when the daemon requires CURVE: one key pair per
    # role, so the daemon itself refuses an operator action made over the observer connection.
    curve_observer_key: str = Field("", description=".key_secret of the web view's observer")
    curve_operator_key: str = Field("", description=".key_secret of the web view's operator")
    curve_server_key: str = Field("", description="the daemon's public .key")

    def is_loopback(self) -> bool:
        """True for 127.0.0.0/8, ::1 and localhost."""
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    def check(self) -> None:
        """Refuse settings that would expose the web view unauthenticated or in clear text."""
        from scherzer.config import ConfigError

        if not self.users:
            raise ConfigError("web.users is empty: no one could use the web view")
        if self.is_loopback():
            return
        if not self.allow_remote:
            raise ConfigError(
                f"web.host {self.host!r} is not loopback: set web.allow_remote = true (and TLS) "
                "or keep 127.0.0.1 behind a reverse proxy"
            )
        if not (self.tls_certfile and self.tls_keyfile):
            raise ConfigError(
                f"web.host {self.host!r} is not loopback: set web.tls_certfile and "
                "web.tls_keyfile so tokens never cross the network in clear text"
            )

    def host_names(self) -> list[str]:
        """The Host header values the app accepts."""
        if self.allowed_hosts:
            return list(self.allowed_hosts)
        return sorted({"127.0.0.1", "localhost", "::1", "[::1]", self.host})


@dataclass(frozen=True)
class WebUserToken:
    """A user with the token read from its file."""

    name: str
    role: Role
    token: str


def load_users(settings: WebSettings) -> list[WebUserToken]:
    """Read every user's token; :class:`ConfigError` for a missing, short or shared token."""
    from scherzer.config import ConfigError

    out: list[WebUserToken] = []
    seen_tokens: set[str] = set()
    seen_names: set[str] = set()
    for user in settings.users:
        path = Path(user.token_file).expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"web user {user.name!r}: cannot read {path}: {exc}") from exc
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
            raise ConfigError(
                f"web user {user.name!r}: the token in {path} must be one word of at least "
                f"{MIN_TOKEN_CHARS} characters"
            )
        if token in seen_tokens or user.name in seen_names:
            raise ConfigError(f"web user {user.name!r}: name and token must be unique")
        seen_tokens.add(token)
        seen_names.add(user.name)
        out.append(WebUserToken(user.name, user.role, token))
    return out
