"""Named processing steps over ImageStacks, shared by the daemon, the CLI and the Python API.

A pipeline is a list of typed steps (:mod:`scherzer.processing.steps`: settings built and
validated once at the edge) run in order on the stacks of one acquisition: ``{"HAADF": stack,
"ABF": stack}`` for a scan series (the first signal is the one measured on), ``{"frames": stack}``
for a focal series. Each step reads what earlier steps left in the :class:`PipelineContext` and
adds :class:`StepOutput` s: stacks, arrays and tables to store, a JSON summary and the settings
used. Steps are pure numerics; the only files they touch are PNG plots in ``plot_dir`` when one is
given. Storing the outputs in a file is :func:`scherzer.io.store_pipeline_result`.

Steps
-----
* ``align`` — rigid alignment (:mod:`scherzer.processing.registration`): scan-rotated frames are
  rotated back to one orientation first (unless the stack's metadata says ``"derotated": True``;
  records keep the acquired ``scan_rotation_deg`` either way); shifts are measured on the first
  signal (or ``signal=``) and applied to every signal. Outputs ``aligned_<signal>`` stacks,
  ``average_<signal>`` arrays and the ``alignment`` table.
* ``nonrigid`` — scan-distortion correction (:mod:`scherzer.processing.scan_distortion`) measured
  on the first signal (or ``signal=``) and applied to every signal: ``nonrigid_<signal>`` stacks,
  ``average_nonrigid_<signal>`` (NaN where no frame saw) and ``count_nonrigid_<signal>`` arrays,
  the displacement fields ``fields_nonrigid_<signal>`` (n, 2, y, x) px and the ``nonrigid`` table
  (per-frame affine parameters, field RMS, NCC, flagged).
* ``focal_register`` — focal-series registration (:mod:`scherzer.processing.focal`): per-image
  defocus, drift, peak height, absolute defocus and A1. Output table ``focal_registration``.
* ``restore`` — exit-wave restoration (runs ``focal_register`` first if it has not run).
  Output array ``exit_wave`` (complex64).
* ``structure_image`` — CTF-corrected structure image of a fixed-step series. Output array
  ``structure_image``.
* ``eftem_maps`` — EFTEM series (:mod:`scherzer.processing.eftem`): the frames scaled to the
  first image's exposure (× the stack's ``eftem.quantum_counts``), rigid alignment measured on
  the pre-edge images and applied to all (``aligned_<signal>``, cropped to the common area, its
  first axis the energy loss), the three-window elemental map ``eftem_map`` (counts at the first
  exposure) with ``eftem_background``, ``eftem_exponent`` and ``eftem_fit_ok``, the jump-ratio
  map ``eftem_jump_ratio``, and the ``eftem_alignment`` table.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scherzer.processing.steps import (
    AlignStep,
    CameraCurves,
    EFTEMMapsStep,
    FocalRegisterStep,
    NonrigidStep,
    RestoreStep,
    Step,
    StructureImageStep,
    parse_steps,
    step_to_json,
)
from scherzer.stack import ImageStack

__all__ = [
    "STEPS",
    "PipelineContext",
    "PipelineError",
    "PipelineResult",
    "StepOutput",
    "alignment_table",
    "run_pipeline",
]


class PipelineError(ValueError):
    """A step cannot run on the given data or parameters; the message says why."""


@dataclass
class StepOutput:
    """What one step produced. Arrays are stored as ``/data/<name>`` with ``dims`` if given."""

    step: str
    params: dict[str, Any]
    summary: dict[str, Any]
    stacks: dict[str, ImageStack] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    tables: dict[str, np.ndarray] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    dims: dict[str, list[tuple[str, str, np.ndarray | None]]] = field(default_factory=dict)


@dataclass
class PipelineContext:
    """State handed from step to step."""

    stacks: dict[str, ImageStack]
    plot_dir: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def primary(self) -> ImageStack:
        return next(iter(self.stacks.values()))


@dataclass
class PipelineResult:
    """All step outputs in order, plus a JSON summary keyed by step name."""

    outputs: list[StepOutput]

    def summary(self) -> dict[str, Any]:
        return {o.step: {**o.summary, "seconds": round(o.seconds, 4)} for o in self.outputs}

    def output(self, step: str) -> StepOutput:
        for o in self.outputs:
            if o.step == step:
                return o
        raise KeyError(f"step {step!r} did not run")


StepFunction = Callable[[PipelineContext, Any], StepOutput]


def _plot_dir(ctx: PipelineContext) -> Path | None:
    if ctx.plot_dir is None:
        return None
    ctx.plot_dir.mkdir(parents=True, exist_ok=True)
    return ctx.plot_dir


# --- align -------------------------------------------------------------------------------------
def _known_pixel_nm(stack: ImageStack) -> float | None:
    """The stack's pixel size in nm, or None when not recorded ((1, 1) is ImageStack's
    "unknown" default, as :func:`~scherzer.processing.focal.instrument_from_stack` reads it)."""
    return None if tuple(stack.pixel_size_nm) == (1.0, 1.0) else float(stack.pixel_size_nm[1])


def _rotated_back(stack: ImageStack) -> ImageStack:
    from scherzer.processing.registration import rotate_to_common

    rotation = stack.column("scan_rotation_deg")
    if stack.metadata.get("derotated") or not np.any(np.abs(rotation) > 1e-9):
        return stack
    frames = rotate_to_common(stack.frames, rotation)
    return stack.with_frames(
        frames,
        metadata={**stack.metadata, "derotated": True},
    )


def alignment_table(result: Any) -> np.ndarray:
    """The ``alignment`` table of a rigid result: one row per frame (index, shift y/x px, peak
    height, residual px, flagged)."""
    n = len(result.peak_heights)
    table = np.zeros(
        n,
        dtype=[
            ("index", "<i8"),
            ("shift_y_px", "<f8"),
            ("shift_x_px", "<f8"),
            ("peak_height", "<f8"),
            ("residual_px", "<f8"),
            ("flagged", "?"),
        ],
    )
    table["index"] = np.arange(n)
    table["shift_y_px"] = result.shifts_px[:, 0]
    table["shift_x_px"] = result.shifts_px[:, 1]
    table["peak_height"] = result.peak_heights
    table["residual_px"] = result.residuals_px
    table["flagged"] = np.isin(np.arange(n), list(result.flagged))
    return table


def step_align(ctx: PipelineContext, step: AlignStep) -> StepOutput:
    """Rigid alignment measured on ``step.signal`` (default the first) and applied to all."""
    from scherzer.processing.registration import align_stack

    signal = step.signal or next(iter(ctx.stacks))
    if signal not in ctx.stacks:
        raise PipelineError(f"align: no signal {signal!r}; have {sorted(ctx.stacks)}")
    align_params = step.settings
    stacks = {name: _rotated_back(s) for name, s in ctx.stacks.items()}
    others = [s for name, s in stacks.items() if name != signal]
    result, aligned = align_stack(stacks[signal], align_params, others=others)
    names = [signal] + [name for name in stacks if name != signal]
    out = StepOutput(
        step="align",
        params={"signal": signal, **dataclasses.asdict(align_params)},
        summary=result.to_json(),
        tables={"alignment": alignment_table(result)},
    )
    for name, stack in zip(names, aligned, strict=True):
        out.stacks[f"aligned_{name}"] = stack
        combined = stack.frames.sum(0) if align_params.combine == "sum" else stack.frames.mean(0)
        out.arrays[f"average_{name}"] = combined.astype(np.float32)
    out.arrays["similarity"] = np.asarray(result.similarity, dtype=np.float32)
    ctx.results["align"] = result
    plot_dir = _plot_dir(ctx)
    if plot_dir is not None:
        from scherzer.processing.plots import plot_alignment

        average = out.arrays[f"average_{signal}"]
        pixel = _known_pixel_nm(stacks[signal])
        out.plots = plot_alignment(result, average, plot_dir, pixel_nm=pixel, signal=signal)
    return out


# --- non-rigid (scan distortion) ----------------------------------------------------------------
def _nonrigid_table(result: Any) -> np.ndarray:
    n = len(result.affine)
    cols = [("index", "<i8"), *((f"affine_{k}", "<f8") for k in range(6)),
            ("field_rms_px", "<f8"), ("ncc", "<f8"), ("flagged", "?")]  # fmt: skip
    table = np.zeros(n, dtype=cols)
    table["index"] = np.arange(n)
    for k in range(6):
        table[f"affine_{k}"] = result.affine[:, k]
    table["field_rms_px"] = result.field_rms_px
    table["ncc"] = result.ncc
    table["flagged"] = np.isin(np.arange(n), list(result.flagged))
    return table


def _nonrigid_outputs(out: StepOutput, name: str, stack: ImageStack, corrected: tuple) -> None:
    """Store one signal's corrected frames, average (NaN where unseen) and count map."""
    frames, _, average, count = corrected
    scale = frames.shape[-1] / stack.frames.shape[-1]
    pixel = (stack.pixel_size_nm[0] / scale, stack.pixel_size_nm[1] / scale)
    out.stacks[f"nonrigid_{name}"] = dataclasses.replace(stack, frames=frames, pixel_size_nm=pixel)
    out.arrays[f"average_nonrigid_{name}"] = np.asarray(average, np.float32)
    out.arrays[f"count_nonrigid_{name}"] = np.asarray(count, np.float32)


def step_nonrigid(ctx: PipelineContext, step: NonrigidStep) -> StepOutput:
    """Scan-distortion correction measured on one signal and applied to all (the fields of
    frame i move every signal recorded at the same probe positions)."""
    from scherzer.processing.scan_distortion import apply_fields, correct_scan_distortion
    from scherzer.processing.scan_distortion.plots import plot_nonrigid

    signal = step.signal or next(iter(ctx.stacks))
    if signal not in ctx.stacks:
        raise PipelineError(f"nonrigid: no signal {signal!r}; have {sorted(ctx.stacks)}")
    stacks = {name: _rotated_back(s) for name, s in ctx.stacks.items()}
    primary = stacks[signal]
    rotations = step.rotations_deg or tuple(ctx.stacks[signal].column("scan_rotation_deg"))
    if len(rotations) != primary.n_frames:
        raise PipelineError(
            f"nonrigid: {len(rotations)} scan rotations for {primary.n_frames} frames"
        )
    result = correct_scan_distortion(primary.frames, step.settings, rotations)
    out = StepOutput(
        step="nonrigid",
        params={**step_to_json(step), "signal": signal},
        summary=result.to_json(),
        tables={"nonrigid": _nonrigid_table(result)},
    )
    own = (result.corrected, result.valid, result.average, result.count)
    _nonrigid_outputs(out, signal, primary, own)
    out.arrays[f"fields_nonrigid_{signal}"] = result.fields_px  # a fresh float32 expansion
    for name, stack in stacks.items():
        if name != signal:
            _nonrigid_outputs(out, name, stack, apply_fields(stack.frames, result))
    ctx.results["nonrigid"] = result
    plot_dir = _plot_dir(ctx)
    if plot_dir is not None:
        before = ctx.results["align"].average if "align" in ctx.results else None
        out.plots = plot_nonrigid(result, plot_dir, before=before)
    return out


# --- focal series --------------------------------------------------------------------------------
def _instrument(ctx: PipelineContext, instrument: Any) -> tuple[Any, float, np.ndarray]:
    """(optics, pixel_nm, nominal defocus) of the primary stack with the step's overrides; one
    evaluation per distinct set of overrides."""
    from scherzer.processing.focal import instrument_from_stack

    given = instrument.given()
    key = ("instrument", tuple(sorted(given.items())))
    if key not in ctx.results:
        ctx.results[key] = instrument_from_stack(ctx.primary, **given)
    return ctx.results[key]


def step_focal_register(ctx: PipelineContext, step: FocalRegisterStep) -> StepOutput:
    """Focal-series registration with the step's FocalParams, instrument overrides and camera."""
    from scherzer.processing.focal import plot_registration, register_focal_series

    optics, pixel_nm, nominal = _instrument(ctx, step.instrument)
    reg = register_focal_series(
        ctx.primary,
        optics,
        step.settings,
        nominal_defocus_nm=nominal,
        pixel_nm=pixel_nm,
        mtf=step.camera.mtf,
        nps=step.camera.nps,
    )
    ctx.results["focal_register"] = reg
    ctx.results["camera_curves"] = step.camera
    out = StepOutput(
        step="focal_register",
        params=step_to_json(step),
        summary={**reg.to_json(), "flagged": [int(i) for i in np.nonzero(reg.flagged)[0]]},
        tables={"focal_registration": reg.table()},
    )
    plot_dir = _plot_dir(ctx)
    if plot_dir is not None:
        out.plots = plot_registration(reg, plot_dir, pixel_nm=pixel_nm)
    return out


def _yx_dims(shape: tuple[int, ...], pixel_nm: float) -> list[tuple[str, str, np.ndarray]]:
    """y/x axes in nm of an image on the given pixel grid (an area crop keeps the pixel size)."""
    ny, nx = shape[-2:]
    return [("y", "nm", np.arange(ny) * pixel_nm), ("x", "nm", np.arange(nx) * pixel_nm)]


def step_restore(ctx: PipelineContext, step: RestoreStep) -> StepOutput:
    """Exit-wave restoration (registration runs first, with ``step.register``, if needed)."""
    from scherzer.processing.focal import FocalParams, intensity_frames
    from scherzer.processing.plots import plot_wave
    from scherzer.processing.restoration import restore_exit_wave

    if "focal_register" not in ctx.results:
        register = step.register if step.register is not None else FocalParams()
        step_focal_register(ctx, FocalRegisterStep(register, step.instrument, step.camera))
    reg = ctx.results["focal_register"]
    camera = step.camera if step.camera.given() else ctx.results.get("camera_curves")
    camera = camera or CameraCurves()
    optics, pixel_nm, _ = _instrument(ctx, step.instrument)
    settings = step.settings
    used = np.asarray(reg.used, dtype=bool).copy()
    for i in settings.exclude:
        if not 0 <= int(i) < len(used):
            raise PipelineError(f"restore: exclude index {i} out of range 0..{len(used) - 1}")
        used[int(i)] = False
    weights = None if step.dose_weights is None else np.asarray(step.dose_weights)
    res = restore_exit_wave(
        intensity_frames(ctx.primary),
        optics,
        pixel_nm,
        reg.defocus_nm,
        reg.shifts_px,
        settings,
        used=used,
        mtf=camera.mtf,
        nps=camera.nps,
        dose_weights=weights,
        astigmatism=(reg.astigmatism_nm, reg.astigmatism_deg),
    )
    ctx.results["restore"] = res
    params = step_to_json(step)
    out = StepOutput(
        step="restore",
        params=params,
        summary={
            "reference_index": int(reg.reference_index),
            "images_used": int(np.count_nonzero(used)),
            "phase_rad_range": [float(res.phase.min()), float(res.phase.max())],
            "restore_seconds": float(res.seconds),
            # RMS of predicted − measured intensity per non-linear iteration (first: linear)
            "image_residual": [float(v) for v in res.residual_history],
            # whether the non-linear refinement ran, and why (automatic unless iterations given)
            "nonlinear": res.params["nonlinear"],
        },
        arrays={"exit_wave": res.wave.astype(np.complex64)},
        dims={"exit_wave": _yx_dims(res.wave.shape, pixel_nm)},
    )
    plot_dir = _plot_dir(ctx)
    if plot_dir is not None:
        out.plots = plot_wave(res.wave, plot_dir, pixel_nm=pixel_nm)
    return out


def step_structure_image(ctx: PipelineContext, step: StructureImageStep) -> StepOutput:
    """CTF-corrected structure image (fixed step; automatic start defocus)."""
    from scherzer.processing.focal import structure_image

    optics, pixel_nm, nominal = _instrument(ctx, step.instrument)
    steps = np.diff(nominal)
    step_nm = step.instrument.given().get("step_nm")
    if step_nm is None and len(steps):
        step_nm = float(np.median(steps))
    if not step_nm:
        raise PipelineError("structure_image needs a fixed focus step (step_nm)")
    res = structure_image(ctx.primary, optics, float(step_nm), step.settings, pixel_nm=pixel_nm)
    ctx.results["structure_image"] = res
    return StepOutput(
        step="structure_image",
        params={**step_to_json(step), "step_nm": float(step_nm)},
        summary={
            "start_defocus_nm": float(res.start_defocus_nm),
            "astigmatism_nm": float(res.astigmatism_nm),
            "astigmatism_deg": float(res.astigmatism_deg),
            "defocus_nm": [float(v) for v in res.defocus_nm],
            "shifts_px": [[float(a), float(b)] for a, b in res.shifts_px],
        },
        arrays={"structure_image": res.image.astype(np.float32)},
    )


# --- EFTEM ---------------------------------------------------------------------------------------
def _eftem_inputs(stack: ImageStack, step: EFTEMMapsStep) -> tuple[np.ndarray, float, float]:
    """(energies (n,) eV, slit width eV, counts per stored unit) from the step or the stack's
    ``eftem`` metadata (the daemon's job files)."""
    md = stack.metadata.get("eftem") or {}
    energies = step.energies_ev if step.energies_ev is not None else md.get("energies_ev")
    width = step.slit_width_ev if step.slit_width_ev is not None else md.get("slit_width_ev")
    if energies is None or width is None:
        raise PipelineError(
            "eftem_maps needs energies_ev and slit_width_ev (the stack's eftem metadata has none)"
        )
    energies = np.asarray(energies, dtype=np.float64)[: stack.n_frames]
    if energies.size != stack.n_frames:
        raise PipelineError(f"eftem_maps: {energies.size} energies for {stack.n_frames} frames")
    return energies, float(width), float(md.get("quantum_counts", 1.0))


def _eftem_alignment_table(energies: np.ndarray, result: Any) -> np.ndarray:
    cols = [("index", "<i8"), ("energy_ev", "<f8"), ("shift_y_px", "<f8"),
            ("shift_x_px", "<f8"), ("reference", "?")]  # fmt: skip
    table = np.zeros(len(energies), dtype=cols)
    table["index"] = np.arange(len(energies))
    table["energy_ev"] = energies
    if result.aligned is not None:
        table["shift_y_px"], table["shift_x_px"] = result.aligned.shifts_px.T
        table["reference"] = np.isin(table["index"], result.aligned.reference_indices)
    return table


def step_eftem_maps(ctx: PipelineContext, step: EFTEMMapsStep) -> StepOutput:
    """Align an EFTEM series on its pre-edge images, then three-window and jump-ratio maps."""
    from scherzer.processing.eftem import edge_windows, eftem_maps

    stack = ctx.primary
    energies, width, quantum = _eftem_inputs(stack, step)
    frames = stack.frames * np.float32(quantum)  # counts at the first image's exposure
    times = stack.column("time_s") + 0.5 * np.nan_to_num(stack.column("exposure_s"))
    settings = step.settings
    try:
        result = eftem_maps(frames, energies, width, settings, times)
        windows = edge_windows(energies, width, settings.edge_onset_ev, settings.margin_ev)
    except ValueError as exc:
        raise PipelineError(f"eftem_maps: {exc}") from exc
    maps, pixel = result.maps, float(stack.pixel_size_nm[1])
    signal = next(iter(ctx.stacks))
    refs = [] if result.aligned is None else result.aligned.reference_indices.tolist()
    names = ("pre1", "pre2", "post")
    summary = {
        "edge_onset_ev": settings.edge_onset_ev,
        "windows": {k: {"index": i, "energy_ev": float(energies[i])}
                    for k, i in zip(names, windows, strict=True)},
        "reference_indices": refs,
        "crop_origin_px": list(result.crop_origin_px),
        "quantum_counts": quantum,
        "median_exponent": float(np.median(maps.exponent)),
        "fit_ok_fraction": float(np.mean(maps.fit_ok)),
    }  # fmt: skip
    out = StepOutput(
        step="eftem_maps",
        params=step_to_json(step),
        summary=summary,
        tables={"eftem_alignment": _eftem_alignment_table(energies, result)},
    )
    for name, image in (("eftem_map", maps.signal), ("eftem_jump_ratio", maps.jump_ratio),
                        ("eftem_background", maps.background), ("eftem_exponent", maps.exponent),
                        ("eftem_fit_ok", maps.fit_ok.astype(np.uint8))):  # fmt: skip
        out.arrays[name] = image
        out.dims[name] = _yx_dims(image.shape, pixel)
    if result.aligned is not None:
        out.stacks[f"aligned_{signal}"] = stack.with_frames(
            result.aligned.frames, intensity_units="counts at the first exposure",
            metadata={**stack.metadata, "crop_origin_px": list(result.crop_origin_px)},
        )  # fmt: skip
    ctx.results["eftem_maps"] = result
    return out


#: The dispatch table of named steps (no step is ever looked up by reflection); kept equal to
#: :data:`scherzer.processing.steps.STEP_NAMES` by a test.
STEPS: dict[str, StepFunction] = {
    "align": step_align,
    "nonrigid": step_nonrigid,
    "focal_register": step_focal_register,
    "restore": step_restore,
    "structure_image": step_structure_image,
    "eftem_maps": step_eftem_maps,
}


def run_pipeline(
    stacks: Mapping[str, ImageStack] | ImageStack,
    steps: Sequence[Step | str | Mapping[str, Any]],
    *,
    plot_dir: str | Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> PipelineResult:
    """Run ``steps`` in order (typed steps; names or flat mappings are parsed by
    :func:`~scherzer.processing.steps.parse_step` first, with no file access).
    ``progress(step, i, n)`` is called before each step."""
    if isinstance(stacks, ImageStack):
        stacks = {stacks.signal or "frames": stacks}
    if not stacks:
        raise PipelineError("no stacks to process")
    plan = parse_steps(steps)
    ctx = PipelineContext(dict(stacks), Path(plot_dir) if plot_dir else None)
    outputs = []
    for i, step in enumerate(plan):
        if progress is not None:
            progress(step.name, i, len(plan))
        t0 = time.perf_counter()
        out = STEPS[step.name](ctx, step)
        out.seconds = time.perf_counter() - t0
        outputs.append(out)
    if progress is not None:
        progress("done", len(plan), len(plan))
    return PipelineResult(outputs)
