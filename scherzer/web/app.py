"""The web view as an ASGI app (Starlette): the page, a JSON API over the daemon client, SSE.

Every route is listed in :func:`routes` with the role the daemon's API requires for the same
action — ``observer`` to see (status, queue, history, jobs, frames, plots, reports, events),
``operator`` to pause, resume or cancel — and is wrapped by :func:`auth.guarded`; nothing is
served without credentials (see :mod:`scherzer.web.auth`). The app talks to the daemon
only through :class:`scherzer.clients.client.Client` (:mod:`.link`) and its PUB events
(:mod:`.hub`); it needs no change inside the daemon.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from scherzer.clients.client import DaemonError
from scherzer.web.auth import Users, guarded
from scherzer.web.files import DataFiles
from scherzer.web.hub import EventHub
from scherzer.web.link import ClientFactory, DaemonLink
from scherzer.web.render import frame_png
from scherzer.web.settings import WebSettings, load_users

__all__ = ["create_app", "routes"]

STATIC = Path(__file__).with_name("static")
STATIC_FILES = {
    "app.js": "text/javascript",
    "app.css": "text/css",
    "index.html": "text/html",
}
#: Idle seconds between SSE comments (keeps proxies and the browser from closing the stream).
KEEPALIVE_S = 15.0
NO_STORE = {"Cache-Control": "no-store"}
#: Daemon error code → HTTP status.
HTTP_STATUS = {
    "forbidden": 403,
    "unauthorized": 403,
    "not_found": 404,
    "conflict": 409,
    "busy": 409,
    "invalid_params": 400,
    "shutting_down": 503,
    "timeout": 504,
}


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=NO_STORE)


def _not_found(what: str) -> JSONResponse:
    return _json({"error": {"code": "not_found", "message": f"no such {what}"}}, 404)


def _link(request: Request) -> DaemonLink:
    return request.app.state.link


def _dump(model: Any) -> Any:
    return None if model is None else model.model_dump(mode="json")


# --- pages ---------------------------------------------------------------------------------------
def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=NO_STORE)


def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC_FILES:
        return _not_found("file")
    return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers=NO_STORE)


# --- observer: what is happening -----------------------------------------------------------------
def overview(request: Request) -> Response:
    """Status, the running job, the queue, the last frame and progress, and who you are."""

    def ask(c: Any) -> dict[str, Any]:
        status = c.status()
        current = c.job(status.current_job) if status.current_job is not None else None
        queue = c.queue()
        return {"status": _dump(status), "current": _dump(current),
                "queue": [_dump(j) for j in queue.jobs], "paused": queue.paused}  # fmt: skip

    data = _link(request).call("observer", ask)
    hub: EventHub = request.app.state.hub
    user = request.state.user
    data.update(last_frame=hub.last_frame, last_progress=hub.last_progress,
                user={"name": user.name, "role": user.role})  # fmt: skip
    return _json(data)


def history(request: Request) -> Response:
    try:
        limit = min(max(int(request.query_params.get("limit", "30")), 1), 200)
    except ValueError:
        limit = 30
    jobs = _link(request).call("observer", lambda c: c.history(limit=limit))
    return _json({"jobs": [_dump(j) for j in jobs]})


def job(request: Request) -> Response:
    info = _link(request).call("observer", lambda c: c.job(request.path_params["job_id"]))
    files: DataFiles = request.app.state.files
    plots = files.listing(files.job_folder(info.output_file))
    return _json({"job": _dump(info), "plots": plots})


def job_plot(request: Request) -> Response:
    info = _link(request).call("observer", lambda c: c.job(request.path_params["job_id"]))
    files: DataFiles = request.app.state.files
    found = files.file(files.job_folder(info.output_file), request.path_params["name"])
    if found is None:
        return _not_found("plot")
    return FileResponse(found[0], media_type=found[1], headers=NO_STORE)


def frame(request: Request) -> Response:
    """A recent frame (``frame_get``) as a PNG with a percentile stretch."""
    image, info = _link(request).call(
        "observer", lambda c: c.frame_get(request.path_params["frame_id"])
    )
    data = image if image.ndim == 2 else image.reshape(-1, *image.shape[-2:])[0]
    headers = {**NO_STORE, "X-Frame-Signal": info.signal, "X-Frame-Index": str(info.record.index)}
    return Response(frame_png(data), media_type="image/png", headers=headers)


def reports(request: Request) -> Response:
    return _json({"reports": request.app.state.files.reports()})


def report(request: Request) -> Response:
    files: DataFiles = request.app.state.files
    found = files.report(request.path_params["stem"])
    if found is None:
        return _not_found("report")
    text, folder = found
    return _json({"stem": request.path_params["stem"], "markdown": text,
                  "images": files.listing(folder)})  # fmt: skip


def report_image(request: Request) -> Response:
    files: DataFiles = request.app.state.files
    found = files.report(request.path_params["stem"])
    image = None if found is None else files.file(found[1], request.path_params["name"])
    if image is None:
        return _not_found("image")
    return FileResponse(image[0], media_type=image[1], headers=NO_STORE)


async def events(request: Request) -> Response:
    """Server-sent events: the daemon's PUB events (``event:`` = topic, ``data:`` = JSON)."""
    hub: EventHub = request.app.state.hub
    key, queue = hub.subscribe()

    async def stream():
        try:
            yield "retry: 2000\n\n"
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if item is None:
                    return
                body = json.dumps(item["data"], separators=(",", ":"))
                yield f"id: {item['seq']}\nevent: {item['topic']}\ndata: {body}\n\n"
        finally:
            hub.unsubscribe(key)

    headers = {**NO_STORE, "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


# --- operator: pause, resume, cancel -------------------------------------------------------------
def cancel(request: Request) -> Response:
    info = _link(request).call("operator", lambda c: c.cancel(request.path_params["job_id"]))
    return _json({"job": _dump(info)})


def pause(request: Request) -> Response:
    return _json({"paused": _link(request).call("operator", lambda c: c.pause())})


def resume(request: Request) -> Response:
    return _json({"paused": _link(request).call("operator", lambda c: c.resume())})


def routes() -> list[Route]:
    """Every route with the role it needs (the one table; tests walk it)."""

    def r(path: str, role: str, handler: Any, method: str = "GET") -> Route:
        guard = guarded(role, handler, changes_state=method != "GET")  # type: ignore[arg-type]
        return Route(path, guard.__call__, methods=[method])

    return [
        r("/", "observer", page),
        r("/static/{name}", "observer", static),
        r("/api/overview", "observer", overview),
        r("/api/history", "observer", history),
        r("/api/jobs/{job_id:int}", "observer", job),
        r("/api/jobs/{job_id:int}/plots/{name}", "observer", job_plot),
        r("/api/frames/{frame_id:int}.png", "observer", frame),
        r("/api/reports", "observer", reports),
        r("/api/reports/{stem}", "observer", report),
        r("/api/reports/{stem}/{name}", "observer", report_image),
        r("/api/events", "observer", events),
        r("/api/jobs/{job_id:int}/cancel", "operator", cancel, "POST"),
        r("/api/queue/pause", "operator", pause, "POST"),
        r("/api/queue/resume", "operator", resume, "POST"),
    ]


async def _daemon_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DaemonError)
    status = HTTP_STATUS.get(exc.code, 502)
    return _json({"error": {"code": exc.code, "message": exc.message}}, status)


def create_app(
    settings: WebSettings, client_factory: ClientFactory, data_dir: str | Path | None = None
) -> Starlette:
    """The app; ``client_factory(role)`` opens a daemon :class:`Client` acting with ``role``;
    ``data_dir``: the daemon's data directory (plots and reports; None = none served)."""
    settings.check()
    hub = EventHub(lambda: client_factory("observer"))
    link = DaemonLink(client_factory)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await asyncio.to_thread(hub.start)
        try:
            yield
        finally:
            hub.close()
            link.close()

    app = Starlette(
        routes=routes(),
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=settings.host_names())],
        exception_handlers={DaemonError: _daemon_error},
        lifespan=lifespan,
    )
    app.state.users = Users(load_users(settings))
    app.state.link = link
    app.state.hub = hub
    app.state.files = DataFiles(data_dir)
    return app
