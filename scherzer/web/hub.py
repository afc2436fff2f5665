"""The daemon's PUB events, read by one thread and fanned out to every browser's SSE stream.

One SUB connection serves any number of browsers: the reader thread hands each event to every
subscriber's asyncio queue through its event loop (``call_soon_threadsafe``). A browser too slow
to keep up loses events rather than holding memory (its queue is bounded); the page re-reads the
queue and job state over REST on every ``job``/``queue`` event, so a lost event costs nothing
lasting. The hub also remembers the last frame event and the progress of the running job, so a
page opened mid-job shows them at once, and adds an ETA to every ``progress`` event.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from scherzer.clients.client import Client

__all__ = ["EventHub", "ProgressTracker"]

log = structlog.get_logger("scherzer.web")

#: Events a browser may lag behind before further ones are dropped for it (memory vs. gaps).
SUBSCRIBER_QUEUE = 256
#: Progress samples the ETA is fitted over: more = steadier, fewer = follows rate changes sooner.
ETA_SAMPLES = 8
#: How long the reader waits for an event before checking whether it should stop.
POLL_S = 0.2


class ProgressTracker:
    """Frames done over (daemon) time for the running job; the ETA from the recent rate."""

    def __init__(self, samples: int = ETA_SAMPLES) -> None:
        self._job: int | None = None
        self._points: deque[tuple[float, int]] = deque(maxlen=samples)

    def update(self, job_id: int, time_s: float, done: int, total: int) -> float | None:
        """Record one progress event; the seconds left (None until the rate is known)."""
        if job_id != self._job:
            self._job = job_id
            self._points.clear()
        self._points.append((time_s, done))
        (t0, d0), (t1, d1) = self._points[0], self._points[-1]
        if d1 <= d0 or t1 <= t0:
            return None if done < total else 0.0
        return max(total - done, 0) * (t1 - t0) / (d1 - d0)


class EventHub:
    """A thread reading the daemon's events and publishing them to async subscribers."""

    def __init__(self, client_factory: Callable[[], Client]) -> None:
        self._factory = client_factory
        self._subs: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._tracker = ProgressTracker()
        self.last_frame: dict[str, Any] | None = None
        self.last_progress: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._run, name="web-events", daemon=True)

    def start(self, timeout_s: float = 5.0) -> None:
        """Start reading; returns once subscribed (events before that are not seen)."""
        self._thread.start()
        self._ready.wait(timeout_s)

    def close(self, join: bool = True) -> None:
        """Stop reading and end every subscriber's stream (``join``: wait for the reader)."""
        self._stop.set()
        if join and self._thread.is_alive():
            self._thread.join(timeout=2.0)
        with self._lock:
            subs = list(self._subs.values())
            self._subs.clear()
        for loop, queue in subs:
            self._deliver(loop, queue, None)

    def subscribe(self) -> tuple[int, asyncio.Queue]:
        """A queue (call from the event loop) that receives ``{topic, seq, data}`` dicts;
        ``None`` means the hub closed."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)
        with self._lock:
            key = id(queue)
            self._subs[key] = (asyncio.get_running_loop(), queue)
        if self._stop.is_set():
            queue.put_nowait(None)
        return key, queue

    def unsubscribe(self, key: int) -> None:
        with self._lock:
            self._subs.pop(key, None)

    @staticmethod
    def _deliver(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: Any) -> None:
        def put() -> None:
            if item is None:  # the end marker must arrive even when the queue is full
                while queue.full():
                    queue.get_nowait()
            if not queue.full():
                queue.put_nowait(item)

        try:
            loop.call_soon_threadsafe(put)
        except RuntimeError:  # that loop is closed: the browser is gone
            pass

    def _run(self) -> None:
        try:
            with self._factory() as client, client.events() as stream:
                self._ready.set()
                while not self._stop.is_set():
                    event = stream.next(POLL_S)
                    if event is not None:
                        self.publish(event.topic, event.seq, event.time_s, dict(event.data))
        except Exception:
            log.exception("web: event reader failed; live updates stop")
        finally:
            self._ready.set()

    def publish(self, topic: str, seq: int, time_s: float, data: dict[str, Any]) -> None:
        """Remember what a fresh page needs, add the ETA, hand the event to every subscriber."""
        if topic == "progress":
            data["eta_s"] = self._tracker.update(
                data["job_id"], time_s, data["frames_done"], data["frames_total"]
            )
            self.last_progress = data
        elif topic == "frame":
            self.last_frame = data
        item = {"topic": topic, "seq": seq, "data": data}
        with self._lock:
            subs = list(self._subs.values())
        for loop, queue in subs:
            self._deliver(loop, queue, item)
