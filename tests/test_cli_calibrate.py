"""`scherzer calibrate`: the pixel size from a known lattice spacing, on simulated SrTiO3 [001]
whose file records a wrong pixel size; the calibrated copy carries the measured one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from scherzer import io as sio
from scherzer.cli import main
from scherzer.simulators.hrtem import simulate_focal_series

TRUE_PIXEL_NM = 0.02
SRTIO3_A_NM = 0.3905


@pytest.fixture(scope="module")
def miscalibrated(tmp_path_factory) -> Path:
    stack = simulate_focal_series(
        "srtio3_001", n=3, start_nm=-60, step_nm=10, size=256, pixel_nm=TRUE_PIXEL_NM, seed=2
    )
    path = tmp_path_factory.mktemp("cal") / "sto.h5"
    sio.write_stack(path, dataclasses.replace(stack, pixel_size_nm=(0.025, 0.025)))
    return path


def test_calibrate_recovers_the_pixel_size_and_writes_a_calibrated_copy(
    miscalibrated, tmp_path, capsys
):
    out = tmp_path / "calibrated.h5"
    argv = ["calibrate", str(miscalibrated), "--spacing-nm", str(SRTIO3_A_NM), "--hkl", "110",
            "--guess-nm", "0.021", "--out", str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pixel_nm"] == pytest.approx(TRUE_PIXEL_NM, rel=2e-3)  # issue #15: 0.2 %
    assert result["recorded_pixel_nm"] == [0.025, 0.025]
    assert sio.import_stack(out).pixel_size_nm == pytest.approx((result["pixel_nm"],) * 2)


def test_calibrate_refuses_a_spacing_the_image_does_not_show(miscalibrated, capsys):
    # 0.05 nm at a 0.02 nm pixel would sit at 0.4 cycles/px: no such reflection is transferred
    argv = ["calibrate", str(miscalibrated), "--spacing-nm", "0.05", "--guess-nm", "0.02"]
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err
