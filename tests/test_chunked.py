"""The chunked path of rigid alignment: frames read from a file a block at a time and spectra in
scratch on disk give the in-memory path's shifts (to 1e-4 px) on a budget of a quarter of the
stack; the coarse stage's binning of large frames keeps the accuracy."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from scipy import ndimage

from scherzer.io.chunks import FileFrames, ScratchArray, ScratchFactory
from scherzer.processing.align_params import AlignmentError, AlignParams
from scherzer.processing.registration import measure_shifts
from scherzer.processing.rigid_spectra import COARSE_MAX_PX
from scherzer.simulators.microscope import drifting_series_from_image

MB = 1 << 20


def specimen(size: int, seed: int = 0) -> np.ndarray:
    """A smooth random field with particles: something to register, without a lattice."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(size, size)), 3.0)
    return 20.0 + 5.0 * field / field.std()


def series(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return drifting_series_from_image(
        specimen(size + 64, seed), n_frames=n, size_px=size, dose_e_per_px=20.0, seed=seed
    )


def rms_error(measured: np.ndarray, truth: np.ndarray) -> float:
    err = (measured - measured.mean(0)) - (truth - truth.mean(0))
    return float(np.sqrt(np.mean(np.sum(err**2, axis=1))))


@pytest.mark.parametrize("kind", ["h5", "tif"])
def test_chunked_path_on_a_quarter_of_the_stack_matches_in_memory(tmp_path: Path, kind: str):
    frames, truth = series(12, 160, seed=3)
    frames = frames.astype(np.float32)
    path = tmp_path / f"stack.{kind}"
    if kind == "h5":
        with h5py.File(path, "w") as f:
            f.create_dataset("frames", data=frames, chunks=(1, 160, 160))
    else:
        tifffile.imwrite(path, frames)
    in_memory = measure_shifts(frames)
    budget_mb = frames.nbytes / 4 / MB
    with FileFrames(path) as source, ScratchFactory(tmp_path) as scratch:
        assert source.shape == frames.shape
        chunked = measure_shifts(source, AlignParams(memory_budget_mb=budget_mb), scratch=scratch)
        assert scratch.made, "the spectra should have gone to scratch on this budget"
        assert source.largest_read * frames[0].nbytes <= budget_mb * MB
    np.testing.assert_allclose(chunked.shifts_px, in_memory.shifts_px, rtol=0, atol=1e-4)
    assert rms_error(chunked.shifts_px, truth) < 0.05


def test_our_stack_files_are_read_by_signal(tmp_path: Path) -> None:
    from scherzer import io as sio
    from scherzer.stack import ImageStack

    frames, _ = series(4, 64, seed=1)
    stack = ImageStack(frames.astype(np.float32), pixel_size_nm=(0.1, 0.1))
    path = tmp_path / "ours.hspy"
    sio.write_stack(path, stack, name="HAADF")
    with FileFrames(path, signal="HAADF") as source:
        np.testing.assert_array_equal(source.read(1, 3), frames[1:3].astype(np.float32))
    with pytest.raises(sio.EmdError, match="no signal 'BF'"):
        FileFrames(path, signal="BF")


def test_scratch_arrays_round_trip_by_slices(tmp_path: Path) -> None:
    data = (np.arange(5 * 3 * 4) + 1j).reshape(5, 3, 4).astype(np.complex64)
    arr = ScratchArray(data.shape, np.complex64, str(tmp_path))
    arr[0:2] = data[0:2]
    arr[2:5] = data[2:5]
    np.testing.assert_array_equal(arr[1:4], data[1:4])
    np.testing.assert_array_equal(arr[4], data[4])
    arr.close()


def test_large_frames_bin_the_coarse_stage_and_stay_accurate() -> None:
    """Frames over COARSE_MAX_PX are binned for the coarse stage only; the fine stage measures
    at full resolution (RMS well under the 0.05 px of a 2× binned measurement alone)."""
    size = COARSE_MAX_PX + 256
    frames, truth = series(4, size, seed=5)
    result = measure_shifts(frames.astype(np.float32), AlignParams(neighbours=2, refine=1))
    assert rms_error(result.shifts_px, truth) < 0.02


def test_memory_budget_must_be_positive() -> None:
    frames, _ = series(3, 32, seed=0)
    with pytest.raises(AlignmentError, match="memory_budget_mb"):
        measure_shifts(frames, AlignParams(memory_budget_mb=0.0))
