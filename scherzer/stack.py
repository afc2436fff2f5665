"""ImageStack: the data model every part of Scherzer passes around.

Conventions
-----------
* ``frames`` is (n, y, x), C-ordered float32 (integer and float64 input is converted; complex,
  boolean or non-numeric input is refused). Complex results (exit waves) are not ImageStacks; they
  travel as complex64 arrays beside one.
* ``pixel_size_nm`` is (y, x) in nm per pixel.
* One :class:`FrameRecord` per frame: acquisition index, time in seconds since the series started,
  nominal and read-back defocus in nm (NaN when not applicable, e.g. STEM), scan rotation in
  degrees, exposure in s (camera) or dwell in µs (scan), dose in e/Å² per frame, signal name.
* ``instrument`` holds instrument parameters (an :class:`~scherzer.optics.Optics` dump under
  ``"optics"`` where known) as JSON-serialisable values; ``metadata`` is free JSON-serialisable
  text/numbers; ``ground_truth`` holds arrays and scalars a simulator knows (e.g. ``shifts_px``
  (n, 2) in the ARCHITECTURE.md convention, ``defocus_nm`` (n,)).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from scherzer.optics import Optics

__all__ = ["RECORD_DTYPE", "FrameRecord", "ImageStack", "StackError"]


class StackError(ValueError):
    """An ImageStack was built from data that cannot be one; the message says what is wrong."""


@dataclass(frozen=True)
class FrameRecord:
    """What is known about how one frame was acquired (units in the names)."""

    index: int
    time_s: float = 0.0
    defocus_nominal_nm: float = math.nan
    defocus_readback_nm: float = math.nan
    scan_rotation_deg: float = 0.0
    exposure_s: float = math.nan
    dwell_us: float = math.nan
    dose_e_per_A2: float = math.nan
    voltage_kv: float = math.nan
    magnification: float = math.nan
    camera_length_mm: float = math.nan
    signal: str = "image"


#: The per-frame table as a structured array (what scherzer.io writes beside the frames).
RECORD_DTYPE = np.dtype(
    [
        ("index", "<i8"),
        ("time_s", "<f8"),
        ("defocus_nominal_nm", "<f8"),
        ("defocus_readback_nm", "<f8"),
        ("scan_rotation_deg", "<f8"),
        ("exposure_s", "<f8"),
        ("dwell_us", "<f8"),
        ("dose_e_per_A2", "<f8"),
        ("voltage_kv", "<f8"),
        ("magnification", "<f8"),
        ("camera_length_mm", "<f8"),
        ("signal", "S32"),
    ]
)


def records_to_array(records: Sequence[FrameRecord]) -> np.ndarray:
    """Records as a structured array of :data:`RECORD_DTYPE`."""
    out = np.zeros(len(records), dtype=RECORD_DTYPE)
    for i, r in enumerate(records):
        row = dataclasses.astuple(r)
        out[i] = (*row[:-1], r.signal.encode("utf-8")[:32])
    return out


def records_from_array(table: np.ndarray) -> list[FrameRecord]:
    """Inverse of :func:`records_to_array` (unknown columns are ignored, missing ones default)."""
    names = set(table.dtype.names or ())
    out = []
    for row in table:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(FrameRecord):
            if f.name not in names:
                continue
            v = row[f.name]
            if f.name == "signal":
                kwargs[f.name] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
            elif f.name == "index":
                kwargs[f.name] = int(v)
            else:
                kwargs[f.name] = float(v)
        out.append(FrameRecord(**kwargs))
    return out


def _as_frames(frames: Any) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.dtype.kind not in "iuf":
        raise StackError(
            f"frames must be real numbers (int or float); got dtype {arr.dtype}"
            + (" — complex data are waves, not image frames" if arr.dtype.kind == "c" else "")
        )
    if arr.ndim == 2:
        raise StackError(
            f"frames must be 3-D (frames, y, x); got a single 2-D image of shape {arr.shape} "
            "(use frames[None] for a one-frame stack)"
        )
    if arr.ndim != 3:
        raise StackError(f"frames must be 3-D (frames, y, x); got {arr.ndim}-D shape {arr.shape}")
    if 0 in arr.shape:
        raise StackError(f"frames must not be empty; got shape {arr.shape}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        bad = np.argwhere(~np.isfinite(out))
        frames_bad = sorted({int(b[0]) for b in bad})
        raise StackError(
            f"frames contain {len(bad)} non-finite values (NaN/inf) in frames {frames_bad[:10]}"
            + ("…" if len(frames_bad) > 10 else "")
        )
    return out


@dataclass
class ImageStack:
    """Frames (n, y, x) with pixel size, per-frame records, instrument parameters and truth."""

    frames: np.ndarray
    pixel_size_nm: tuple[float, float] = (1.0, 1.0)
    records: list[FrameRecord] = field(default_factory=list)
    instrument: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    ground_truth: dict[str, Any] = field(default_factory=dict)
    intensity_units: str = "counts"

    def __post_init__(self) -> None:
        self.frames = _as_frames(self.frames)
        try:
            py, px = (float(v) for v in self.pixel_size_nm)
        except (TypeError, ValueError) as exc:
            raise StackError(
                f"pixel_size_nm must be two numbers (y, x); got {self.pixel_size_nm!r}"
            ) from exc
        if not (math.isfinite(py) and math.isfinite(px) and py > 0 and px > 0):
            raise StackError(f"pixel_size_nm must be positive and finite; got ({py}, {px})")
        self.pixel_size_nm = (py, px)
        n = self.frames.shape[0]
        if not self.records:
            self.records = [FrameRecord(index=i) for i in range(n)]
        self.records = list(self.records)
        if len(self.records) != n:
            raise StackError(f"{len(self.records)} frame records given for {n} frames")
        for r in self.records:
            if not isinstance(r, FrameRecord):
                raise StackError(f"records must be FrameRecord objects; got {type(r).__name__}")
        for key, value in self.ground_truth.items():
            arr = np.asarray(value)
            if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
                raise StackError(f"ground_truth[{key!r}] contains non-finite values")

    # --- shape -----------------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def frame_shape(self) -> tuple[int, int]:
        return (int(self.frames.shape[1]), int(self.frames.shape[2]))

    def __len__(self) -> int:
        return self.n_frames

    # --- per-frame columns -----------------------------------------------------------------
    def column(self, name: str) -> np.ndarray:
        """One record field for all frames as an array (e.g. ``"defocus_nominal_nm"``)."""
        if name not in {f.name for f in dataclasses.fields(FrameRecord)}:
            raise KeyError(f"no frame-record field {name!r}")
        return np.array([getattr(r, name) for r in self.records])

    @property
    def signal(self) -> str:
        return self.records[0].signal

    @property
    def optics(self) -> Optics | None:
        """The instrument optics if recorded."""
        from scherzer.optics import Optics  # here: `import scherzer.stack` stays free of pydantic

        raw = self.instrument.get("optics")
        return Optics(**raw) if raw else None

    # --- derived stacks --------------------------------------------------------------------
    def with_frames(self, frames: np.ndarray, **changes: Any) -> ImageStack:
        """A copy carrying other frames of the same count (records and parameters kept)."""
        return dataclasses.replace(self, frames=frames, **changes)

    def subset(self, indices: Sequence[int]) -> ImageStack:
        """The frames at ``indices`` (records and per-frame ground truth follow)."""
        idx = [int(i) for i in indices]
        if not idx:
            raise StackError("subset needs at least one frame index")
        for i in idx:
            if not 0 <= i < self.n_frames:
                raise StackError(f"frame index {i} out of range 0..{self.n_frames - 1}")
        truth = {}
        for k, v in self.ground_truth.items():
            arr = np.asarray(v)
            truth[k] = arr[idx] if arr.ndim >= 1 and arr.shape[0] == self.n_frames else v
        return dataclasses.replace(
            self,
            frames=self.frames[idx],
            records=[self.records[i] for i in idx],
            ground_truth=truth,
        )

    def records_array(self) -> np.ndarray:
        return records_to_array(self.records)
