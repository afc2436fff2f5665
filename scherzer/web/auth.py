"""Who is asking, and may they: tokens → users, the API's roles on every route, CSRF guard.

Credentials travel in the ``Authorization`` header, either ``Bearer <token>`` (scripts) or HTTP
Basic ``<name>:<token>`` (browsers: a 401 with ``WWW-Authenticate: Basic`` makes the browser ask
once and then send the credentials with every same-origin request, ``EventSource`` and ``<img>``
included, so the page needs no login code and no route — not even the page itself — is served
without a role). Tokens are compared in constant time.

Every route is built with :func:`guarded`, which states the role the API requires for the same
action (``observer`` to see, ``operator`` to pause/resume/cancel) and refuses before the handler
runs: 401 without valid credentials, 403 with too small a role. State-changing routes also need
the ``X-Scherzer-Request`` header and a same-origin ``Origin``/``Sec-Fetch-Site`` (a cross-site
form or script cannot set the header without a CORS preflight, which this app never grants).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from scherzer.web.settings import WebUserToken

__all__ = ["CSRF_HEADER", "ROLE_RANK", "Guarded", "Users", "guarded"]

Role = Literal["observer", "operator"]
ROLE_RANK = {"observer": 0, "operator": 1}
CSRF_HEADER = "X-Scherzer-Request"
REALM = 'Basic realm="scherzer", charset="UTF-8"'
log = structlog.get_logger("scherzer.web")

Handler = Callable[[Request], Response | Awaitable[Response]]


class Users:
    """The configured users, looked up by token (constant-time comparison against each)."""

    def __init__(self, users: Iterable[WebUserToken]) -> None:
        self._users = list(users)

    def by_token(self, token: str, name: str | None = None) -> WebUserToken | None:
        found = None
        for user in self._users:  # no early exit: timing does not tell which entry matched
            if hmac.compare_digest(user.token.encode(), token.encode()):
                found = user
        if found is not None and name is not None and name != found.name:
            return None
        return found

    def from_header(self, header: str | None) -> WebUserToken | None:
        """The user an ``Authorization`` header proves, or None."""
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            return self.by_token(value)
        if scheme.lower() == "basic" and value:
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            name, sep, token = decoded.partition(":")
            return self.by_token(token, name) if sep and token else None
        return None


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def _cross_site(request: Request) -> str | None:
    """Why a state-changing request looks cross-site (None if it is same-origin)."""
    if request.headers.get(CSRF_HEADER) != "1":
        return f"missing header {CSRF_HEADER}: 1"
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-site request ({site})"
    origin = request.headers.get("origin")
    if origin is not None:
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin != own:
            return f"origin {origin} is not {own}"
    return None


@dataclass(frozen=True)
class Guarded:
    """A handler with the role it needs (kept on the route so tests can list every route)."""

    role: Role
    handler: Handler
    changes_state: bool

    async def __call__(self, request: Request) -> Response:
        users: Users = request.app.state.users
        user = users.from_header(request.headers.get("authorization"))
        if user is None:
            return _error(401, "unauthorized", "credentials needed", {"WWW-Authenticate": REALM})
        if ROLE_RANK[user.role] < ROLE_RANK[self.role]:
            log.info("web: refused", user=user.name, role=user.role, path=request.url.path)
            return _error(403, "forbidden", f"{self.role} role needed; you are {user.role}")
        if self.changes_state and (why := _cross_site(request)):
            return _error(403, "forbidden", why)
        request.state.user = user
        if self.changes_state:
            log.info("web: action", user=user.name, path=request.url.path)
        if inspect.iscoroutinefunction(self.handler):
            return await self.handler(request)
        return await run_in_threadpool(self.handler, request)


def guarded(role: Role, handler: Handler, *, changes_state: bool = False) -> Guarded:
    """``handler`` behind the role check (and the CSRF check when it changes state)."""
    return Guarded(role, handler, changes_state)
