"""``scherzer align`` (rigid, and non-rigid scan-distortion correction with ``--nonrigid``) and
``scherzer align-signal`` (stored shifts or displacement fields applied to other signals).

Frames come in one orientation (as our files store them); each frame's scan rotation comes from
the file's records or ``--scan-rotation-deg``. ``--save-average`` writes the (merged) average as a
float32 TIFF in frame 0's orientation with the same pixel size, NaN where no frame saw.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from pathlib import Path
from typing import Any

import numpy as np

from scherzer.cli.common import (
    Outcome,
    box,
    non_negative_int,
    output_options,
    positive_float,
    positive_int,
)
from scherzer.cli.offline import process

__all__ = ["add_align", "add_align_signal"]


def _reference(text: str) -> str:
    if text not in ("mean", "local") and not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 'mean', 'local' or a frame index, got {text!r}")
    return text


def _rotations(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated degrees, got {text!r}"
        ) from None


def _rigid_step(args: argparse.Namespace) -> Any:
    from scherzer.processing.registration import AlignParams
    from scherzer.processing.steps import AlignStep, build_settings

    ref = args.reference
    values = {
        "alpha": args.alpha,
        "neighbours": args.neighbours,
        "refine": args.refine,
        "roi": args.roi,
        "reference": int(ref) if ref.isdigit() else "mean",
        "output": "expand" if args.expand else "crop",
        "memory_budget_mb": args.memory_budget_mb,
    }
    if ref == "local":
        raise ValueError("--reference local is a non-rigid reference: add --nonrigid")
    return AlignStep(build_settings(AlignParams, values, "align"), args.signal)


def _nonrigid_step(args: argparse.Namespace) -> Any:
    from scherzer.processing.steps import parse_step

    ref = args.reference
    values: dict[str, Any] = {
        "step": "nonrigid",
        "affine_cycles": args.affine_cycles,
        "nonlinear_cycles": args.nonlinear_cycles,
        "mode": args.mode,
        "smoothing_px": args.smoothing_px,
        "convergence_px": args.convergence_px,
        "reference": "index" if ref.isdigit() else ref,
        "merge": args.merge,
        "drift_search": args.drift_search,
        "row_jitter": args.row_jitter,
    }
    if ref.isdigit():
        values["reference_index"] = int(ref)
    if args.signal is not None:
        values["signal"] = args.signal
    if args.scan_rotation_deg is not None:
        values["scan_rotation_deg"] = args.scan_rotation_deg
    return parse_step(values)


def _save_average(path: Path, average: np.ndarray, pixel_nm: float) -> None:
    import tifffile

    resolution = (1e7 / pixel_nm, 1e7 / pixel_nm)  # pixels per cm
    tifffile.imwrite(
        path, np.asarray(average, np.float32), resolution=resolution, resolutionunit="CENTIMETER"
    )


def _align(args: argparse.Namespace) -> Outcome:
    step = _nonrigid_step(args) if args.nonrigid else _rigid_step(args)
    if not args.nonrigid:
        found = _chunked_input(args.file, args.signal, step.settings)
        if found is not None:
            return _align_chunked(args, step.settings, found)
    code, result, text, outputs = process(args, [step], args.signal)
    out_step = outputs.outputs[0]
    signal = out_step.params["signal"]
    if args.nonrigid:
        s = result["nonrigid"]
        keys = ("affine", "field_rms_px", "flagged", "ncc", "rigid_shifts_px", "history")
        out = {k: s[k] for k in keys}
        average = out_step.arrays[f"average_nonrigid_{signal}"]
        stack = out_step.stacks[f"nonrigid_{signal}"]
        lines = [
            f"frame {i:3d}: field RMS {r:.3f} px, NCC {c:.3f}"
            for i, (r, c) in enumerate(zip(s["field_rms_px"], s["ncc"], strict=True))
        ]
    else:
        a = result["align"]
        out = {k: a[k] for k in ("shifts_px", "peak_heights", "reference", "flagged")}
        average = out_step.arrays[f"average_{signal}"]
        stack = out_step.stacks[f"aligned_{signal}"]
        lines = [
            f"frame {i:3d}: dy {sh[0]:+8.3f}  dx {sh[1]:+8.3f} px  peak {p:.3f}"
            for i, (sh, p) in enumerate(zip(a["shifts_px"], a["peak_heights"], strict=True))
        ]
    out.update(seconds=result["seconds"], wall_s=result["wall_s"])
    if args.save_average is not None:
        _save_average(args.save_average, average, stack.pixel_size_nm[1])
        out["average_file"] = str(args.save_average)
        lines.append(f"average: {args.save_average}")
    return code, out, "\n".join([*lines, text])


# --- stacks larger than the memory budget -------------------------------------------------------
#: The in-memory path holds about this many stack-sized float32 arrays at once (the frames as
#: read, the aligned frames, the spectra); a stack whose copies exceed the budget is aligned in
#: chunks from the file instead.
IN_MEMORY_COPIES = 3


@dataclasses.dataclass(frozen=True)
class _ChunkedInput:
    """A stack to align in chunks: its signal name, shape and pixel size (nm)."""

    signal: str
    shape: tuple[int, int, int]
    pixel_nm: tuple[float, float]


def _chunked_input(path: Path, signal: str | None, params: Any) -> _ChunkedInput | None:
    """The stack to align in chunks, or None when it fits the budget (or is in a format the
    chunked reader does not read: only our EMD/.hspy files and multi-page TIFFs are)."""
    from scherzer import io as sio
    from scherzer.io.axes import nm_per_unit

    path = Path(path)
    budget = params.budget_bytes()
    if not path.is_file():
        return None  # the in-memory path reports it
    if (
        path.suffix.lower() in (".tif", ".tiff")
        and IN_MEMORY_COPIES * 4 * path.stat().st_size <= budget
    ):
        return None  # uncompressed samples take ≥ 1 byte: it fits (and rosettasciio stays unloaded)
    summary = sio.describe(path)
    if summary.get("format") == "scherzer-emd":
        stacks = {k: v for k, v in summary.get("data", {}).items() if v.get("kind") == "stack"}
        name = signal if signal is not None else next(iter(stacks), None)
        if name not in stacks:
            return None
        info = stacks[name]
        pixel = tuple(float(v) for v in info["pixel_size_nm"])
        rotation = info.get("records", {}).get("scan_rotation_deg") or {}
        rotated = rotation.get("min", 0.0) != rotation.get("max", 0.0)
    elif summary.get("format") == "tiff":
        signals = [s for s in summary.get("signals", []) if s.get("is_image")]
        if len(signals) != 1 or len(signals[0]["shape"]) != 3:
            return None
        info, name, rotated = signals[0], signal or signals[0]["name"], False
        axis = info["axes"][1]
        scale = float(axis.get("scale") or 1.0) * (nm_per_unit(axis.get("units")) or 1.0)
        pixel = (scale, scale)
    else:
        return None
    shape = tuple(int(v) for v in info["shape"])
    if len(shape) != 3 or IN_MEMORY_COPIES * 4 * int(np.prod(shape)) <= budget:
        return None
    if rotated:
        raise ValueError(
            f"{path} ({shape}) exceeds --memory-budget-mb, and its frames have different scan "
            "rotations, which the chunked path does not undo: give a larger budget"
        )
    if params.output != "crop":
        raise ValueError("stacks larger than the memory budget are aligned with --crop only")
    return _ChunkedInput(str(name), shape, pixel)  # type: ignore[arg-type]


def _align_chunked(args: argparse.Namespace, params: Any, found: _ChunkedInput) -> Outcome:
    """Measure on frames read from the file in chunks (spectra in scratch files beside OUT),
    then write the aligned frames to OUT one at a time with their average, the alignment table
    and the parameters. OUT holds the aligned stack only (not a copy of the input)."""
    import time

    from scherzer import io as sio
    from scherzer.io.chunks import FileFrames, ScratchFactory
    from scherzer.processing.pipeline import StepOutput, alignment_table
    from scherzer.processing.registration import measure_shifts
    from scherzer.processing.shifting import aligned_blocks
    from scherzer.stack import FrameRecord

    t0 = time.perf_counter()
    with FileFrames(args.file, signal=found.signal) as source:
        with ScratchFactory(Path(args.out).resolve().parent) as scratch:
            result = measure_shifts(source, params, scratch=scratch)
        n, ny, nx = source.shape
        total: np.ndarray | None = None
        name = f"aligned_{found.signal}"
        writer: Any = None
        try:
            for start, block in aligned_blocks(source.read, source.shape, result.shifts_px):
                if writer is None:
                    writer = sio.StackWriter(
                        args.out, pixel_size_nm=found.pixel_nm, frame_shape=block.shape[1:],
                        names=(name,), overwrite=True,
                    )  # fmt: skip
                    total = np.zeros(block.shape[1:])
                for k, frame in enumerate(block):
                    writer.append(frame, FrameRecord(index=start + k), name=name)
                    total += frame
        finally:
            if writer is not None:
                writer.close()
    average = (total if params.combine == "sum" else total / n).astype(np.float32)
    out = StepOutput(
        step="align",
        params={"signal": found.signal, **dataclasses.asdict(params)},
        summary=result.to_json(),
        tables={"alignment": alignment_table(result)},
    )
    out.arrays[f"average_{found.signal}"] = average
    out.arrays["similarity"] = np.asarray(result.similarity, dtype=np.float32)
    out.seconds = result.seconds
    sio.store_pipeline_result(args.out, types.SimpleNamespace(outputs=[out]))
    if args.save_average is not None:
        _save_average(args.save_average, average, found.pixel_nm[1])
    keys = ("shifts_px", "peak_heights", "reference", "flagged")
    summary = {k: v for k, v in result.to_json().items() if k in keys}
    summary.update(seconds=result.seconds, wall_s=time.perf_counter() - t0, chunked=True)
    lines = [
        f"frame {i:3d}: dy {sh[0]:+8.3f}  dx {sh[1]:+8.3f} px  peak {p:.3f}"
        for i, (sh, p) in enumerate(zip(result.shifts_px, result.peak_heights, strict=True))
    ]
    lines.append(f"aligned in chunks ({n} × {ny}×{nx} over the memory budget); wrote {args.out}")
    if args.plot is not None:
        lines.append("no plots: the chunked path makes none (give a larger --memory-budget-mb)")
    return 0, summary, "\n".join(lines)


def _add_rigid_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="0 cross, 0.5 mutual, 1 phase correlation (default 0.5)",
    )
    p.add_argument(
        "--neighbours",
        type=positive_int,
        default=4,
        help="neighbours each frame is measured against (default 4)",
    )
    p.add_argument(
        "--refine",
        type=non_negative_int,
        default=2,
        help="refinement passes against the average (default 2)",
    )
    p.add_argument(
        "--roi",
        type=box,
        default=None,
        help="measured region y0,x0,height,width px (default: whole field)",
    )
    p.add_argument(
        "--memory-budget-mb",
        type=positive_float,
        default=None,
        help="memory the alignment may use (MB; default half the RAM); larger stacks in our "
        "HDF5 files or multi-page TIFFs are aligned in chunks from the file",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--crop", action="store_true", help="crop to the common area (default)")
    g.add_argument("--expand", action="store_true", help="expanded canvas")


def _add_nonrigid_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("non-rigid (scan-distortion) correction")
    g.add_argument(
        "--nonrigid",
        action="store_true",
        help="correct scan distortion (affine, then non-linear cycles)",
    )
    g.add_argument(
        "--affine-cycles",
        type=non_negative_int,
        default=2,
        help="affine cycles (6 parameters per frame; default 2)",
    )
    g.add_argument(
        "--nonlinear-cycles",
        type=non_negative_int,
        default=4,
        help="non-linear cycles (2 quick look, 4 final; default 4)",
    )
    g.add_argument(
        "--mode",
        choices=("row-locked", "row-fitting", "unconstrained"),
        default="row-locked",
        help="field model (default row-locked: scanned data)",
    )
    g.add_argument(
        "--smoothing-px",
        type=positive_float,
        default=None,
        help="smoothing (lines) of the fields along the slow axis (default: by scan directions "
        "and line length - 0.75 at 512-px lines for orthogonal series, 4 for one direction, "
        "4 px unconstrained)",
    )
    g.add_argument(
        "--merge",
        choices=("average", "density"),
        default="average",
        help="merged image: the average of the resampled frames, or the density-weighted merge "
        "(its density map is the count; default average)",
    )
    g.add_argument(
        "--no-drift-search",
        dest="drift_search",
        action="store_false",
        help="orthogonal series: skip the search for a steady drift before the affine cycles",
    )
    g.add_argument(
        "--row-jitter",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a fast-axis offset per row (line jitter; default: on for orthogonal series)",
    )
    g.add_argument(
        "--convergence-px",
        type=positive_float,
        default=1e-4,
        help="mean |update| px reached at the last cycle (default 1e-4)",
    )
    g.add_argument(
        "--scan-rotation-deg",
        type=_rotations,
        default=None,
        help="each frame's scan rotation, e.g. 0,90,0,90 (default: the records)",
    )


def add_align(sub: Any) -> None:
    p = sub.add_parser(
        "align",
        help="rigid alignment (and scan-distortion correction) of any readable stack",
        parents=[output_options()],
    )
    p.add_argument("file", type=Path, help="the stack to align (any readable format)")
    p.add_argument("--out", type=Path, required=True, help="output file (.hspy: HyperSpy + EMD)")
    _add_rigid_options(p)
    p.add_argument(
        "--reference",
        type=_reference,
        default="mean",
        help="'mean', a frame index, or 'local' (non-rigid; default mean)",
    )
    p.add_argument(
        "--signal",
        default=None,
        help="signal to measure on (multi-signal files; default the first)",
    )
    p.add_argument(
        "--save-average",
        type=Path,
        default=None,
        help="write the (merged) average as a float32 TIFF",
    )
    p.add_argument("--plot", type=Path, default=None, help="directory for PNG plots")
    _add_nonrigid_options(p)
    p.set_defaults(func=_align)


# --- align-signal -------------------------------------------------------------------------------
def _stored_correction(path: Path) -> tuple[str, Any]:
    """('nonrigid', fields-like object) or ('align', shifts) from an aligned file."""
    from scherzer import io as sio
    from scherzer.processing.scan_distortion import NonrigidParams

    have = sio.describe(path).get("processing", {})
    if "nonrigid" in have:
        params = sio.read_processing(path, "nonrigid")
        signal = params.pop("signal")
        params.pop("scan_rotation_deg", None)
        flagged = sio.read_processing_summary(path, "nonrigid").get("flagged", [])
        fields = sio.read_result(path, f"fields_nonrigid_{signal}")
        settings = NonrigidParams(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
        )
        return "nonrigid", types.SimpleNamespace(fields_px=fields, flagged=flagged, params=settings)
    if "align" in have:
        table = sio.read_table(path, "alignment")
        output = sio.read_processing(path, "align").get("output", "crop")
        shifts = np.stack([table["shift_y_px"], table["shift_x_px"]], axis=1)
        return "align", (shifts, output)
    raise ValueError(f"{path} holds no alignment or non-rigid correction to apply")


def _apply_to(kind: str, correction: Any, stack: Any) -> tuple[np.ndarray, np.ndarray]:
    """(corrected frames, average) of one other signal."""
    from scherzer.processing.registration import apply_shifts, rotate_to_common
    from scherzer.processing.scan_distortion import apply_fields

    rotation = stack.column("scan_rotation_deg")
    frames = stack.frames
    if not stack.metadata.get("derotated") and np.any(np.abs(rotation) > 1e-9):
        frames = rotate_to_common(frames, rotation)
    if kind == "nonrigid":
        corrected, _, average, _ = apply_fields(frames, correction)
        return corrected, average
    shifts, output = correction
    if len(shifts) != len(frames):
        raise ValueError(f"{len(shifts)} stored shifts for {len(frames)} frames")
    moved, _ = apply_shifts(frames, shifts, output)
    return moved, moved.mean(axis=0)


def _align_signal(args: argparse.Namespace) -> Outcome:
    import dataclasses

    from scherzer import io as sio

    kind, correction = _stored_correction(args.aligned)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for other in args.others:
        for stack in sio.import_stacks(other):
            corrected, average = _apply_to(kind, correction, stack)
            name = stack.signal or "frames"
            out = args.out_dir / f"{Path(other).stem}_{name}_aligned.hspy"
            sio.write_stack(out, dataclasses.replace(stack, frames=corrected), name=name)
            sio.write_result(out, f"average_{name}", np.asarray(average, np.float32))
            written.append(str(out))
    text = "\n".join(f"wrote {w}" for w in written)
    return 0, {"correction": kind, "written": written}, text


def add_align_signal(sub: Any) -> None:
    p = sub.add_parser(
        "align-signal",
        help="apply an aligned file's shifts or displacement fields to other signals",
        parents=[output_options()],
        description=(
            "Signals recorded at the same probe positions (ABF with HAADF) but stored in other "
            "files: each frame is moved by the shifts or non-rigid fields stored in ALIGNED."
        ),
    )
    p.add_argument("aligned", type=Path, help="output of `scherzer align` (rigid or --nonrigid)")
    p.add_argument("others", type=Path, nargs="+", help="files of the other signals")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path("."),
        help="where <file>_<signal>_aligned.hspy are written (default .)",
    )
    p.set_defaults(func=_align_signal)
