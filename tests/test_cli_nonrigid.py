"""`scherzer align --nonrigid` and `scherzer align-signal` end to end on files: a scan-distorted
HAADF + ABF series (orthogonal pairs) from the simulator, corrected from the command line; the
stored fields applied to the ABF kept in a separate file give the same frames as the in-file
correction; bad input is one error line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from scherzer import io as sio
from scherzer.cli import main
from scherzer.simulators.scan_distortion import ScanDistortion, simulate_distorted_series

DISTORTION = ScanDistortion(drift_nm_per_s=(0.25, -0.15), jitter_px=0.05)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    series = simulate_distorted_series(
        n_frames=4, size=128, rotation_mode="orthogonal-pairs", signals=("HAADF", "ABF"),
        distortion=DISTORTION, beam_current_pA=600.0, seed=5,
    )  # fmt: skip
    d = tmp_path_factory.mktemp("nonrigid")
    both, abf = d / "series.h5", d / "abf.h5"
    sio.write_stack(both, series["HAADF"], name="HAADF")
    sio.write_stack(both, series["ABF"], name="ABF", mode="a")
    sio.write_stack(abf, series["ABF"], name="ABF")
    return both, abf


def _run(argv: list[str], capsys) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_nonrigid_from_the_command_line(files, tmp_path, capsys):
    both, abf = files
    out, avg = tmp_path / "out.h5", tmp_path / "avg.tif"
    argv = ["align", str(both), "--nonrigid", "--out", str(out), "--save-average", str(avg),
            "--affine-cycles", "1", "--nonlinear-cycles", "2"]  # fmt: skip
    code, result = _run(argv, capsys)
    assert code == 0
    assert np.asarray(result["affine"]).shape == (4, 6)
    assert len(result["field_rms_px"]) == 4 and result["flagged"] == []
    assert result["seconds"] > 0 and result["average_file"] == str(avg)
    average = tifffile.imread(avg)
    assert average.dtype == np.float32 and average.shape == (128, 128)
    assert np.isfinite(average).mean() > 0.9  # NaN only where no frame saw
    fields = sio.read_result(out, "fields_nonrigid_HAADF")
    assert fields.shape == (4, 2, 128, 128) and np.isfinite(fields).all()
    in_file = sio.read_stack(out, "nonrigid_ABF").frames
    # the same fields applied to the ABF kept in another file
    code, applied = _run(["align-signal", str(out), str(abf), "--out-dir", str(tmp_path)], capsys)
    assert code == 0 and applied["correction"] == "nonrigid"
    separate = sio.read_stack(applied["written"][0], "ABF").frames
    np.testing.assert_allclose(separate, in_file, atol=1e-4)


def test_rigid_align_signal_applies_the_stored_shifts(files, tmp_path, capsys):
    both, abf = files
    out = tmp_path / "rigid.h5"
    code, _ = _run(["align", str(both), "--out", str(out), "--signal", "HAADF"], capsys)
    assert code == 0
    code, applied = _run(["align-signal", str(out), str(abf), "--out-dir", str(tmp_path)], capsys)
    assert code == 0 and applied["correction"] == "align"
    separate = sio.read_stack(applied["written"][0], "ABF").frames
    np.testing.assert_allclose(separate, sio.read_stack(out, "aligned_ABF").frames, atol=1e-3)


@pytest.mark.parametrize(
    "extra",
    [["--nonrigid", "--scan-rotation-deg", "0,90"], ["--reference", "local"],
     ["--nonrigid", "--scan-rotation-deg", "0,45,0,45"], ["--nonrigid", "--mode", "wobbly"]],
)  # fmt: skip
def test_bad_nonrigid_input_is_one_error(files, tmp_path, capsys, extra):
    both, _ = files
    code = main(["align", str(both), "--out", str(tmp_path / "x.h5"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err


def test_merge_drift_search_and_jitter_flags_reach_the_engine(files, tmp_path, capsys):
    """`--merge density` gives a kernel-density count (non-integer weights, unlike the average's
    frame count); `--no-drift-search` and `--no-row-jitter` are recorded in the parameters."""
    both, _ = files
    out = tmp_path / "density.h5"
    argv = ["align", str(both), "--nonrigid", "--out", str(out), "--affine-cycles", "1",
            "--nonlinear-cycles", "1", "--merge", "density", "--no-drift-search",
            "--no-row-jitter"]  # fmt: skip
    code, _ = _run(argv, capsys)
    assert code == 0
    params = sio.read_processing(out, "nonrigid")
    flat = json.dumps(params)
    assert '"merge": "density"' in flat and '"drift_search": false' in flat
    assert '"row_jitter": false' in flat and '"smoothing_px": null' in flat
    count = sio.read_result(out, "count_nonrigid_HAADF")
    average = sio.read_result(out, "average_nonrigid_HAADF")
    assert count.shape == average.shape == (128, 128)
    inside = count > 0
    assert inside.mean() > 0.9 and np.isfinite(average[inside]).all()
    assert not np.allclose(count[inside], np.round(count[inside]))  # a density, not a tally
