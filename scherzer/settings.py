"""The one declaration of the instrument settings a user may give, and the edge helpers built on it.

Every instrument parameter a user can type — on the command line (``scherzer restore
--voltage-kv 300``), in a plan (``focal_series.start_nm``), in a processing step of a plan
(``{"step": "restore", "cs_mm": 1.2}``) or through the Python API — is declared once in
:data:`INSTRUMENT_SETTINGS`. From that one table derive:

* the CLI flags (:func:`add_instrument_arguments`: ``--<name-with-dashes>``, the unit in the help),
* the typed, bounded overrides model (:class:`InstrumentOverrides`, pydantic, ``extra="forbid"``:
  an unknown or ill-typed setting fails at the edge with its name),
* plan fields (:func:`instrument_field`: description and bounds from the declaration),
* the file-metadata lookup (:data:`OPTICS_SETTINGS`: the keys of ``stack.instrument["optics"]``
  that :func:`scherzer.processing.focal.instrument_from_stack` reads and overrides).

Conventions: names carry their unit (``_kv``, ``_mm``, ``_nm``, ``_mrad``, ``_deg``); defocus is
negative for underfocus; ``focal_spread_nm`` is a standard deviation, ``beam_divergence_mrad`` a 1/e
semi-angle, ``vibration_nm`` a standard deviation per axis (as :class:`scherzer.optics.Optics`).

This module imports only the leaf :mod:`scherzer.validation`; engines, the CLI and the daemon may
all import it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from scherzer.validation import format_validation_error

__all__ = [
    "INSTRUMENT_SETTINGS",
    "OPTICS_SETTINGS",
    "REQUIRED_OPTICS",
    "InstrumentOverrides",
    "InstrumentSetting",
    "add_instrument_arguments",
    "instrument_field",
    "instrument_overrides",
    "overrides_from_args",
    "setting",
]


@dataclass(frozen=True)
class InstrumentSetting:
    """One instrument parameter: its name (with unit), unit text, help and physical bounds.

    ``optics``: the value is a field of :class:`scherzer.optics.Optics` of the same name, recorded
    in a file's ``instrument["optics"]`` and overridable there; ``required``: the engines need it
    (from the file or given). ``ge``/``le``: inclusive bounds (None = unbounded on that side);
    every value must also be finite. ``many``: a list of values (one per image).
    """

    name: str
    unit: str
    help: str
    optics: bool = False
    ge: float | None = None
    le: float | None = None
    required: bool = False
    many: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def describe(self) -> str:
        return f"{self.help} ({self.unit})"


#: The instrument settings a user may give, in help order. Add a parameter here and it becomes a
#: CLI flag of every command that takes instrument settings, a processing-step key and a plan field
#: where a plan uses it.
INSTRUMENT_SETTINGS: tuple[InstrumentSetting, ...] = (
    InstrumentSetting("voltage_kv", "kV", "accelerating voltage", True, 1, 3000, required=True),
    InstrumentSetting("cs_mm", "mm", "spherical aberration C3", True, -100, 100, required=True),
    InstrumentSetting(
        "focal_spread_nm", "nm, standard deviation", "focal spread", True, 0, 1000, required=True
    ),
    InstrumentSetting(
        "beam_divergence_mrad", "mrad, 1/e", "beam semi-divergence", True, 0, 100, required=True
    ),
    InstrumentSetting("a2_nm", "nm", "three-fold astigmatism A2", True, 0, 1e6),
    InstrumentSetting("a2_deg", "deg", "azimuth of A2", True, -360, 360),
    InstrumentSetting("vibration_nm", "nm, std per axis", "image vibration", True, 0, 10),
    InstrumentSetting("information_limit_nm", "nm", "information limit", ge=1e-3, le=100),
    InstrumentSetting("pixel_nm", "nm", "pixel size", ge=1e-6, le=1e6),
    InstrumentSetting("start_nm", "nm", "nominal defocus of the first image", ge=-1e6, le=1e6),
    InstrumentSetting("step_nm", "nm", "nominal focus step between images", ge=-1e5, le=1e5),
    InstrumentSetting("end_nm", "nm", "nominal defocus of the last image", ge=-1e6, le=1e6),
    InstrumentSetting(
        "defocus_list_nm",
        "nm, comma-separated",
        "nominal defocus of every image",
        ge=-1e6,
        le=1e6,
        many=True,
    ),
)

_BY_NAME = {s.name: s for s in INSTRUMENT_SETTINGS}

#: Names that are :class:`~scherzer.optics.Optics` fields (read from a file's recorded optics).
OPTICS_SETTINGS: tuple[str, ...] = tuple(s.name for s in INSTRUMENT_SETTINGS if s.optics)
#: Optics the engines cannot do without (from the file, else given by the user).
REQUIRED_OPTICS: tuple[str, ...] = tuple(s.name for s in INSTRUMENT_SETTINGS if s.required)


def setting(name: str) -> InstrumentSetting:
    """The declaration of ``name`` (KeyError naming the known ones if there is none)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no instrument setting {name!r}; known: {sorted(_BY_NAME)}") from None


def instrument_field(name: str, default: Any = None, **extra: Any) -> Any:
    """A pydantic ``Field`` for a plan or settings model, described and bounded by the declaration
    (``extra`` adds or overrides keyword arguments such as ``description``)."""
    s = setting(name)
    kwargs: dict[str, Any] = {"description": s.describe()}
    if s.many:  # bounds apply per element (see _annotation)
        return Field(default, **{**kwargs, **extra})
    kwargs["allow_inf_nan"] = False
    if s.ge is not None:
        kwargs["ge"] = s.ge
    if s.le is not None:
        kwargs["le"] = s.le
    return Field(default, **{**kwargs, **extra})


def _annotation(s: InstrumentSetting) -> Any:
    if s.many:
        return tuple[Annotated[float, Field(ge=s.ge, le=s.le, allow_inf_nan=False)], ...] | None
    return float | None


class _OverridesBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def given(self) -> dict[str, Any]:
        """The settings that were given (not None), by name."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


#: Instrument values given by the user (None = take it from the file), typed and bounded.
InstrumentOverrides: type[_OverridesBase] = create_model(  # type: ignore[call-overload]
    "InstrumentOverrides",
    __base__=_OverridesBase,
    __doc__="Instrument values given by the user (None = not given: the file's value is used).",
    **{s.name: (_annotation(s), instrument_field(s.name)) for s in INSTRUMENT_SETTINGS},
)


def instrument_overrides(values: Mapping[str, Any] | None = None, **kw: Any) -> _OverridesBase:
    """Validate instrument settings (a mapping and/or keywords) into :class:`InstrumentOverrides`;
    a ValueError names every unknown, ill-typed or out-of-range setting."""
    merged = {**dict(values or {}), **kw}
    try:
        return InstrumentOverrides(**merged)
    except ValidationError as exc:
        raise ValueError(f"instrument settings: {format_validation_error(exc)}") from None


def add_instrument_arguments(
    parser: argparse.ArgumentParser | Any,
    names: Iterable[str] | None = None,
    defaults: Mapping[str, float] | None = None,
) -> None:
    """Add ``--<name>`` float options for the declared settings ``names`` (all by default) to a
    parser or argument group; ``defaults`` sets a default for some (others default to None:
    not given)."""
    defaults = dict(defaults or {})
    for s in INSTRUMENT_SETTINGS if names is None else [setting(n) for n in names]:
        default = defaults.get(s.name)
        text = s.describe() + (f"; default {default:g}" if default is not None else "")
        kind = _float_list if s.many else float
        parser.add_argument(s.flag, dest=s.name, type=kind, default=default, help=text)


def _float_list(text: str) -> tuple[float, ...]:
    """``-150,-140,-130`` → a tuple of floats (argparse type)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def overrides_from_args(args: argparse.Namespace) -> _OverridesBase:
    """The instrument settings present on a parsed namespace, validated."""
    values = {s.name: getattr(args, s.name, None) for s in INSTRUMENT_SETTINGS}
    return instrument_overrides({k: v for k, v in values.items() if v is not None})
