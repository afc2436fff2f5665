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
* :class:`TimeSeries` — frames at a fixed interval from the camera or the scan generator;
* :class:`EftemSeries` — energy-filtered images across an energy-loss range with automatic
  exposure (run by :mod:`scherzer.daemon.eftem_run`, not frame by frame from ``steps``).

New kinds subclass :class:`BasePlan`, implement ``steps``/``n_frames``/``signals``/
``frame_shape``/``frame_time_s`` and are listed in :data:`PLAN_MODELS` and :data:`Plan`.

Every plan has an error policy (:class:`ErrorPolicy`: retry a failed frame n times, then skip it
or abort; default retry once then abort) and ``restore_optics`` (default yes: focus, stigmator
and scan settings the plan changed are put back afterwards, on failure too).

Units: nm, s, µs and degrees as named; dose in e/Å².
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, field_validator, model_validator

from scherzer.config import PlanLimits
from scherzer.daemon.plan_base import (
    PROCESSING_STEPS,
    BasePlan,
    CameraShot,
    ErrorPolicy,
    FrameStep,
    PlanEstimate,
    ProcessingStep,
    ScanShot,
    approach_setpoints,
    rotation_sequence,
    scan_dose_e_per_A2,
)
from scherzer.drivers.base import ScanSettings
from scherzer.drivers.instruments import Instruments
from scherzer.processing.eftem.exposure import ExposureSettings
from scherzer.settings import instrument_field

__all__ = [
    "PLAN_MODELS",
    "PROCESSING_STEPS",
    "BasePlan",
    "CameraImage",
    "CameraShot",
    "EftemSeries",
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


class EftemSeries(BasePlan):
    """EFTEM series with automatic exposure: ``n_images`` energy-filtered images, the slit
    (``slit_width_ev`` wide) centred at energy losses ``start_ev + i·step_ev``. The exposure
    starts at ``initial_exposure_s`` and changes only by powers of two, when the ``percentile``
    of an image's net counts leaves [``low_counts``, ``high_counts``] (aiming at
    ``target_counts``), within [``min_exposure_s``, ``max_exposure_s``]; a dark reference (beam
    blanked) is taken the first time an exposure is used and reused after. Images are stored as
    int32 = net counts × max_exposure_s / exposure (exact); × first exposure / max_exposure_s
    they read as counts at the first image's exposure (per image in the ``eftem_series`` table).
    Optional processing ``eftem_maps`` (needs ``edge_onset_ev``): alignment on the pre-edge
    images, three-window elemental map, jump-ratio map."""

    kind: Literal["eftem_series"] = "eftem_series"
    start_ev: float = Field(
        400.0, ge=-1000, le=20000, description="energy loss of the first image (slit centre), eV"
    )
    step_ev: float = Field(10.0, ge=-1000, le=1000, description="energy-loss step, eV (not 0)")
    n_images: int = Field(10, ge=1, le=10000, description="images in the series")
    slit_width_ev: float = Field(10.0, gt=0, le=1000, description="energy-selecting slit, eV")
    initial_exposure_s: float = Field(
        1.0, gt=0, le=3600, description="first exposure, a power of two seconds (2^k s)"
    )
    min_exposure_s: float = Field(2.0**-6, gt=0, le=3600, description="shortest, 2^k s")
    max_exposure_s: float = Field(
        32.0, gt=0, le=3600, description="longest, 2^k s; also the stored integers' scale"
    )
    low_counts: float = Field(4000.0, gt=0, description="net counts below which exposure grows")
    high_counts: float = Field(
        32000.0, gt=0, description="net counts above which exposure shrinks (> 2 × low_counts)"
    )
    target_counts: float = Field(11000.0, gt=0, description="a change of exposure aims here")
    percentile: float = Field(
        99.0, gt=0, le=100, description="the image statistic compared with the thresholds"
    )
    dark_frames: int = Field(1, ge=1, le=64, description="frames averaged per dark reference")

    @classmethod
    def allowed_for_kind(cls) -> tuple[str, ...]:
        return ("eftem_maps",)

    @model_validator(mode="after")
    def _series(self) -> EftemSeries:
        if self.step_ev == 0 and self.n_images > 1:
            raise ValueError("step_ev must not be 0: the images would all be at one energy loss")
        if self.on_error.then == "skip":
            raise ValueError(
                "an EFTEM series cannot skip an image (its energy-loss axis would be wrong); "
                "use on_error 'abort' or 'retry'"
            )
        self.exposure_settings()  # ValueError says what is wrong with the exposure rules
        return self

    def exposure_settings(self) -> ExposureSettings:
        return ExposureSettings(
            initial_exposure_s=self.initial_exposure_s, min_exposure_s=self.min_exposure_s,
            max_exposure_s=self.max_exposure_s, percentile=self.percentile,
            low_counts=self.low_counts, high_counts=self.high_counts,
            target_counts=self.target_counts, dark_frames=self.dark_frames,
        )  # fmt: skip

    def energies_ev(self) -> list[float]:
        return [self.start_ev + i * self.step_ev for i in range(self.n_images)]

    def n_frames(self) -> int:
        return self.n_images

    def signals(self) -> tuple[str, ...]:
        return ("eftem",)

    def frame_time_s(self) -> float:
        """At most: every image (and, in :meth:`estimate`, every dark) at ``max_exposure_s``."""
        return self.max_exposure_s

    def frame_shape(self, camera_shape: tuple[int, int]) -> tuple[int, int]:
        return tuple(camera_shape)

    def steps(self) -> Iterator[FrameStep]:
        """One step per image at the first exposure (estimates only: the executor runs this
        plan in :mod:`scherzer.daemon.eftem_run`, choosing each exposure as it goes)."""
        shot = CameraShot(self.initial_exposure_s)
        for i, energy in enumerate(self.energies_ev()):
            yield FrameStep(i, shot, settle_s=self.settle_s, extra={"energy_ev": energy})

    def estimate(self, camera_shape, *, dose_rate_e_per_A2_s=None, probe_current_pA=None):
        """The duration is an upper bound: every image and every possible dark reference (one
        per power of two between the exposure limits) at ``max_exposure_s``."""
        est = super().estimate(camera_shape)
        exposures = round(math.log2(self.max_exposure_s / self.min_exposure_s)) + 1
        darks = min(self.n_images, exposures) * self.dark_frames * self.max_exposure_s
        return est.model_copy(update={"duration_s": est.duration_s + darks})

    def problems(self, limits: PlanLimits, camera_shape: tuple[int, int]) -> list[str]:
        out = super().problems(limits, camera_shape)
        if self.max_exposure_s > limits.max_exposure_s:
            out.append(f"max_exposure_s {self.max_exposure_s} > limit {limits.max_exposure_s}")
        return out

    def device_problems(self, instruments: Instruments) -> list[str]:
        """No energy filter, no beam blanker, or energies/slit outside the filter's limits."""
        filt = instruments.energy_filter
        if filt is None:
            return ["an EFTEM series needs an energy filter; none is configured"]
        out = [] if instruments.blanker is not None else [
            "an EFTEM series needs a beam blanker for its dark references; none is configured"
        ]  # fmt: skip
        lo, hi = filt.limits.energy_offset_ev
        energies = self.energies_ev()
        bad = [e for e in energies if not lo <= e <= hi]
        if bad:
            out.append(
                f"energy losses {min(energies):g}…{max(energies):g} eV ({len(bad)} of "
                f"{len(energies)}) outside the energy filter's limits [{lo:g}, {hi:g}] eV "
                "(energy_offset_ev)"
            )
        lo, hi = filt.limits.slit_width_ev
        if not lo <= self.slit_width_ev <= hi:
            out.append(
                f"slit_width_ev {self.slit_width_ev:g} outside the energy filter's limits "
                f"[{lo:g}, {hi:g}] eV"
            )
        return out


#: Every plan kind, in documentation order. Add new kinds here.
PLAN_MODELS: tuple[type[BasePlan], ...] = (
    CameraImage,
    ScanImage,
    FocalSeries,
    RotatedScanSeries,
    TimeSeries,
    EftemSeries,
)

Plan = Annotated[
    CameraImage | ScanImage | FocalSeries | RotatedScanSeries | TimeSeries | EftemSeries,
    Field(discriminator="kind"),
]
_PLAN_ADAPTER: TypeAdapter = TypeAdapter(Plan)


def parse_plan(raw: dict[str, Any]) -> BasePlan:
    """Validate a plan dict (pydantic ``ValidationError`` says what is wrong)."""
    return _PLAN_ADAPTER.validate_python(raw)


def plan_to_json(plan: BasePlan) -> dict[str, Any]:
    return plan.model_dump(mode="json", by_alias=True)
