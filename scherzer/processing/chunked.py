"""Bounded memory for rigid registration: frame sources, spectra stores and work blocks.

The registration method (:mod:`registration`) touches its frames and spectra only through the
objects here, one block of frames at a time, so the same arithmetic runs whether a stack fits in
memory or not:

* :class:`FrameSource` — where frames come from: an in-memory array (:class:`ArraySource`) or a
  file read in chunks (``scherzer.io.chunks.FileFrames``, which implements the same protocol:
  processing never opens files).
* :class:`Store` — frame-indexed arrays (spectra): a NumPy array, or a *scratch* array made by a
  factory the caller passes in (``scherzer.io.chunks.ScratchFactory`` writes a temporary file and
  reads it back block by block), chosen by :func:`plan_memory` from the memory budget.
* Work blocks: every stream over frames or pairs handles at most ``batch`` frames' worth of
  temporaries at once (:data:`BLOCK_BYTES`, capped by the budget).

Every reduction over frames is accumulated frame by frame in index order, so the block size
never changes a result: the chunked path gives the in-memory path's shifts (tested to 1e-4 px).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = [
    "BLOCK_BYTES",
    "ArraySource",
    "FrameSource",
    "MemoryPlan",
    "Store",
    "as_store",
    "plan_memory",
]

#: Largest size of the temporaries one block of a stream may make (per-frame spectra, cross-power,
#: correlation maps). Larger blocks batch the FFTs better; smaller ones bound the peak memory.
#: The budget caps it at :data:`WORK_SHARE` of itself.
BLOCK_BYTES = 48 << 20
#: Share of the memory budget given to a stream's temporaries (the rest holds frames and spectra).
WORK_SHARE = 0.125
#: Temporaries per frame in a block, in units of one frame's spectrum (cross-power, its normalised
#: copy, a correlation map).
TEMPS_PER_FRAME = 3
#: Spectra stay in memory while all of them (coarse and fine stage) take at most this share of the
#: budget; beyond it they go to scratch (when the caller gave a scratch factory).
SPECTRA_SHARE = 0.5

Scratch = Callable[[tuple[int, ...], Any], Any]


class FrameSource(Protocol):
    """Frames (n, y, x) read a block at a time, as float32."""

    @property
    def shape(self) -> tuple[int, int, int]: ...

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` as a float32 array (k, y, x)."""
        ...


class ArraySource:
    """An in-memory stack as a :class:`FrameSource` (no copy when it is float32 already)."""

    def __init__(self, frames: np.ndarray) -> None:
        self.frames = frames

    @property
    def shape(self) -> tuple[int, int, int]:
        n, ny, nx = self.frames.shape
        return int(n), int(ny), int(nx)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.frames[start:stop], dtype=np.float32)


class Store:
    """A frame-indexed array (n, ...) in memory or in scratch, read and written by slices.

    ``batch`` is how many frames one block of a stream over this store holds."""

    def __init__(self, backing: Any, batch: int) -> None:
        self.backing = backing
        self.batch = max(1, int(batch))
        self._memo: list[tuple[str, Any, Any]] = []

    def memo(self, name: str, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` computed once per (``name``, ``key`` object) for this store (e.g. the
        shift-independent moments of one weight); the key is held, so its identity stays
        unique while the store lives."""
        for have, obj, value in self._memo:
            if have == name and obj is key:
                return value
        value = make()
        self._memo.append((name, key, value))
        return value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.backing.shape)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.backing, np.ndarray)

    def __len__(self) -> int:
        return int(self.backing.shape[0])

    def __getitem__(self, key: slice) -> np.ndarray:
        return np.asarray(self.backing[key])

    def __setitem__(self, key: slice, value: np.ndarray) -> None:
        self.backing[key] = value

    def pair_batch(self) -> int:
        """Pairs handled at once by a stream over pairs (two frames' worth each)."""
        return max(1, self.batch // 2)

    def frame(self, i: int) -> np.ndarray:
        """Frame i (a view when in memory)."""
        if self.in_memory:
            return self.backing[i]
        return np.asarray(self.backing[i : i + 1])[0]

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(start, frames start:start + batch) in order."""
        for start in range(0, len(self), self.batch):
            yield start, self[start : start + self.batch]


def as_store(spectra: Any) -> Store:
    """``spectra`` as a :class:`Store` (arrays get the default block size)."""
    if isinstance(spectra, Store):
        return spectra
    arr = np.asarray(spectra)
    return Store(arr, frames_per_block(arr[0].nbytes, BLOCK_BYTES))


def frames_per_block(spectrum_bytes: int, work_bytes: int) -> int:
    """Frames whose temporaries fit in ``work_bytes`` (at least one)."""
    return max(1, int(work_bytes // max(TEMPS_PER_FRAME * spectrum_bytes, 1)))


@dataclass(frozen=True)
class MemoryPlan:
    """How a measurement holds its data: the frames per work block and where spectra live."""

    budget_bytes: int
    work_bytes: int
    scratch: Scratch | None

    def store(self, n: int, item_shape: tuple[int, int], dtype: Any) -> Store:
        """An empty (n, *item_shape) store: in memory, or in scratch when there is a scratch
        factory and the spectra of both stages would take more than :data:`SPECTRA_SHARE` of
        the budget."""
        item_bytes = int(np.prod(item_shape)) * np.dtype(dtype).itemsize
        batch = frames_per_block(item_bytes, self.work_bytes)
        spectra_bytes = 2 * n * item_bytes
        if self.scratch is not None and spectra_bytes > SPECTRA_SHARE * self.budget_bytes:
            return Store(self.scratch((n, *item_shape), dtype), batch)
        return Store(np.empty((n, *item_shape), dtype=dtype), batch)

    def frame_batch(self, frame_bytes: int) -> int:
        """Frames read from a source at once (prepared and transformed together)."""
        return frames_per_block(frame_bytes, self.work_bytes)


def plan_memory(budget_bytes: int, scratch: Scratch | None = None) -> MemoryPlan:
    """The plan for a budget: work blocks of at most :data:`BLOCK_BYTES` and
    :data:`WORK_SHARE` of the budget."""
    work = int(min(BLOCK_BYTES, WORK_SHARE * budget_bytes))
    return MemoryPlan(int(budget_bytes), max(work, 1), scratch)
