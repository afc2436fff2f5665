"""A CLI people trust: every bad input is one ``error:`` line on stderr and exit 2; with
``--json`` exactly one JSON object on stdout, errors included; a closed pipe ends quietly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scherzer.cli import main

BAD_INPUTS = [
    ["align", "{stack}", "--out", "{out}", "--roi", "1,2"],
    ["align", "{stack}", "--out", "{out}", "--signal", "BF"],
    ["align", "{stack}", "--out", "{out}", "--reference", "first"],
    ["align", "{stack}", "--out", "{out}", "--neighbours", "0"],
    ["align", "{missing}", "--out", "{out}"],
    ["restore", "{stack}", "--out", "{out}", "--exclude", "x"],
    ["restore", "{stack}", "--out", "{out}", "--area", "0,0,-5,5"],
    ["restore", "{stack}", "--out", "{out}", "--voltage-kv", "abc"],
    ["restore", "{stack}", "--out", "{out}"],  # no instrument parameters recorded
    ["simulate", "focal-series", "--out", "{out}", "--drift-px", "1"],
    ["simulate", "rotated-scan", "--out", "{out}", "--n", "0"],
    ["info", "{missing}"],
    ["wait", "x"],
    ["focal-series", "--not-before", "tomorrow-ish"],
    ["rotated-scan", "--timeout", "-1"],
    ["time-series", "--wait-timeout", "soon"],
    ["status", "--timeout", "0"],
    ["jobs", "--limit", "0"],
    ["cancel", "-3"],
    ["submit", "{missing}"],
    ["calibrate", "{stack}", "--spacing-nm", "-0.4"],
    ["calibrate", "{stack}", "--spacing-nm", "0.39", "--hkl", "12"],
    ["align-signal", "{missing}", "{stack}"],
    ["repair", "{missing}"],
    ["db", "check", "--config", "{missing}"],
    ["temscript-sim", "--port", "0"],
    ["web", "--config", "{missing}"],
    ["daemon", "--config", "{missing}"],
    ["demo", "--size", "0"],
    ["keys"],
    ["nonsense-command"],
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "stack.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.random((3, 32, 32)).astype(np.float32))
    return path


def _args(template: list[str], stack: Path, tmp_path: Path) -> list[str]:
    names = {"stack": stack, "out": tmp_path / "out.h5", "missing": tmp_path / "missing.h5"}
    return [part.format(**names) for part in template]


@pytest.mark.parametrize("template", BAD_INPUTS, ids=lambda t: " ".join(t[:2]) + " " + t[-1])
def test_bad_input_is_one_error_line_and_exit_2(template, stack, tmp_path, capsys):
    code = main(_args(template, stack, tmp_path))
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("template", BAD_INPUTS, ids=lambda t: " ".join(t[:2]) + " " + t[-1])
def test_bad_input_with_json_is_one_json_object(template, stack, tmp_path, capsys):
    code = main([*_args(template, stack, tmp_path), "--json"])
    out, err = capsys.readouterr()
    assert code == 2
    obj = json.loads(out)
    assert set(obj) == {"error"} and obj["error"]["message"]
    assert "Traceback" not in err


def test_info_is_text_by_default_and_json_on_request(stack, capsys):
    assert main(["info", str(stack)]) == 0
    text = capsys.readouterr().out
    assert not text.lstrip().startswith("{") and "shape: [3, 32, 32]" in text
    assert main(["info", str(stack), "--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), dict)


def test_closed_pipe_ends_quietly(stack):
    proc = subprocess.Popen(
        [sys.executable, "-m", "scherzer", "info", str(stack)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # like `| head` that has read enough
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert b"Traceback" not in err and b"BrokenPipe" not in err
