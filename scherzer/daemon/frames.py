"""The recent frames ``frame_get`` serves (interactive and from jobs), addressed by a frame id."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from scherzer.daemon.protocol import ErrorCode, FrameInfo, ProtocolError, record_model
from scherzer.stack import FrameRecord

__all__ = ["FrameCache"]


class FrameCache:
    """The last ``size`` frames (interactive and from jobs), addressed by a frame id."""

    def __init__(self, size: int = 32) -> None:
        self._size = size
        self._frames: OrderedDict[int, tuple[np.ndarray, FrameInfo]] = OrderedDict()
        self._next = 1
        self._lock = threading.Lock()

    def put(
        self,
        image: np.ndarray,
        record: FrameRecord,
        pixel_size_nm: tuple[float, float],
        job_id: int | None = None,
    ) -> FrameInfo:
        image = np.ascontiguousarray(image, dtype=np.float32)
        with self._lock:
            frame_id = self._next
            self._next += 1
            info = FrameInfo(
                frame_id=frame_id,
                signal=record.signal,
                shape=list(image.shape),
                pixel_size_nm=pixel_size_nm,
                record=record_model(record),
                job_id=job_id,
            )
            self._frames[frame_id] = (image, info)
            while len(self._frames) > self._size:
                self._frames.popitem(last=False)
        return info

    def get(self, frame_id: int) -> tuple[np.ndarray, FrameInfo]:
        with self._lock:
            if frame_id not in self._frames:
                raise ProtocolError(
                    ErrorCode.NOT_FOUND,
                    f"frame {frame_id} is not among the last {self._size} frames",
                )
            return self._frames[frame_id]
