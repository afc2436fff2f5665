"""Structure image of a fixed-step series (QFocus-like): no amorphous area needed.

One job: :func:`structure_image` — drift from the registration, the start defocus and A1 from
Fourier-phase agreement (:mod:`.agreement`) or, for a crystal-only field of a thick or strongly
scattering crystal (``StructureParams(crystal=True)``), from the crystal registration, then the
CTF-corrected average Σ S_n s_n / (Σ s_n² + 1/snr) in the reference image's frame (the
projected potential's sign: atoms bright).

Conventions: defocus of image i = start + i·``step_nm`` (nm, C1 < 0 underfocus); shifts px
with frame_i(r) ≈ ref(r − s_i); A1 as (nm, deg in [0, 180)). :class:`StructureParams` is
validated by pydantic at the edge (unknown keys rejected).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pydantic
import scipy.fft as sfft

from scherzer.optics import FrequencyGrid, Optics, fft_workers
from scherzer.processing.focal.absolute import chi_basis, polar_a1
from scherzer.processing.focal.agreement import AgreementFit, fit_start_phase_agreement
from scherzer.processing.focal.inputs import choose_reference, intensity_frames
from scherzer.processing.focal.problem import Problem
from scherzer.processing.focal.register import register_focal_series
from scherzer.processing.focal.settings import MIN_IMAGES, FocalParams
from scherzer.processing.spectral import (
    BandTransfer,
    crop_area,
    frame_spectra,
    information_band,
    shift_phase,
)
from scherzer.stack import ImageStack

__all__ = ["StructureImageResult", "StructureParams", "structure_image"]

DEFAULT_START_HALF_RANGE_NM = 20.0  # start defocus searched ± this around the recorded one
AREA_TAPER_PX = 8  # edge taper of a selected area in the CTF-corrected average
REGISTRATION_PASSES = 2  # wave passes of the drift registration (absolute defocus not needed)
CRYSTAL_DIAGNOSTIC_RANGE_NM = 3.0  # crystal mode: ± range of the (inspection-only) sector scan


@dataclass
class StructureParams:
    """Settings of :func:`structure_image` (typed; built once at the edge).

    ``start_range_nm``: (lo, hi) start defocus searched (None: the recorded nominal start
    ± ``DEFAULT_START_HALF_RANGE_NM``, or around Scherzer if none). ``n_sectors``: azimuth
    sectors of the A1 fit. ``fit_astigmatism``: fit A1. ``area``: (y0, x0, h, w) px
    registered and averaged. ``wiener_snr``: the average's Wiener constant 1/snr.
    ``crystal``: a crystal-only field of a thick or strongly scattering crystal, whose
    amplitude contrast breaks the weak-phase agreement: drift, one step scale, the start
    defocus (exit surface) and A1 come from :func:`register_focal_series` with
    ``FocalParams(crystal=True)``.
    """

    __pydantic_config__ = pydantic.ConfigDict(extra="forbid")

    start_range_nm: tuple[float, float] | None = None
    n_sectors: int = 6
    fit_astigmatism: bool = True
    area: tuple[int, int, int, int] | None = None
    wiener_snr: float = 10.0
    crystal: bool = False


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
    params: StructureParams | None = None,
    *,
    pixel_nm: float | None = None,
    shifts_px: np.ndarray | None = None,
    start_range_nm: tuple[float, float] | None = None,
    n_sectors: int | None = None,
    fit_astigmatism: bool | None = None,
    area: tuple[int, int, int, int] | None = None,
    wiener_snr: float | None = None,
    crystal: bool | None = None,
) -> StructureImageResult:
    """QFocus-like structure image: start defocus from Fourier-phase agreement, A1 by sectors.

    Defocus of image i = start + i·``step_nm``; ``params``: :class:`StructureParams` (or its
    fields as keywords — not both). Drift is measured first by :func:`register_focal_series`
    (``shifts_px`` skips that). The image is the CTF-corrected average Σ S_n s_n /
    (Σ s_n² + 1/snr) in the reference image's frame: the projected potential's sign, atoms
    bright. A1 by sectors is reported with ``astigmatism_uncertainty_nm`` (1σ per Cartesian
    component, :func:`fit_sectors`); when too few sectors carry signal
    ``astigmatism_determined`` is False and A1 is 0 rather than invented. With ``crystal``
    (``method`` = "crystal") drift, one step scale, the start defocus (exit surface) and A1
    come from the crystal registration; the sector arrays are then the weak-phase agreement
    around that start, for inspection only.
    """
    t0 = time.perf_counter()
    kw = {"start_range_nm": start_range_nm, "n_sectors": n_sectors, "area": area,
          "fit_astigmatism": fit_astigmatism, "wiener_snr": wiener_snr,
          "crystal": crystal}  # fmt: skip
    sp = _structure_params(params, kw)
    n = stack.n_frames
    if n < MIN_IMAGES:
        raise ValueError(f"a focal series needs at least {MIN_IMAGES} images; got {n}")
    if not (math.isfinite(step_nm) and step_nm != 0):
        raise ValueError(f"step_nm must be a non-zero number; got {step_nm}")
    pix = float(pixel_nm if pixel_nm is not None else stack.pixel_size_nm[1])
    lo, hi = _start_range(stack, optics, step_nm, sp.start_range_nm)
    center, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    rel = step_nm * np.arange(n, dtype=np.float64)
    if sp.crystal:
        return _structure_image_crystal(stack, optics, pix, center + rel, half, sp, t0)
    # the weak-phase agreement as measured: the common band and the restoration's prior
    params = FocalParams(
        area=sp.area, iterations=REGISTRATION_PASSES, absolute="none", prior_scale=1.0,
        per_image_delocalisation=False,
    )  # fmt: skip
    if shifts_px is None:
        reg = register_focal_series(
            stack, optics, params, nominal_defocus_nm=center + rel, pixel_nm=pix
        )
        shifts, ref = reg.shifts_px, reg.reference_index
    else:
        ref = choose_reference(center + rel, optics, None)
        shifts = np.asarray(shifts_px, np.float64)
        if shifts.shape != (n, 2):
            raise ValueError(f"shifts_px must be ({n}, 2); got {shifts.shape}")
    fit = _phase_agreement_of(
        stack, optics, optics, pix, center + rel, params, shifts, center, half, sp.n_sectors,
        sp.fit_astigmatism,
    )  # fmt: skip
    mag, ang = polar_a1(fit.astigmatism_cartesian_nm)
    return _structure_result(
        stack, optics, pix, fit, fit.start_nm + rel, (mag, ang), shifts, ref, sp.area,
        sp.wiener_snr, t0, astigmatism_uncertainty_nm=fit.astigmatism_uncertainty_nm,
        astigmatism_determined=fit.astigmatism_determined or not sp.fit_astigmatism,
    )  # fmt: skip


def _start_range(stack, optics, step_nm: float, given) -> tuple[float, float]:
    """(lo, hi) nm of the start defocus search: ``given``, else the recorded nominal start
    ± ``DEFAULT_START_HALF_RANGE_NM`` (around Scherzer when none is recorded)."""
    if given is None:
        n = stack.n_frames
        rec = stack.column("defocus_nominal_nm")
        c = float(rec[0]) if np.isfinite(rec[0]) else optics.scherzer_defocus_nm() - step_nm * n / 2
        given = (c - DEFAULT_START_HALF_RANGE_NM, c + DEFAULT_START_HALF_RANGE_NM)
    lo, hi = sorted(float(v) for v in given)
    return lo, hi


def _structure_params(params: StructureParams | None, keywords: dict) -> StructureParams:
    """``params``, or one built from the keyword form (None = the default); not both."""
    given = {k: v for k, v in keywords.items() if v is not None}
    if params is None:
        return StructureParams(**given)
    if given:
        raise TypeError(f"structure_image: give StructureParams or {sorted(given)}, not both")
    return params


def _phase_agreement_of(
    stack, band_optics, optics, pix, defocus, params, shifts, center, half, n_sectors, fit_a1
) -> AgreementFit:
    """:func:`fit_start_phase_agreement` of the stack aligned by ``shifts``, on the band of
    ``band_optics`` at ``defocus`` (relative defocus = ``defocus`` − its first value)."""
    prob = Problem(intensity_frames(stack), band_optics, pix, defocus, params)
    aligned = prob.spectra * shift_phase(prob.band, shifts)
    basis = chi_basis(optics, prob.grid, prob.band)
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
    stack, optics, pix, nominal, half, sp: StructureParams, t0
) -> StructureImageResult:
    """:func:`structure_image` with ``crystal`` (see there)."""
    params = FocalParams(
        area=sp.area, crystal=True, absolute_range_nm=half, fit_astigmatism=sp.fit_astigmatism
    )
    reg = register_focal_series(stack, optics, params, nominal_defocus_nm=nominal, pixel_nm=pix)
    defocus = reg.defocus_nm
    a1 = (reg.astigmatism_nm, reg.astigmatism_deg)
    opt_a1 = optics.with_(a1_nm=a1[0], a1_deg=a1[1])
    diag = _phase_agreement_of(
        stack, opt_a1, optics, pix, defocus, params, reg.shifts_px, float(defocus[0]),
        CRYSTAL_DIAGNOSTIC_RANGE_NM, sp.n_sectors, False,
    )  # fmt: skip
    return _structure_result(
        stack, optics, pix, diag, defocus, a1, reg.shifts_px, reg.reference_index, sp.area,
        sp.wiener_snr, t0, astigmatism_uncertainty_nm=math.nan, astigmatism_determined=True,
        method="crystal",
    )  # fmt: skip


def _ctf_corrected_average(frames, optics, pix, defocus, shifts, area, snr) -> np.ndarray:
    """Σ S_n s_n / (Σ s_n² + 1/snr) (s_n = 2 sin χ_n · envelopes) of the aligned frames, on the
    information band, float32 (y, x)."""
    data = crop_area(frames, area)
    spec = frame_spectra(data, AREA_TAPER_PX if area is not None else 0)
    grid = FrequencyGrid(spec.shape[-2:], (pix, pix))
    band = information_band(optics, grid, defocus, np.ones(grid.shape, np.float32))
    bt = BandTransfer(optics, grid, band)
    s = 2.0 * np.sin(bt.chi(defocus)) * bt.env_t[None] * bt.spatial(defocus)
    sp = band.gather(spec) * shift_phase(band, shifts)
    est = np.sum(sp * s, axis=0) / (np.sum(s * s, axis=0) + 1.0 / snr)
    img = sfft.ifft2(band.scatter(est.astype(np.complex64)), workers=fft_workers()).real
    return img.astype(np.float32)
