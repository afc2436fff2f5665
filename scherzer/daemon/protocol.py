"""The Scherzer wire protocol: pydantic models of every request, reply, error and event.

Imported by the daemon and by clients alike. Transport is ZeroMQ (see ``docs/protocol.md``, which
:func:`protocol_markdown` generates from the models here):

* request: one JSON frame ``{"v": 1, "id": str, "method": str, "params": {...}}``;
* reply: ``{"v": 1, "id": same, "ok": true, "result": {...}}`` or
  ``{"v": 1, "id": same, "ok": false, "error": {"code", "message", "details"}}``, optionally
  followed by binary frames; a result carrying arrays lists them as :class:`ArrayMeta` (``frame``
  is the index of the binary frame after the JSON frame, dtype and shape describe the raw
  C-ordered little-endian buffer);
* events on the PUB socket: two frames, the topic (ASCII) and a JSON :class:`Event`.

Units are in field names (``defocus_nm``, ``exposure_s``, ``dwell_us``, ``rotation_deg``).
Nothing is ever looked up by reflection and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scherzer.daemon.plans import Plan, PlanEstimate
from scherzer.daemon.wire_bounds import (
    MAX_DEFOCUS_NM,
    MAX_PIXEL_NM,
    MAX_STIGMATOR_NM,
    MAX_TIME_US,
    Angle,
    Int64,
    PixelCount,
    PixelIndex,
    QueueIndex,
    SignalName,
    Tilt,
)
from scherzer.validation import validation_details  # re-exported: the protocol's error details

__all__ = [
    "MAX_ID_CHARS",
    "METHODS",
    "PROTOCOL_VERSION",
    "ArrayMeta",
    "ErrorBody",
    "ErrorCode",
    "Event",
    "JobInfo",
    "MethodSpec",
    "ProtocolError",
    "Request",
    "Role",
    "array_from_buffer",
    "array_meta",
    "decode_json",
    "encode_json",
    "error_reply",
    "ok_reply",
    "protocol_markdown",
    "record_model",
    "validation_details",
]

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 128


class ErrorCode(StrEnum):
    """The closed set of error codes a reply may carry."""

    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_METHOD = "unknown_method"
    INVALID_PARAMS = "invalid_params"
    TOO_LARGE = "too_large"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    BUSY = "busy"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    LIMIT_EXCEEDED = "limit_exceeded"
    DEVICE_ERROR = "device_error"
    DEVICE_TIMEOUT = "device_timeout"
    DEVICE_DISCONNECTED = "device_disconnected"
    DEVICE_BUSY = "device_busy"
    DEVICE_PROTOCOL_ERROR = "device_protocol_error"
    DEVICE_READ_ONLY = "device_read_only"
    SHUTTING_DOWN = "shutting_down"
    PROCESSING_FAILED = "processing_failed"
    DISK_FULL = "disk_full"
    INTERNAL = "internal"

    @classmethod
    def of_device(cls, code: str) -> ErrorCode:
        """A driver's error code, or ``device_error`` if a driver invents one we do not know."""
        try:
            return cls(code)
        except ValueError:
            return cls.DEVICE_ERROR


class Role(StrEnum):
    """Who may do what: observers read, operators also submit, cancel and drive devices."""

    OBSERVER = "observer"
    OPERATOR = "operator"

    def allows(self, required: Role) -> bool:
        return required == Role.OBSERVER or self == Role.OPERATOR


class ProtocolError(Exception):
    """An error that becomes an error reply (raised by handlers and by the envelope decoder)."""

    def __init__(self, code: ErrorCode, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.details = details


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- envelope ---------------------------------------------------------------------------------
class Request(_Model):
    """The request envelope (``params`` are validated per method afterwards)."""

    v: int
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    method: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(_Model):
    code: ErrorCode
    message: str
    details: Any = None


class ArrayMeta(_Model):
    """An array sent as raw binary frame number ``frame`` (0 = first frame after the JSON)."""

    frame: int = Field(ge=0)
    dtype: str
    shape: list[int]
    name: str = ""


# --- shared result pieces ---------------------------------------------------------------------
JobState = Literal[
    "queued",
    "running",
    "paused",
    "acquired",
    "processing",
    "done",
    "failed",
    "cancelled",
    "interrupted",
]
ACTIVE_STATES = ("running", "paused", "acquired", "processing")
FINAL_STATES = ("done", "failed", "cancelled", "interrupted")


class JobInfo(_Model):
    """A job as stored in the queue/history (times are Unix seconds)."""

    job_id: int
    kind: str
    name: str = ""
    state: JobState
    plan: dict[str, Any]
    submitter: str
    created_s: float
    started_s: float | None = None
    finished_s: float | None = None
    frames_done: int = 0
    frames_total: int = 0
    queue_position: int | None = None
    output_file: str | None = None
    error: ErrorBody | None = None
    cancel_requested: bool = False


class FrameRecordModel(_Model):
    """One frame's acquisition record (see ``scherzer.stack.FrameRecord``; NaN becomes null)."""

    index: int
    time_s: float
    defocus_nominal_nm: float | None = None
    defocus_readback_nm: float | None = None
    scan_rotation_deg: float = 0.0
    exposure_s: float | None = None
    dwell_us: float | None = None
    dose_e_per_A2: float | None = None
    signal: str = "image"


def record_model(record: Any) -> FrameRecordModel:
    """A ``scherzer.stack.FrameRecord`` as its wire model (NaN → null)."""
    values = {}
    for name in FrameRecordModel.model_fields:
        v = getattr(record, name)
        values[name] = None if isinstance(v, float) and not np.isfinite(v) else v
    return FrameRecordModel(**values)


class LensState(_Model):
    defocus_nm: float
    stigmator_nm: float
    stigmator_deg: float
    beam_tilt_mrad: tuple[float, float]


class Counters(_Model):
    """Change counters: a client reloads a view only when its counter moved."""

    jobs: int
    queue: int
    devices: int


# --- per-method params and results ------------------------------------------------------------
class Empty(_Model):
    pass


class StatusResult(_Model):
    protocol: int
    version: str
    instance: str = Field(description="changes at every daemon start (counters restart then)")
    uptime_s: float
    state: Literal["idle", "running", "paused", "stopping", "error"] = Field(
        description="`error`: the executor thread died (see `problems`); restart the daemon"
    )
    queue_paused: bool
    queue_pause_reason: str | None = Field(
        None, description="why the queue holds by itself (e.g. the disk is full); null if not"
    )
    problems: list[str] = Field(
        default_factory=list, description="what the watchdog found wrong (dead threads)"
    )
    current_job: int | None
    queued: int
    counters: Counters
    devices: dict[str, str]
    user: str
    role: Role


class JobSubmitParams(_Model):
    plan: Plan
    position: QueueIndex | None = Field(None, description="queue index (0 = next); default: last")


class JobParams(_Model):
    job_id: Int64


class JobResult(_Model):
    job: JobInfo


class JobsResult(_Model):
    jobs: list[JobInfo]
    paused: bool = False


class QueueMoveParams(_Model):
    job_id: Int64
    position: QueueIndex = Field(description="new queue index, 0 = next to run")


class QueueStateResult(_Model):
    paused: bool


class HistoryParams(_Model):
    limit: int = Field(50, ge=1, le=1000)
    before_id: Int64 | None = Field(None, description="page: only jobs with a smaller id")
    states: list[JobState] | None = None


class LensSetParams(_Model):
    defocus_nm: float | None = Field(
        None, allow_inf_nan=False, ge=-MAX_DEFOCUS_NM, le=MAX_DEFOCUS_NM
    )
    stigmator_nm: float | None = Field(None, allow_inf_nan=False, ge=0, le=MAX_STIGMATOR_NM)
    stigmator_deg: Angle | None = None
    beam_tilt_mrad: tuple[Tilt, Tilt] | None = None
    wait_settled: bool = True


class CameraAcquireParams(_Model):
    exposure_s: float = Field(gt=0, le=3600)
    binning: int = Field(1, ge=1, le=16)
    region: tuple[PixelIndex, PixelIndex, PixelCount, PixelCount] | None = Field(
        None, description="(y0, x0, height, width)"
    )
    return_data: bool = Field(True, description="send the image now; otherwise use frame_get")


class ScanAcquireParams(_Model):
    size_px: tuple[PixelCount, PixelCount] = (256, 256)
    pixel_nm: float = Field(0.02, gt=0, le=MAX_PIXEL_NM, allow_inf_nan=False)
    dwell_us: float = Field(2.0, gt=0, le=MAX_TIME_US, allow_inf_nan=False)
    flyback_us: float = Field(200.0, ge=0, le=MAX_TIME_US, allow_inf_nan=False)
    rotation_deg: Angle = 0.0
    signals: list[SignalName] = Field(default_factory=lambda: ["HAADF"], min_length=1, max_length=8)
    return_data: bool = True


class FrameInfo(_Model):
    frame_id: int
    signal: str
    shape: list[int]
    pixel_size_nm: tuple[float, float]
    record: FrameRecordModel
    job_id: int | None = None


class AcquireResult(_Model):
    frames: list[FrameInfo]
    arrays: list[ArrayMeta] = Field(default_factory=list)


class FrameGetParams(_Model):
    frame_id: Int64


class PlanValidateParams(_Model):
    plan: dict[str, Any]


class PlanValidateResult(_Model):
    valid: bool
    problems: list[str] = Field(default_factory=list)
    estimate: PlanEstimate | None = None
    disk_free_bytes: int | None = Field(None, description="free space in the data directory")
    disk_reserve_bytes: int | None = Field(None, description="space that must stay free")


class ReportParams(_Model):
    job_ids: list[Int64] = Field(min_length=1, max_length=10000)
    title: str = Field("Scherzer run", max_length=256)
    name: str = Field("report", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="file stem")


class ReportResult(_Model):
    path: str = Field(description="the Markdown report (PNGs in the folder beside it)")
    jobs: list[dict[str, Any]] = Field(description="per job: id, name, kind, state, frames, …")


@dataclass(frozen=True)
class MethodSpec:
    """One API method: parameter and result models, required role, possible error codes."""

    params: type[BaseModel]
    result: type[BaseModel]
    role: Role
    summary: str
    errors: tuple[ErrorCode, ...] = ()
    idempotent: bool = True
    binary_reply: bool = False


_DEV = (
    ErrorCode.BUSY,
    ErrorCode.LIMIT_EXCEEDED,
    ErrorCode.DEVICE_ERROR,
    ErrorCode.DEVICE_TIMEOUT,
    ErrorCode.DEVICE_DISCONNECTED,
    ErrorCode.DEVICE_BUSY,
    ErrorCode.DEVICE_PROTOCOL_ERROR,
)
_OBS, _OP = Role.OBSERVER, Role.OPERATOR

#: The API. The server's dispatch table has exactly these keys (a test checks it).
METHODS: dict[str, MethodSpec] = {
    "status": MethodSpec(Empty, StatusResult, _OBS, "Daemon state, queue size, change counters."),
    "job_submit": MethodSpec(
        JobSubmitParams,
        JobResult,
        _OP,
        "Queue a plan; the job is `queued` (validated against the limits first).",
        (ErrorCode.LIMIT_EXCEEDED, ErrorCode.SHUTTING_DOWN),
        idempotent=False,
    ),
    "job_get": MethodSpec(JobParams, JobResult, _OBS, "One job.", (ErrorCode.NOT_FOUND,)),
    "job_cancel": MethodSpec(
        JobParams,
        JobResult,
        _OP,
        "Cancel a queued job at once, or a running/paused one at the next frame boundary.",
        (ErrorCode.NOT_FOUND, ErrorCode.CONFLICT),
    ),
    "queue_list": MethodSpec(Empty, JobsResult, _OBS, "Queued jobs in the order they will run."),
    "queue_move": MethodSpec(
        QueueMoveParams,
        JobsResult,
        _OP,
        "Move a queued job to another queue index; returns the new queue.",
        (ErrorCode.NOT_FOUND, ErrorCode.CONFLICT),
    ),
    "queue_pause": MethodSpec(
        Empty,
        QueueStateResult,
        _OP,
        "Hold the queue; a running job pauses at its next frame boundary (state `paused`).",
    ),
    "queue_resume": MethodSpec(Empty, QueueStateResult, _OP, "Resume a paused job and the queue."),
    "history_list": MethodSpec(
        HistoryParams, JobsResult, _OBS, "All jobs (any state), newest first."
    ),
    "lens_get": MethodSpec(Empty, LensState, _OBS, "Read-back lens state.", _DEV),
    "lens_set": MethodSpec(
        LensSetParams,
        LensState,
        _OP,
        "Set any of defocus, stigmator, beam tilt; optionally wait to settle; returns read-back.",
        _DEV,
        idempotent=False,
    ),
    "camera_acquire": MethodSpec(
        CameraAcquireParams,
        AcquireResult,
        _OP,
        "Expose one camera frame (reply when read out); image as a binary frame.",
        _DEV,
        idempotent=False,
        binary_reply=True,
    ),
    "scan_acquire": MethodSpec(
        ScanAcquireParams,
        AcquireResult,
        _OP,
        "Scan one STEM frame with every requested signal; one binary frame per signal.",
        _DEV,
        idempotent=False,
        binary_reply=True,
    ),
    "frame_get": MethodSpec(
        FrameGetParams,
        AcquireResult,
        _OBS,
        "A recent frame (interactive or from a job's `frame` event) by `frame_id`.",
        (ErrorCode.NOT_FOUND,),
        binary_reply=True,
    ),
    "plan_validate": MethodSpec(
        PlanValidateParams,
        PlanValidateResult,
        _OBS,
        "Check a plan against schema and limits; estimated duration, dose and disk use.",
    ),
    "report_create": MethodSpec(
        ReportParams,
        ReportResult,
        _OP,
        "Write a Markdown summary report (outcome of every job, plots of fitted focus, peak "
        "heights, drift, thumbnails) under `<data_dir>/reports/`; replies when written.",
        (ErrorCode.NOT_FOUND,),
        idempotent=False,
    ),
}

#: Errors any method may return (envelope, auth, internal).
COMMON_ERRORS = (
    ErrorCode.BAD_REQUEST,
    ErrorCode.UNSUPPORTED_VERSION,
    ErrorCode.UNKNOWN_METHOD,
    ErrorCode.INVALID_PARAMS,
    ErrorCode.TOO_LARGE,
    ErrorCode.UNAUTHORIZED,
    ErrorCode.FORBIDDEN,
    ErrorCode.SHUTTING_DOWN,
    ErrorCode.INTERNAL,
)


# --- events -----------------------------------------------------------------------------------
EventTopic = Literal["job", "frame", "progress", "live", "log", "heartbeat", "queue"]


class Event(_Model):
    """One PUB message (second frame; the first frame is the topic)."""

    v: int = PROTOCOL_VERSION
    topic: EventTopic
    seq: int
    time_s: float
    instance: str
    data: dict[str, Any]


# --- encoding helpers -------------------------------------------------------------------------
def encode_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON; NaN/inf are refused (they are not JSON)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def decode_json(raw: bytes) -> Any:
    """Parse a JSON frame; :class:`ProtocolError` (bad_request) on anything else."""
    try:
        return json.loads(
            raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float
        )
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"request frame is not UTF-8 JSON: {exc}"
        ) from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    """A JSON number; one that overflows a double (``1e999``) is refused, not made infinite."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def ok_reply(request_id: str | None, result: BaseModel | dict) -> dict:
    body = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": body}


def error_reply(request_id: str | None, code: ErrorCode, message: str, details: Any = None) -> dict:
    err = {"code": str(ErrorCode(code)), "message": message, "details": details}
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": err}


def array_meta(arr: np.ndarray, frame: int, name: str = "") -> ArrayMeta:
    """Describe ``arr`` as sent in binary frame ``frame`` (little-endian, C order)."""
    return ArrayMeta(
        frame=frame,
        dtype=np.dtype(arr.dtype).newbyteorder("<").str,
        shape=list(arr.shape),
        name=name,
    )


def array_to_buffer(arr: np.ndarray) -> memoryview:
    le = np.ascontiguousarray(arr, dtype=np.dtype(arr.dtype).newbyteorder("<"))
    return memoryview(le).cast("B")


def array_from_buffer(meta: ArrayMeta, buffer: bytes | memoryview) -> np.ndarray:
    """Rebuild an array from its meta and raw buffer; ValueError if the size does not match."""
    dtype = np.dtype(meta.dtype)
    expected = int(np.prod(meta.shape, dtype=np.int64)) * dtype.itemsize
    if len(buffer) != expected:
        raise ValueError(
            f"array frame has {len(buffer)} bytes; {meta.shape} {dtype} needs {expected}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(meta.shape).astype(dtype.newbyteorder("="))


# --- documentation ----------------------------------------------------------------------------
def protocol_markdown() -> str:
    """The full protocol reference (``docs/protocol.md`` is this text; a test checks it); built
    by :mod:`scherzer.daemon.protocol_doc`."""
    from scherzer.daemon.protocol_doc import protocol_markdown as markdown

    return markdown()


if __name__ == "__main__":
    print(protocol_markdown(), end="")
