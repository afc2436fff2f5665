"""How the ``scherzer`` process starts and ends (issue #16; scherzer.cli.process).

The program (console script and ``python -m scherzer``) is :func:`scherzer.cli.console_main`: it
sets glibc's allocator up for the processing commands, runs :func:`~scherzer.cli.main` and then
freezes the collector out of the teardown (which was 0.3–0.4 s of a focal restore's wall time,
the collector passing over numba's objects). These tests hold that the installed program is that
function and that the allocator settings take effect only where they should (observed through
glibc's own ``malloc_info``). That nothing the program writes is lost on the way out is held by
tests/test_cold_imports_restore.py, which runs the program and reads its file after it ended.
No timing is asserted.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_program_is_console_main() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"scherzer": "scherzer.cli:console_main"}
    main_py = (ROOT / "scherzer" / "__main__.py").read_text()
    assert "sys.exit(console_main())" in main_py


def test_console_main_returns_mains_code_and_leaves_the_collector_frozen() -> None:
    code = (
        "import gc, json, sys\n"
        "from scherzer import cli\n"
        "sys.argv = ['scherzer', 'info', '/no/such/file.hspy', '--json']\n"
        "rc = cli.console_main()\n"
        "print(json.dumps({'rc': rc, 'enabled': gc.isenabled(), 'frozen': gc.get_freeze_count()}),"
        " file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    state = json.loads(proc.stderr.strip().splitlines()[-1])
    assert state["rc"] == 2  # main's own exit code of a bad input, passed through
    assert json.loads(proc.stdout)["error"]["code"]  # the error was reported before the exit
    assert state["enabled"] is False and state["frozen"] > 1000


GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

#: A fresh interpreter: apply the allocator settings for ARGV[1] (or not, "none"), let four
#: threads allocate and free NumPy blocks, then print the number of malloc arenas glibc reports.
_ARENAS = """
import ctypes, json, sys, threading
from scherzer.cli.process import tune_allocator
applied = tune_allocator([sys.argv[1]]) if sys.argv[1] != "none" else []
import numpy as np
def work():
    for size in (2**10, 2**16, 2**20, 2**23):
        a = np.ones(size, np.float32); del a
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
fp = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(fp))
libc.fclose(ctypes.c_void_p(fp))
heaps = open(sys.argv[2]).read().count("<heap nr=")
print(json.dumps({"applied": applied, "arenas": heaps}))
"""


def _arenas(command: str, tmp_path: Path, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", _ARENAS, command, str(tmp_path / "info.xml")],
                          capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_allocator_settings_only_for_the_processing_commands_on_glibc(tmp_path: Path) -> None:
    if not GLIBC:  # elsewhere nothing is applied (and malloc_info does not exist)
        from scherzer.cli.process import tune_allocator

        assert tune_allocator(["restore"]) == []
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    tuned = _arenas("restore", tmp_path, env)
    assert len(tuned["applied"]) == 4  # glibc accepted every setting
    assert tuned["arenas"] == 1  # the four threads allocated from the one arena
    plain = _arenas("none", tmp_path, env)
    assert plain["arenas"] > 1  # the default: threads get arenas of their own
    other = _arenas("info", tmp_path, env)  # a command that is not processing: left alone
    assert other["applied"] == [] and other["arenas"] > 1
    # the user's own allocator settings are kept
    assert _arenas("restore", tmp_path, {**env, "MALLOC_ARENA_MAX": "2"})["applied"] == []


def _tuned_in_fresh_process(argv: list[str], preload: str = "") -> list[int]:
    code = (
        f"{preload}\nimport json\n"
        "from scherzer.cli.process import tune_allocator\n"
        f"print(json.dumps(tune_allocator({argv!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return json.loads(proc.stdout)


def test_allocator_left_alone_once_numpy_is_loaded_and_for_the_nonrigid_engine() -> None:
    assert _tuned_in_fresh_process(["restore"], preload="import numpy") == []
    assert _tuned_in_fresh_process(["align", "s.tif", "--nonrigid"]) == []
