"""An accelerated overnight for the daemon; prints one JSON object (not a test).

A real daemon process on the pattern devices (or ``--sim`` for the virtual microscope with its
lens served over a pseudo-terminal, ``serial-sim``) runs ``--jobs`` jobs of every plan kind with
injected device faults (camera/scan timeouts and disconnects under the ``retry``/``skip``/
``abort`` policies), SIGKILL + restart ``--kills`` times mid-queue, and — when root may mount a
tmpfs — a data disk that is nearly full for a while. Meanwhile a second client polls ``status``.

Reported: jobs by final state and error code, **frames lost** (frames the daemon announced as on
disk in a ``frame`` event but that the job's file does not hold; must be 0), the daemon's RSS over
time (MB), ``status`` latency (p50/p99 ms), wall time.

Usage: ``python benchmarks/soak.py [--jobs 500] [--kills 5] [--sim] [--seed 0]``
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from scherzer.clients.client import DaemonError, DaemonTimeout, LocalDaemon
from scherzer.daemon.protocol import FINAL_STATES
from scherzer.io import read_stacks

#: Faults injected at each daemon start: (kind, after this many more acquisitions).
FAULTS = ",".join(f"{'timeout' if i % 3 else 'disconnected'}:{7 + 13 * i}" for i in range(40))
POLICIES = ("abort", "skip", {"retries": 1, "then": "skip"}, {"retries": 2, "then": "abort"})


def plan_for(i: int, rng: random.Random) -> dict[str, Any]:
    """A small job of kind ``i mod 5`` with a random error policy."""
    policy = rng.choice(POLICIES)
    scan = {"size_px": [16, 16], "dwell_us": 0.5}
    kinds: list[dict[str, Any]] = [
        {"kind": "camera_image", "exposure_s": 0.05},
        {"kind": "scan_image", **scan},
        {"kind": "focal_series", "n_images": rng.randint(3, 6), "exposure_s": 0.05,
         "start_nm": -40.0, "step_nm": 5.0, "processing": []},
        {"kind": "rotated_scan", "n_frames": rng.choice([2, 4]), **scan, "processing": []},
        {"kind": "time_series", "n_frames": rng.randint(2, 5), "exposure_s": 0.05},
    ]  # fmt: skip
    plan = kinds[i % len(kinds)]
    plan.update(name=f"soak{i}", on_error=policy)
    return plan


class Watcher:
    """Collects frame events (job → frame indices announced as on disk) and status latency."""

    def __init__(self) -> None:
        self.announced: dict[int, set[tuple[str, int]]] = {}
        self.latency_s: list[float] = []
        self.rss_mb: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def follow(self, daemon: LocalDaemon) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._events, args=(daemon,), daemon=True),
                   threading.Thread(target=self._poll, args=(daemon,), daemon=True)]  # fmt: skip
        for t in threads:
            t.start()
        return threads

    def _events(self, daemon: LocalDaemon) -> None:
        with daemon.client() as c, c.events(["frame"]) as stream:
            while not self.stop.is_set():
                ev = stream.next(0.2)
                if ev is not None:
                    key = (ev.data["signal"], int(ev.data["index"]))
                    self.announced.setdefault(int(ev.data["job_id"]), set()).add(key)

    def _poll(self, daemon: LocalDaemon) -> None:
        with daemon.client(timeout_s=5.0, retries=0) as c:
            while not self.stop.wait(0.05):
                t0 = time.perf_counter()
                try:
                    c.status()
                except (DaemonTimeout, DaemonError):
                    continue  # the daemon is being killed/restarted
                self.latency_s.append(time.perf_counter() - t0)
                self._rss(daemon)

    def _rss(self, daemon: LocalDaemon) -> None:
        try:
            text = Path(f"/proc/{daemon.proc.pid}/status").read_text()
        except (OSError, AttributeError):
            return
        kb = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("VmRSS")),
                  0)  # fmt: skip
        self.rss_mb.append((time.time(), kb / 1024))


def frames_lost(jobs: list[Any], announced: dict[int, set[tuple[str, int]]]) -> int:
    """Frames announced as written that the job's file does not hold."""
    lost = 0
    for job in jobs:
        said = announced.get(job.job_id, set())
        if not said:
            continue
        held: set[tuple[str, int]] = set()
        if job.output_file and Path(job.output_file).exists():
            try:
                for name, stack in read_stacks(job.output_file).items():
                    held |= {(name, int(r.index)) for r in stack.records}
            except Exception:
                pass
        lost += len(said - held)
    return lost


def _maybe_tmpfs(root: Path, size_mb: int) -> Path | None:
    mount = root / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    return mount if done.returncode == 0 else None


class DiskFiller:
    """Makes the tmpfs data disk nearly full between two submission counts."""

    def __init__(self, disk: Path | None, start: int, stop: int) -> None:
        self.disk, self.start, self.stop = disk, start, stop
        self.file = disk / "filler.bin" if disk is not None else None

    def at(self, submitted: int) -> None:
        if self.file is None:
            return
        if submitted == self.start and not self.file.exists():
            leave = 6 << 20  # a few MB: jobs fail disk_full or wait for the budget
            self.file.write_bytes(b"\0" * max(shutil.disk_usage(self.disk).free - leave, 0))
        elif submitted == self.stop and self.file.exists():
            self.file.unlink()


def _submit_until(c: Any, submitted: list[int], target: int, rng: random.Random,
                  filler: DiskFiller) -> None:  # fmt: skip
    while len(submitted) < target:
        try:
            submitted.append(c.submit(plan_for(len(submitted), rng)).job_id)
        except DaemonError as exc:
            if exc.code != "limit_exceeded":
                raise
            time.sleep(0.2)  # the disk budget: wait for the queue to drain
        filler.at(len(submitted))


def _drain(c: Any, timeout_s: float) -> None:
    """Wait until nothing is queued or running (or the timeout)."""
    c.resume()  # a disk hold lifts at once; it comes back if the disk is still full
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = c.status()
        if status.queued == 0 and status.current_job is None:
            return
        time.sleep(0.5)


def _segments(args: argparse.Namespace, config: dict, root: Path, watcher: Watcher,
              filler: DiskFiller, rng: random.Random) -> tuple[list[int], list[Any]]:  # fmt: skip
    """Run the daemon once per segment, killing it (SIGKILL) at the end of all but the last."""
    kill_at = sorted(rng.sample(range(args.jobs // 10, args.jobs), args.kills))
    submitted: list[int] = []
    jobs: list[Any] = []
    for end in [*kill_at, args.jobs]:
        daemon = LocalDaemon(dict(config), root / "run").start()
        threads = watcher.follow(daemon)
        with daemon.client(timeout_s=30) as c:
            _submit_until(c, submitted, end, rng, filler)
            if end < args.jobs:
                time.sleep(rng.uniform(0.2, 1.0))
                daemon.kill()
            else:
                _drain(c, args.timeout_s)
                jobs = c.history(limit=args.jobs + 10)
        watcher.stop.set()
        for t in threads:
            t.join(5.0)
        watcher.stop.clear()
        daemon.stop()
    return submitted, jobs


def _summary(args: argparse.Namespace, submitted: list[int], jobs: list[Any], watcher: Watcher,
             disk: Path | None, wall_s: float) -> dict[str, Any]:  # fmt: skip
    lat = np.asarray(watcher.latency_s) * 1e3 if watcher.latency_s else np.zeros(1)
    rss = [round(mb, 1) for _, mb in watcher.rss_mb[:: max(len(watcher.rss_mb) // 20, 1)]]
    final = [j for j in jobs if j.error is not None and j.state in FINAL_STATES]
    return {
        "jobs_submitted": len(submitted),
        "jobs_by_state": dict(Counter(j.state for j in jobs)),
        "errors_by_code": dict(Counter(j.error.code for j in final)),
        "frames_announced": sum(len(v) for v in watcher.announced.values()),
        "frames_lost": frames_lost(jobs, watcher.announced),
        "kills": args.kills,
        "tmpfs_disk": disk is not None,
        "status_latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 2),
            "p99": round(float(np.percentile(lat, 99)), 2),
            "n": len(watcher.latency_s),
        },
        "rss_mb_over_time": rss,
        "wall_s": round(wall_s, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="scherzer-soak-"))
    disk = _maybe_tmpfs(root, args.disk_mb)
    devices: dict[str, Any] = {"kind": "pattern", "camera_shape": [32, 32], "speedup": 200.0}
    if args.sim:
        devices = {"kind": "sim", "camera_shape": [64, 64], "speedup": 200.0, "lens": "serial-sim"}
    config: dict[str, Any] = {"devices": {**devices, "fault": FAULTS},
                              "limits": {"min_free_disk_bytes": 0}}  # fmt: skip
    if disk is not None:
        config["data_dir"] = str(disk / "data")
    watcher = Watcher()
    filler = DiskFiller(disk, args.jobs // 2, args.jobs // 2 + max(args.jobs // 10, 5))
    t0 = time.time()
    try:
        submitted, jobs = _segments(args, config, root, watcher, filler, rng)
        return _summary(args, submitted, jobs, watcher, disk, time.time() - t0)  # files still there
    finally:
        if disk is not None:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--sim", action="store_true", help="virtual microscope + serial-sim lens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--disk-mb", type=int, default=64, help="tmpfs size when root")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    print(json.dumps(run(parser.parse_args()), indent=1))


if __name__ == "__main__":
    main()
