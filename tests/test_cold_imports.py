"""What ``scherzer align`` loads (issue #16: a cold start pays only for what the command needs).

Not timing tests: each runs the command in a fresh interpreter and asserts which modules it
imported, so the import closure cannot silently grow again (a top-level import of the daemon,
a plotting or lazy-array library, or the instrument-settings models in a module on the path).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers import loaded_by, offenders

from scherzer.cli import COMMANDS, registrar

#: Modules (and their submodules) that ``scherzer align FILE.tif --out OUT.hspy`` must not import.
NOT_FOR_ALIGN = (
    "scherzer.daemon",
    "scherzer.clients",
    "scherzer.drivers",
    "scherzer.simulators",
    "scherzer.web",
    "scherzer.settings",  # the instrument settings' pydantic models (restore/simulate only)
    "scherzer.processing.focal",
    "scherzer.processing.eftem",
    "scherzer.processing.scan_distortion",
    "scherzer.processing.restoration",
    "scherzer.processing.plots",  # only with --plot
    "scherzer.optics",  # the optics model (pydantic); fft_workers lives in scherzer.workers
    "pydantic",
    "zmq",
    "structlog",
    "matplotlib",
    "hyperspy",
    "rsciio",
    "dask",
    "numba",
    "scipy.ndimage",  # template_weight's box filter is NumPy; ndimage is loaded where needed
    "scipy.signal",
    "scipy.stats",
    "scipy.optimize",
    "scipy.interpolate",
)


def _offenders(modules: list[str]) -> list[str]:
    return offenders(modules, NOT_FOR_ALIGN)


def test_align_of_a_tiff_imports_only_what_it_needs(tmp_path: Path) -> None:
    rng = np.random.default_rng(16)
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(96), np.fft.fftfreq(96), indexing="ij"))
    field = np.fft.ifft2(np.fft.fft2(rng.normal(size=(96, 96))) * np.exp(-((k / 0.08) ** 2))).real
    offsets = [(0, 0), (3, 1), (5, 4), (2, 7)]  # where each frame's window starts (y, x) px
    frames = np.stack([field[y : y + 64, x : x + 64] for y, x in offsets]).astype(np.float32)
    tif, out = tmp_path / "s.tif", tmp_path / "o.hspy"
    tifffile.imwrite(tif, 100.0 + 10.0 * frames / frames.std(), photometric="minisblack")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    code, result, loaded = loaded_by(["align", str(tif), "--out", str(out), "--json"], env)
    modules = loaded["modules"]
    assert code == 0 and out.is_file()
    shifts = np.asarray(result["shifts_px"])  # frame i's content sits at −offset_i
    truth = -np.asarray(offsets, dtype=float)
    # a sanity check of the run, not an accuracy test: each frame's offset found (to ¼ px on
    # these 64² crops whose edges differ)
    assert np.abs((shifts - shifts[0]) - (truth - truth[0])).max() < 0.25, shifts
    assert _offenders(modules) == []
    # the registrars of the other commands stayed unimported
    assert "scherzer.cli.daemon_cmds" not in modules and "scherzer.cli.plan_cmds" not in modules
    # OpenBLAS started with one thread (rigid alignment pins BLAS to one anyway)
    assert loaded["blas_threads"] == [1]


def test_help_still_lists_every_command_and_each_registrar_resolves() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scherzer", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    for name in COMMANDS:
        assert name in proc.stdout, name
        assert callable(registrar(name)), name


_STRUCTLOG_AFTER_QUIET = """
from scherzer.cli import _quiet_logging
_quiet_logging()
import structlog
structlog.get_logger().info("not shown")
structlog.get_logger().warning("to stderr")
"""


def test_structlog_imported_after_the_quiet_setup_logs_warnings_to_stderr_only() -> None:
    """Offline commands configure structlog when (if) it is first imported: a library that logs
    never writes to stdout, which carries the command's one JSON object."""
    proc = subprocess.run(
        [sys.executable, "-c", _STRUCTLOG_AFTER_QUIET], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "to stderr" in proc.stderr and "not shown" not in proc.stderr


def _settings_classes() -> list[type]:
    from scherzer.processing.eftem import EFTEMMapParams
    from scherzer.processing.focal import FocalParams, StructureParams
    from scherzer.processing.registration import AlignParams
    from scherzer.processing.restoration import RestoreParams
    from scherzer.processing.scan_distortion import NonrigidParams

    return [
        AlignParams,
        NonrigidParams,
        FocalParams,
        RestoreParams,
        StructureParams,
        EFTEMMapParams,
    ]


#: Values tried for every field: plain ones (taken without pydantic) and others pydantic converts
#: or refuses.
_TRIED = (None, True, False, 0, 1, 3, -2, 0.5, 2.0, float("nan"), "mean", "hann", "x", "3",
          (0.1, 0.5), [0.1, 0.5], [1, 2], (1, 2, 3, 4), [1, 2, 3, 4], (1.5, 2, 3, 4), [],
          np.float64(0.5), np.int64(2), {"a": 1})  # fmt: skip


@pytest.mark.parametrize("cls", _settings_classes(), ids=lambda c: c.__name__)
def test_settings_built_without_pydantic_equal_pydantics(cls: type) -> None:
    """:func:`build_settings` takes plain values without pydantic: for every field and every
    tried value it gives what pydantic's validation gives (value and type), or refuses it
    alike."""
    import pydantic

    from scherzer.processing.steps import StepSettingsError, build_settings

    adapter = pydantic.TypeAdapter(cls)
    for f in dataclasses.fields(cls):
        for value in (f.default, *_TRIED):
            if value is dataclasses.MISSING:
                continue
            try:
                expected = adapter.validate_python({f.name: value})
            except pydantic.ValidationError:
                expected = None
            try:
                got = build_settings(cls, {f.name: value}, "t")
            except StepSettingsError:
                got = None
            where = f"{cls.__name__}.{f.name} = {value!r}"
            if expected is None:
                assert got is None, where
                continue
            assert got is not None, where
            a, b = getattr(got, f.name), getattr(expected, f.name)
            assert type(a) is type(b) and (a == b or (a != a and b != b)), where
            assert dataclasses.astuple(got) == dataclasses.astuple(expected) or value != value


def test_command_line_align_settings_need_no_pydantic(monkeypatch: pytest.MonkeyPatch) -> None:
    """The values ``scherzer align`` passes are plain: built without pydantic (converted as
    pydantic converts them), while an ill-typed one still goes to pydantic and fails by name."""
    import pydantic

    from scherzer.processing.registration import AlignParams
    from scherzer.processing.steps import StepSettingsError, build_settings

    def no_pydantic(*args: object, **kwargs: object) -> None:
        raise AssertionError("pydantic used for plain values")

    values = {"alpha": 1, "roi": [1, 2, 3, 4], "reference": 2, "output": "expand",
              "memory_budget_mb": None, "refine": 0}  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(pydantic, "TypeAdapter", no_pydantic)
        got = build_settings(AlignParams, values, "align")
    assert got == AlignParams(alpha=1.0, roi=(1, 2, 3, 4), reference=2, output="expand", refine=0)
    assert type(got.alpha) is float and type(got.roi) is tuple
    with pytest.raises(StepSettingsError, match="align: neighbours"):
        build_settings(AlignParams, {"neighbours": "four"}, "align")


@pytest.mark.parametrize("shape", [(64, 33), (9, 5), (3, 2)])
def test_half_plane_box_mean_equals_ndimage_uniform_filter(shape: tuple[int, int]) -> None:
    """The NumPy box mean that replaced ``uniform_filter(..., mode=("wrap", "nearest"))`` on the
    default alignment path gives its values to float32 rounding (2e-7 relative), also on maps
    smaller than the box."""
    from scipy import ndimage

    from scherzer.processing.correlation import box_mean_half_plane

    values = np.random.default_rng(7).gamma(1.0, 1e3, shape).astype(np.float32)
    expected = ndimage.uniform_filter(values, 9, mode=("wrap", "nearest"))
    got = box_mean_half_plane(values, 9)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.abs(got - expected).max() <= 2e-7 * np.abs(expected).max()
