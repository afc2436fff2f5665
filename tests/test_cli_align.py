"""`scherzer align FILE --out OUT.h5 --json --plot DIR` end to end on files (no daemon)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scherzer import io as sio
from scherzer.cli import main
from scherzer.simulators.microscope import drifting_series_from_image
from scherzer.stack import ImageStack


@pytest.fixture(scope="module")
def drifting_file(testdata_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    image = sio.import_stack(testdata_dir / "ncempy/16_STOimage_1.ser").frames[0]
    frames, truth = drifting_series_from_image(
        image.astype(np.float64), n_frames=8, size_px=256, dose_e_per_px=20.0, seed=4
    )
    path = tmp_path_factory.mktemp("align") / "series.h5"
    sio.write_stack(path, ImageStack(frames, pixel_size_nm=(0.01, 0.01)), name="HAADF")
    return path, truth


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = main(argv)
    return code, json.loads(capsys.readouterr().out)


def test_align_prints_the_documented_json_and_writes_file_and_plots(
    drifting_file, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, truth = drifting_file
    out, plots = tmp_path / "aligned.h5", tmp_path / "plots"
    code, result = run(["align", str(path), "--out", str(out), "--json", "--plot", str(plots)],
                       capsys)  # fmt: skip
    assert code == 0
    assert set(result) == {"shifts_px", "peak_heights", "reference", "flagged", "seconds", "wall_s"}
    assert 0 < result["seconds"] <= result["wall_s"]
    shifts = np.asarray(result["shifts_px"])
    assert shifts.shape == (8, 2) and result["reference"] == "mean" and result["seconds"] > 0
    error = np.linalg.norm((shifts - shifts.mean(0)) - (truth - truth.mean(0)), axis=1)
    assert error.max() < 0.05, error
    assert {p.name for p in plots.iterdir()} >= {"shifts.png", "similarity.png", "average.png"}
    written = sio.describe(out)
    assert "align" in written["processing"]
    assert len(sio.import_stacks(out)) >= 2  # the input frames and the aligned result


def test_align_reference_frame_and_roi_from_the_command_line(
    drifting_file, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, truth = drifting_file
    argv = ["align", str(path), "--out", str(tmp_path / "o.h5"), "--json", "--reference", "3",
            "--roi", "16,16,192,192", "--neighbours", "2", "--refine", "1"]  # fmt: skip
    code, result = run(argv, capsys)
    assert code == 0 and result["reference"] == 3
    shifts = np.asarray(result["shifts_px"])
    np.testing.assert_allclose(shifts[3], [0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(shifts, truth - truth[3], atol=0.08)


def test_align_bad_input_is_a_clear_error(
    testdata_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    single = testdata_dir / "ncempy/16_STOimage_1.ser"  # one image: nothing to align
    code, result = run(["align", str(single), "--out", str(tmp_path / "o.h5"), "--json"], capsys)
    assert code == 2 and "at least 2 frames" in result["error"]["message"]
    code, result = run(["align", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "p.h5"),
                        "--json"], capsys)  # fmt: skip
    assert code == 2 and "missing.h5" in result["error"]["message"]


def test_a_stack_over_the_memory_budget_is_aligned_in_chunks_with_the_same_shifts(
    drifting_file, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """8 × 256² float32 is 2 MB: on a 1 MB budget the frames are read from the file in chunks
    and the spectra go to scratch; the shifts are the in-memory path's (to 1e-4 px) and OUT holds
    the aligned frames, their average and the alignment record."""
    path, truth = drifting_file
    _, whole = run(["align", str(path), "--out", str(tmp_path / "a.h5"), "--json"], capsys)
    out = tmp_path / "chunked.h5"
    argv = ["align", str(path), "--out", str(out), "--json", "--memory-budget-mb", "1"]
    code, chunked = run(argv, capsys)
    assert code == 0 and chunked["chunked"] is True and "chunked" not in whole
    np.testing.assert_allclose(chunked["shifts_px"], whole["shifts_px"], rtol=0, atol=1e-4)
    shifts = np.asarray(chunked["shifts_px"])
    error = np.linalg.norm((shifts - shifts.mean(0)) - (truth - truth.mean(0)), axis=1)
    assert error.max() < 0.05, error
    aligned = sio.read_stack(out, "aligned_HAADF")
    assert aligned.n_frames == 8 and aligned.pixel_size_nm == (0.01, 0.01)
    spread = np.ptp(np.asarray(whole["shifts_px"]), axis=0)
    assert aligned.frame_shape[0] <= 256 - np.floor(spread[0])
    average = sio.read_result(out, "average_HAADF")
    np.testing.assert_allclose(average, aligned.frames.mean(axis=0), rtol=1e-5, atol=1e-4)
    assert "align" in sio.describe(out)["processing"]
