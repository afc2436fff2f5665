"""One request in flight and a handler's answer: the pieces the request loop and handlers share.

A handler returns a :class:`Reply` (answered at once) or :class:`Deferred` (answered later from
another thread through ``Daemon.finish``). :func:`error_fields` maps an exception to the error
reply's code, message and details.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
from pydantic import BaseModel

from scherzer.daemon import protocol as P
from scherzer.daemon.diskspace import is_disk_full
from scherzer.daemon.security import Identity
from scherzer.drivers.base import DeviceError

__all__ = ["Call", "Deferred", "Handler", "Reply", "error_fields", "id_of"]

log = structlog.get_logger("scherzer.daemon")
ErrorCode = P.ErrorCode


@dataclass
class Reply:
    """A handler's immediate answer: a result model and arrays sent as binary frames."""

    result: BaseModel
    arrays: list[tuple[str, np.ndarray]] = field(default_factory=list)


class Deferred:
    """A handler that will answer later (from another thread) through :meth:`Call.finish`."""


@dataclass
class Call:
    """One request in flight: who sent it and how to answer."""

    envelope: list[bytes]
    request_id: str | None
    method: str
    identity: Identity

    @property
    def log(self) -> Any:
        """A logger bound to this client, method and request (built only when used)."""
        return log.bind(client=self.identity.user, method=self.method, request=self.request_id)


Handler = Callable[[Call, Any], "Reply | Deferred"]


def error_fields(error: BaseException | None) -> tuple[ErrorCode, str, Any]:
    """The error reply fields for an exception a handler or device call raised."""
    if isinstance(error, P.ProtocolError):
        return error.code, error.message, error.details
    if isinstance(error, DeviceError):
        return ErrorCode.of_device(error.code), str(error), error.details or None
    if is_disk_full(error):
        return ErrorCode.DISK_FULL, f"the data disk is full: {error}", None
    if isinstance(error, ValueError):
        return ErrorCode.INVALID_PARAMS, str(error), None
    return ErrorCode.INTERNAL, f"internal error: {error}", None


def id_of(obj: Any) -> str | None:
    """The request id if ``obj`` is a JSON object with a usable string id (for error replies)."""
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= P.MAX_ID_CHARS else None
