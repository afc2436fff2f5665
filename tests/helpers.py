"""Small helpers shared by the test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from scipy import ndimage

T = TypeVar("T")

#: Fresh ports tried when a server loses the race for its chosen port to another process
#: (another xdist worker, an outgoing connection) before giving up.
PORT_ATTEMPTS = 5
#: Longest wait for a test server to listen or exit (s): a hang guard, not an expected time.
SERVER_START_GUARD_S = 120.0
#: What the kernel's EADDRINUSE looks like in a server's error output (any case).
ADDRESS_IN_USE = "address already in use"


def wait_for(predicate: Callable[[], T], timeout_s: float = 20.0, every_s: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"condition not reached within {timeout_s} s")


class PortTaken(Exception):
    """A server could not bind the port it was given: another process took it first."""


def lost_port_race(text: str) -> bool:
    """True when a server's error output says its address was already in use."""
    return ADDRESS_IN_USE in text.lower()


def on_free_port(start: Callable[[int], T], attempts: int = PORT_ATTEMPTS) -> tuple[int, T]:
    """``(port, start(port))`` for a port from :func:`scherzer.clients.client.free_tcp_port`.

    A port found free can be taken by another process before the server binds it; ``start``
    raises :class:`PortTaken` then, and a new port is tried (up to ``attempts`` ports).
    """
    from scherzer.clients.client import free_tcp_port

    for attempt in range(1, attempts + 1):
        port = free_tcp_port()
        try:
            return port, start(port)
        except PortTaken:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def listens(pid: int, port: int) -> bool:
    """True when process ``pid`` holds a listening socket on ``port`` (Linux /proc)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
        tables = [Path(f"/proc/{pid}/net/{name}") for name in ("tcp", "tcp6")]
        lines = [ln for t in tables if t.exists() for ln in t.read_text().splitlines()[1:]]
    except OSError:  # the process is gone (or going)
        return False
    for line in lines:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
            return True
    return False


def serve_process(
    command: Callable[[int], Sequence[str]], port: int, **popen: object
) -> subprocess.Popen:
    """Start ``command(port)`` and return once that very process listens on ``port``.

    Raises :class:`PortTaken` when it exited because the address was in use, and fails with
    its error output when it exited for another reason. stderr goes to a temporary file (a
    pipe nobody reads could fill and stall a chatty server).
    """
    err = tempfile.TemporaryFile()
    popen.setdefault("stdout", subprocess.DEVNULL)
    proc = subprocess.Popen(list(command(port)), stderr=err, **popen)  # type: ignore[call-overload]
    wait_for(lambda: proc.poll() is not None or listens(proc.pid, port), SERVER_START_GUARD_S)
    if proc.poll() is None:
        return proc
    err.seek(0)
    text = err.read().decode(errors="replace")
    if lost_port_race(text):
        raise PortTaken(text[-500:])
    raise AssertionError(f"{command(port)[0]} exited with {proc.returncode}: {text[-2000:]}")


def serve_process_on_free_port(
    command: Callable[[int], Sequence[str]], **popen: object
) -> tuple[int, subprocess.Popen]:
    """:func:`serve_process` on a free port, on a new one when another process took it."""
    return on_free_port(lambda port: serve_process(command, port, **popen))


def processes_with_argument(argument: str) -> list[int]:
    """Pids of live (not zombie) processes with ``argument`` on their command line (Linux)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if argument.encode() in args and state != "Z":
            found.append(int(proc.name))
    return found


# --- what a command imports (the cold-start tests) -------------------------------------------
_RUN_AND_LIST = """
import json, sys
from scherzer.cli import console_main
code = console_main()  # the installed program: its process settings, then main(sys.argv[1:])
from threadpoolctl import threadpool_info
blas = sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
print(json.dumps({"code": code, "modules": sorted(sys.modules), "blas_threads": blas}),
      file=sys.stderr)
"""


def loaded_by(argv: list[str], env: dict | None = None) -> tuple[int, dict, dict]:
    """(exit code, the command's JSON, {"modules": loaded, "blas_threads": [...]}) of the
    ``scherzer ARGV`` program in a fresh interpreter, listed before it ends (``env``: the whole
    environment; default ours)."""
    proc = subprocess.run([sys.executable, "-c", _RUN_AND_LIST, *argv], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip
    listing = json.loads(proc.stderr.strip().splitlines()[-1])
    return listing.pop("code"), json.loads(proc.stdout), listing


def offenders(modules: list[str], forbidden: tuple[str, ...]) -> list[str]:
    """The loaded ``modules`` that are (or are inside) one of ``forbidden``."""
    return [m for m in modules if any(m == n or m.startswith(n + ".") for n in forbidden)]


# --- real frames with a known scan affine added (the scan-distortion tests) -----------------
def with_affine(frames: np.ndarray, affine: np.ndarray, crop: int, margin: int) -> np.ndarray:
    """Frames resampled (cubic) so that scan pixel (r, c) of each ``crop``² output shows the
    original at (r + a0 + a1·ŕ + a2·ć, c + a3 + a4·ŕ + a5·ć) + ``margin``, ŕ and ć centred on
    the crop (the engine's affine convention); ``affine`` is (n, 6). float32."""
    r, c = np.mgrid[0:crop, 0:crop].astype(float)
    rr, cc = r - (crop - 1) / 2, c - (crop - 1) / 2
    out = []
    for f, a in zip(frames, affine, strict=True):
        y = r + margin + a[0] + a[1] * rr + a[2] * cc
        x = c + margin + a[3] + a[4] * rr + a[5] * cc
        out.append(ndimage.map_coordinates(f, [y, x], order=3, mode="nearest"))
    return np.stack(out).astype(np.float32)
