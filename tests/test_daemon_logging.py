"""The daemon's JSON log rotates by size (standard library RotatingFileHandler) and keeps the
configured number of old files; every line stays one JSON object."""

from __future__ import annotations

import json

import pytest
import structlog

from scherzer.config import load_settings
from scherzer.daemon.logging import configure_logging


@pytest.fixture
def restore_structlog():
    yield
    structlog.reset_defaults()


def test_log_rotates_and_keeps_the_configured_backups(tmp_path, restore_structlog):
    path = configure_logging(tmp_path, console="off", max_bytes=4000, backups=2)
    log = structlog.get_logger("test")
    for i in range(400):
        log.info("line", i=i, padding="x" * 40)
    files = sorted(path.parent.glob("daemon.jsonl*"))
    assert [f.name for f in files] == ["daemon.jsonl", "daemon.jsonl.1", "daemon.jsonl.2"]
    assert all(f.stat().st_size <= 4000 for f in files)
    last = [json.loads(line) for line in path.read_text().splitlines()]
    assert last and last[-1]["i"] == 399 and last[-1]["level"] == "info"


def test_rotation_settings_are_validated(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text("[logging]\nfile_max_mb = 0\n")
    with pytest.raises(ValueError, match="file_max_mb"):
        load_settings(cfg)
    cfg.write_text("[logging]\nfile_max_mb = 2.5\nfile_backups = 3\n")
    assert load_settings(cfg).logging.file_backups == 3
