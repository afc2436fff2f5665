"""Sim drivers on the VirtualMicroscope: protocols, simulated timing, speed-up, lens settling,
limits, fault injection; and one daemon run on the default (simulated) instruments."""

from __future__ import annotations

import time

import numpy as np
import pytest

from scherzer.drivers.base import (
    Camera,
    DeviceDisconnected,
    DeviceTimeout,
    Lens,
    LimitExceeded,
    ScanGenerator,
    ScanSettings,
)
from scherzer.drivers.sim import (
    PatternBench,
    PatternCamera,
    PatternLens,
    PatternScanGenerator,
    SimCamera,
    SimLens,
    SimScanGenerator,
)

pytestmark = pytest.mark.timeout(120)
from scherzer.simulators.microscope import VirtualMicroscope  # noqa: E402


@pytest.fixture
def scope():
    return VirtualMicroscope("crystal_edge", camera_shape=(64, 64), seed=3)


def test_drivers_satisfy_the_protocols(scope):
    assert isinstance(SimCamera(scope), Camera)
    assert isinstance(SimScanGenerator(scope), ScanGenerator)
    assert isinstance(SimLens(scope), Lens)
    bench = PatternBench()
    assert isinstance(PatternCamera(bench), Camera)
    assert isinstance(PatternScanGenerator(bench), ScanGenerator)
    assert isinstance(PatternLens(bench), Lens)


def test_camera_exposure_runs_in_simulated_time_scaled_by_speedup(scope):
    cam = SimCamera(scope, speedup=50.0)
    t_sim = scope.clock.now_s()
    t_real = time.perf_counter()
    frame = cam.acquire(2.0, binning=2)
    real = time.perf_counter() - t_real
    assert scope.clock.now_s() - t_sim == pytest.approx(2.0)
    assert real >= 2.0 / 50  # slept the scaled exposure (no upper bound: a busy machine is slower)
    assert frame.image.shape == (32, 32) and frame.image.dtype == np.float32
    assert frame.pixel_size_nm == (0.04, 0.04)
    assert frame.record.exposure_s == 2.0 and frame.record.time_s == pytest.approx(t_sim)
    assert frame.record.dose_e_per_A2 == pytest.approx(2000.0)  # 1000 e/Å²/s default
    assert np.isfinite(frame.truth["defocus_nm"])


def test_scan_frame_time_is_rows_times_line_time(scope):
    scan = SimScanGenerator(scope, speedup=1000.0)
    settings = ScanSettings(size_px=(16, 24), dwell_us=5.0, flyback_us=100.0, signals=("HAADF",))
    scan.configure(settings)
    t0 = scope.clock.now_s()
    frame = scan.acquire()
    assert scope.clock.now_s() - t0 == pytest.approx(16 * (24 * 5.0 + 100.0) * 1e-6)
    assert frame.images["HAADF"].shape == (16, 24)
    assert frame.records["HAADF"].dwell_us == 5.0
    with pytest.raises(ValueError, match="signal"):
        scan.configure(ScanSettings(signals=()))


def test_lens_settles_in_simulated_time_and_enforces_limits(scope):
    lens = SimLens(scope, speedup=1000.0)
    lens.set_defocus_nm(-80.0)
    remaining = scope.lens.settle_remaining_s()
    t0 = scope.clock.now_s()
    lens.wait_settled(timeout_s=5.0)
    assert scope.clock.now_s() - t0 == pytest.approx(remaining)
    assert scope.lens.settle_remaining_s() == 0.0
    assert lens.get_defocus_nm() == pytest.approx(-80.0, abs=1.5)
    lens.set_stigmator(4.0, 30.0)
    lens.wait_settled()
    m, a = lens.get_stigmator()
    assert m == pytest.approx(4.0, abs=1.0) and a == pytest.approx(30.0, abs=10.0)
    with pytest.raises(LimitExceeded):
        lens.set_defocus_nm(1e7)
    lens.set_defocus_nm(80.0)
    with pytest.raises(DeviceTimeout, match="settling"):
        lens.wait_settled(timeout_s=1e-6)


def test_injected_faults_surface_as_device_errors(scope):
    cam = SimCamera(scope, speedup=1000.0)
    scope.inject_fault("timeout", after_calls=1, device="camera")
    cam.acquire(0.01)
    with pytest.raises(DeviceTimeout) as e:
        cam.acquire(0.01)
    assert e.value.device and e.value.code == "device_timeout"
    cam.acquire(0.01)  # not persistent: the next one works
    scope.inject_fault("disconnected", device="scan")
    scan = SimScanGenerator(scope, speedup=1000.0)
    scan.configure(ScanSettings(size_px=(8, 8)))
    with pytest.raises(DeviceDisconnected):
        scan.acquire()


def test_daemon_on_simulated_instruments(tmp_path):
    from scherzer.clients.client import LocalDaemon
    from scherzer.io import read_stack, read_stacks

    devices = {"kind": "sim", "camera_shape": [64, 64], "speedup": 100.0}
    with LocalDaemon({"devices": devices}, tmp_path) as d, d.client(timeout_s=30) as c:
        assert c.status().devices["camera"] == "sim-camera"
        job = c.submit({"kind": "camera_image", "exposure_s": 0.5, "defocus_nm": -60.0})
        done = c.wait(job.job_id, timeout_s=60)
        assert done.state == "done", done.error
        stack = read_stack(done.output_file)
        assert stack.frames.shape == (1, 64, 64) and stack.frames.std() > 0
        rec = stack.records[0]
        assert rec.defocus_nominal_nm == -60.0 and abs(rec.defocus_readback_nm + 60.0) < 2.0
        assert rec.dose_e_per_A2 == pytest.approx(500.0)
        plan = {"kind": "scan_image", "size_px": [24, 24], "dwell_us": 1.0,
                "signals": ["HAADF"], "rotation_deg": 10.0}  # fmt: skip
        scan = c.wait(c.submit(plan).job_id, timeout_s=60)
        assert scan.state == "done", scan.error
        haadf = read_stacks(scan.output_file)["HAADF"]
        assert haadf.records[0].scan_rotation_deg == 10.0
        image, info = c.camera_acquire(0.1)
        assert image.shape == (64, 64) and info.record.exposure_s == 0.1


def test_serial_lens_drives_the_simulated_microscope(tmp_path):
    """lens = 'serial-sim': the microscope's own lens behind a pty, driven by SerialLens —
    the defocus set over the serial link is the defocus the simulated images are formed at."""
    from scherzer.clients.client import LocalDaemon
    from scherzer.io import read_stack

    devices = {"kind": "sim", "camera_shape": [64, 64], "speedup": 100.0, "lens": "serial-sim"}
    with LocalDaemon({"devices": devices}, tmp_path) as d, d.client(timeout_s=30) as c:
        assert c.status().devices["lens"] == "serial-lens"
        state = c.lens_set(defocus_nm=-35.0)
        assert abs(state.defocus_nm + 35.0) < 1.0
        for target in (-60.0, -20.0):
            job = c.wait(
                c.submit({"kind": "camera_image", "exposure_s": 0.1, "defocus_nm": target}).job_id,
                timeout_s=60,
            )
            assert job.state == "done", job.error
            stack = read_stack(job.output_file)
            assert abs(stack.records[0].defocus_readback_nm - target) < 1.0
            true_defocus = float(np.asarray(stack.ground_truth["defocus_nm"]).reshape(-1)[0])
            assert abs(true_defocus - target) <= 1.6  # within the lens's hysteresis band


# --- EFTEM: energy filter, the camera after it, beam blanker ----------------------------------
def test_eftem_devices_contract_limits_blanking_and_read_only():
    from scherzer.drivers.base import BeamBlanker, DeviceReadOnly, EnergyFilter
    from scherzer.drivers.sim import eftem_devices

    scope = VirtualMicroscope("crystal_edge", camera_shape=(32, 32), seed=2)
    filt, camera, blanker = eftem_devices(scope, speedup=1e6, seed=2)
    assert isinstance(filt, EnergyFilter) and isinstance(camera, Camera)
    assert isinstance(blanker, BeamBlanker)
    hi = filt.limits.energy_offset_ev[1]
    with pytest.raises(LimitExceeded) as err:
        filt.set_energy_offset_ev(hi + 1.0)
    assert err.value.code == "limit_exceeded" and err.value.device == "sim-energy-filter"
    assert filt.get_energy_offset_ev() == 0.0  # nothing changed
    with pytest.raises(LimitExceeded):
        filt.set_slit_width_ev(filt.limits.slit_width_ev[1] * 2)
    filt.set_energy_offset_ev(300.0)
    filt.set_slit_width_ev(20.0)
    t0 = scope.clock.now_s()
    lit = camera.acquire(2.0)
    assert scope.clock.now_s() - t0 >= 2.0  # the exposure passed on the microscope's clock
    blanker.set_beam_blanked(True)
    dark = camera.acquire(2.0)
    blanker.set_beam_blanked(False)
    assert dark.record.signal == "dark" and lit.record.signal == "eftem"
    offset = scope.camera.offset_counts if scope.camera is not None else 100.0
    assert abs(float(dark.image.mean()) - offset) < 0.1 * offset  # offset + a little dark current
    assert lit.image.mean() > dark.image.mean() + 100  # electrons arrive when not blanked
    binned = camera.acquire(1.0, binning=2, region=(0, 0, 16, 16))
    assert binned.image.shape == (8, 8) and binned.pixel_size_nm == (1.0, 1.0)

    ro_filter, ro_camera, ro_blanker = eftem_devices(scope, seed=2, read_only=True)
    ro_filter.set_slit_width_ev(ro_filter.get_slit_width_ev())  # no change: allowed
    for change in (lambda: ro_filter.set_energy_offset_ev(100.0), ro_filter.slit_out,
                   lambda: ro_blanker.set_beam_blanked(True)):  # fmt: skip
        with pytest.raises(DeviceReadOnly) as err:
            change()
        assert err.value.code == "device_read_only"
    assert ro_filter.get_energy_offset_ev() == 0.0 and ro_filter.is_slit_in()
    assert not ro_blanker.is_beam_blanked()
    assert ro_camera.acquire(0.5).image.shape == (32, 32)  # acquisitions still work
