"""`scherzer status|pause|resume|jobs|wait` against a real daemon on loopback: what the operator
reads (state, pause reason, problems) and exit codes."""

from __future__ import annotations

import json

from scherzer.cli import main
from scherzer.clients.client import LocalDaemon

PATTERN = {"kind": "pattern", "camera_shape": [32, 32], "speedup": 100.0}


def test_status_pause_resume_and_wait_from_the_command_line(tmp_path, capsys):
    with LocalDaemon({"devices": dict(PATTERN)}, tmp_path) as d:
        conn = ["--endpoint", d.endpoint, "--events", d.events_endpoint]
        assert main(["status", *conn]) == 0
        assert "state idle" in capsys.readouterr().out
        assert main(["pause", *conn]) == 0
        capsys.readouterr()
        assert main(["status", *conn]) == 0
        assert "queue PAUSED (by an operator)" in capsys.readouterr().out
        assert main(["resume", *conn, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {"paused": False}
        with d.client() as c:
            job = c.submit({"kind": "camera_image", "exposure_s": 0.1, "repeat": 2})
        assert main(["wait", str(job.job_id), *conn, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["job"]["state"] == "done"
        assert main(["jobs", "--history", *conn]) == 0
        assert f"{job.job_id:>6}  done" in capsys.readouterr().out
