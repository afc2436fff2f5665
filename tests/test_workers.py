"""Thread limits of the numerical libraries (scherzer.workers).

``one_blas_thread`` must limit BLAS to one thread inside the call and give the caller's limit
back afterwards; the engines (rigid alignment, focal registration, restoration) must run under
it, whatever the process's own BLAS thread count (observed from inside the engines with
threadpoolctl, on a real series). No timing is asserted.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_restoration import synthetic_series
from threadpoolctl import threadpool_info, threadpool_limits

import scherzer.processing.focal.register as register_module
import scherzer.processing.registration as rigid_module
import scherzer.processing.restoration as restoration_module
from scherzer.processing.focal import register_focal_series, restore_stack
from scherzer.processing.registration import measure_shifts
from scherzer.workers import one_blas_thread

OUTSIDE_THREADS = 2  # the caller's BLAS limit in these tests (> 1, so the limit is visible)


def _blas_threads() -> list[int]:
    return sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})


@pytest.fixture
def two_blas_threads():
    if not _blas_threads():
        pytest.fail("no BLAS library loaded: numpy is expected to bring OpenBLAS")
    with threadpool_limits(limits=OUTSIDE_THREADS, user_api="blas"):
        yield


def test_one_blas_thread_inside_and_the_callers_limit_after(two_blas_threads) -> None:
    seen = []

    @one_blas_thread
    def work(x: np.ndarray) -> float:
        seen.append(_blas_threads())
        return float(x @ x)

    assert _blas_threads() == [OUTSIDE_THREADS]
    assert work(np.arange(4.0)) == 14.0  # the call's result passes through
    assert seen == [[1]]
    assert _blas_threads() == [OUTSIDE_THREADS]
    assert work.__name__ == "work"  # functools.wraps: the engine keeps its name and docstring


def test_the_engines_run_with_one_blas_thread(two_blas_threads, monkeypatch) -> None:
    seen: dict[str, list[list[int]]] = {"register": [], "restore": [], "rigid": []}

    def probe(module, name: str, key: str) -> None:
        inner = getattr(module, name)

        def spy(*args, **kwargs):
            seen[key].append(_blas_threads())
            return inner(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    # functions each engine calls once it runs (module globals, so the spies are what it calls)
    probe(register_module, "joint_defocus", "register")
    probe(restoration_module, "information_band", "restore")
    probe(rigid_module, "_measure_shifts", "rigid")
    st = synthetic_series("weak_phase", n=5, size=128, dose_e_per_A2=1000.0, seed=3)
    reg = register_focal_series(st, st.optics)
    res = restore_stack(st, reg, st.optics)
    assert np.all(np.isfinite(reg.defocus_nm)) and np.all(np.isfinite(res.wave))
    assert seen["register"] and all(s == [1] for s in seen["register"])
    assert seen["restore"] and all(s == [1] for s in seen["restore"])
    rigid = measure_shifts(st.frames.astype(np.float32))
    assert np.all(np.isfinite(rigid.shifts_px))
    assert seen["rigid"] == [[1]]
    assert _blas_threads() == [OUTSIDE_THREADS]
