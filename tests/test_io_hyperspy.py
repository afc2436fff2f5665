"""Our files in the readers users have: HyperSpy (``hs.load``), rosettasciio and ncempy; and files
HyperSpy wrote, imported by us. Every check is against the array and calibration we wrote.

The orientation checks use non-square frames with one bright pixel off the diagonal: a
transposition (or a y/x swap of the calibration) moves it and fails the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from scherzer import io as sio
from scherzer.stack import FrameRecord, ImageStack

hs = pytest.importorskip("hyperspy.api")

REPO = Path(__file__).resolve().parents[1]
NY, NX = 12, 20  # non-square frames
MARK_YX = (2, 7)  # a bright pixel off the diagonal: y=2, x=7
PIXEL_NM = (0.02, 0.03)  # (y, x), different on purpose


def asymmetric_stack(n: int = 3) -> ImageStack:
    rng = np.random.default_rng(5)
    frames = rng.normal(10.0, 1.0, size=(n, NY, NX)).astype(np.float32)
    frames[:, MARK_YX[0], MARK_YX[1]] = 1000.0 + np.arange(n)
    records = [
        FrameRecord(
            index=i,
            time_s=0.5 * i,
            defocus_nominal_nm=-50.0 + 10.0 * i,
            defocus_readback_nm=-50.25 + 10.0 * i,
            exposure_s=0.25,
            dose_e_per_A2=12.5,
            signal="camera",
        )
        for i in range(n)
    ]
    instrument = {
        "voltage_kv": 300.0,
        "optics": {"voltage_kv": 300.0, "cs_mm": 1.2, "beam_divergence_mrad": 0.15},
        "simulated": True,
    }
    return ImageStack(frames=frames, pixel_size_nm=PIXEL_NM, records=records, instrument=instrument)


def load(path: Path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hs.load(str(path), **kwargs)


def by_title(signals) -> dict:
    signals = signals if isinstance(signals, list) else [signals]
    return {s.metadata.General.title: s for s in signals}


def check_stack_signal(s, stack: ImageStack) -> None:
    """A Signal2D stack: frames navigate, x/y signal axes in nm, content where we put it."""
    assert type(s).__name__ == "Signal2D"
    am = s.axes_manager
    assert am.navigation_shape == (stack.n_frames,)
    assert am.signal_shape == (NX, NY)  # HyperSpy lists signal axes (x, y)
    x, y = am.signal_axes
    assert (x.name, x.units, x.scale) == ("x", "nm", PIXEL_NM[1])
    assert (y.name, y.units, y.scale) == ("y", "nm", PIXEL_NM[0])
    np.testing.assert_array_equal(s.data, stack.frames)
    # HyperSpy indexes signal axes as (x, y): the mark must be at x=7, y=2 in every frame
    np.testing.assert_array_equal(s.isig[MARK_YX[1], MARK_YX[0]].data, stack.frames[:, 2, 7])


# --- our files in HyperSpy ---------------------------------------------------------------------


def test_written_stack_opens_in_hyperspy_in_the_right_orientation(tmp_path: Path) -> None:
    stack = asymmetric_stack()
    path = tmp_path / "stack.hspy"
    sio.write_stack(path, stack)
    s = load(path)
    check_stack_signal(s, stack)
    md = s.metadata
    assert md.General.title == "frames"
    assert md.General.date and md.General.time and md.General.time_zone
    tem = md.Acquisition_instrument.TEM
    assert tem.beam_energy == 300.0 and tem.Cs == 1.2
    assert tem.acquisition_mode == "TEM" and tem.exposure == 0.25
    assert tem.convergence_angle == 0.15  # camera frames: the beam divergence
    assert tem.Detector.name == "camera"
    assert md.Signal.quantity == "Intensity (counts)"
    records = s.original_metadata.records
    np.testing.assert_array_equal(records["defocus_nominal_nm"], [-50.0, -40.0, -30.0])
    np.testing.assert_array_equal(records["defocus_readback_nm"], [-50.25, -40.25, -30.25])
    np.testing.assert_array_equal(records["time_s"], [0.0, 0.5, 1.0])


def test_exit_wave_and_average_open_calibrated(tmp_path: Path) -> None:
    """Pipeline results without dims take their source stack's pixel grid; the exit wave is a
    ComplexSignal2D whose pixel size and beam energy read back exactly; averages and displacement
    fields are Signal2D."""
    stack = asymmetric_stack()
    path = tmp_path / "job.hspy"
    sio.write_stack(path, stack)
    rng = np.random.default_rng(2)
    wave = (rng.normal(size=(NY, NX)) + 1j * rng.normal(size=(NY, NX))).astype(np.complex64)
    outputs = [
        SimpleNamespace(step="align", params={}, summary={}, stacks={}, tables={},
                        arrays={"average_frames": stack.frames.mean(0),
                                "similarity": np.eye(3, dtype=np.float32)}),
        SimpleNamespace(step="restore", params={}, summary={}, stacks={}, tables={},
                        arrays={"exit_wave": wave}),
        SimpleNamespace(step="nonrigid", params={}, summary={}, stacks={}, tables={},
                        arrays={"fields_frames": np.zeros((3, 2, NY, NX), np.float32)}),
    ]  # fmt: skip
    sio.store_pipeline_result(path, SimpleNamespace(outputs=outputs))
    signals = by_title(load(path))
    ew = signals["exit_wave"]
    assert type(ew).__name__ == "ComplexSignal2D"
    np.testing.assert_array_equal(ew.data, wave)
    x, y = ew.axes_manager.signal_axes
    assert (x.scale, y.scale, x.units, y.units) == (PIXEL_NM[1], PIXEL_NM[0], "nm", "nm")
    assert ew.metadata.Acquisition_instrument.TEM.beam_energy == 300.0
    avg = signals["average_frames"]
    assert type(avg).__name__ == "Signal2D" and avg.axes_manager.signal_shape == (NX, NY)
    assert avg.isig[MARK_YX[1], MARK_YX[0]].data[()] == pytest.approx(1001.0)
    assert [a.scale for a in avg.axes_manager.signal_axes] == [PIXEL_NM[1], PIXEL_NM[0]]
    assert signals["similarity"].axes_manager.signal_axes[0].units != "nm"  # not an image
    fields = signals["fields_frames"]  # displacement fields (frame, dy/dx, y, x)
    assert type(fields).__name__ == "Signal2D"
    assert fields.axes_manager.navigation_shape == (2, 3)
    assert [a.scale for a in fields.axes_manager.signal_axes] == [PIXEL_NM[1], PIXEL_NM[0]]
    np.testing.assert_array_equal(sio.read_result(path, "exit_wave"), wave)  # EMD side intact


def test_stackwriter_file_opens_in_hyperspy_with_every_frame(tmp_path: Path) -> None:
    path = tmp_path / "acq.hspy"
    instrument = {"voltage_kv": 200.0, "convergence_mrad": 21.0}
    with sio.StackWriter(path, pixel_size_nm=PIXEL_NM, frame_shape=(NY, NX),
                         names=("HAADF", "BF"), instrument=instrument) as w:  # fmt: skip
        for i in range(4):
            frame = np.full((NY, NX), float(i), np.float32)
            frame[MARK_YX] = 50.0
            for name in ("HAADF", "BF"):
                w.append(frame, FrameRecord(index=i, dwell_us=2.0, signal=name), name=name)
        with h5py.File(path, "r", swmr=True) as live:  # the count is current while writing
            assert live["Experiments/HAADF/axis-0"].attrs["size"] == 4
    signals = by_title(load(path))
    assert set(signals) == {"HAADF", "BF"}
    haadf = signals["HAADF"]
    assert haadf.axes_manager.navigation_shape == (4,)
    np.testing.assert_array_equal(haadf.isig[MARK_YX[1], MARK_YX[0]].data, [50.0] * 4)
    tem = haadf.metadata.Acquisition_instrument.TEM
    assert tem.acquisition_mode == "STEM" and tem.dwell_time == pytest.approx(2e-6)
    assert tem.convergence_angle == 21.0 and tem.beam_energy == 200.0
    assert signals["BF"].metadata.Acquisition_instrument.TEM.Detector.name == "BF"


def test_align_output_opens_in_hyperspy_in_the_right_orientation(tmp_path: Path, capsys) -> None:
    """``scherzer align`` on a drifting, non-square series with a bright block near the top
    right: in HyperSpy the aligned stack and its average keep the block there (a transposition
    could not fit it: the frames are 40 px high and the block sits at x ≈ 60)."""
    from scipy.ndimage import gaussian_filter

    from scherzer.cli import main

    rng = np.random.default_rng(3)
    scene = gaussian_filter(rng.normal(size=(56, 88)), 2.0) * 40.0 + 100.0
    scene[12:16, 64:70] += 300.0  # rows 12-15, columns 64-69
    frames = np.stack([scene[k : k + 48, 2 * k : 2 * k + 80] for k in range(4)]).astype(np.float32)
    source, out = tmp_path / "series.hspy", tmp_path / "aligned.hspy"
    sio.write_stack(source, ImageStack(frames, pixel_size_nm=PIXEL_NM), name="HAADF")
    assert main(["align", str(source), "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    signals = by_title(load(out))
    (aligned,) = [s for t, s in signals.items() if t.startswith("aligned_")]
    (average,) = [s for t, s in signals.items() if t.startswith("average_")]
    assert type(aligned).__name__ == "Signal2D" and aligned.axes_manager.navigation_shape == (4,)
    for s in (aligned, average):
        x, y = s.axes_manager.signal_axes
        assert (x.scale, y.scale) == (PIXEL_NM[1], PIXEL_NM[0])
        assert s.axes_manager.signal_shape == (s.data.shape[-1], s.data.shape[-2])
    title = aligned.metadata.General.title
    np.testing.assert_array_equal(aligned.data, sio.read_stack(out, title).frames)
    iy, ix = np.unravel_index(np.argmax(average.data), average.data.shape)
    assert average.isig[int(ix), int(iy)].data[()] == average.data.max()
    assert 4 <= iy <= 16 and 54 <= ix <= 70, (iy, ix)  # the block, near the top right


def test_a_stack_saved_again_by_hyperspy_imports_with_its_records(tmp_path: Path) -> None:
    """Opened and saved by HyperSpy, one of our stacks keeps its calibration, instrument and
    per-frame records (nominal and read-back defocus) when imported back."""
    stack = asymmetric_stack()
    ours, resaved = tmp_path / "ours.hspy", tmp_path / "resaved.hspy"
    sio.write_stack(ours, stack)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load(ours).save(str(resaved))
    back = sio.import_stack(resaved)
    np.testing.assert_array_equal(back.frames, stack.frames)
    assert back.pixel_size_nm == pytest.approx(PIXEL_NM)
    assert back.instrument["voltage_kv"] == 300.0
    for col in ("defocus_nominal_nm", "defocus_readback_nm", "time_s", "exposure_s"):
        np.testing.assert_array_equal(back.column(col), stack.column(col), err_msg=col)


# --- our .emd in rosettasciio and ncempy ---------------------------------------------------------


def test_emd_in_ncempy_as_stored_and_in_rosettasciio_transposed(tmp_path: Path) -> None:
    """The convention of docs/file-format.md: data (n, y, x) in C order, dimK for axis K-1.
    ncempy reads it as stored; rosettasciio's EMD reader presents it transposed; HyperSpy opens
    the same file as a Signal2D stack with ``file_format="HSPY"``."""
    import ncempy.io as nio
    from rsciio.emd import file_reader

    stack = asymmetric_stack()
    path = tmp_path / "stack.emd"
    sio.write_stack(path, stack)
    with nio.emd.fileEMD(str(path), readonly=True) as emd_file:
        data, dims = emd_file.get_emdgroup(emd_file.list_emds[0])
    np.testing.assert_array_equal(data, stack.frames)
    assert [(d[1], d[2]) for d in dims] == [("frame", ""), ("y", "nm"), ("x", "nm")]
    assert dims[1][0][1] == pytest.approx(PIXEL_NM[0]) and dims[2][0][1] == pytest.approx(
        PIXEL_NM[1]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (d,) = file_reader(str(path))
    np.testing.assert_array_equal(d["data"], stack.frames.T)
    assert [a["name"] for a in d["axes"]] == ["x", "y", "frame"]
    check_stack_signal(load(path, file_format="HSPY"), stack)


# --- a killed writer, repaired ----------------------------------------------------------------

KILLED_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from scherzer.io import StackWriter
    from scherzer.stack import FrameRecord

    with StackWriter(sys.argv[1], pixel_size_nm=(0.02, 0.03), frame_shape=(12, 20),
                     instrument={"voltage_kv": 300.0}) as w:
        for i in range(100000):
            w.append(np.full((12, 20), float(i), np.float32), FrameRecord(index=i))
            print(i + 1, flush=True)
            sys.stdin.readline()  # the test says when to go on
    """
)


def test_repair_makes_a_killed_writers_file_open_in_plain_readers(tmp_path: Path) -> None:
    path = tmp_path / "killed.hspy"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        for expected in range(1, 4):
            assert proc.stdout.readline().strip() == str(expected), proc.stderr.read()
            if expected < 3:
                proc.stdin.write("\n")
                proc.stdin.flush()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with pytest.raises(OSError):
        h5py.File(path, "r")  # the writer's flag is still set
    assert sio.swmr.repair(path) is True
    with h5py.File(path, "r") as f:  # plain h5py, no SWMR
        assert f["data/frames/data"].shape == (3, NY, NX)
    s = load(path)
    assert s.axes_manager.navigation_shape == (3,)
    np.testing.assert_array_equal(s.data[:, 0, 0], [0.0, 1.0, 2.0])
    assert sio.swmr.repair(path) is False  # nothing left to do
    assert sio.read_stack(path).n_frames == 3


# --- files HyperSpy wrote, imported by us --------------------------------------------------------


@pytest.mark.parametrize("suffix", [".emd", ".hspy", ".zspy"])
def test_hyperspy_written_stacks_import_with_the_right_axes(tmp_path: Path, suffix: str) -> None:
    """HyperSpy stores Berkeley EMD transposed (unnamed axes: no names to go by); .hspy and
    .zspy as (n, y, x). Each imports as (frames, y, x) with its pixel size."""
    if suffix == ".zspy":
        pytest.importorskip("zarr")
    stack = asymmetric_stack(n=6)
    s = hs.signals.Signal2D(stack.frames.copy())
    x, y = s.axes_manager.signal_axes
    x.scale, x.units, y.scale, y.units = PIXEL_NM[1], "nm", PIXEL_NM[0], "nm"
    s.metadata.General.title = "stack"
    path = tmp_path / f"hs{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.save(str(path))
    imported = sio.import_stack(path)
    assert imported.frames.shape == (6, NY, NX)
    np.testing.assert_array_equal(imported.frames, stack.frames)
    assert imported.pixel_size_nm == pytest.approx(PIXEL_NM)


# --- memory budget -----------------------------------------------------------------------------

HUGE = (5, 20000, 20000)  # 8 GB of float32, declared in a file of a few kB


def huge_berkeley(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["version_major"], f.attrs["version_minor"] = 1, 0
        g = f.create_group("data/huge")
        g.attrs["emd_group_type"] = 1
        g.create_dataset("data", shape=HUGE, dtype=np.float32, chunks=(1, 100, 100))
    return path


def huge_hspy(path: Path) -> Path:
    """A HyperSpy-format file (not ours) declaring HUGE."""
    with h5py.File(path, "w") as f:
        f.attrs["file_format"], f.attrs["file_format_version"] = "HyperSpy", "3.3"
        g = f.create_group("Experiments/huge")
        g.create_dataset("data", shape=HUGE, dtype=np.float32, chunks=(1, 100, 100))
        for group in ("metadata", "original_metadata"):
            g.create_group(group)
    return path


def huge_ours(path: Path) -> Path:
    sio.write_stack(path, asymmetric_stack(n=5))
    with h5py.File(path, "a") as f:
        del f["data/frames/data"]
        f["data/frames"].create_dataset("data", shape=HUGE, dtype=np.float32, chunks=(1, 100, 100))
    return path


def test_declared_shapes_over_the_budget_are_refused(tmp_path: Path) -> None:
    berkeley = huge_berkeley(tmp_path / "huge.emd")
    ours = huge_ours(tmp_path / "ours.hspy")
    npy = tmp_path / "huge.npy"
    with open(npy, "wb") as fh:  # a header declaring the shape, no data
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f4", "fortran_order": False, "shape": HUGE}
        )
    assert berkeley.stat().st_size < 100_000 and ours.stat().st_size < 100_000
    budget = 1 << 30
    for reader, path in [
        (sio.import_stack, berkeley),
        (sio.import_signals, berkeley),
        (sio.read_stack, ours),
        (sio.import_stacks, ours),
        (sio.import_stack, npy),
        (sio.import_stack, huge_hspy(tmp_path / "huge.hspy")),
    ]:
        with pytest.raises(sio.MemoryBudgetError, match=r"\(5, 20000, 20000\) float32") as err:
            reader(path, max_bytes=budget)
        assert "8 GB" in str(err.value) and "1.07 GB" in str(err.value)
    small = tmp_path / "small.hspy"
    sio.write_stack(small, asymmetric_stack())
    assert sio.read_stack(small, max_bytes=budget).n_frames == 3  # within the budget


def test_default_budget_is_a_fraction_of_available_memory(tmp_path, monkeypatch) -> None:
    from scherzer.io import budget

    monkeypatch.setattr(budget, "available_ram_bytes", lambda: 16 << 30)
    assert budget.default_budget_bytes() == int(budget.DEFAULT_RAM_FRACTION * (16 << 30))
    with pytest.raises(sio.MemoryBudgetError, match=r"default: 0\.25 of the available memory"):
        sio.import_stack(huge_berkeley(tmp_path / "huge.emd"))


REFUSE_AND_MEASURE = textwrap.dedent(
    """
    import sys
    from scherzer import io as sio

    def peak_kb():  # this process's own high-water mark (ru_maxrss would include the parent's)
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))

    try:
        sio.import_stack(sys.argv[1], max_bytes=1 << 30)
    except sio.MemoryBudgetError as exc:
        print("refused", peak_kb())
    """
)


@pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="needs Linux /proc to measure the peak memory"
)
def test_refusal_allocates_nothing(tmp_path: Path) -> None:
    """The peak memory of a process that opens the file and refuses it stays that of the
    imports (Linux: VmHWM in kB)."""
    path = huge_berkeley(tmp_path / "huge.emd")
    out = subprocess.run(
        [sys.executable, "-c", REFUSE_AND_MEASURE, str(path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    word, peak_kb = out.stdout.split()
    assert word == "refused", out.stderr
    assert int(peak_kb) < 500_000
