"""Uncalibrated TIFF stacks are read by tifffile alone (rosettasciio's TIFF reader pulls in dask,
a quarter of a cold ``scherzer align``): the result must equal rosettasciio's, field by field;
calibrated and ImageJ TIFFs still go through rosettasciio."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile
from rsciio import tiff

from scherzer.io import imports
from scherzer.io.budget import ReadBudget
from scherzer.io.errors import EmdError

RNG = np.random.default_rng(3)
PLAIN = {
    "stack_f32": RNG.random((5, 64, 48), dtype=np.float32),
    "image_u16": (RNG.random((40, 56)) * 4000).astype(np.uint16),
    "stack_i32": (RNG.random((6, 32, 32)) * 1e6).astype(np.int32),
}


def _through_rsciio(path) -> list[imports.ImportedSignal]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dicts = imports.read_checked(tiff, "tiff", path, ReadBudget())
    return [imports._from_rsciio(d, "tiff", i, imports._stem(path)) for i, d in enumerate(dicts)]


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_tiff_equals_rosettasciio(tmp_path, name):
    path = tmp_path / f"{name}.tif"
    tifffile.imwrite(path, PLAIN[name])
    assert imports._plain_tiff(path, ReadBudget()) is not None  # the fast path is taken
    (fast,) = imports._signals_tiff(path, "tiff", ReadBudget())
    (slow,) = _through_rsciio(path)
    assert fast.data.dtype == slow.data.dtype and np.array_equal(fast.data, slow.data)
    assert fast.axes == slow.axes and fast.name == slow.name
    assert fast.metadata == slow.metadata and fast.source_format == slow.source_format


def test_calibrated_and_imagej_tiffs_go_through_rosettasciio(tmp_path):
    calibrated = tmp_path / "calibrated.tif"
    tifffile.imwrite(calibrated, PLAIN["stack_f32"], resolution=(50.0, 50.0),
                     resolutionunit="CENTIMETER")  # fmt: skip
    imagej = tmp_path / "imagej.tif"
    tifffile.imwrite(imagej, PLAIN["stack_f32"], imagej=True, resolution=(10.0, 10.0),
                     metadata={"unit": "nm"})  # fmt: skip
    assert imports._plain_tiff(calibrated, ReadBudget()) is None
    assert imports._plain_tiff(imagej, ReadBudget()) is None
    (got,) = imports._signals_tiff(calibrated, "tiff", ReadBudget())
    (slow,) = _through_rsciio(calibrated)
    assert got.axes == slow.axes and got.metadata == slow.metadata
    (got,) = imports._signals_tiff(imagej, "tiff", ReadBudget())
    assert got.axes[-1][1:3] == pytest.approx((0.1, 0.0)) and got.axes[-1][3] == "nm"


def test_plain_tiff_declared_size_is_checked_before_reading(tmp_path):
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, PLAIN["stack_f32"])
    with pytest.raises(EmdError):
        imports._signals_tiff(path, "tiff", ReadBudget(max_bytes=1000))
