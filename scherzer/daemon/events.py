"""Events (PUB socket) and the mailbox that brings work from other threads to the request loop.

ZeroMQ sockets belong to one thread. The request loop owns the ROUTER and PUB sockets; the
executor, device calls and the logger run elsewhere. They hand their replies and events to a
:class:`Mailbox` (a thread-safe queue plus a self-pipe the loop polls), and the loop sends them.
Events carry a per-instance sequence number assigned when they are sent, so subscribers can spot
gaps (PUB drops messages for slow subscribers by design; state is always recoverable through
``status``/``job_get``).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from scherzer.daemon.protocol import PROTOCOL_VERSION, encode_json

__all__ = ["EventBus", "Mailbox", "OutgoingReply"]


@dataclass(frozen=True)
class OutgoingReply:
    """A reply built off the loop thread: ROUTER envelope + JSON + binary frames."""

    frames: list[Any]


@dataclass(frozen=True)
class _OutgoingEvent:
    topic: str
    data: dict[str, Any]


class Mailbox:
    """Thread-safe queue the loop drains when :attr:`fd` becomes readable."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    @property
    def fd(self) -> int:
        return self._read_fd

    def post(self, item: Any) -> None:
        self._queue.put(item)
        self.wake()

    def wake(self) -> None:
        """Make the loop's poll return (async-signal-safe: used by signal handlers too)."""
        try:
            os.write(self._write_fd, b"x")
        except BlockingIOError:  # the pipe is full: the loop is already due to wake
            pass

    def drain(self) -> list[Any]:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class EventBus:
    """Publishes events; :meth:`publish` may be called from any thread."""

    def __init__(self, socket: zmq.Socket, mailbox: Mailbox, instance: str) -> None:
        self._socket = socket
        self._mailbox = mailbox
        self._loop_thread = threading.get_ident()
        self.instance = instance
        self.seq = 0

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        if threading.get_ident() == self._loop_thread:
            self.send(topic, data)
        else:
            self._mailbox.post(_OutgoingEvent(topic, data))

    def send(self, topic: str, data: dict[str, Any]) -> None:
        """Loop thread only."""
        self.seq += 1
        event = {
            "v": PROTOCOL_VERSION,
            "topic": topic,
            "seq": self.seq,
            "time_s": time.time(),
            "instance": self.instance,
            "data": data,
        }
        try:
            self._socket.send_multipart([topic.encode("ascii"), encode_json(event)], zmq.NOBLOCK)
        except zmq.Again:  # no room for slow subscribers: PUB semantics, drop
            pass

    def handle(self, item: Any) -> bool:
        """Send a mailbox item if it is an event; False if it is something else."""
        if isinstance(item, _OutgoingEvent):
            self.send(item.topic, item.data)
            return True
        return False
