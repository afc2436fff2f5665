"""Named processing steps over ImageStacks, shared by the daemon and the CLI.

A pipeline is a list of step names (optionally with parameters) run in order on the stacks of one
acquisition: ``{"HAADF": stack, "ABF": stack}`` for a scan series (the first signal is the one
measured on), ``{"frames": stack}`` for a focal series. Each step reads what earlier steps left
in the :class:`PipelineContext` and adds :class:`StepOutput` s: stacks, arrays and tables to
store, a JSON summary and the parameters used. Steps are pure numerics; the only files they
touch are PNG plots in ``plot_dir`` when one is given. Storing the outputs in an EMD file is
:func:`scherzer.emd.store_pipeline_result`.

Steps
-----
* ``align`` — rigid alignment (:mod:`scherzer.processing.registration`): scan-rotated frames are
  rotated back to one orientation first (unless the stack's metadata says ``"derotated": True``;
  records keep the acquired ``scan_rotation_deg`` either way); shifts are measured on the first
  signal (or ``signal=``) and applied to every signal. Outputs ``aligned_<signal>`` stacks,
  ``average_<signal>`` arrays and the ``alignment`` table.
* ``focal_register`` — focal-series registration (:mod:`scherzer.processing.focal`): per-image
  defocus, drift, peak height, absolute defocus and A1. Output table ``focal_registration``.
* ``restore`` — exit-wave restoration (runs ``focal_register`` first if it has not run).
  Output array ``exit_wave`` (complex64).
* ``structure_image`` — CTF-corrected structure image of a fixed-step series. Output array
  ``structure_image``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scherzer.stack import ImageStack

__all__ = [
    "STEPS",
    "PipelineContext",
    "PipelineError",
    "PipelineResult",
    "StepOutput",
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


StepFunction = Callable[[PipelineContext, dict[str, Any]], StepOutput]


def _known_fields(cls: type, params: Mapping[str, Any], step: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise PipelineError(
            f"step {step!r}: unknown parameter(s) {unknown}; known: {sorted(names)}"
        )
    return dict(params)


def _plot_dir(ctx: PipelineContext) -> Path | None:
    if ctx.plot_dir is None:
        return None
    ctx.plot_dir.mkdir(parents=True, exist_ok=True)
    return ctx.plot_dir


# --- align -------------------------------------------------------------------------------------
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


def _alignment_table(result: Any) -> np.ndarray:
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


def step_align(ctx: PipelineContext, params: dict[str, Any]) -> StepOutput:
    """Rigid alignment; parameters are :class:`~scherzer.processing.registration.AlignParams`
    fields plus ``signal`` (the signal to measure on; default the first)."""
    from scherzer.processing.registration import AlignParams, align_stack, plot_alignment

    params = dict(params)
    signal = params.pop("signal", None) or next(iter(ctx.stacks))
    if signal not in ctx.stacks:
        raise PipelineError(f"align: no signal {signal!r}; have {sorted(ctx.stacks)}")
    align_params = AlignParams(**_known_fields(AlignParams, params, "align"))
    stacks = {name: _rotated_back(s) for name, s in ctx.stacks.items()}
    others = [s for name, s in stacks.items() if name != signal]
    result, aligned = align_stack(stacks[signal], align_params, others=others)
    names = [signal] + [name for name in stacks if name != signal]
    out = StepOutput(
        step="align",
        params={"signal": signal, **dataclasses.asdict(align_params)},
        summary=result.to_json(),
        tables={"alignment": _alignment_table(result)},
    )
    for name, stack in zip(names, aligned, strict=True):
        out.stacks[f"aligned_{name}"] = stack
        combined = stack.frames.sum(0) if align_params.combine == "sum" else stack.frames.mean(0)
        out.arrays[f"average_{name}"] = combined.astype(np.float32)
    out.arrays["similarity"] = np.asarray(result.similarity, dtype=np.float32)
    ctx.results["align"] = result
    plot_dir = _plot_dir(ctx)
    if plot_dir is not None:
        out.plots = plot_alignment(result, out.arrays[f"average_{signal}"], plot_dir)
    return out


# --- focal series --------------------------------------------------------------------------------
_INSTRUMENT_OVERRIDES = (
    "voltage_kv",
    "cs_mm",
    "focal_spread_nm",
    "beam_divergence_mrad",
    "pixel_nm",
    "start_nm",
    "step_nm",
)


def _split_overrides(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    overrides = {k: params.pop(k) for k in _INSTRUMENT_OVERRIDES if params.get(k) is not None}
    for k in _INSTRUMENT_OVERRIDES:
        params.pop(k, None)
    return overrides, params


def _instrument(ctx: PipelineContext, overrides: dict[str, Any]) -> tuple[Any, float, np.ndarray]:
    from scherzer.processing.focal import instrument_from_stack

    key = ("instrument", tuple(sorted(overrides.items())))
    if key not in ctx.results:
        ctx.results[key] = instrument_from_stack(ctx.primary, **overrides)
    return ctx.results[key]


def _camera_curves(params: dict[str, Any]) -> tuple[Any, Any]:
    from scherzer.processing.restoration import load_camera_curve

    curves = []
    for name in ("mtf", "nps"):
        value = params.pop(name, None)
        if isinstance(value, str | Path):
            value = load_camera_curve(value)
        curves.append(value)
    return curves[0], curves[1]


def step_focal_register(ctx: PipelineContext, params: dict[str, Any]) -> StepOutput:
    """Focal-series registration; parameters are :class:`FocalParams` fields plus instrument
    overrides (``voltage_kv``, ``cs_mm``, ``focal_spread_nm``, ``beam_divergence_mrad``,
    ``pixel_nm``, ``start_nm``, ``step_nm``) and ``mtf``/``nps`` (arrays or file paths)."""
    from scherzer.processing.focal import FocalParams, plot_registration, register_focal_series

    overrides, rest = _split_overrides(dict(params))
    mtf, nps = _camera_curves(rest)
    focal_params = FocalParams(**_known_fields(FocalParams, rest, "focal_register"))
    optics, pixel_nm, nominal = _instrument(ctx, overrides)
    reg = register_focal_series(
        ctx.primary,
        optics,
        focal_params,
        nominal_defocus_nm=nominal,
        pixel_nm=pixel_nm,
        mtf=mtf,
        nps=nps,
    )
    ctx.results["focal_register"] = reg
    ctx.results["camera_curves"] = (mtf, nps)
    out = StepOutput(
        step="focal_register",
        params={**overrides, **dataclasses.asdict(focal_params)},
        summary={**reg.to_json(), "flagged": [int(i) for i in np.nonzero(reg.flagged)[0]]},
        tables={"focal_registration": reg.table()},
    )
    plot_dir = _plot_dir(ctx)
    if plot_dir is not None:
        out.plots = plot_registration(reg, plot_dir)
    return out


def step_restore(ctx: PipelineContext, params: dict[str, Any]) -> StepOutput:
    """Exit-wave restoration; parameters: ``iterations``, ``area``, ``exclude``, ``mtf``, ``nps``,
    ``dose_weights`` and the instrument overrides (registration runs first if needed)."""
    from scherzer.processing.focal import intensity_frames
    from scherzer.processing.restoration import plot_wave, restore_exit_wave

    params = dict(params)
    overrides, rest = _split_overrides(params)
    if "focal_register" not in ctx.results:
        reg_params = {k: rest[k] for k in ("exclude", "area") if k in rest}
        for k in ("mtf", "nps"):
            if k in rest:
                reg_params[k] = rest[k]
        step_focal_register(ctx, {**overrides, **reg_params})
    reg = ctx.results["focal_register"]
    mtf, nps = _camera_curves(rest)
    if mtf is None and nps is None:
        mtf, nps = ctx.results.get("camera_curves", (None, None))
    optics, pixel_nm, _ = _instrument(ctx, overrides)
    used = np.asarray(reg.used, dtype=bool).copy()
    for i in rest.pop("exclude", ()) or ():
        if not 0 <= int(i) < len(used):
            raise PipelineError(f"restore: exclude index {i} out of range 0..{len(used) - 1}")
        used[int(i)] = False
    allowed = {"iterations", "area", "dose_weights"}
    unknown = sorted(set(rest) - allowed)
    if unknown:
        raise PipelineError(f"restore: unknown parameter(s) {unknown}; known: {sorted(allowed)}")
    res = restore_exit_wave(
        intensity_frames(ctx.primary),
        optics,
        pixel_nm,
        reg.defocus_nm,
        reg.shifts_px,
        used=used,
        mtf=mtf,
        nps=nps,
        dose_weights=rest.get("dose_weights"),
        area=rest.get("area"),
        iterations=int(rest.get("iterations", 0) or 0),
        astigmatism=(reg.astigmatism_nm, reg.astigmatism_deg),
    )
    ctx.results["restore"] = res
    out = StepOutput(
        step="restore",
        params={**overrides, **{k: v for k, v in rest.items() if k != "dose_weights"}},
        summary={
            "reference_index": int(reg.reference_index),
            "images_used": int(np.count_nonzero(used)),
            "phase_rad_range": [float(res.phase.min()), float(res.phase.max())],
            "restore_seconds": float(res.seconds),
        },
        arrays={"exit_wave": res.wave.astype(np.complex64)},
    )
    plot_dir = _plot_dir(ctx)
    if plot_dir is not None:
        out.plots = plot_wave(res.wave, plot_dir)
    return out


def step_structure_image(ctx: PipelineContext, params: dict[str, Any]) -> StepOutput:
    """CTF-corrected structure image (fixed step; automatic start defocus)."""
    from scherzer.processing.focal import structure_image

    overrides, rest = _split_overrides(dict(params))
    optics, pixel_nm, nominal = _instrument(ctx, overrides)
    steps = np.diff(nominal)
    step_nm = overrides.get("step_nm", float(np.median(steps)) if len(steps) else None)
    if not step_nm:
        raise PipelineError("structure_image needs a fixed focus step (step_nm)")
    res = structure_image(ctx.primary, optics, float(step_nm), pixel_nm=pixel_nm, **rest)
    ctx.results["structure_image"] = res
    return StepOutput(
        step="structure_image",
        params={**overrides, "step_nm": float(step_nm), **rest},
        summary={
            "start_defocus_nm": float(res.start_defocus_nm),
            "astigmatism_nm": float(res.astigmatism_nm),
            "astigmatism_deg": float(res.astigmatism_deg),
            "defocus_nm": [float(v) for v in res.defocus_nm],
            "shifts_px": [[float(a), float(b)] for a, b in res.shifts_px],
        },
        arrays={"structure_image": res.image.astype(np.float32)},
    )


#: The dispatch table of named steps (no step is ever looked up by reflection).
STEPS: dict[str, StepFunction] = {
    "align": step_align,
    "focal_register": step_focal_register,
    "restore": step_restore,
    "structure_image": step_structure_image,
}


def _normalise_steps(steps: Sequence[str | Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for s in steps:
        if isinstance(s, str):
            name, params = s, {}
        elif isinstance(s, Mapping) and isinstance(s.get("step"), str):
            name, params = s["step"], {k: v for k, v in s.items() if k != "step"}
        else:
            raise PipelineError(f"a step is a name or a mapping with 'step'; got {s!r}")
        if name not in STEPS:
            raise PipelineError(f"unknown processing step {name!r}; known: {sorted(STEPS)}")
        out.append((name, params))
    return out


def run_pipeline(
    stacks: Mapping[str, ImageStack] | ImageStack,
    steps: Sequence[str | Mapping[str, Any]],
    *,
    plot_dir: str | Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> PipelineResult:
    """Run ``steps`` in order. ``progress(step, i, n)`` is called before each step."""
    if isinstance(stacks, ImageStack):
        stacks = {stacks.signal or "frames": stacks}
    if not stacks:
        raise PipelineError("no stacks to process")
    plan = _normalise_steps(steps)
    ctx = PipelineContext(dict(stacks), Path(plot_dir) if plot_dir else None)
    outputs = []
    for i, (name, params) in enumerate(plan):
        if progress is not None:
            progress(name, i, len(plan))
        t0 = time.perf_counter()
        out = STEPS[name](ctx, params)
        out.seconds = time.perf_counter() - t0
        outputs.append(out)
    return PipelineResult(outputs)
