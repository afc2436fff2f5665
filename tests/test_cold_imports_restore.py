"""What ``scherzer restore`` loads (issue #16: a cold start pays only for what the command needs).

Not a timing test: the command runs in a fresh interpreter on a small simulated focal series and
the test asserts which modules it imported, so restore's import closure cannot silently grow (a
top-level import of the daemon, a plotting, lazy-array or file-format library for writing — the
writer is h5py —, or a SciPy subpackage the focal path does not call). It runs the installed
program (``scherzer.cli.console_main``), so it also holds that the file the program wrote is
complete once the process has ended (its teardown skips the collector).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
from helpers import loaded_by, offenders

#: Modules (and their submodules) that ``scherzer restore FILE.hspy --out OUT.hspy`` must not
#: import. (restore needs numba, scipy.fft, scipy.optimize — its defocus searches —, pydantic
#: for the instrument settings and h5py.)
NOT_FOR_RESTORE = (
    "scherzer.daemon",
    "scherzer.clients",
    "scherzer.drivers",
    "scherzer.simulators",
    "scherzer.web",
    "scherzer.cli.daemon_cmds",
    "scherzer.cli.plan_cmds",
    "scherzer.processing.eftem",
    "scherzer.processing.scan_distortion",
    "scherzer.processing.registration",  # rigid alignment: the focal path registers on its own
    "zmq",
    "matplotlib",  # only with --plot
    "hyperspy",
    "rsciio",
    "dask",
    "scipy.ndimage",
    "scipy.signal",
    "scipy.stats",
    "scipy.interpolate",
    "scipy.integrate",
)

STEP_NM = 10.0  # the simulated series' nominal focal step (scherzer simulate focal-series)
STEP_TOL_NM = 1.5  # sanity bound on each fitted step (the real step is a few % off nominal)


def _offenders(modules: list[str]) -> list[str]:
    return offenders(modules, NOT_FOR_RESTORE)


def test_restore_of_a_focal_series_imports_only_what_it_needs(tmp_path: Path) -> None:
    series, out = tmp_path / "f.hspy", tmp_path / "ew.hspy"
    made = subprocess.run(
        [sys.executable, "-m", "scherzer", "simulate", "focal-series", "--n", "5", "--size",
         "128", "--out", str(series)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0 and series.is_file(), made.stderr
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    code, result, listing = loaded_by(["restore", str(series), "--out", str(out), "--json"], env)
    assert code == 0 and out.is_file()
    # a sanity check of the run, not an accuracy test: an interior reference and every fitted
    # step near the nominal one
    assert 0 < result["reference_index"] < 4
    steps = np.diff(np.asarray(result["defocus_nm"]))
    assert np.all(np.abs(steps - STEP_NM) < STEP_TOL_NM), steps
    assert _offenders(listing["modules"]) == []
    # OpenBLAS started with one thread (the focal engines pin BLAS to one anyway)
    assert listing["blas_threads"] == [1]
    # the output file, opened after the process ended, holds the input frames and the results
    # that --json reported (nothing left unflushed by the shortened teardown)
    with h5py.File(series, "r") as f_in, h5py.File(out, "r") as f_out:
        frames_in = [f_in[n][()] for n in _datasets(f_in) if f_in[n].ndim == 3]
        frames_out = [f_out[n][()] for n in _datasets(f_out) if f_out[n].ndim == 3]
        assert frames_in and any(
            a.shape == b.shape and np.array_equal(a, b) for a in frames_in for b in frames_out
        )
    listed = subprocess.run([sys.executable, "-m", "scherzer", "info", str(out), "--json"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    info = json.loads(listed.stdout)
    assert set(info["processing"]) == {"focal_register", "restore"}
    assert "exit_wave" in info["data"] and "focal_registration" in info["tables"]


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names
