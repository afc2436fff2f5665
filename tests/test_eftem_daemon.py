"""EFTEM series through a real daemon (issue #17): the ``eftem_series`` plan on the simulated
energy filter, its job file, its processing, and bad input.

One series (module fixture, ~4 s): 22 images 100–520 eV, slit 20 eV, across C K (284 eV) and
Ti L2,3 (456 eV) on the sim bench's EFTEM specimen (128², 0.5 nm px, TiO2 and Fe2O3 particles on
a 5 nm carbon film), drift (0.003, −0.002) nm/s, automatic exposure from 2 s (too long at
100 eV: shortened first; then the counts fall by orders of magnitude and rise at the C K edge),
processing ``eftem_maps`` at the Ti edge aligned on the pre-edge images from 300 eV.
"""

from __future__ import annotations

import math

import hyperspy.api as hs
import numpy as np
import pytest
from scipy import ndimage

from scherzer import io as sio
from scherzer.clients.client import LocalDaemon
from scherzer.config import DeviceSettings
from scherzer.daemon.plans import EftemSeries, parse_plan
from scherzer.drivers.registry import open_instruments
from scherzer.processing.eftem.exposure import _is_power_of_two

pytestmark = pytest.mark.timeout(180)

DEVICES = {"kind": "sim", "camera_shape": [128, 128], "speedup": 10000.0, "seed": 1,
           "drift_nm_per_s": [0.003, -0.002]}  # fmt: skip
TI_ONSET_EV = 456.0
START_EV, STEP_EV, N = 100.0, 20.0, 22
PLAN = {"kind": "eftem_series", "name": "ti", "start_ev": START_EV, "step_ev": STEP_EV,
        "n_images": N, "slit_width_ev": 20.0, "initial_exposure_s": 2.0,
        "max_exposure_s": 32.0, "low_counts": 5000, "high_counts": 16000, "target_counts": 9000,
        "processing": [{"step": "eftem_maps", "edge_onset_ev": TI_ONSET_EV,
                        "reference_min_energy_ev": 300.0}]}  # fmt: skip


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eftem")
    frames = []
    with LocalDaemon({"devices": dict(DEVICES)}, tmp) as d, d.client(timeout_s=30) as c:
        with c.events(("frame",)) as stream:
            job = c.wait(c.submit(PLAN).job_id, timeout_s=150)
            while len(frames) < job.frames_done:
                event = stream.next(5.0)
                assert event is not None, "a frame event is missing"
                frames.append(event.data)
    assert job.state == "done", job.error
    path = job.output_file
    return {
        "job": job,
        "path": path,
        "stack": sio.read_stack(path, "eftem"),
        "table": sio.read_table(path, "eftem_series"),
        "events": frames,
    }


def test_exposures_change_only_by_powers_of_two(series) -> None:
    table, stack = series["table"], series["stack"]
    exposures = table["exposure_s"]
    assert series["job"].frames_done == N and stack.n_frames == N
    np.testing.assert_array_equal(stack.column("exposure_s"), exposures)  # records agree
    assert all(_is_power_of_two(t) for t in exposures)
    ratios = exposures[1:] / exposures[:-1]
    assert all(_is_power_of_two(r) for r in ratios)
    assert exposures.max() / exposures.min() >= 16  # the series really spans the range
    assert np.any(ratios > 1) and np.any(ratios < 1)  # falls with energy, rises at C K
    stat = table["statistic"]
    inside = (stat >= 5000) & (stat <= 16000)
    assert not np.any((ratios != 1) & inside[:-1]), "exposure changed while counts in band"
    assert [e["eftem"]["exposure_s"] for e in series["events"]] == exposures.tolist()


def test_dark_references_only_at_exposure_changes(series) -> None:
    table, stack = series["table"], series["stack"]
    exposures = table["exposure_s"].tolist()
    counts = stack.metadata["eftem_counts"]
    first_use = [i for i, t in enumerate(exposures) if t not in exposures[:i]]
    changes = int(np.sum(np.diff(table["exposure_s"]) != 0))
    assert np.flatnonzero(table["dark_acquired"]).tolist() == first_use
    assert counts["darks_acquired"] == len(first_use) == len(set(exposures))
    assert counts["darks_acquired"] <= changes + 1
    assert counts["darks_reused"] == N - counts["darks_acquired"]
    assert counts["dark_exposures_s"] == list(dict.fromkeys(exposures))
    assert series["events"][-1]["eftem"]["darks_acquired"] == counts["darks_acquired"]


def test_integers_scaled_to_the_first_exposure_are_continuous(series) -> None:
    """Statistic: z_i = (m_i − T_i·c_i)/(c_i·σ_i) with m_i the field mean of image i read as
    counts at the first exposure (stored × quantum_counts), T_i the simulator's noiseless mean
    net counts, c_i = t_0/t_i and σ_i the standard error of the mean per image from Poisson
    (g·counts), readout (σ_r², image and dark) and dark shot noise. Tolerance |z_i| < 5 for
    every image and |z_{i+1} − z_i| < 5·√2 at every exposure change (a wrong scale would be a
    factor 2: thousands of σ)."""
    stack, table = series["stack"], series["table"]
    md, truth = stack.metadata["eftem"], stack.ground_truth
    assert md["quantum_counts"] == table["exposure_s"][0] / md["max_exposure_s"]
    np.testing.assert_allclose(
        table["scale_to_first"], table["exposure_s"][0] / table["exposure_s"]
    )
    scale = table["scale_to_first"]
    m = stack.frames.mean(axis=(1, 2), dtype=np.float64) * md["quantum_counts"]
    cam = stack.instrument["camera"]
    g, sr = cam["gain_counts_per_e"], cam["readout_noise_counts"]
    t_net = np.asarray(truth["expected_counts_mean"])
    g_dark_e = np.asarray(truth["expected_dark_counts_mean"]) - cam["offset_counts"]
    var = g * t_net + 2 * (g * g_dark_e + sr * sr + 1 / 12)
    z = (m - t_net * scale) / (scale * np.sqrt(var / stack.frames[0].size))
    assert np.all(np.abs(z) < 5), z
    change = np.flatnonzero(np.diff(table["exposure_s"]) != 0)
    assert change.size >= 4
    assert np.all(np.abs(z[change + 1] - z[change]) < 5 * math.sqrt(2)), z


def test_stored_as_integers_with_an_energy_loss_axis_in_hyperspy(series) -> None:
    loaded = hs.load(series["path"])
    signal = next(s for s in loaded if s.metadata.General.title == "eftem")
    assert signal.data.dtype == np.int32 and signal.data.shape == (N, 128, 128)
    assert "max_exposure_s / exposure_s" in signal.metadata.Signal.quantity  # what a unit is
    (axis,) = signal.axes_manager.navigation_axes
    assert (axis.name, axis.units, axis.size) == ("Energy loss", "eV", N)
    assert axis.offset == pytest.approx(START_EV) and axis.scale == pytest.approx(STEP_EV)
    np.testing.assert_allclose(axis.axis, START_EV + STEP_EV * np.arange(N))
    y, x = signal.axes_manager.signal_axes
    assert y.units == x.units == "nm" and x.scale == pytest.approx(0.5)
    om = signal.original_metadata.metadata
    assert (
        om.eftem_counts.darks_acquired == series["stack"].metadata["eftem_counts"]["darks_acquired"]
    )
    # the aligned copy navigates the same energy axis
    aligned = next(s for s in loaded if s.metadata.General.title == "aligned_eftem")
    assert aligned.axes_manager.navigation_axes[0].name == "Energy loss"


def test_elemental_map_correlates_with_the_true_ti_map(series) -> None:
    path, truth = series["path"], series["stack"].ground_truth
    summary = sio.read_processing_summary(path, "eftem_maps")
    signal = sio.read_result(path, "eftem_map")
    jump = sio.read_result(path, "eftem_jump_ratio")
    refs = summary["reference_indices"]
    energies = START_EV + STEP_EV * np.arange(N)
    assert refs and np.all(energies[refs] + 10.0 <= TI_ONSET_EV) and energies[refs].min() >= 300
    # truth maps are at image 0's content position; the aligned grid is the first reference's
    shifts = np.asarray(truth["shifts_px"])
    assert np.ptp(shifts, axis=0).max() > 1.0  # the specimen really drifted

    def on_grid(element: str) -> np.ndarray:
        moved = ndimage.shift(np.asarray(truth[f"element_map_{element}"], np.float64),
                              shifts[refs[0]] - shifts[0], order=1, mode="nearest")  # fmt: skip
        y0, x0 = summary["crop_origin_px"]
        return moved[y0 : y0 + signal.shape[0], x0 : x0 + signal.shape[1]]

    ti = on_grid("Ti")
    corr = np.corrcoef(signal.ravel(), ti.ravel())[0, 1]
    print(f"EFTEM Ti map vs truth: correlation {corr:.3f}")
    assert corr >= 0.9, corr
    assert np.corrcoef(signal.ravel(), on_grid("Fe").ravel())[0, 1] < 0.2  # not thickness
    on, off = ti > 0.3 * ti.max(), ti == 0
    assert np.median(jump[on]) > np.percentile(jump[off], 95)
    table = sio.read_table(path, "eftem_alignment")
    moved = table[["shift_y_px", "shift_x_px"]]
    applied = np.stack([moved["shift_y_px"], moved["shift_x_px"]], axis=1)
    true = shifts - shifts[refs[0]]
    error = applied - true
    assert np.hypot(*(error - error.mean(axis=0)).T).max() < 0.2, error


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_images": 0}, "n_images"),
        ({"n_images": -3}, "n_images"),
        ({"step_ev": 0}, "step_ev must not be 0"),
        ({"slit_width_ev": 0}, "slit_width_ev"),
        ({"initial_exposure_s": 0.3}, "power of two"),
        ({"low_counts": 9000, "high_counts": 16000}, "2 × low_counts"),
        ({"on_error": "skip"}, "cannot skip"),
        ({"processing": ["eftem_maps"]}, "edge_onset_ev"),
        ({"processing": ["align"]}, "unknown processing steps"),
    ],
)
def test_bad_plans_fail_validation_with_the_reason(change, message) -> None:
    import pydantic

    with pytest.raises(pydantic.ValidationError, match=message):
        parse_plan({"kind": "eftem_series", **change})


def test_energies_outside_the_filter_limits_are_named() -> None:
    ins = open_instruments(DeviceSettings(camera_shape=(32, 32)))
    lo, hi = ins.energy_filter.limits.energy_offset_ev
    ok = EftemSeries(start_ev=lo, step_ev=(hi - lo) / 9, n_images=10)
    assert ok.device_problems(ins) == []
    bad = EftemSeries(start_ev=2000.0, step_ev=100.0, n_images=10)  # up to 2900 eV
    (problem,) = bad.device_problems(ins)
    assert "2000…2900 eV" in problem and f"[{lo:g}, {hi:g}]" in problem
    wide = EftemSeries(slit_width_ev=500.0)
    assert "slit_width_ev 500" in wide.device_problems(ins)[0]
    ins.energy_filter = None
    assert "needs an energy filter" in ok.device_problems(ins)[0]


def test_refused_energies_and_a_fault_mid_series_on_one_daemon(tmp_path) -> None:
    """Energies beyond the filter are refused at submission (admission checks the devices: no
    job is queued). Then a device fault mid-series (after 7 acquisitions, images and darks) ends
    the job with every image taken before it in the file."""
    from scherzer.clients.client import DaemonError

    beyond = {"kind": "eftem_series", "start_ev": 2000.0, "step_ev": 100.0, "n_images": 10}
    plan = {"kind": "eftem_series", "start_ev": 100.0, "step_ev": 20.0, "n_images": 12,
            "slit_width_ev": 20.0, "on_error": "abort"}  # fmt: skip
    devices = {**DEVICES, "camera_shape": [32, 32], "fault": "disconnected:7"}
    with LocalDaemon({"devices": devices}, tmp_path) as d, d.client(timeout_s=30) as c:
        with pytest.raises(DaemonError) as refused:
            c.submit(beyond)
        assert refused.value.code == "limit_exceeded"
        assert "energy filter's limits" in str(refused.value) and "2000" in str(refused.value)
        assert c.queue().jobs == [] and c.history() == []  # nothing was queued
        job = c.wait(c.submit(plan).job_id, timeout_s=60)
    assert job.state == "failed" and job.error.code == "device_disconnected"
    stack = sio.read_stack(job.output_file, "eftem")
    assert 1 <= stack.n_frames == job.frames_done < 7
    assert stack.metadata["eftem_counts"]["images"] == stack.n_frames
    assert all(_is_power_of_two(t) for t in stack.column("exposure_s"))
