"""Acquisition plans: pydantic models that expand into per-frame steps.

A plan is data (JSON in the job table); :meth:`BasePlan.steps` expands it into
:class:`FrameStep` objects the executor runs one by one (set optics → settle → acquire → write).
Kinds:

* :class:`CameraImage`, :class:`ScanImage` — one frame (or ``repeat`` identical frames);
* :class:`FocalSeries` — HRTEM focal series: n images at start + i·step (or an explicit list),
  every focus set approached from one side against the lens hysteresis;
* :class:`RotatedScanSeries` — STEM frames with 90° scan rotations between them (none,
  orthogonal pairs 0/90/0/…, orthogonal sets 0/90/180/270/…), several signals at once; frames
  are stored rotated back into the base orientation;
* :class:`TimeSeries` — frames at a fixed interval from the camera or the scan generator.

New kinds subclass :class:`BasePlan`, implement ``steps``/``n_frames``/``signals``/
``frame_shape``/``frame_time_s`` and are listed in :data:`PLAN_MODELS` and :data:`Plan`.

Every plan has an error policy (:class:`ErrorPolicy`: retry a failed frame n times, then skip it
or abort; default retry once then abort) and ``restore_optics`` (default yes: focus, stigmator
and scan settings the plan changed are put back afterwards, on failure too).

Units: nm, s, µs and degrees as named; dose in e/Å².
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from scherzer.config import PlanLimits
from scherzer.drivers.base import ScanSettings
from scherzer.processing.steps import STEP_NAMES, parse_step
from scherzer.settings import instrument_field

__all__ = [
    "PLAN_MODELS",
    "PROCESSING_STEPS",
    "BasePlan",
    "CameraImage",
    "CameraShot",
    "ErrorPolicy",
    "FocalSeries",
    "FrameStep",
    "Plan",
    "PlanEstimate",
    "RotatedScanSeries",
    "ScanImage",
    "ScanShot",
    "TimeSeries",
    "approach_setpoints",
    "parse_plan",
    "plan_to_json",
    "rotation_sequence",
    "scan_dose_e_per_A2",
]


#: Processing step names known to the pipeline (each plan kind allows a subset).
PROCESSING_STEPS: tuple[str, ...] = STEP_NAMES

BYTES_PER_PIXEL = 4  # float32 frames on disk
ELEMENTARY_CHARGE_C = 1.602176634e-19

ProcessingStep = str | dict[str, Any]


def _curve_name_only(name: str) -> Any:
    """At plan validation a camera curve is a name in the daemon's calibrations directory,
    resolved when the processing runs (:func:`~scherzer.daemon.calibrations.calibration_loader`);
    here only its form is checked and a placeholder curve stands in."""
    import numpy as np

    from scherzer.daemon.calibrations import check_calibration_name

    check_calibration_name(name)
    return np.ones(2)


@dataclass(frozen=True)
class CameraShot:
    exposure_s: float
    binning: int = 1
    region: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class ScanShot:
    settings: ScanSettings


@dataclass(frozen=True)
class FrameStep:
    """One frame of a plan: wait ``delay_s``, set optics (None = leave), settle, acquire.

    ``derotate_deg``: the frame is rotated back by this multiple of 90° before it is stored
    (scan rotation relative to the plan's base rotation).
    """

    index: int
    shot: CameraShot | ScanShot
    defocus_nm: float | None = None
    settle_s: float = 0.0
    delay_s: float = 0.0
    derotate_deg: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class PlanEstimate(BaseModel):
    """What a plan will cost before it runs."""

    model_config = ConfigDict(extra="forbid")

    frames: int
    duration_s: float
    dose_e_per_A2: float | None = None
    disk_bytes: int


class ErrorPolicy(BaseModel):
    """What a device error during one frame does: retry the frame ``retries`` times, then
    ``then`` = abort (the job fails; frames written stay) or skip (the frame is left out and the
    plan goes on). Shorthands: ``"abort"`` (no retry), ``"skip"`` (no retry, skip),
    ``"retry"`` (once, then abort)."""

    model_config = ConfigDict(extra="forbid")

    retries: int = Field(1, ge=0, le=10)
    then: Literal["abort", "skip"] = "abort"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        shorthands = {
            "abort": {"retries": 0, "then": "abort"},
            "skip": {"retries": 0, "then": "skip"},
            "retry": {"retries": 1, "then": "abort"},
        }
        if isinstance(value, str):
            if value not in shorthands:
                raise ValueError(f"error policy must be one of {sorted(shorthands)} or a table")
            return shorthands[value]
        return value


def scan_dose_e_per_A2(dwell_us: float, pixel_nm: float, probe_current_pA: float) -> float:
    """Electrons per Å² of one scan frame: I·dwell/e per (pixel)²."""
    electrons = probe_current_pA * 1e-12 * dwell_us * 1e-6 / ELEMENTARY_CHARGE_C
    return electrons / (pixel_nm * 10.0) ** 2


def approach_setpoints(
    target_nm: float, previous_nm: float | None, direction: str, overshoot_nm: float
) -> list[float]:
    """Set-points to send so that ``target_nm`` is reached from one side (against hysteresis).

    ``direction``: "from_below" (increasing values), "from_above" or "none". A first set
    (``previous_nm`` None) or a set against the direction goes to target ∓ overshoot first.
    """
    if direction == "none":
        return [target_nm]
    sign = 1.0 if direction == "from_below" else -1.0
    if previous_nm is not None and sign * (target_nm - previous_nm) > 0:
        return [target_nm]
    return [target_nm - sign * overshoot_nm, target_nm]


def rotation_sequence(mode: str, n_frames: int, base_rotation_deg: float = 0.0) -> list[float]:
    """Scan rotation per frame: none | orthogonal-pairs (0, 90, 0, …) | orthogonal-sets
    (0, 90, 180, 270, …), each offset by ``base_rotation_deg`` (same as the simulator's)."""
    period = {"none": 1, "orthogonal-pairs": 2, "orthogonal-sets": 4}[mode]
    return [base_rotation_deg + 90.0 * (i % period) for i in range(n_frames)]


class BasePlan(BaseModel):
    """Fields every plan has; subclasses add ``kind`` and their parameters."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field("", max_length=128, description="label, also used in the file name")
    sample: str = Field("", max_length=256)
    notes: str = Field("", max_length=4096)
    settle_s: float = Field(0.0, ge=0, le=60, description="extra wait after setting optics")
    processing: list[ProcessingStep] = Field(
        default_factory=list, description="pipeline steps after acquisition (name or table)"
    )
    on_error: ErrorPolicy = Field(
        default_factory=ErrorPolicy, description="device error in a frame: retry, skip, abort"
    )
    restore_optics: bool = Field(
        True, description="put focus/stigmator/scan settings back afterwards (also on failure)"
    )
    not_before_s: float | None = Field(
        None, description="Unix time before which the job does not start (it holds the queue)"
    )

    @model_validator(mode="after")
    def _known_steps(self) -> BasePlan:
        allowed = self.allowed_for_kind()
        unknown = []
        for step in self.processing:
            step_name = step if isinstance(step, str) else step.get("step")
            if step_name not in allowed or step_name not in PROCESSING_STEPS:
                unknown.append(step_name)
        if unknown:
            raise ValueError(
                f"unknown processing steps {unknown} for {self.kind_name()}; "
                f"available: {list(allowed)}"
            )
        for step in self.processing:  # typed settings: unknown or ill-typed ones fail here
            parse_step(step, load_curve=_curve_name_only)
        return self

    @classmethod
    def allowed_for_kind(cls) -> tuple[str, ...]:
        """Processing steps this kind accepts (a subset of :data:`PROCESSING_STEPS`)."""
        return ()

    @classmethod
    def kind_name(cls) -> str:
        return str(cls.model_fields["kind"].default) if "kind" in cls.model_fields else "?"

    # --- to be provided by every plan kind -------------------------------------------------
    def steps(self) -> Iterator[FrameStep]:  # pragma: no cover - abstract
        raise NotImplementedError

    def n_frames(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def signals(self) -> tuple[str, ...]:
        """Names of the stacks written (one dataset per signal)."""
        return ("frames",)

    def frame_shape(self, camera_shape: tuple[int, int]) -> tuple[int, int]:  # pragma: no cover
        raise NotImplementedError

    def frame_time_s(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def dose_per_frame(self, dose_rate_e_per_A2_s: float | None, probe_current_pA: float | None):
        """e/Å² per frame (None when the instrument does not say)."""
        return None

    def approach_rule(self) -> tuple[str, float]:
        """(direction, overshoot_nm) used for every focus set of this plan."""
        return ("none", 0.0)

    def scan_sets(self) -> bool:
        """True when the plan configures the scan generator."""
        return False

    # --- shared ----------------------------------------------------------------------------
    def problems(self, limits: PlanLimits, camera_shape: tuple[int, int]) -> list[str]:
        """Reasons this plan is outside the limits (empty when it may run)."""
        out = []
        lo, hi = limits.defocus_nm
        bad = [d for d in self.defocus_setpoints() if not lo <= d <= hi]
        if bad:
            out.append(
                f"defocus {bad[0]:g} nm (of {len(bad)} set-points) outside the limits "
                f"[{lo}, {hi}] nm"
            )
        if self.n_frames() > limits.max_frames:
            out.append(f"{self.n_frames()} frames > limit {limits.max_frames}")
        return out

    def defocus_setpoints(self) -> list[float]:
        """Every defocus value the lens will be sent (approach points included)."""
        direction, overshoot = self.approach_rule()
        out: list[float] = []
        previous = None
        for step in self.steps():
            if step.defocus_nm is not None:
                out += approach_setpoints(step.defocus_nm, previous, direction, overshoot)
                previous = step.defocus_nm
        return out

    def estimate(
        self,
        camera_shape: tuple[int, int],
        *,
        dose_rate_e_per_A2_s: float | None = None,
        probe_current_pA: float | None = None,
    ) -> PlanEstimate:
        ny, nx = self.frame_shape(camera_shape)
        n = self.n_frames()
        duration = sum(s.delay_s + s.settle_s + self.frame_time_s() for s in self.steps())
        per_frame = self.dose_per_frame(dose_rate_e_per_A2_s, probe_current_pA)
        return PlanEstimate(
            frames=n,
            duration_s=duration,
            dose_e_per_A2=None if per_frame is None else n * per_frame,
            disk_bytes=n * ny * nx * BYTES_PER_PIXEL * len(self.signals()),
        )


# --- shared pieces ----------------------------------------------------------------------------
class _CameraFields(BaseModel):
    exposure_s: float = Field(1.0, gt=0, le=3600)
    binning: int = Field(1, ge=1, le=16)
    region: tuple[int, int, int, int] | None = Field(None, description="(y0, x0, height, width)")

    def camera_shot(self) -> CameraShot:
        return CameraShot(self.exposure_s, self.binning, self.region)

    def camera_frame_shape(self, camera_shape: tuple[int, int]) -> tuple[int, int]:
        ny, nx = (self.region[2], self.region[3]) if self.region else camera_shape
        return (ny // self.binning, nx // self.binning)

    def camera_problems(self, limits: PlanLimits, camera_shape: tuple[int, int]) -> list[str]:
        out = []
        if self.exposure_s > limits.max_exposure_s:
            out.append(f"exposure_s {self.exposure_s} > limit {limits.max_exposure_s}")
        if self.region is not None:
            y0, x0, h, w = self.region
            cy, cx = camera_shape
            if min(y0, x0) < 0 or h <= 0 or w <= 0 or y0 + h > cy or x0 + w > cx:
                out.append(f"region {self.region} is not inside the {cy}×{cx} camera")
        return out

    def camera_dose(self, dose_rate_e_per_A2_s: float | None) -> float | None:
        return None if dose_rate_e_per_A2_s is None else dose_rate_e_per_A2_s * self.exposure_s


class _ScanFields(BaseModel):
    size_px: tuple[int, int] = (256, 256)
    pixel_nm: float = Field(0.02, gt=0)
    dwell_us: float = Field(2.0, gt=0)
    flyback_us: float = Field(200.0, ge=0)

    def scan_frame_time_s(self) -> float:
        ny, nx = self.size_px
        return ny * (nx * self.dwell_us + self.flyback_us) * 1e-6

    def scan_problems(self, limits: PlanLimits) -> list[str]:
        out = []
        lo, hi = limits.dwell_us
        if not lo <= self.dwell_us <= hi:
            out.append(f"dwell_us {self.dwell_us} outside the limits [{lo}, {hi}]")
        if max(self.size_px) > limits.max_scan_px or min(self.size_px) < 1:
            out.append(f"size_px {self.size_px} outside 1..{limits.max_scan_px}")
        return out

    def settings_at(self, rotation_deg: float, signals: tuple[str, ...]) -> ScanSettings:
        return ScanSettings(
            size_px=tuple(self.size_px),
            pixel_nm=self.pixel_nm,
            dwell_us=self.dwell_us,
            flyback_us=self.flyback_us,
            rotation_deg=rotation_deg,
            signals=signals,
        )

    def scan_dose(self, probe_current_pA: float | None) -> float | None:
        if probe_current_pA is None:
            return None
        return scan_dose_e_per_A2(self.dwell_us, self.pixel_nm, probe_current_pA)


def _signals_field(default: list[str]) -> Any:
    return Field(default_factory=lambda: list(default), alias="signals", min_length=1, max_length=8)


# --- single shots -----------------------------------------------------------------------------
class _Repeated(BasePlan):
    defocus_nm: float | None = Field(None, description="set before acquiring; null = leave as is")
    repeat: int = Field(1, ge=1, le=100000, description="identical frames to acquire in a row")

    def n_frames(self) -> int:
        return self.repeat

    def _repeated(self, shot: CameraShot | ScanShot) -> Iterator[FrameStep]:
        """``repeat`` frames of ``shot``; optics are set before the first only."""
        for i in range(self.repeat):
            first = i == 0
            yield FrameStep(
                i,
                shot,
                defocus_nm=self.defocus_nm if first else None,
                settle_s=self.settle_s if first else 0.0,
            )


class CameraImage(_CameraFields, _Repeated):
    """One camera image (TEM), optionally at a given defocus."""

    kind: Literal["camera_image"] = "camera_image"

    def frame_time_s(self) -> float:
        return self.exposure_s

    def frame_shape(self, camera_shape: tuple[int, int]) -> tuple[int, int]:
        return self.camera_frame_shape(camera_shape)

    def steps(self) -> Iterator[FrameStep]:
        return self._repeated(self.camera_shot())

    def problems(self, limits: PlanLimits, camera_shape: tuple[int, int]) -> list[str]:
        return super().problems(limits, camera_shape) + self.camera_problems(limits, camera_shape)

    def dose_per_frame(self, dose_rate_e_per_A2_s, probe_current_pA):
        return self.camera_dose(dose_rate_e_per_A2_s)


class ScanImage(_ScanFields, _Repeated):
    """One STEM scan frame with one or more signals recorded at the same probe positions."""

    kind: Literal["scan_image"] = "scan_image"
    rotation_deg: float = 0.0
    signals_: list[str] = _signals_field(["HAADF"])

    def signals(self) -> tuple[str, ...]:
        return tuple(self.signals_)

    def frame_time_s(self) -> float:
        return self.scan_frame_time_s()

    def frame_shape(self, camera_shape: tuple[int, int]) -> tuple[int, int]:
        return tuple(self.size_px)

    def scan_settings(self) -> ScanSettings:
        return self.settings_at(self.rotation_deg, self.signals())

    def steps(self) -> Iterator[FrameStep]:
        return self._repeated(ScanShot(self.scan_settings()))

    def problems(self, limits: PlanLimits, camera_shape: tuple[int, int]) -> list[str]:
        return super().problems(limits, camera_shape) + self.scan_problems(limits)

    def dose_per_frame(self, dose_rate_e_per_A2_s, probe_current_pA):
        return self.scan_dose(probe_current_pA)

    def scan_sets(self) -> bool:
        return True


# --- series -----------------------------------------------------------------------------------
class FocalSeries(_CameraFields, BasePlan):
    """HRTEM focal series for exit-wave restoration: ``n_images`` at ``start_nm + i·step_nm``
    (or ``defocus_list_nm``), each focus set approached from one side (``approach``) with an
    ``overshoot_nm`` first when needed, ``settle_s`` extra wait after each set. Processing
    default: focal-series registration then exit-wave restoration; ``reference_index`` null =
    the image nearest (extended) Scherzer defocus."""

    kind: Literal["focal_series"] = "focal_series"
    n_images: int = Field(11, ge=2, le=1000)
    start_nm: float = instrument_field("start_nm", -100.0)
    step_nm: float = instrument_field("step_nm", 10.0)
    defocus_list_nm: list[float] | None = Field(
        None, description="explicit focus values (replaces n_images/start_nm/step_nm)"
    )
    approach: Literal["from_below", "from_above", "none"] = Field(
        "from_below", description="every focus set reached from this side (hysteresis)"
    )
    overshoot_nm: float = Field(20.0, ge=0, le=1000, description="pre-approach distance")
    reference_index: int | None = Field(None, ge=0, description="null: nearest Scherzer")
    processing: list[ProcessingStep] = Field(
        default_factory=lambda: ["focal_register", "restore"],
        description="pipeline steps after acquisition",
    )

    @classmethod
    def allowed_for_kind(cls) -> tuple[str, ...]:
        return ("focal_register", "restore", "structure_image")

    @field_validator("defocus_list_nm")
    @classmethod
    def _list_length(cls, values: list[float] | None) -> list[float] | None:
        if values is not None and not 2 <= len(values) <= 1000:
            raise ValueError(f"defocus_list_nm needs 2..1000 values; got {len(values)}")
        return values

    def approach_rule(self) -> tuple[str, float]:
        return (self.approach, self.overshoot_nm)

    def defocus_values_nm(self) -> list[float]:
        if self.defocus_list_nm is not None:
            return list(self.defocus_list_nm)
        return [self.start_nm + i * self.step_nm for i in range(self.n_images)]

    def n_frames(self) -> int:
        return len(self.defocus_values_nm())

    def frame_time_s(self) -> float:
        return self.exposure_s

    def frame_shape(self, camera_shape: tuple[int, int]) -> tuple[int, int]:
        return self.camera_frame_shape(camera_shape)

    def steps(self) -> Iterator[FrameStep]:
        shot = self.camera_shot()
        for i, d in enumerate(self.defocus_values_nm()):
            yield FrameStep(i, shot, defocus_nm=float(d), settle_s=self.settle_s)

    def problems(self, limits: PlanLimits, camera_shape: tuple[int, int]) -> list[str]:
        out = super().problems(limits, camera_shape) + self.camera_problems(limits, camera_shape)
        if self.reference_index is not None and self.reference_index >= self.n_frames():
            out.append(f"reference_index {self.reference_index} ≥ {self.n_frames()} images")
        return out

    def dose_per_frame(self, dose_rate_e_per_A2_s, probe_current_pA):
        return self.camera_dose(dose_rate_e_per_A2_s)


class RotatedScanSeries(_ScanFields, BasePlan):
    """STEM series with 90° scan rotations between frames (``rotation_mode``): every signal
    recorded at the same probe positions; frames are stored rotated back into the
    ``base_rotation_deg`` orientation (records keep the acquired rotation; stack metadata
    ``derotated: true``). Processing default: rigid alignment measured on the first signal and
    applied to all."""

    kind: Literal["rotated_scan"] = "rotated_scan"
    n_frames_: int = Field(8, ge=1, le=100000, alias="n_frames")
    flyback_us: float = Field(100.0, ge=0)
    base_rotation_deg: float = Field(0.0, description="e.g. ~10° off the lattice planes")
    rotation_mode: Literal["none", "orthogonal-pairs", "orthogonal-sets"] = "orthogonal-pairs"
    signals_: list[str] = _signals_field(["HAADF", "ABF"])
    defocus_nm: float | None = Field(None, description="probe defocus set first; null = leave")
    processing: list[ProcessingStep] = Field(
        default_factory=lambda: ["align"], description="pipeline steps after acquisition"
    )

    @classmethod
    def allowed_for_kind(cls) -> tuple[str, ...]:
        return ("align", "nonrigid")

    def n_frames(self) -> int:
        return self.n_frames_

    def signals(self) -> tuple[str, ...]:
        return tuple(self.signals_)

    def rotations_deg(self) -> list[float]:
        return rotation_sequence(self.rotation_mode, self.n_frames_, self.base_rotation_deg)

    def frame_time_s(self) -> float:
        return self.scan_frame_time_s()

    def frame_shape(self, camera_shape: tuple[int, int]) -> tuple[int, int]:
        return tuple(self.size_px)

    def steps(self) -> Iterator[FrameStep]:
        for i, rot in enumerate(self.rotations_deg()):
            yield FrameStep(
                i,
                ScanShot(self.settings_at(rot, self.signals())),
                defocus_nm=self.defocus_nm if i == 0 else None,
                settle_s=self.settle_s if i == 0 else 0.0,
                derotate_deg=rot - self.base_rotation_deg,
            )

    def problems(self, limits: PlanLimits, camera_shape: tuple[int, int]) -> list[str]:
        out = super().problems(limits, camera_shape) + self.scan_problems(limits)
        if self.rotation_mode != "none" and self.size_px[0] != self.size_px[1]:
            out.append(
                f"rotation_mode {self.rotation_mode} needs square frames (frames are rotated "
                f"back by 90°); size_px is {tuple(self.size_px)}"
            )
        return out

    def dose_per_frame(self, dose_rate_e_per_A2_s, probe_current_pA):
        return self.scan_dose(probe_current_pA)

    def scan_sets(self) -> bool:
        return True


class TimeSeries(_CameraFields, _ScanFields, BasePlan):
    """``n_frames`` frames, one every ``interval_s`` (frame start to frame start; 0 = back to
    back) from the camera (``exposure_s``, ``binning``, ``region``) or the scan generator
    (``size_px``, ``pixel_nm``, ``dwell_us``, ``flyback_us``, ``rotation_deg``, ``signals``)."""

    kind: Literal["time_series"] = "time_series"
    source: Literal["camera", "scan"] = "camera"
    n_frames_: int = Field(10, ge=1, le=100000, alias="n_frames")
    interval_s: float = Field(0.0, ge=0, le=86400)
    rotation_deg: float = 0.0
    signals_: list[str] = _signals_field(["HAADF"])
    defocus_nm: float | None = Field(None, description="set before the first frame")
    track_drift_nm: float | None = Field(
        None, gt=0, le=1e4, description="re-centre the field with the stage whenever the live "
        "average says the content moved this far (null: no tracking)",
    )  # fmt: skip

    @classmethod
    def allowed_for_kind(cls) -> tuple[str, ...]:
        return ("align", "nonrigid")

    def n_frames(self) -> int:
        return self.n_frames_

    def signals(self) -> tuple[str, ...]:
        return tuple(self.signals_) if self.source == "scan" else ("frames",)

    def frame_time_s(self) -> float:
        return self.exposure_s if self.source == "camera" else self.scan_frame_time_s()

    def frame_shape(self, camera_shape: tuple[int, int]) -> tuple[int, int]:
        if self.source == "camera":
            return self.camera_frame_shape(camera_shape)
        return tuple(self.size_px)

    def steps(self) -> Iterator[FrameStep]:
        if self.source == "camera":
            shot: CameraShot | ScanShot = self.camera_shot()
        else:
            shot = ScanShot(self.settings_at(self.rotation_deg, self.signals()))
        wait = max(0.0, self.interval_s - self.frame_time_s())
        for i in range(self.n_frames_):
            yield FrameStep(
                i,
                shot,
                defocus_nm=self.defocus_nm if i == 0 else None,
                settle_s=self.settle_s if i == 0 else 0.0,
                delay_s=wait if i > 0 else 0.0,
            )

    def problems(self, limits: PlanLimits, camera_shape: tuple[int, int]) -> list[str]:
        out = super().problems(limits, camera_shape)
        if self.source == "camera":
            return out + self.camera_problems(limits, camera_shape)
        return out + self.scan_problems(limits)

    def dose_per_frame(self, dose_rate_e_per_A2_s, probe_current_pA):
        if self.source == "camera":
            return self.camera_dose(dose_rate_e_per_A2_s)
        return self.scan_dose(probe_current_pA)

    def scan_sets(self) -> bool:
        return self.source == "scan"


#: Every plan kind, in documentation order. Add new kinds here.
PLAN_MODELS: tuple[type[BasePlan], ...] = (
    CameraImage,
    ScanImage,
    FocalSeries,
    RotatedScanSeries,
    TimeSeries,
)

Plan = Annotated[
    CameraImage | ScanImage | FocalSeries | RotatedScanSeries | TimeSeries,
    Field(discriminator="kind"),
]
_PLAN_ADAPTER: TypeAdapter = TypeAdapter(Plan)


def parse_plan(raw: dict[str, Any]) -> BasePlan:
    """Validate a plan dict (pydantic ``ValidationError`` says what is wrong)."""
    return _PLAN_ADAPTER.validate_python(raw)


def plan_to_json(plan: BasePlan) -> dict[str, Any]:
    return plan.model_dump(mode="json", by_alias=True)
