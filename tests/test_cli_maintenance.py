"""`scherzer repair` on a file whose writer was SIGKILLed (plain h5py and HyperSpy open it
afterwards) and `scherzer db check|recover` on a damaged job database (real files, real
processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import pytest

from scherzer.cli import main

WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from scherzer.io import StackWriter
    from scherzer.stack import FrameRecord
    with StackWriter(sys.argv[1], pixel_size_nm=(0.1, 0.1), frame_shape=(16, 24)) as w:
        for i in range(3):
            w.append(np.full((16, 24), float(i), np.float32), FrameRecord(index=i))
        print("written", flush=True)
        sys.stdin.read()  # hold the file open until killed
    """
)


def test_repair_makes_a_killed_writers_file_readable(tmp_path: Path, capsys) -> None:
    path = tmp_path / "killed.hspy"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    with pytest.raises(OSError):
        h5py.File(path, "r")  # the writer's "open for writing" flag is still set
    assert main(["repair", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["repaired"][str(path)] is True
    with h5py.File(path, "r") as f:  # plain readers open it now
        assert f.attrs["version_major"] == 1
    hs = pytest.importorskip("hyperspy.api", reason="HyperSpy is a test dependency")
    s = hs.load(path)
    signals = s if isinstance(s, list) else [s]
    assert any(sig.data.shape[-2:] == (16, 24) and sig.data.shape[0] == 3 for sig in signals)


def test_db_check_and_recover_a_damaged_database(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    (data / "jobs").mkdir(parents=True)
    (data / "jobs.sqlite").write_bytes(b"SQLite format 3\x00" + b"\x13" * 4000)  # garbage pages
    config = tmp_path / "scherzer.toml"
    config.write_text(f'data_dir = "{data}"\n')
    assert main(["db", "check", "--config", str(config)]) == 1
    out, _ = capsys.readouterr()
    assert "DAMAGED" in out and "scherzer db recover" in out
    assert main(["db", "recover", "--config", str(config), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["moved_to"] and result["jobs_rebuilt"] == 0  # no job files to rebuild from
    assert main(["db", "check", "--config", str(config)]) == 0
