"""A full disk (issue #13): a real daemon process whose data directory is a small tmpfs.

The disk budget counts every queued job's estimate; a disk filling mid-job fails that job with
``disk_full`` (frames already flushed stay readable), the daemon keeps answering, the queue holds
with the reason in ``status`` and resumes by itself once space returns; after a restart no job is
left ``running``. Needs root for ``mount -t tmpfs`` (skipped otherwise, with the reason).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from helpers import wait_for

from scherzer.clients.client import DaemonError, LocalDaemon
from scherzer.daemon.diskspace import WRITE_HEADROOM_BYTES
from scherzer.io import read_stack

#: Every test here fills a real tmpfs: mounting one needs root and mount(8). CI runs as root
#: (the brief's CI machine), so there these tests always run; a mount that fails as root fails.
CAN_MOUNT = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None
pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not CAN_MOUNT, reason="mounting a tmpfs needs root and mount(8)"),
]
DISK_BYTES = 24 << 20  # the tmpfs: a few jobs of 128² frames fit, not many
SIDE_PX = 128  # 64 KiB per float32 frame
PATTERN = {"kind": "pattern", "camera_shape": [SIDE_PX, SIDE_PX], "speedup": 50.0}


def focal_plan(n: int, **extra) -> dict:
    return {"kind": "focal_series", "n_images": n, "start_nm": -60.0, "step_nm": 1.0,
            "exposure_s": 0.1, "processing": [], **extra}  # fmt: skip


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, f"mounting a tmpfs as root failed: {done.stderr.strip()}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=20)


def _daemon(tmp_path, disk) -> LocalDaemon:
    config = {
        "devices": dict(PATTERN),
        "data_dir": str(disk / "data"),
        "limits": {"min_free_disk_bytes": 0},
    }
    return LocalDaemon(config, tmp_path / "run")


def _fill(disk, leave_bytes: int):
    """A filler file leaving about ``leave_bytes`` free on the tmpfs."""
    free = shutil.disk_usage(disk).free
    filler = disk / "filler.bin"
    with filler.open("wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(free - leave_bytes, 0))  # tmpfs allocates written pages only
    return filler


def test_disk_budget_counts_every_queued_job(tmp_path, small_disk):
    with _daemon(tmp_path, small_disk) as d, d.client() as c:
        c.pause()
        free = shutil.disk_usage(small_disk).free
        n = int(0.4 * free) // (SIDE_PX * SIDE_PX * 4)  # each job: ~40 % of the free space
        c.submit(focal_plan(n))
        c.submit(focal_plan(n))
        with pytest.raises(DaemonError) as refused:
            c.submit(focal_plan(n))  # alone it would fit; with the two queued it does not
        assert refused.value.code == "limit_exceeded"
        assert "not enough disk" in refused.value.message
        assert "queued jobs need" in refused.value.message
        assert not c.plan_validate(focal_plan(n)).valid
        assert c.plan_validate(focal_plan(2)).valid


def test_disk_filling_mid_job_fails_it_and_the_daemon_carries_on(tmp_path, small_disk):
    data = small_disk / "data"
    with _daemon(tmp_path, small_disk) as d, d.client(timeout_s=20) as c:
        c.pause()
        first = c.submit(focal_plan(150, name="big"))  # ~9.8 MB
        filler = _fill(small_disk, WRITE_HEADROOM_BYTES + (2 << 20))  # room for ~30 frames
        c.resume()
        job = c.wait(first.job_id, timeout_s=60)
        assert job.state == "failed" and job.error.code == "disk_full", job.error
        assert 0 < job.frames_done < 150
        assert read_stack(job.output_file).n_frames == job.frames_done  # flushed frames readable
        status = c.status()
        assert status.state != "error" and status.queue_pause_reason
        later = c.submit(focal_plan(2, name="after"))
        assert c.job(later.job_id).state == "queued"  # held: the disk is still full
        filler.unlink()  # space returns: the queue resumes by itself
        assert c.wait(later.job_id, timeout_s=60).state == "done"
        assert c.status().queue_pause_reason is None
        assert os.path.exists(job.output_file)
    with _daemon(tmp_path, small_disk) as d, d.client() as c:
        states = {j.job_id: j.state for j in c.history()}
        assert states[first.job_id] == "failed" and states[later.job_id] == "done"
        assert "running" not in states.values() and "paused" not in states.values()
        assert read_stack(job.output_file).n_frames == job.frames_done
    assert data.exists()


def test_a_job_that_finds_no_room_names_no_file(tmp_path, small_disk):
    with _daemon(tmp_path, small_disk) as d, d.client(timeout_s=20) as c:
        c.pause()
        first = c.submit(focal_plan(3))
        _fill(small_disk, WRITE_HEADROOM_BYTES // 2)  # not even one frame fits
        c.resume()
        job = c.wait(first.job_id, timeout_s=60)
        assert job.state == "failed" and job.error.code == "disk_full"
        assert job.frames_done == 0 and job.output_file is None
        wait_for(lambda: c.status().queue_pause_reason is not None, timeout_s=20)
