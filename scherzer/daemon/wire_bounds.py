"""Bounds of the numbers a request may carry (wire limits, checked by the protocol's models).

They keep every number finite and physically meaningful before any handler or device sees it;
the configured ``[limits]`` are checked after them. Ids fit SQLite's signed 64-bit INTEGER.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_ANGLE_DEG",
    "MAX_DEFOCUS_NM",
    "MAX_PIXEL_NM",
    "MAX_QUEUE_INDEX",
    "MAX_SIDE_PX",
    "MAX_STIGMATOR_NM",
    "MAX_TILT_MRAD",
    "MAX_TIME_US",
    "Angle",
    "Int64",
    "PixelCount",
    "PixelIndex",
    "QueueIndex",
    "SignalName",
    "Tilt",
]

#: SQLite stores an INTEGER in a signed 64-bit word: every id in a request must fit.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Largest queue index accepted (far beyond any real queue; keeps list arithmetic cheap).
MAX_QUEUE_INDEX = 2**31 - 1
#: Defocus beyond 1 mm is no objective lens setting.
MAX_DEFOCUS_NM = 1e6
#: Two-fold stigmator beyond 100 µm is no lens setting.
MAX_STIGMATOR_NM = 1e5
#: Beam tilt beyond 1 rad is no deflector setting.
MAX_TILT_MRAD = 1000.0
#: Angles: any finite value within ten turns (wrapped by the devices).
MAX_ANGLE_DEG = 3600.0
#: Image side in pixels: far beyond any detector or scan generator.
MAX_SIDE_PX = 65536
#: Scan pixel size beyond 1 mm is no STEM scan.
MAX_PIXEL_NM = 1e6
#: Dwell or fly-back beyond one second per pixel or line is no scan.
MAX_TIME_US = 1e6

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
QueueIndex = Annotated[int, Field(ge=0, le=MAX_QUEUE_INDEX)]
Angle = Annotated[float, Field(ge=-MAX_ANGLE_DEG, le=MAX_ANGLE_DEG, allow_inf_nan=False)]
Tilt = Annotated[float, Field(ge=-MAX_TILT_MRAD, le=MAX_TILT_MRAD, allow_inf_nan=False)]
PixelIndex = Annotated[int, Field(ge=0, lt=MAX_SIDE_PX)]
PixelCount = Annotated[int, Field(ge=1, le=MAX_SIDE_PX)]
SignalName = Annotated[str, Field(min_length=1, max_length=32)]
