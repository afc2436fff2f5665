"""The Python API for notebooks and scripts: :func:`align`, :func:`restore`, :func:`as_stack`.

Each takes a NumPy array ``(frames, y, x)``, an :class:`~scherzer.stack.ImageStack` or a HyperSpy
signal (calibration, metadata and per-frame records are taken from it), and the same settings with
the same defaults as the CLI (``scherzer align``, ``scherzer restore``) and the daemon's processing
steps — one typed settings object per step (:mod:`scherzer.processing.steps`), built here. Results
convert to HyperSpy signals with ``.to_hyperspy()``.

Units as everywhere: ``pixel_nm``, ``defocus_nm``; shifts ``(dy, dx)`` px are where each frame's
content sits relative to the reference (aligning applies −s). A raw array carries no camera offset:
give ``camera_offset_counts`` (what the file of the same data records) to get the intensities the
CLI uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scherzer.stack import ImageStack

__all__ = ["AlignOutput", "RestoreOutput", "align", "as_stack", "restore"]


def _from_hyperspy(signal: Any) -> ImageStack:
    """An ImageStack from a HyperSpy signal through the same import path as its files."""
    from scherzer.io.imports import _from_rsciio, _signal_to_stack

    d = signal._to_dictionary(add_learning_results=False, add_models=False)
    title = str(signal.metadata.get_item("General.title", "") or "signal")
    return _signal_to_stack(_from_rsciio(d, "hspy", 0, title), Path(f"<HyperSpy {title}>"))


def as_stack(
    data: Any,
    *,
    pixel_nm: float | None = None,
    defocus_nm: Any = None,
    camera_offset_counts: float | None = None,
    instrument: dict[str, Any] | None = None,
) -> ImageStack:
    """An ImageStack from an array (n, y, x), an ImageStack or a HyperSpy signal.

    ``pixel_nm`` sets a square pixel size; ``defocus_nm`` (n,) the nominal defocus records;
    ``camera_offset_counts`` the dark offset the focal engine removes; ``instrument`` adds to the
    stack's instrument parameters (e.g. ``{"optics": {"voltage_kv": 300, "cs_mm": 1.2}}``).
    """
    if isinstance(data, ImageStack):
        stack = data
    elif hasattr(data, "axes_manager") and hasattr(data, "metadata"):
        stack = _from_hyperspy(data)
    else:
        frames = np.asarray(data, dtype=np.float32)
        if frames.ndim != 3:
            raise ValueError(f"frames must be (n, y, x); got shape {frames.shape}")
        stack = ImageStack(frames=frames)
    changes: dict[str, Any] = {}
    if pixel_nm is not None:
        changes["pixel_size_nm"] = (float(pixel_nm), float(pixel_nm))
    inst = {**stack.instrument, **(instrument or {})}
    if camera_offset_counts is not None:
        inst["camera"] = {
            **(inst.get("camera") or {}),
            "offset_counts": float(camera_offset_counts),
        }
    if inst != stack.instrument:
        changes["instrument"] = inst
    if defocus_nm is not None:
        values = np.asarray(defocus_nm, dtype=np.float64).reshape(-1)
        if values.size != stack.n_frames:
            raise ValueError(f"defocus_nm has {values.size} values for {stack.n_frames} frames")
        changes["records"] = [
            dataclasses.replace(r, defocus_nominal_nm=float(v))
            for r, v in zip(stack.records, values, strict=True)
        ]
    return dataclasses.replace(stack, **changes) if changes else stack


@dataclass
class AlignOutput:
    """Alignment: ``shifts_px`` (n, 2) (the rigid start when non-rigid), ``peak_heights`` (n,)
    (NCC with the reference when non-rigid), ``flagged`` frames, ``aligned`` (the aligned or
    corrected ImageStack), ``average`` (y, x; NaN where no frame saw when non-rigid),
    ``fields_px`` (n, 2, y, x) displacement fields (non-rigid only) and ``summary`` (the JSON of
    ``scherzer align --json``)."""

    shifts_px: np.ndarray
    peak_heights: np.ndarray
    flagged: list[int]
    aligned: ImageStack
    average: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)
    fields_px: np.ndarray | None = None

    def to_hyperspy(self) -> Any:
        """The aligned stack as a HyperSpy Signal2D (frame axis navigating, axes in nm)."""
        return _signal2d(self.aligned.frames, self.aligned.pixel_size_nm, "aligned", nav=True)


@dataclass
class RestoreOutput:
    """Focal-series registration + exit wave: ``wave`` complex64 (y, x) at the exit surface,
    ``defocus_nm``/``relative_defocus_nm`` (n,), ``shifts_px`` (n, 2), ``peak_heights`` (n,),
    ``astigmatism_nm``/``astigmatism_deg``, ``reference_index``, ``pixel_nm`` and ``summary``."""

    wave: np.ndarray
    pixel_nm: float
    voltage_kv: float
    summary: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        reg = self.__dict__.get("summary", {}).get("focal_register", {})
        if name in reg:
            value = reg[name]
            return np.asarray(value) if isinstance(value, list) else value
        raise AttributeError(name)

    def to_hyperspy(self) -> Any:
        """The exit wave as a HyperSpy ComplexSignal2D (axes in nm, beam energy in kV)."""
        s = _signal2d(self.wave, (self.pixel_nm, self.pixel_nm), "exit wave", nav=False)
        s.metadata.set_item("Acquisition_instrument.TEM.beam_energy", float(self.voltage_kv))
        return s


def _signal2d(data: np.ndarray, pixel_nm: tuple[float, float], title: str, nav: bool) -> Any:
    import hyperspy.api as hs

    s = hs.signals.ComplexSignal2D(data) if np.iscomplexobj(data) else hs.signals.Signal2D(data)
    s.metadata.General.title = title
    sig_axes = s.axes_manager.signal_axes
    for ax, name, scale in zip(sig_axes, ("x", "y"), (pixel_nm[1], pixel_nm[0]), strict=True):
        ax.name, ax.units, ax.scale = name, "nm", float(scale)
    if nav:
        s.axes_manager.navigation_axes[0].name = "frame"
    return s


def align(
    data: Any, *, signal: str | None = None, nonrigid: bool = False, **settings: Any
) -> AlignOutput:
    """Rigid alignment (``scherzer align``): ``settings`` are
    :class:`~scherzer.processing.registration.AlignParams` fields (``alpha``, ``neighbours``,
    ``refine``, ``roi``, ``reference``, ``output`` …) with the CLI's defaults. ``nonrigid=True``:
    scan-distortion correction (``scherzer align --nonrigid``) with
    :class:`~scherzer.processing.scan_distortion.NonrigidParams` fields (``mode``,
    ``affine_cycles``, ``nonlinear_cycles``, ``smoothing_px`` …) and ``scan_rotation_deg``."""
    from scherzer.processing.pipeline import run_pipeline
    from scherzer.processing.steps import parse_step

    stack = as_stack(data)
    step = parse_step({"step": "nonrigid" if nonrigid else "align", **settings})
    name = signal or stack.signal or "frames"
    out = run_pipeline({name: stack}, [step]).outputs[0]
    s = out.summary
    if nonrigid:
        return AlignOutput(
            shifts_px=np.asarray(s["rigid_shifts_px"], dtype=np.float64),
            peak_heights=np.asarray(s["ncc"], dtype=np.float64),
            flagged=list(s["flagged"]),
            aligned=out.stacks[f"nonrigid_{name}"],
            average=out.arrays[f"average_nonrigid_{name}"],
            summary=s,
            fields_px=out.arrays[f"fields_nonrigid_{name}"],
        )
    return AlignOutput(
        shifts_px=np.asarray(s["shifts_px"], dtype=np.float64),
        peak_heights=np.asarray(s["peak_heights"], dtype=np.float64),
        flagged=list(s["flagged"]),
        aligned=out.stacks[f"aligned_{name}"],
        average=out.arrays[f"average_{name}"],
        summary=s,
    )


def restore(data: Any, **settings: Any) -> RestoreOutput:
    """Focal-series registration + exit-wave restoration (``scherzer restore``): ``settings``
    are the instrument settings (``voltage_kv``, ``cs_mm``, ``focal_spread_nm``,
    ``beam_divergence_mrad``, ``pixel_nm``, ``start_nm``, ``step_nm``), ``mtf``/``nps`` as
    arrays, :class:`~scherzer.processing.focal.FocalParams` fields (``reference``, ``crystal``,
    ``thickness_nm`` …) and :class:`~scherzer.processing.restoration.RestoreParams` fields
    (``iterations``, ``area``, ``exclude`` …)."""
    from scherzer.processing.focal import instrument_from_stack
    from scherzer.processing.pipeline import run_pipeline
    from scherzer.processing.steps import restore_steps

    stack = as_stack(data)
    steps = restore_steps(settings)
    result = run_pipeline({"frames": stack}, steps)
    optics, pixel_nm, _ = instrument_from_stack(stack, **steps[0].instrument.given())
    wave = result.output("restore").arrays["exit_wave"]
    return RestoreOutput(wave, float(pixel_nm), float(optics.voltage_kv), result.summary())
