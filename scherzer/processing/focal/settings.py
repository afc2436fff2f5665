"""Focal-series registration settings: :class:`FocalParams`, its tuning constants and the
automatic rules that fill its ``None`` fields.

One job: say what can be tuned and how the automatic choices are made — :meth:`FocalParams.resolved`
(field-independent: the registration prior, per-image delocalisation) and
:meth:`FocalParams.for_field` (from the frames: taper, spot clipping, whitening and the
delocalisation limit of a non-periodic field, :func:`edge_discontinuity`). The stages read the
resolved settings; none of them invents a number of its own that a user might want to change.

Conventions: lengths in nm and px at this boundary (``*_nm``, ``*_px``); frame indices count
from 0. ``FocalParams`` is a dataclass that pydantic validates at the edge
(``pydantic.TypeAdapter(FocalParams).validate_python({...})``): unknown keys are rejected with
their name, ``area``/``exclude`` are tuples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pydantic

__all__ = ["FocalParams", "edge_discontinuity"]

MIN_IMAGES = 3  # a wave needs ≥ 3 images (two restore no wave); fewer is refused

MIN_TAPER_PX = 12
TAPER_FIELD_DIVISOR = 10  # automatic edge taper of a non-periodic field: a tenth of the field
# … on fields at least this wide (the simulator's 256² crystal edge with reference 8: a 25-px
# taper let image 9 jump by 2 px; 12 px did not)
WIDE_TAPER_MIN_FIELD_PX = 384
NONPERIODIC_EDGE_RATIO = 1.05  # edge_discontinuity above this: content enters from outside
WAVE_SPOT_CLIP = 1.5  # automatic clip_spots_wave of a non-periodic field
WAVE_WHITEN = 0.5  # automatic whiten of a non-periodic field
# Wiener prior of the waves that predict images during registration, × the restoration's:
# weak for amorphous fields (a strong prior biases the fitted defocus: 0.44 → 0.05 nm RMS at
# 100 e/Å²), the restoration's own for a crystal's few spots (1e4: 0.053 instead of 0.039 px
# drift on SrTiO3)
FOCUS_LINE_SIGMA_NM = 0.3  # default σ_p of the joint solution (.joint): the true focus's
# scatter about a line (lens hysteresis, uneven settling); smaller pulls noisy estimates
# harder onto the line, larger trusts each image
AMORPHOUS_PRIOR_SCALE = 1e4
CRYSTAL_PRIOR_SCALE = 1.0


def edge_discontinuity(frames: np.ndarray) -> float:
    """Mean |jump| across the periodic wrap (first vs last row/column) over the mean |step|
    between neighbouring pixels, of mean-normalised frames (n, y, x). ≈ 1 for a periodic
    field (also when noise dominates); measured 1.23–1.40 for the simulator's 256²–512²
    crystal edge (a crop of a larger specimen), 1.00–1.02 for periodic synthetic series."""
    wrap = step = 0.0
    for x in np.asarray(frames, np.float32).reshape(-1, *np.shape(frames)[-2:]):
        # frame by frame, no normalised copy: the temporaries stay small (20 × 512² read from
        # a file: 0.03–0.20 s → 0.01 s in the CLI's process)
        m = max(float(x.mean(dtype=np.float64)), 1e-30)
        wrap += (np.mean(np.abs(x[:, 0] - x[:, -1])) + np.mean(np.abs(x[0] - x[-1]))) / m
        step += (np.mean(np.abs(np.diff(x, axis=-1))) + np.mean(np.abs(np.diff(x, axis=-2)))) / m
    return float(wrap / max(step, 1e-30))


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
    :func:`~.absolute.fit_chi_free_phase`). Images with almost no lattice contrast are
    flagged (:meth:`~.crystal.CrystalStrategy.flag_level`) and get the drift line's shift.
    Not automatic: a crystal edge under amorphous film has as much power in its spots as a
    crystal-only field, so choose it.
    ``per_image_delocalisation`` (None: automatic, see :meth:`resolved`): the
    ``max_delocalisation`` limit leaves a frequency out only for the images that delocalise it
    beyond the limit, and the band keeps frequencies that ≥ ``DELOC_MIN_FRACTION`` of the
    images keep (False: out for all images, the band of the worst image).
    ``prior_scale`` (None: automatic): the Wiener prior of the waves that predict images
    during registration is this many times weaker than the restoration's (see
    :func:`scherzer.processing.spectral.solve_series`; 1 = the restoration's).
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
    ``focus_line_sigma_nm``: the linear-drift prior of the joint relative-defocus solution
    (:func:`~.joint.joint_defocus`): the expected scatter of the true focus about a straight
    line in the nominal defocus; estimates scattering more than that are pulled towards the
    line in proportion to their noise (None: off, each image's own estimate).
    ``model_fallback``: when the one-object-term model does not predict the Bragg spots
    (a thick crystal, :mod:`~.misfit`; always reported, with a warning), the joint solution's
    line takes the step scale fitted on the spots with the restored wave updated, instead of
    the line through the per-image estimates (False: report only). Measured on the abTEM
    SrTiO3 edges (issue #15) and the simulator's crystal edge: step scale error 0.2–2.1 % →
    0.0–0.3 % (benchmarks/crosscheck_abtem.py).
    """

    __pydantic_config__ = pydantic.ConfigDict(extra="forbid")

    reference: int | None = None
    search_range_nm: float | None = None
    iterations: int = 3
    exclude: tuple[int, ...] = ()
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
    absolute: Literal["wave", "phase_agreement", "none"] = "wave"
    absolute_range_nm: float = 20.0
    fit_astigmatism: bool = True
    pure_phase_refinement: bool = False
    crystal: bool = False
    thickness_nm: float | None = None
    prior_scale: float | None = None
    per_image_delocalisation: bool | None = None
    shift_prior_scale: float | None = 1.0
    focus_line_sigma_nm: float | None = FOCUS_LINE_SIGMA_NM
    model_fallback: bool = True

    def resolved(self) -> FocalParams:
        """A copy with the automatic (None) settings filled in: ``per_image_delocalisation``
        True; ``prior_scale`` 1e4, or 1 for ``crystal`` (a crystal's few spots need the
        restoration's prior: 1e4 gave 0.053 instead of 0.039 px drift on SrTiO3)."""
        auto = CRYSTAL_PRIOR_SCALE if self.crystal else AMORPHOUS_PRIOR_SCALE
        ps = self.prior_scale if self.prior_scale is not None else auto
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
