"""The protocol reference (``docs/protocol.md``), generated from the models in
:mod:`scherzer.daemon.protocol` and :mod:`scherzer.daemon.plans` so the two never disagree.

Regenerate with ``python -m scherzer.daemon.protocol > docs/protocol.md``.
"""

from __future__ import annotations

import json
import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel

from scherzer.daemon import plans
from scherzer.daemon.plans import PlanEstimate
from scherzer.daemon.protocol import (
    COMMON_ERRORS,
    METHODS,
    PROTOCOL_VERSION,
    ArrayMeta,
    Counters,
    ErrorCode,
    FrameInfo,
    FrameRecordModel,
    JobInfo,
)

__all__ = ["ERROR_DOCS", "EVENT_DOCS", "protocol_markdown"]

#: What each error code means (a test checks every code has its line).
ERROR_DOCS: dict[ErrorCode, str] = {
    ErrorCode.BAD_REQUEST: "the request is not a JSON object envelope (bad JSON, wrong frame "
    "layout, wrong field types, unexpected binary frames)",
    ErrorCode.UNSUPPORTED_VERSION: "`v` is not a protocol version this daemon speaks",
    ErrorCode.UNKNOWN_METHOD: "`method` is not in the table below",
    ErrorCode.INVALID_PARAMS: "`params` do not match the method's schema; `details` lists the "
    "offending fields",
    ErrorCode.TOO_LARGE: "the request exceeds the size limits (`details` gives them)",
    ErrorCode.UNAUTHORIZED: "the connection carries no identity the daemon knows",
    ErrorCode.FORBIDDEN: "the caller's role may not call this method (observers are read-only)",
    ErrorCode.BUSY: "the instruments are owned by a running job; retry when it is finished",
    ErrorCode.NOT_FOUND: "no such job or frame",
    ErrorCode.CONFLICT: "the request contradicts the current state (e.g. cancel a finished job)",
    ErrorCode.LIMIT_EXCEEDED: "a value is outside the configured instrument or plan limits",
    ErrorCode.DEVICE_ERROR: "a device failed (message says which and what to do)",
    ErrorCode.DEVICE_TIMEOUT: "a device did not answer in time",
    ErrorCode.DEVICE_DISCONNECTED: "the link to a device is down",
    ErrorCode.DEVICE_BUSY: "the device itself reports that it is busy",
    ErrorCode.DEVICE_PROTOCOL_ERROR: "a device answered with garbage (checksum, framing)",
    ErrorCode.DEVICE_READ_ONLY: "the instrument is connected read-only (`devices.read_only`): "
    "optics changes are refused and nothing is sent",
    ErrorCode.SHUTTING_DOWN: "the daemon is stopping and accepts no new work",
    ErrorCode.PROCESSING_FAILED: "a job's processing steps failed (job error only; the "
    "acquired frames stay in the file)",
    ErrorCode.DISK_FULL: "the data disk is (nearly) full: a job ends `failed` with this code "
    "(frames already written stay readable) and the queue pauses until space returns or "
    "`queue_resume`; a report that cannot be written fails with it too",
    ErrorCode.INTERNAL: "a bug in the daemon; the log has the traceback",
}

#: What each event topic carries.
EVENT_DOCS: dict[str, str] = {
    "job": "`{job: JobInfo}` whenever a job changes state",
    "frame": "`{job_id, frame_id, index, total, signal, record}` after each frame is on disk; an "
    "EFTEM series adds `eftem: {energy_ev, exposure_s, scale_to_first, statistic, dark_acquired, "
    "darks_acquired}`",
    "progress": "`{job_id, frames_done, frames_total, skipped}` (`skipped`: frame indices left "
    "out under the `skip` error policy)",
    "live": "`{job_id, signal, frame_id, frames_averaged, frames_skipped, shift_px, peak}` after "
    "each frame of a time series or rotated-scan series is folded into the job's running, "
    "drift-compensated average (fetch it with `frame_get` by `frame_id`; stored in the file as "
    "`live_average_<signal>` when the job ends, with the indices folded in `folded_frames`); "
    "for a focal series, after each image is registered against the ones before it: "
    '`{job_id, signal, kind: "focal_registration", index, frames_registered, '
    "relative_defocus_nm, defocus_step_nm, shift_px, drift_step_px, peak, used}` (stored as the "
    "`live_focal_registration` table)",
    "log": "`{level, event, ...}` warnings and errors from the daemon log",
    "heartbeat": "`{state, uptime_s, current_job, counters}` every `heartbeat_s`",
    "queue": "`{paused, queued, counters}` when the queue changes",
}


def _schema_table(model: type[BaseModel]) -> str:
    fields = model.model_fields
    if not fields:
        return "_none_\n"
    rows = ["| field | type | default | constraints | notes |", "|---|---|---|---|---|"]
    for name, f in fields.items():
        ann = _type_name(f.annotation)
        default = "required" if f.is_required() else f"`{_default_repr(f)}`"
        limits = ", ".join(_constraint(m) for m in f.metadata)
        key = f.alias or name
        rows.append(f"| `{key}` | {ann} | {default} | {limits} | {f.description or ''} |")
    return "\n".join(rows) + "\n"


def _constraint(meta: Any) -> str:
    """``Gt(gt=0)`` → ``> 0``; ``allow_inf_nan=False`` → ``finite``; other metadata as its repr."""
    if getattr(meta, "allow_inf_nan", None) is False:
        return "finite"
    ops = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "len ≥", "max_length": "len ≤"}
    for attr, op in ops.items():
        if getattr(meta, attr, None) is not None:
            return f"{op} {getattr(meta, attr)}"
    return str(meta)


def _default_repr(f: Any) -> str:
    value = f.default_factory() if f.default_factory is not None else f.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value)


def _type_name(ann: Any) -> str:
    if "Annotated" in str(ann):
        return _annotated_text(ann).replace("|", "\\|")
    text = getattr(ann, "__name__", None) if isinstance(ann, type) else None
    text = text or re.sub(r"\b[A-Za-z_][\w.]*\.(\w+)", r"\1", str(ann))  # drop module paths
    return text.replace("|", "\\|")


def _annotated_text(ann: Any) -> str:
    """A type with constrained parts, readable: ``tuple[int (≥ 1, ≤ 65536), ...] | None``."""
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        base, *meta = args
        parts = [c for m in meta for c in getattr(m, "metadata", [m])]  # a Field holds several
        return f"{_annotated_text(base)} ({', '.join(_constraint(c) for c in parts)})"
    if origin in (Union, types.UnionType):
        return " | ".join(_annotated_text(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_annotated_text(a) for a in args)}]"
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", str(ann))


def protocol_markdown() -> str:
    """The full protocol reference (``docs/protocol.md`` is this text; a test checks it)."""
    out = _transport_and_errors()
    out.append("## Methods\n")
    for name, spec in METHODS.items():
        out.append(f"### `{name}`\n")
        out.append(f"{spec.summary}\n")
        out.append(f"- role: `{spec.role}`; idempotent: {'yes' if spec.idempotent else 'no'}")
        if spec.binary_reply:
            out.append("- reply carries binary array frames (see `arrays`)")
        errs = ", ".join(f"`{c}`" for c in spec.errors) or "none beyond the common ones"
        out.append(f"- errors: {errs}\n")
        out.append(f"**params** (`{spec.params.__name__}`)\n")
        out.append(_schema_table(spec.params))
        out.append(f"**result** (`{spec.result.__name__}`)\n")
        out.append(_schema_table(spec.result))
    out.append("## Shared models\n")
    for model in (JobInfo, FrameInfo, FrameRecordModel, ArrayMeta, Counters, PlanEstimate):
        out.append(f"### `{model.__name__}`\n")
        out.append(_schema_table(model))
    out.append("## Plans (`params.plan` of `job_submit`, discriminated by `kind`)\n")
    for model in plans.PLAN_MODELS:
        out.append(f"### `{model.model_fields['kind'].default}` (`{model.__name__}`)\n")
        out.append(f"{(model.__doc__ or '').strip()}\n")
        out.append(_schema_table(model))
    out.append("## Events\n")
    out.append(
        'Every event: `{"v": 1, "topic", "seq", "time_s", "instance", "data"}`; '
        "`seq` increases by one per event of one daemon instance.\n"
    )
    out.append("| topic | data |")
    out.append("|---|---|")
    out += [f"| `{t}` | {d} |" for t, d in EVENT_DOCS.items()]
    return "\n".join(out) + "\n"


def _transport_and_errors() -> list[str]:
    """The reference's opening: title, transport rules and the error-code table."""
    out = [
        f"# Scherzer daemon protocol (version {PROTOCOL_VERSION})\n",
        "_Generated by `python -m scherzer.daemon.protocol` from `scherzer/daemon/protocol.py`; "
        "do not edit by hand._\n",
        "## Transport\n",
        "- Requests go to a ZeroMQ **ROUTER** socket (default `tcp://127.0.0.1:5577`). Use a "
        "**DEALER** socket and send `[json]` (plus binary frames where a method takes them — none "
        "does in version 1), or a REQ socket (`[json]`, ZeroMQ adds the empty delimiter). Many "
        "requests may be in flight; match replies by `id`.",
        "- Events are published on a **PUB** socket (default `tcp://127.0.0.1:5578`) as two "
        "frames: topic (ASCII) and a JSON event.",
        '- Request: `{"v": 1, "id": str (1-128 chars), "method": str, "params": {...}}`. '
        "Unknown envelope fields are refused.",
        '- Reply: `{"v": 1, "id": <same>, "ok": true, "result": {...}}` or '
        '`{"v": 1, "id": <same or null>, "ok": false, "error": {"code": str, '
        '"message": str, "details": any}}`. `id` is null only when the request\'s id could not '
        "be read.",
        "- Arrays follow the JSON as extra frames: the result lists "
        "`arrays: [{frame, dtype, shape, "
        "name}]`; `frame` counts binary frames after the JSON (0 = first), `dtype` is a numpy "
        "type string (little-endian, e.g. `<f4`), the buffer is C-ordered.",
        "- Limits: the JSON frame may be at most `server.max_request_bytes` (default 1 MiB) and a "
        "request at most `server.max_frames` frames (default 4) → `too_large`; a single message "
        "above `server.max_message_bytes` (default 64 MiB) makes ZeroMQ drop the connection.",
        "- Security: a loopback bind accepts local clients with role `server.local_role`. Any "
        "other bind requires CURVE: the client must use a key pair whose public key is in "
        "`security.clients` with a role; others are refused during the handshake and get no "
        "reply at all. Observers may call only `observer` methods (else `forbidden`).",
        "- Loopback without CURVE: local clients are **operators** by default "
        '(`server.local_role = "operator"`). Reason: only accounts logged in to the '
        "instrument PC can reach a loopback endpoint, and on a microscope PC those are the "
        "people at the microscope, who must run `scherzer submit` without key management; and "
        "the operator role controls the instrument, not the PC: no request names a file the "
        "daemon opens outside its configured directories (camera curves are names in "
        "`calibrations_dir`), and no error carries a file's content. On a shared machine set "
        '`server.local_role = "observer"`, or `security.curve = true` (CURVE works on '
        "loopback too) so that only listed keys are operators.",
        "- Device methods (`lens_set`, `camera_acquire`, `scan_acquire`, also `lens_get`) are "
        "refused with `busy` while a job owns the instruments. They reply once the device call "
        "is finished; the daemon keeps serving other requests meanwhile.\n",
        "## Error codes\n",
        "| code | meaning |",
        "|---|---|",
    ]
    out += [f"| `{c}` | {ERROR_DOCS[c]} |" for c in ErrorCode]
    common = ", ".join(f"`{c}`" for c in COMMON_ERRORS)
    out.append(f"\nEvery method may also return {common}.\n")
    return out
