"""Acquisition plans: pydantic models that expand into per-frame steps.

A plan is data (JSON in the job table); :meth:`BasePlan.steps` expands it into
:class:`FrameStep` objects the executor runs one by one (set optics → settle → acquire → write).
This issue ships two minimal kinds, :class:`CameraImage` and :class:`ScanImage` (one frame, or
``repeat`` identical frames); focal series,
rotated-scan and time series plans are added by subclassing :class:`BasePlan`, implementing
``steps``/``n_frames``/``signals`` and listing the class in :data:`PLAN_MODELS`.

Units: nm, s, µs and degrees as named; dose in e/Å².
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from scherzer.config import PlanLimits
from scherzer.drivers.base import ScanSettings

__all__ = [
    "PLAN_MODELS",
    "PROCESSING_STEPS",
    "BasePlan",
    "CameraImage",
    "CameraShot",
    "FrameStep",
    "Plan",
    "PlanEstimate",
    "ScanImage",
    "ScanShot",
    "parse_plan",
]

#: Processing step names a plan may request (filled by the processing hand-off; none yet).
PROCESSING_STEPS: tuple[str, ...] = ()

BYTES_PER_PIXEL = 4  # float32 frames on disk


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
    """One frame of a plan: optics to set first (None = leave), then one acquisition."""

    index: int
    shot: CameraShot | ScanShot
    defocus_nm: float | None = None
    settle_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class PlanEstimate(BaseModel):
    """What a plan will cost before it runs."""

    model_config = ConfigDict(extra="forbid")

    frames: int
    duration_s: float
    dose_e_per_A2: float | None = None
    disk_bytes: int


class BasePlan(BaseModel):
    """Fields every plan has; subclasses add ``kind`` and their parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=128, description="label, also used in the file name")
    sample: str = Field("", max_length=256)
    notes: str = Field("", max_length=4096)
    defocus_nm: float | None = Field(None, description="set before acquiring; null = leave as is")
    settle_s: float = Field(0.0, ge=0, le=60, description="extra wait after setting optics")
    processing: list[str] = Field(default_factory=list, description="steps after acquisition")
    repeat: int = Field(1, ge=1, le=100000, description="identical frames to acquire in a row")

    @field_validator("processing")
    @classmethod
    def _known_steps(cls, steps: list[str]) -> list[str]:
        unknown = [s for s in steps if s not in PROCESSING_STEPS]
        if unknown:
            raise ValueError(
                f"unknown processing steps {unknown}; available: {list(PROCESSING_STEPS)}"
            )
        return steps

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

    # --- shared ----------------------------------------------------------------------------
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

    def problems(self, limits: PlanLimits, camera_shape: tuple[int, int]) -> list[str]:
        """Reasons this plan is outside the limits (empty when it may run)."""
        out = []
        if self.defocus_nm is not None:
            lo, hi = limits.defocus_nm
            if not lo <= self.defocus_nm <= hi:
                out.append(f"defocus_nm {self.defocus_nm} outside the limits [{lo}, {hi}]")
        if self.n_frames() > limits.max_frames:
            out.append(f"{self.n_frames()} frames > limit {limits.max_frames}")
        return out

    def estimate(self, camera_shape: tuple[int, int]) -> PlanEstimate:
        ny, nx = self.frame_shape(camera_shape)
        n = self.n_frames()
        per_frame = self.frame_time_s() + self.settle_s
        return PlanEstimate(
            frames=n,
            duration_s=n * per_frame,
            disk_bytes=n * ny * nx * BYTES_PER_PIXEL * len(self.signals()),
        )


class CameraImage(BasePlan):
    """One camera image (TEM), optionally at a given defocus."""

    kind: Literal["camera_image"] = "camera_image"
    exposure_s: float = Field(1.0, gt=0, le=3600)
    binning: int = Field(1, ge=1, le=16)
    region: tuple[int, int, int, int] | None = Field(None, description="(y0, x0, height, width)")

    def n_frames(self) -> int:
        return self.repeat

    def frame_time_s(self) -> float:
        return self.exposure_s

    def frame_shape(self, camera_shape: tuple[int, int]) -> tuple[int, int]:
        ny, nx = (self.region[2], self.region[3]) if self.region else camera_shape
        return (ny // self.binning, nx // self.binning)

    def steps(self) -> Iterator[FrameStep]:
        return self._repeated(CameraShot(self.exposure_s, self.binning, self.region))

    def problems(self, limits: PlanLimits, camera_shape: tuple[int, int]) -> list[str]:
        out = super().problems(limits, camera_shape)
        if self.exposure_s > limits.max_exposure_s:
            out.append(f"exposure_s {self.exposure_s} > limit {limits.max_exposure_s}")
        if self.region is not None:
            y0, x0, h, w = self.region
            cy, cx = camera_shape
            if min(y0, x0) < 0 or h <= 0 or w <= 0 or y0 + h > cy or x0 + w > cx:
                out.append(f"region {self.region} is not inside the {cy}×{cx} camera")
        return out


class ScanImage(BasePlan):
    """One STEM scan frame with one or more signals recorded at the same probe positions."""

    kind: Literal["scan_image"] = "scan_image"
    size_px: tuple[int, int] = (256, 256)
    pixel_nm: float = Field(0.02, gt=0)
    dwell_us: float = Field(2.0, gt=0)
    flyback_us: float = Field(200.0, ge=0)
    rotation_deg: float = 0.0
    signals_: list[str] = Field(
        default_factory=lambda: ["HAADF"], alias="signals", min_length=1, max_length=8
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def n_frames(self) -> int:
        return self.repeat

    def signals(self) -> tuple[str, ...]:
        return tuple(self.signals_)

    def frame_time_s(self) -> float:
        ny, nx = self.size_px
        return ny * (nx * self.dwell_us + self.flyback_us) * 1e-6

    def frame_shape(self, camera_shape: tuple[int, int]) -> tuple[int, int]:
        return self.size_px

    def scan_settings(self) -> ScanSettings:
        return ScanSettings(
            size_px=self.size_px,
            pixel_nm=self.pixel_nm,
            dwell_us=self.dwell_us,
            flyback_us=self.flyback_us,
            rotation_deg=self.rotation_deg,
            signals=self.signals(),
        )

    def steps(self) -> Iterator[FrameStep]:
        return self._repeated(ScanShot(self.scan_settings()))

    def problems(self, limits: PlanLimits, camera_shape: tuple[int, int]) -> list[str]:
        out = super().problems(limits, camera_shape)
        lo, hi = limits.dwell_us
        if not lo <= self.dwell_us <= hi:
            out.append(f"dwell_us {self.dwell_us} outside the limits [{lo}, {hi}]")
        if max(self.size_px) > limits.max_scan_px or min(self.size_px) < 1:
            out.append(f"size_px {self.size_px} outside 1..{limits.max_scan_px}")
        return out


#: Every plan kind, in documentation order. Add new kinds here.
PLAN_MODELS: tuple[type[BasePlan], ...] = (CameraImage, ScanImage)

Plan = Annotated[CameraImage | ScanImage, Field(discriminator="kind")]
_PLAN_ADAPTER: TypeAdapter = TypeAdapter(Plan)


def parse_plan(raw: dict[str, Any]) -> BasePlan:
    """Validate a plan dict (pydantic ``ValidationError`` says what is wrong)."""
    return _PLAN_ADAPTER.validate_python(raw)


def plan_to_json(plan: BasePlan) -> dict[str, Any]:
    return plan.model_dump(mode="json", by_alias=True)
