"""Focal-series registration: the loop that strings the stages together.

One job: :func:`register_focal_series` — check the inputs (:mod:`.inputs`), build the problem
(:mod:`.problem`), choose the specimen strategy once (:class:`~.relative.AmorphousStrategy` or
:class:`~.crystal.CrystalStrategy`, by ``FocalParams.crystal``), run its first pass, then
rounds of wave passes until defocus and shifts settle, each round closed by an absolute
correction (:mod:`.absolute`, or :mod:`.agreement` for ``absolute="phase_agreement"``), and
report a :class:`FocalRegistration`. :func:`restore_stack` restores the exit wave of a
registered stack (the pipeline's ``restore`` step).

Conventions: see the package docstring (defocus nm, C1 < 0 underfocus; shifts px with
frame_i(r) ≈ ref(r − s_i); ``relative_defocus_nm[i] = defocus_nm[i] − defocus_nm[ref]``).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scherzer.optics import Optics
from scherzer.processing.focal.absolute import cartesian_a1, chi_basis, polar_a1
from scherzer.processing.focal.agreement import agreement_absolute
from scherzer.processing.focal.crystal import CrystalStrategy
from scherzer.processing.focal.inputs import (
    check_nominal_defocus,
    choose_reference,
    intensity_frames,
    reference_candidates,
    used_mask,
)
from scherzer.processing.focal.joint import joint_defocus
from scherzer.processing.focal.misfit import (
    MAX_SPOT_RATIO,
    ModelFit,
    model_fit,
    step_scale_line,
)
from scherzer.processing.focal.problem import PassState, Problem, Strategy
from scherzer.processing.focal.relative import AmorphousStrategy, reference_by_peak
from scherzer.processing.focal.settings import MIN_IMAGES, FocalParams
from scherzer.processing.restoration import RestorationResult, RestoreParams, restore_exit_wave
from scherzer.stack import ImageStack
from scherzer.workers import one_blas_thread

__all__ = ["FocalRegistration", "choose_strategy", "register_focal_series", "restore_stack"]

ABSOLUTE_ROUNDS = 2  # rounds of (relative passes, absolute correction): the second pass set
# re-registers with the corrected optics (a third changed nothing measurable)
LATER_ABSOLUTE_RANGE_NM = 3.0  # ± absolute search after the first round (the first: the
# user's ``absolute_range_nm``)
ABSOLUTE_TOL_NM = 0.05  # a round whose δC1 and |δA1| are both below this ends the rounds
SEARCH_RANGE_STEP_FRACTION = 0.3  # default ± defocus search: this × |step| + …
SEARCH_RANGE_MARGIN_NM = 1.0  # … this (follows steps a few % off; never reaches a neighbour)
# the absolute fit's object model holds at least this well (FocalRegistration.absolute_model_fits).
# Measured (simulator, 9 × 256²): weak-phase fit on SrTiO3 [001] 1/2/4 nm crystal-only 0.91/0.79/
# 0.49 (abs. error 1.4/2.7/6.6 nm), Si [110] 2/4 nm 0.78/0.73 (2.5/6.2 nm), crystal edge under
# a-C 0.57 (0.69 nm: its film holds the fit), synthetic films 0.95–0.99; crystal mode 0.91–0.97
# whatever the thickness (4 nm SrTiO3: 4.1 nm off, not detected). So only a clear failure is
# flagged: a partial detector.
MIN_MODEL_AGREEMENT = 0.5
SUSPECT_PEAK = 0.01  # FTSR's rule: a correlation peak below this is suspect (reported per image)


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
    absolute_model_agreement: float = math.nan
    model_fit: dict[str, Any] | None = None

    @property
    def absolute_model_fits(self) -> bool | None:
        """Whether the object model of the absolute fit holds (agreement ≥
        ``MIN_MODEL_AGREEMENT``; None: not evaluated). When not, the absolute defocus is
        suspect — e.g. a thick crystal whose columns scatter dynamically (issue #15); the
        relative defocus, drift and restored wave do not depend on that model."""
        if math.isnan(self.absolute_model_agreement):
            return None
        return self.absolute_model_agreement >= MIN_MODEL_AGREEMENT

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
        """The JSON summary (plain floats and lists)."""
        return {
            "reference_index": int(self.reference_index),
            "defocus_nm": [float(v) for v in self.defocus_nm],
            "relative_defocus_nm": [float(v) for v in self.relative_defocus_nm],
            "shifts_px": [[float(a), float(b)] for a, b in self.shifts_px],
            "peak_heights": [float(v) for v in self.peak_heights],
            "astigmatism_nm": float(self.astigmatism_nm),
            "astigmatism_deg": float(self.astigmatism_deg),
            "seconds": float(self.seconds),
            "suspect_below": SUSPECT_PEAK,
            "absolute_model_agreement": _finite_or_none(self.absolute_model_agreement),
            "absolute_model_fits": self.absolute_model_fits,
            "model_fit": self.model_fit,
            "images": self.images(),
        }

    def images(self) -> list[dict[str, Any]]:
        """Per image, as FTSR prints it: fitted defocus, drift, correlation peak, and whether the
        peak is suspect (below ``SUSPECT_PEAK``), flagged (left out by the registration's own
        test) or used; and how well the imaging model predicts it (``model_residual``,
        ``spot_residual_ratio``: :class:`~.misfit.ModelFit`)."""
        return [
            {
                "index": i,
                "defocus_nm": float(self.defocus_nm[i]),
                "relative_defocus_nm": float(self.relative_defocus_nm[i]),
                "drift_px": [float(self.shifts_px[i, 0]), float(self.shifts_px[i, 1])],
                "peak": float(self.peak_heights[i]),
                "suspect": bool(self.peak_heights[i] < SUSPECT_PEAK),
                "flagged": bool(self.flagged[i]),
                "used": bool(self.used[i]),
                **self._image_fit(i),
            }
            for i in range(len(self.defocus_nm))
        ]

    def _image_fit(self, i: int) -> dict[str, Any]:
        """Image i's prediction residual (fraction of its power) and spot residual over the
        noise (:mod:`~.misfit`), when the model was checked."""
        if not self.model_fit:
            return {}
        return {
            "model_residual": self.model_fit["residual_fraction"][i],
            "spot_residual_ratio": self.model_fit["spot_ratio"][i],
        }


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def choose_strategy(params: FocalParams) -> Strategy:
    """The specimen strategy of ``params``: crystal-only field or one with amorphous material."""
    return CrystalStrategy() if params.crystal else AmorphousStrategy()


@one_blas_thread
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
    clock = _StageClock()
    p = params or FocalParams()
    nominal, pix = _checked_series(stack, nominal_defocus_nm, pixel_nm)
    n = stack.n_frames
    ref = choose_reference(nominal, optics, p.reference)
    candidates = reference_candidates(nominal, optics, p.exclude)
    used = used_mask(n, p.exclude, ref if p.reference is not None else int(candidates[0]))
    if p.absolute not in ("wave", "phase_agreement", "none"):
        raise ValueError(f"absolute must be 'wave', 'phase_agreement' or 'none'; got {p.absolute}")
    steps = np.abs(np.diff(nominal))
    rng_nm = p.search_range_nm or (
        SEARCH_RANGE_STEP_FRACTION * float(np.median(steps)) + SEARCH_RANGE_MARGIN_NM
    )
    prob = Problem(intensity_frames(stack), optics, pix, nominal, p, mtf, nps)
    clock.stage("spectra")
    if p.reference is None:  # the interior candidate near Scherzer whose neighbours match best
        ref = int(candidates[0])
        if len(candidates) > 1:
            ref, _ = reference_by_peak(prob, candidates, nominal, used, rng_nm)
    clock.stage("reference")
    run = _Run(prob, choose_strategy(p), ref, nominal, used, rng_nm)
    clock.stage("first_pass")
    a1_c = run.rounds(optics)
    clock.stage("passes_and_absolute")
    fit, slope = run.check_model()
    clock.stage("model_check")
    d_abs, shifts = run.strategy.finish(prob, ref, run.d_abs, run.shifts, run.peaks, used)
    flagged = run.peaks < run.flag_level()
    flagged[ref] = False
    d_abs, joint = joint_defocus(
        d_abs, nominal, run.peaks, used & ~flagged, p.focus_line_sigma_nm, slope
    )
    run.history.append({"joint": joint})
    shifts = run.strategy.shifts_of_flagged(shifts, used, flagged)
    clock.stage("finish")
    run.history.append({"stage_seconds": clock.seconds})
    mag, ang = polar_a1(a1_c)
    return FocalRegistration(
        reference_index=ref,
        nominal_defocus_nm=nominal,
        relative_defocus_nm=d_abs - d_abs[ref],
        defocus_nm=d_abs,
        shifts_px=shifts,
        peak_heights=run.peaks,
        flagged=flagged,
        used=used & ~flagged,
        astigmatism_nm=mag,
        astigmatism_deg=ang,
        seconds=time.perf_counter() - t0,
        passes=run.passes,
        history=run.history,
        absolute_model_agreement=run.model_agreement,
        model_fit=fit,
    )


class _StageClock:
    """Wall and process seconds per stage of one registration (the history's
    ``stage_seconds``: {stage: [wall, process]}; benchmarks/focal.py prints them)."""

    def __init__(self):
        self.seconds: dict[str, list[float]] = {}
        self._last = (time.perf_counter(), time.process_time())

    def stage(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.seconds[name] = [now[0] - self._last[0], now[1] - self._last[1]]
        self._last = now


def _checked_series(stack: ImageStack, nominal_defocus_nm, pixel_nm) -> tuple[np.ndarray, float]:
    """(nominal defocus (n,) nm, pixel nm) of a series of at least ``MIN_IMAGES`` images: the
    given values or the stack's, checked."""
    n = stack.n_frames
    if n < MIN_IMAGES:
        raise ValueError(f"a focal series needs at least {MIN_IMAGES} images; got {n}")
    given = stack.column("defocus_nominal_nm") if nominal_defocus_nm is None else nominal_defocus_nm
    nominal = check_nominal_defocus(given, n)
    return nominal, float(pixel_nm if pixel_nm is not None else stack.pixel_size_nm[1])


class _Run:
    """The state of one registration between passes: defocus, shifts and peaks of every image,
    the passes done and their history."""

    def __init__(self, prob: Problem, strategy: Strategy, ref, nominal, used, rng_nm: float):
        self.prob, self.strategy, self.ref = prob, strategy, ref
        self.nominal, self.used, self.rng_nm = nominal, used, rng_nm
        first = strategy.first_pass(prob, ref, nominal, used, rng_nm)
        self.d_abs, self.shifts, self.peaks = first
        self.passes = 0
        self.model_agreement = math.nan
        rel = (self.d_abs - self.d_abs[ref]).tolist()
        self.history: list[dict[str, Any]] = [{"pass": 0, "relative_defocus_nm": rel}]

    def flag_level(self) -> float:
        return self.strategy.flag_level(self.prob, self.peaks, self.used)

    def ok(self) -> np.ndarray:
        """The images that enter the wave: used, not flagged, and the reference."""
        ok = self.used & (self.peaks >= self.flag_level())
        ok[self.ref] = True
        return ok

    def rounds(self, optics: Optics) -> np.ndarray:
        """Rounds of wave passes, each closed by an absolute correction (which also updates
        the problem's optics); returns the cartesian A1 (2,) nm."""
        p = self.prob.params
        a1_c = cartesian_a1(optics.a1_nm, optics.a1_deg)
        basis = chi_basis(optics, self.prob.grid, self.prob.band)
        absolute = agreement_absolute if p.absolute == "phase_agreement" else None
        absolute = absolute or self.strategy.absolute
        for rounds in range(ABSOLUTE_ROUNDS):
            self.passes_until_settled()
            if p.absolute == "none":
                break
            search = p.absolute_range_nm if rounds == 0 else LATER_ABSOLUTE_RANGE_NM
            fit = absolute(self.prob, self.d_abs, self.shifts, self.ok(), basis, search)
            self.d_abs = self.d_abs + fit.delta_nm
            a1_c = a1_c + fit.a1_cartesian_nm
            mag, ang = polar_a1(a1_c)
            self.prob.set_optics(optics.with_(a1_nm=mag, a1_deg=ang, defocus_nm=0.0))
            self.model_agreement = fit.model_agreement
            self.history.append(
                {"absolute_correction_nm": fit.delta_nm, "a1_nm": mag, "a1_deg": ang,
                 "model_agreement": fit.model_agreement, **fit.details()}
            )  # fmt: skip
            if (
                abs(fit.delta_nm) < ABSOLUTE_TOL_NM
                and np.hypot(*fit.a1_cartesian_nm) < ABSOLUTE_TOL_NM
            ):
                break
        return a1_c

    def check_model(self) -> tuple[dict[str, Any], float | None]:
        """Whether the one-object-term model predicts the images (:func:`~.misfit.model_fit`);
        when it does not and ``FocalParams.model_fallback``, the step scale fitted on the Bragg
        spots (:func:`~.misfit.step_scale_line`) for the joint solution's line. Crystal mode
        fits that scale in its passes already: there the fit is only reported. Returns (the
        report, the slope or None); warns when the model does not fit."""
        p, ok = self.prob.params, self.ok()
        fit: ModelFit = model_fit(self.prob, self.d_abs, self.shifts, ok)
        report: dict[str, Any] = fit.to_json()
        slope = None
        if not fit.fits:
            action = "reported only"
            if p.model_fallback and not p.crystal and ok.sum() >= MIN_IMAGES:
                slope, resid = step_scale_line(
                    self.prob, self.d_abs, self.shifts, ok, self.nominal, self.ref
                )
                report["fallback"] = {"step_scale": slope, "spot_residual_fraction": resid}
                action = f"the focus steps put on one step scale fitted on the spots ({slope:.4f})"
            warnings.warn(
                f"focal series: the one-object-term model does not fit the Bragg spots "
                f"(residual {fit.series_spot_ratio:.1f}× the noise, limit {MAX_SPOT_RATIO:g}; "
                f"a thick crystal?): {action}",
                UserWarning,
                stacklevel=3,
            )
        self.history.append({"model_fit": report})
        return report, slope

    def passes_until_settled(self) -> None:
        """Up to ``FocalParams.iterations`` wave passes, until defocus and shifts change by
        less than ``tolerance_nm`` / ``tolerance_px``."""
        p = self.prob.params
        change_d = np.inf
        for it in range(max(p.iterations, 0)):
            ok = self.ok()
            if ok.sum() < MIN_IMAGES:
                break
            state = PassState(self.d_abs, self.shifts, self.peaks, self.passes, it, change_d)
            new_d, new_s, new_p = self.strategy.later_pass(
                self.prob, self.ref, self.nominal, state, ok, self.rng_nm
            )
            change_d = np.max(np.abs(new_d - self.d_abs))
            change_s = np.max(np.abs(new_s - self.shifts))
            self.d_abs, self.shifts, self.peaks = new_d, new_s, new_p
            self.passes += 1
            self.history.append(
                {
                    "pass": self.passes,
                    "max_change_nm": float(change_d),
                    "max_change_px": float(change_s),
                    "relative_defocus_nm": (self.d_abs - self.d_abs[self.ref]).tolist(),
                }
            )
            if change_d < p.tolerance_nm and change_s < p.tolerance_px:
                break


def restore_stack(
    stack: ImageStack,
    registration: FocalRegistration,
    optics: Optics,
    params: RestoreParams | None = None,
    *,
    pixel_nm: float | None = None,
    mtf: Any = None,
    nps: Any = None,
    area: tuple[int, int, int, int] | None = None,
    iterations: int | None = None,
    use_dose_weights: bool = True,
) -> RestorationResult:
    """Restore the exit wave of a registered stack (the pipeline's ``restore`` step).

    Removes the recorded camera offset, uses the registration's absolute defocus, drift, A1 and
    ``used`` images, and the per-frame doses of the records as noise weights when all are known
    (``use_dose_weights``). ``params`` (:class:`~scherzer.processing.restoration.RestoreParams`)
    or, the older form, ``area``/``iterations``; other arguments as :func:`restore_exit_wave`.
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
        params,
        used=registration.used,
        mtf=mtf,
        nps=nps,
        dose_weights=dose_w,
        area=area,
        iterations=iterations,
        astigmatism=(registration.astigmatism_nm, registration.astigmatism_deg),
    )
