"""Typed settings of the pipeline's processing steps, built once at the edge.

A processing step reaches Scherzer in one of three ways: a CLI command (``scherzer align
--alpha 0.5``), a plan's ``processing`` list (JSON or TOML: ``"align"`` or ``{"step": "restore",
"iterations": 3, "cs_mm": 1.2}``) or the Python API. Each edge calls :func:`parse_step` (or builds
the dataclasses below directly); the pipeline and the engines only ever see these typed objects.
An unknown, ill-typed or out-of-range setting fails here with :class:`StepSettingsError` naming
the step and the setting.

The flat wire form of a step is its name plus keys from three groups: the instrument settings
declared in :mod:`scherzer.settings` (``voltage_kv`` … ``step_nm``), the camera curves ``mtf`` /
``nps`` (arrays, or names resolved to arrays by the edge's ``load_curve``), and the fields of the
engine's settings dataclass (:class:`~scherzer.processing.registration.AlignParams`,
:class:`~scherzer.processing.focal.FocalParams`, :class:`~scherzer.processing.eftem.EFTEMMapParams`)
or of the step itself.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "STEP_NAMES",
    "AlignStep",
    "CameraCurves",
    "EFTEMMapsStep",
    "FocalRegisterStep",
    "NonrigidStep",
    "RestoreStep",
    "Step",
    "StepSettingsError",
    "StructureImageStep",
    "build_settings",
    "parse_step",
    "parse_steps",
    "restore_steps",
    "step_to_json",
]

T = TypeVar("T")
CurveLoader = Callable[[str], np.ndarray]
_CURVE_KEYS = ("mtf", "nps")


@functools.cache
def _instrument_keys() -> frozenset[str]:
    from scherzer.settings import INSTRUMENT_SETTINGS

    return frozenset(s.name for s in INSTRUMENT_SETTINGS)


def _no_overrides() -> Any:
    """No instrument settings given (an empty :class:`~scherzer.settings.InstrumentOverrides`)."""
    from scherzer.settings import InstrumentOverrides

    return InstrumentOverrides()


class StepSettingsError(ValueError):
    """A processing step's settings are unknown, ill-typed or out of range (the message says
    which)."""


def build_settings(cls: type[T], values: Mapping[str, Any], what: str) -> T:
    """Validate ``values`` into the settings dataclass ``cls``: unknown keys are refused by name,
    types converted and checked by pydantic (lists become tuples where the field is a tuple).

    Values that already have their field's plain type (see :func:`_plain`) are taken without
    pydantic, with the same result: a command line's settings then cost no pydantic import."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise StepSettingsError(f"{what}: unknown setting(s) {unknown}; known: {sorted(names)}")
    hints = _field_types(cls)
    plain = {k: _plain(hints.get(k, Any), v) for k, v in values.items()}
    if hints and all(v is not _NOT_PLAIN for v in plain.values()):
        try:
            return cls(**plain)
        except (TypeError, ValueError):
            pass  # refused by the class's own checks: pydantic words the error, as for any other
    from pydantic import TypeAdapter, ValidationError

    from scherzer.validation import format_validation_error

    try:
        return TypeAdapter(cls).validate_python(dict(values))
    except ValidationError as exc:
        raise StepSettingsError(f"{what}: {format_validation_error(exc)}") from None


#: :func:`_plain`'s answer for a value it leaves to pydantic.
_NOT_PLAIN: Any = object()


#: pydantic configuration keys that do not change how a plain value validates (unknown keys are
#: refused before, by name).
_PLAIN_CONFIG_KEYS = frozenset({"extra"})


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The field types of ``cls`` (``Annotated`` kept, so constrained fields go to pydantic), or
    {} when its values must all go to pydantic: a pydantic configuration beyond ``extra``,
    validators, a custom schema, or annotations that do not resolve."""
    config = getattr(cls, "__pydantic_config__", {})
    custom = ("__pydantic_decorators__", "__get_pydantic_core_schema__", "__pydantic_validator__")
    if set(config) - _PLAIN_CONFIG_KEYS or any(hasattr(cls, name) for name in custom):
        return {}
    try:
        return typing.get_type_hints(cls, include_extras=True)
    except (NameError, TypeError):
        return {}


def _plain(kind: Any, value: Any) -> Any:
    """``value`` as pydantic would validate it into the type ``kind``, for the plain cases
    whose answer is unambiguous: None, bool, int, str, a float (or an int, made float), a
    Literal member, a tuple (or list) of such, and a union with exactly one member matching;
    :data:`_NOT_PLAIN` for anything else (pydantic then decides, converts or refuses)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is type(None) or kind in (bool, int, str):
        return value if type(value) is kind else _NOT_PLAIN
    if kind is float:
        return float(value) if type(value) in (float, int) else _NOT_PLAIN
    if origin is typing.Literal:
        return value if any(type(value) is type(a) and value == a for a in args) else _NOT_PLAIN
    if origin is tuple:
        if type(value) not in (tuple, list):
            return _NOT_PLAIN
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) != len(value):
            return _NOT_PLAIN
        items = tuple(_plain(k, v) for k, v in zip(args, value, strict=True))
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    if origin is typing.Union or origin is types.UnionType:
        found = [v for v in (_plain(k, value) for k in args) if v is not _NOT_PLAIN]
        return found[0] if len(found) == 1 else _NOT_PLAIN
    return _NOT_PLAIN


@dataclass(frozen=True)
class CameraCurves:
    """Camera MTF and NPS as arrays (1-D radial profiles to Nyquist or 2-D grids); None = ideal
    camera / white noise. Files are read at the edge, never by the pipeline."""

    mtf: np.ndarray | None = None
    nps: np.ndarray | None = None

    def given(self) -> bool:
        return self.mtf is not None or self.nps is not None


@dataclass(frozen=True)
class AlignStep:
    """Rigid alignment measured on ``signal`` (None = the first) and applied to every signal."""

    settings: Any  # registration.AlignParams
    signal: str | None = None
    name = "align"


@dataclass(frozen=True)
class FocalRegisterStep:
    """Focal-series registration (per-image defocus and drift, absolute defocus and A1)."""

    settings: Any  # focal.FocalParams
    instrument: Any = field(default_factory=_no_overrides)
    camera: CameraCurves = field(default_factory=CameraCurves)
    name = "focal_register"


@dataclass(frozen=True)
class RestoreStep:
    """Exit-wave restoration with ``settings`` (restoration.RestoreParams); registration with
    ``register`` (focal.FocalParams) runs first if it has not run. ``dose_weights``: relative
    noise weights per image (None = equal)."""

    settings: Any  # restoration.RestoreParams
    dose_weights: tuple[float, ...] | None = None
    instrument: Any = field(default_factory=_no_overrides)
    camera: CameraCurves = field(default_factory=CameraCurves)
    register: Any = None  # focal.FocalParams for the registration run on demand
    name = "restore"


@dataclass(frozen=True)
class StructureImageStep:
    """CTF-corrected structure image of a fixed-step series."""

    settings: Any  # focal.StructureParams
    instrument: Any = field(default_factory=_no_overrides)
    name = "structure_image"


@dataclass(frozen=True)
class NonrigidStep:
    """Scan-distortion correction (non-rigid registration) measured on ``signal`` (None = the
    first) and applied to every signal; ``rotations_deg`` each frame's scan rotation (None: from
    the records)."""

    settings: Any  # scan_distortion.NonrigidParams
    signal: str | None = None
    rotations_deg: tuple[float, ...] | None = None
    name = "nonrigid"


@dataclass(frozen=True)
class EFTEMMapsStep:
    """EFTEM series: rigid alignment measured on the pre-edge images and applied to all, the
    three-window elemental map and the jump-ratio map of one edge (``settings``:
    eftem.EFTEMMapParams). ``energies_ev`` (slit centres, one per frame) and ``slit_width_ev``:
    None = from the stack's ``eftem`` metadata (the daemon's job files carry it)."""

    settings: Any  # eftem.EFTEMMapParams
    energies_ev: tuple[float, ...] | None = None
    slit_width_ev: float | None = None
    name = "eftem_maps"


Step = (
    AlignStep | FocalRegisterStep | RestoreStep | StructureImageStep | NonrigidStep | EFTEMMapsStep
)

#: The step names the pipeline knows, in the order users usually run them.
STEP_NAMES: tuple[str, ...] = (
    "align", "nonrigid", "focal_register", "restore", "structure_image", "eftem_maps",
)  # fmt: skip


def _split(params: dict[str, Any], step: str, load_curve: CurveLoader | None) -> tuple[Any, ...]:
    """Pop the instrument settings and camera curves out of a flat step mapping."""
    from pydantic import ValidationError

    from scherzer.settings import InstrumentOverrides
    from scherzer.validation import format_validation_error

    keys = _instrument_keys()
    try:
        instrument = InstrumentOverrides(**{k: params.pop(k) for k in list(params) if k in keys})
    except ValidationError as exc:
        raise StepSettingsError(f"{step}: {format_validation_error(exc)}") from None
    curves = {}
    for key in _CURVE_KEYS:
        value = params.pop(key, None)
        if isinstance(value, str):
            if load_curve is None:
                raise StepSettingsError(
                    f"{step}: {key} names a file ({value!r}); files are read at the edge "
                    "(the CLI, or the daemon's calibrations directory)"
                )
            value = load_curve(value)
        curves[key] = None if value is None else np.asarray(value, dtype=np.float64)
    return instrument, CameraCurves(**curves)


def _align(params: dict[str, Any], load_curve: CurveLoader | None) -> AlignStep:
    from scherzer.processing.registration import AlignParams

    signal = params.pop("signal", None)
    if signal is not None and not isinstance(signal, str):
        raise StepSettingsError(f"align: signal must be a signal name; got {signal!r}")
    return AlignStep(build_settings(AlignParams, params, "align"), signal)


def _focal_register(params: dict[str, Any], load_curve: CurveLoader | None) -> FocalRegisterStep:
    from scherzer.processing.focal import FocalParams

    instrument, camera = _split(params, "focal_register", load_curve)
    return FocalRegisterStep(
        build_settings(FocalParams, params, "focal_register"), instrument, camera
    )


def _restore(params: dict[str, Any], load_curve: CurveLoader | None) -> RestoreStep:
    from scherzer.processing.focal import FocalParams
    from scherzer.processing.restoration import RestoreParams

    instrument, camera = _split(params, "restore", load_curve)
    weights = params.pop("dose_weights", None)
    try:
        weights = None if weights is None else tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise StepSettingsError(f"restore: dose_weights must be numbers; got {weights!r}") from None
    settings = build_settings(RestoreParams, params, "restore")
    register = FocalParams(exclude=settings.exclude, area=settings.area)
    return RestoreStep(settings, weights, instrument, camera, register)


def _structure(params: dict[str, Any], load_curve: CurveLoader | None) -> StructureImageStep:
    instrument, camera = _split(params, "structure_image", load_curve)
    if camera.given():
        raise StepSettingsError("structure_image: takes no mtf/nps")
    from scherzer.processing.focal import StructureParams

    settings = build_settings(StructureParams, params, "structure_image")
    return StructureImageStep(settings, instrument)


def _nonrigid(params: dict[str, Any], load_curve: CurveLoader | None) -> NonrigidStep:
    from scherzer.processing.scan_distortion import NonrigidParams

    signal = params.pop("signal", None)
    if signal is not None and not isinstance(signal, str):
        raise StepSettingsError(f"nonrigid: signal must be a signal name; got {signal!r}")
    rotations = params.pop("scan_rotation_deg", None)
    try:
        rotations = None if rotations is None else tuple(float(r) for r in rotations)
    except (TypeError, ValueError):
        raise StepSettingsError(
            f"nonrigid: scan_rotation_deg must be numbers; got {rotations!r}"
        ) from None
    return NonrigidStep(build_settings(NonrigidParams, params, "nonrigid"), signal, rotations)


def _eftem_maps(params: dict[str, Any], load_curve: CurveLoader | None) -> EFTEMMapsStep:
    from scherzer.processing.eftem import EFTEMMapParams

    energies, width = params.pop("energies_ev", None), params.pop("slit_width_ev", None)
    try:
        energies = None if energies is None else tuple(float(e) for e in energies)
        width = None if width is None else float(width)
    except (TypeError, ValueError):
        raise StepSettingsError(
            f"eftem_maps: energies_ev must be numbers and slit_width_ev a number; got "
            f"{energies!r}, {width!r}"
        ) from None
    if width is not None and not width > 0:
        raise StepSettingsError(f"eftem_maps: slit_width_ev must be > 0; got {width}")
    return EFTEMMapsStep(build_settings(EFTEMMapParams, params, "eftem_maps"), energies, width)


_PARSERS: dict[str, Callable[[dict[str, Any], CurveLoader | None], Step]] = {
    "align": _align,
    "nonrigid": _nonrigid,
    "focal_register": _focal_register,
    "restore": _restore,
    "structure_image": _structure,
    "eftem_maps": _eftem_maps,
}


def parse_step(spec: str | Mapping[str, Any] | Step, load_curve: CurveLoader | None = None) -> Step:
    """A typed step from its wire form (a name, or a mapping with ``step`` and flat settings);
    typed steps pass through. ``load_curve`` turns an ``mtf``/``nps`` name into an array."""
    if isinstance(spec, Step):
        return spec
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping) and isinstance(spec.get("step"), str):
        name, params = spec["step"], {k: v for k, v in spec.items() if k != "step"}
    else:
        raise StepSettingsError(f"a step is a name or a mapping with 'step'; got {spec!r}")
    if name not in _PARSERS:
        raise StepSettingsError(f"unknown processing step {name!r}; known: {list(STEP_NAMES)}")
    return _PARSERS[name](dict(params), load_curve)


def parse_steps(specs: Any, load_curve: CurveLoader | None = None) -> list[Step]:
    """:func:`parse_step` over a list."""
    return [parse_step(s, load_curve) for s in specs]


#: Keys of :func:`restore_steps` that both the registration and the restoration take.
_SHARED_RESTORE_KEYS = ("area", "exclude")
#: Keys that only the restoration takes (the rest of :class:`RestoreParams`, and dose weights).
_RESTORE_ONLY_KEYS = ("iterations", "corrections", "taper_px", "dose_weights")


def restore_steps(
    values: Mapping[str, Any], load_curve: CurveLoader | None = None
) -> list[FocalRegisterStep | RestoreStep]:
    """Registration + restoration from one flat set of settings, as ``scherzer restore`` and
    :func:`scherzer.restore` take them: instrument settings and ``mtf``/``nps`` go to both steps,
    ``area``/``exclude`` to both, ``iterations``/``corrections``/``taper_px``/``dose_weights``
    to the restoration, everything else to :class:`~scherzer.processing.focal.FocalParams`.
    ``register_area`` (y0, x0, h, w): registration on this area (FTSR's 2ⁿ×2ⁿ registration area
    near the region of interest), restoration on ``area`` (default the whole field)."""
    values = {k: v for k, v in values.items() if v is not None}
    register_area = values.pop("register_area", None)
    common = {k: v for k, v in values.items() if k in _instrument_keys() or k in _CURVE_KEYS}
    shared = {k: values[k] for k in _SHARED_RESTORE_KEYS if k in values}
    only = {k: values[k] for k in _RESTORE_ONLY_KEYS if k in values}
    rest = {k: v for k, v in values.items() if k not in {*common, *shared, *only}}
    reg_shared = shared if register_area is None else {**shared, "area": register_area}
    register = parse_step({"step": "focal_register", **common, **reg_shared, **rest}, load_curve)
    restore = parse_step({"step": "restore", **shared, **only}, load_curve)
    assert isinstance(register, FocalRegisterStep) and isinstance(restore, RestoreStep)
    restore = dataclasses.replace(
        restore, instrument=register.instrument, camera=register.camera, register=register.settings
    )
    return [register, restore]


def step_to_json(step: Step) -> dict[str, Any]:
    """The settings a step ran with, JSON-able (stored beside its results)."""
    out: dict[str, Any] = {}
    instrument = getattr(step, "instrument", None)
    if instrument is not None:
        out.update(instrument.given())
    out.update(dataclasses.asdict(step.settings))
    if isinstance(step, AlignStep | NonrigidStep) and step.signal is not None:
        out["signal"] = step.signal
    if isinstance(step, NonrigidStep) and step.rotations_deg is not None:
        out["scan_rotation_deg"] = list(step.rotations_deg)
    if isinstance(step, EFTEMMapsStep):
        if step.energies_ev is not None:
            out["energies_ev"] = list(step.energies_ev)
        if step.slit_width_ev is not None:
            out["slit_width_ev"] = step.slit_width_ev
    return out
