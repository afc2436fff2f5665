"""Offline commands on files: ``simulate``, ``align``, ``restore``, ``info``, ``demo``.

Each builds its typed processing steps (:mod:`scherzer.processing.steps`) from the parsed options —
instrument flags come from the one declaration in :mod:`scherzer.settings` — and runs the same
pipeline the daemon runs. Camera curve files (``--mtf``/``--nps``) are read here, at the edge.
Imports beyond the standard library are made inside the functions that need them (``scherzer
align`` imports :func:`process` from here and must not pay for the instrument settings' models).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from scherzer.cli.common import (
    Outcome,
    box,
    busy,
    float_pair,
    int_list,
    non_negative_int,
    output_options,
    positive_float,
    positive_int,
    progress_enabled,
    step_progress,
)

__all__ = ["add_demo", "add_info", "add_restore", "add_simulate", "process"]

#: Defaults of ``simulate focal-series`` for the geometry settings it always needs.
SIMULATE_FOCAL_DEFAULTS = {"pixel_nm": 0.02, "start_nm": -100.0, "step_nm": 10.0}


# --- simulate -----------------------------------------------------------------------------------
def _simulate_focal(args: argparse.Namespace) -> Outcome:
    from scherzer.settings import OPTICS_SETTINGS, overrides_from_args
    from scherzer.simulators.hrtem import default_hrtem_optics

    given = {k: v for k, v in overrides_from_args(args).given().items() if k in OPTICS_SETTINGS}
    optics = default_hrtem_optics().with_(**given)
    with busy(progress_enabled(args), "simulating a focal series"):
        stack = _simulate_focal_stack(args, optics)
    return _write_simulated(args.out, {"frames": stack})


def _write_simulated(out: Path, stacks: dict[str, Any]) -> Outcome:
    """Write the simulated signals to one file (the first creates it) and say what was made."""
    from scherzer import io as sio

    for i, (name, stack) in enumerate(stacks.items()):
        sio.write_stack(out, stack, name=name, mode="w" if i == 0 else "a")
    first = next(iter(stacks.values()))
    result = {"out": str(out), "signals": list(stacks), "frames": first.n_frames,
              "shape": list(first.frame_shape)}  # fmt: skip
    text = f"wrote {first.n_frames} frames {first.frame_shape} of {', '.join(stacks)} to {out}"
    return 0, result, text


def _simulate_focal_stack(args: argparse.Namespace, optics: Any) -> Any:
    from scherzer.simulators.hrtem import simulate_focal_series

    return simulate_focal_series(
        args.specimen,
        n=args.n,
        start_nm=args.start_nm,
        step_nm=args.step_nm,
        step_error_fraction=args.step_error,
        optics=optics,
        a1_nm=args.a1_nm,
        a1_deg=args.a1_deg,
        dose_e_per_A2=args.dose,
        drift_px_per_frame=args.drift_px,
        size=args.size,
        pixel_nm=args.pixel_nm,
        seed=args.seed,
    )


def _simulate_scan(args: argparse.Namespace) -> Outcome:

    signals = tuple(s.strip() for s in args.signals.split(",") if s.strip())
    with busy(progress_enabled(args), "simulating a rotated-scan series"):
        stacks = _scan_stacks(args, signals)
    return _write_simulated(args.out, stacks)


def _scan_stacks(args: argparse.Namespace, signals: tuple[str, ...]) -> Any:
    from scherzer.simulators.stem import simulate_rotated_scan

    return simulate_rotated_scan(
        args.specimen,
        n_frames=args.n,
        rotation_mode=args.rotation_mode,
        base_rotation_deg=args.base_rotation_deg,
        size=args.size,
        pixel_nm=args.pixel_nm,
        dwell_us=args.dwell_us,
        flyback_us=args.flyback_us,
        signals=signals,
        drift_nm_per_s=args.drift_nm_per_s,
        seed=args.seed,
    )


def _add_common_simulation(p: argparse.ArgumentParser, specimen: str, n: int, what: str) -> None:
    p.add_argument("--specimen", default=specimen, help=f"specimen name (default {specimen})")
    p.add_argument("--n", type=positive_int, default=n, help=f"number of {what} (default {n})")
    p.add_argument("--size", type=positive_int, default=256,
                   help="frame size in pixels (default 256)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output file (.hspy: HyperSpy + EMD)")


def _add_simulate_focal(ssub: Any) -> None:
    from scherzer.settings import OPTICS_SETTINGS, add_instrument_arguments

    f = ssub.add_parser(
        "focal-series", help="HRTEM focal series with ground truth", parents=[output_options()]
    )
    _add_common_simulation(f, "crystal_edge", 11, "images")
    names = [*OPTICS_SETTINGS, *SIMULATE_FOCAL_DEFAULTS]
    add_instrument_arguments(f, names, defaults=SIMULATE_FOCAL_DEFAULTS)
    f.add_argument("--step-error", type=float, default=0.0,
                   help="true step = (1+e)·nominal (default 0)")  # fmt: skip
    f.add_argument("--a1-nm", type=float, default=0.0, help="two-fold astigmatism (nm, default 0)")
    f.add_argument("--a1-deg", type=float, default=0.0, help="its azimuth (deg, default 0)")
    f.add_argument("--dose", type=positive_float, default=500.0,
                   help="dose per image (e/Å², default 500)")  # fmt: skip
    f.add_argument("--drift-px", type=float_pair, default=(0.7, -0.4),
                   help="drift per frame dy,dx (px, default 0.7,-0.4)")  # fmt: skip
    f.set_defaults(func=_simulate_focal)


def _add_simulate_scan(ssub: Any) -> None:
    from scherzer.settings import add_instrument_arguments

    r = ssub.add_parser(
        "rotated-scan",
        help="STEM rotated-scan series with ground truth",
        parents=[output_options()],
    )
    _add_common_simulation(r, "srtio3_001", 8, "frames")
    r.add_argument(
        "--rotation-mode", default="orthogonal-pairs",
        choices=["none", "orthogonal-pairs", "orthogonal-sets"],
        help="scan rotation between frames (default orthogonal-pairs)",
    )  # fmt: skip
    r.add_argument("--base-rotation-deg", type=float, default=0.0,
                   help="scan rotation of frame 0 (deg, default 0)")  # fmt: skip
    r.add_argument("--dwell-us", type=positive_float, default=2.0,
                   help="pixel dwell time (µs, default 2)")  # fmt: skip
    r.add_argument("--flyback-us", type=float, default=100.0,
                   help="line flyback time (µs, default 100)")  # fmt: skip
    r.add_argument("--signals", default="HAADF,ABF", help="detectors (default HAADF,ABF)")
    r.add_argument("--drift-nm-per-s", type=float_pair, default=(0.05, -0.03),
                   help="specimen drift dy,dx (nm/s, default 0.05,-0.03)")  # fmt: skip
    add_instrument_arguments(r, ["pixel_nm"], defaults={"pixel_nm": 0.02})
    r.set_defaults(func=_simulate_scan)


def add_simulate(sub: Any) -> None:
    p = sub.add_parser(
        "simulate", help="simulate a series offline into a file", parents=[output_options()]
    )
    ssub = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    _add_simulate_focal(ssub)
    _add_simulate_scan(ssub)


# --- align / restore ----------------------------------------------------------------------------
def _named_stacks(path: Path, signal: str | None) -> dict[str, Any]:
    from scherzer import io as sio

    named: dict[str, Any] = {}
    for i, s in enumerate(sio.import_stacks(path)):
        named[s.signal if s.signal and s.signal not in named else f"signal{i}"] = s
    if signal is not None:
        if signal not in named:
            raise ValueError(f"no signal {signal!r} in {path}; have {sorted(named)}")
        named = {signal: named[signal], **{k: v for k, v in named.items() if k != signal}}
    return named


def process(
    args: argparse.Namespace, steps: list[Any], signal: str | None = None
) -> tuple[int, dict[str, Any], str, Any]:
    """Import FILE, run the pipeline, write OUT (input frames + results). ``seconds`` in the
    result is the processing time; ``wall_s`` also counts reading and writing the files.
    Returns (code, summary, text, the PipelineResult)."""
    from scherzer import io as sio
    from scherzer.processing.pipeline import run_pipeline

    t0 = time.perf_counter()
    named = _named_stacks(args.file, signal)
    with step_progress(progress_enabled(args), args.command) as progress:
        result = run_pipeline(named, steps, plot_dir=args.plot, progress=progress)
    for i, (name, stack) in enumerate(named.items()):
        sio.write_stack(args.out, stack, name=name, mode="w" if i == 0 else "a")
    sio.store_pipeline_result(args.out, result)
    seconds = sum(o.seconds for o in result.outputs)
    summary = {"seconds": seconds, "wall_s": time.perf_counter() - t0, **result.summary()}
    return 0, summary, f"wrote {args.out}", result


def _restore_steps(args: argparse.Namespace) -> list[Any]:
    from scherzer.processing.spectral import load_camera_curve
    from scherzer.processing.steps import restore_steps
    from scherzer.settings import overrides_from_args

    values = {
        **overrides_from_args(args).given(),
        "reference": args.reference,
        "thickness_nm": args.thickness_nm,
        "exclude": args.exclude,
        "area": args.area,
        "register_area": args.register_area,
        "crystal": True if args.crystal else None,
        "iterations": args.iterations,
        "mtf": None if args.mtf is None else str(args.mtf),
        "nps": None if args.nps is None else str(args.nps),
    }

    def load_curve(path: str) -> Any:
        return load_camera_curve(path, convention=args.curve_convention, signal=args.curve_signal)

    return restore_steps(values, load_curve)


def _restore(args: argparse.Namespace) -> Outcome:
    code, result, text, _ = process(args, _restore_steps(args))
    reg = result["focal_register"]
    keys = ("reference_index", "defocus_nm", "relative_defocus_nm", "shifts_px", "peak_heights",
            "astigmatism_nm", "astigmatism_deg", "images", "suspect_below",
            "model_fit")  # fmt: skip
    out = {k: reg[k] for k in keys if k in reg}
    rest = result.get("restore") or {}
    out.update({k: rest[k] for k in ("nonlinear", "image_residual") if k in rest})
    out.update(seconds=result["seconds"], wall_s=result["wall_s"])
    low = float(reg.get("suspect_below", 0.01))  # FTSR: peaks below ~0.01 are suspect
    lines = [
        f"image {i:3d}: c1 {d:8.2f} nm, drift ({s[0]:+.2f}, {s[1]:+.2f}) px, peak {p:.3f}"
        + ("  SUSPECT" if p < low else "")
        for i, (d, s, p) in enumerate(
            zip(reg["defocus_nm"], reg["shifts_px"], reg["peak_heights"], strict=True)
        )
    ]
    lines.append(f"A1 {reg['astigmatism_nm']:.2f} nm at {reg['astigmatism_deg']:.1f}°")
    fit = reg.get("model_fit") or {}
    if fit.get("fits") is False:  # a thick crystal: the one-object-term model fails on its spots
        fallback = fit.get("fallback")
        lines.append(
            f"MODEL MISFIT: Bragg-spot residual {fit['series_spot_ratio']:.1f}x the noise; "
            + (f"focus steps on the spots' step scale {fallback['step_scale']:.4f}"
               if fallback else "per-image defocus kept")
        )  # fmt: skip
    if "nonlinear" in rest:
        lines.append(f"non-linear refinement: {rest['nonlinear']['reason']}")
    return code, out, "\n".join([*lines, text])


def add_restore(sub: Any) -> None:
    from scherzer.settings import add_instrument_arguments

    p = sub.add_parser(
        "restore",
        help="focal-series registration + exit-wave restoration",
        parents=[output_options()],
    )
    p.add_argument("file", type=Path, help="the focal series (any readable format)")
    p.add_argument("--out", type=Path, required=True, help="output file (.hspy: HyperSpy + EMD)")
    p.add_argument("--reference", type=non_negative_int, default=None,
                   help="reference image index (default: automatic)")  # fmt: skip
    p.add_argument("--exclude", type=int_list, default=None,
                   help="image indices to leave out, e.g. 3,7")  # fmt: skip
    p.add_argument("--area", type=box, default=None,
                   help="y0,x0,height,width restored region (default: whole field)")  # fmt: skip
    p.add_argument("--register-area", type=box, default=None,
                   help="y0,x0,height,width registered region (default: --area)")  # fmt: skip
    for name in ("mtf", "nps"):
        p.add_argument(f"--{name}", type=Path, default=None, help=f"camera {name.upper()}: "
                       "DM3/DM4 1-D profile (FTSR diagonal convention), .npy, text")  # fmt: skip
    p.add_argument("--curve-convention", choices=("nyquist", "diagonal"), default=None,
                   help="1-D MTF/NPS samples span 0..Nyquist or 0..sqrt2 (FTSR's diagonal); "
                   "default: diagonal for DM3/DM4, nyquist for .npy/text")  # fmt: skip
    p.add_argument("--curve-signal", type=non_negative_int, default=None,
                   help="the DM file's 1-D signal holding the curve (default: first)")  # fmt: skip
    p.add_argument("--iterations", type=non_negative_int, default=None,
                   help="non-linear refinement steps (default: automatic, run when the non-linear "
                   "term exceeds the noise; 0: linear only)")  # fmt: skip
    p.add_argument("--crystal", action="store_true", help="crystal-only field (no amorphous area)")
    p.add_argument(
        "--thickness-nm", type=positive_float, default=None,
        help="specimen thickness (nm): absolute defocus then refers to the exit surface",
    )  # fmt: skip
    p.add_argument("--plot", type=Path, default=None, help="directory for PNG plots")
    g = p.add_argument_group("instrument (when the file does not record it)")
    add_instrument_arguments(g)
    p.set_defaults(func=_restore)


# --- info / demo --------------------------------------------------------------------------------
def _info_text(value: Any, indent: str = "") -> str:
    """A YAML-like rendering of :func:`describe`'s summary for people (``--json`` for programs)."""
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item and not _is_flat_list(item):
                lines.append(f"{indent}{key}:")
                lines.append(_info_text(item, indent + "  "))
            else:
                lines.append(f"{indent}{key}: {item}")
    elif isinstance(value, list):
        for item in value:
            body = _info_text(item, indent + "  ").lstrip()
            lines.append(f"{indent}- {body}")
    else:
        lines.append(f"{indent}{value}")
    return "\n".join(lines)


def _is_flat_list(value: Any) -> bool:
    return isinstance(value, list) and not any(isinstance(v, dict | list) for v in value)


def _info(args: argparse.Namespace) -> Outcome:
    from scherzer import io as sio

    summary = sio.describe(args.file)
    return 0, summary, _info_text(summary)


def add_info(sub: Any) -> None:
    p = sub.add_parser("info", help="what a file holds", parents=[output_options()])
    p.add_argument("file", type=Path, help="any readable file")
    p.set_defaults(func=_info)


def _demo(args: argparse.Namespace) -> Outcome:
    from scherzer.demo import DemoSettings, run_demo

    sizes = {"focal_size_px": args.size, "scan_size_px": args.size} if args.size else {}
    settings = DemoSettings(
        out_dir=args.out,
        **sizes,
        focal_images=args.images,
        scan_frames=args.frames,
        speedup=args.speedup,
    )
    summary = run_demo(settings, out=sys.stderr if args.json else sys.stdout)
    return (0 if summary["ok"] else 1), summary, ""


def add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="the main job on the built-in simulators", parents=[output_options()]
    )
    p.add_argument("--out", type=Path, default=Path("scherzer-demo"),
                   help="output directory (default scherzer-demo)")  # fmt: skip
    p.add_argument("--size", type=positive_int, default=None,
                   help="image size in pixels (default 512 focal, 256 scan)")  # fmt: skip
    p.add_argument("--images", type=positive_int, default=11,
                   help="focal-series images (default 11)")  # fmt: skip
    p.add_argument("--frames", type=positive_int, default=8, help="scan frames (default 8)")
    p.add_argument("--speedup", type=positive_float, default=20.0,
                   help="simulated time runs this many times faster (default 20)")  # fmt: skip
    p.set_defaults(func=_demo)
