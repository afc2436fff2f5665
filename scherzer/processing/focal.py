"""Focal-series registration: per-image defocus and drift, absolute defocus and astigmatism.

Units and conventions
---------------------
* Numerics in Å / 1/Å through :mod:`scherzer.optics`; boundary names carry nm, px, deg.
  Defocus C1 < 0 is underfocus. ``relative_defocus_nm[i] = defocus_nm[i] − defocus_nm[ref]``.
* Shifts (ARCHITECTURE.md): ``shifts_px[i] = (dy, dx)`` is where frame i's content sits relative
  to the reference: frame_i(r) ≈ ref(r − s_i). The reference has (0, 0).
* Two-fold astigmatism A1 enters χ as π λ |A1| k² cos 2(φ − φ_A1) with the azimuth
  φ = atan2(k_y, k_x) of :mod:`scherzer.optics`: measured from the +x (column) axis towards the
  +y (row) axis, i.e. clockwise on screen when row 0 is at the top. ``astigmatism_deg`` is φ_A1
  in [0, 180).

Method
------
1. First pass (no wave yet): for each image n and trial defocus difference Δ, the reference and
   image spectra are compared through the weak-phase transfer, Z = S_n S_r* s_r s_n(Δ) / |S_n S_r|^α
   (s = sin χ · envelopes); the correlation peak over shifts is maximised over Δ. Images are
   taken outwards from the reference, each search centred on the defocus predicted from the
   step fitted so far (so a real step differing from the nominal one is followed).
2. Later passes: the wave is restored from all other images (leave-one-out 2×2 Wiener solve,
   :mod:`scherzer.processing.restoration`), image n is predicted from it at trial defoci, and the
   regularised correlation Z = S_n Y_n(Δ)* / |S_n Y_n(Δ)|^α is maximised over Δ and shift.
   Coarse Δ trials use batched FFTs of a cropped spectrum box; the fine search optimises Δ by
   Brent's method with the shift refined by Newton steps on the band (no FFTs).
   Peak height = the normalised correlation coefficient Re Σ X Y* e^{2πi g·s} / (‖X‖‖Y‖) ∈
   [−1, 1] of the (whitened) band spectra; below ``peak_threshold``, or below 5/√m (5σ of
   the correlation of pure noise over the m band frequencies), an image is flagged and left
   out of the wave. Passes repeat until Δ and shifts settle.
3. Absolute defocus and A1 from the restored wave: for a weak-phase object ψ = 1 + iP the
   product p(g) = φ(g) φ(−g) has phase π − 2Δχ(g), Δχ being the χ error of the model; we
   maximise Re Σ −p/|p| e^{2iΔχ} over C1 and A1 (this is minimum amplitude contrast written
   over all annuli and sectors at once). Alternatively (crystal-only fields) the defocus at which
   CTF-corrected images agree best in Fourier phase, per angular sector (QFocus-like).
4. Crystal-only fields (``FocalParams(crystal=True)``): drift chained image to image with a
   sign-free (squared) correlation and a smooth-drift window; one step scale for the series
   fitted on the Bragg spots (a crystal fixes each image's defocus poorly, a fixed step
   well); the absolute defocus from ψ − 1 = c·R(r) with R real and one complex c (the
   channelling picture: amplitude contrast allowed, in a fixed ratio to the phase contrast),
   A1 from rings of equal |g|.

Non-periodic fields
-------------------
Real images (and the simulator's crops of a larger specimen) are not periodic: content moves
in from outside the field as the delocalisation changes with defocus, and a crystal's strong
Bragg spots, whose dynamical model is the least exact, dominate a plain cross-correlation.
:meth:`FocalParams.for_field` detects such a field by its wrap-around edge jump
(:func:`edge_discontinuity`) and then tapers a tenth of the field, clips and half-whitens the
spots in the defocus search (shift and peak stay on the plain spectra), and on fields under
384 px drops the delocalisation limit. Periodic (synthetic) fields keep the plain settings.

Reference plane of the absolute defocus
---------------------------------------
``defocus_nm`` refers to the specimen's **exit surface**: the exit wave is defined there, the
restoration returns it, and the simulator's ground truth uses it. The weak-phase criterion of
step 3 finds the plane where the wave is most nearly a pure phase object; for an amorphous
film that is its mid-plane (the projection approximation holds there), t/2 upstream — measured
+0.87 nm for a 2 nm a-C film and +2.8 nm for 6 nm. Give ``FocalParams(thickness_nm=t)`` to move
the estimate to the exit surface; without it the mid-plane is reported. The crystal criterion
of step 4 locates the exit surface directly (channelling states are formed there); measured
within 0.8 nm for SrTiO3 [001] 1 nm and Si [110] 2–4 nm, but 4 nm off for SrTiO3 4 nm (its
Sr, TiO and O columns have different c: the one-c model fails for thick, mixed columns).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft as sfft
from scipy.optimize import minimize, minimize_scalar

from scherzer.optics import (
    FrequencyGrid,
    Optics,
    chi,
    chi_gradient_sq,
    fft_workers,
    vibration_envelope,
)
from scherzer.processing.restoration import (
    BandTransfer,
    RestorationResult,
    SpectralBand,
    camera_curve_to_grid,
    crop_area,
    frame_spectra,
    information_band,
    linear_prediction,
    pair_noise_covariance,
    plot_wave,
    quadratic_term,
    restore_exit_wave,
    shift_phase,
    solve_series,
)
from scherzer.stack import ImageStack

__all__ = [
    "FocalParams",
    "FocalRegistration",
    "StructureImageResult",
    "camera_offset_counts",
    "instrument_from_stack",
    "intensity_frames",
    "plot_registration",
    "plot_wave",
    "register_focal_series",
    "restore_exit_wave",
    "restore_stack",
    "structure_image",
]

MIN_IMAGES = 3
MIN_TAPER_PX = 12
TAPER_FIELD_DIVISOR = 10  # automatic edge taper of a non-periodic field: a tenth of the field
# … on fields at least this wide (the simulator's 256² crystal edge with reference 8: a 25-px
# taper let image 9 jump by 2 px; 12 px did not)
WIDE_TAPER_MIN_FIELD_PX = 384
NONPERIODIC_EDGE_RATIO = 1.05  # edge_discontinuity above this: content enters from outside
WAVE_SPOT_CLIP = 1.5  # automatic clip_spots_wave of a non-periodic field
WAVE_WHITEN = 0.5  # automatic whiten of a non-periodic field


def edge_discontinuity(frames: np.ndarray) -> float:
    """Mean |jump| across the periodic wrap (first vs last row/column) over the mean |step|
    between neighbouring pixels, of mean-normalised frames (n, y, x). ≈ 1 for a periodic
    field (also when noise dominates); measured 1.23–1.40 for the simulator's 256²–512²
    crystal edge (a crop of a larger specimen), 1.00–1.02 for periodic synthetic series."""
    f = np.asarray(frames, np.float32)
    f = f / np.maximum(f.mean(axis=(-2, -1), keepdims=True), 1e-30)
    wrap = np.mean(np.abs(f[..., 0] - f[..., -1])) + np.mean(np.abs(f[..., 0, :] - f[..., -1, :]))
    step = np.mean(np.abs(np.diff(f, axis=-1))) + np.mean(np.abs(np.diff(f, axis=-2)))
    return float(wrap / max(step, 1e-30))


# --------------------------------------------------------------------------------------------
# parameters and results
# --------------------------------------------------------------------------------------------
@dataclass
class FocalParams:
    """Registration settings.

    ``reference``: frame index (None = the image nearest extended Scherzer defocus).
    ``search_range_nm``: ± search around each image's predicted defocus (default
    0.3·|step| + 1 nm: steps a few % off the nominal are followed, and a neighbour can never be
    mistaken for an image at the reference's own defocus). ``iterations``: maximum wave-based
    passes after the first.
    ``exclude``: frame indices left out. ``area``: (y0, x0, h, w) px registered (and restored).
    ``whiten``: spectra are divided by |S|^whiten before correlating with the predictions
    (0 = cross-correlation, the maximum-likelihood choice for white noise; 1 = phase
    correlation); ``whiten_first`` the same for the reference-only match of the first pass
    (e.g. ½ keeps strong Bragg spots from dominating it); ``clip_spots``: in that match
    |S| is limited to this multiple of its radial mean (0 = off), which stops a crystal's
    Bragg spots from locking it onto a lattice-translated or contrast-reversed solution.
    ``taper_px``: raised-cosine edge taper of the registered frames (None: automatic, see
    :meth:`for_field`). ``clip_spots_wave`` (None: automatic): in the wave passes' Δ search the
    image and its prediction are weighted so that |S| ≤ this × its radial mean (Bragg spots,
    whose dynamical model error otherwise dominates the fitted defocus); the shift and peak
    are then refined on the plain spectra (``whiten_shift``). ``whiten`` None: automatic
    (:meth:`for_field`). Measured on the simulator's crystal edge (11 × 512², 500 e/Å²):
    relative defocus 0.29 → 0.10 nm RMS with the automatic taper, clipping and whitening
    (a wider taper alone: no gain; clipping alone: worse, a step-scale trend).
    ``max_drift_px``: the first pass looks for each image's shift within this radius of the
    drift line extrapolated from the images registered before it (larger drifts: raise it).
    ``small_field_delocalisation``: keep ``max_delocalisation`` on a non-periodic field
    narrower than ``WIDE_TAPER_MIN_FIELD_PX`` (by default such a field drops it, see
    :meth:`for_field`).
    ``max_delocalisation``: frequencies whose delocalisation |∇χ|/2π exceeds this fraction of
    the field in any image are not used (None: all).
    ``absolute``: "wave" (weak-phase relation on the restored wave), "phase_agreement"
    (QFocus-like, crystal-only fields) or "none". ``absolute_range_nm``: ± search of the
    absolute defocus around the nominal one. ``fit_astigmatism``: fit A1 with the defocus.
    ``pure_phase_refinement``: refine the absolute defocus by minimum amplitude variance of the
    full (not linearised) wave after the weak-phase fit — right for strong pure-phase objects
    (thin films, light atoms); off by default because for thick crystals with dynamical
    amplitude contrast it moves the estimate away from the exit surface (seen: +1.3 nm).
    ``crystal``: a crystal-only field (no amorphous area). The first pass then takes the nominal
    step and measures drift image-to-image (each image against the previous one, on the low
    frequencies where one step changes χ by < π/4, the peak nearest the drift so far: the
    lattice makes the correlation periodic, so the drift between neighbours must stay below
    half a lattice period); later passes refine Δ and shift locally (no wide search, which
    could jump by a lattice vector). The absolute defocus assumes ψ − 1 = c·R(r), R real, one
    complex c (the channelling picture of a thin crystal at its exit surface: amplitude and
    phase contrast in a fixed ratio) instead of a weak-phase object, with 3 rounds of the
    quadratic-term correction in the restoration, on the band all images keep (see
    :func:`fit_defocus_astigmatism_wave`). Images with almost no lattice contrast are flagged
    (:func:`_flag_level`) and get the drift line's shift. Not automatic: a crystal edge under
    amorphous film has as much power in its spots as a crystal-only field, so choose it.
    ``per_image_delocalisation`` (None: automatic, see :meth:`resolved`): the
    ``max_delocalisation`` limit leaves a frequency out only for the images that delocalise it
    beyond the limit, and the band keeps frequencies that ≥ ``DELOC_MIN_FRACTION`` of the
    images keep (False: out for all images, the band of the worst image).
    ``prior_scale`` (None: automatic): the Wiener prior of the waves that predict images
    during registration is this many times weaker than the restoration's (see
    :func:`scherzer.processing.restoration.solve_series`; 1 = the restoration's).
    ``shift_prior_scale`` (None: off): after the passes, every shift is refined once more
    (Newton, at the fitted defocus, noise-weighted by the camera NPS when given) against a
    leave-one-out prediction with the restoration's Wiener prior × this — less noisy than the
    registration's weak-prior prediction (measured: synthetic weak-phase film, 11 × 512², 100
    e/Å², drift 0.048/0.052 → 0.046/0.039 px for two seeds; the simulator's crystal edge with
    its NPS unchanged within 0.003 px). Not in crystal mode (its passes already do this).
    ``thickness_nm``: specimen thickness, if known. The reported absolute defocus refers to the
    **exit surface** (where the simulator and the restored exit wave are defined). The
    weak-phase criterion finds the plane where the wave is most nearly a pure phase object — the
    mid-plane of an amorphous film, t/2 upstream — so with ``thickness_nm`` its estimate is moved
    by t/2 to the exit surface (without it, the mid-plane is reported: within t/2 of the exit
    surface). The crystal criterion locates the exit surface itself (no shift applied).
    """

    reference: int | None = None
    search_range_nm: float | None = None
    iterations: int = 3
    exclude: Sequence[int] = ()
    area: tuple[int, int, int, int] | None = None
    peak_threshold: float = 0.01
    whiten: float | None = None
    whiten_shift: float = 0.0
    clip_spots_wave: float | None = None
    whiten_first: float = 0.0
    clip_spots: float = 1.5
    max_drift_px: float = 12.0
    max_delocalisation: float | None = 0.25
    small_field_delocalisation: bool = False
    coarse_trials: int = 9
    tolerance_nm: float = 0.05
    tolerance_px: float = 0.01
    taper_px: int | None = None
    absolute: str = "wave"
    absolute_range_nm: float = 20.0
    fit_astigmatism: bool = True
    pure_phase_refinement: bool = False
    crystal: bool = False
    thickness_nm: float | None = None
    prior_scale: float | None = None
    per_image_delocalisation: bool | None = None
    shift_prior_scale: float | None = 1.0

    def resolved(self) -> FocalParams:
        """A copy with the automatic (None) settings filled in: ``per_image_delocalisation``
        True; ``prior_scale`` 1e4, or 1 for ``crystal`` (a crystal's few spots need the
        restoration's prior: 1e4 gave 0.053 instead of 0.039 px drift on SrTiO3)."""
        ps = self.prior_scale if self.prior_scale is not None else (1.0 if self.crystal else 1e4)
        pi = True if self.per_image_delocalisation is None else self.per_image_delocalisation
        return replace(self, prior_scale=ps, per_image_delocalisation=pi)

    def for_field(self, frames: np.ndarray) -> FocalParams:
        """A copy with the field-dependent automatic settings filled in (``taper_px``,
        ``clip_spots_wave``, ``whiten``): a non-periodic field (:func:`edge_discontinuity`
        above ``NONPERIODIC_EDGE_RATIO``; real data) gets a taper of a tenth of its shorter
        side (if ≥ ``WIDE_TAPER_MIN_FIELD_PX``, else ``MIN_TAPER_PX``), and in the wave
        passes' defocus search Bragg spots clipped to ``WAVE_SPOT_CLIP`` × the radial mean
        and whitening ``WAVE_WHITEN``; a periodic field
        (synthetic data) 12 px, no clipping, no whitening (measured there: both cost accuracy
        to noise). Crystal mode keeps 12 px (its passes use neither). A non-periodic field
        narrower than ``WIDE_TAPER_MIN_FIELD_PX`` also drops ``max_delocalisation`` (unless
        ``small_field_delocalisation``): there the limit leaves too little of the band
        (measured on the simulator's 256² crystal edge, 500 e/Å², references 6 / 8, two
        seeds: rel. defocus 0.79 / 1.24 and 0.87 / 1.58 nm → 0.36 / 0.61 and 0.47 / 0.83 nm,
        drift 0.09–0.12 → 0.06–0.08 px; at 512² it is kept: dropping it cost 0.18 → 0.27 nm
        at 100 e/Å²)."""
        wide = not self.crystal and edge_discontinuity(frames) > NONPERIODIC_EDGE_RATIO
        taper = self.taper_px
        if taper is None:
            side = min(frames.shape[-2:])
            big = wide and side >= WIDE_TAPER_MIN_FIELD_PX
            taper = max(MIN_TAPER_PX, side // TAPER_FIELD_DIVISOR) if big else MIN_TAPER_PX
        clip = self.clip_spots_wave
        if clip is None:
            clip = WAVE_SPOT_CLIP if wide else 0.0
        whiten = self.whiten
        if whiten is None:
            whiten = WAVE_WHITEN if wide else 0.0
        deloc = self.max_delocalisation
        if wide and min(frames.shape[-2:]) < WIDE_TAPER_MIN_FIELD_PX:
            deloc = deloc if self.small_field_delocalisation else None
        return replace(
            self,
            taper_px=int(taper),
            clip_spots_wave=float(clip),
            whiten=float(whiten),
            max_delocalisation=deloc,
        )


@dataclass
class FocalRegistration:
    """Per-image defocus, drift and peak height, plus absolute defocus and A1 (see module doc)."""

    reference_index: int
    nominal_defocus_nm: np.ndarray
    relative_defocus_nm: np.ndarray
    defocus_nm: np.ndarray
    shifts_px: np.ndarray
    peak_heights: np.ndarray
    flagged: np.ndarray
    used: np.ndarray
    astigmatism_nm: float
    astigmatism_deg: float
    seconds: float
    passes: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> np.ndarray:
        """Per-image structured table (index, nominal/fitted defocus nm, shift px, peak, used)."""
        dt = np.dtype(
            [
                ("index", "<i8"),
                ("nominal_defocus_nm", "<f8"),
                ("fitted_defocus_nm", "<f8"),
                ("shift_y_px", "<f8"),
                ("shift_x_px", "<f8"),
                ("peak_height", "<f8"),
                ("used", "?"),
            ]
        )
        out = np.zeros(len(self.defocus_nm), dtype=dt)
        out["index"] = np.arange(len(out))
        out["nominal_defocus_nm"] = self.nominal_defocus_nm
        out["fitted_defocus_nm"] = self.defocus_nm
        out["shift_y_px"] = self.shifts_px[:, 0]
        out["shift_x_px"] = self.shifts_px[:, 1]
        out["peak_height"] = self.peak_heights
        out["used"] = self.used
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "reference_index": int(self.reference_index),
            "defocus_nm": [float(v) for v in self.defocus_nm],
            "relative_defocus_nm": [float(v) for v in self.relative_defocus_nm],
            "shifts_px": [[float(a), float(b)] for a, b in self.shifts_px],
            "peak_heights": [float(v) for v in self.peak_heights],
            "astigmatism_nm": float(self.astigmatism_nm),
            "astigmatism_deg": float(self.astigmatism_deg),
            "seconds": float(self.seconds),
        }


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
_OPTICS_KEYS = ("voltage_kv", "cs_mm", "focal_spread_nm", "beam_divergence_mrad")


def instrument_from_stack(stack: ImageStack, **overrides: Any) -> tuple[Optics, float, np.ndarray]:
    """(optics, pixel_nm, nominal defocus (n,) nm) from the stack, overrides winning.

    Overrides (None = not given): ``voltage_kv``, ``cs_mm``, ``focal_spread_nm``,
    ``beam_divergence_mrad``, ``pixel_nm``, ``start_nm`` and ``step_nm`` (nominal defocus
    start + i·step, replacing the per-frame records). A pixel size of exactly (1.0, 1.0) nm, the
    ImageStack default, counts as not recorded. Raises ValueError naming every missing value.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {*_OPTICS_KEYS, "pixel_nm", "start_nm", "step_nm"}
    if unknown:
        raise ValueError(f"unknown instrument override(s): {sorted(unknown)}")
    recorded = dict(stack.instrument.get("optics") or {})
    merged = {**recorded, **{k: given[k] for k in _OPTICS_KEYS if k in given}}
    missing = [f"{k} (--{k.replace('_', '-')})" for k in _OPTICS_KEYS if k not in merged]
    pixel = given.get("pixel_nm")
    if pixel is None and tuple(stack.pixel_size_nm) != (1.0, 1.0):
        py, px = stack.pixel_size_nm
        if not math.isclose(py, px, rel_tol=1e-3):
            raise ValueError(f"non-square pixels {stack.pixel_size_nm} nm are not supported")
        pixel = py
    if pixel is None:
        missing.append("pixel size (--pixel-nm)")
    n = stack.n_frames
    if "start_nm" in given or "step_nm" in given:
        if "start_nm" not in given or "step_nm" not in given:
            missing.append("nominal defocus: both --start-nm and --step-nm are needed")
            nominal = np.full(n, np.nan)
        else:
            nominal = float(given["start_nm"]) + float(given["step_nm"]) * np.arange(n)
    else:
        nominal = stack.column("defocus_nominal_nm").astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(nominal))
        if bad.size:
            missing.append(
                f"nominal defocus of frames {bad.tolist()} (records or --start-nm/--step-nm)"
            )
    if missing:
        raise ValueError("missing instrument parameters: " + "; ".join(missing))
    try:
        optics = Optics(**merged)
    except Exception as exc:
        raise ValueError(f"invalid optics parameters: {exc}") from exc
    if not float(pixel) > 0:
        raise ValueError(f"pixel size must be positive; got {pixel}")
    return optics, float(pixel), nominal


def camera_offset_counts(stack: ImageStack) -> float:
    """The camera's dark offset (counts) recorded in ``stack.instrument["camera"]``, else 0."""
    cam = stack.instrument.get("camera") or {}
    return float(cam.get("offset_counts", 0.0) or 0.0)


def intensity_frames(stack: ImageStack) -> np.ndarray:
    """Frames with the recorded camera offset removed (float32): proportional to intensity."""
    off = camera_offset_counts(stack)
    return stack.frames - np.float32(off) if off else stack.frames


def check_nominal_defocus(nominal_nm: np.ndarray, n: int) -> np.ndarray:
    """Nominal defocus (n,) finite and strictly monotonic, or a ValueError saying what is not."""
    d = np.asarray(nominal_nm, dtype=np.float64).reshape(-1)
    if d.size != n:
        raise ValueError(f"nominal defocus has {d.size} values for {n} frames")
    bad = np.flatnonzero(~np.isfinite(d))
    if bad.size:
        raise ValueError(f"nominal defocus missing (NaN) for frames {bad.tolist()}")
    steps = np.diff(d)
    if not (np.all(steps > 0) or np.all(steps < 0)):
        sign = np.sign(np.median(steps)) or 1.0
        wrong = (np.flatnonzero(steps * sign <= 0) + 1).tolist()
        raise ValueError(
            "nominal defocus must change monotonically through the series; frames "
            f"{wrong} break the order ({d.tolist()})"
        )
    return d


def _used_mask(n: int, exclude: Sequence[int], reference: int) -> np.ndarray:
    used = np.ones(n, bool)
    for i in exclude:
        if not 0 <= int(i) < n:
            raise ValueError(f"excluded frame {i} out of range 0..{n - 1}")
        used[int(i)] = False
    if not used[reference]:
        raise ValueError(f"the reference frame {reference} cannot be excluded")
    if used.sum() < MIN_IMAGES:
        raise ValueError(
            f"registration needs at least {MIN_IMAGES} images; {int(used.sum())} left after "
            f"excluding {list(exclude)}"
        )
    return used


def _choose_reference(nominal: np.ndarray, optics: Optics, reference: int | None) -> int:
    n = len(nominal)
    if reference is None:
        # nearest Scherzer, but never an image so close to focus that it has no phase contrast
        # (Cs ≈ 0 puts Scherzer at 0 nm)
        step = float(np.median(np.abs(np.diff(nominal))))
        dist = np.abs(nominal - optics.scherzer_defocus_nm())
        dist = np.where(np.abs(nominal) < step, np.inf, dist)
        if np.all(np.isinf(dist)):
            dist = np.abs(nominal - optics.scherzer_defocus_nm())
        return int(np.argmin(dist))
    if not 0 <= int(reference) < n:
        raise ValueError(f"reference frame {reference} out of range 0..{n - 1}")
    return int(reference)


# --------------------------------------------------------------------------------------------
# correlation on a band: coarse (boxed FFT) and fine (Newton on shifts)
# --------------------------------------------------------------------------------------------
class Correlator:
    """Peak finding for band-limited cross-power spectra Z (k, m)."""

    def __init__(self, band: SpectralBand):
        self.band = band
        ny, nx = band.shape
        iy = np.rint(band.gy * ny).astype(np.int64)
        ix = np.rint(band.gx * nx).astype(np.int64)
        by = min(ny, sfft.next_fast_len(int(2 * np.abs(iy).max() + 8)))
        bx = min(nx, sfft.next_fast_len(int(2 * np.abs(ix).max() + 8)))
        self.box = (by, bx)
        self.box_idx = (iy % by) * bx + (ix % bx)
        self.scale = (ny / by, nx / bx)
        self.iy, self.ix = iy % ny, ix % nx
        self.fy = np.fft.fftfreq(ny)
        self.fx = np.fft.fftfreq(nx)
        gy, gx = band.gy.astype(np.float32), band.gx.astype(np.float32)
        self.moments = (gy, gx, gy * gy, gy * gx, gx * gx)

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
        full = np.zeros((k, by * bx), np.complex64)
        full[:, self.box_idx] = z
        c = sfft.ifft2(full.reshape(k, by, bx), workers=fft_workers(), overwrite_x=True).real
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

    def phase(self, s: np.ndarray) -> np.ndarray:
        """exp(2πi g·s) on the band (complex64), from separable per-axis factors."""
        ey = np.exp(2j * math.pi * self.fy * s[0]).astype(np.complex64)
        ex = np.exp(2j * math.pi * self.fx * s[1]).astype(np.complex64)
        return ey[self.iy] * ex[self.ix]

    def refine(
        self, z: np.ndarray, s: np.ndarray, norm: float, steps: int = 4, offset: float = 0.0
    ) -> tuple[np.ndarray, float]:
        """Newton ascent of Re Σ Z e^{2πi g·s} from s (2,); returns (s, (value − ``offset``) /
        ``norm``)."""
        s = np.asarray(s, np.float64).copy()
        norm = max(float(norm), 1e-30)
        gy, gx, gyy, gxy, gxx = self.moments
        for _ in range(steps):
            ze = z * self.phase(s)
            im, re = ze.imag, ze.real
            grad = -2 * math.pi * np.array([np.dot(gy, im), np.dot(gx, im)], np.float64)
            hyy, hxy, hxx = (-4 * math.pi**2 * float(np.dot(g, re)) for g in (gyy, gxy, gxx))
            det = hyy * hxx - hxy * hxy
            if not (hyy < 0 and det > 0):
                break
            step = -np.array([hxx * grad[0] - hxy * grad[1], hyy * grad[1] - hxy * grad[0]]) / det
            step = np.clip(step, -0.5, 0.5)
            s += step
            if np.max(np.abs(step)) < 1e-4:
                break
        height = float(np.dot(z.real, (e := self.phase(s)).real) - np.dot(z.imag, e.imag))
        return s, (height - offset) / norm


def search_defocus_shift(
    corr: Correlator,
    z_of: Any,
    center_nm: float,
    range_nm: float,
    n_coarse: int,
    tol_nm: float,
    shift_guess: np.ndarray | None = None,
    shift_window: tuple[np.ndarray, float] | None = None,
) -> tuple[float, np.ndarray, float]:
    """Maximise the normalised correlation peak over defocus Δ and shift.

    ``z_of(Δ (k,)) → (Z (k, m), norm (k,)[, offset (k,)])``; the objective is
    (Re Σ Z e^{2πi g·s} − offset) / norm. Coarse: ``n_coarse`` trials over center ± range,
    peaks by FFT within ``shift_window`` = (centre, radius px) if given (or, with
    ``shift_guess``, by Newton from it). Fine: Brent on Δ within one
    coarse spacing, the shift refined by Newton at every evaluation. Returns (Δ, shift, peak).
    """
    trials = center_nm + np.linspace(-range_nm, range_nm, max(n_coarse, 3))
    z, norm, off = _evaluate(z_of, trials)
    if shift_guess is None:
        peaks, raw = corr.coarse(z, np.ones(len(trials)), *(shift_window or (None, None)))
    else:
        peaks = np.repeat(np.asarray(shift_guess, float)[None], len(trials), axis=0)
        e = corr.phase(peaks[0])
        raw = z.real @ e.real - z.imag @ e.imag
    heights = (raw - off) / np.maximum(norm, 1e-30)
    top = np.argsort(heights)[::-1][:3]
    fits = {int(j): corr.refine(z[j], peaks[j], norm[j], 6, off[j]) for j in top}
    j = max(fits, key=lambda k: fits[k][1])
    best = float(trials[j])
    h = float(trials[1] - trials[0])
    state = {"s": fits[j][0]}

    def neg_peak(delta: float) -> float:
        zz, nn, oo = _evaluate(z_of, np.array([delta]))
        s_new, height = corr.refine(zz[0], state["s"], nn[0], 3, oo[0])
        state["s"] = s_new
        return -height

    res = minimize_scalar(
        neg_peak,
        bounds=(max(best - h, trials[0]), min(best + h, trials[-1])),
        method="bounded",
        options={"xatol": tol_nm},
    )
    delta = float(res.x)
    zz, nn, oo = _evaluate(z_of, np.array([delta]))
    s, height = corr.refine(zz[0], state["s"], nn[0], 6, oo[0])
    return delta, s, height


def _evaluate(z_of: Any, trials: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Z, norm, offset) of ``z_of``; objectives without an offset get zeros."""
    out = z_of(trials)
    if len(out) == 2:
        return out[0], np.asarray(out[1]), np.zeros(len(trials))
    return out[0], np.asarray(out[1]), np.asarray(out[2])


# --------------------------------------------------------------------------------------------
# the registration problem on a band
# --------------------------------------------------------------------------------------------
class _Problem:
    """Spectra, band and transfer of one series (internal)."""

    def __init__(self, frames, optics, pixel_nm, nominal, params: FocalParams, mtf=None, nps=None):
        self.frames = crop_area(frames, params.area)
        params = params.resolved().for_field(self.frames)
        self.params = params
        self._args = (pixel_nm, nominal, mtf, nps)
        self._common: _Problem | None = None
        self.spectra_full = frame_spectra(self.frames, params.taper_px)
        self.grid = FrequencyGrid(self.spectra_full.shape[-2:], (pixel_nm, pixel_nm))
        self.optics = optics
        per_image = params.max_delocalisation is not None and params.per_image_delocalisation
        self.band = information_band(
            optics,
            self.grid,
            nominal,
            np.ones(self.grid.shape, np.float32),
            0.02,
            2.0,
            None if per_image else params.max_delocalisation,
        )
        self.mask = np.ones((len(nominal), self.band.size), bool)
        if per_image:
            self.band, self.mask = _delocalisation_band(
                optics, self.grid, self.band, nominal, params.max_delocalisation
            )
        self.spectra = self.band.gather(self.spectra_full) * self.mask
        # a peak must pass the threshold and stand 5σ above the correlation of pure noise (≈ 1/√m)
        self.flag_level = max(params.peak_threshold, 5.0 / math.sqrt(self.band.size))
        self.corr = Correlator(self.band)
        # camera MTF × vibration envelope: multiplies the intensity spectrum
        cam = camera_curve_to_grid(mtf, self.grid.shape, "mtf") * vibration_envelope(
            optics, self.grid
        )
        self.camera = self.band.gather(cam).astype(np.float32)
        # relative noise power (mean 1 on the band): the shift refinement's noise weights
        nps_b = self.band.gather(camera_curve_to_grid(nps, self.grid.shape, "nps"))
        self.inv_nps = (np.mean(nps_b) / np.maximum(nps_b, 1e-6 * np.mean(nps_b))).astype(
            np.float32
        )
        self.set_optics(optics)

    def set_optics(self, optics: Optics) -> None:
        self.optics = optics
        self.bt = BandTransfer(optics, self.grid, self.band)
        if self._common is not None:
            self._common.set_optics(optics)

    def common(self) -> _Problem:
        """This series on the band every image keeps (the delocalisation limit applied to all
        images at once); ``self`` when that is already so."""
        if not self.params.per_image_delocalisation:
            return self
        if self._common is None:
            pix, nominal, mtf, nps = self._args
            params = replace(self.params, per_image_delocalisation=False, area=None)
            self._common = _Problem(self.frames, self.optics, pix, nominal, params, mtf, nps)
        return self._common

    def ctf(self, defocus_nm: np.ndarray, env_s: np.ndarray) -> np.ndarray:
        """Weak-phase transfer 2 sin χ · envelopes on the band, (k, m) float32."""
        env = self.bt.env_t * env_s * self.camera
        return (2.0 * np.sin(self.bt.chi(defocus_nm)) * env).astype(np.float32)


DELOC_MIN_FRACTION = 0.75  # a frequency is used when ≥ this fraction of the images keep it


def _delocalisation_band(
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


def _clip_spots(x: np.ndarray, band: SpectralBand, factor: float) -> np.ndarray:
    """Limit |x| to ``factor`` × its radial mean |x|: Bragg spots weigh no more than a few
    diffuse (amorphous) frequencies, which carry the unambiguous drift and defocus signal."""
    if factor <= 0:
        return x
    return (x * _clip_weight(x, band, factor)).astype(np.complex64)


def _clip_weight(x: np.ndarray, band: SpectralBand, factor: float, n_bins: int = 32) -> np.ndarray:
    """Weights (m,) float32 that limit |x| to ``factor`` × its radial mean (0: ones)."""
    if factor <= 0:
        return np.ones(band.size, np.float32)
    q = np.hypot(band.gy, band.gx)
    which = np.minimum((q / (q.max() + 1e-12) * n_bins).astype(int), n_bins - 1)
    mag = np.abs(x)
    mean = np.bincount(which, mag, n_bins) / np.maximum(np.bincount(which, None, n_bins), 1)
    return np.minimum(1.0, factor * mean[which] / np.maximum(mag, 1e-30)).astype(np.float32)


def _whiten(x: np.ndarray, exponent: float) -> np.ndarray:
    """x / |x|^exponent (0: unchanged; 1: phase only) — spectral whitening before correlation."""
    if exponent == 0:
        return x
    return (x / np.maximum(np.abs(x), 1e-30) ** exponent).astype(np.complex64)


def _match_reference(prob: _Problem, i: int, ref: int, d_abs, env_s, center, rng_nm, window):
    """Image i against the reference alone through the weak-phase transfer s = 2 sin χ · E.

    For a weak-phase object S_n s_r − S_r s_n is pure noise of variance ∝ s_r² + s_n², so the
    pair's likelihood is maximal where L = E − 2C is least, with C = Re Σ S_n S_r* s_r s_n
    e^{2πig·s} / (s_r² + s_n²) and E = Σ (|S_n|² s_r² + |S_r|² s_n²) / (s_r² + s_n²). (The ratio
    C/(E/2) would favour Δ → 0, where the pair is simply two similar images.) The reported peak
    is C/(E/2) ≤ 1, 1 for noise-free, consistent images.
    """
    p = prob.params
    s_r = prob.ctf(np.array([d_abs[ref]]), env_s[ref])[0] * prob.mask[ref]
    xi = _clip_spots(_whiten(prob.spectra[i], p.whiten_first), prob.band, p.clip_spots)
    xr = _clip_spots(_whiten(prob.spectra[ref], p.whiten_first), prob.band, p.clip_spots)
    base = xi * np.conj(xr) * s_r
    pow_i, pow_r = np.abs(xi) ** 2, np.abs(xr) ** 2
    eps = np.float32(0.05 * np.mean(s_r * s_r))

    e0 = 0.25 * float((pow_i + pow_r).sum())  # a fixed scale: the search maximises C − E/2

    def energy(sn):
        den = s_r[None] ** 2 + sn * sn + eps
        return 0.5 * ((pow_i[None] * s_r[None] ** 2 + pow_r[None] * sn * sn) / den).sum(axis=1)

    def z_of(trials):
        sn = prob.ctf(trials, env_s[i]) * prob.mask[i]
        den = s_r[None] ** 2 + sn * sn + eps
        return (base[None] * sn / den).astype(np.complex64), np.full(len(trials), e0), energy(sn)

    delta, s, _ = search_defocus_shift(
        prob.corr, z_of, center, rng_nm, p.coarse_trials, p.tolerance_nm, None, window
    )
    z, _, half_e = z_of(np.array([delta]))
    peak = prob.corr.refine(z[0], s, float(half_e[0]), 0)[1]  # C / (E/2), reported
    return delta, s, peak


def _match_wave(prob: _Problem, i, phi, quad_i, env_s_i, center, rng_nm, shift_guess, window=None):
    """Image i against its prediction φ T + φ*(−g) T*(−g) + quadratic term, over Δ and shift.

    Δ and shift are searched on spectra whitened by ``FocalParams.whiten``; the shift is then
    refined at that Δ with ``whiten_shift`` (see :class:`FocalParams`)."""
    p = prob.params
    phi_neg = prob.band.conj_neg(phi)

    def z_maker(exponent: float, clip: float = 0.0):
        w = _clip_weight(prob.spectra[i], prob.band, clip)
        spec_w = _whiten(prob.spectra[i] * w, exponent)
        spec_norm = float(np.linalg.norm(spec_w))

        def z_of(trials):
            tt = prob.bt.transfer(trials, env_s_i)
            lin = (phi * tt + phi_neg * prob.band.conj_neg(tt)) * prob.camera
            y = _whiten((lin + quad_i) * (prob.mask[i] * w), exponent)
            norm = spec_norm * np.linalg.norm(y, axis=1)
            return (spec_w[None] * np.conj(y)).astype(np.complex64), norm

        return z_of

    search_z = z_maker(p.whiten, p.clip_spots_wave)
    delta, s, peak = search_defocus_shift(
        prob.corr, search_z, center, rng_nm, p.coarse_trials, p.tolerance_nm, shift_guess, window
    )
    if p.whiten_shift != p.whiten or p.clip_spots_wave:  # shift and peak on the plain spectra
        z, norm = z_maker(p.whiten_shift)(np.array([delta]))
        s, peak = prob.corr.refine(z[0], s, float(norm[0]), 6)
    return delta, s, peak


def _first_pass(prob: _Problem, ref: int, nominal: np.ndarray, used: np.ndarray, rng_nm: float):
    """Progressive registration outward from the reference.

    The nearest neighbours are matched to the reference through the weak-phase transfer; every
    further image (nearest first) against its prediction from the wave restored from the (≥ 3)
    images registered so far, its defocus searched around the line fitted to them and its
    shift within ``max_drift_px`` of their drift line.
    """
    n = len(nominal)
    d_abs = nominal.copy()
    shifts = np.zeros((n, 2))
    peaks = np.ones(n)
    env_s = prob.bt.spatial(nominal)
    done = [ref]
    order = sorted((i for i in range(n) if i != ref), key=lambda i: (abs(i - ref), i))
    for i in order:
        center = _predict_defocus(nominal, d_abs, i, ref, np.array(done))
        window = (_predict_shift(shifts, i, np.array(done)), prob.params.max_drift_px)
        if len(done) < MIN_IMAGES or abs(i - ref) <= 1:  # two images restore no wave
            delta, s, h = _match_reference(prob, i, ref, d_abs, env_s, center, rng_nm, window)
        else:
            idx = np.array(sorted(done))
            aligned = prob.spectra[idx] * shift_phase(prob.band, shifts[idx])
            t = prob.bt.transfer(d_abs[idx], env_s[idx])
            sol = solve_series(
                aligned, t, prob.band, camera=prob.camera, corrections=1,
                prior_scale=prob.params.prior_scale, mask=prob.mask[idx],
            )  # fmt: skip
            t_i = prob.bt.transfer(d_abs[i : i + 1], env_s[i : i + 1])
            quad_i = quadratic_term(prob.band, sol.phi, t_i, prob.camera)[0]
            delta, s, h = _match_wave(
                prob, i, sol.phi, quad_i, env_s[i], center, rng_nm, None, window
            )
        d_abs[i], shifts[i], peaks[i] = delta, s, h
        if used[i] and h >= prob.flag_level:
            done.append(i)
        elif used[i] and len(done) < MIN_IMAGES:  # low dose: keep going with what there is
            done.append(i)
    return d_abs, shifts, peaks


CRYSTAL_STEP_WINDOW_PX = 3.0
CRYSTAL_MAX_DCHI = math.pi / 2  # rad: frequencies whose χ changes less over one step


def _first_pass_crystal(prob: _Problem, ref: int, nominal: np.ndarray, used: np.ndarray):
    """Nominal defocus; drift chained image to image (FocalParams ``crystal``).

    Each image is cross-correlated with the previous one on the frequencies where one step
    changes χ by less than π/2 (their contrast is nearly the same there, up to a reversal
    where the CTF crosses zero). A reversal would make a lattice pseudo-translation win, so
    the cross-power is squared (sign-free; the peak sits at twice the step, ambiguous by half
    a lattice vector) and the drift is taken as smooth: the median of the steps found within
    ``max_drift_px``/2 is the steady drift (the squared map repeats with the lattice period,
    so a steady drift per image must stay below ~¼ of the shortest lattice period, ≈ 5 px for
    SrTiO3 at 0.02 nm/px), every step the peak within ``CRYSTAL_STEP_WINDOW_PX`` of it.
    """
    n = len(nominal)
    idx = np.flatnonzero(used)  # excluded frames (e.g. hit by a vibration) leave the chain
    k = idx.size
    steps = np.abs(np.diff(nominal[idx]))
    dchi = np.abs(prob.bt.unit) * float(np.max(steps))  # χ change over one step (rad)
    low = dchi < CRYSTAL_MAX_DCHI
    if low.sum() < 8:
        low = dchi <= np.sort(dchi)[min(len(dchi) - 1, 64)]
    spec = prob.spectra[idx] * low
    pairs = spec[1:] * np.conj(spec[:-1])
    # squared phasors: a reflection whose contrast reverses between the two images (sign
    # flip) still points the same way; the correlation of the squares peaks at twice the step
    mag = np.abs(pairs)
    sq = (pairs * pairs / np.maximum(mag, 1e-30)).astype(np.complex64)
    norms = mag.sum(axis=1)
    win = prob.params.max_drift_px
    gap = np.diff(idx).astype(np.float64)[:, None]  # frames between chained neighbours
    wide = np.stack([_nearest_strong_peak(prob.corr, sq[j : j + 1], win) for j in range(k - 1)])
    typical = np.median(wide / gap, axis=0)  # twice the steady drift per frame
    near = np.empty((k - 1, 2))
    for j in range(k - 1):
        near[j] = prob.corr.coarse(sq[j : j + 1], np.ones(1), typical * gap[j],
                                   2 * CRYSTAL_STEP_WINDOW_PX)[0][0]  # fmt: skip
    step_s = np.zeros((k, 2))
    peaks = np.ones(n)
    half = 0.5 * max(prob.corr.scale)  # the coarse map's pixel: search ± that finely first
    for j in range(1, k):
        start = _local_grid_peak(prob.corr, sq[j - 1], near[j - 1], half)
        s2, peaks[idx[j]] = prob.corr.refine(sq[j - 1], start, float(norms[j - 1]), 6)
        step_s[j] = 0.5 * s2
    chained = np.cumsum(step_s, axis=0)
    frames = np.arange(n, dtype=np.float64)
    shifts = np.stack([np.interp(frames, idx, chained[:, a]) for a in range(2)], axis=1)
    shifts -= shifts[ref]
    return nominal.copy(), shifts, peaks


CRYSTAL_PEAK_AMBIGUITY = 0.8  # a peak this close in height to the best counts as equivalent


def _nearest_strong_peak(corr: Correlator, z: np.ndarray, radius: float) -> np.ndarray:
    """The coarse peak (2,) of one cross-power ``z`` (1, m) nearest zero among those within
    ``radius`` px that reach ``CRYSTAL_PEAK_AMBIGUITY`` × the highest: a lattice makes the
    (squared) correlation periodic, its equivalent peaks differ in height only by noise, and
    the drift between neighbours is the smallest of them (seen on the simulator's 512²
    SrTiO3 with only {110}-type reflections in the low band: the highest peak was a quarter
    lattice vector off per image, 17 px drift error over 11 images)."""
    peak, height = corr.coarse(z, np.ones(1), np.zeros(2), radius)
    best, top = peak[0], float(height[0])
    r = float(np.hypot(*best))
    while r > 1.0:
        p2, h2 = corr.coarse(z, np.ones(1), np.zeros(2), r - 1.0)
        if float(h2[0]) < CRYSTAL_PEAK_AMBIGUITY * top:
            break
        best, r = p2[0], float(np.hypot(*p2[0]))
    return best


CRYSTAL_STEP_SCALE_RANGE = 0.1  # ± fraction of the nominal step searched
CRYSTAL_STEP_SCALE_SPACING = 0.02  # grid spacing of that search (then Brent within ± one)
CRYSTAL_STEP_SCALE_REFINE = 0.01  # ± range of the later passes' κ refinement (Brent alone)
CRYSTAL_SPOT_QUANTILE = 0.995  # band frequencies above this power quantile are "the spots"


def _spot_mask(spectra: np.ndarray, quantile: float = CRYSTAL_SPOT_QUANTILE) -> np.ndarray:
    """Band elements carrying the most power over the series (a crystal's Bragg spots), ≥ 16."""
    pw = np.sum(np.abs(spectra) ** 2, axis=0)
    k = max(16, round((1.0 - quantile) * pw.size))
    mask = np.zeros(pw.size, bool)
    mask[np.argsort(pw)[::-1][:k]] = True
    return mask


def fit_step_scale(
    prob: _Problem,
    aligned: np.ndarray,
    nominal: np.ndarray,
    ref: int,
    ref_defocus_nm: float,
    half_range: float = CRYSTAL_STEP_SCALE_RANGE,
    mask: np.ndarray | None = None,
    center: float = 1.0,
) -> tuple[float, float]:
    """Scale κ of the nominal step (defocus_n = ref + κ·(nominal_n − nominal_ref)) that best
    explains the aligned series by the two-sided linear model (+ quadratic term), and the
    residual fraction at it. The residual is taken on the Bragg spots only (:func:`_spot_mask`):
    a crystal's per-image defocus is poorly determined (a defocus change only rescales each
    reflection), but one step scale for the whole series is well determined."""
    spots = _spot_mask(aligned)
    total = float(np.sum(np.abs(aligned[:, spots]) ** 2)) + 1e-30

    def resid(kappa: float) -> float:
        d = ref_defocus_nm + kappa * (nominal - nominal[ref])
        t = prob.bt.transfer(d, prob.bt.spatial(d))
        sol = solve_series(aligned, t, prob.band, camera=prob.camera, corrections=1, mask=mask)
        pred = linear_prediction(sol.phi, t * prob.camera, prob.band.conj_neg(t) * prob.camera,
                                 prob.band) + sol.quadratic  # fmt: skip
        res = aligned - pred if mask is None else (aligned - pred) * mask
        return float(np.sum(np.abs(res[:, spots]) ** 2)) / total

    spacing = CRYSTAL_STEP_SCALE_SPACING
    best = center
    if half_range > spacing:  # a grid first (the residual has side minima); else Brent alone
        grid = center + np.linspace(-half_range, half_range, 2 * round(half_range / spacing) + 1)
        best = _parabolic_peak(grid, -np.array([resid(k) for k in grid]))
    lo, hi = best - min(spacing, half_range), best + min(spacing, half_range)
    res = minimize_scalar(resid, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    return float(res.x), float(res.fun)


def _crystal_pass(prob: _Problem, ref: int, nominal, d_abs, shifts, used, fit_kappa=True):
    """One crystal pass: the step scale κ (defocus on the nominal line through the reference;
    kept as it is without ``fit_kappa``), then every image's shift refined (Newton, from the
    last) against its leave-one-out prediction at that defocus. Returns (defocus, shifts,
    peaks)."""
    n = len(d_abs)
    others = np.arange(n) != ref
    now = float(np.median((d_abs - d_abs[ref])[others] / (nominal - nominal[ref])[others]))
    narrow = abs(now - 1.0) > 1e-9  # a κ was fitted before: refine around it
    if narrow and not fit_kappa:
        new_s, peaks = _refine_shifts(prob, ref, d_abs, shifts, used, prob.params.prior_scale)
        return d_abs.copy(), new_s, peaks
    aligned = prob.spectra * shift_phase(prob.band, shifts)
    kappa, _ = fit_step_scale(
        prob, aligned[used], nominal[used], int(np.sum(used[:ref])), float(d_abs[ref]),
        CRYSTAL_STEP_SCALE_REFINE if narrow else CRYSTAL_STEP_SCALE_RANGE,
        prob.mask[used], now if narrow else 1.0,
    )  # fmt: skip
    new_d = d_abs[ref] + kappa * (nominal - nominal[ref])
    new_s, peaks = _refine_shifts(prob, ref, new_d, shifts, used, prob.params.prior_scale)
    return new_d, new_s, peaks


def _loo_waves(prob: _Problem, d_abs, shifts, used, prior_scale: float, env_s=None):
    """Leave-one-out waves of the aligned series at defocus ``d_abs``: (transfers (n, m),
    the used images' solution, quadratic terms (n, m), per-image waves (n, m): restored from
    all other used images; an unused image gets the full wave)."""
    n = len(d_abs)
    env_s = prob.bt.spatial(d_abs) if env_s is None else env_s
    t = prob.bt.transfer(d_abs, env_s)
    aligned = prob.spectra * shift_phase(prob.band, shifts)
    sol = solve_series(
        aligned[used], t[used], prob.band, camera=prob.camera, leave_one_out=True,
        prior_scale=prior_scale, mask=prob.mask[used],
    )  # fmt: skip
    quad = quadratic_term(prob.band, sol.phi, t, prob.camera)
    loo = np.empty((n, prob.band.size), np.complex64)
    loo[used] = sol.loo
    loo[~used] = sol.phi
    return t, sol, quad, loo


def _refine_shifts(prob: _Problem, ref: int, d_abs, shifts, used, prior_scale: float):
    """Every image's shift refined (grid start within ±1 px, then Newton) against its
    leave-one-out prediction at the defocus ``d_abs``, with the Wiener prior × ``prior_scale``.
    Returns (shifts with the reference's at 0, peaks)."""
    n = len(d_abs)
    t, _, quad, loo = _loo_waves(prob, d_abs, shifts, used, prior_scale)
    new_s, peaks = shifts.copy(), np.ones(n)
    for i in range(n):
        lin = (loo[i] * t[i] + prob.band.conj_neg(loo[i]) * prob.band.conj_neg(t[i])) * prob.camera
        y = (lin + quad[i]) * prob.mask[i]
        w = prob.inv_nps
        norm = float(np.sqrt(np.sum(w * np.abs(prob.spectra[i]) ** 2) * np.sum(w * np.abs(y) ** 2)))
        z = (prob.spectra[i] * np.conj(y) * w).astype(np.complex64)
        start = _local_grid_peak(prob.corr, z, shifts[i], 1.0)
        new_s[i], peaks[i] = prob.corr.refine(z, start, norm, 6)
    new_s -= new_s[ref]
    return new_s, peaks


def _local_grid_peak(corr: Correlator, z: np.ndarray, center: np.ndarray, half: float):
    """Shift (2,) maximising Re Σ z e^{2πi g·s} on a 9×9 grid within ± ``half`` px of
    ``center``: a start inside the peak for Newton (a coarse-box peak can be off by half a box
    pixel, several image pixels, on the sharp periodic peaks of a crystal)."""
    offs = np.linspace(-half, half, 9)
    ey = np.exp(2j * math.pi * np.outer(center[0] + offs, corr.fy)).astype(np.complex64)
    ex = np.exp(2j * math.pi * np.outer(center[1] + offs, corr.fx)).astype(np.complex64)
    vals = ((ey[:, corr.iy] * z[None]) @ ex[:, corr.ix].T).real  # (y offsets, x offsets)
    jy, jx = np.unravel_index(int(np.argmax(vals)), vals.shape)
    return np.array([center[0] + offs[jy], center[1] + offs[jx]])


CRYSTAL_MIN_RELATIVE_PEAK = 0.25  # crystal mode: peaks below this × the median are suspect


def _flag_level(prob: _Problem, peaks: np.ndarray, used: np.ndarray) -> float:
    """Peak height below which an image is flagged (and left out of the wave).

    Crystal mode adds a relative test: an image near a defocus where the lattice nearly
    vanishes from the image correlates weakly with its prediction and its shift is not
    determined (seen: peak 0.08 against ≈ 0.95, shift 0.66 px off), so it is flagged."""
    level = prob.flag_level
    if prob.params.crystal and used.sum() >= MIN_IMAGES:
        level = max(level, CRYSTAL_MIN_RELATIVE_PEAK * float(np.median(peaks[used])))
    return level


def _predict_shift(shifts: np.ndarray, i: int, done: np.ndarray) -> np.ndarray:
    """Shift of image i extrapolated along the images done so far (a straight drift line)."""
    if done.size < 2:
        return shifts[done].mean(axis=0)
    coef = np.polyfit(done.astype(np.float64), shifts[done], 1)
    return coef[0] * i + coef[1]


def _predict_defocus(nominal, d_abs, i, ref, done) -> float:
    """Defocus of image i predicted from the images done so far (a fitted step)."""
    if done.size < 2:
        return float(d_abs[ref] + nominal[i] - nominal[ref])
    slope, icpt = np.polyfit(nominal[done], d_abs[done], 1)
    return float(slope * nominal[i] + icpt)


def _wave_pass(prob: _Problem, ref, d_abs, shifts, peaks, used, rng_nm, wide=False):
    """One leave-one-out pass: each image against its prediction from the others.

    ``wide``: shifts searched by FFT over the whole field instead of refined from the last.
    """
    n = len(d_abs)
    env_s = prob.bt.spatial(d_abs)
    _, sol, quad, loo = _loo_waves(prob, d_abs, shifts, used, prob.params.prior_scale, env_s)
    new_d, new_s, new_p = d_abs.copy(), shifts.copy(), peaks.copy()
    index = np.arange(n, dtype=np.float64)
    for i in range(n):
        center = d_abs[i]
        if wide:  # centre on the line through the other images (recovers a wrong start)
            others = used & (index != i)
            k, c = np.polyfit(index[others], d_abs[others], 1)
            center = float(k * i + c) if abs(k * i + c - d_abs[i]) > rng_nm / 2 else center
        # the reference is searched widely: if the others agree among themselves but sit a
        # lattice (or contrast-reversal) translation away from it, the gauge moves to them
        window = (shifts[i], prob.params.max_drift_px if i == ref else 3.0) if wide else None
        new_d[i], new_s[i], new_p[i] = _match_wave(
            prob, i, loo[i], quad[i], env_s[i], center, rng_nm, None if wide else shifts[i], window
        )
    new_s -= new_s[ref]  # the reference defines the frame (its own fit sets the gauge)
    return new_d, new_s, new_p, sol.phi


# --------------------------------------------------------------------------------------------
# absolute defocus and astigmatism
# --------------------------------------------------------------------------------------------
def _chi_basis(optics: Optics, grid: FrequencyGrid, band: SpectralBand) -> np.ndarray:
    """∂χ/∂(C1, A1·cos 2φ_A, A1·sin 2φ_A) per nm on the band, (3, m) float64."""
    v = optics.voltage_kv
    u0 = chi(Optics(voltage_kv=v), grid, 1.0)
    u1 = chi(Optics(voltage_kv=v, a1_nm=1.0, a1_deg=0.0), grid, 0.0)
    u2 = chi(Optics(voltage_kv=v, a1_nm=1.0, a1_deg=45.0), grid, 0.0)
    return band.gather(np.stack([u0, u1, u2])).astype(np.float64)


def _cartesian_a1(a1_nm: float, a1_deg: float) -> np.ndarray:
    t = math.radians(2 * a1_deg)
    return np.array([a1_nm * math.cos(t), a1_nm * math.sin(t)])


def _polar_a1(c: np.ndarray) -> tuple[float, float]:
    mag = float(math.hypot(c[0], c[1]))
    ang = (math.degrees(math.atan2(c[1], c[0])) / 2.0) % 180.0
    return mag, ang


def fit_defocus_astigmatism_wave(
    phi: np.ndarray,
    basis: np.ndarray,
    band: SpectralBand,
    range_nm: float,
    fit_astigmatism: bool = True,
    noise_cov12: np.ndarray | None = None,
    free_phase: bool = False,
    info: dict[str, Any] | None = None,
) -> tuple[float, np.ndarray]:
    """χ error (δC1 nm, (A1 cos 2φ, A1 sin 2φ) nm) of a restored wave φ (band).

    Weak phase: maximises J = Re Σ q(g) e^{2iΔχ(g)} with q = −p/|p|^½, p = φ(g)φ(−g) minus its
    noise part ``noise_cov12`` (see :func:`pair_noise_covariance`) (module doc). With
    ``free_phase`` the wave is only assumed to be c·R(r) with R real and one unknown complex c
    (a crystal's exit wave in the channelling picture: amplitude and phase contrast in a fixed
    ratio), so arg p = 2 arg c − 2Δχ and J = |Σ q e^{2iΔχ}| is maximised instead; A1 is
    then fitted first with a free phase per ring of equal |g| (symmetry-equivalent reflections
    share c, so within a ring only A1 changes arg p), and the defocus with A1 fixed; when the
    rings cannot fix both A1 components (:func:`_ring_conditioning` below
    ``RING_MIN_CONDITIONING``, e.g. a rectangular lattice with few equivalent reflections) the
    joint free-phase fit is used. ``info`` (a dict), if given, receives how A1 was fitted.
    """
    half = (band.gy > 0) | ((band.gy == 0) & (band.gx > 0))  # p(g) = p(−g): one of each pair
    p = phi[half].astype(np.complex128) * phi[band.neg][half]
    if noise_cov12 is not None:
        p = p - noise_cov12[half]
    q = -p / np.maximum(np.abs(p), 1e-30) ** 0.5
    basis = basis[:, half]

    groups = None
    if free_phase:
        groups = np.zeros(q.size, np.int64)
    j_and_grad = _phase_objective(q, basis, groups)

    step = 0.5
    coarse = np.arange(-range_nm, range_nm + 1e-9, step)
    e = q * np.exp(2j * coarse[0] * basis[0])
    rot = np.exp(2j * step * basis[0])
    vals = np.empty(coarse.size)
    for k in range(coarse.size):  # e^{2iδu} by repeated rotation: one multiply per trial
        vals[k] = abs(e.sum()) if free_phase else e.real.sum()
        e *= rot
    x0 = np.array([coarse[int(np.argmax(vals))]])
    x = minimize(j_and_grad, x0, jac=True, method="BFGS").x
    if not fit_astigmatism:
        return float(x[0]), np.zeros(2)
    if free_phase:
        # A1 from rings of equal |g| (symmetry-equivalent reflections share their c, so only
        # A1 differs within a ring); the defocus, constant on a ring, then with A1 fixed
        ny, nx = band.shape
        rings = np.rint(np.hypot(band.gy[half] * ny, band.gx[half] * nx)).astype(np.int64)
        # only the strong elements (the spots): a ring of noise alone fits any A1
        keep = np.abs(q) >= np.quantile(np.abs(q), RING_FIT_QUANTILE)
        rings = np.where(keep, rings, rings.max() + 1)
        qk = np.where(keep, q, 0)
        ring_obj = _phase_objective(qk, basis[1:], rings)
        ast = _best_of_starts(ring_obj, ([0.0, 0.0], [1.5, 1.5], [-1.5, -1.5])).x
        cond = _ring_conditioning(np.abs(qk), basis[1:], rings)
        if info is not None:
            info["a1_ring_conditioning"] = cond
        if cond < RING_MIN_CONDITIONING:  # one A1 direction unconstrained: the joint fit
            x = _best_of_starts(j_and_grad, ([x[0], *ast], [x[0], 0.0, 0.0]))
            if info is not None:
                info["a1_method"] = "joint free phase (rings ill-conditioned)"
            return float(x.x[0]), np.array(x.x[1:3])
        if info is not None:
            info["a1_method"] = "rings of equal |g|"
        fixed = q * np.exp(2j * (ast @ basis[1:]))
        c1_obj = _phase_objective(fixed, basis[:1], groups)
        x = minimize(c1_obj, x0, jac=True, method="BFGS").x
        return float(x[0]), np.asarray(ast, float)
    x = _best_of_starts(j_and_grad, ([x[0], 0.0, 0.0], [x[0], 1.5, 1.5], [x[0], -1.5, -1.5])).x
    return float(x[0]), np.array([x[1], x[2]])


RING_FIT_QUANTILE = 0.98  # the ring fit of A1 uses band elements above this |q| quantile
RING_MIN_CONDITIONING = 0.1  # smallest/largest eigenvalue of the ring design's Gram matrix


def _ring_conditioning(w: np.ndarray, basis: np.ndarray, rings: np.ndarray) -> float:
    """How well rings of equal |g| fix both A1 components: λ_min/λ_max of the weighted Gram
    matrix of the A1 basis with each ring's (weighted) mean removed (0: one direction free)."""
    n = int(rings.max()) + 1
    wsum = np.bincount(rings, w, n) + 1e-30
    centred = [b - (np.bincount(rings, w * b, n) / wsum)[rings] for b in basis[:2]]
    g = np.array([[np.sum(w * ci * cj) for cj in centred] for ci in centred])
    ev = np.linalg.eigvalsh(g)
    return float(ev[0] / max(ev[1], 1e-30))


def _best_of_starts(fun: Any, starts: Sequence[Sequence[float]]) -> Any:
    """The best BFGS result of ``fun`` (value, gradient) over several starting points."""
    best = None
    for x0 in starts:
        r = minimize(fun, np.asarray(x0, float), jac=True, method="BFGS")
        if best is None or r.fun < best.fun:
            best = r
    return best


def _phase_objective(q: np.ndarray, basis: np.ndarray, groups: np.ndarray | None) -> Any:
    """(−J, −∇J) of x (len ≤ rows of ``basis``) with e = q e^{2i x·basis}.

    ``groups`` None: J = Re Σ e (the weak-phase relation, arg p = π). Otherwise each group
    has its own free phase: J = Σ_groups |Σ_{g∈group} e|; ∇J = Σ Re(z̄/|z| · 2i basis e).
    """

    def f(x: np.ndarray) -> tuple[float, np.ndarray]:
        b = basis[: len(x)]
        e = q * np.exp(2j * (x @ b))
        if groups is None:
            return -float(e.real.sum()), 2.0 * (b @ e.imag)
        n = int(groups.max()) + 1
        z = np.bincount(groups, e.real, n) + 1j * np.bincount(groups, e.imag, n)
        r = np.abs(z) + 1e-30
        w = (np.conj(z) / r)[groups]
        return -float(r.sum()), -2.0 * (b @ (w * 1j * e).real)

    return f


def _agreement_terms(
    spectra: np.ndarray,
    bt: BandTransfer,
    rel_defocus_nm: np.ndarray,
    starts_nm: np.ndarray,
    env_s: np.ndarray,
    extra_chi: np.ndarray | None = None,
    chunk: int = 8,
) -> tuple[np.ndarray, ...]:
    """Sums over images for trial start defoci, each (k, m): U = Σ S_n e_n sin χ_n,
    V = Σ S_n e_n cos χ_n, and Σ e_n² sin², Σ e_n² sin·cos, Σ e_n² cos² (e_n = envelopes)."""
    k, m = len(starts_nm), spectra.shape[1]
    u, v = np.empty((k, m), np.complex64), np.empty((k, m), np.complex64)
    pss, psc, pcc = (np.empty((k, m), np.float32) for _ in range(3))
    env = bt.env_t[None] * env_s
    for c0 in range(0, k, chunk):
        st = np.asarray(starts_nm[c0 : c0 + chunk], np.float64)
        dfs = (st[:, None] + rel_defocus_nm[None]).reshape(-1)
        x = bt.chi(dfs).reshape(len(st), len(rel_defocus_nm), -1)
        if extra_chi is not None:
            x = x + extra_chi
        s = (np.sin(x) * env[None]).astype(np.float32)
        c = (np.cos(x) * env[None]).astype(np.float32)
        sl = slice(c0, c0 + len(st))
        u[sl] = np.einsum("knm,nm->km", s, spectra)
        v[sl] = np.einsum("knm,nm->km", c, spectra)
        pss[sl] = np.sum(s * s, axis=1)
        psc[sl] = np.sum(s * c, axis=1)
        pcc[sl] = np.sum(c * c, axis=1)
    return u, v, pss, psc, pcc


def _agreement_from_terms(terms, mag: np.ndarray, beta_rad: np.ndarray | float) -> np.ndarray:
    """a(g) for CTFs sin(χ_n + β): (len(β), k, m) for an array β, (k, m) for a scalar."""
    u, v, pss, psc, pcc = terms
    b = np.atleast_1d(np.asarray(beta_rad, np.float64))
    cb = np.cos(b).astype(np.float32)[:, None, None]
    sb = np.sin(b).astype(np.float32)[:, None, None]
    num = np.abs(cb * u[None] + sb * v[None])
    p = cb * cb * pss[None] + 2 * cb * sb * psc[None] + sb * sb * pcc[None]
    out = num / (mag[None, None] * np.sqrt(np.maximum(p, 0)) + 1e-30)
    return out if np.ndim(beta_rad) else out[0]


def phase_agreement(
    spectra: np.ndarray,
    prob_bt: BandTransfer,
    rel_defocus_nm: np.ndarray,
    starts_nm: np.ndarray,
    env_s: np.ndarray,
    extra_chi: np.ndarray | None = None,
    chunk: int = 8,
    beta_rad: float = 0.0,
) -> np.ndarray:
    """Per-frequency agreement a(g) ∈ [0, 1] of CTF-corrected images for trial start defoci.

    a(g) = |Σ_n S_n(g) s_n(g)| / √(Σ_n |S_n(g)|² · Σ_n s_n(g)²), s_n = sin(χ_n + β) ·
    envelopes, χ_n at defocus start + rel_n (plus ``extra_chi``, e.g. an A1 term). β = 0 is
    the weak-phase CTF; β ≠ 0 mixes in amplitude contrast (module doc). Returns (k, m).
    """
    mag = np.sqrt(np.sum(np.abs(spectra) ** 2, axis=0))
    terms = _agreement_terms(spectra, prob_bt, rel_defocus_nm, starts_nm, env_s, extra_chi, chunk)
    return _agreement_from_terms(terms, mag, beta_rad)


def _sector_masks(band: SpectralBand, n_sectors: int) -> np.ndarray:
    """(sectors, m) bool masks of azimuth sectors over [0, 180) (g and −g together)."""
    phi = np.mod(np.arctan2(band.gy, band.gx), math.pi)
    which = np.minimum((phi / math.pi * n_sectors).astype(int), n_sectors - 1)
    return which[None] == np.arange(n_sectors)[:, None]


def _parabolic_peak(x: np.ndarray, y: np.ndarray) -> float:
    j = int(np.argmax(y))
    if 0 < j < len(y) - 1:
        den = y[j - 1] - 2 * y[j] + y[j + 1]
        if den < 0:
            return float(x[j] + 0.5 * (x[1] - x[0]) * (y[j - 1] - y[j + 1]) / den)
    return float(x[j])


@dataclass
class AgreementFit:
    """Start defocus (nm) and A1 from Fourier-phase agreement of CTF-corrected images.

    ``amplitude_contrast_deg``: the fitted β of the CTF sin(χ + β) (0 = pure weak phase).
    ``astigmatism_uncertainty_nm``: 1σ of each Cartesian A1 component (NaN: not fitted).
    ``astigmatism_determined``: False when the data cannot fix A1 (too few sectors with signal,
    or the uncertainty exceeds the fitted magnitude); A1 is then reported as 0.
    """

    start_nm: float
    astigmatism_cartesian_nm: np.ndarray
    sector_angles_deg: np.ndarray
    sector_defocus_nm: np.ndarray
    trials_nm: np.ndarray
    agreement: np.ndarray
    amplitude_contrast_deg: float = 0.0
    astigmatism_uncertainty_nm: float = math.nan
    astigmatism_determined: bool = True
    sector_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))


BETA_TRIALS = np.radians(np.arange(0.0, 180.0, 5.0))


def fit_start_phase_agreement(
    spectra: np.ndarray,
    bt: BandTransfer,
    basis: np.ndarray,
    band: SpectralBand,
    rel_defocus_nm: np.ndarray,
    center_nm: float,
    range_nm: float,
    n_sectors: int = 6,
    fit_astigmatism: bool = True,
    amplitude_contrast: bool = False,
    mask: np.ndarray | None = None,
) -> AgreementFit:
    """Start defocus and A1 maximising the phase agreement (QFocus-like).

    The CTF of every image is sin(χ_n + β): β = 0 is the weak-phase object; a crystal's
    dynamical amplitude contrast (ψ − 1 ≈ c·R(r) with R real and one complex c, the channelling
    picture: the image term 2|c| R cos(χ − arg c)) is a β ≠ 0, fitted with the defocus when
    ``amplitude_contrast`` (otherwise β = 0, the weak-phase assumption). Measured: with β free
    the start moved by 1.3 nm on a synthetic pure-phase crystal and did not come within 1 nm
    on the simulator's SrTiO3 (β trades against defocus on the few low-order reflections), so
    it is off by default; crystals are better served by ``FocalParams(crystal=True)``.
    Coarse trials (0.5 nm) over center ± range, then 0.1 nm around the best; per azimuth
    sector over ±``SECTOR_HALF_RANGE_NM`` (the sector optima differ by up to ±|A1|); A1 from the
    sector optima (:func:`fit_sectors`), refined jointly by Nelder–Mead on the total. A1 is
    reported only when the sectors determine it with 1σ ≤ ``MAX_A1_SIGMA_NM`` per component
    (``astigmatism_determined``; ``astigmatism_uncertainty_nm`` is given either way);
    otherwise A1 = 0 and the start comes from the A1-free fit. Measured on the simulator's
    crystal-only fields (9 images, 1000 e/Å², truth A1 = 0 or 2 nm): SrTiO3 1 nm 0.14 ± 1.3 nm
    (truth 0) and 0.6 ± 1.9 nm (truth 2), Si [110] 2 nm undetermined (too few sectors with
    signal) — i.e. sector A1 on a crystal is not reliable at this dose; the crystal mode of
    :func:`register_focal_series` fits A1 from rings of equal |g| instead.
    """
    env_s = bt.spatial(center_nm + rel_defocus_nm)
    if mask is not None:  # frequencies an image does not contribute: no CTF there either
        env_s = env_s * mask
    mag = np.sqrt(np.sum(np.abs(spectra) ** 2, axis=0)).astype(np.float32)
    weight = mag
    betas = BETA_TRIALS if amplitude_contrast else np.zeros(1)

    def score_grid(trials, masks, beta=None, extra=None):
        terms = _agreement_terms(spectra, bt, rel_defocus_nm, trials, env_s, extra)
        a = _agreement_from_terms(terms, mag, betas if beta is None else np.array([beta]))
        return (a * weight) @ masks.T.astype(np.float32)  # (β, k, sectors)

    coarse = center_nm + np.arange(-range_nm, range_nm + 1e-9, 0.5)
    all_b = np.ones((1, band.size), bool)
    tot = score_grid(coarse, all_b)[:, :, 0]  # (β, k)
    jb = int(np.unravel_index(np.argmax(tot), tot.shape)[0])
    total = tot[jb]
    best = _parabolic_peak(coarse, total)
    fine = best + np.arange(-1.5, 1.5 + 1e-9, 0.1)
    tot_f = score_grid(fine, all_b)[:, :, 0]
    jb = int(np.unravel_index(np.argmax(tot_f), tot_f.shape)[0])
    beta = float(betas[jb])
    masks = _sector_masks(band, n_sectors)
    start = _parabolic_peak(fine, tot_f[jb])
    # sectors: a wider window, the sector optima differ by up to ±|A1|
    wide = start + np.arange(-SECTOR_HALF_RANGE_NM, SECTOR_HALF_RANGE_NM + 1e-9, 0.1)
    sec = score_grid(wide, masks, beta)[0]
    angles = (np.arange(n_sectors) + 0.5) * 180.0 / n_sectors
    sector_def = np.array([_parabolic_peak(wide, sec[:, j]) for j in range(n_sectors)])
    sw = (weight[None] * masks).sum(axis=1)
    spots = (masks & _spot_mask(spectra)[None]).sum(axis=1)
    inside = np.array([_peak_inside(sec[:, j]) for j in range(n_sectors)])
    fit = AgreementFit(
        start, np.zeros(2), angles, sector_def, coarse, total, math.degrees(beta), math.nan,
        False, sw,
    )  # fmt: skip
    if not fit_astigmatism:
        return fit
    sectors = fit_sectors(sector_def, angles, sw, spots, inside)
    fit.astigmatism_determined = sectors.determined
    fit.astigmatism_uncertainty_nm = sectors.sigma_nm
    if not sectors.determined:  # say so rather than invent an A1: start defocus alone
        return fit
    x0 = np.array([start, *sectors.coef[1:3], beta][: 4 if amplitude_contrast else 3])

    def neg(x):
        extra = (x[1] * basis[1] + x[2] * basis[2])[None]
        b = x[3] if len(x) > 3 else 0.0
        a = phase_agreement(spectra, bt, rel_defocus_nm, np.array([x[0]]), env_s, extra, 8, b)
        return -float((a[0] * weight).sum())

    simplex = _simplex(x0, (0.5, 1.0, 1.0, 0.2)[: len(x0)])
    res = minimize(
        neg, x0, method="Nelder-Mead",
        options={"xatol": 0.02, "fatol": 1e-7, "initial_simplex": simplex},
    )  # fmt: skip
    if sectors.sigma_nm > MAX_A1_SIGMA_NM:  # too uncertain to report: the start alone
        fit.astigmatism_determined = False
        return fit
    fit.start_nm, fit.astigmatism_cartesian_nm = float(res.x[0]), np.array(res.x[1:3])
    fit.amplitude_contrast_deg = math.degrees(float(res.x[3])) if amplitude_contrast else 0.0
    return fit


MAX_A1_SIGMA_NM = 0.5  # sector A1 more uncertain than this (1σ) is not reported
SECTOR_HALF_RANGE_NM = 5.0  # ± window of the per-sector defocus search around the start
MIN_SECTOR_SPOTS = 2  # strong frequencies a sector needs for its own defocus estimate
MIN_SECTOR_WEIGHT = 0.2  # … and this fraction of the mean sector weight
MIN_SECTOR_CONDITIONING = 0.05  # λ_min/λ_max of the A1 block of the sector design


@dataclass
class SectorFit:
    """C1(θ) = C1 + A1c cos 2θ + A1s sin 2θ fitted to per-sector defoci (nm)."""

    coef: np.ndarray
    sigma_nm: float
    used: np.ndarray
    determined: bool


def _peak_inside(y: np.ndarray) -> bool:
    """The maximum of a trial curve is an interior point (not at the edge of the trials)."""
    j = int(np.argmax(y))
    return 0 < j < len(y) - 1


def fit_sectors(
    sector_defocus_nm: np.ndarray,
    angles_deg: np.ndarray,
    weights: np.ndarray,
    spots: np.ndarray,
    inside: np.ndarray,
) -> SectorFit:
    """Weighted least squares of C1(θ) over the usable sectors, with an honest uncertainty.

    A sector is used when it holds ≥ ``MIN_SECTOR_SPOTS`` strong frequencies, ≥
    ``MIN_SECTOR_WEIGHT`` of the mean weight and its optimum lies inside the trial range. A1 is
    *determined* only with ≥ 4 such sectors (one degree of freedom for the scatter) whose
    angles constrain both components (conditioning ≥ ``MIN_SECTOR_CONDITIONING``); otherwise
    the caller reports no A1. ``sigma_nm``: 1σ of each Cartesian A1 component from the
    residual scatter, s² (DᵀWD)⁻¹ with s² = Σ w r² / (n − 3) (weights normalised to mean 1).
    """
    w = np.asarray(weights, np.float64)
    ok = (spots >= MIN_SECTOR_SPOTS) & (w >= MIN_SECTOR_WEIGHT * w.mean()) & inside
    t = np.radians(2.0 * np.asarray(angles_deg))
    design = np.stack([np.ones_like(t), np.cos(t), np.sin(t)], axis=1)
    if ok.sum() < 4:
        return SectorFit(np.zeros(3), math.nan, ok, False)
    d, y, wn = design[ok], sector_defocus_nm[ok], w[ok] / w[ok].mean()
    normal = d.T @ (wn[:, None] * d)
    block = np.linalg.eigvalsh(normal[1:, 1:])
    if block[0] < MIN_SECTOR_CONDITIONING * block[1]:
        return SectorFit(np.zeros(3), math.nan, ok, False)
    coef = np.linalg.solve(normal, d.T @ (wn * y))
    r = y - d @ coef
    s2 = float(np.sum(wn * r * r)) / (ok.sum() - 3)
    cov = s2 * np.linalg.inv(normal)
    sigma = math.sqrt(max(0.5 * (cov[1, 1] + cov[2, 2]), 0.0))
    return SectorFit(coef, sigma, ok, True)


def _simplex(x0: np.ndarray, steps: Sequence[float]) -> np.ndarray:
    """Nelder–Mead start simplex: x0 and x0 + step_i e_i."""
    pts = [x0]
    for i, s in enumerate(steps):
        p = x0.copy()
        p[i] += s
        pts.append(p)
    return np.array(pts)


# --------------------------------------------------------------------------------------------
# the public registration
# --------------------------------------------------------------------------------------------
def register_focal_series(
    stack: ImageStack,
    optics: Optics,
    params: FocalParams | None = None,
    *,
    nominal_defocus_nm: np.ndarray | None = None,
    pixel_nm: float | None = None,
    mtf: Any = None,
    nps: Any = None,
) -> FocalRegistration:
    """Register a through-focus series: per-image defocus, drift, peak height; absolute C1, A1.

    ``optics``: instrument (its ``defocus_nm`` is ignored; its A1 is the starting value).
    ``nominal_defocus_nm`` (n,) overrides the stack records; ``pixel_nm`` overrides
    ``stack.pixel_size_nm``. ``mtf`` (see :func:`camera_curve_to_grid`) enters the predicted
    image spectra with the vibration envelope; ``nps`` (relative camera noise power, same
    forms) weights the final shift refinement (``FocalParams.shift_prior_scale``). See the
    module docstring for the method and conventions.
    """
    t0 = time.perf_counter()
    p = params or FocalParams()
    n = stack.n_frames
    if n < MIN_IMAGES:
        raise ValueError(f"a focal series needs at least {MIN_IMAGES} images; got {n}")
    nominal = stack.column("defocus_nominal_nm") if nominal_defocus_nm is None else None
    nominal = check_nominal_defocus(
        nominal if nominal_defocus_nm is None else nominal_defocus_nm, n
    )
    pix = float(pixel_nm if pixel_nm is not None else stack.pixel_size_nm[1])
    ref = _choose_reference(nominal, optics, p.reference)
    used = _used_mask(n, p.exclude, ref)
    if p.absolute not in ("wave", "phase_agreement", "none"):
        raise ValueError(f"absolute must be 'wave', 'phase_agreement' or 'none'; got {p.absolute}")
    steps = np.abs(np.diff(nominal))
    rng_nm = p.search_range_nm if p.search_range_nm else 0.3 * float(np.median(steps)) + 1.0

    prob = _Problem(intensity_frames(stack), optics, pix, nominal, p, mtf, nps)
    if p.crystal:
        d_abs, shifts, peaks = _first_pass_crystal(prob, ref, nominal, used)
    else:
        d_abs, shifts, peaks = _first_pass(prob, ref, nominal, used, rng_nm)
    history = [{"pass": 0, "relative_defocus_nm": (d_abs - d_abs[ref]).tolist()}]
    a1_c = _cartesian_a1(optics.a1_nm, optics.a1_deg)
    basis = _chi_basis(optics, prob.grid, prob.band)
    fine_range = 3.0
    passes = 0
    for rounds in range(2):  # absolute defocus / A1 rounds
        for it in range(max(p.iterations, 0)):
            ok = used & (peaks >= _flag_level(prob, peaks, used))
            ok[ref] = True
            if ok.sum() < MIN_IMAGES:
                break
            # the first wave pass searches as widely as the first pass (FFT shifts, ±range) so
            # that an image the reference-based start got wrong is recovered
            wide = passes == 0 and not p.crystal
            if p.crystal:
                # κ once per round (measured: refitting it in every pass changed nothing on
                # the simulator's SrTiO3 and Si [110] at 512², and cost 0.5 s)
                new_d, new_s, new_p = _crystal_pass(
                    prob, ref, nominal, d_abs, shifts, ok, fit_kappa=it == 0
                )
            else:
                new_d, new_s, new_p, _ = _wave_pass(
                    prob, ref, d_abs, shifts, peaks, ok, rng_nm if wide else fine_range, wide
                )
            change_d = np.max(np.abs(new_d - d_abs))
            change_s = np.max(np.abs(new_s - shifts))
            d_abs, shifts, peaks = new_d, new_s, new_p
            passes += 1
            history.append(
                {
                    "pass": passes,
                    "max_change_nm": float(change_d),
                    "max_change_px": float(change_s),
                    "relative_defocus_nm": (d_abs - d_abs[ref]).tolist(),
                }
            )
            if change_d < p.tolerance_nm and change_s < p.tolerance_px:
                break
        if p.absolute == "none":
            break
        ok = used & (peaks >= _flag_level(prob, peaks, used))
        ok[ref] = True
        search = p.absolute_range_nm if rounds == 0 else 3.0
        info: dict[str, Any] = {}
        delta, d_ast = _absolute_correction(prob, d_abs, shifts, ok, basis, p, search, info)
        d_abs = d_abs + delta
        a1_c = a1_c + d_ast
        mag, ang = _polar_a1(a1_c)
        prob.set_optics(optics.with_(a1_nm=mag, a1_deg=ang, defocus_nm=0.0))
        history.append({"absolute_correction_nm": delta, "a1_nm": mag, "a1_deg": ang, **info})
        if abs(delta) < 0.05 and np.hypot(*d_ast) < 0.05:
            break
    if p.shift_prior_scale is not None and not p.crystal:
        ok = used & (peaks >= _flag_level(prob, peaks, used))
        ok[ref] = True
        if ok.sum() >= MIN_IMAGES:
            shifts, _ = _refine_shifts(prob, ref, d_abs, shifts, ok, p.shift_prior_scale)
    if p.thickness_nm is not None and p.absolute == "wave" and not p.crystal:
        d_abs = d_abs - 0.5 * float(p.thickness_nm)  # mid-plane → exit surface
    flagged = peaks < _flag_level(prob, peaks, used)
    flagged[ref] = False
    if p.crystal and flagged.any():  # no lattice to register: the smooth drift line instead
        good = np.flatnonzero(used & ~flagged)
        coef = np.polyfit(good.astype(float), shifts[good], 1)
        bad = np.flatnonzero(flagged)
        shifts = shifts.copy()
        shifts[bad] = coef[0] * bad[:, None] + coef[1]
    mag, ang = _polar_a1(a1_c)
    return FocalRegistration(
        reference_index=ref,
        nominal_defocus_nm=nominal,
        relative_defocus_nm=d_abs - d_abs[ref],
        defocus_nm=d_abs,
        shifts_px=shifts,
        peak_heights=peaks,
        flagged=flagged,
        used=used & ~flagged,
        astigmatism_nm=mag,
        astigmatism_deg=ang,
        seconds=time.perf_counter() - t0,
        passes=passes,
        history=history,
    )


def _absolute_correction(
    prob, d_abs, shifts, ok, basis, p, search, info=None
) -> tuple[float, np.ndarray]:
    """(δC1 nm, δA1 cartesian nm) from the restored wave or from phase agreement."""
    aligned = prob.spectra * shift_phase(prob.band, shifts)
    if p.absolute == "phase_agreement":
        ref_d = float(d_abs[0])
        fit = fit_start_phase_agreement(
            aligned[ok],
            prob.bt,
            basis,
            prob.band,
            (d_abs - ref_d)[ok],
            ref_d,
            search,
            fit_astigmatism=p.fit_astigmatism,
            mask=prob.mask[ok],
        )
        return fit.start_nm - ref_d, fit.astigmatism_cartesian_nm
    if p.crystal:  # the exit-surface criterion depends on the band: the common one (measured
        prob = prob.common()  # on SrTiO3 1 nm: 0.35 nm, against 2.0 nm on the per-image band)
        aligned = prob.spectra * shift_phase(prob.band, shifts)
        basis = _chi_basis(prob.optics, prob.grid, prob.band)
    t = prob.bt.transfer(d_abs[ok], prob.bt.spatial(d_abs[ok]))
    sol = solve_series(
        aligned[ok], t, prob.band, camera=prob.camera, corrections=3 if p.crystal else 1,
        mask=prob.mask[ok],
    )  # fmt: skip
    cov12 = pair_noise_covariance(sol.terms.sums(), 1.0 / sol.prior)
    delta, ast = fit_defocus_astigmatism_wave(
        sol.phi, basis, prob.band, search, p.fit_astigmatism, cov12, p.crystal, info
    )
    if p.pure_phase_refinement:
        delta = refine_defocus_min_amplitude(sol.phi, basis, prob.band, delta, ast)
    return delta, ast


def refine_defocus_min_amplitude(
    phi: np.ndarray,
    basis: np.ndarray,
    band: SpectralBand,
    delta_nm: float,
    ast: np.ndarray,
    half_range_nm: float = 1.5,
) -> float:
    """Refine δC1 so that the propagated wave 1 + F⁻¹[φ e^{iΔχ}] has the least amplitude
    variance (a pure phase object, without the weak-phase linearisation: strong objects).

    Evaluated on the band's alias-free product box; Brent within ±``half_range_nm``.
    """
    (by, bx), pos = band.product_box
    scale = np.float32(by * bx / (band.shape[0] * band.shape[1]))
    fixed = ast[0] * basis[1] + ast[1] * basis[2]

    def amp_var(d: float) -> float:
        grid = np.zeros(by * bx, np.complex64)
        grid[pos] = phi * np.exp(1j * (d * basis[0] + fixed)).astype(np.complex64) * scale
        wave = sfft.ifft2(grid.reshape(by, bx), workers=fft_workers()) + np.complex64(1.0)
        return float(np.var(np.abs(wave)))

    res = minimize_scalar(
        amp_var,
        bounds=(delta_nm - half_range_nm, delta_nm + half_range_nm),
        method="bounded",
        options={"xatol": 0.01},
    )
    return float(res.x)


def restore_stack(
    stack: ImageStack,
    registration: FocalRegistration,
    optics: Optics,
    *,
    pixel_nm: float | None = None,
    mtf: Any = None,
    nps: Any = None,
    area: tuple[int, int, int, int] | None = None,
    iterations: int = 0,
    use_dose_weights: bool = True,
) -> RestorationResult:
    """Restore the exit wave of a registered stack (the pipeline's ``restore`` step).

    Removes the recorded camera offset, uses the registration's absolute defocus, drift, A1 and
    ``used`` images, and the per-frame doses of the records as noise weights when all are known
    (``use_dose_weights``). Other arguments as :func:`restore_exit_wave`.
    """
    pix = float(pixel_nm if pixel_nm is not None else stack.pixel_size_nm[1])
    doses = stack.column("dose_e_per_A2").astype(np.float64)
    dose_w = doses if use_dose_weights and np.all(np.isfinite(doses) & (doses > 0)) else None
    return restore_exit_wave(
        intensity_frames(stack),
        optics,
        pix,
        registration.defocus_nm,
        registration.shifts_px,
        used=registration.used,
        mtf=mtf,
        nps=nps,
        dose_weights=dose_w,
        area=area,
        iterations=iterations,
        astigmatism=(registration.astigmatism_nm, registration.astigmatism_deg),
    )


# --------------------------------------------------------------------------------------------
# structure image (fixed step, automatic start defocus)
# --------------------------------------------------------------------------------------------
@dataclass
class StructureImageResult:
    """CTF-corrected average of a fixed-step series (weak-phase estimate, float32 (y, x))."""

    image: np.ndarray
    reference_index: int
    start_defocus_nm: float
    defocus_nm: np.ndarray
    astigmatism_nm: float
    astigmatism_deg: float
    shifts_px: np.ndarray
    sector_angles_deg: np.ndarray
    sector_defocus_nm: np.ndarray
    trials_nm: np.ndarray
    agreement: np.ndarray
    seconds: float
    astigmatism_uncertainty_nm: float = math.nan
    astigmatism_determined: bool = True
    method: str = "phase_agreement"


def structure_image(
    stack: ImageStack,
    optics: Optics,
    step_nm: float,
    *,
    start_range_nm: tuple[float, float] | None = None,
    pixel_nm: float | None = None,
    shifts_px: np.ndarray | None = None,
    n_sectors: int = 6,
    fit_astigmatism: bool = True,
    area: tuple[int, int, int, int] | None = None,
    wiener_snr: float = 10.0,
    crystal: bool = False,
) -> StructureImageResult:
    """QFocus-like structure image: start defocus from Fourier-phase agreement, A1 by sectors.

    Defocus of image i = start + i·``step_nm``. ``start_range_nm`` = (lo, hi) searched (default:
    the recorded nominal start ± 20 nm, or around Scherzer if none). Drift is measured first by
    :func:`register_focal_series` (no absolute step; ``shifts_px`` skips that). The image is
    the CTF-corrected average Σ S_n s_n / (Σ s_n² + 1/snr) in the reference image's frame:
    the projected potential's sign, atoms bright.

    A1 by sectors is reported with ``astigmatism_uncertainty_nm`` (1σ per Cartesian component,
    :func:`fit_sectors`); when too few sectors carry signal ``astigmatism_determined`` is False
    and A1 is 0 (not fitted) rather than invented.

    ``crystal=True`` (a crystal-only field of a thick or strongly scattering crystal, whose
    amplitude contrast breaks the weak-phase agreement): drift, one step scale, the start
    defocus (exit surface) and A1 come from :func:`register_focal_series` with
    ``FocalParams(crystal=True)`` (``method`` = "crystal"); the sector arrays are then the
    weak-phase agreement evaluated around that start, for inspection only.
    """
    t0 = time.perf_counter()
    n = stack.n_frames
    if n < MIN_IMAGES:
        raise ValueError(f"a focal series needs at least {MIN_IMAGES} images; got {n}")
    if not (math.isfinite(step_nm) and step_nm != 0):
        raise ValueError(f"step_nm must be a non-zero number; got {step_nm}")
    pix = float(pixel_nm if pixel_nm is not None else stack.pixel_size_nm[1])
    if start_range_nm is None:
        rec = stack.column("defocus_nominal_nm")
        c = float(rec[0]) if np.isfinite(rec[0]) else optics.scherzer_defocus_nm() - step_nm * n / 2
        start_range_nm = (c - 20.0, c + 20.0)
    lo, hi = sorted(float(v) for v in start_range_nm)
    center, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    rel = step_nm * np.arange(n, dtype=np.float64)
    if crystal:
        return _structure_image_crystal(
            stack, optics, pix, center + rel, half, n_sectors, fit_astigmatism, area,
            wiener_snr, t0,
        )  # fmt: skip
    # the weak-phase agreement as measured: the common band and the restoration's prior
    params = FocalParams(
        area=area, iterations=2, absolute="none", prior_scale=1.0, per_image_delocalisation=False
    )
    if shifts_px is None:
        reg = register_focal_series(
            stack, optics, params, nominal_defocus_nm=center + rel, pixel_nm=pix
        )
        shifts, ref = reg.shifts_px, reg.reference_index
    else:
        ref = _choose_reference(center + rel, optics, None)
        shifts = np.asarray(shifts_px, np.float64)
        if shifts.shape != (n, 2):
            raise ValueError(f"shifts_px must be ({n}, 2); got {shifts.shape}")
    fit = _phase_agreement_of(
        stack, optics, optics, pix, center + rel, params, shifts, center, half, n_sectors,
        fit_astigmatism,
    )  # fmt: skip
    mag, ang = _polar_a1(fit.astigmatism_cartesian_nm)
    return _structure_result(
        stack, optics, pix, fit, fit.start_nm + rel, (mag, ang), shifts, ref, area, wiener_snr,
        t0, astigmatism_uncertainty_nm=fit.astigmatism_uncertainty_nm,
        astigmatism_determined=fit.astigmatism_determined or not fit_astigmatism,
    )  # fmt: skip


def _phase_agreement_of(
    stack, band_optics, optics, pix, defocus, params, shifts, center, half, n_sectors, fit_a1
) -> AgreementFit:
    """:func:`fit_start_phase_agreement` of the stack aligned by ``shifts``, on the band of
    ``band_optics`` at ``defocus`` (relative defocus = ``defocus`` − its first value)."""
    prob = _Problem(intensity_frames(stack), band_optics, pix, defocus, params)
    aligned = prob.spectra * shift_phase(prob.band, shifts)
    basis = _chi_basis(optics, prob.grid, prob.band)
    rel = defocus - defocus[0]
    return fit_start_phase_agreement(
        aligned, prob.bt, basis, prob.band, rel, center, half, n_sectors, fit_a1, mask=prob.mask
    )


def _structure_result(
    stack, optics, pix, fit, defocus, a1, shifts, ref, area, snr, t0, **extra
) -> StructureImageResult:
    """The CTF-corrected average at ``defocus`` with A1 = (nm, deg), and its result record
    (sector diagnostics from ``fit``)."""
    opt_a1 = optics.with_(a1_nm=a1[0], a1_deg=a1[1])
    image = _ctf_corrected_average(intensity_frames(stack), opt_a1, pix, defocus, shifts, area, snr)
    return StructureImageResult(
        image=image,
        reference_index=ref,
        start_defocus_nm=float(defocus[0]),
        defocus_nm=defocus,
        astigmatism_nm=a1[0],
        astigmatism_deg=a1[1],
        shifts_px=shifts,
        sector_angles_deg=fit.sector_angles_deg,
        sector_defocus_nm=fit.sector_defocus_nm,
        trials_nm=fit.trials_nm,
        agreement=fit.agreement,
        seconds=time.perf_counter() - t0,
        **extra,
    )


def _structure_image_crystal(
    stack, optics, pix, nominal, half, n_sectors, fit_astigmatism, area, snr, t0
) -> StructureImageResult:
    """:func:`structure_image` with ``crystal=True`` (see there)."""
    params = FocalParams(
        area=area, crystal=True, absolute_range_nm=half, fit_astigmatism=fit_astigmatism
    )
    reg = register_focal_series(stack, optics, params, nominal_defocus_nm=nominal, pixel_nm=pix)
    defocus = reg.defocus_nm
    a1 = (reg.astigmatism_nm, reg.astigmatism_deg)
    opt_a1 = optics.with_(a1_nm=a1[0], a1_deg=a1[1])
    diag = _phase_agreement_of(
        stack, opt_a1, optics, pix, defocus, params, reg.shifts_px, float(defocus[0]), 3.0,
        n_sectors, False,
    )  # fmt: skip
    return _structure_result(
        stack, optics, pix, diag, defocus, a1, reg.shifts_px, reg.reference_index, area, snr,
        t0, astigmatism_uncertainty_nm=math.nan, astigmatism_determined=True, method="crystal",
    )  # fmt: skip


def _ctf_corrected_average(frames, optics, pix, defocus, shifts, area, snr) -> np.ndarray:
    data = crop_area(frames, area)
    spec = frame_spectra(data, 8 if area is not None else 0)
    grid = FrequencyGrid(spec.shape[-2:], (pix, pix))
    band = information_band(optics, grid, defocus, np.ones(grid.shape, np.float32))
    bt = BandTransfer(optics, grid, band)
    s = 2.0 * np.sin(bt.chi(defocus)) * bt.env_t[None] * bt.spatial(defocus)
    sp = band.gather(spec) * shift_phase(band, shifts)
    est = np.sum(sp * s, axis=0) / (np.sum(s * s, axis=0) + 1.0 / snr)
    img = sfft.ifft2(band.scatter(est.astype(np.complex64)), workers=fft_workers()).real
    return img.astype(np.float32)


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def plot_registration(result: FocalRegistration, out_dir: str | Path) -> list[Path]:
    """PNGs in ``out_dir``: fitted focus vs index with a line fit and residuals, peak heights,
    drift y/x vs index. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    idx = np.arange(len(result.defocus_nm))
    u = result.used
    paths = []

    fig, (ax, axr) = plt.subplots(2, 1, figsize=(6, 6), sharex=True, height_ratios=(3, 1))
    ax.plot(idx, result.nominal_defocus_nm, "x", color="0.6", label="nominal")
    ax.plot(idx[u], result.defocus_nm[u], "o", label="fitted")
    ax.plot(idx[~u], result.defocus_nm[~u], "o", mfc="none", color="r", label="not used")
    if u.sum() >= 2:
        k, c = np.polyfit(idx[u], result.defocus_nm[u], 1)
        ax.plot(idx, k * idx + c, "-", lw=1, label=f"line: step {k:.2f} nm")
        axr.plot(idx, result.defocus_nm - (k * idx + c), "o-")
    ax.set_ylabel("defocus C1 (nm)")
    ax.legend(fontsize=8)
    axr.axhline(0, color="0.5", lw=0.5)
    axr.set_ylabel("residual (nm)")
    axr.set_xlabel("image index")
    paths.append(_save(fig, out / "focus_vs_index.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(idx, result.peak_heights, color=np.where(result.flagged, "r", "C0"))
    ax.axhline(0.01, color="r", ls="--", lw=0.8, label="0.01 (suspect below)")
    ax.set_xlabel("image index")
    ax.set_ylabel("correlation peak")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "peak_heights.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(idx, result.shifts_px[:, 1], "o-", label="x")
    ax.plot(idx, result.shifts_px[:, 0], "s-", label="y")
    ax.set_xlabel("image index")
    ax.set_ylabel("drift (px)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "drift.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
