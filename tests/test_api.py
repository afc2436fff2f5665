"""The Python API for notebooks (scherzer.align / restore / as_stack): arrays, ImageStacks and
HyperSpy signals in, the CLI's settings and results out, HyperSpy signals back; the README's
example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import scherzer
from scherzer import io as sio
from scherzer.processing.focal import camera_offset_counts
from scherzer.simulators.hrtem import simulate_focal_series
from scherzer.simulators.microscope import drifting_series_from_image

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def real_series(testdata_dir: Path):
    """A real STEM image of SrTiO3 (ncempy test data) moved by known sub-pixel shifts."""
    image = sio.import_stack(testdata_dir / "ncempy/16_STOimage_1.ser").frames[0]
    frames, truth = drifting_series_from_image(
        image.astype(np.float64), n_frames=6, size_px=192, dose_e_per_px=50.0, seed=3
    )
    return frames, truth


@pytest.fixture(scope="module")
def focal_stack():
    return simulate_focal_series("crystal_edge", n=9, start_nm=-90, step_nm=10, size=256, seed=1)


def _relative(shifts: np.ndarray) -> np.ndarray:
    return shifts - shifts.mean(axis=0)


def test_align_an_array_gives_back_known_shifts(real_series):
    frames, truth = real_series
    out = scherzer.align(frames, alpha=0.5, neighbours=3)
    err = _relative(out.shifts_px) - _relative(np.asarray(truth))
    assert np.sqrt(np.mean(err**2)) < 0.05  # px RMS on real SrTiO3 at 50 e/px
    assert out.average.shape == out.aligned.frames.shape[1:]
    s = out.to_hyperspy()
    assert s.axes_manager.navigation_dimension == 1
    assert s.axes_manager.navigation_axes[0].size == len(frames)
    assert s.axes_manager.signal_shape == out.aligned.frames.shape[:0:-1]  # (x, y), cropped


def test_align_a_hyperspy_signal_keeps_its_calibration(real_series):
    hs = pytest.importorskip("hyperspy.api", reason="HyperSpy is a test dependency")
    frames, _ = real_series
    sig = hs.signals.Signal2D(frames[:, :, :160].copy())  # non-square: orientation matters
    for ax in sig.axes_manager.signal_axes:
        ax.scale, ax.units = 0.0125, "nm"
    stack = scherzer.as_stack(sig)
    assert stack.frames.shape == (len(frames), 192, 160)
    np.testing.assert_array_equal(stack.frames, frames[:, :, :160].astype(np.float32))
    assert stack.pixel_size_nm == (0.0125, 0.0125)
    out = scherzer.align(sig, alpha=0.5)
    assert out.to_hyperspy().axes_manager.signal_axes[0].scale == pytest.approx(0.0125)


def test_restore_matches_the_pipeline_for_stacks_and_raw_arrays(focal_stack):
    via_stack = scherzer.restore(focal_stack)
    truth = np.asarray(focal_stack.ground_truth["defocus_nm"])
    rel_truth = truth - truth[via_stack.reference_index]
    # the engine reaches 0.36-0.61 nm RMS on this specimen at 256² with 11 images (test_focal)
    assert np.sqrt(np.mean((via_stack.relative_defocus_nm - rel_truth) ** 2)) < 1.0
    # The same data as a bare array: the CLI's numbers once the calibration is given.
    optics = focal_stack.instrument["optics"]
    via_array = scherzer.restore(
        scherzer.as_stack(
            focal_stack.frames,
            pixel_nm=focal_stack.pixel_size_nm[0],
            defocus_nm=focal_stack.column("defocus_nominal_nm"),
            camera_offset_counts=camera_offset_counts(focal_stack),
            instrument={"optics": optics},
        )
    )
    np.testing.assert_allclose(via_array.defocus_nm, via_stack.defocus_nm, atol=1e-6)
    wave = via_stack.to_hyperspy()
    assert wave.__class__.__name__ == "ComplexSignal2D"
    assert wave.axes_manager.signal_axes[0].scale == pytest.approx(focal_stack.pixel_size_nm[1])
    assert wave.metadata.Acquisition_instrument.TEM.beam_energy == optics["voltage_kv"]


def test_bad_settings_name_the_setting(real_series):
    frames, _ = real_series
    with pytest.raises(ValueError, match="alhpa"):
        scherzer.align(frames, alhpa=0.5)
    with pytest.raises(ValueError, match="frames must be"):
        scherzer.align(frames[0])


def test_readme_python_example_runs():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no ```python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # our own README's example
    assert namespace["result"].wave.shape == (128, 128)
    assert namespace["aligned"].shifts_px.shape == (7, 2)


def test_nonrigid_through_the_api_gives_fields_and_converts():
    from scherzer.simulators.scan_distortion import ScanDistortion, simulate_distorted_series

    series = simulate_distorted_series(
        n_frames=4, size=128, rotation_mode="orthogonal-pairs", signals=("HAADF",),
        distortion=ScanDistortion(drift_nm_per_s=(0.25, -0.15)), beam_current_pA=600.0, seed=5,
    )  # fmt: skip
    out = scherzer.align(series["HAADF"], nonrigid=True, affine_cycles=1, nonlinear_cycles=2)
    assert out.fields_px is not None and out.fields_px.shape == (4, 2, 128, 128)
    assert out.flagged == [] and out.shifts_px.shape == (4, 2)
    assert np.isfinite(out.fields_px).all()
    assert out.to_hyperspy().axes_manager.navigation_shape == (4,)
    with pytest.raises(ValueError, match="mode"):
        scherzer.align(series["HAADF"], nonrigid=True, mode="wobbly")
