"""Pydantic validation errors in words and in JSON: the one place they are formatted.

Used by the settings loader (:mod:`scherzer.config`), the daemon's protocol and runs files, and the
CLI. A problem's location is its dotted field path (``devices.camera_shape.0``); neither form ever
carries the rejected input (a value may be long or private).

A leaf module: it imports nothing from ``scherzer``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported by the callers that have an error to format, not here
    from pydantic import ValidationError

__all__ = ["format_validation_error", "validation_details", "validation_problems"]


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    """Each problem as plain JSON: ``{"loc": [str, ...], "msg": str, "type": str}``."""
    return [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")), "type": e.get("type")}
        for e in exc.errors(include_url=False, include_input=False)
    ]


def validation_problems(exc: ValidationError) -> list[str]:
    """Each problem as one line ``"<dotted.location>: <message>"``."""
    return [f"{'.'.join(d['loc'])}: {d['msg']}" for d in validation_details(exc)]


def format_validation_error(exc: ValidationError) -> str:
    """All problems on one line, separated by ``"; "`` (for exception messages)."""
    return "; ".join(validation_problems(exc))
