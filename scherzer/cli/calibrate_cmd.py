"""``scherzer calibrate``: the pixel size from a known lattice spacing in the image's FFT."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from scherzer.cli.common import Outcome, int_list, output_options, positive_float

__all__ = ["add_calibrate"]


def _hkl(text: str) -> tuple[int, int, int]:
    """``100`` or ``1,0,0`` (or ``-1,1,0``) → (h, k, l)."""
    values = int_list(text) if "," in text else tuple(int(c) for c in text if c.isdigit())
    if len(values) != 3 or not any(values):
        raise argparse.ArgumentTypeError(f"expected three indices like 100 or 1,1,0; got {text!r}")
    return values  # type: ignore[return-value]


def _measure_frames(frames: np.ndarray, spacing_nm: float, guess: float | None) -> tuple:
    """Every frame measured on its own: (pixel_nm per frame or NaN, reasons for the NaNs)."""
    from scherzer.processing.calibrate import measure_pixel_size

    values, problems = [], []
    for i, frame in enumerate(frames):
        try:
            values.append(measure_pixel_size(frame, spacing_nm, guess).pixel_nm)
        except ValueError as exc:
            values.append(float("nan"))
            problems.append(f"frame {i}: {exc}")
    return np.asarray(values), problems


def _calibrate(args: argparse.Namespace) -> Outcome:
    from scherzer import io as sio
    from scherzer.processing.calibrate import cubic_spacing_nm

    spacing = args.spacing_nm
    if args.hkl is not None:
        spacing = cubic_spacing_nm(args.spacing_nm, args.hkl)  # --spacing-nm is a
    stack = sio.import_stack(args.file, signal=args.signal)
    values, problems = _measure_frames(stack.frames, spacing, args.guess_nm)
    good = values[np.isfinite(values)]
    if good.size == 0:
        raise ValueError("no frame shows the reflection: " + "; ".join(problems[:3]))
    pixel = float(np.median(good))
    spread = float(np.std(good) / pixel) if good.size > 1 else 0.0
    result: dict[str, Any] = {
        "pixel_nm": pixel,
        "relative_spread": spread,
        "spacing_nm": spacing,
        "per_frame_pixel_nm": [None if not np.isfinite(v) else float(v) for v in values],
        "recorded_pixel_nm": list(stack.pixel_size_nm),
    }
    text = (
        f"pixel size {pixel:.6g} nm (spacing {spacing:.6g} nm; {good.size}/{len(values)} "
        f"frames, spread {100 * spread:.2f} %; recorded {stack.pixel_size_nm[0]:.6g} nm)"
    )
    if args.out is not None:
        sio.write_stack(args.out, dataclasses.replace(stack, pixel_size_nm=(pixel, pixel)))
        result["out"] = str(args.out)
        text += f"\nwrote {args.out} with this pixel size (restore and align read it from there)"
    else:
        text += f"\npass --pixel-nm {pixel:.6g} to restore, or write a calibrated copy with --out"
    return 0, result, text


def add_calibrate(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="pixel size from a known lattice spacing (FFT)",
        parents=[output_options()],
        description=(
            "Measure the pixel size from a lattice reflection of known spacing in each frame's "
            "FFT (median over frames). With --hkl, --spacing-nm is the cubic lattice constant a "
            "and the reflection's spacing is a/sqrt(h²+k²+l²)."
        ),
    )
    p.add_argument("file", type=Path, help="any readable image or stack")
    p.add_argument("--spacing-nm", type=positive_float, required=True,
                   help="lattice spacing of the reflection (nm), or a with --hkl")  # fmt: skip
    p.add_argument("--hkl", type=_hkl, default=None,
                   help="reflection of a cubic crystal, e.g. 100 or 1,1,0")  # fmt: skip
    p.add_argument("--guess-nm", type=positive_float, default=None,
                   help="approximate pixel size (reflection searched within ±15 %%)")  # fmt: skip
    p.add_argument("--signal", default=None, help="signal to use (multi-signal files)")
    p.add_argument("--out", type=Path, default=None,
                   help="write a copy of the stack carrying the measured pixel size")  # fmt: skip
    p.set_defaults(func=_calibrate)
