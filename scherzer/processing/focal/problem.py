"""The registration problem of one focal series on its information band.

One job: hold what every pass shares — the frame spectra on the band (:class:`Problem`: the
band with the per-image delocalisation limit, the weak-phase transfer, camera MTF and NPS),
the peak finder on band-limited cross-power spectra (:class:`Correlator`), the leave-one-out
waves that predict each image from all the others (:func:`loo_waves`) and the shift
refinement against them (:func:`refine_shifts`) — and the protocol of the specimen strategies
(:class:`Strategy`: amorphous in :mod:`.relative`, crystal in :mod:`.crystal`).

Conventions: numerics in Å / 1/Å via :mod:`scherzer.optics`; defocus in nm; band frequencies
in cycles/px; shifts in px with frame_i(r) ≈ ref(r − s_i) (ARCHITECTURE.md); spectra are
unnormalised FFTs of mean-normalised frames minus 1
(:func:`scherzer.processing.spectral.frame_spectra`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import scipy.fft as sfft

from scherzer.optics import FrequencyGrid, Optics, chi_gradient_sq, fft_workers, vibration_envelope
from scherzer.processing.focal.kernels import (
    band_chunks,
    newton_moments,
    on_image_thread,
    over_chunks,
)
from scherzer.processing.focal.search import local_grid_peak
from scherzer.processing.focal.settings import MIN_IMAGES, FocalParams
from scherzer.processing.spectral import (
    BandTransfer,
    SpectralBand,
    camera_curve_to_grid,
    crop_area,
    frame_spectra,
    information_band,
    shift_phase,
)
from scherzer.processing.wiener import quadratic_term, solve_series

__all__ = ["Correlator", "Problem", "Strategy", "loo_waves", "map_images", "refine_shifts"]

BAND_THRESHOLD = 0.02  # registration band: |T|·C above this in some image (higher: fewer, surer)
BAND_MIN_FREQUENCY_PX = 2.0  # … and |g| above this many FFT pixels (the lowest carry drift-free
# background, not defocus)
NOISE_PEAK_SIGMAS = 5.0  # a peak must stand this many σ (≈ 1/√m) above pure-noise correlation
NPS_FLOOR = 1e-6  # the NPS is floored at this × its band mean before inverting it
COARSE_BOX_MARGIN_PX = 8  # the coarse correlation box: twice the band's reach + this
NEWTON_MAX_STEP_PX = 0.5  # a Newton step of the shift is clipped to this (stays in the peak)
NEWTON_TOL_PX = 1e-4  # … and stops below this
SHIFT_START_HALF_PX = 1.0  # refine_shifts: the grid start searches ± this around the last shift
SHIFT_NEWTON_STEPS = 6  # Newton steps of a final shift refinement
IMAGE_THREADS = 0  # images matched at once (map_images; 0: one per core). numpy and the numba
# kernels release the GIL, and the results equal the serial loop's. Measured from the CLI on
# the idle 2 cores (`scherzer restore --json`, runs alternated, medians): 11 × 512² 3.64 →
# 3.15 s wall, 20 × 512² 3.47 → 3.27 s, 11 × 1024² 10.7 → 8.8 s (on the shared cores at load ~6
# it gained nothing for 10–15 % more CPU)


class Correlator:
    """Peak finding for band-limited cross-power spectra Z (k, m)."""

    def __init__(self, band: SpectralBand):
        self.band = band
        ny, nx = band.shape
        iy = np.rint(band.gy * ny).astype(np.int64)
        ix = np.rint(band.gx * nx).astype(np.int64)
        by = min(ny, sfft.next_fast_len(int(2 * np.abs(iy).max() + COARSE_BOX_MARGIN_PX)))
        bx = min(nx, sfft.next_fast_len(int(2 * np.abs(ix).max() + COARSE_BOX_MARGIN_PX)))
        self.box = (by, bx)
        self.box_idx = (iy % by) * bx + (ix % bx)
        self.half_sel = np.flatnonzero((ix % bx) <= bx // 2)  # band elements in the rfft half
        self.half_idx = (iy[self.half_sel] % by) * (bx // 2 + 1) + ix[self.half_sel] % bx
        self.scale = (ny / by, nx / bx)
        # the per-axis phase factors only at the axis frequencies the band uses (a third of
        # the rows and columns at 512²: the cos/sin of the others were most of a moments pass)
        rows, self.iy = np.unique(iy % ny, return_inverse=True)
        cols, self.ix = np.unique(ix % nx, return_inverse=True)
        self.fy = np.fft.fftfreq(ny)[rows]
        self.fx = np.fft.fftfreq(nx)[cols]
        self.moments_g = (band.gy.astype(np.float32), band.gx.astype(np.float32))
        self.chunks = band_chunks(band.size)  # the band split over the cores when large

    def coarse(
        self,
        z: np.ndarray,
        norm: np.ndarray,
        center: np.ndarray | None = None,
        radius: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Integer-ish peak (k, 2) in px and height / ``norm`` (k,) of each trial.

        With ``center`` (2,) and ``radius`` (px) only shifts within the radius are considered
        (drift is smooth: this keeps a lattice-translated peak of a crystal from winning).
        """
        k = z.shape[0]
        by, bx = self.box
        # Re F⁻¹[Z] = F⁻¹ of Z's Hermitian part (Z(g) + Z*(−g))/2: an irfft2 of the half grid
        herm = 0.5 * (z + self.band.conj_neg(z))
        half = np.zeros((k, by * (bx // 2 + 1)), np.complex64)
        half[:, self.half_idx] = herm[:, self.half_sel]
        c = sfft.irfft2(half.reshape(k, by, bx // 2 + 1), s=(by, bx), workers=fft_workers())
        sy = np.fft.fftfreq(by, 1.0 / by) * self.scale[0]
        sx = np.fft.fftfreq(bx, 1.0 / bx) * self.scale[1]
        if center is not None and radius is not None:
            dy = (sy - center[0])[:, None]
            dx = (sx - center[1])[None, :]
            c = np.where((dy * dy + dx * dx <= radius * radius)[None], c, -np.inf)
        flat = c.reshape(k, -1).argmax(axis=1)
        py, px = np.divmod(flat, bx)
        heights = c.reshape(k, -1).max(axis=1) / np.maximum(norm, 1e-30)
        return np.stack([sy[py], sx[px]], axis=1), heights

    def axis_phases(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The per-axis factors (exp(2πi fy s_y), exp(2πi fx s_x)), complex64."""
        ey = np.exp(2j * math.pi * self.fy * s[0]).astype(np.complex64)
        ex = np.exp(2j * math.pi * self.fx * s[1]).astype(np.complex64)
        return ey, ex

    def phase(self, s: np.ndarray) -> np.ndarray:
        """exp(2πi g·s) on the band (complex64), from separable per-axis factors."""
        ey, ex = self.axis_phases(s)
        return ey[self.iy] * ex[self.ix]

    def moments(self, z: np.ndarray, s: np.ndarray) -> tuple[float, ...]:
        """(Σ gy Im ze, Σ gx Im ze, Σ gy² Re ze, Σ gy gx Re ze, Σ gx² Re ze, Σ Re ze) of
        ze = Z e^{2πi g·s}: one fused pass over the band (:func:`.kernels.newton_moments`)."""
        gy, gx = self.moments_g
        sy, sx = float(s[0]), float(s[1])
        args = (z, sy, sx, self.fy, self.fx, self.iy, self.ix, gy, gx)
        if len(self.chunks) == 1:
            return newton_moments(*args, 0, z.shape[0])
        parts = over_chunks(lambda j0, j1: newton_moments(*args, j0, j1), self.chunks)
        return tuple(sum(p[c] for p in parts) for c in range(6))

    def refine(
        self, z: np.ndarray, s: np.ndarray, norm: float, steps: int = 4, offset: float = 0.0
    ) -> tuple[np.ndarray, float]:
        """Newton ascent of Re Σ Z e^{2πi g·s} from s (2,); returns (s, (value − ``offset``) /
        ``norm``)."""
        s = np.asarray(s, np.float64).copy()
        norm = max(float(norm), 1e-30)
        z = np.ascontiguousarray(z, np.complex64)
        height = None  # Re Σ Z e^{2πi g·s} at the final s, when a moments pass already has it
        for _ in range(steps):
            my, mx, myy, mxy, mxx, value = self.moments(z, s)
            hyy, hxy, hxx = (-4 * math.pi**2 * v for v in (myy, mxy, mxx))
            det = hyy * hxx - hxy * hxy
            if not (hyy < 0 and det > 0):
                height = value  # no step: the value at s is known
                break
            gy, gx = -2 * math.pi * my, -2 * math.pi * mx
            dy = min(max(-(hxx * gy - hxy * gx) / det, -NEWTON_MAX_STEP_PX), NEWTON_MAX_STEP_PX)
            dx = min(max(-(hyy * gx - hxy * gy) / det, -NEWTON_MAX_STEP_PX), NEWTON_MAX_STEP_PX)
            s[0] += dy
            s[1] += dx
            if max(abs(dy), abs(dx)) < NEWTON_TOL_PX:
                # converged: over a Newton step δ the value moves by ½ ∇·δ (exact for a
                # quadratic; < 1e-7 of the peak here), so no further moments pass is needed
                height = value + 0.5 * (gy * dy + gx * dx)
                break
        if height is None:
            height = self.moments(z, s)[5]
        return s, (height - offset) / norm


class Problem:
    """Spectra, band and transfer of one series.

    ``frames`` (n, y, x) intensities (cropped to ``params.area``); ``params`` are resolved
    (:meth:`FocalParams.resolved`, :meth:`FocalParams.for_field`) here and kept as
    ``self.params``. ``spectra`` (n, m) on ``band`` (zero where ``mask`` (n, m) leaves a
    frequency out for that image); ``camera`` the MTF × vibration envelope on the band;
    ``inv_nps`` relative inverse noise power (mean NPS 1); ``bt`` the transfer of the current
    optics (:meth:`set_optics`); ``flag_level`` the peak below which an image is suspect.
    """

    def __init__(self, frames, optics, pixel_nm, nominal, params: FocalParams, mtf=None, nps=None):
        self.frames = crop_area(frames, params.area)
        params = params.resolved().for_field(self.frames)
        self.params = params
        self._args = (pixel_nm, nominal, mtf, nps)
        self._common: Problem | None = None
        self.spectra_full = frame_spectra(self.frames, params.taper_px)
        self.grid = FrequencyGrid(self.spectra_full.shape[-2:], (pixel_nm, pixel_nm))
        self.optics = optics
        per_image = params.max_delocalisation is not None and params.per_image_delocalisation
        self.band = information_band(
            optics,
            self.grid,
            nominal,
            np.ones(self.grid.shape, np.float32),
            BAND_THRESHOLD,
            BAND_MIN_FREQUENCY_PX,
            None if per_image else params.max_delocalisation,
        )
        self.mask = np.ones((len(nominal), self.band.size), bool)
        if per_image:
            self.band, self.mask = delocalisation_band(
                optics, self.grid, self.band, nominal, params.max_delocalisation
            )
        self.spectra = self.band.gather(self.spectra_full) * self.mask
        # a peak must pass the threshold and stand 5σ above the correlation of pure noise (≈ 1/√m)
        self.flag_level = max(params.peak_threshold, NOISE_PEAK_SIGMAS / math.sqrt(self.band.size))
        self.corr = Correlator(self.band)
        # camera MTF × vibration envelope: multiplies the intensity spectrum
        cam = camera_curve_to_grid(mtf, self.grid.shape, "mtf") * vibration_envelope(
            optics, self.grid
        )
        self.camera = self.band.gather(cam).astype(np.float32)
        # relative noise power (mean 1 on the band): the shift refinement's noise weights
        nps_b = self.band.gather(camera_curve_to_grid(nps, self.grid.shape, "nps"))
        self.inv_nps = (np.mean(nps_b) / np.maximum(nps_b, NPS_FLOOR * np.mean(nps_b))).astype(
            np.float32
        )
        self.set_optics(optics)

    def set_optics(self, optics: Optics) -> None:
        self.optics = optics
        self.bt = BandTransfer(optics, self.grid, self.band)
        self.optics_version = getattr(self, "optics_version", -1) + 1
        # results that depend on the frames alone (or on the optics with optics_version in
        # their key), computed once per registration: see :meth:`memo`
        self._memo: dict[Any, Any] = getattr(self, "_memo", {})
        if self._common is not None:
            self._common.set_optics(optics)

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per ``key`` for this problem (per-image whitened spectra, repeated
        matches): the key must hold everything the result depends on."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def common(self) -> Problem:
        """This series on the band every image keeps (the delocalisation limit applied to all
        images at once); ``self`` when that is already so."""
        if not self.params.per_image_delocalisation:
            return self
        if self._common is None:
            pix, nominal, mtf, nps = self._args
            params = replace(self.params, per_image_delocalisation=False, area=None)
            self._common = Problem(self.frames, self.optics, pix, nominal, params, mtf, nps)
        return self._common

    def ctf(self, defocus_nm: np.ndarray, env_s: np.ndarray) -> np.ndarray:
        """Weak-phase transfer 2 sin χ · envelopes on the band, (k, m) float32."""
        env = self.bt.env_t * env_s * self.camera
        return (2.0 * np.sin(self.bt.chi(defocus_nm)) * env).astype(np.float32, copy=False)


DELOC_MIN_FRACTION = 0.75  # a frequency is used when ≥ this fraction of the images keep it


def delocalisation_band(
    optics: Optics,
    grid: FrequencyGrid,
    band: SpectralBand,
    nominal: np.ndarray,
    fraction: float,
) -> tuple[SpectralBand, np.ndarray]:
    """Per image, the band frequencies whose delocalisation |∇χ|/2π stays within ``fraction``
    of the field (content from outside the field is inconsistent between defoci there); the
    band shrunk to frequencies at least ``MIN_IMAGES`` images keep. Returns (band, (n, m)).

    Leaving a frequency out only for the images that delocalise it (instead of for all)
    keeps the high frequencies of the images near the delocalisation minimum, which carry
    most of the defocus information (measured on a 256² weak-phase series, 1000 e/Å²,
    relative defocus from the true start: 0.33 → 0.04 nm RMS)."""
    field_A = 10.0 * min(s * p for s, p in zip(grid.shape, grid.pixel_nm, strict=True))
    limit = (2.0 * math.pi * fraction * field_A) ** 2
    ok = np.stack([band.gather(chi_gradient_sq(optics, grid, float(d))) <= limit for d in nominal])
    keep = ok.sum(axis=0) >= max(MIN_IMAGES, math.ceil(DELOC_MIN_FRACTION * len(nominal)))
    full = np.zeros(grid.shape[0] * grid.shape[1], bool)
    full[band.idx[keep]] = True
    new = SpectralBand.from_mask(full.reshape(grid.shape))
    return new, ok[:, keep]


def clip_spots(x: np.ndarray, band: SpectralBand, factor: float) -> np.ndarray:
    """Limit |x| to ``factor`` × its radial mean |x|: Bragg spots weigh no more than a few
    diffuse (amorphous) frequencies, which carry the unambiguous drift and defocus signal."""
    if factor <= 0:
        return x
    return (x * clip_weight(x, band, factor)).astype(np.complex64, copy=False)


def clip_weight(x: np.ndarray, band: SpectralBand, factor: float, n_bins: int = 32) -> np.ndarray:
    """Weights (m,) float32 that limit |x| to ``factor`` × its radial mean (0: ones)."""
    if factor <= 0:
        return np.ones(band.size, np.float32)
    which, count = band.radial_bins(n_bins)
    mag = np.abs(x)
    mean = np.bincount(which, mag, n_bins) / count
    return np.minimum(1.0, factor * mean[which] / np.maximum(mag, 1e-30)).astype(
        np.float32, copy=False
    )


def whiten(x: np.ndarray, exponent: float) -> np.ndarray:
    """x / |x|^exponent (0: unchanged; 1: phase only) — spectral whitening before correlation."""
    if exponent == 0:
        return x
    return (x / np.maximum(np.abs(x), 1e-30) ** exponent).astype(np.complex64, copy=False)


SPOT_QUANTILE = 0.995  # band frequencies above this power quantile are "the spots"


def spot_mask(spectra: np.ndarray, quantile: float = SPOT_QUANTILE) -> np.ndarray:
    """Band elements carrying the most power over the series (a crystal's Bragg spots), ≥ 16."""
    pw = np.sum(np.abs(spectra) ** 2, axis=0)
    k = max(16, round((1.0 - quantile) * pw.size))
    mask = np.zeros(pw.size, bool)
    mask[np.argsort(pw)[::-1][:k]] = True
    return mask


def loo_waves(prob: Problem, d_abs, shifts, used, prior_scale: float, env_s=None):
    """Leave-one-out waves of the aligned series at defocus ``d_abs``: (transfers (n, m),
    the used images' solution, quadratic terms (n, m), per-image waves (n, m): restored from
    all other used images; an unused image gets the full wave). ``corrections`` ≥ 1 in the
    solve (its quadratic terms are reused here)."""
    n = len(d_abs)
    env_s = prob.bt.spatial(d_abs) if env_s is None else env_s
    t = prob.bt.transfer(d_abs, env_s)
    aligned = prob.spectra * shift_phase(prob.band, shifts)
    sol = solve_series(
        aligned[used], t[used], prob.band, camera=prob.camera, leave_one_out=True,
        prior_scale=prior_scale, mask=prob.mask[used],
    )  # fmt: skip
    # the used images' quadratic terms are those the solve subtracted (one correction round
    # older than sol.phi): measured against recomputing them from sol.phi — relative defocus
    # the same within 0.004 nm on synthetic, abTEM and simulator series (the simulator's
    # crystal edge 0.054 → 0.033 nm), loo_waves 20 % faster (20 × 512²: 0.099 → 0.080 s)
    quad = np.empty((n, prob.band.size), np.complex64)
    quad[used] = sol.quadratic
    if (~used).any():
        quad[~used] = quadratic_term(prob.band, sol.phi, t[~used], prob.camera)
    loo = np.empty((n, prob.band.size), np.complex64)
    loo[used] = sol.loo
    loo[~used] = sol.phi
    return t, sol, quad, loo


def map_images(fn: Callable[[int], Any], items: Iterable[int]) -> list[Any]:
    """[fn(i) for i in items] on ``IMAGE_THREADS`` threads (each image's work is independent
    and deterministic: the results equal the serial loop's)."""
    items = list(items)
    threads = IMAGE_THREADS or fft_workers()
    if threads < 2 or len(items) < 2:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(on_image_thread(fn), items))


def refine_shifts(prob: Problem, ref: int, d_abs, shifts, used, prior_scale: float):
    """Every image's shift refined (grid start within ±1 px, then Newton) against its
    leave-one-out prediction at the defocus ``d_abs``, with the Wiener prior × ``prior_scale``.
    Returns (shifts with the reference's at 0, peaks)."""
    n = len(d_abs)
    t, _, quad, loo = loo_waves(prob, d_abs, shifts, used, prior_scale)

    def one(i: int) -> tuple[np.ndarray, float]:
        lin = (loo[i] * t[i] + prob.band.conj_neg(loo[i]) * prob.band.conj_neg(t[i])) * prob.camera
        y = (lin + quad[i]) * prob.mask[i]
        w = prob.inv_nps
        norm = float(np.sqrt(np.sum(w * np.abs(prob.spectra[i]) ** 2) * np.sum(w * np.abs(y) ** 2)))
        z = (prob.spectra[i] * np.conj(y) * w).astype(np.complex64, copy=False)
        start = local_grid_peak(prob.corr, z, shifts[i], SHIFT_START_HALF_PX)
        return prob.corr.refine(z, start, norm, SHIFT_NEWTON_STEPS)

    fits = map_images(one, range(n))
    new_s = np.array([f[0] for f in fits], np.float64).reshape(n, 2)
    peaks = np.array([f[1] for f in fits], np.float64)
    new_s -= new_s[ref]
    return new_s, peaks


class Strategy(Protocol):
    """What differs between a field with amorphous material and a crystal-only field, chosen
    once per registration (:class:`~.relative.AmorphousStrategy`,
    :class:`~.crystal.CrystalStrategy`; ``FocalParams.crystal`` picks one). Arrays: defocus
    (n,) nm, shifts (n, 2) px, peaks (n,), used (n,) bool."""

    def first_pass(
        self, prob: Problem, ref: int, nominal: np.ndarray, used: np.ndarray, range_nm: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Defocus, shifts and peaks before any wave exists."""

    def later_pass(
        self,
        prob: Problem,
        ref: int,
        nominal: np.ndarray,
        state: PassState,
        used: np.ndarray,
        range_nm: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One wave-based pass from ``state``: new (defocus, shifts, peaks)."""

    def flag_level(self, prob: Problem, peaks: np.ndarray, used: np.ndarray) -> float:
        """Peak height below which an image is flagged (and left out of the wave)."""

    def absolute(
        self,
        prob: Problem,
        d_abs: np.ndarray,
        shifts: np.ndarray,
        ok: np.ndarray,
        basis: np.ndarray,
        range_nm: float,
    ) -> Any:
        """The absolute correction from the restored wave (:class:`.absolute.ChiFit`)."""

    def finish(
        self,
        prob: Problem,
        ref: int,
        d_abs: np.ndarray,
        shifts: np.ndarray,
        peaks: np.ndarray,
        used: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(defocus, shifts) after the passes (final refinements, reference plane)."""

    def shifts_of_flagged(
        self, shifts: np.ndarray, used: np.ndarray, flagged: np.ndarray
    ) -> np.ndarray:
        """Shifts with those of flagged images replaced where the strategy can do better."""


class PassState:
    """The registration's current estimate, read by a later pass: defocus (n,) nm, shifts
    (n, 2) px, peaks (n,), ``passes`` done so far, ``iteration`` within this round and the
    largest defocus change of the last pass (nm; inf before the first)."""

    def __init__(
        self, d_abs, shifts, peaks, passes: int, iteration: int, last_change_nm: float = np.inf
    ):
        self.d_abs, self.shifts, self.peaks = d_abs, shifts, peaks
        self.passes, self.iteration = passes, iteration
        self.last_change_nm = last_change_nm  # the largest defocus change of the last pass
