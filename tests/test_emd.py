"""EMD files: exact round trips, crash safety, rosettasciio interoperability, and import of every
real microscope file in ../shared/testdata as its README describes it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from scherzer import io as sio
from scherzer.stack import FrameRecord, ImageStack, records_to_array

REPO = Path(__file__).resolve().parents[1]


# --- helpers ---------------------------------------------------------------------------------


def make_stack(n: int = 4, shape: tuple[int, int] = (12, 10), seed: int = 1) -> ImageStack:
    rng = np.random.default_rng(seed)
    frames = rng.normal(100.0, 10.0, size=(n, *shape)).astype(np.float32)
    records = [
        FrameRecord(
            index=i,
            time_s=0.25 * i,
            defocus_nominal_nm=-50.0 + 10.0 * i,
            defocus_readback_nm=-50.3 + 10.0 * i,
            scan_rotation_deg=90.0 * (i % 2),
            exposure_s=0.5,
            dose_e_per_A2=123.4,
            signal="camera",
        )
        for i in range(n)
    ]
    return ImageStack(
        frames=frames,
        pixel_size_nm=(0.028, 0.031),
        records=records,
        instrument={
            "voltage_kv": 300.0,
            "optics": {"voltage_kv": 300.0, "cs_mm": 0.6, "focal_spread_nm": 4.0},
            "camera": "sim",
            "binning": 2,
            "flags": [True, False],
        },
        metadata={"plan": "focal-series", "seed": 7, "note": None},
        ground_truth={
            "shifts_px": rng.normal(size=(n, 2)),
            "defocus_nm": np.linspace(-50, -20, n),
            "mask": np.array([True, False, True, True][:n]),
            "thickness_nm": 5.5,
            "specimen": "SrTiO3 [001]",
        },
        intensity_units="electrons",
    )


def assert_records_equal(a: list[FrameRecord], b: list[FrameRecord]) -> None:
    ta, tb = records_to_array(a), records_to_array(b)
    assert ta.dtype == tb.dtype
    for col in ta.dtype.names:
        np.testing.assert_array_equal(ta[col], tb[col], err_msg=col)


def assert_truth_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, np.ndarray):
            assert b[key].dtype == value.dtype, key
            np.testing.assert_array_equal(b[key], value, err_msg=key)
        else:
            assert b[key] == value and type(b[key]) is type(value), key


def rsciio_read(path: Path) -> list[dict]:
    from rsciio.emd import file_reader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return file_reader(str(path))


# --- our files: round trips --------------------------------------------------------------------


def test_stack_round_trip_is_exact(tmp_path: Path) -> None:
    stack = make_stack()
    path = tmp_path / "s.emd"
    sio.write_stack(path, stack)
    back = sio.read_stack(path)
    assert back.frames.dtype == np.float32
    np.testing.assert_array_equal(back.frames, stack.frames)
    assert back.pixel_size_nm == stack.pixel_size_nm
    assert_records_equal(back.records, stack.records)
    assert back.records[1].signal == "camera"
    assert back.instrument == stack.instrument
    assert back.metadata == stack.metadata
    assert_truth_equal(stack.ground_truth, back.ground_truth)
    assert back.intensity_units == "electrons"


def test_file_layout_follows_emd_1_0(tmp_path: Path) -> None:
    stack = make_stack(n=3)
    path = tmp_path / "s.emd"
    sio.write_stack(path, stack)
    with h5py.File(path, "r") as f:
        assert int(f.attrs["version_major"]) == 1 and int(f.attrs["version_minor"]) == 0
        g = f["data/frames"]
        assert int(g.attrs["emd_group_type"]) == 1
        assert g["data"].shape == (3, 12, 10)
        names = [g[f"dim{k}"].attrs["name"] for k in (1, 2, 3)]
        units = [g[f"dim{k}"].attrs["units"] for k in (1, 2, 3)]
        assert names == ["frame", "y", "x"] and units == ["", "nm", "nm"]
        np.testing.assert_allclose(np.diff(g["dim2"][()]), 0.028)
        np.testing.assert_allclose(np.diff(g["dim3"][()]), 0.031)
        assert g["records"].shape == (3,)
        assert float(f["microscope"].attrs["voltage_kv"]) == 300.0
        assert f["ground_truth/frames/shifts_px"].shape == (3, 2)


def test_second_signal_is_added_with_mode_a(tmp_path: Path) -> None:
    path = tmp_path / "two.emd"
    haadf, abf = make_stack(n=2, seed=1), make_stack(n=2, seed=2)
    sio.write_stack(path, haadf, name="HAADF")
    sio.write_stack(path, abf, name="ABF", mode="a")
    stacks = sio.read_stacks(path)
    assert list(stacks) == ["HAADF", "ABF"]
    np.testing.assert_array_equal(stacks["ABF"].frames, abf.frames)
    np.testing.assert_array_equal(sio.read_stack(path).frames, haadf.frames)  # first written
    np.testing.assert_array_equal(sio.import_stack(path, 1).frames, abf.frames)


def test_complex_result_round_trip_with_dims_and_attrs(tmp_path: Path) -> None:
    path = tmp_path / "r.emd"
    sio.write_stack(path, make_stack(n=2))
    rng = np.random.default_rng(3)
    wave = (rng.normal(size=(12, 10)) + 1j * rng.normal(size=(12, 10))).astype(np.complex128)
    dims = [("y", "nm", np.arange(12) * 0.028), ("x", "nm", None)]
    sio.write_result(path, "exit_wave", wave, dims=dims, attrs={"defocus_nm": -12.5, "n": 2})
    back = sio.read_result(path, "exit_wave")
    assert back.dtype == np.complex64
    np.testing.assert_array_equal(back, wave.astype(np.complex64))
    info = sio.describe(path)["data"]["exit_wave"]
    assert info["kind"] == "result" and info["attrs"] == {"defocus_nm": -12.5, "n": 2}
    assert info["dims"][0]["units"] == "nm" and info["dims"][0]["step"] == pytest.approx(0.028)
    real = np.arange(6, dtype=np.float32).reshape(2, 3)
    sio.write_result(path, "average", real)
    np.testing.assert_array_equal(sio.read_result(path, "average"), real)
    sio.write_result(path, "average", real * 2)  # replacing a result of that name
    np.testing.assert_array_equal(sio.read_result(path, "average"), real * 2)


def test_table_and_processing_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.emd"
    sio.write_stack(path, make_stack(n=3))
    table = np.zeros(3, dtype=[("dy", "f8"), ("dx", "f8"), ("peak", "f4"), ("label", "U8")])
    table["dy"], table["dx"], table["peak"] = [0.5, -1.25, 2.0], [3.0, 0.0, -7.5], [0.1, 0.2, 0.3]
    table["label"] = ["ref", "µ-frame", "x"]
    sio.write_table(path, "registration", table)
    back = sio.read_table(path, "registration")
    assert back.dtype == table.dtype
    np.testing.assert_array_equal(back, table)
    params = {"alpha": 0.5, "reference": 1, "window": "hamming", "exclude": [2], "opts": None}
    sio.write_processing(path, "align", params)
    assert sio.read_processing(path, "align") == params
    assert sio.describe(path)["processing"]["align"] == params


def test_store_pipeline_result(tmp_path: Path) -> None:
    from types import SimpleNamespace

    path = tmp_path / "p.emd"
    stack = make_stack(n=3)
    sio.write_stack(path, stack, name="HAADF")
    table = np.zeros(3, dtype=[("dy", "f8"), ("dx", "f8"), ("peak", "f8")])
    table["dy"] = [0.0, 1.5, -2.25]
    wave = np.full((12, 10), 1 - 1j, dtype=np.complex128)
    outputs = [
        SimpleNamespace(
            step="align", params={"alpha": 0.5}, summary={"max_shift_px": 2.25, "bad": math.nan},
            stacks={"aligned_HAADF": stack.with_frames(stack.frames + 1)},
            arrays={"average_HAADF": stack.frames.mean(axis=0)}, tables={"alignment": table},
            seconds=0.125,
        ),
        SimpleNamespace(
            step="restore", params={"iterations": 3}, summary={"defocus_nm": -41.0},
            stacks={}, arrays={"exit_wave": wave}, tables={}, seconds=1.5,
            dims={"exit_wave": [("y", "nm", None), ("x", "nm", None)]},
        ),
    ]  # fmt: skip
    sio.store_pipeline_result(path, SimpleNamespace(outputs=outputs))
    stacks = sio.read_stacks(path)
    assert list(stacks) == ["HAADF", "aligned_HAADF"]
    np.testing.assert_array_equal(stacks["aligned_HAADF"].frames, stack.frames + 1)
    np.testing.assert_array_equal(sio.read_result(path, "average_HAADF"), stack.frames.mean(0))
    assert sio.read_result(path, "exit_wave").dtype == np.complex64
    np.testing.assert_array_equal(sio.read_table(path, "alignment"), table)
    assert sio.read_processing(path, "align") == {"alpha": 0.5}
    assert sio.read_processing_summary(path, "align") == {
        "max_shift_px": 2.25, "bad": None, "seconds": 0.125,
    }  # fmt: skip
    assert sio.read_processing_summary(path, "restore")["defocus_nm"] == -41.0
    info = sio.describe(path)
    assert info["data"]["exit_wave"]["dims"][0]["units"] == "nm"
    assert info["data"]["exit_wave"]["attrs"] == {"step": "restore"}
    assert info["processing_summary"]["restore"] == {"defocus_nm": -41.0}


def test_rosettasciio_reads_our_files(tmp_path: Path) -> None:
    """The external proof of the format: rosettasciio's Berkeley-EMD reader finds our stack and
    result, with their shapes and calibrated axes (it presents arrays transposed, dims reversed,
    as it does for every Berkeley EMD file)."""
    stack = make_stack(n=3)
    path = tmp_path / "ours.emd"
    sio.write_stack(path, stack)
    wave = np.ones((12, 10), np.complex64) * (1 + 2j)
    sio.write_result(path, "exit_wave", wave, dims=[("y", "nm", None), ("x", "nm", None)])
    dicts = {d["metadata"]["General"]["title"]: d for d in rsciio_read(path)}
    assert set(dicts) == {"frames", "exit_wave"}
    frames = dicts["frames"]
    assert frames["data"].shape == (10, 12, 3)
    np.testing.assert_array_equal(frames["data"].T, stack.frames)
    axes = [(a["name"], a["size"], a["units"]) for a in frames["axes"]]
    assert axes == [("x", 10, "nm"), ("y", 12, "nm"), ("frame", 3, "")]
    assert frames["axes"][0]["scale"] == pytest.approx(0.031)
    assert frames["axes"][1]["scale"] == pytest.approx(0.028)
    assert frames["original_metadata"]["microscope"]["voltage_kv"] == 300.0
    assert dicts["exit_wave"]["data"].dtype == np.complex64
    np.testing.assert_array_equal(dicts["exit_wave"]["data"].T, wave)


def test_rosettasciio_reads_a_closed_stackwriter_file(tmp_path: Path) -> None:
    path = tmp_path / "w.emd"
    frames = np.arange(3 * 6 * 5, dtype=np.float32).reshape(3, 6, 5)
    with sio.StackWriter(path, pixel_size_nm=(0.1, 0.2), frame_shape=(6, 5)) as w:
        for i, frame in enumerate(frames):
            w.append(frame, FrameRecord(index=i))
    (d,) = rsciio_read(path)
    np.testing.assert_array_equal(d["data"].T, frames)
    assert [a["units"] for a in d["axes"]] == ["nm", "nm", ""]


# --- StackWriter ---------------------------------------------------------------------------------


def test_stackwriter_two_signals_ground_truth_and_results(tmp_path: Path) -> None:
    path = tmp_path / "acq.emd"
    rng = np.random.default_rng(5)
    frames = rng.normal(size=(2, 3, 8, 9)).astype(np.float32)
    with sio.StackWriter(
        path,
        pixel_size_nm=(0.05, 0.05),
        frame_shape=(8, 9),
        names=("HAADF", "ABF"),
        instrument={"voltage_kv": 200.0},
        metadata={"plan": "rotated-scan"},
    ) as w:
        for i in range(3):
            rec = FrameRecord(index=i, time_s=i * 1.5, dwell_us=2.0, scan_rotation_deg=90.0 * i)
            assert w.append(frames[0, i], rec, name="HAADF") == i + 1
            w.append(frames[1, i], FrameRecord(index=i, signal="ABF"), name="ABF")
            if i == 1:
                w.set_ground_truth({"drift_nm_per_s": np.array([0.01, -0.02])})
        assert w.counts() == {"HAADF": 3, "ABF": 3}
        with pytest.raises(sio.EmdError, match="unknown signal 'BF'"):
            w.append(frames[0, 0], FrameRecord(index=0), name="BF")
        with pytest.raises(sio.EmdError, match=r"frame shape \(4, 4\)"):
            w.append(np.zeros((4, 4)), FrameRecord(index=3), name="HAADF")
    stacks = sio.read_stacks(path)
    np.testing.assert_array_equal(stacks["HAADF"].frames, frames[0])
    np.testing.assert_array_equal(stacks["ABF"].frames, frames[1])
    assert stacks["HAADF"].column("scan_rotation_deg").tolist() == [0.0, 90.0, 180.0]
    assert stacks["ABF"].signal == "ABF"
    assert stacks["HAADF"].instrument == {"voltage_kv": 200.0}
    assert stacks["ABF"].metadata == {"plan": "rotated-scan"}
    np.testing.assert_array_equal(stacks["ABF"].ground_truth["drift_nm_per_s"], [0.01, -0.02])
    # results and processing go into the file the writer closed
    sio.write_result(path, "average", frames[0].mean(axis=0))
    sio.write_processing(path, "align", {"alpha": 1.0})
    sio.write_table(path, "shifts", np.zeros(3, dtype=[("dy", "f4"), ("dx", "f4")]))
    assert sio.read_processing(path, "align") == {"alpha": 1.0}
    np.testing.assert_allclose(sio.read_result(path, "average"), frames[0].mean(axis=0))
    assert len(sio.read_table(path, "shifts")) == 3


def test_reading_while_writing_in_the_same_process(tmp_path: Path) -> None:
    """The daemon counts frames on disk while its own writer holds the file."""
    path = tmp_path / "live.emd"
    with sio.StackWriter(path, pixel_size_nm=(1, 1), frame_shape=(4, 4), names=("A", "B")) as w:
        for i in range(3):
            w.append(np.full((4, 4), float(i)), FrameRecord(index=i), name="A")
            stacks = sio.read_stacks(path)
            assert list(stacks) == ["A"] and stacks["A"].n_frames == i + 1  # B: no frames yet
            assert sio.describe(path)["data"]["B"]["frames_complete"] == 0
        with pytest.raises(sio.EmdError, match="no complete frames"):
            sio.read_stack(path, "B")
    np.testing.assert_array_equal(sio.read_stack(path).frames[:, 0, 0], [0.0, 1.0, 2.0])


def test_stackwriter_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "x.emd"
    path.write_bytes(b"")
    with pytest.raises(sio.EmdError, match="already exists"):
        sio.StackWriter(path, pixel_size_nm=(1, 1), frame_shape=(4, 4))
    w = sio.StackWriter(path, pixel_size_nm=(1, 1), frame_shape=(4, 4), overwrite=True)
    w.close()
    with pytest.raises(sio.EmdError, match="closed"):
        w.append(np.zeros((4, 4)), FrameRecord(index=0))


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from scherzer.io import StackWriter
    from scherzer.stack import FrameRecord

    path, pause = sys.argv[1], float(sys.argv[2])
    shape = (64, 48)
    with StackWriter(path, pixel_size_nm=(0.1, 0.1), frame_shape=shape,
                     names=("HAADF", "ABF"), instrument={"voltage_kv": 300.0}) as w:
        print("open", flush=True)
        for i in range(100000):
            frame = np.full(shape, float(i), dtype=np.float32)
            w.append(frame, FrameRecord(index=i, time_s=0.1 * i), name="HAADF")
            w.append(-frame, FrameRecord(index=i, time_s=0.1 * i), name="ABF")
            print(i + 1, flush=True)
            if i % 10 == 9:  # leaves SWMR mode briefly: a kill may land there too
                w.set_ground_truth({"frames_so_far": np.arange(i + 1)})
            if pause:
                time.sleep(pause)
    """
)


def run_writer_and_kill(path: Path, pause: float, wait_frames: int, read_while_writing: bool):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(path), str(pause)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    seen, during = 0, None
    try:
        assert proc.stdout.readline().strip() == "open", proc.stderr.read()
        for line in proc.stdout:
            seen = int(line)
            if read_while_writing and during is None and seen >= 2:
                during = sio.read_stack(path, "HAADF").n_frames  # SWMR read of a live file
            if seen >= wait_frames:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    printed = [int(line) for line in proc.stdout.read().split()]  # lines still in the pipe
    return max([seen, *printed]), during


def check_killed_file(path: Path, seen: int) -> None:
    stacks = sio.read_stacks(path)
    haadf, abf = stacks["HAADF"], stacks["ABF"]
    # every frame whose append returned (and was reported) is there; at most one more
    assert seen <= haadf.n_frames <= seen + 1
    assert seen <= abf.n_frames <= seen + 1
    for stack, sign in ((haadf, 1.0), (abf, -1.0)):
        idx = np.arange(stack.n_frames)
        np.testing.assert_array_equal(stack.column("index"), idx)
        np.testing.assert_array_equal(stack.frames[:, 5, 7], sign * idx)  # frames match records
        np.testing.assert_allclose(stack.column("time_s"), 0.1 * idx)
    assert haadf.instrument == {"voltage_kv": 300.0}
    truth = haadf.ground_truth.get("frames_so_far")
    assert truth is None or len(truth) % 10 == 0


def test_sigkilled_writer_leaves_a_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "killed.emd"
    seen, during = run_writer_and_kill(path, pause=0.02, wait_frames=6, read_while_writing=True)
    assert during is not None and during >= 2
    check_killed_file(path, seen)
    info = sio.describe(path)
    assert info["data"]["HAADF"]["frames_complete"] >= seen
    # other readers need the writer's "open for writing" flag cleared (as h5clear -s does)
    frames = sio.read_stack(path, "HAADF").frames
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")
    assert sio.repair(path) is True
    assert sio.repair(path) is False
    dicts = {d["metadata"]["General"]["title"]: d for d in rsciio_read(path)}
    np.testing.assert_array_equal(dicts["HAADF"]["data"].T[: len(frames)], frames)
    sio.write_result(path, "average", frames.mean(axis=0))
    np.testing.assert_allclose(sio.read_result(path, "average"), frames.mean(axis=0))


def test_kill_outside_swmr_mode_is_recovered(tmp_path: Path) -> None:
    """A writer killed while it held the file open normally (as set_ground_truth does for a
    moment) leaves a stale flag; readers clear it when no process holds the file."""
    path = tmp_path / "flagged.emd"
    with sio.StackWriter(path, pixel_size_nm=(0.1, 0.1), frame_shape=(4, 4)) as w:
        w.append(np.ones((4, 4)), FrameRecord(index=0))
    script = textwrap.dedent(
        f"""
        import os, signal, h5py
        f = h5py.File({str(path)!r}, "a", libver=("v110", "latest"))
        f.attrs["touched"] = 1
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")
    np.testing.assert_array_equal(sio.read_stack(path).frames, np.ones((1, 4, 4)))
    with h5py.File(path, "r") as f:  # now any reader can open it
        assert int(f.attrs["touched"]) == 1


def test_sigkill_in_a_tight_append_loop(tmp_path: Path) -> None:
    """No pause between appends: the kill lands at an arbitrary point inside an append."""
    for trial in range(3):
        path = tmp_path / f"tight{trial}.emd"
        seen, _ = run_writer_and_kill(path, 0.0, 20 + 37 * trial, read_while_writing=False)
        check_killed_file(path, seen)


# --- bad input -----------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        sio.read_stack(tmp_path / "missing.emd")
    with pytest.raises(FileNotFoundError, match="no such file"):
        sio.import_stack(tmp_path / "missing.dm3")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sio.write_stack(tmp_path / "no_such_dir" / "s.emd", make_stack(n=1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sio.StackWriter(
            tmp_path / "no_such_dir" / "w.emd", pixel_size_nm=(1, 1), frame_shape=(2, 2)
        )
    garbage = tmp_path / "garbage.emd"
    garbage.write_bytes(b"this is not HDF5 at all" * 10)
    with pytest.raises(sio.EmdError, match="not an HDF5 file"):
        sio.read_stack(garbage)
    with pytest.raises(sio.EmdError, match="unrecognised file format"):
        sio.import_signals(garbage)
    with pytest.raises(sio.EmdError, match="not an HDF5 file"):
        sio.write_result(garbage, "x", np.zeros(3))
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["stuff"] = np.zeros(3)
    with pytest.raises(sio.EmdError, match="not a Scherzer EMD file"):
        sio.read_stack(foreign)
    with pytest.raises(sio.EmdError, match="neither EMD"):
        sio.import_signals(foreign)
    with pytest.raises(sio.EmdError, match="another program"):
        sio.write_processing(foreign, "align", {})
    path = tmp_path / "ok.emd"
    sio.write_stack(path, make_stack(n=2))
    with pytest.raises(sio.EmdError, match=r"no stack 'ABF'; stacks: \['frames'\]"):
        sio.read_stack(path, "ABF")
    with pytest.raises(sio.EmdError, match="no /data/nothing"):
        sio.read_result(path, "nothing")
    with pytest.raises(sio.EmdError, match="no processing step 'align'"):
        sio.read_processing(path, "align")
    with pytest.raises(sio.EmdError, match="no table"):
        sio.read_table(path, "shifts")
    with pytest.raises(sio.EmdError, match="structured array"):
        sio.write_table(path, "shifts", np.zeros(3))
    with pytest.raises(sio.EmdError, match=r"3 values \(shape \(3,\)\) for an axis of length 2"):
        sio.write_result(
            path, "r", np.zeros((2, 2)), dims=[("y", "nm", [0, 1, 2]), ("x", "", None)]
        )
    with pytest.raises(sio.EmdError, match="mode must be"):
        sio.write_stack(path, make_stack(n=1), mode="x")
    with pytest.raises(sio.EmdError, match="no stack 'DF9'"):
        sio.import_stack(path, "DF9")


# --- foreign formats made here: TIFF and .npy ----------------------------------------------------


def test_npy_and_tiff_import(tmp_path: Path) -> None:
    import tifffile

    data = np.arange(3 * 5 * 4, dtype=np.uint16).reshape(3, 5, 4)
    npy = tmp_path / "series.npy"
    np.save(npy, data)
    (sig,) = sio.import_signals(npy)
    assert sig.source_format == "npy" and sig.data.dtype == np.uint16
    stack = sio.import_stack(npy)
    assert stack.frames.shape == (3, 5, 4) and stack.pixel_size_nm == (1.0, 1.0)
    np.testing.assert_array_equal(stack.frames, data)
    tif = tmp_path / "series.tif"
    tifffile.imwrite(tif, data, imagej=True, resolution=(1 / 0.25, 1 / 0.5),
                     metadata={"unit": "nm", "axes": "ZYX"})  # fmt: skip
    (sig,) = sio.import_signals(tif)
    assert sig.data.shape == (3, 5, 4) and sig.axes[1][3] == "nm"
    stack = sio.import_stack(tif)
    assert stack.pixel_size_nm == pytest.approx((0.5, 0.25))
    np.testing.assert_array_equal(stack.frames, data)
    um = tmp_path / "single.tif"
    tifffile.imwrite(um, data[0], imagej=True, resolution=(1 / 0.002, 1 / 0.002),
                     metadata={"unit": "um"})  # fmt: skip
    assert sio.import_stack(um).pixel_size_nm == pytest.approx((2.0, 2.0))


def test_files_written_by_rosettasciio(tmp_path: Path) -> None:
    """HyperSpy writes Berkeley EMD transposed (dim1 = x): we import it back as (y, x); its .hspy
    files carry instrument values in mapped metadata."""
    from rsciio import emd as rs_emd
    from rsciio import hspy

    image = np.arange(35, dtype=np.float32).reshape(5, 7)
    axes = [
        {"name": "y", "size": 5, "scale": 2.0, "offset": 0, "units": "Å", "navigate": False},
        {"name": "x", "size": 7, "scale": 0.03, "offset": 0, "units": "µm", "navigate": False},
    ]
    tem = {"beam_energy": 300.0, "magnification": 1e6, "dwell_time": 2e-6}
    signal = {
        "data": image,
        "axes": axes,
        "metadata": {"General": {"title": "img"}, "Signal": {"signal_type": ""},
                     "Acquisition_instrument": {"TEM": tem}},
        "original_metadata": {},
        "tmp_parameters": {},
        "attributes": {"_lazy": False},
        "learning_results": {},
        "models": {},
        "package_info": {"name": "hyperspy", "version": "2.0"},
    }  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rs_emd.file_writer(str(tmp_path / "hs.emd"), signal)
        signal["data"] = np.stack([image, image + 1]).astype(np.uint16)
        signal["axes"] = [
            {"name": "time", "size": 2, "scale": 1.5, "offset": 0, "units": "s", "navigate": True},
            *axes,
        ]
        hspy.file_writer(str(tmp_path / "hs.hspy"), signal)
    stack = sio.import_stack(tmp_path / "hs.emd")
    np.testing.assert_array_equal(stack.frames[0], image)
    assert stack.pixel_size_nm == pytest.approx((0.2, 30.0))
    series = sio.import_stack(tmp_path / "hs.hspy")
    assert series.frames.shape == (2, 5, 7) and series.pixel_size_nm == pytest.approx((0.2, 30.0))
    np.testing.assert_allclose(series.column("time_s"), [0.0, 1.5])
    assert series.instrument["voltage_kv"] == 300.0
    assert series.records[1].dwell_us == pytest.approx(2.0)


# --- the real files in ../shared/testdata ---------------------------------------------------------


def test_emi_without_its_ser_says_so(testdata_dir: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone.emi"
    lone.write_bytes((testdata_dir / "rosettasciio/tia/64x64x5_TEM_preview.emi").read_bytes())
    with pytest.raises(sio.EmdError, match=r"lone_1\.ser"):
        sio.import_stack(lone)


def test_stoimage_tia(testdata_dir: Path) -> None:
    (sig,) = sio.import_signals(testdata_dir / "ncempy/16_STOimage.emi")
    assert sig.data.shape == (1024, 1024) and sig.data.dtype == np.uint16
    assert sig.source_format == "tia"
    assert sig.metadata["voltage_kv"] == pytest.approx(80.0)
    assert sig.metadata["magnification"] == pytest.approx(13.5e6)
    assert sig.metadata["dwell_us"] == pytest.approx(29.0)
    assert "TitanCubed D3147" in sig.metadata["microscope"]
    stack = sio.import_stack(testdata_dir / "ncempy/16_STOimage_1.ser")
    assert stack.frames.shape == (1, 1024, 1024)
    assert stack.pixel_size_nm == pytest.approx((0.0100127, 0.0100127), rel=1e-5)


def test_acquisition_18_berkeley_v02_with_n_m_units(testdata_dir: Path) -> None:
    (sig,) = sio.import_signals(testdata_dir / "ncempy/Acquisition_18.emd")
    assert sig.data.shape == (1024, 1024) and sig.data.dtype == np.uint16
    assert [a[3] for a in sig.axes] == ["nm", "nm"]  # "n_m" understood
    assert sig.axes[0][1] == pytest.approx(0.0122465, rel=1e-5)
    assert sig.metadata["voltage_kv"] == pytest.approx(200.0)
    assert sig.metadata["magnification"] == pytest.approx(5.1e6)
    assert sig.metadata["dwell_us"] == pytest.approx(1.0)
    assert sig.metadata["microscope"] == "TEAM 0.5"
    stack = sio.import_stack(testdata_dir / "ncempy/Acquisition_18.emd")
    assert stack.pixel_size_nm == pytest.approx((0.0122465, 0.0122465), rel=1e-5)
    assert stack.instrument["voltage_kv"] == pytest.approx(200.0)
    assert stack.records[0].dwell_us == pytest.approx(1.0)


def test_atomap_float16_hspy(testdata_dir: Path) -> None:
    for name in ("test_ADF_cropped.hdf5", "test_ABF_cropped.hdf5"):
        (sig,) = sio.import_signals(testdata_dir / "atomap" / name)
        assert sig.source_format == "hyperspy"
        assert sig.data.shape == (400, 380) and sig.data.dtype == np.float16
        stack = sio.import_stack(testdata_dir / "atomap" / name)
        assert stack.frames.shape == (1, 400, 380) and stack.frames.dtype == np.float32
        assert stack.pixel_size_nm == pytest.approx((0.00932627, 0.00932627), rel=1e-5)
        assert any("no unit" in note for note in stack.metadata["notes"])


def test_tia_series(testdata_dir: Path) -> None:
    stack = sio.import_stack(testdata_dir / "rosettasciio/tia/03_Scanning Preview.emi")
    assert stack.frames.shape == (5, 128, 128)
    assert stack.pixel_size_nm == pytest.approx((0.384352, 0.384352), rel=1e-5)
    assert stack.instrument["voltage_kv"] == pytest.approx(200.0)
    assert stack.records[0].dwell_us == pytest.approx(12.0)
    times = stack.column("time_s")
    assert times[0] == 0.0 and 0.0 <= times[-1] <= 1.0 and np.all(np.diff(times) >= 0)
    (sig,) = sio.import_signals(testdata_dir / "rosettasciio/tia/64x64x5_TEM_preview_1.ser")
    assert sig.data.shape == (5, 64, 64) and sig.data.dtype == np.float32
    assert sig.axes[1][1] == pytest.approx(6.28183, rel=1e-5)


def test_velox_files(testdata_dir: Path) -> None:
    folder = testdata_dir / "ncempy"
    sigs = sio.import_signals(folder / "STEM HAADF-DF4-DF2-BF Diffraction Micro.emd")
    assert len(sigs) == 4
    assert sorted(s.name for s in sigs) == ["BF", "DF2", "DF4", "HAADF"]
    assert all(s.data.shape == (128, 128) and s.data.dtype == np.uint16 for s in sigs)
    haadf = next(s for s in sigs if s.name == "HAADF")
    assert 9980 <= haadf.data.min() <= haadf.data.max() <= 10010
    assert not np.any(next(s for s in sigs if s.name == "BF").data)
    assert haadf.axes[0][1] == pytest.approx(87.37080, rel=1e-5)  # 0.0873708 µm
    assert haadf.metadata["voltage_kv"] == pytest.approx(300.0)
    assert haadf.metadata["dwell_us"] == pytest.approx(10.0)
    stacks = sio.import_stacks(folder / "STEM HAADF-DF4-DF2-BF Diffraction Micro.emd")
    assert len(stacks) == 4
    assert sio.import_stack(
        folder / "STEM HAADF-DF4-DF2-BF Diffraction Micro.emd", "df4"
    ).signal == ("DF4")
    with pytest.raises(sio.EmdError, match=r"no signal 'DF9'; it holds \['HAADF'"):
        sio.import_stack(folder / "STEM HAADF-DF4-DF2-BF Diffraction Micro.emd", "DF9")
    with pytest.raises(sio.EmdError, match="signal index 4 out of range"):
        sio.import_stack(folder / "STEM HAADF-DF4-DF2-BF Diffraction Micro.emd", 4)
    ceta = sio.import_stack(folder / "Camera Ceta Imaging Micro.emd")
    assert ceta.frames.shape == (1, 512, 512)
    assert ceta.frames.min() >= -10 and ceta.frames.max() <= 7
    assert ceta.pixel_size_nm == pytest.approx((3.13884, 3.13884), rel=1e-5)
    assert ceta.records[0].exposure_s == pytest.approx(0.4)
    (single,) = sio.import_signals(folder / "STEM HAADF Diffraction Micro.emd")
    assert single.name == "HAADF" and single.data.shape == (128, 128)
    fei = sio.import_stack(testdata_dir / "scifidatasets/EMDReader_Image_FEI.emd")
    assert fei.frames.shape == (1, 512, 512)
    assert fei.pixel_size_nm == pytest.approx((5.30241, 5.30241), rel=1e-5)
    assert fei.records[0].dwell_us == pytest.approx(20.0)
    assert fei.instrument["voltage_kv"] == pytest.approx(200.0)


def test_velox_tem_stack_frames_first(testdata_dir: Path) -> None:
    path = testdata_dir / "rosettasciio/emd/fei_example_tem_stack.emd"
    (sig,) = sio.import_signals(path)
    assert sig.data.shape == (2, 3, 3) and sig.data.dtype == np.int16
    assert sig.axes[0][3] == "s" and sig.axes[0][1] == pytest.approx(0.8)
    stack = sio.import_stack(path)
    assert stack.frames.shape == (2, 3, 3)
    assert stack.pixel_size_nm == pytest.approx((0.00817288, 0.00817288), rel=1e-5)
    np.testing.assert_allclose(stack.column("time_s"), [0.0, 0.8])
    assert stack.instrument["voltage_kv"] == pytest.approx(300.0)
    np.testing.assert_array_equal(stack.frames, sig.data)


def test_dm_3d_axis_order_and_units(testdata_dir: Path) -> None:
    for ext in ("dm3", "dm4"):
        path = testdata_dir / f"ncempy/dmTest_3D_int16_64,65,66.{ext}"
        (sig,) = sio.import_signals(path)
        assert sig.data.shape == (66, 65, 64) and sig.data.dtype == np.int16
        assert [(a[0], a[3]) for a in sig.axes] == [("z", "nm"), ("y", "nm"), ("x", "nm")]
        assert [a[1] for a in sig.axes] == pytest.approx([4000.0, 3.0, 0.002])
        assert sig.data.min() == 0 and sig.data.max() == 63
        stack = sio.import_stack(path)
        assert stack.frames.shape == (66, 65, 64)
        assert stack.pixel_size_nm == pytest.approx((3.0, 0.002))


def test_dm_non_square_pixels(testdata_dir: Path) -> None:
    for ext in ("dm3", "dm4"):
        stack = sio.import_stack(
            testdata_dir / f"ncempy/dmTest_float32_nonSquare_diffPixelSize.{ext}"
        )
        assert stack.frames.shape == (1, 64, 128)
        assert stack.pixel_size_nm == pytest.approx((0.2, 1.0))  # y 2 Å, x 1 nm
        assert stack.frames.min() == 0 and stack.frames.max() == 127


def test_dm_images(testdata_dir: Path) -> None:
    dm = testdata_dir / "rosettasciio/dm"
    sigs = sio.import_signals(dm / "multi_signal.dm3")
    assert [(s.name, s.data.shape) for s in sigs] == [("HAADF", (512, 512)), ("Plot", (512,))]
    assert sigs[0].metadata["voltage_kv"] == pytest.approx(300.0)
    assert sigs[0].metadata["dwell_us"] == pytest.approx(32.4, rel=1e-5)
    assert len(sio.import_stacks(dm / "multi_signal.dm3")) == 1  # the line profile is skipped
    haadf = sio.import_stack(dm / "multi_signal.dm3")
    assert haadf.signal == "HAADF" and haadf.frames.shape == (1, 512, 512)
    assert haadf.pixel_size_nm == pytest.approx((0.0177516, 0.0177516), rel=1e-5)
    with pytest.raises(sio.EmdError, match="1-D line profile"):
        sio.import_stack(dm / "multi_signal.dm3", "Plot")
    survey = sio.import_stack(testdata_dir / "hyperspy_tools/survey_image.dm3")
    assert survey.frames.shape == (1, 512, 512)
    assert survey.pixel_size_nm == pytest.approx((0.16978, 0.16978), rel=1e-4)
    assert survey.instrument["voltage_kv"] == pytest.approx(200.0)
    stem = sio.import_stack(dm / "test_STEM_image.dm3")
    assert stem.frames.shape == (1, 68, 68)
    assert stem.pixel_size_nm == pytest.approx((0.248538, 0.248538), rel=1e-5)
    diff = sio.import_stack(dm / "test_diffraction_pattern.dm3")
    assert diff.frames.shape == (1, 87, 87) and diff.pixel_size_nm == (1.0, 1.0)
    assert any("1/nm" in note for note in diff.metadata["notes"])
    assert diff.records[0].exposure_s == pytest.approx(0.2)
    built = sio.import_stack(dm / "test_stackbuilder_imagestack.dm3")
    assert built.frames.shape == (3, 2, 16)
    assert built.pixel_size_nm == pytest.approx((59.9829, 59.9829), rel=1e-5)  # 0.0599829 µm


def test_packed_complex_fft_is_refused_as_a_stack(testdata_dir: Path) -> None:
    path = testdata_dir / "rosettasciio/dm/test_fft_packed_complex8.dm4"
    (sig,) = sio.import_signals(path)
    assert sig.data.dtype == np.complex64 and sig.data.shape == (5, 4)
    with pytest.raises(sio.EmdError, match=r"complex64.*FFT"):
        sio.import_stack(path)


DM_DTYPES = {
    1: "int16", 2: "float32", 3: "complex64", 5: "complex64", 6: "uint8", 7: "int32",
    8: "rgba", 9: "int8", 10: "uint16", 11: "uint32", 12: "float64", 13: "complex128",
    14: "bool", 23: "rgba", 27: "complex64", 28: "complex128",
}  # fmt: skip


def test_dm_dtype_files(testdata_dir: Path) -> None:
    folder = testdata_dir / "rosettasciio/dm/dtypes_2D"
    files = sorted(folder.glob("test-*.dm?"))
    assert len(files) == 30
    for path in files:
        expected = DM_DTYPES[int(path.stem.split("-")[1])]
        (sig,) = sio.import_signals(path)
        assert sig.data.shape == (2, 2), path.name
        if expected == "rgba":
            assert sig.data.dtype.names == ("R", "G", "B", "A"), path.name
        else:
            assert sig.data.dtype == np.dtype(expected), path.name
        if expected in ("rgba", "bool") or expected.startswith("complex"):
            word = {"rgba": "RGBA", "bool": "boolean"}.get(expected, expected)
            with pytest.raises(sio.EmdError, match=word):
                sio.import_stack(path)
        else:
            stack = sio.import_stack(path)
            assert stack.frames.shape == (1, 2, 2)
            np.testing.assert_array_equal(stack.frames[0], sig.data.astype(np.float32))


def test_every_testdata_file_is_covered(testdata_dir: Path) -> None:
    """Every data file imports (TIA .emi and _1.ser both), and describe() is valid JSON."""
    files = [
        p
        for p in sorted(testdata_dir.rglob("*"))
        if p.is_file() and p.suffix.lower() not in (".md", ".tsv") and "dtypes_2D" not in p.parts
    ]
    assert len(files) == 24
    for path in files:
        info = sio.describe(path)
        json.dumps(info, allow_nan=False)
        assert info["signals"], path.name
        for s in info["signals"]:
            for ax in s["axes"]:
                assert ax["scale"] is None or math.isfinite(ax["scale"])


def test_describe_our_file_and_import_signals(tmp_path: Path) -> None:
    path = tmp_path / "d.emd"
    stack = make_stack(n=3)
    sio.write_stack(path, stack)
    sio.write_result(path, "wave", np.ones((2, 2), np.complex64))
    info = sio.describe(path)
    json.dumps(info, allow_nan=False)
    frames = info["data"]["frames"]
    assert frames["shape"] == [3, 12, 10] and frames["frames_complete"] == 3
    assert frames["pixel_size_nm"] == [0.028, 0.031]
    assert frames["records"]["defocus_nominal_nm"] == {"min": -50.0, "max": -30.0}
    assert frames["records"]["signal"] == ["camera"]
    assert frames["ground_truth"]["shifts_px"]["shape"] == [3, 2]
    assert frames["ground_truth"]["specimen"] == {"shape": [], "dtype": "str"}
    assert info["instrument"]["voltage_kv"] == 300.0
    sigs = sio.import_signals(path)
    assert [s.name for s in sigs] == ["frames", "wave"]
    assert sigs[0].axes[1][1] == pytest.approx(0.028) and sigs[0].axes[1][3] == "nm"
    assert sigs[1].data.dtype == np.complex64
    np.testing.assert_array_equal(sio.import_stack(path).frames, stack.frames)


def test_unit_conversion_table() -> None:
    cases = {"nm": 1.0, "n_m": 1.0, "[n_m]": 1.0, "Å": 0.1, "A": 0.1, "pm": 1e-3, "µm": 1e3,
             "um": 1e3, "μm": 1e3, "m": 1e9, "mm": 1e6}  # fmt: skip
    for units, factor in cases.items():
        assert sio.nm_per_unit(units) == factor, units
    for units in ("s", "1/nm", "", None, "eV"):
        assert sio.nm_per_unit(units) is None, units
