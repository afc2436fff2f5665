"""VirtualMicroscope: clock, drift, lens-driven optics, camera/scan truth, faults, threads."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from scipy import ndimage, optimize
from skimage.registration import phase_cross_correlation

from scherzer.drivers.base import DeviceDisconnected, DeviceTimeout, ScanSettings
from scherzer.optics import Optics
from scherzer.simulators.microscope import HRTEM_MARGIN_PX, DriftModel, SimClock, VirtualMicroscope
from scherzer.simulators.stem import ScanRaster

PIXEL = 0.02
SCAN = ScanSettings(
    size_px=(48, 48), pixel_nm=0.02, dwell_us=5.0, flyback_us=50.0, signals=("HAADF", "ABF")
)


def make_scope(**kw) -> VirtualMicroscope:
    kw.setdefault("camera_shape", (64, 64))
    kw.setdefault("camera_pixel_nm", PIXEL)
    kw.setdefault("dose_rate_e_per_A2_s", 2e5)
    return VirtualMicroscope("crystal_edge", seed=1, **kw)


def measured_shift_px(ref: np.ndarray, img: np.ndarray, border: int = 8) -> np.ndarray:
    """s such that img(r) ≈ ref(r − s): maximise the interior correlation of ref shifted by s
    (cubic spline) with img, starting from the integer cross-correlation peak."""
    start, _, _ = phase_cross_correlation(ref, img)
    inner = (slice(border, -border), slice(border, -border))

    def cost(s: np.ndarray) -> float:
        moved = ndimage.shift(ref, s, order=3, mode="nearest")[inner]
        return -np.corrcoef(moved.ravel(), img[inner].ravel())[0, 1]

    res = optimize.minimize(
        cost,
        -np.asarray(start, float),
        method="Nelder-Mead",
        options={"xatol": 1e-3, "fatol": 1e-9},
    )
    return res.x


# ------------------------------------------------------------------------------ clock / drift
def test_clock_only_moves_forward():
    c = SimClock()
    assert c.advance(0.25) == pytest.approx(0.25)
    assert c.now_s() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="forward"):
        c.advance(-1.0)


def test_drift_model_constant_settle_and_seeded_walk():
    d = DriftModel(velocity_nm_per_s=(0.1, -0.2))
    np.testing.assert_allclose(d.displacement_nm(np.array([0.0, 2.0])), [[0, 0], [0.2, -0.4]])
    s = DriftModel(settle_nm=(1.0, 0.5), settle_tau_s=2.0)
    np.testing.assert_allclose(s.displacement_nm(2.0), np.array([1.0, 0.5]) * (1 - math.exp(-1)))
    w1 = DriftModel(random_walk_nm_per_sqrt_s=0.05, seed=4)
    w2 = DriftModel(random_walk_nm_per_sqrt_s=0.05, seed=4)
    late = w2.displacement_nm(500.0)  # query order must not matter
    early = w1.displacement_nm(3.0)
    np.testing.assert_array_equal(w1.displacement_nm(500.0), late)
    np.testing.assert_array_equal(w2.displacement_nm(3.0), early)
    t = np.arange(0.0, 2000.0, 1.0)
    steps = np.diff(w1.displacement_nm(t), axis=0)
    assert steps.var(axis=0) == pytest.approx([0.05**2] * 2, rel=0.1)


# ------------------------------------------------------------------------------ camera
def test_acquire_image_advances_clock_and_shift_follows_drift():
    v = (0.08, -0.05)  # nm/s
    scope = make_scope(drift=DriftModel(velocity_nm_per_s=v))
    t_start = scope.clock.now_s()
    img0, rec0, tr0 = scope.acquire_image(0.5)
    img1, rec1, tr1 = scope.acquire_image(0.5)
    assert scope.clock.now_s() == pytest.approx(t_start + 1.0)
    assert (rec0.time_s, rec1.time_s) == pytest.approx((t_start, t_start + 0.5))
    assert (rec0.index, rec1.index) == (0, 1)
    assert rec0.dose_e_per_A2 == pytest.approx(2e5 * 0.5)
    expected = np.asarray(v) * 0.5 / PIXEL
    np.testing.assert_allclose(tr1["shift_px"] - tr0["shift_px"], expected, atol=1e-9)
    np.testing.assert_allclose(tr0["shift_nm"], np.asarray(v) * (t_start + 0.25), atol=1e-12)
    # the image content really moved by the recorded amount
    np.testing.assert_allclose(measured_shift_px(img0, img1), expected, atol=0.03)


def test_large_drift_recentres_imager_without_losing_truth():
    scope = make_scope(camera_shape=(128, 128))
    img0, _, tr0 = scope.acquire_image(0.1)
    jump = (0.7, -0.3)  # nm = (35, −15) px: beyond the imager's half margin (32 px)
    assert 0.7 > 0.5 * HRTEM_MARGIN_PX * PIXEL
    scope.move_stage_nm(*jump)
    img1, _, tr1 = scope.acquire_image(0.1)
    np.testing.assert_allclose(tr1["shift_px"] - tr0["shift_px"], [35.0, -15.0], atol=1e-9)
    # img1(r) = img0(r − s): the overlap agrees (up to noise), the unshifted one does not
    a, b = img0[: 128 - 35, 15:], img1[35:, : 128 - 15]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9
    c = img1[: 128 - 35, 15:]
    assert np.corrcoef(a.ravel(), c.ravel())[0, 1] < 0.5


def test_true_and_readback_defocus_in_records():
    scope = make_scope()
    scope.lens.set_defocus_nm(-40.0)
    scope.clock.advance(scope.lens.settle_remaining_s() + 1.0)
    _, rec, truth = scope.acquire_image(0.1)
    assert rec.defocus_nominal_nm == -40.0
    assert truth["defocus_nm"] == pytest.approx(scope.lens.true_defocus_nm(), abs=1e-6)
    assert abs(truth["defocus_nm"] + 40.0) <= scope.lens.hysteresis_nm / 2 + 0.01
    assert abs(rec.defocus_readback_nm + 40.0) < 5 * scope.lens.readback_noise_nm + 0.1


def test_binning_and_region():
    scope = make_scope()
    img, _, truth = scope.acquire_image(0.05, binning=2, region=(8, 0, 32, 64))
    assert img.shape == (16, 32) and img.dtype == np.float32
    assert truth["binning"] == 2
    with pytest.raises(ValueError, match="inside"):
        scope.acquire_image(0.05, region=(40, 0, 32, 64))
    with pytest.raises(ValueError, match="binning"):
        scope.acquire_image(0.05, binning=3)


def test_effective_optics_from_stigmator_and_beam_tilt():
    scope = make_scope(optics=Optics(voltage_kv=300.0, cs_mm=0.6))
    scope.lens.set_stigmator(5.0, 30.0)
    scope.lens.set_beam_tilt_mrad(0.0, 1.0)
    scope.clock.advance(1.0)
    o = scope.effective_optics()
    c3_nm = 0.6e6
    assert o.b2_nm == pytest.approx(c3_nm * 1e-3)  # B2 = C3·τ
    assert o.b2_deg == pytest.approx(0.0, abs=1e-9)
    # A1 = stigmator (5 nm at 30°) + C3 τ² (0.6 nm at 0°), added as two-fold vectors
    a1 = 5.0 * np.exp(2j * np.radians(30.0)) + c3_nm * 1e-6
    assert o.a1_nm == pytest.approx(abs(a1), rel=1e-6)
    assert o.a1_deg == pytest.approx(np.degrees(np.angle(a1)) / 2, abs=1e-6)


# ------------------------------------------------------------------------------ scan
def test_acquire_scan_timing_and_truth():
    v = (3.0, 2.0)  # nm/s: (2.1, 1.4) px per frame
    scope = make_scope(
        drift=DriftModel(velocity_nm_per_s=v), scan_jitter_px=0.0, probe_current_pA=2000.0
    )
    frame_s = 48 * (48 * 5.0 + 50.0) * 1e-6
    t0 = scope.clock.now_s()
    images0, recs0, tr0 = scope.acquire_scan(SCAN)
    images1, recs1, tr1 = scope.acquire_scan(SCAN)
    assert scope.clock.now_s() == pytest.approx(t0 + 2 * frame_s)
    assert set(images0) == {"HAADF", "ABF"} and images0["HAADF"].shape == (48, 48)
    assert recs1["ABF"].time_s == pytest.approx(t0 + frame_s)
    assert recs0["HAADF"].index == recs0["ABF"].index == 0
    assert recs1["HAADF"].signal == "HAADF" and recs1["HAADF"].dwell_us == 5.0
    expected = np.asarray(v) * frame_s / 0.02
    np.testing.assert_allclose(tr1["shift_px"] - tr0["shift_px"], expected)
    # constant drift: consecutive frames differ by a pure translation; in image pixels it is
    # the specimen displacement seen through the drift-distorted raster: A·δ = v·T_frame
    lin = ScanRaster((48, 48), 0.02, 5.0, 50.0).affine_nm(v)[:, :2]
    delta = np.linalg.solve(lin, np.asarray(v) * frame_s)
    assert np.abs(delta - expected).max() > 0.05  # the raster distortion matters here
    abf = [im["ABF"].astype(np.float64) for im in (images0, images1)]
    np.testing.assert_allclose(measured_shift_px(*abf), delta, atol=0.05)
    np.testing.assert_allclose(tr1["times_s"][0, 0], t0 + frame_s)
    np.testing.assert_allclose(
        tr1["drift_start_nm"], scope.drift.displacement_nm(t0 + frame_s), atol=1e-12
    )


def test_reset_truth_restarts_shift_origin_and_indices():
    scope = make_scope(drift=DriftModel(velocity_nm_per_s=(0.5, 0.0)))
    scope.clock.advance(3.0)
    scope.reset_truth()
    _, recs, truth = scope.acquire_scan(SCAN)
    assert recs["HAADF"].index == 0
    np.testing.assert_allclose(truth["shift_px"], [0.0, 0.0], atol=1e-9)


def test_scan_rejects_unknown_signal():
    scope = make_scope()
    with pytest.raises(ValueError, match="unknown scan signal"):
        scope.acquire_scan(ScanSettings(size_px=(16, 16), signals=("SE",)))


# ------------------------------------------------------------------------------ faults
def test_fault_injection_raises_the_right_device_error():
    scope = make_scope()
    scope.inject_fault("timeout", after_calls=1, device="camera")
    scope.acquire_image(0.01)  # one good call
    with pytest.raises(DeviceTimeout) as err:
        scope.acquire_image(0.01)
    assert err.value.code == "device_timeout" and "camera" in str(err.value)
    scope.acquire_image(0.01)  # one-shot: works again
    scope.inject_fault("disconnected", device="scan", persistent=True)
    scope.acquire_image(0.01)  # the camera is not affected
    for _ in range(2):
        with pytest.raises(DeviceDisconnected):
            scope.acquire_scan(SCAN)
    scope.clear_faults()
    scope.acquire_scan(SCAN)
    with pytest.raises(ValueError, match="fault kind"):
        scope.inject_fault("smoke")


def test_concurrent_acquisitions_are_serialised():
    scope = make_scope()
    scope.acquire_scan(SCAN)  # build the imager once
    t0 = scope.clock.now_s()
    out: list[int] = []

    def work() -> None:
        for _ in range(3):
            _, recs, _ = scope.acquire_scan(SCAN)
            out.append(recs["HAADF"].index)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out) == list(range(1, 7))
    frame_s = 48 * (48 * 5.0 + 50.0) * 1e-6
    assert scope.clock.now_s() == pytest.approx(t0 + 6 * frame_s)
