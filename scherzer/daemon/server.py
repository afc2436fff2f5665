"""The daemon: a ZeroMQ ROUTER request loop with an explicit dispatch table.

The loop (main thread) owns the ROUTER and PUB sockets. Each request is decoded and validated
(:meth:`Daemon._decode`), checked against the caller's role, and handed to its handler from
:attr:`Daemon.dispatch` — a literal dict, never a lookup by name on an object. Handlers answer at
once; device calls run on the executor thread and answer later through the mailbox, so the loop
never blocks. Every failure becomes a well-formed error reply (see ``docs/protocol.md``).

SIGTERM/SIGINT: the executor stops at the next frame boundary (the running job becomes
``interrupted``, its file closed), the loop then closes the sockets and :meth:`Daemon.run`
returns 0.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from typing import Any

import structlog
import zmq
from pydantic import BaseModel, ValidationError

import scherzer
from scherzer.config import Settings
from scherzer.daemon import protocol as P
from scherzer.daemon.admission import Admission, estimate_plan, plan_problems
from scherzer.daemon.calls import Call, Deferred, Handler, Reply, error_fields, id_of
from scherzer.daemon.database import ensure_database_ok
from scherzer.daemon.device_handlers import DeviceHandlers
from scherzer.daemon.events import EventBus, Mailbox, OutgoingReply
from scherzer.daemon.executor import Executor, open_instruments
from scherzer.daemon.files import count_frames_on_disk, repair_job_file
from scherzer.daemon.frames import FrameCache
from scherzer.daemon.jobs import JobStore
from scherzer.daemon.logging import configure_logging
from scherzer.daemon.plans import parse_plan, plan_to_json
from scherzer.daemon.security import LOCAL_USER, Identity, ServerKeys, ZapHandler
from scherzer.drivers.base import DeviceError
from scherzer.drivers.instruments import Instruments
from scherzer.validation import validation_problems

__all__ = ["Daemon", "run_daemon"]

log = structlog.get_logger("scherzer.daemon")
ErrorCode = P.ErrorCode


class Daemon(DeviceHandlers):
    """One daemon instance; :meth:`run` serves until stopped and returns the exit code."""

    def __init__(self, settings: Settings, instruments: Instruments | None = None) -> None:
        self.settings = settings
        self.instance = uuid.uuid4().hex[:12]
        self.started = time.time()
        self.data_dir = settings.data_path
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.mailbox = Mailbox()
        self.stopping = False
        self.devices_counter = 0
        self.executor_dead = False
        self._loop_thread = threading.get_ident()
        self._instruments = instruments
        self.dispatch: dict[str, Handler] = {
            "status": self._status,
            "job_submit": self._job_submit,
            "job_get": self._job_get,
            "job_cancel": self._job_cancel,
            "queue_list": self._queue_list,
            "queue_move": self._queue_move,
            "queue_pause": self._queue_pause,
            "queue_resume": self._queue_resume,
            "history_list": self._history_list,
            "lens_get": self._lens_get,
            "lens_set": self._lens_set,
            "camera_acquire": self._camera_acquire,
            "scan_acquire": self._scan_acquire,
            "frame_get": self._frame_get,
            "plan_validate": self._plan_validate,
            "report_create": self._report_create,
        }

    # --- life cycle ------------------------------------------------------------------------
    def _open(self) -> None:
        s = self.settings.server
        ensure_database_ok(self.data_dir / "jobs.sqlite")  # damaged: one clear message, first
        self.keys = ServerKeys.from_settings(self.settings)  # refuses unsafe binds
        self.log_path = configure_logging(
            self.data_dir,
            level=self.settings.logging.level,
            console=self.settings.logging.console,
            forward=lambda rec: self.events.publish("log", rec),
            max_bytes=int(self.settings.logging.file_max_mb * 2**20),
            backups=self.settings.logging.file_backups,
        )
        self.ctx = zmq.Context()
        self.zap = ZapHandler(self.ctx, self.keys) if self.keys else None
        if self.zap:
            self.zap.start()
        self.router = self._socket(zmq.ROUTER, s.endpoint)
        self.router.router_mandatory = False
        self.router.copy_threshold = 0  # keep real zmq messages: their metadata holds User-Id
        self.pub = self._socket(zmq.PUB, s.events_endpoint)
        self.events = EventBus(self.pub, self.mailbox, self.instance)
        db_path = self.data_dir / "jobs.sqlite"
        self.store = JobStore(db_path)
        for job in self.store.history(limit=1000, states=["running", "paused", "processing"]):
            repair_job_file(job.output_file)  # a killed writer's flags, before counting frames
        recovered = self.store.recover(count_frames_on_disk)
        for job in recovered:
            log.warning("job interrupted by a previous stop", job=job.job_id,
                        frames_on_disk=job.frames_done)  # fmt: skip
        self.problems: list[str] = []  # what the watchdog found
        self._estimates: dict[int, int] = {}  # job id → estimated disk bytes (queued jobs)
        self.frames = FrameCache(s.frame_cache)
        instruments = self._instruments or open_instruments(self.settings)
        self.executor = Executor(
            self.store, instruments, self.settings, self.events.publish, self.frames
        )
        self.executor.on_queue_change = self._queue_event
        self.executor.start()

    def _socket(self, kind: int, endpoint: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.maxmsgsize = self.settings.server.max_message_bytes
        if self.keys:
            self.keys.apply(sock)
        sock.bind(endpoint)
        return sock

    def request_stop(self, *_: Any) -> None:
        """Signal-safe: start a graceful stop."""
        self.stopping = True
        self.mailbox.wake()

    def run(self) -> int:
        self._open()
        for sig in (signal.SIGTERM, signal.SIGINT):
            if threading.current_thread() is threading.main_thread():
                signal.signal(sig, self.request_stop)
        s = self.settings.server
        log.info(
            "daemon started",
            endpoint=s.endpoint,
            events=s.events_endpoint,
            curve=bool(self.keys),
            data_dir=str(self.data_dir),
            instance=self.instance,
            log=str(self.log_path),
        )
        try:
            self._loop()
        finally:
            self._close()
        return 0

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.mailbox.fd, zmq.POLLIN)
        beat_every = self.settings.server.heartbeat_s
        next_beat = time.monotonic()
        stop_deadline = None
        while True:
            if self.stopping and stop_deadline is None:
                log.info("stopping at the next frame boundary")
                self.executor.stop()
                stop_deadline = time.monotonic() + self.settings.server.stop_timeout_s
            if stop_deadline is not None and (
                not self.executor.alive or time.monotonic() > stop_deadline
            ):
                self._drain_mailbox()
                return
            now = time.monotonic()
            if now >= next_beat:
                self._watchdog()
                self.events.send("heartbeat", self._heartbeat())
                next_beat = now + beat_every
            timeout_ms = max(1, int(min(next_beat - now, 0.2) * 1000))
            for sock, _ in poller.poll(timeout_ms):
                if sock is self.router:
                    self._serve_batch()
                else:
                    self._drain_mailbox()

    def _close(self) -> None:
        alive = not self.executor.join(self.settings.server.stop_timeout_s)
        if alive:
            log.error("executor did not stop in time; exiting anyway")
        self.executor.instruments.close()
        self.store.close()
        log.info("daemon stopped", instance=self.instance)
        self.router.close(linger=0)
        self.pub.close(linger=200)
        if self.zap:
            self.zap.stop()
        self.ctx.term()
        self.mailbox.close()

    def _drain_mailbox(self) -> None:
        for item in self.mailbox.drain():
            if isinstance(item, OutgoingReply):
                self._send(item.frames)
            else:
                self.events.handle(item)

    def _watchdog(self) -> None:
        """Notice a dead executor thread or a processing worker that lost a job's bookkeeping:
        ``status`` says so (state ``error``) and the executor's job is failed, never left
        ``running``."""
        if not self.executor.alive and not self.stopping and not self.executor_dead:
            self.executor_dead = True
            self.problems.append("the executor thread died; restart the daemon")
            log.error("watchdog: the executor thread died")
            err = P.ErrorBody(
                code=ErrorCode.INTERNAL,
                message="the executor thread died during this job; frames on disk are kept",
            )
            for job in self.store.history(limit=100, states=["running", "paused"]):
                try:
                    info = self.store.set_state(job.job_id, "failed", error=err)
                    self.events.send("job", {"job": info.model_dump(mode="json")})
                except Exception as exc:
                    log.error("watchdog: cannot fail the job", job=job.job_id, error=str(exc))
        worker = self.executor.processing.problem
        if worker and f"processing worker: {worker}" not in self.problems:
            self.problems.append(f"processing worker: {worker}")

    def _heartbeat(self) -> dict[str, Any]:
        return {
            "state": self._state(),
            "uptime_s": time.time() - self.started,
            "current_job": self.executor.current_job,
            "counters": self._counters().model_dump(),
        }

    # --- request handling ------------------------------------------------------------------
    def _serve_batch(self, limit: int = 64) -> None:
        """Serve what is waiting (at most ``limit``, so events and replies are not starved)."""
        for _ in range(limit):
            if not self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            self._serve(self.router.recv_multipart(zmq.NOBLOCK, copy=False))

    def _send(self, frames: list[Any]) -> None:
        try:
            last = len(frames) - 1
            for i, part in enumerate(frames):
                flags = zmq.NOBLOCK | (zmq.SNDMORE if i < last else 0)
                # zero-copy only pays off for big buffers (arrays); small parts are copied
                self.router.send(part, flags, copy=len(part) < 65536)
        except zmq.ZMQError as exc:  # peer gone or its queue full: nothing else to do
            log.warning("reply dropped", error=str(exc))

    def _identity(self, frame: zmq.Frame) -> Identity:
        if self.keys is None:
            return Identity(LOCAL_USER, P.Role(self.settings.server.local_role))
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            user = None
        ident = self.keys.identity_of(user) if user else None
        if ident is None:
            raise P.ProtocolError(
                ErrorCode.UNAUTHORIZED, "the connection carries no known identity"
            )
        return ident

    def _serve(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        body = frames[1:]
        envelope = [identity]
        if body and len(body[0]) == 0:  # REQ peers send an empty delimiter
            envelope.append(b"")
            body = body[1:]
        request_id: str | None = None
        try:
            if not body:
                raise P.ProtocolError(ErrorCode.BAD_REQUEST, "empty request: send one JSON frame")
            who = self._identity(body[0])
            raw = body[0].bytes
            self._check_size(len(raw), len(body))
            obj = P.decode_json(raw)
            request_id = id_of(obj)
            req, spec, params = self._decode(obj, len(body))
            request_id = req.id
            call = Call(envelope, req.id, req.method, who)
            self._authorise(call, spec)
            out = self.dispatch[req.method](call, params)
            if isinstance(out, Reply):
                self._send(self._reply_frames(envelope, req.id, out))
        except P.ProtocolError as exc:
            self._send_error(envelope, request_id, exc.code, exc.message, exc.details)
        except DeviceError as exc:
            code = ErrorCode.of_device(exc.code)
            self._send_error(envelope, request_id, code, str(exc), exc.details or None)
        except Exception as exc:
            log.exception("internal error", request=request_id)
            self._send_error(envelope, request_id, ErrorCode.INTERNAL, f"internal error: {exc}")

    def _check_size(self, n_bytes: int, n_frames: int) -> None:
        s = self.settings.server
        if n_bytes > s.max_request_bytes or n_frames > s.max_frames:
            raise P.ProtocolError(
                ErrorCode.TOO_LARGE,
                f"request of {n_bytes} bytes in {n_frames} frames exceeds the limits",
                {"max_request_bytes": s.max_request_bytes, "max_frames": s.max_frames},
            )

    def _decode(self, obj: Any, n_frames: int) -> tuple[P.Request, P.MethodSpec, BaseModel]:
        if not isinstance(obj, dict):
            raise P.ProtocolError(ErrorCode.BAD_REQUEST, "the request must be a JSON object")
        if obj.get("v") != P.PROTOCOL_VERSION and isinstance(obj.get("v"), int):
            raise P.ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {obj['v']} is not supported; this daemon speaks "
                f"{P.PROTOCOL_VERSION}",
            )
        try:
            req = P.Request.model_validate(obj)
        except ValidationError as exc:
            raise P.ProtocolError(
                ErrorCode.BAD_REQUEST, "malformed request envelope", P.validation_details(exc)
            ) from exc
        spec = P.METHODS.get(req.method)
        if spec is None or req.method not in self.dispatch:
            raise P.ProtocolError(
                ErrorCode.UNKNOWN_METHOD,
                f"unknown method {req.method[:64]!r}",
                {"methods": sorted(P.METHODS)},
            )
        if n_frames > 1:
            raise P.ProtocolError(
                ErrorCode.BAD_REQUEST, f"{req.method} takes no binary frames; got {n_frames - 1}"
            )
        try:
            params = spec.params.model_validate(req.params)
        except ValidationError as exc:
            raise P.ProtocolError(
                ErrorCode.INVALID_PARAMS,
                f"invalid params for {req.method}",
                P.validation_details(exc),
            ) from exc
        return req, spec, params

    def _authorise(self, call: Call, spec: P.MethodSpec) -> None:
        if not call.identity.role.allows(spec.role):
            raise P.ProtocolError(
                ErrorCode.FORBIDDEN,
                f"{call.identity.user} ({call.identity.role}) may not call {call.method}; "
                f"it needs role {spec.role}",
            )
        if self.stopping and spec.role == P.Role.OPERATOR:
            raise P.ProtocolError(ErrorCode.SHUTTING_DOWN, "the daemon is stopping")

    def _reply_frames(self, envelope: list[bytes], request_id: str, reply: Reply) -> list[Any]:
        body = P.ok_reply(request_id, reply.result)
        if reply.arrays:
            body["result"]["arrays"] = [
                P.array_meta(a, i, name).model_dump() for i, (name, a) in enumerate(reply.arrays)
            ]
        try:
            head = P.encode_json(body)
        except ValueError as exc:
            log.exception("reply not encodable")
            head = P.encode_json(P.error_reply(request_id, ErrorCode.INTERNAL, str(exc)))
            return [*envelope, head]
        return [*envelope, head, *(P.array_to_buffer(a) for _, a in reply.arrays)]

    def _send_error(
        self,
        envelope: list[bytes],
        request_id: str | None,
        code: ErrorCode,
        message: str,
        details: Any = None,
    ) -> None:
        try:
            head = P.encode_json(P.error_reply(request_id, code, message, details))
        except ValueError:
            head = P.encode_json(P.error_reply(request_id, code, message, None))
        self._send([*envelope, head])

    def finish(self, call: Call, reply: Reply | None, error: BaseException | None) -> None:
        """Answer a deferred call from any thread."""
        if error is None and reply is not None:
            frames = self._reply_frames(call.envelope, call.request_id, reply)
        else:
            code, message, details = error_fields(error)
            if code == ErrorCode.INTERNAL:
                call.log.error("device call failed", exc_info=error)
            head = P.encode_json(P.error_reply(call.request_id, code, message, details))
            frames = [*call.envelope, head]
        if threading.get_ident() == self._loop_thread:
            self._send(frames)
        else:
            self.mailbox.post(OutgoingReply(frames))

    # --- handlers: state -------------------------------------------------------------------
    def _state(self) -> str:
        if self.stopping:
            return "stopping"
        if self.executor_dead:
            return "error"
        if self.executor.job_paused:
            return "paused"
        return "running" if self.executor.busy else "idle"

    def _counters(self) -> P.Counters:
        return P.Counters(
            jobs=self.store.jobs_counter,
            queue=self.store.queue_counter,
            devices=self.devices_counter,
        )

    def _status(self, call: Call, _: P.Empty) -> Reply:
        return Reply(
            P.StatusResult(
                protocol=P.PROTOCOL_VERSION,
                version=scherzer.__version__,
                instance=self.instance,
                uptime_s=time.time() - self.started,
                state=self._state(),
                queue_paused=self.executor.queue_paused,
                queue_pause_reason=self.executor.pause_reason,
                problems=list(self.problems),
                current_job=self.executor.current_job,
                queued=self.store.queued_count(),
                counters=self._counters(),
                devices=self.executor.instruments.describe(),
                user=call.identity.user,
                role=call.identity.role,
            )
        )

    def _queue_event(self) -> None:
        """Publish the queue state (any thread)."""
        self.events.publish(
            "queue",
            {
                "paused": self.executor.queue_paused,
                "queued": self.store.queued_count(),
                "counters": self._counters().model_dump(),
            },
        )

    def _committed_disk_bytes(self) -> int:
        """Disk the queued jobs (their estimates) and the running job (its rest) will write."""
        total = 0
        queued = self.store.queued_ids()
        keep = {*queued, self.executor.current_job}
        self._estimates = {k: v for k, v in self._estimates.items() if k in keep}
        for job_id in queued:
            if job_id not in self._estimates:  # queued before a restart
                try:
                    plan = parse_plan(self.store.get(job_id).plan)
                    est = estimate_plan(plan, self.executor.instruments)
                except Exception:
                    est = None
                self._estimates[job_id] = est.disk_bytes if est else 0
            total += self._estimates[job_id]
        running = self.executor.current_job
        if running is not None and running in self._estimates:
            job = self.store.get(running)
            left = 1.0 - job.frames_done / max(job.frames_total, 1)
            total += int(self._estimates[running] * max(left, 0.0))
        return total

    def _admit(self, plan: Any) -> Admission:
        return plan_problems(
            plan,
            self.settings,
            self.executor.instruments,
            now_s=time.time(),
            free_bytes=_free_disk_bytes(self.data_dir),
            committed_bytes=self._committed_disk_bytes(),
        )

    def _job_submit(self, call: Call, p: P.JobSubmitParams) -> Reply:
        plan = p.plan
        admission = self._admit(plan)
        if admission.invalid:
            raise P.ProtocolError(
                ErrorCode.INVALID_PARAMS, "; ".join(admission.invalid), admission.invalid
            )
        problems = admission.problems
        if problems:
            raise P.ProtocolError(ErrorCode.LIMIT_EXCEEDED, "; ".join(problems), problems)
        job = self.store.submit(
            plan_to_json(plan),
            kind=plan.kind,
            name=plan.name,
            submitter=call.identity.user,
            frames_total=plan.n_frames(),
            position=p.position,
        )
        self._estimates[job.job_id] = admission.estimate.disk_bytes if admission.estimate else 0
        call.log.info("job queued", job=job.job_id, kind=job.kind)
        self.executor.wake()
        self.events.send("job", {"job": job.model_dump(mode="json")})
        self._queue_event()
        return Reply(P.JobResult(job=job))

    def _job_get(self, call: Call, p: P.JobParams) -> Reply:
        return Reply(P.JobResult(job=self.store.get(p.job_id)))

    def _job_cancel(self, call: Call, p: P.JobParams) -> Reply:
        job = self.store.cancel(p.job_id)
        call.log.info("cancel requested", job=p.job_id, state=job.state)
        self.executor.wake()
        self.events.send("job", {"job": job.model_dump(mode="json")})
        self._queue_event()
        return Reply(P.JobResult(job=job))

    def _queue_list(self, call: Call, _: P.Empty) -> Reply:
        return Reply(P.JobsResult(jobs=self.store.queue(), paused=self.executor.queue_paused))

    def _queue_move(self, call: Call, p: P.QueueMoveParams) -> Reply:
        jobs = self.store.move(p.job_id, p.position)
        self._queue_event()
        return Reply(P.JobsResult(jobs=jobs, paused=self.executor.queue_paused))

    def _queue_pause(self, call: Call, _: P.Empty) -> Reply:
        self.executor.pause()  # persisted: counts as a queue change
        call.log.info("queue paused")
        self._queue_event()
        return Reply(P.QueueStateResult(paused=True))

    def _queue_resume(self, call: Call, _: P.Empty) -> Reply:
        self.executor.resume()
        call.log.info("queue resumed")
        self._queue_event()
        return Reply(P.QueueStateResult(paused=False))

    def _history_list(self, call: Call, p: P.HistoryParams) -> Reply:
        jobs = self.store.history(p.limit, p.before_id, p.states)
        return Reply(P.JobsResult(jobs=jobs, paused=self.executor.queue_paused))

    def _plan_validate(self, call: Call, p: P.PlanValidateParams) -> Reply:
        try:
            plan = parse_plan(p.plan)
        except ValidationError as exc:
            return Reply(P.PlanValidateResult(valid=False, problems=validation_problems(exc)))
        admission = self._admit(plan)
        return Reply(
            P.PlanValidateResult(
                valid=not admission.all_problems,
                problems=admission.all_problems,
                estimate=admission.estimate,
                disk_free_bytes=_free_disk_bytes(self.data_dir),
                disk_reserve_bytes=self.settings.limits.min_free_disk_bytes,
            )
        )

    def _report_create(self, call: Call, p: P.ReportParams) -> Deferred:
        """Reads the job files in a thread (never in the request loop), then replies."""
        from scherzer.daemon.report import write_report

        jobs = [self.store.get(i) for i in p.job_ids]  # not_found before any work

        def run() -> None:
            try:
                path, summaries = write_report(jobs, self.data_dir, p.title, p.name)
                call.log.info("report written", path=str(path), jobs=len(jobs))
                result = P.ReportResult(path=str(path), jobs=[s.to_json() for s in summaries])
                self.finish(call, Reply(result), None)
            except Exception as exc:
                self.finish(call, None, exc)

        threading.Thread(target=run, name="report", daemon=True).start()
        return Deferred()


def _free_disk_bytes(path: Any) -> int:
    import shutil

    return shutil.disk_usage(path).free


def run_daemon(settings: Settings) -> int:
    """Run a daemon in this process until SIGTERM/SIGINT; returns the exit code."""
    return Daemon(settings).run()
