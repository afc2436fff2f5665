"""ImageStack validation and records."""

from __future__ import annotations

import numpy as np
import pytest

from scherzer.optics import Optics
from scherzer.stack import (
    FrameRecord,
    ImageStack,
    StackError,
    records_from_array,
    records_to_array,
)


def _stack(n: int = 3) -> ImageStack:
    frames = np.arange(n * 4 * 5, dtype=np.uint16).reshape(n, 4, 5)
    records = [
        FrameRecord(index=i, time_s=0.5 * i, defocus_nominal_nm=-10.0 * i, signal="HRTEM")
        for i in range(n)
    ]
    return ImageStack(
        frames,
        pixel_size_nm=(0.02, 0.025),
        records=records,
        instrument={"optics": Optics(cs_mm=0.6).model_dump()},
        ground_truth={"shifts_px": np.arange(2 * n, dtype=float).reshape(n, 2)},
    )


def test_integer_frames_become_float32_and_records_default() -> None:
    s = ImageStack(np.ones((2, 3, 4), dtype=np.int32))
    assert s.frames.dtype == np.float32 and s.frames.flags.c_contiguous
    assert [r.index for r in s.records] == [0, 1]
    assert s.n_frames == 2 and s.frame_shape == (3, 4)


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.ones((4, 5)), "single 2-D image"),
        (np.ones((1, 2, 3, 4)), "4-D"),
        (np.ones((2, 3, 4), dtype=np.complex64), "complex"),
        (np.ones((2, 3, 4), dtype=bool), "dtype bool"),
        (np.zeros((0, 3, 4)), "empty"),
        (np.array([[[1.0, np.nan]]]), "non-finite"),
        (np.array([[[1.0, np.inf]]]), "non-finite"),
        (np.array([[["a"]]]), "dtype"),
    ],
)
def test_bad_frames_say_what_is_wrong(frames: np.ndarray, message: str) -> None:
    with pytest.raises(StackError, match=message):
        ImageStack(frames)


def test_bad_pixel_size_and_record_count() -> None:
    with pytest.raises(StackError, match="positive"):
        ImageStack(np.ones((1, 2, 2)), pixel_size_nm=(0.0, 1.0))
    with pytest.raises(StackError, match="two numbers"):
        ImageStack(np.ones((1, 2, 2)), pixel_size_nm=(1.0,))  # type: ignore[arg-type]
    with pytest.raises(StackError, match="3 frame records given for 1 frames"):
        ImageStack(np.ones((1, 2, 2)), records=[FrameRecord(index=i) for i in range(3)])
    with pytest.raises(StackError, match="ground_truth"):
        ImageStack(np.ones((1, 2, 2)), ground_truth={"x": np.array([np.nan])})


def test_records_round_trip_through_structured_array() -> None:
    s = _stack()
    table = records_to_array(s.records)
    assert table.dtype.names is not None and "defocus_nominal_nm" in table.dtype.names
    back = records_from_array(table)
    assert back[1].signal == "HRTEM" and back[2].defocus_nominal_nm == -20.0
    assert np.isnan(back[0].defocus_readback_nm)


def test_subset_carries_records_and_truth() -> None:
    s = _stack(4).subset([3, 1])
    assert s.n_frames == 2
    assert [r.index for r in s.records] == [3, 1]
    np.testing.assert_array_equal(s.ground_truth["shifts_px"], [[6, 7], [2, 3]])
    np.testing.assert_array_equal(s.column("defocus_nominal_nm"), [-30.0, -10.0])
    assert s.optics is not None and s.optics.cs_mm == 0.6
    with pytest.raises(StackError, match="out of range"):
        s.subset([5])
    with pytest.raises(KeyError):
        s.column("nonsense")
