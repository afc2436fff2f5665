"""Plans: parsing, expansion into frame steps, approach against hysteresis, limits, estimates;
the rotation-back geometry against the STEM simulator; job file numbering."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from scherzer.config import PlanLimits, Settings
from scherzer.daemon.executor import (
    job_folder,
    output_path,
    processing_steps,
    rotate_back,
    truth_shift_in_frame_px,
)
from scherzer.daemon.plans import (
    PROCESSING_STEPS,
    FocalSeries,
    RotatedScanSeries,
    TimeSeries,
    approach_setpoints,
    parse_plan,
    scan_dose_e_per_A2,
)

LIMITS = Settings().limits


def test_processing_steps_come_from_the_pipeline():
    from scherzer.processing.pipeline import STEPS

    assert set(PROCESSING_STEPS) == set(STEPS)


def test_focal_series_steps_and_defaults():
    plan = parse_plan({"kind": "focal_series", "n_images": 5, "start_nm": -80, "step_nm": 5})
    assert isinstance(plan, FocalSeries)
    steps = list(plan.steps())
    assert [s.defocus_nm for s in steps] == [-80, -75, -70, -65, -60]
    assert plan.processing == ["focal_register", "restore"] and plan.restore_optics
    assert plan.on_error.retries == 1 and plan.on_error.then == "abort"
    listed = parse_plan({"kind": "focal_series", "defocus_list_nm": [-10, -30, -20]})
    assert [s.defocus_nm for s in listed.steps()] == [-10, -30, -20] and listed.n_frames() == 3


def test_every_focus_set_is_approached_from_one_side():
    plan = parse_plan({"kind": "focal_series", "defocus_list_nm": [-10, -30, -20],
                       "overshoot_nm": 15})  # fmt: skip
    # from below: first set and every decreasing step go to target − 15 first
    assert plan.defocus_setpoints() == [-25, -10, -45, -30, -20]
    assert approach_setpoints(5.0, 0.0, "from_above", 10.0) == [15.0, 5.0]
    assert approach_setpoints(-5.0, 0.0, "from_above", 10.0) == [-5.0]
    assert approach_setpoints(-5.0, 0.0, "none", 10.0) == [-5.0]


def test_approach_makes_the_simulated_lens_hysteresis_constant():
    """With the simulator's play-operator hysteresis, one-sided approach gives true focus =
    set-point − const for every image, whatever the order of the values."""
    from scherzer.simulators.lens_controller import LensModel

    clock = [0.0]
    lens = LensModel(lambda: clock[0], np.random.default_rng(0), hysteresis_nm=2.0)
    values, last = [-10.0, -30.0, -20.0, 40.0, -5.0], None
    offsets = []
    for v in values:
        for sp in approach_setpoints(v, last, "from_below", 20.0):
            lens.set_defocus_nm(sp)
            clock[0] += 10.0
        last = v
        offsets.append(lens.true_defocus_nm() - v)
    np.testing.assert_allclose(offsets, -1.0, atol=1e-6)


def test_rotated_scan_rotations_and_derotation_steps():
    plan = parse_plan({"kind": "rotated_scan", "n_frames": 6, "rotation_mode": "orthogonal-sets",
                       "base_rotation_deg": 10, "size_px": [32, 32]})  # fmt: skip
    assert isinstance(plan, RotatedScanSeries)
    steps = list(plan.steps())
    assert [s.shot.settings.rotation_deg for s in steps] == [10, 100, 190, 280, 10, 100]
    assert [s.derotate_deg for s in steps] == [0, 90, 180, 270, 0, 90]
    assert plan.signals() == ("HAADF", "ABF") and plan.processing == ["align"]
    pairs = parse_plan({"kind": "rotated_scan", "n_frames": 3, "size_px": [8, 8]})
    assert [s.shot.settings.rotation_deg for s in pairs.steps()] == [0, 90, 0]
    oblong = RotatedScanSeries(size_px=(16, 32))
    assert any("square" in p for p in oblong.problems(LIMITS, (64, 64)))


def test_time_series_interval_and_sources():
    cam = parse_plan({"kind": "time_series", "n_frames": 3, "interval_s": 5, "exposure_s": 2})
    assert [s.delay_s for s in cam.steps()] == [0, 3, 3] and cam.signals() == ("frames",)
    assert cam.estimate((64, 64)).duration_s == pytest.approx(2 + 5 + 5)
    scan = TimeSeries(source="scan", n_frames=2, size_px=(16, 16), signals=["HAADF", "BF"])
    assert scan.signals() == ("HAADF", "BF") and scan.scan_sets() and not cam.scan_sets()
    assert scan.estimate((64, 64)).disk_bytes == 2 * 16 * 16 * 4 * 2


def test_estimates_carry_dose():
    plan = FocalSeries(n_images=4, exposure_s=0.5)
    est = plan.estimate((128, 128), dose_rate_e_per_A2_s=1000.0)
    assert est.dose_e_per_A2 == pytest.approx(4 * 500.0) and est.frames == 4
    assert est.disk_bytes == 4 * 128 * 128 * 4 and est.duration_s == pytest.approx(2.0)
    scan = RotatedScanSeries(n_frames=2, size_px=(8, 8), dwell_us=2.0, pixel_nm=0.02)
    per_frame = scan_dose_e_per_A2(2.0, 0.02, 20.0)
    # 20 pA · 2 µs / e = 249.7 electrons on a (0.2 Å)² pixel
    assert per_frame == pytest.approx(20e-12 * 2e-6 / 1.602176634e-19 / 0.04)
    assert scan.estimate((1, 1), probe_current_pA=20.0).dose_e_per_A2 == pytest.approx(
        2 * per_frame
    )
    assert plan.estimate((128, 128)).dose_e_per_A2 is None  # instrument did not say


def test_limits_refuse_with_the_reason():
    limits = PlanLimits(defocus_nm=(-200.0, 200.0), dwell_us=(0.5, 50.0), max_scan_px=128)
    far = FocalSeries(n_images=5, start_nm=100.0, step_nm=30.0)
    assert any(
        "defocus 220" in p and "[-200.0, 200.0]" in p for p in far.problems(limits, (64, 64))
    )
    # the pre-approach point counts too: -190 − 20 overshoot
    near = FocalSeries(n_images=2, start_nm=-190.0, step_nm=10.0)
    assert any("defocus -210" in p for p in near.problems(limits, (64, 64)))
    scan = RotatedScanSeries(dwell_us=100.0, size_px=(256, 256))
    problems = scan.problems(limits, (64, 64))
    assert any("dwell_us" in p for p in problems) and any("size_px" in p for p in problems)
    assert FocalSeries(reference_index=20, n_images=5).problems(LIMITS, (64, 64))


def test_schema_errors_and_error_policies():
    with pytest.raises(ValidationError, match="unknown processing steps"):
        parse_plan({"kind": "rotated_scan", "processing": ["restore"]})
    with pytest.raises(ValidationError, match="unknown processing steps"):
        parse_plan({"kind": "focal_series", "processing": [{"step": "sharpen"}]})
    with pytest.raises(ValidationError):
        parse_plan({"kind": "rotated_scan", "rotation_mode": "diagonal"})
    with pytest.raises(ValidationError, match="error policy"):
        parse_plan({"kind": "focal_series", "on_error": "ignore"})
    skip = parse_plan({"kind": "focal_series", "on_error": "skip"}).on_error
    assert (skip.retries, skip.then) == (0, "skip")
    retry3 = parse_plan({"kind": "focal_series", "on_error": {"retries": 3}}).on_error
    assert (retry3.retries, retry3.then) == (3, "abort")


def test_processing_steps_pass_the_reference_image():
    steps = ["focal_register", {"step": "restore", "iterations": 2}]
    plan = FocalSeries(reference_index=3, processing=steps)
    register, restore = processing_steps(plan)
    assert (register.name, register.settings.reference) == ("focal_register", 3)
    assert (restore.name, restore.settings.iterations) == ("restore", 2)
    default = processing_steps(FocalSeries())
    assert [s.name for s in default] == ["focal_register", "restore"]
    assert default[0].settings.reference is None


def test_processing_steps_resolve_camera_curve_names_with_the_daemons_loader():
    plan = FocalSeries(processing=[{"step": "focal_register", "mtf": "k2_300kv.npy"}])
    asked = []

    def load_curve(name: str) -> np.ndarray:
        asked.append(name)
        return np.linspace(1.0, 0.2, 16)

    (register,) = processing_steps(plan, load_curve)
    assert asked == ["k2_300kv.npy"]
    np.testing.assert_allclose(register.camera.mtf, np.linspace(1.0, 0.2, 16))


def test_rotate_back_is_exact_and_refuses_other_angles():
    frame = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(rotate_back(frame, 0.0), frame)
    np.testing.assert_array_equal(rotate_back(rotate_back(frame, 90.0), 270.0), frame)
    np.testing.assert_array_equal(rotate_back(frame, 180.0), frame[::-1, ::-1])
    with pytest.raises(ValueError, match="multiples of 90"):
        rotate_back(frame, 45.0)


def _scan(imager, size, rotation_deg, shift_nm=(0.0, 0.0)):
    from scherzer.simulators.stem import ScanRaster

    centre = (imager.specimen.extent_A[0] / 20.0, imager.specimen.extent_A[1] / 20.0)
    raster = ScanRaster((size, size), 0.02, 1.0, 0.0, rotation_deg, centre)
    images, _ = imager.scan(
        raster, 0.0, lambda t: np.broadcast_to(shift_nm, (*np.shape(t), 2)), None, noise=False
    )
    return images["HAADF"]


@pytest.fixture(scope="module")
def stem_imager():
    from scherzer.optics import Optics
    from scherzer.simulators.specimen import make_specimen
    from scherzer.simulators.stem import STEMImager

    spec = make_specimen("au_particle_on_carbon", (3.0, 3.0), seed=2)
    return STEMImager(spec, Optics(voltage_kv=300.0), 25.0, ("HAADF",))


def test_rotate_back_matches_the_simulator_scan_geometry(stem_imager):
    """A noiseless, drift-free frame scanned at 90°/180°/270° and rotated back equals the 0°
    frame (the scan is centred, 64 px of 0.02 nm; odd sizes would shift the centre)."""
    from scherzer.simulators.stem import derotate

    ref = _scan(stem_imager, 64, 0.0)
    for rot in (90.0, 180.0, 270.0):
        frame = _scan(stem_imager, 64, rot)
        back = rotate_back(frame, rot)
        np.testing.assert_array_equal(back, derotate(frame, rot))
        err = np.abs(back - ref).max() / np.abs(ref).max()
        assert err < 1e-3, (rot, err)


def test_rotate_back_matches_processing_rotate_to_common(stem_imager):
    from scherzer.processing import registration

    frames = np.stack([_scan(stem_imager, 32, r) for r in (0.0, 90.0, 180.0, 270.0)])
    common = registration.rotate_to_common(frames, np.array([0.0, 90.0, 180.0, 270.0]))
    mine = np.stack([rotate_back(f, r) for f, r in zip(frames, (0, 90, 180, 270), strict=True)])
    np.testing.assert_allclose(common, mine, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("base_deg", [0.0, 10.0, 90.0])
def test_truth_shift_in_frame_axes(stem_imager, base_deg):
    """A specimen displacement d (nm) moves the content of a frame scanned at the base rotation
    by truth_shift_in_frame_px(d / pixel) (rows, columns): d is chosen so that this is (3, −2)
    whole pixels, and then moved[y, x] = ref[y − 3, x + 2] must hold (noiseless frames)."""
    t = math.radians(base_deg)
    slow, fast = np.array([math.cos(t), -math.sin(t)]), np.array([math.sin(t), math.cos(t)])
    d_nm = (3 * slow - 2 * fast) * 0.02
    np.testing.assert_allclose(truth_shift_in_frame_px(d_nm / 0.02, base_deg), [3, -2], atol=1e-12)
    ref = _scan(stem_imager, 64, base_deg)
    moved = _scan(stem_imager, 64, base_deg, tuple(d_nm))
    scale = np.abs(ref).max()
    assert np.abs(moved[3:, :-2] - ref[:-3, 2:]).max() / scale < 1e-3
    assert np.abs(moved[:-3, 2:] - ref[3:, :-2]).max() / scale > 1e-2  # the wrong sign fails


def test_job_files_are_numbered_and_never_overwritten(tmp_path):
    from scherzer.daemon.protocol import JobInfo

    job = JobInfo(job_id=7, kind="focal_series", name="edge/run 1", state="queued", plan={},
                  submitter="x", created_s=0.0)  # fmt: skip
    first = output_path(tmp_path, job)
    assert first.name == "edge-run-1_001.hspy" and job_folder(first).is_dir()
    first.write_bytes(b"")
    second = output_path(tmp_path, job)  # folder 001 exists: next number
    assert second.name == "edge-run-1_002.hspy"
    (tmp_path / "jobs" / "edge-run-1_003.h5").write_bytes(b"")  # an older .h5 job file blocks 003
    assert output_path(tmp_path, job).name == "edge-run-1_004.hspy"
    unnamed = job.model_copy(update={"name": ""})
    assert output_path(tmp_path, unnamed).name == "focal_series_001.hspy"


def test_eftem_series_plan_estimate_limits_and_cli_flags():
    import argparse

    from scherzer.cli.plan_cmds import _add_plan_options
    from scherzer.daemon.plans import PLAN_MODELS, EftemSeries

    plan = parse_plan({"kind": "eftem_series", "start_ev": 400, "step_ev": -10, "n_images": 4,
                       "max_exposure_s": 16, "min_exposure_s": 0.25})  # fmt: skip
    assert isinstance(plan, EftemSeries) and EftemSeries in PLAN_MODELS
    assert plan.energies_ev() == [400, 390, 380, 370] and plan.signals() == ("eftem",)
    est = plan.estimate((64, 64))
    # upper bound: 4 images and at most 4 darks (exposures 0.25…16 s: 7 possible) at 16 s
    assert est.duration_s == 8 * 16.0 and est.disk_bytes == 4 * 64 * 64 * 4
    too_long = parse_plan({"kind": "eftem_series", "max_exposure_s": 128})
    assert any("max_exposure_s 128" in p for p in too_long.problems(LIMITS, (64, 64)))
    assert plan.problems(LIMITS, (64, 64)) == []
    # CLI flags are generated from the model, one per field, with their bounds enforced later
    parser = argparse.ArgumentParser()
    _add_plan_options(parser, EftemSeries)
    args = parser.parse_args(["--start-ev", "250", "--n-images", "3", "--slit-width-ev", "5"])
    assert (args.plan__start_ev, args.plan__n_images, args.plan__slit_width_ev) == (250, 3, 5)
    with pytest.raises(ValidationError, match="n_images"):
        parse_plan({"kind": "eftem_series", "n_images": 0})
