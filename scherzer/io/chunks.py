"""Stacks larger than memory: frames read from a file a block at a time, and scratch arrays on
disk for what processing derives from them (spectra).

* :class:`FileFrames` — a :class:`~scherzer.processing.chunked.FrameSource` over an HDF5 dataset
  (h5py slicing; our EMD/.hspy files find their signal by name) or a multi-page TIFF (one page
  per frame): ``read(start, stop)`` returns only those frames, as float32 (n, y, x).
* :class:`ScratchFactory` — makes :class:`ScratchArray`\\ s: frame-indexed arrays in an unlinked
  temporary file, read and written by slices with ``pread``/``pwrite`` (no memory map, so pages
  read back are not counted against the process), removed when closed or collected.

Nothing here holds more than the block asked for.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from scherzer.io.errors import EmdError, existing_file

__all__ = ["FileFrames", "ScratchArray", "ScratchFactory", "stack_dataset"]

_TIFF_SUFFIXES = (".tif", ".tiff")


def stack_dataset(f: h5py.File, signal: str | None = None) -> h5py.Dataset:
    """The (n, y, x) frames of ``signal`` (default the first) in one of our EMD/.hspy files,
    or the first 3-D dataset of any other HDF5 file (as stored)."""
    group = f.get("data")
    if isinstance(group, h5py.Group):
        names = [k for k, g in group.items() if isinstance(g, h5py.Group) and "data" in g]
        if signal is not None and signal not in names:
            raise EmdError(f"no signal {signal!r} in {f.filename}; have {sorted(names)}")
        for name in [signal] if signal is not None else names:
            data = group[name]["data"]
            if isinstance(data, h5py.Dataset) and data.ndim == 3:
                return data
    found: list[h5py.Dataset] = []

    def visit(_: str, obj: Any) -> None:
        if not found and isinstance(obj, h5py.Dataset) and obj.ndim == 3:
            found.append(obj)

    f.visititems(visit)
    if not found:
        raise EmdError(f"{f.filename} holds no 3-D dataset of frames")
    return found[0]


class FileFrames:
    """Frames of an HDF5 or multi-page TIFF file, read a block at a time as float32.

    Use as a context manager (or call :meth:`close`). ``largest_read``: the most frames one
    :meth:`read` returned (what the caller's budget had to hold)."""

    def __init__(self, path: str | Path, signal: str | None = None) -> None:
        """``signal``: the signal of one of our files (default the first); TIFFs hold one."""
        self.path = existing_file(path)
        self.largest_read = 0
        self._h5: h5py.File | None = None
        self._tiff: Any = None
        if self.path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            self._tiff = tifffile.TiffFile(self.path)
            pages = self._tiff.pages
            first = pages[0].shape
            if len(first) != 2:
                self.close()
                raise EmdError(f"{self.path}: frames are read one TIFF page each; page 0 is "
                               f"{first}")  # fmt: skip
            self._shape = (len(pages), int(first[0]), int(first[1]))
        else:
            self._h5 = h5py.File(self.path, "r")
            self._data = stack_dataset(self._h5, signal)
            n, ny, nx = self._data.shape
            self._shape = (int(n), int(ny), int(nx))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def nbytes_float32(self) -> int:
        """Bytes of the whole stack as float32."""
        n, ny, nx = self._shape
        return 4 * n * ny * nx

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` as float32 (k, y, x)."""
        start, stop = max(0, start), min(stop, self._shape[0])
        self.largest_read = max(self.largest_read, stop - start)
        if self._h5 is not None:
            return np.asarray(self._data[start:stop], dtype=np.float32)
        pages = self._tiff.pages
        out = np.empty((stop - start, *self._shape[1:]), dtype=np.float32)
        for k, i in enumerate(range(start, stop)):
            out[k] = pages[i].asarray()
        return out

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None

    def __enter__(self) -> FileFrames:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ScratchArray:
    """A frame-indexed (n, ...) array in an unlinked temporary file, read and written by
    slices of the first axis (step 1)."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, directory: str | None = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._item = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._file = tempfile.TemporaryFile(dir=directory)
        self._file.truncate(self._item * self.shape[0])

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, key: slice | int) -> tuple[int, int]:
        if isinstance(key, (int, np.integer)):
            key = slice(int(key), int(key) + 1)
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            raise EmdError("scratch arrays are read and written by contiguous slices")
        return start, max(start, stop)

    def __getitem__(self, key: slice | int) -> np.ndarray:
        start, stop = self._rows(key)
        raw = os.pread(self._file.fileno(), (stop - start) * self._item, start * self._item)
        out = np.frombuffer(raw, dtype=self.dtype).reshape(stop - start, *self.shape[1:])
        return out[0].copy() if isinstance(key, (int, np.integer)) else out.copy()

    def __setitem__(self, key: slice | int, value: np.ndarray) -> None:
        start, stop = self._rows(key)
        block = np.ascontiguousarray(value, dtype=self.dtype).reshape(stop - start, *self.shape[1:])
        os.pwrite(self._file.fileno(), block.tobytes(), start * self._item)

    def close(self) -> None:
        self._file.close()


class ScratchFactory:
    """Makes :class:`ScratchArray` s in ``directory`` (default: the system's temporary
    directory) and closes them all on :meth:`close`; call it as ``factory(shape, dtype)``."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = None if directory is None else str(directory)
        self.made: list[ScratchArray] = []

    def __call__(self, shape: tuple[int, ...], dtype: Any) -> ScratchArray:
        arr = ScratchArray(shape, dtype, self.directory)
        self.made.append(arr)
        return arr

    def close(self) -> None:
        for arr in self.made:
            arr.close()
        self.made.clear()

    def __enter__(self) -> ScratchFactory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
