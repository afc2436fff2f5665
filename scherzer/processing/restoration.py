"""Exit-wave restoration from a registered through-focus series.

One job: from frames, their absolute defocus and drift, restore the complex exit wave — the
linear two-sided Wiener solve on the information band (:func:`restore_exit_wave`) and the
non-linear refinement of the full coherent model (:func:`refine_nonlinear`). The band, the
transfer, frame spectra, camera curves and the 2×2 Wiener solve itself are the shared kernel
of :mod:`scherzer.processing.spectral`; the PNGs are in :mod:`scherzer.processing.plots`.

Units and conventions
---------------------
* Numerics in Å and 1/Å (via :mod:`scherzer.optics`); boundary names carry nm / px.
* Images are normalised to mean 1 (vacuum intensity). The restored exit wave ψ = c + φ(r) is
  complex64 with φ(g=0) = 0 and c chosen so that ⟨|ψ|²⟩ = 1.
* The linear imaging model and the shift convention are those of
  :mod:`scherzer.processing.spectral` (ARCHITECTURE.md: frame_n(r) ≈ ref(r − s_n)).
* Non-linear refinement minimises Σ_n w_n ‖C ⊛ |F⁻¹[ψ̂ T_n]|² − I_n‖² (the full coherent model of
  :func:`scherzer.optics.image_intensity`, quasi-coherent envelopes) by Polak–Ribière conjugate
  gradients with an exact line search (the loss is a quartic along any direction).
* Settings: :class:`RestoreParams` (typed; validated by pydantic at the edge, unknown keys
  rejected); the per-image ``dose_weights`` are data, an argument, not a setting.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydantic
import scipy.fft as sfft

from scherzer.optics import (
    FrequencyGrid,
    Optics,
    fft_workers,
    focal_spread_nodes,
    vibration_envelope,
    wave_transfer,
)
from scherzer.processing.spectral import (
    BandTransfer,
    CameraCurve,
    SpectralBand,
    camera_curve_to_grid,
    crop_area,
    frame_spectra,
    information_band,
    normalise_frames,
    shift_phase,
)
from scherzer.processing.wiener import quadratic_term, solve_series
from scherzer.workers import one_blas_thread

__all__ = [
    "RestorationResult",
    "RestoreParams",
    "aligned_frames",
    "nonlinear_power_ratio",
    "out_of_band_noise",
    "refine_nonlinear",
    "restore_exit_wave",
]

AREA_TAPER_PX = 8  # edge taper of a restored area (a crop is not periodic); the full field: 0
QUADRATIC_CORRECTIONS = 1  # rounds subtracting the predicted |φ_img|² before the linear solve
# The quadratic term is averaged over the focal spread incoherently (Gauss–Hermite nodes): a
# lens's focal spread is incoherent, and the quasi-coherent envelope E_t(g)E_t(g') — exact for
# the linear term — damps the interference of two scattered beams far too much (for g ≈ g' it
# is ≈ 1, not E_t(g)²). abTEM series (true parameters, phase correlation with the true wave):
# 8-cell edge 11 × 512² 0.576 → 0.729, 11 × 256² 0.684 → 0.718, 4-cell 20 × 512² 0.799 → 0.802.
FOCAL_SPREAD_NODES = 3  # 3 / 5 / 7 nodes: 6.4 / 1.5 / 0.3 % rms error of a strong object's
# quadratic term (σ_f 4 nm; test_restoration; quasi-coherent: 22 %), abTEM 8-cell phase
# correlation 0.729 / 0.730 / 0.731; each node costs one quadratic term (20 × 512²: ≈ 0.065 s
# CPU), so 3: the default restoration must stay fast (CLI goal 20 × 512² ≤ 3 s)
# the restoration's Wiener prior floor, × the noise variance. Measured, 9 × 256² weak-phase film,
# phase error at 500 / 100 e/Å²: 0.0349 / 0.0729 rad with 0.05, 0.0237 / 0.0385 with 0; with
# vibration 0.03 nm in the data and given 0.0956 → 0.0308 rad (0.0390 not given: the floor × the
# noise deconvolved by the vibration envelope lets noise through at high frequencies). But below
# 0.05 the restored noise no longer falls as √N and a noise-free series is restored less exactly
# (test_restoration's two tests), so 0.05 stays until the prior is rethought (issue #15 notes).
RESTORE_PRIOR_FLOOR = 0.05
MIN_WAVE_CONSTANT = 0.05  # floor of c² in ψ = c + φ (⟨|ψ|²⟩ = 1 cannot be met by a strong φ)
# The automatic non-linear refinement (RestoreParams.iterations None): it runs when the
# non-linear interference term the linear solution predicts, |F⁻¹[φ T_n]|² on the band, carries
# at least NONLINEAR_MIN_POWER_RATIO × the noise power of an image (median over images; both
# per band element, NPS-weighted): then the linear model leaves a systematic residual the
# refinement can fit. Below it the term is buried in the noise and the refinement cannot gain.
NONLINEAR_MIN_POWER_RATIO = 1.0
MIN_OUT_OF_BAND_FRACTION = 0.05  # the decision's noise is measured outside the information
# band when at least this fraction of the grid lies there (else from the fit residual)
NONLINEAR_AUTO_ITERATIONS = 5  # steps of the automatic refinement (on the abTEM series the
# image-prediction residual changes by < 0.1 % per step after about five)


@dataclass
class RestoreParams:
    """Settings of :func:`restore_exit_wave` (typed; built once at the edge).

    ``iterations``: non-linear refinement steps after the Wiener start (0: linear only; None:
    :data:`NONLINEAR_AUTO_ITERATIONS` when the non-linear term the linear solution predicts
    exceeds the noise, see :data:`NONLINEAR_MIN_POWER_RATIO`, else none).
    ``area``: (y0, x0, h, w) px in the reference frame restricting the restored field (None:
    the full field). ``exclude``: frame indices left out (besides those the registration did
    not use). ``corrections``: rounds of subtracting the predicted quadratic term |φ_img|²
    before the linear solve (strong objects). ``taper_px``: edge taper of the restored frames
    (None: ``AREA_TAPER_PX`` for an area, none for the full periodic field).
    """

    __pydantic_config__ = pydantic.ConfigDict(extra="forbid")

    iterations: int | None = None
    area: tuple[int, int, int, int] | None = None
    exclude: tuple[int, ...] = ()
    corrections: int = QUADRATIC_CORRECTIONS
    taper_px: int | None = None


# --------------------------------------------------------------------------------------------
# restoration
# --------------------------------------------------------------------------------------------
@dataclass
class RestorationResult:
    """A restored exit wave and how it was obtained.

    ``wave`` complex64 (y, x): the wave at the plane the absolute ``defocus_nm`` refers to,
    with all aberrations of the model corrected. With a registration from
    :func:`scherzer.processing.focal.register_focal_series` that is the specimen's exit
    surface (given ``FocalParams.thickness_nm`` for amorphous films, or in crystal mode), else
    the plane of minimum amplitude contrast (an amorphous film's mid-plane).
    ``noise_sigma`` per image (relative noise level of the normalised image spectra).
    ``params["nonlinear"]``: whether the refinement ran, the steps, the non-linear power ratio
    of the decision and the reason.
    """

    wave: np.ndarray
    defocus_nm: np.ndarray
    used: np.ndarray
    noise_sigma: np.ndarray
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)
    loss_history: list[float] = field(default_factory=list)
    residual_history: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON summary: settings, per-image noise, and per non-linear iteration the loss
        and the image-prediction residual (RMS of predicted − measured intensity over the used
        images, vacuum intensity 1; first entry: the linear start)."""
        return {
            "seconds": float(self.seconds),
            "params": self.params,
            "used": [bool(u) for u in self.used],
            "noise_sigma": [None if not np.isfinite(v) else float(v) for v in self.noise_sigma],
            "loss_history": [float(v) for v in self.loss_history],
            "residual_history": [float(v) for v in self.residual_history],
        }

    @property
    def phase(self) -> np.ndarray:
        return np.angle(self.wave).astype(np.float32)

    @property
    def amplitude(self) -> np.ndarray:
        return np.abs(self.wave).astype(np.float32)


def _camera_factor(
    optics: Optics, grid: FrequencyGrid, mtf: CameraCurve, nps: CameraCurve
) -> tuple[np.ndarray, np.ndarray]:
    c = camera_curve_to_grid(mtf, grid.shape, "mtf") * vibration_envelope(optics, grid)
    n = camera_curve_to_grid(nps, grid.shape, "nps")
    n = n / max(float(n.mean()), 1e-30)
    if np.any(n <= 0):
        raise ValueError("nps: the noise power spectrum must be positive everywhere")
    return c.astype(np.float32), n.astype(np.float32)


def _validate_series(frames, defocus_nm, shifts_px, used) -> tuple[np.ndarray, ...]:
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"frames must be (n, y, x); got shape {frames.shape}")
    n = frames.shape[0]
    d = np.asarray(defocus_nm, dtype=np.float64).reshape(-1)
    if d.size != n or not np.all(np.isfinite(d)):
        raise ValueError(f"defocus_nm must hold {n} finite values (one per frame); got {d}")
    s = np.zeros((n, 2)) if shifts_px is None else np.asarray(shifts_px, dtype=np.float64)
    if s.shape != (n, 2) or not np.all(np.isfinite(s)):
        raise ValueError(f"shifts_px must be ({n}, 2) finite (dy, dx); got shape {s.shape}")
    u = np.ones(n, bool) if used is None else np.asarray(used, dtype=bool).reshape(-1)
    if u.size != n:
        raise ValueError(f"used must have {n} entries; got {u.size}")
    if u.sum() < 2:
        raise ValueError(
            f"exit-wave restoration needs at least 2 usable images; got {int(u.sum())} "
            "(check excluded and flagged images)"
        )
    return frames, d, s, u


def aligned_frames(frames: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """Mean-normalised frames moved by −s_n (Fourier shift, periodic), float32."""
    f = normalise_frames(frames)
    grid_band = SpectralBand.from_mask(np.ones(f.shape[-2:], bool))
    spec = sfft.fft2(f.astype(np.complex64), workers=fft_workers())
    ph = grid_band.scatter(shift_phase(grid_band, shifts_px))
    out = sfft.ifft2(spec * ph, workers=fft_workers(), overwrite_x=True).real
    return out.astype(np.float32)


@one_blas_thread
def restore_exit_wave(
    frames: np.ndarray,
    optics: Optics,
    pixel_nm: float | tuple[float, float],
    defocus_nm: np.ndarray,
    shifts_px: np.ndarray | None,
    params: RestoreParams | None = None,
    *,
    used: np.ndarray | None = None,
    mtf: CameraCurve = None,
    nps: CameraCurve = None,
    dose_weights: np.ndarray | None = None,
    astigmatism: tuple[float, float] = (0.0, 0.0),
    area: tuple[int, int, int, int] | None = None,
    iterations: int | None = None,
    taper_px: int | None = None,
    corrections: int | None = None,
) -> RestorationResult:
    """Restore the complex exit wave from a registered focal series.

    ``defocus_nm`` (n,) absolute C1 per image (negative = underfocus); ``shifts_px`` (n, 2) in the
    ARCHITECTURE.md convention; ``params`` the settings (:class:`RestoreParams`; or, the older
    form, its fields ``area``, ``iterations``, ``taper_px``, ``corrections`` as keywords — not
    both); ``used`` (n,) bool selects images (excluded/flagged ones False; ``params.exclude``
    removes more); ``mtf``/``nps``: see :func:`camera_curve_to_grid`; ``dose_weights`` (n,)
    relative doses (noise variance ∝ 1/dose), otherwise each image's noise is measured from its
    fit residual; ``astigmatism`` = (|A1| nm, angle deg, φ = atan2(k_y, k_x)) added to the optics.
    """
    t0 = time.perf_counter()
    kw = {"area": area, "iterations": iterations, "taper_px": taper_px, "corrections": corrections}
    p = _restore_params(params, kw)
    frames, d, s, u = _validate_series(frames, defocus_nm, shifts_px, _used(used, p, len(frames)))
    py, px = (pixel_nm, pixel_nm) if np.isscalar(pixel_nm) else tuple(pixel_nm)
    opt = optics.with_(a1_nm=float(astigmatism[0]), a1_deg=float(astigmatism[1]))
    fu = frames[u]
    data, spectra_full, s_used = _area_spectra(fu, s[u], p)
    grid = FrequencyGrid(spectra_full.shape[-2:], (float(py), float(px)))
    cam, nps_grid = _camera_factor(opt, grid, mtf, nps)
    band = information_band(opt, grid, d[u], cam)
    bt = BandTransfer(opt, grid, band)
    cam_b, nps_b = band.gather(cam), band.gather(nps_grid)
    spectra = band.gather(spectra_full) * shift_phase(band, s_used)
    dw = None if dose_weights is None else np.asarray(dose_weights, np.float64)[u]
    quad_t = focal_spread_transfers(opt, grid, band, d[u]) if p.corrections > 0 else None
    sol = solve_series(
        spectra, bt.transfer(d[u]), band, camera=cam_b, nps_band=nps_b, dose_weights=dw,
        corrections=p.corrections, prior_floor=RESTORE_PRIOR_FLOOR, quadratic_transfers=quad_t,
    )  # fmt: skip
    wave = wave_from_band(band, sol.phi)
    losses: list[float] = []
    residuals: list[float] = []
    # the noise outside the band is the images' noise only with their NPS: a real camera's
    # noise falls with frequency (without the NPS the fit residual's σ² is used)
    auto = p.iterations is None and nps is not None
    noise = out_of_band_noise(spectra_full, band, nps_grid) if auto else None
    t_used = lambda: bt.transfer(d[u])  # noqa: E731 - only when the decision needs it
    decision = _nonlinear_decision(p.iterations, sol, band, t_used, cam_b, nps_b, noise)
    if decision["iterations"] > 0:
        images = normalise_frames(aligned_frames(fu, s_used) if data is None else data)
        weights = grid.shape[0] * grid.shape[1] / (2.0 * sol.sigma2)
        wave, losses = refine_nonlinear(
            wave, images, opt, grid, d[u], weights, cam, decision["iterations"],
            prior_weight=prior_weight_grid(band, sol.prior), residuals=residuals,
        )  # fmt: skip
    sig = np.full(len(d), np.nan)
    sig[u] = np.sqrt(sol.sigma2 / band.size)
    record = _record(opt, (float(py), float(px)), p, band.size, mtf is not None, nps is not None)
    record["iterations"] = decision["iterations"]
    record["nonlinear"] = decision
    return RestorationResult(
        wave=wave, defocus_nm=d, used=u, noise_sigma=sig, seconds=time.perf_counter() - t0,
        params=record, loss_history=losses, residual_history=residuals,
    )  # fmt: skip


def focal_spread_transfers(
    optics: Optics, grid: FrequencyGrid, band: SpectralBand, defocus_nm: np.ndarray
) -> list[tuple[float, np.ndarray]] | None:
    """[(w_j, T_n at C1 + x_j σ_f without the temporal envelope)] on the band: the incoherent
    focal-spread average of the quadratic term by :data:`FOCAL_SPREAD_NODES` Gauss–Hermite
    nodes x_j (σ_f the focal-spread standard deviation; weights sum to 1). None without a
    focal spread (the quasi-coherent term is then exact)."""
    sigma = float(optics.focal_spread_nm)
    if sigma <= 0:
        return None
    offsets, w = focal_spread_nodes(sigma, FOCAL_SPREAD_NODES)
    coherent = BandTransfer(optics.with_(focal_spread_nm=0.0), grid, band)
    d = np.asarray(defocus_nm, np.float64)
    return [(float(wj), coherent.transfer(d + dj)) for dj, wj in zip(offsets, w, strict=True)]


def nonlinear_power_ratio(
    sol, band: SpectralBand, t, camera, nps_band, noise: np.ndarray | None = None
) -> float:
    """Median over images of ⟨|Q_n(g)|²/NPS(g)⟩ / σ_n²: the power of the non-linear term
    Q_n = C·F[|F⁻¹[φ T_n]|²] the linear solution ``sol`` predicts, over the image's noise
    power (both per band element, NPS-normalised). ``t``: the transfers (n, m), or a callable
    giving them (called only when ``sol`` holds no quadratic term).

    ``noise`` (n,): σ_n² measured where the images carry no signal (:func:`out_of_band_noise`;
    the restoration measures it so when the NPS is given: the noise of a camera whose NPS is
    not given may fall with frequency); without it, the fit residual's σ_n² of ``sol`` —
    which holds whatever part of the non-linear term the solve did not model, so the ratio is
    then a lower bound. Reuses the term of the last quadratic correction when the solve made
    one (from the previous φ)."""
    q = sol.quadratic
    if not np.any(q):
        q = quadratic_term(band, sol.phi, t() if callable(t) else t, camera)
    power = np.mean((q.real**2 + q.imag**2) / nps_band, axis=1)
    sigma2 = sol.sigma2 if noise is None else noise
    return float(np.median(power / np.maximum(sigma2, 1e-30)))


def out_of_band_noise(
    spectra: np.ndarray, band: SpectralBand, nps_grid: np.ndarray
) -> np.ndarray | None:
    """σ_n² per image (n,) from the frequencies outside the information band (and g ≠ 0),
    where the image spectra (n, y, x) hold noise only: mean |I_n(g)|²/NPS(g) there, the units
    of :func:`scherzer.processing.wiener.noise_variances`. None when fewer than
    :data:`MIN_OUT_OF_BAND_FRACTION` of the grid lies outside the band."""
    outside = np.ones(band.shape[0] * band.shape[1], bool)
    outside[band.idx] = False
    outside[0] = False
    if outside.sum() < MIN_OUT_OF_BAND_FRACTION * outside.size:
        return None
    flat = spectra.reshape(spectra.shape[0], -1)[:, outside]
    w = (1.0 / nps_grid.reshape(-1)[outside]).astype(np.float32)
    return np.mean((flat.real**2 + flat.imag**2) * w, axis=1, dtype=np.float64)


def _nonlinear_decision(iterations: int | None, sol, band, t, camera, nps_band, noise) -> dict:
    """The refinement steps to take and why (JSON-ready; module constants)."""
    if iterations is not None:
        why = "given" if iterations > 0 else "linear only (iterations 0)"
        return {"iterations": int(iterations), "automatic": False, "reason": why}
    ratio = nonlinear_power_ratio(sol, band, t, camera, nps_band, noise)
    run = ratio >= NONLINEAR_MIN_POWER_RATIO
    reason = (
        f"non-linear term {ratio:.3g} × the noise power per image "
        f"({'≥' if run else '<'} {NONLINEAR_MIN_POWER_RATIO:g}): "
        + ("refined" if run else "buried in the noise, linear result kept")
    )
    return {
        "iterations": NONLINEAR_AUTO_ITERATIONS if run else 0,
        "automatic": True,
        "power_ratio": ratio,
        "reason": reason,
    }


def _area_spectra(fu: np.ndarray, s_u: np.ndarray, p: RestoreParams):
    """(data, spectra, shifts still to apply) of the used frames: for an area the frames are
    aligned first, cropped and tapered (data = the crop, shifts 0); else the full periodic
    frames' spectra (data None, shifts ``s_u``)."""
    if p.area is not None:
        data = crop_area(aligned_frames(fu, s_u), p.area)
        taper = AREA_TAPER_PX if p.taper_px is None else p.taper_px
        return data, frame_spectra(data, taper), np.zeros((fu.shape[0], 2))
    return None, frame_spectra(fu, p.taper_px or 0), s_u


def _restore_params(params: RestoreParams | None, keywords: dict[str, Any]) -> RestoreParams:
    """``params``, or one built from the keyword form (None = the default); not both."""
    given = {k: v for k, v in keywords.items() if v is not None}
    if params is None:
        return RestoreParams(**given)
    if given:
        raise TypeError(f"restore_exit_wave: give RestoreParams or {sorted(given)}, not both")
    return params


def _used(used: np.ndarray | None, p: RestoreParams, n: int) -> np.ndarray | None:
    """``used`` with ``p.exclude`` removed (None when neither says anything)."""
    if not p.exclude:
        return used
    out = np.ones(n, bool) if used is None else np.asarray(used, dtype=bool).reshape(-1).copy()
    for i in p.exclude:
        if not 0 <= int(i) < out.size:
            raise ValueError(f"exclude index {i} out of range 0..{out.size - 1}")
        out[int(i)] = False
    return out


def _record(opt: Optics, pixel_nm, p: RestoreParams, band_size: int, mtf: bool, nps: bool):
    """The parameters a :class:`RestorationResult` records (JSON-ready)."""
    return {
        "voltage_kv": opt.voltage_kv,
        "cs_mm": opt.cs_mm,
        "focal_spread_nm": opt.focal_spread_nm,
        "beam_divergence_mrad": opt.beam_divergence_mrad,
        "a1_nm": opt.a1_nm,
        "a1_deg": opt.a1_deg,
        "pixel_nm": list(pixel_nm),
        "area": list(p.area) if p.area is not None else None,
        "iterations": p.iterations,
        "band_size": band_size,
        "corrections": int(p.corrections),
        "mtf": mtf,
        "nps": nps,
    }


def prior_weight_grid(band: SpectralBand, prior: np.ndarray) -> np.ndarray:
    """ρ(g) = 1/S(g) on the band, max(ρ) outside it, 0 at g = 0 (full grid, float32)."""
    rho = (1.0 / prior).astype(np.float32)
    out = np.full(band.shape[0] * band.shape[1], rho.max(), dtype=np.float32)
    out[band.idx] = rho
    out[0] = 0.0
    return out.reshape(band.shape)


def wave_from_band(band: SpectralBand, phi: np.ndarray) -> np.ndarray:
    """ψ(r) = c + F⁻¹[φ] with c > 0 chosen so that ⟨|ψ|²⟩ = 1 (complex64)."""
    scattered = sfft.ifft2(band.scatter(phi.astype(np.complex64)), workers=fft_workers())
    p = float(np.mean(np.abs(scattered) ** 2))
    c = math.sqrt(max(1.0 - p, MIN_WAVE_CONSTANT))
    return (scattered + np.complex64(c)).astype(np.complex64)


# --------------------------------------------------------------------------------------------
# non-linear refinement
# --------------------------------------------------------------------------------------------
def _apply_camera(x: np.ndarray, cam_r: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if cam_r is None:
        return x
    spec = sfft.rfft2(x, workers=fft_workers()) * cam_r
    return sfft.irfft2(spec, s=shape, workers=fft_workers()).astype(np.float32)


def _residual(r: np.ndarray, out: list[float] | None) -> None:
    """Append the RMS of the prediction residual ``r`` (all images and pixels) to ``out``."""
    if out is not None:
        out.append(float(np.sqrt(np.mean(np.square(r, dtype=np.float64)))))


def _best_step(coef: np.ndarray) -> float:
    """Minimiser of the quartic c0 + c1 t + c2 t² + c3 t³ + c4 t⁴ over real t."""
    c0, c1, c2, c3, c4 = coef
    roots = np.roots([4 * c4, 3 * c3, 2 * c2, c1])
    real = roots[np.abs(roots.imag) < 1e-9 * (1 + np.abs(roots.real))].real
    if real.size == 0:
        return 0.0
    vals = c0 + c1 * real + c2 * real**2 + c3 * real**3 + c4 * real**4
    return float(real[np.argmin(vals)])


def _prior_terms(rho: np.ndarray, psi: np.ndarray, d: np.ndarray) -> tuple[float, float, float]:
    """Coefficients (t⁰, t¹, t²) of Σ ρ |ψ̂ + t d|² along the direction d."""
    return (
        float(np.sum(rho * np.abs(psi) ** 2)),
        float(2.0 * np.sum(rho * (np.conj(psi) * d).real)),
        float(np.sum(rho * np.abs(d) ** 2)),
    )


def _quartic(w: np.ndarray, r: np.ndarray, a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """Coefficients (t⁰ … t⁴) of Σ w (r + t a1 + t² a2)², the data loss along a direction."""
    return np.array(
        [
            np.sum(w * r * r),
            2 * np.sum(w * r * a1),
            np.sum(w * (a1 * a1 + 2 * r * a2)),
            2 * np.sum(w * a1 * a2),
            np.sum(w * a2 * a2),
        ],
        dtype=np.float64,
    )


def refine_nonlinear(
    wave: np.ndarray,
    images: np.ndarray,
    optics: Optics,
    grid: FrequencyGrid,
    defocus_nm: np.ndarray,
    weights: np.ndarray,
    camera: np.ndarray | None,
    iterations: int,
    prior_weight: np.ndarray | None = None,
    residuals: list[float] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Minimise Σ_n w_n ‖C ⊛ |F⁻¹[ψ̂ T_n]|² − I_n‖² + Σ_g ρ(g)|ψ̂(g)|² from ``wave``.

    ``images`` are aligned, mean-normalised (n, y, x); ``weights`` w_n (n,) are inverse noise
    variances per pixel (×½); ``prior_weight`` ρ (full grid) is the Wiener prior 1/S(g), which
    keeps the refinement from fitting noise. Polak–Ribière conjugate gradients with an exact
    line search. Returns the refined wave (complex64) and the loss before each step and at the
    end; ``residuals``, when given, receives the image-prediction residual at the same points
    (RMS of predicted − measured intensity over all images and pixels).
    """
    workers = fft_workers()
    shape = grid.shape
    t = wave_transfer(optics, grid, np.asarray(defocus_nm, np.float64))
    cam_r = None
    if camera is not None and not np.allclose(camera, 1.0):
        cam_r = camera[:, : shape[1] // 2 + 1].astype(np.float32)
    npix = shape[0] * shape[1]
    w = np.asarray(weights, np.float32)[:, None, None]
    rho = np.zeros(shape, np.float32) if prior_weight is None else prior_weight
    psi = sfft.fft2(wave.astype(np.complex64), workers=workers)
    u = sfft.ifft2(psi[None] * t, workers=workers)
    d_prev = g_prev = None
    losses: list[float] = []
    for _ in range(iterations):
        r = _apply_camera(np.abs(u) ** 2, cam_r, shape) - images
        losses.append(float(np.sum(w * r * r)) + _prior_terms(rho, psi, psi * 0)[0])
        _residual(r, residuals)
        back = _apply_camera((2.0 / npix) * w * r, cam_r, shape) * u
        grad = np.sum(np.conj(t) * sfft.fft2(back, workers=workers, overwrite_x=True), axis=0)
        grad = grad + rho * psi
        if d_prev is None:
            d = -grad
        else:
            beta = max(0.0, float(np.vdot(grad, grad - g_prev).real / np.vdot(g_prev, g_prev).real))
            d = -grad + beta * d_prev
        v = sfft.ifft2(d[None] * t, workers=workers)
        a1 = _apply_camera(2.0 * (u.real * v.real + u.imag * v.imag), cam_r, shape)
        a2 = _apply_camera(np.abs(v) ** 2, cam_r, shape)
        coef = _quartic(w, r, a1, a2)
        coef[:3] += _prior_terms(rho, psi, d)
        step = _best_step(coef)
        psi = psi + np.complex64(step) * d
        u = u + np.complex64(step) * v
        d_prev, g_prev = d, grad
    r = _apply_camera(np.abs(u) ** 2, cam_r, shape) - images
    losses.append(float(np.sum(w * r * r)) + _prior_terms(rho, psi, psi * 0)[0])
    _residual(r, residuals)
    out = sfft.ifft2(psi, workers=workers).astype(np.complex64)
    return out, losses
