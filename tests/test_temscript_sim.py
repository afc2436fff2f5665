"""The simulated microscope served through temscript's own server, driven by the temscript drivers.

Every image that crosses the real HTTP/JSON path must equal, bit for bit, what an identical
VirtualMicroscope (same seed, same sequence of calls) produces in process: defocus, stigmator,
beam tilt and drift act exactly as in the built-in simulator.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from scherzer.drivers.base import LimitExceeded, ScanSettings
from scherzer.drivers.temscript import open_temscript
from scherzer.drivers.temscript_sim import (
    FLYBACK_US,
    sim_temscript_settings,
    start_simulated,
)
from scherzer.simulators.detector import CameraModel
from scherzer.simulators.microscope import DriftModel, VirtualMicroscope

#: Hang guard of each test (s); a cold start on a busy machine (numba compiling the
#: simulator's kernels) has taken minutes, a warm one takes seconds.
TEST_GUARD_S = 600
pytestmark = pytest.mark.timeout(TEST_GUARD_S)
#: The simulated microscope computes each image inside the driver's request (its first took
#: 14 s on a busy machine with cold caches). Driver deadlines made for a real instrument must
#: not fire on compute time: a retried acquisition would be acquired twice and every later
#: image would differ from the in-process reference. So they are hang guards here.
DEADLINES = {"timeout_s": 120.0, "acquire_margin_s": 300.0}

SHAPE = (96, 96)
EXPOSURE_S = 0.1


def scope(seed: int = 3) -> VirtualMicroscope:
    drift = DriftModel(velocity_nm_per_s=(0.05, -0.03), seed=seed + 1)
    return VirtualMicroscope("crystal_edge", camera_shape=SHAPE, seed=seed, drift=drift)


def local_image(ref: VirtualMicroscope, exposure_s: float = EXPOSURE_S) -> tuple[np.ndarray, dict]:
    """What the served microscope does per camera frame: settle, expose the full frame, remove
    the dark offset (image correction DEFAULT). Returns the image and its truth."""
    ref.clock.advance(ref.lens.settle_remaining_s())
    image, _, truth = ref.acquire_image(exposure_s, binning=1, region=(0, 0, *SHAPE))
    return image - np.float32(CameraModel().offset_counts), truth


@pytest.fixture
def served():
    with start_simulated(scope=scope(), speedup=1e4) as server:
        yield server, open_temscript(sim_temscript_settings(server.url, **DEADLINES))


def test_camera_images_equal_the_built_in_simulator_through_focus_stigmator_tilt_and_drift(
    served,
):
    server, ins = served
    ref = scope()
    images = []
    for defocus_nm in (-60.0, -20.0, 20.0):
        ins.lens.set_defocus_nm(defocus_nm)
        ref.lens.set_defocus_nm(defocus_nm)
        frame = ins.camera.acquire(EXPOSURE_S)
        image, truth = local_image(ref)
        np.testing.assert_array_equal(frame.image, image)
        assert frame.record.defocus_readback_nm == defocus_nm
        # m ↔ nm on the wire may cost the last bit of the set-point
        assert server.microscope.truths[-1]["defocus_nm"] == pytest.approx(truth["defocus_nm"])
        assert frame.pixel_size_nm == pytest.approx((0.02, 0.02))
        images.append(frame.image)
    assert not np.array_equal(images[0], images[1])
    ins.lens.set_stigmator(8.0, 25.0)
    ref.lens.set_stigmator(8.0, 25.0)
    ins.lens.set_beam_tilt_mrad(1.0, -0.5)
    ref.lens.set_beam_tilt_mrad(1.0, -0.5)
    np.testing.assert_array_equal(ins.camera.acquire(EXPOSURE_S).image, local_image(ref)[0])
    assert ins.lens.get_stigmator() == pytest.approx((8.0, 25.0))
    # the served lens is the simulator's: true C1 = hysteretic focus + 2·C3·τ² from the tilt
    served_optics = server.microscope.scope.effective_optics()
    assert served_optics == ref.effective_optics()
    tilt_c1_nm = 2 * ref.optics.cs_mm * 1e6 * math.hypot(1.0e-3, 0.5e-3) ** 2
    assert served_optics.defocus_nm == pytest.approx(20.0 + tilt_c1_nm, abs=ref.lens.hysteresis_nm)


def test_binning_and_region_through_the_server(served):
    _, ins = served
    frame = ins.camera.acquire(EXPOSURE_S, binning=2, region=(24, 24, 48, 48))
    assert frame.image.shape == (24, 24)
    assert frame.pixel_size_nm == pytest.approx((0.04, 0.04))
    assert frame.truth["instrument"]["image_size"] == "HALF"


def test_scan_signals_equal_the_built_in_simulator_with_rotation(served):
    _, ins = served
    ref = scope()
    settings = ScanSettings(
        size_px=(64, 64),
        pixel_nm=0.05,
        dwell_us=2.0,
        flyback_us=FLYBACK_US,
        rotation_deg=90.0,
        signals=("HAADF", "BF"),
    )
    ins.scan.configure(settings)
    frame = ins.scan.acquire()
    images, _, _ = ref.acquire_scan(settings)
    assert set(frame.images) == {"HAADF", "BF"}
    for name in ("HAADF", "BF"):
        np.testing.assert_allclose(frame.images[name], images[name], rtol=1e-6)
        assert frame.records[name].scan_rotation_deg == 90.0
        assert frame.records[name].dwell_us == pytest.approx(2.0)
    assert frame.pixel_size_nm == pytest.approx((0.05, 0.05))
    with pytest.raises(LimitExceeded, match="not reachable"):
        ins.scan.configure(ScanSettings(size_px=(100, 100), signals=("HAADF",)))


def test_out_of_limit_defocus_is_refused_by_the_driver_and_by_the_served_lens(served):
    server, ins = served
    with pytest.raises(LimitExceeded):
        ins.lens.set_defocus_nm(-3000.0)  # driver limits: ±2000 nm
    wide = open_temscript(
        sim_temscript_settings(
            server.url, limits=ins.lens.limits.__class__((-1e5, 1e5)), **DEADLINES
        )
    )
    with pytest.raises(Exception) as err:  # the simulated lens's own limit: an HTTP 500
        wide.lens.set_defocus_nm(-9000.0)
    assert err.value.code == "device_error" and "outside the lens limits" in str(err.value)


def test_the_server_binds_loopback_only_unless_allowed():
    with pytest.raises(ValueError, match="authentication"):
        start_simulated("0.0.0.0", 0, scope=scope())


def test_scan_settings_start_as_the_instruments_and_restoring_them_puts_it_back(served):
    server, ins = served
    before = ins.scan.settings  # read from the instrument: nothing configured yet
    assert before is not None and before.rotation_deg == 0.0 and before.size_px == (2048, 2048)
    magnification = server.microscope.get_stem_magnification()
    ins.scan.configure(ScanSettings(size_px=(64, 64), pixel_nm=0.05, rotation_deg=90.0))
    assert server.microscope.get_stem_rotation() == pytest.approx(math.pi / 2)
    assert server.microscope.get_stem_magnification() != magnification
    ins.scan.configure(before)  # what the daemon does after a plan
    assert server.microscope.get_stem_rotation() == pytest.approx(0.0, abs=1e-12)
    assert server.microscope.get_stem_magnification() == pytest.approx(magnification)


def test_read_only_scans_at_the_instruments_settings_but_refuses_rotation_and_field(served):
    from scherzer.drivers.temscript import ReadOnlyRefused

    server, _ = served
    ro = open_temscript(sim_temscript_settings(server.url, read_only=True, **DEADLINES))
    current = ro.scan.settings
    for change in ({"rotation_deg": 30.0}, {"pixel_nm": current.pixel_nm * 2}):
        with pytest.raises(ReadOnlyRefused):
            ro.scan.configure(dataclasses.replace(current, size_px=(64, 64), **change))
    assert server.microscope.get_stem_rotation() == 0.0
    small = dataclasses.replace(current, size_px=(64, 64), pixel_nm=current.pixel_nm * 32)
    ro.scan.configure(small)  # same field of view and rotation: nothing changes on the column
    assert ro.scan.acquire().images["HAADF"].shape == (64, 64)
