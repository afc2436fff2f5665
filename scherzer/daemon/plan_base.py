"""What every acquisition plan shares: the frame steps a plan expands into, its estimate, its
error policy, the focus approach against hysteresis, scan dose and rotation rules, and
:class:`BasePlan`. The plan kinds are in :mod:`scherzer.daemon.plans` (which re-exports all of
this). Units: nm, s, µs and degrees as named; dose in e/Å².
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from scherzer.config import PlanLimits
from scherzer.drivers.base import ScanSettings
from scherzer.drivers.instruments import Instruments
from scherzer.processing.steps import STEP_NAMES, parse_step

__all__ = [
    "BYTES_PER_PIXEL",
    "PROCESSING_STEPS",
    "BasePlan",
    "CameraShot",
    "ErrorPolicy",
    "FrameStep",
    "PlanEstimate",
    "ProcessingStep",
    "ScanShot",
    "approach_setpoints",
    "rotation_sequence",
    "scan_dose_e_per_A2",
]


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

    def device_problems(self, instruments: Instruments) -> list[str]:
        """Reasons the configured devices cannot run this plan (e.g. a value outside a device's
        own limits); empty by default."""
        return []

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
