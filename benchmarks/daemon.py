"""Daemon latency and queue throughput; prints one JSON object.

* ``status`` round trip on loopback (p50/p99, µs) with a raw DEALER peer and with the typed
  client, idle and while a job acquires simulated camera frames, as a ratio to a bare pyzmq
  REQ/REP echo (separate process, same machine, same run). Goal: raw p50 ≤ 2× echo.
* 1,000 ``job_submit`` calls (queue paused, so nothing runs): wall time and SQLite size.

Usage: ``python benchmarks/daemon.py [--n 2000] [--camera 256]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from scherzer.clients.client import LocalDaemon

# The echo server binds a port the kernel chooses at bind time and prints its endpoint: a port
# chosen beforehand could be taken by another process before the bind.
ECHO_SERVER = """
import zmq
s = zmq.Context().socket(zmq.REP)
s.bind("tcp://127.0.0.1:*")
print(s.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
while True:
    s.send(s.recv())
"""


def percentiles_us(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e6
    return {"p50_us": round(float(np.percentile(a, 50)), 1),
            "p99_us": round(float(np.percentile(a, 99)), 1)}  # fmt: skip


class Echo:
    """A bare REQ/REP echo server in its own process and a REQ peer."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True
        )
        endpoint = self.proc.stdout.readline().strip()
        if not endpoint.startswith("tcp://"):
            self.proc.kill()
            raise RuntimeError(f"the echo server did not start (exit {self.proc.wait()})")
        self.sock = zmq.Context.instance().socket(zmq.REQ)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def __call__(self) -> None:
        self.sock.send(STATUS)
        self.sock.recv()

    def close(self) -> None:
        self.sock.close()
        self.proc.kill()
        self.proc.wait()


STATUS = b'{"v":1,"id":"x","method":"status","params":{}}'


def raw_status(sock: zmq.Socket) -> None:
    sock.send(STATUS)
    reply = json.loads(sock.recv())
    assert reply["ok"], reply


def measure_status(daemon: LocalDaemon, echo: Echo, n: int) -> dict[str, dict[str, float]]:
    """Interleaved round trips (echo, raw status, client status), so machine load hits all."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(daemon.endpoint)
    calls = {"echo": echo, "raw": lambda: raw_status(dealer)}
    with daemon.client() as c:
        calls["client"] = c.status
        times: dict[str, list[float]] = {k: [] for k in calls}
        for i in range(n + 100):
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                if i >= 100:
                    times[name].append(time.perf_counter() - t)
    dealer.close()
    out = {k: percentiles_us(v) for k, v in times.items()}
    echo_p50 = out["echo"]["p50_us"]
    for k in ("raw", "client"):
        out[k]["p50_ratio_to_echo"] = round(out[k]["p50_us"] / echo_p50, 2)
    return out


def bench_submissions(daemon: LocalDaemon, count: int) -> dict[str, float]:
    with daemon.client(timeout_s=30) as c:
        c.pause()
        t = time.perf_counter()
        for i in range(count):
            c.submit({"kind": "camera_image", "exposure_s": 0.1, "name": f"b{i}"})
        elapsed = time.perf_counter() - t
        queued = c.status().queued
    db = Path(daemon.config["data_dir"]) / "jobs.sqlite"
    size = sum(p.stat().st_size for p in db.parent.glob("jobs.sqlite*"))
    return {"count": count, "queued": queued, "total_s": round(elapsed, 3),
            "per_job_ms": round(elapsed / count * 1e3, 3), "sqlite_bytes": size}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="round trips per measurement")
    ap.add_argument("--camera", type=int, default=256, help="simulated camera size (px)")
    args = ap.parse_args()
    result: dict = {"n": args.n, "camera_px": args.camera}
    devices = {"kind": "sim", "camera_shape": [args.camera, args.camera], "speedup": 1.0}
    echo = Echo()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = {"devices": devices, "logging": {"console": "off"}}
            with LocalDaemon(config, tmp) as d:
                result["status_idle"] = measure_status(d, echo, args.n)
                with d.client() as c:
                    job = c.submit({"kind": "camera_image", "exposure_s": 0.05, "repeat": 5000})
                    while c.job(job.job_id).frames_done < 2:
                        time.sleep(0.05)
                    result["status_during_job"] = measure_status(d, echo, args.n)
                    frames = c.job(job.job_id).frames_done
                    c.cancel(job.job_id)
                    c.wait(job.job_id, timeout_s=60)
                result["job_frames_during_measurement"] = frames
            pattern = {"devices": {"kind": "pattern"}, "logging": {"console": "off"}}
            with LocalDaemon(pattern, Path(tmp) / "submit") as d:
                result["submit_1000"] = bench_submissions(d, 1000)
    finally:
        echo.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
