"""STEM simulator: probe, HAADF physics, raster timing, drift shear, rotation, jitter, noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from scherzer.optics import Optics
from scherzer.simulators.specimen import Specimen
from scherzer.simulators.stem import (
    HAADF_CROSS_SECTION_A2,
    SIGNALS,
    ScanRaster,
    STEMImager,
    constant_drift,
    derotate,
    rotation_series,
    simulate_rotated_scan,
)
from scherzer.simulators.stem_maps import (
    _detector_overlap,
    _MapGrid,
    _phase_maps,
    _probe_intensity,
    _reversed,
)

OPTICS = Optics(voltage_kv=300.0)


def lattice(spacing_A: float, n: int, z: int | np.ndarray, *, periodic: bool = True) -> Specimen:
    """A square lattice of single atoms (one per column), field n·spacing."""
    yy, xx = np.meshgrid(np.arange(n) * spacing_A, np.arange(n) * spacing_A, indexing="ij")
    pos = np.stack([yy.ravel() + spacing_A / 2, xx.ravel() + spacing_A / 2, np.zeros(n * n)], 1)
    numbers = np.broadcast_to(np.asarray(z), (n * n,)).copy()
    return Specimen("lattice", pos, numbers, (n * spacing_A, n * spacing_A), 1.0, periodic)


def atom_centroids(img: np.ndarray) -> np.ndarray:
    """(row, col) centroids of bright blobs that do not touch the border."""
    thr = 0.3 * img.max()
    labels, _ = ndimage.label(img > thr)
    weight = np.clip(img - thr, 0.0, None)
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl[0].start == 0 or sl[1].start == 0:
            continue
        if sl[0].stop == img.shape[0] or sl[1].stop == img.shape[1]:
            continue
        out.append(ndimage.center_of_mass(weight, labels, i))
    return np.asarray(out)


def fit_affine(pix: np.ndarray, spec_nm: np.ndarray) -> np.ndarray:
    """Least-squares (2, 3) affine: spec ≈ A @ (row, col, 1)."""
    design = np.column_stack([pix, np.ones(len(pix))])
    sol, *_ = np.linalg.lstsq(design, spec_nm, rcond=None)
    return sol.T


# ---------------------------------------------------------------------------------- probe
def test_probe_is_normalised_with_airy_width():
    """Aberration-free probe: ∫|ψ|² = 1 and intensity FWHM = 0.5145 λ/α (Airy) within 3 %."""
    grid = _MapGrid((512, 512), 0.02, (0.0, 0.0))
    alpha = 25e-3
    p = _probe_intensity(OPTICS, grid, alpha)
    assert p.sum() * 0.02**2 == pytest.approx(1.0, rel=1e-5)
    prof = np.roll(p[0], 256)  # probe centred at pixel 0 → 256 after roll
    half = prof.max() / 2
    above = np.nonzero(prof >= half)[0]
    # linear interpolation of the two half-maximum crossings
    lo, hi = above[0], above[-1]
    left = lo - (prof[lo] - half) / (prof[lo] - prof[lo - 1])
    right = hi + (prof[hi] - half) / (prof[hi] - prof[hi + 1])
    fwhm_A = (right - left) * 0.02
    expected = 0.5145 * OPTICS.wavelength_A / alpha
    assert fwhm_A == pytest.approx(expected, rel=0.03)


def test_defocus_spreads_the_probe():
    grid = _MapGrid((256, 256), 0.05, (0.0, 0.0))
    sharp = _probe_intensity(OPTICS, grid, 25e-3).max()
    blurred = _probe_intensity(OPTICS.with_(defocus_nm=-5.0), grid, 25e-3).max()
    assert blurred < 0.2 * sharp


# ---------------------------------------------------------------------------------- HAADF
def test_haadf_integral_and_z_contrast():
    """The HAADF map integrates to Σ s·Z^1.7 Å² and peak heights scale as Z^1.7."""
    spec = lattice(12.0, 2, np.array([79, 38, 38, 79]), periodic=False)
    imager = STEMImager(spec, OPTICS, 25.0, ("HAADF",))
    m = imager.maps["HAADF"].astype(np.float64)
    g = imager.grid
    area = g.pixel_A[0] * g.pixel_A[1]
    assert m.sum() * area == pytest.approx(
        2 * HAADF_CROSS_SECTION_A2 * (79**1.7 + 38**1.7), rel=1e-3
    )
    # peak heights (quadrant maxima): the neighbours' probe tails add < 0.5 %
    h, w = m.shape
    au = m[: h // 2, : w // 2].max()
    sr = m[: h // 2, w // 2 :].max()
    assert au / sr == pytest.approx((79 / 38) ** 1.7, rel=0.005)


def test_sample_reproduces_map_between_nodes():
    """Cubic B-spline sampling equals the band-limited map evaluated by Fourier shift."""
    spec = lattice(3.9, 4, 38, periodic=False)
    imager = STEMImager(spec, OPTICS, 25.0, ("HAADF",))
    m = imager.maps["HAADF"]
    g = imager.grid
    shift = (0.37, 0.61)  # px
    ref = ndimage.fourier_shift(np.fft.fft2(m), (-shift[0], -shift[1]))
    ref = np.fft.ifft2(ref).real
    idx = np.arange(3, m.shape[0] - 3, 7)
    rows, cols = np.meshgrid(idx, idx, indexing="ij")
    pos_nm = np.stack(
        [
            (g.origin_A[0] + (rows + shift[0]) * g.pitch_A) / 10,
            (g.origin_A[1] + (cols + shift[1]) * g.pitch_A) / 10,
        ],
        -1,
    )
    got = imager.sample(pos_nm)["HAADF"]
    err = np.abs(got - ref[rows, cols]).max()
    assert err < 2e-3 * m.max()


# ---------------------------------------------------------------------------------- BF / ABF
def test_vacuum_levels_and_dark_columns_in_bright_field():
    """Far from atoms: HAADF 0, BF (β/α)², ABF 1 − (inner)²; on a column BF/ABF drop."""
    spec = lattice(6.0, 3, 79, periodic=False)
    imager = STEMImager(spec, OPTICS, 25.0, SIGNALS, bf_fraction=0.25, abf_inner_fraction=0.5)
    far = np.array([[-0.6, -0.6], [2.4, 2.4]])  # nm, in the vacuum margin
    on = spec.positions_A[4:5, :2] / 10  # centre atom
    v = imager.sample(far)
    np.testing.assert_allclose(v["HAADF"], 0.0, atol=1e-5)
    np.testing.assert_allclose(v["BF"], 0.25**2, rtol=1e-3)
    np.testing.assert_allclose(v["ABF"], 1 - 0.5**2, rtol=5e-3)  # discrete detector edge
    a = imager.sample(on)
    assert a["HAADF"][0] > 0.01
    assert a["BF"][0] < 0.9 * 0.25**2
    assert a["ABF"][0] < 0.95 * (1 - 0.5**2)


@pytest.mark.parametrize("defocus_nm", [0.0, -5.0])
def test_bf_reciprocity_agrees_with_linear_theory_for_a_weak_object(defocus_nm):
    """Two independent BF models on one carbon atom (σV ≪ 1): the coherent reciprocity image
    and the linear detector-overlap theory (the ABF machinery with a disc detector)."""
    spec = Specimen("C", np.array([[10.0, 10.0, 0.0]]), np.array([6]), (20.0, 20.0), 1.0)
    optics = OPTICS.with_(defocus_nm=defocus_nm)
    imager = STEMImager(spec, optics, 20.0, ("BF",), bf_fraction=0.1)
    g = imager.grid
    phase, absorb = _phase_maps(spec, optics, g)
    assert phase.max() < 0.3  # weak object
    c = _detector_overlap(optics, g, 20e-3, 0.0, 0.1)
    cm = np.conj(_reversed(c))
    spec_lin = np.fft.fft2(phase) * 1j * (c - cm) - np.fft.fft2(absorb) * (c + cm)
    lin = c[0, 0].real + np.fft.ifft2(spec_lin).real
    bf = imager.maps["BF"]
    a = bf / bf[0, 0] - 1  # contrast relative to vacuum
    b = lin / lin[0, 0] - 1
    assert np.abs(b).max() > 0.01  # there is contrast to compare
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    assert np.abs(a - b).max() < 0.15 * np.abs(b).max()


def test_abf_overlap_normalisation():
    """C(0) of the linear ABF model is the detector's share of the probe-forming disc."""
    grid = _MapGrid((256, 256), 0.05, (0.0, 0.0))
    c = _detector_overlap(OPTICS, grid, 25e-3, 0.5, 1.0)
    disc = _detector_overlap(OPTICS, grid, 25e-3, 0.0, 1.0)
    assert c[0, 0].real == pytest.approx(0.75, rel=0.02)  # discrete disc edge
    assert disc[0, 0].real == pytest.approx(1.0, rel=1e-5)


def test_all_signals_share_probe_positions_under_drift_and_jitter():
    """Each signal equals its own map sampled at the one set of recorded positions, and the
    HAADF maxima coincide with the ABF minima (same atoms, same probe positions)."""
    spec = lattice(6.0, 8, 79)
    imager = STEMImager(spec, OPTICS, 12.0, ("HAADF", "ABF", "BF"))
    raster = ScanRaster(96, 0.025, 10.0, 300.0, 20.0, (2.4, 2.4))
    imgs, truth = imager.scan(
        raster,
        0.0,
        constant_drift((0.8, 0.5)),
        np.random.default_rng(2),
        jitter_px=0.5,
        noise=False,
    )
    for sig in ("HAADF", "ABF", "BF"):
        single = STEMImager(spec, OPTICS, 12.0, (sig,))
        np.testing.assert_allclose(
            imgs[sig],
            single.sample(truth["positions_nm"])[sig]
            * truth["electrons_per_pixel"]
            * single.efficiency[sig],
            rtol=1e-4,
            atol=1e-6 * imgs[sig].max(),
        )
    bright = atom_centroids(imgs["HAADF"])
    dark = atom_centroids(imgs["ABF"].max() - imgs["ABF"])
    d = np.sqrt(((bright[:, None] - dark[None]) ** 2).sum(-1)).min(1)
    assert len(bright) >= 9
    assert np.median(d) < 0.2 and d.max() < 0.5  # px


# ---------------------------------------------------------------------------------- raster
def test_pixel_times_follow_the_raster_formula():
    r = ScanRaster((4, 5), 0.02, dwell_us=3.0, flyback_us=50.0)
    t = r.pixel_times_s(10.0)
    row, col = 3, 2
    assert t[row, col] == pytest.approx(10.0 + (row * (5 * 3.0 + 50.0) + col * 3.0) * 1e-6)
    assert r.frame_time_s == pytest.approx(4 * (5 * 3.0 + 50.0) * 1e-6)


@pytest.mark.parametrize("rotation_deg", [0.0, 90.0, 33.0])
def test_positions_match_analytic_affine_with_drift(rotation_deg):
    v = (1.5, -0.7)
    r = ScanRaster((16, 24), 0.03, 10.0, 200.0, rotation_deg, (2.0, 3.0))
    pos, _ = r.positions_nm(0.25, constant_drift(v))
    rows, cols = np.meshgrid(np.arange(16), np.arange(24), indexing="ij")
    a = r.affine_nm(v, 0.25)
    expected = np.einsum("ij,jyx->yxi", a, np.stack([rows, cols, np.ones_like(rows)]))
    np.testing.assert_allclose(pos, expected, atol=1e-12)


def test_scan_axes_orientation():
    """At 0° the fast axis is +x, at 90° it runs along +y and the slow axis along −x."""
    r0 = ScanRaster((3, 3), 1.0, 1.0, 0.0, 0.0)
    r90 = ScanRaster((3, 3), 1.0, 1.0, 0.0, 90.0)
    p0, _ = r0.positions_nm(0.0)
    p90, _ = r90.positions_nm(0.0)
    np.testing.assert_allclose(p0[0, 1] - p0[0, 0], [0, 1], atol=1e-12)
    np.testing.assert_allclose(p90[0, 1] - p90[0, 0], [1, 0], atol=1e-12)
    np.testing.assert_allclose(p90[1, 0] - p90[0, 0], [0, -1], atol=1e-12)


def test_constant_drift_gives_measured_analytic_shear_in_0_and_90_frames():
    """Atom centroids measured in 0° and 90° frames under constant drift fit the analytic
    affine (stretch + shear) maps; the measured frame-to-frame map matches too."""
    spacing = 6.0
    spec = lattice(spacing, 10, 79)
    imager = STEMImager(spec, OPTICS, 10.0, ("HAADF",))  # 1 Å probe: blobs well sampled
    v = (0.6, -0.5)  # nm/s: ≈4 % stretch/shear with 16 µs dwell and 400 µs flyback
    centre = (spec.extent_A[0] / 20, spec.extent_A[1] / 20)
    atoms_nm = spec.positions_A[:, :2] / 10
    fitted, analytic = {}, {}
    for rot, t0 in ((0.0, 0.0), (90.0, 0.3)):
        r = ScanRaster((112, 112), 0.03, 16.0, 400.0, rot, centre)
        img, truth = imager.scan(r, t0, constant_drift(v), None, noise=False)
        cents = atom_centroids(img["HAADF"])
        assert len(cents) >= 25
        # pair atoms with a drift-free raster shifted by the frame-start displacement only
        guess = r.affine_nm((0.0, 0.0), 0.0)
        guess[:, 2] -= truth["drift_start_nm"]
        pred = np.column_stack([cents, np.ones(len(cents))]) @ guess.T
        dist = np.sqrt(((pred[:, None] - atoms_nm[None]) ** 2).sum(-1))
        nearest = atoms_nm[np.argmin(dist, 1)]
        assert dist.min(1).max() < 0.3 * spacing / 10  # unambiguous pairing
        fitted[rot] = fit_affine(cents, nearest)
        analytic[rot] = r.affine_nm(v, t0)
        resid = np.column_stack([cents, np.ones(len(cents))]) @ fitted[rot].T - nearest
        assert np.abs(resid).max() < 0.1 * r.pixel_nm
        # drift changes the linear part by v·line_time (slow axis) and v·dwell (fast axis)
        lin_err = np.abs(fitted[rot][:, :2] - analytic[rot][:, :2]).max()
        drift_effect = np.abs(analytic[rot][:, :2] - guess[:, :2]).max()
        assert drift_effect > 0.03 * r.pixel_nm  # the effect is real (≥ 3 % stretch)
        assert lin_err < 0.02 * drift_effect
        assert np.abs(fitted[rot][:, 2] - analytic[rot][:, 2]).max() < 0.05 * r.pixel_nm

    def to3(a):
        return np.vstack([a, [0, 0, 1]])

    measured = np.linalg.inv(to3(fitted[90.0])) @ to3(fitted[0.0])
    expected = np.linalg.inv(to3(analytic[90.0])) @ to3(analytic[0.0])
    np.testing.assert_allclose(measured, expected, atol=0.02)


def test_rotation_90_gives_the_rotated_image():
    spec = lattice(3.905, 10, np.array([38, 22] * 50))
    imager = STEMImager(spec, OPTICS, 25.0, ("HAADF",))
    centre = (1.7, 2.1)
    img0, _ = imager.scan(
        ScanRaster(64, 0.025, 1.0, 0.0, 0.0, centre), 0.0, None, None, noise=False
    )
    imgs = {}
    for rot in (90.0, 180.0, 270.0):
        raster = ScanRaster(64, 0.025, 1.0, 0.0, rot, centre)
        imgs[rot], _ = imager.scan(raster, 0.0, None, None, noise=False)
    a = img0["HAADF"]
    for rot, img in imgs.items():
        b = derotate(img["HAADF"], rot)
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9999
        assert np.corrcoef(a.ravel(), img["HAADF"].ravel())[0, 1] < 0.9


def test_line_jitter_shifts_rows_along_fast_axis_seeded():
    r = ScanRaster((32, 32), 0.02, 1.0, 10.0, 30.0)
    pos_j, _ = r.positions_nm(0.0, None, 0.5, np.random.default_rng(3))
    pos_0, _ = r.positions_nm(0.0)
    again, _ = r.positions_nm(0.0, None, 0.5, np.random.default_rng(3))
    np.testing.assert_array_equal(pos_j, again)
    d = (pos_j - pos_0) / 0.02
    fast = np.array([math.sin(math.radians(30)), math.cos(math.radians(30))])
    along = d @ fast
    np.testing.assert_allclose(d, along[..., None] * fast, atol=1e-9)  # only along fast axis
    assert np.ptp(along, axis=1).max() < 1e-9  # one offset per row
    assert 0.3 < along[:, 0].std() < 0.7


def test_poisson_statistics_per_dwell():
    """Counts are Poisson around I·dwell/e · fraction · efficiency."""
    spec = lattice(3.905, 8, 38)
    imager = STEMImager(spec, OPTICS, 25.0, ("HAADF",))
    raster = ScanRaster(128, 0.02, 50.0, 0.0, 0.0, (1.0, 1.0))
    expect, truth = imager.scan(raster, 0.0, None, None, 100.0, noise=False)
    n_e = 100e-12 * 50e-6 / 1.602176634e-19
    assert truth["electrons_per_pixel"] == pytest.approx(n_e)
    lam = imager.sample(truth["positions_nm"])["HAADF"] * n_e * imager.efficiency["HAADF"]
    np.testing.assert_allclose(expect["HAADF"], lam, rtol=1e-5)
    counts, _ = imager.scan(raster, 0.0, None, np.random.default_rng(1), 100.0)
    c, lam = counts["HAADF"].astype(np.float64), expect["HAADF"].astype(np.float64)
    assert np.all(c == np.round(c))
    z = (c - lam) / np.sqrt(lam)
    assert abs(z.mean()) < 0.03
    assert z.var() == pytest.approx(1.0, abs=0.05)
    assert c.sum() == pytest.approx(lam.sum(), rel=0.01)


# ---------------------------------------------------------------------------------- series
def test_rotation_series_modes():
    np.testing.assert_array_equal(rotation_series("orthogonal-pairs", 5), [0, 90, 0, 90, 0])
    np.testing.assert_array_equal(rotation_series("orthogonal-sets", 5), [0, 90, 180, 270, 0])
    np.testing.assert_array_equal(rotation_series("none", 3, 10.0), [10, 10, 10])
    with pytest.raises(ValueError, match="rotation_mode"):
        rotation_series("diagonal", 3)


RECORDS_SERIES = {
    "n_frames": 4,
    "rotation_mode": "orthogonal-sets",
    "size": 48,
    "pixel_nm": 0.02,
    "dwell_us": 4.0,
    "flyback_us": 40.0,
    "signals": ("HAADF",),
    "seed": 5,
}


def test_simulate_rotated_scan_records_and_truth():
    spec = lattice(3.905, 14, 38)
    v = (0.5, -0.3)
    stacks = simulate_rotated_scan(spec, drift_nm_per_s=v, **RECORDS_SERIES)
    st = stacks["HAADF"]
    assert st.frames.shape == (4, 48, 48) and st.frames.dtype == np.float32
    np.testing.assert_array_equal(st.column("scan_rotation_deg"), [0, 90, 180, 270])
    frame_s = 48 * (48 * 4.0 + 40.0) * 1e-6
    np.testing.assert_allclose(st.column("time_s"), np.arange(4) * frame_s)
    gt = st.ground_truth
    np.testing.assert_allclose(gt["shifts_px"], np.outer(np.arange(4) * frame_s, v) / 0.02)
    assert gt["scan_affine_nm"].shape == (4, 2, 3)
    assert all(r.signal == "HAADF" and r.dwell_us == 4.0 for r in st.records)
    again = simulate_rotated_scan(spec, drift_nm_per_s=v, **RECORDS_SERIES)
    np.testing.assert_array_equal(again["HAADF"].frames, st.frames)


def test_simulate_rotated_scan_named_specimen_two_signals():
    stacks = simulate_rotated_scan(
        "srtio3_001", n_frames=2, size=48, signals=("HAADF", "ABF"), seed=1
    )
    assert set(stacks) == {"HAADF", "ABF"}
    h, a = stacks["HAADF"], stacks["ABF"]
    np.testing.assert_array_equal(h.column("scan_rotation_deg"), [0, 90])
    np.testing.assert_array_equal(h.ground_truth["shifts_px"], a.ground_truth["shifts_px"])
    assert a.frames.mean() > 10 * h.frames.mean() > 0  # ABF near 3/4 of the beam, HAADF a few %
    assert h.instrument["convergence_mrad"] == 25.0 and h.metadata["specimen"] == "srtio3_001"


def test_bad_input_is_refused_with_a_reason():
    spec = lattice(3.905, 4, 38)
    with pytest.raises(ValueError, match="unknown STEM signal"):
        STEMImager(spec, OPTICS, 25.0, ("DF4",))
    with pytest.raises(ValueError, match="dwell_us"):
        ScanRaster(16, 0.02, 0.0)
    with pytest.raises(ValueError, match="multiples of 90"):
        derotate(np.zeros((4, 4)), 45.0)


# --- scan-distorted series (simulators/scan_distortion.py) -------------------------------------
def test_distorted_series_truth_is_the_sampled_position() -> None:
    """Per-pixel truth: with a constant drift only, the sampled positions are the raster's
    analytic affine map; pick-up, flyback and jitter move them by their stated amounts; the
    frames are the imager sampled there (noise aside) and the SI counts sit at the same
    positions."""
    from scherzer.simulators.scan_distortion import (
        ScanDistortion,
        SpectrumParams,
        sample_truth,
        simulate_distorted_series,
    )

    kw = {"n_frames": 2, "size": 48, "signals": ("HAADF",), "seed": 4}
    steady = simulate_distorted_series(distortion=ScanDistortion((0.2, -0.1)), **kw)
    gt = steady["HAADF"].ground_truth
    pos = gt["positions_nm"]
    assert pos.dtype == np.float32 and pos.shape == (2, 48, 48, 2)
    raster = ScanRaster(48, 0.02, center_nm=tuple(gt["scan_centre_nm"]))
    r, c = np.meshgrid(np.arange(48), np.arange(48), indexing="ij")
    affine = raster.affine_nm((0.2, -0.1), 0.0)
    expected = np.einsum("ak,yxk->yxa", affine, np.stack([r, c, np.ones_like(r)], -1))
    np.testing.assert_allclose(pos[0], expected, atol=1e-5)
    jitter = ScanDistortion((0.2, -0.1), jitter_px=0.3, mains_nm=(0.01, 0.0))
    shaken = simulate_distorted_series(distortion=jitter, **kw)["HAADF"].ground_truth
    moved = (shaken["positions_nm"] - pos)[..., 1].mean(axis=2) / 0.02  # fast-axis per row
    assert 0.15 < float(np.std(moved)) < 0.5
    assert float(np.abs(shaken["positions_nm"] - pos)[..., 0].max()) <= 0.0101
    with_si = simulate_distorted_series(spectrum=SpectrumParams(32), beam_current_pA=600.0, **kw)
    si = with_si["SI"]
    assert si.shape == (2, 48, 48, 32) and si.dtype == np.uint16
    amounts = sample_truth(with_si["truth"], with_si["HAADF"].ground_truth["positions_nm"][0])
    assert amounts.shape == (3, 48, 48)
    assert abs(float(si[0].sum()) / float(amounts.sum()) - 1.0) < 0.3  # + flat background
