"""Non-rigid registration of scanned series: affine then non-linear cycles against a reference.

Frames come in one (common) orientation with each frame's scan rotation (multiples of 90°);
each is registered in its own scan coordinates (:mod:`.model`) against a reference built from
the others, pulled through their current models. Orthogonal pairs and sets use the same loop:
the reference mixes scan directions, so the slow-axis errors of one frame are measured by the
fast axis of another (Ophus, Ciston & Nelson 2016), and the fast axes pin the global shape
(:mod:`.gauge`). The start is the rigid alignment plus the steady drift it implies (a linear
drift for every frame: its slow axis sheared and stretched by the drift between frames), or,
for orthogonal series whose shear defeats the rigid alignment, the linear drift search's
(:mod:`.drift`). Within a cycle the frames are independent (each against references built
from the previous cycle's model) and run side by side in threads.

Memory (measured: 8 × 512² pairs 3.8 stacks, 12 × 512² one direction 3.0, whole run with
the result it returns): the frames are held once, as their spline coefficients in scan
orientation (the normalised copy is converted in place); the rigid start runs on the 2×2-binned
frames before that copy exists, with a memory budget of their own size; a cycle sums the
frames pulled onto the reference grid one batch (a frame per thread) at a time and each frame
pulls itself again for its leave-one-out reference (no (n, H, W) array of pulled frames), plus
a few float32 frame-sized arrays per running frame. The fields are kept compactly
(:class:`~.model.FieldSource`) and expanded frame by frame when applied.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from scherzer.optics import fft_workers
from scherzer.processing.registration import (
    AlignmentError,
    AlignParams,
    measure_shifts,
    rotate_to_common,
)
from scherzer.processing.scan_distortion.apply import apply_fields
from scherzer.processing.scan_distortion.drift import search_linear_drift
from scherzer.processing.scan_distortion.gauge import drift_slopes, fix_gauge, fix_row_gauge
from scherzer.processing.scan_distortion.kernels import in_threads, spline_coefficients
from scherzer.processing.scan_distortion.line_prior import LinePrior
from scherzer.processing.scan_distortion.merge import merge_density
from scherzer.processing.scan_distortion.model import (
    FieldSource,
    FrameModel,
    vec_to_scan,
)
from scherzer.processing.scan_distortion.prepare import as_frames, prepare_frames
from scherzer.processing.scan_distortion.result import NonrigidResult
from scherzer.processing.scan_distortion.settings import NonrigidParams, ScanDistortionError
from scherzer.processing.scan_distortion.update import Target, gauss_newton_step
from scherzer.processing.shifting import quarter_turns

__all__ = ["correct_scan_distortion"]

FIRST_TOLERANCE_PX = 0.05  # tolerance of the first cycle; lowered geometrically to the target
INNER_STEPS = 2  # Gauss–Newton steps per frame per cycle: the reference moves on anyway
BACK_OFF = 0.9  # acceleration factor applied when a cycle's mean update grows
# The rigid start: a sequential graph always lets the candidate starts compete against the
# leave-one-out averages; on distorted crystal series the k-neighbour graph can agree with
# itself around a wrong first-neighbour peak (measured: a 17 px jump on a simulated SrTiO3
# series that the sequential graph gets right).
START_ALIGN = AlignParams(pairs="sequential")
FLAG_NCC_FRACTION = 0.5  # a frame correlating below this fraction of the median is flagged
SPLINE_AT_NODES = np.array([1.0, 4.0, 1.0], np.float32) / 6.0  # cubic B-spline at integers
COARSE_MIN_PX = 256  # frames this large run the rigid start and affine cycles 2×2-binned


def _turns(rotations_deg: Sequence[float] | None, n: int, shape: tuple[int, int]) -> list[int]:
    if rotations_deg is None:
        return [0] * n
    rot = np.asarray(rotations_deg, dtype=float).reshape(-1)
    if len(rot) != n:
        raise ScanDistortionError(f"need one scan rotation per frame: {n} frames, {len(rot)} given")
    try:
        turns = [quarter_turns(r - rot[0]) for r in rot]
    except AlignmentError as exc:
        raise ScanDistortionError(f"scan rotations must differ by multiples of 90°: {exc}") from exc
    if any(t % 2 for t in turns) and shape[0] != shape[1]:
        raise ScanDistortionError(f"90° rotations need square frames; got {shape}")
    return turns


def _rigid_start(frames: np.ndarray | None, coarse: np.ndarray | None,
                 params: NonrigidParams) -> np.ndarray:  # fmt: skip
    """Rigid shifts (n, 2) px: measured on the 2×2-binned ``coarse`` frames when given (a
    start for the affine cycles, which refine the offsets; 4× less work), else on
    ``frames``."""
    n = len(coarse if coarse is not None else frames)
    if not params.rigid_start:
        return np.zeros((n, 2))
    use = coarse if coarse is not None else frames
    # work blocks sized from a budget of the frames' own size (the default, a fraction of
    # the machine's memory, took 36× the input at 8 × 128²; the shifts do not depend on it)
    align = dataclasses.replace(START_ALIGN, memory_budget_mb=max(use.nbytes / 2**20, 0.25))
    try:
        if coarse is not None:
            return 2.0 * measure_shifts(coarse, align).shifts_px
        return measure_shifts(frames, align).shifts_px
    except (AlignmentError, np.linalg.LinAlgError, ValueError):
        return np.zeros((n, 2))


def _dense(params: NonrigidParams) -> bool:
    return params.mode == "unconstrained" and params.nonlinear_cycles > 0


def _start(work, turns, params, lines_per_frame, shifts=None) -> tuple:
    """(rigid shifts, steady drift slope or None): orthogonal series search a linear drift
    first (``drift_search``; see :mod:`.drift`), falling back to the rigid alignment
    (``shifts`` when already measured on binned frames)."""
    if shifts is None:
        shifts = _rigid_start(work, None, params)
    if params.drift_search and params.rigid_start and len({t % 2 for t in turns}) > 1:
        times = np.arange(len(shifts)) * lines_per_frame
        implied = -np.polyfit(times, shifts, 1)[0]  # the rigid start's steady drift
        found = search_linear_drift(work, turns, lines_per_frame, implied)
        if found is not None:
            return found[1], found[0]
    return shifts, None


def _initial_model(shifts, turns, shape, params, lines_per_frame, slope=None) -> FrameModel:
    """Rigid positions plus, for every frame, the linear drift they imply (or ``slope``, the
    drift search's, common px per line)."""
    n = len(shifts)
    model = FrameModel.zeros(n, shape, _dense(params))
    for i, k in enumerate(turns):
        model.affine[i, 0], model.affine[i, 3] = vec_to_scan(-shifts[i, 0], -shifts[i, 1], k)
    if not params.drift_gauge and slope is None:
        return model  # no drift prior: every frame starts unsheared
    slopes = np.tile(slope, (n, 1)) if slope is not None else None
    if slopes is None:
        slopes = drift_slopes(model, turns, lines_per_frame)
    for i, k in enumerate(turns):
        sy, sx = vec_to_scan(slopes[i, 0], slopes[i, 1], k)
        model.affine[i, [1, 4]] = sy, sx
        model.affine[i, [2, 5]] = sy / shape[1], sx / shape[1]
    return model


class _Engine:
    """State of one run: scan-oriented frames, turns, the model and the reference sums."""

    def __init__(self, frames: np.ndarray, turns: list[int], params: NonrigidParams) -> None:
        """``frames`` (n, H, W) float32 in common orientation, *taken over*: each is replaced
        by its cubic-spline coefficients in scan orientation (one copy of the series held;
        the frame's values come back from them, :meth:`frame`)."""
        self.p = params
        self.turns = turns
        self.common_shape = frames.shape[1:]
        for i, k in enumerate(turns):
            frames[i] = spline_coefficients(np.rot90(frames[i], k))  # square if k is odd
        self.coeffs = frames
        self.shape = frames.shape[1:]
        self.smoothing_px = params.smoothing_for(turns, frames.shape[2])
        self.penalty = len({t % 2 for t in turns}) > 1  # line smoother: see smoothing_for
        # one direction, row-locked, no width given: the line smoother's weights from the data
        one_direction_default = params.smoothing_px is None and params.mode == "row-locked"
        self.line_prior = LinePrior() if one_direction_default and not self.penalty else None
        self.jitter = params.jitter_for(turns)
        self.active = np.ones(len(frames), bool)
        self.ncc = np.zeros(len(frames))

    def release(self) -> None:
        """Drop the frames' spline coefficients (the run is over)."""
        self.coeffs = np.zeros((0, *self.shape), np.float32)

    def frame(self, i: int) -> np.ndarray:
        """Frame i's values (scan orientation): its spline evaluated on the grid."""
        out = ndimage.correlate1d(self.coeffs[i], SPLINE_AT_NODES, axis=0, mode="mirror")
        return ndimage.correlate1d(out, SPLINE_AT_NODES, axis=1, mode="mirror", output=out)

    def pull(self, model: FrameModel, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame i through ``model`` onto the reference grid (common orientation): (values,
        0 where unseen; seen mask). Recomputed where needed rather than held for every
        frame (the series is held once, as the spline coefficients)."""
        v, m = model.pull(i, self.coeffs[i], self.shape)
        k = self.turns[i]
        return np.rot90(v, -k), np.rot90(m, -k)

    def reference_set(self, i: int) -> np.ndarray:
        """Frames that form frame i's reference (see ``NonrigidParams.reference``)."""
        n = len(self.active)
        use = self.active.copy()
        use[i] = False
        if self.p.reference == "index":
            use[:] = False
            use[self.p.reference_index] = self.p.reference_index != i
        elif self.p.reference == "local":
            use &= np.abs(np.arange(n) - i) <= self.p.local_neighbours
        return use

    def sums(self, model: FrameModel, use: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Σ pulled values and Σ seen over the frames ``use``: pulled side by side in threads,
        a batch of one frame per thread at a time, and added in frame order (the same sums
        whatever the threads' timing; no (n, H, W) array)."""
        h, w = self.shape if self.turns[0] % 2 == 0 else self.shape[::-1]
        total = np.zeros((h, w), np.float32)
        count = np.zeros((h, w), np.float32)
        todo = list(np.flatnonzero(use))
        batch = max(1, fft_workers())
        for b0 in range(0, len(todo), batch):
            for v, m in in_threads(lambda j: self.pull(model, j), todo[b0 : b0 + batch]):
                total += v  # pulled values are 0 where unseen
                count += m
        return total, count

    def reference(self, i, model, sums) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean image, count) of frame i's reference set, common orientation, from the
        frames as ``model`` places them: with the mean reference the all-frame ``sums``
        minus frame i's own pull; otherwise summed afresh."""
        use = self.reference_set(i)
        if not use.any():
            return None
        if self.p.reference == "mean":
            total, count = sums[0].copy(), sums[1].copy()
            if self.active[i]:
                v, m = self.pull(model, i)
                total -= v
                count -= m
        else:
            h, w = self.shape if self.turns[0] % 2 == 0 else self.shape[::-1]
            total = np.zeros((h, w), np.float32)
            count = np.zeros((h, w), np.float32)
            for j in np.flatnonzero(use):
                v, m = self.pull(model, j)
                total += v
                count += m
        np.divide(total, count, out=total, where=count > 0)
        total[count <= 0] = 0.0
        return total, count

    def target(self, i: int, model: FrameModel, sums) -> Target | None:
        """Reference for frame i, in its scan orientation."""
        ref = self.reference(i, model, sums)
        if ref is None:
            return None
        k = self.turns[i]
        return Target(
            spline_coefficients(np.rot90(ref[0], k)),
            np.ascontiguousarray(np.rot90(ref[1] > 0.5, k), dtype=np.float32),
        )

    def cycle(self, model: FrameModel, stage: str, tolerance: float, placed: FrameModel) -> float:
        """One cycle: every active frame stepped against its reference, built from the frames
        as ``placed`` (the model at the cycle's start, not changed during it); mean |update|
        px."""
        sums = self.sums(placed, self.active) if self.p.reference == "mean" else None

        def one(i: int) -> float | None:
            target = self.target(i, placed, sums)
            if target is None:
                return None
            total = 0.0
            frame = self.frame(i)
            for _ in range(INNER_STEPS):
                step = gauss_newton_step(frame, target, model, i, stage, self.p.mode,
                                         self.smoothing_px, self.jitter, self.penalty,
                                         self.line_prior)  # fmt: skip
                total += step
                if step < tolerance:
                    break
            return total

        todo = [i for i in np.flatnonzero(self.active)
                if not (self.p.reference == "index" and i == self.p.reference_index)]  # fmt: skip
        updates = [u for u in in_threads(one, todo) if u is not None]
        return float(np.mean(updates)) if updates else 0.0


def _loo_factor(engine: _Engine) -> float:
    """Step scale that makes a cycle against leave-one-out references exact: a frame i off by
    e_i (Σ e = 0 over the m frames of its reference set and itself) measures e_i − mean of the
    others = e_i·m/(m−1); scaling by (m−1)/m moves it by e_i (without it every cycle leaves
    −1/(m−1) of the error, alternating in sign). A fixed reference frame needs no scale."""
    p = engine.p
    if p.reference == "index":
        return 1.0
    m = int(engine.active.sum())
    if p.reference == "local":
        m = min(m, 2 * p.local_neighbours + 1)
    return (m - 1) / m if m > 1 else 1.0


def _tolerances(cycles: int, target_px: float) -> list[float]:
    if cycles <= 1:
        return [target_px] * cycles
    a, b = math.log(FIRST_TOLERANCE_PX), math.log(target_px)
    return [math.exp(a + (b - a) * c / (cycles - 1)) for c in range(cycles)]


def _check_frames(engine: _Engine, model: FrameModel, start: FrameModel) -> None:
    """Flag frames whose model diverged (non-finite or beyond ``max_field_px``); they go back
    to their start and leave the reference."""
    ny, nx = engine.shape
    r = np.concatenate([np.arange(ny), np.arange(ny)]).astype(float)
    c = np.repeat([0.0, nx - 1.0], ny)
    for i in np.flatnonzero(engine.active):
        # the line terms are linear along a line, so |u| is largest at a line's ends (a
        # dense field adds at most its own largest value)
        extra = None if model.field is None else model.field[i]
        only_lines = FrameModel(model.affine, model.rows, model.theta, None, model.jitter)
        dy, dx = only_lines.displacement(i, r, c, nx)
        big = float(np.max(np.hypot(dy, dx)))
        if extra is not None:
            big += float(np.max(np.hypot(extra[0], extra[1])))
        if not big <= engine.p.max_field_px + float(np.hypot(*start.affine[i, [0, 3]])):
            engine.active[i] = False
            model.affine[i] = start.affine[i]
            model.rows[i], model.theta[i], model.jitter[i] = 0.0, 0.0, 0.0
            if model.field is not None:
                model.field[i] = 0.0


def _run_stage(
    engine: _Engine, model: FrameModel, stage: str, cycles: int, lines_per_frame: float,
    start: FrameModel,
) -> tuple[FrameModel, list]:  # fmt: skip
    """``cycles`` cycles of one stage (affine | nonlinear): step, over-relax, check, gauge."""
    p = engine.p
    history: list[dict] = []
    accel, previous = p.acceleration, math.inf
    for c, tol in enumerate(_tolerances(cycles, p.convergence_px)):
        old = model.copy()
        update = engine.cycle(model, stage, tol, old)
        if engine.line_prior is not None and stage != "affine":
            engine.line_prior.pool()
        model = model.blend(old, accel * _loo_factor(engine))
        _check_frames(engine, model, start)
        if engine.active.sum() < 2:
            raise ScanDistortionError("fewer than 2 frames could be registered")
        if p.reference != "index":
            fix_gauge(model, engine.turns, engine.active, lines_per_frame, engine.shape[1],
                      drift=p.drift_gauge)  # fmt: skip
        history.append({"stage": stage, "cycle": c, "mean_update_px": round(update, 6),
                        "acceleration": round(accel, 3), "tolerance_px": tol})  # fmt: skip
        if update > previous:
            accel = max(1.0, accel * BACK_OFF)
        previous = update
        if update < p.convergence_px:
            break
    return model, history


def _coarse_frames(prepared: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray | None:
    """The normalised frames 2×2-binned, (binned − mean)/std with each full frame's mean and
    std (= the binned normalised frames), when they are large enough (``COARSE_MIN_PX``,
    even sizes) for the rigid start and the affine cycles to run binned; else None."""
    n, h, w = prepared.shape
    if min(h, w) < COARSE_MIN_PX or h % 2 or w % 2:
        return None
    out = prepared.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4), dtype=np.float32)
    out -= mean.astype(np.float32)
    out /= std.astype(np.float32)
    return out


def _run_cycles(
    engine: _Engine, model: FrameModel, lines_per_frame: float, binned: np.ndarray | None
) -> tuple[FrameModel, list]:
    """Affine cycles (on the 2×2-``binned`` frames when given: an affine map is the same at
    any sampling, only its offsets scale), then non-linear cycles at full sampling, then the
    row gauge."""
    p = engine.p
    start = model.copy()
    history: list[dict] = []
    if binned is not None:
        coarse = _Engine(binned, engine.turns, p)
        small = FrameModel.zeros(len(binned), coarse.shape, dense=False)
        small.affine[:] = model.affine
        small.affine[:, [0, 3]] /= 2.0
        small, hist = _run_stage(coarse, small, "affine", p.affine_cycles,
                                 lines_per_frame / 2.0, small.copy())  # fmt: skip
        model.affine[:] = small.affine
        model.affine[:, [0, 3]] *= 2.0
        engine.active &= coarse.active
        history += [{**e, "binned": 2} for e in hist]
    else:
        model, hist = _run_stage(engine, model, "affine", p.affine_cycles, lines_per_frame, start)
        history += hist
    model, hist = _run_stage(engine, model, "nonlinear", p.nonlinear_cycles, lines_per_frame, start)
    history += hist
    if p.drift_gauge and p.nonlinear_cycles and p.reference != "index":
        fix_row_gauge(model, engine.turns, engine.active, lines_per_frame)
    return model, history


def correct_scan_distortion(
    frames: object,
    params: NonrigidParams | None = None,
    rotations_deg: Sequence[float] | None = None,
    *,
    as_acquired: bool = False,
) -> NonrigidResult:
    """Measure and undo the scan distortion of a series (see the module doc).

    ``frames`` (n, y, x) in one orientation (``as_acquired=True``: as scanned, turned back
    here by ``rotations_deg``); ``rotations_deg`` each frame's scan rotation (None: all
    equal). Raises :class:`ScanDistortionError` on bad input; frames that cannot be
    registered are flagged (``result.flagged``), never averaged.
    """
    t0 = time.perf_counter()
    p = params or NonrigidParams()
    arr = as_frames(frames)
    p.check(len(arr))
    if as_acquired:
        if rotations_deg is None:
            raise ScanDistortionError("as_acquired frames need rotations_deg")
        _turns(rotations_deg, len(arr), arr.shape[1:])
        arr = rotate_to_common(arr, rotations_deg).astype(np.float32)
    turns = _turns(rotations_deg, len(arr), arr.shape[1:])
    prepared = prepare_frames(arr, p)
    mean = prepared.mean(axis=(1, 2), keepdims=True)
    std = prepared.std(axis=(1, 2), keepdims=True)
    if np.any(std == 0):
        raise ScanDistortionError("a frame is constant: nothing to register")
    coarse = _coarse_frames(prepared, mean, std)
    lines_per_frame = prepared.shape[1 if turns[0] % 2 == 0 else 2] + p.frame_gap_lines
    # the rigid start on the binned frames before the full normalised copy exists (memory)
    shifts = _rigid_start(None, coarse, p) if coarse is not None else None
    work = np.subtract(prepared, mean, dtype=np.float32)  # one new stack, divided in place
    work /= std.astype(np.float32)
    shifts, slope = _start(work, turns, p, lines_per_frame, shifts)
    binned = coarse if p.affine_cycles else None
    del coarse
    engine = _Engine(work, turns, p)  # takes ``work`` over (spline coefficients in place)
    del work
    model = _initial_model(shifts, turns, engine.shape, p, lines_per_frame, slope)
    fix_gauge(model, turns, engine.active, lines_per_frame, engine.shape[1], linear=False)
    model, history = _run_cycles(engine, model, lines_per_frame, binned)
    del binned
    fields = FieldSource(model, turns, engine.shape)  # compact; expanded per frame on demand
    flagged = _flag(engine, model)
    engine.release()  # the working copy goes before the corrected frames are made
    corrected, valid, average, count = apply_fields(
        prepared, fields, flagged=flagged, prepare=False
    )
    if p.merge == "density":
        average, count = merge_density(prepared, fields, flagged=flagged,
                                       sigma_px=p.merge_sigma_px)  # fmt: skip
    rms = _field_rms(model, engine.shape)
    return NonrigidResult(
        corrected=corrected, valid=valid, average=average, count=count, fields=fields,
        affine=model.affine.copy(), field_rms_px=rms, flagged=flagged,
        ncc=engine.ncc, rigid_shifts_px=shifts, rotations_deg=np.asarray(
            rotations_deg if rotations_deg is not None else np.zeros(len(arr)), float),
        params=p, history=history, seconds=time.perf_counter() - t0,
    )  # fmt: skip


def _flag(engine: _Engine, model: FrameModel) -> list[int]:
    """Frames flagged: diverged (inactive) or correlating with the mean of the other active
    frames far below the others (median × ``FLAG_NCC_FRACTION``)."""
    n = len(engine.active)
    ncc = np.zeros(n)
    sums = engine.sums(model, engine.active)

    def one(i: int) -> None:
        v, m = engine.pull(model, i)
        total, count = sums[0].copy(), sums[1].copy()
        if engine.active[i]:
            total -= v
            count -= m
        both = m & (count > 0.5)
        if both.sum() > 16:
            a, b = v[both], total[both] / count[both]
            a, b = a - a.mean(), b - b.mean()
            ncc[i] = float((a * b).sum() / math.sqrt(float((a * a).sum() * (b * b).sum()) + 1e-30))

    in_threads(one, range(n))
    engine.ncc = ncc
    median = float(np.median(ncc[engine.active])) if engine.active.any() else 0.0
    bad = ~engine.active | (ncc < FLAG_NCC_FRACTION * median)
    return [int(i) for i in np.flatnonzero(bad)]


def _field_rms(model: FrameModel, shape: tuple[int, int]) -> np.ndarray:
    """RMS of each frame's field after removing its affine part (px): the line functions,
    jitter and rotation per line (and the dense field) over the scan grid (rotation-free, so
    the scan coordinates give the user fields' value)."""
    nx = shape[1]
    cc2 = float(np.mean((np.arange(nx) - (nx - 1) / 2.0) ** 2))
    out = []
    for i in range(len(model.affine)):
        lines = model.lines(i)
        ms = np.mean(lines[:, 0] ** 2 + model.theta[i] ** 2 * cc2 + lines[:, 1] ** 2)
        if model.field is not None:
            fy, fx = model.field[i, 0], model.field[i, 1]
            cc = np.arange(nx) - (nx - 1) / 2.0
            ty = lines[:, :1] + model.theta[i][:, None] * cc[None, :]
            ms += float(np.mean(fy * (fy + 2 * ty) + fx * (fx + 2 * lines[:, 1:])))
        out.append(float(np.sqrt(max(ms, 0.0))))
    return np.asarray(out)
