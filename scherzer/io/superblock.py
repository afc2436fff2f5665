"""The HDF5 superblock's "open for writing" flags: clearing them as ``h5clear -s`` does, so every
HDF5 reader (plain h5py, rosettasciio, HyperSpy) opens a file a killed writer left.

A writer (SWMR or not) sets status flags in the superblock (versions 2 and 3, which
``libver=("v110", "latest")`` files use) and clears them on close; a writer killed with SIGKILL
leaves them set, and HDF5 then refuses to open the file except in SWMR-read mode. Clearing means
zeroing the flags byte and recomputing the superblock's lookup3 checksum. It is done only when no
process holds an HDF5 lock on the file; a live SWMR writer holds no lock, so
:func:`scherzer.io.swmr.repair` (which also clears SWMR flags) must be called only when no writer
is running. This module reads and writes raw bytes only; it imports nothing from the package.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["clear_write_flags", "lookup3"]

# --- HDF5 superblock (v2/v3) layout: signature, version, offset size, length size, flags, then
# four addresses (base, superblock extension, end of file, root object header), then a checksum.
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_VERSION_OFFSET = 8  # superblock version byte
_OFFSET_SIZE_OFFSET = 9  # size in bytes of file addresses
_FLAGS_OFFSET = 11  # file consistency (status) flags
_ADDRESSES_START = 12  # first of the four addresses
_N_ADDRESSES = 4
_CHECKSUM_BYTES = 4
_FLAGGED_VERSIONS = (2, 3)  # superblock versions with status flags and a checksum
_HEAD_BYTES = 64  # enough for the whole v2/v3 superblock with 8-byte addresses
_SWMR_WRITE_FLAG = 0x04  # bit set by a writer in SWMR mode

# --- lookup3 (Bob Jenkins' hashlittle), HDF5's metadata checksum ------------------------------
_MASK32 = 0xFFFFFFFF
_LOOKUP3_INIT = 0xDEADBEEF  # the algorithm's seed constant (initval 0)
_LOOKUP3_BLOCK = 12  # bytes mixed per round (three 32-bit words)
_MIX_ROTATIONS = (4, 6, 8, 16, 19, 4)  # mix(a, b, c)
#: final(a, b, c): (target word, source word, rotation) per step
_FINAL_STEPS = ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24))


def _rot32(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK32


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    r1, r2, r3, r4, r5, r6 = _MIX_ROTATIONS
    a = (a - c) & _MASK32 ^ _rot32(c, r1)
    c = (c + b) & _MASK32
    b = (b - a) & _MASK32 ^ _rot32(a, r2)
    a = (a + c) & _MASK32
    c = (c - b) & _MASK32 ^ _rot32(b, r3)
    b = (b + a) & _MASK32
    a = (a - c) & _MASK32 ^ _rot32(c, r4)
    c = (c + b) & _MASK32
    b = (b - a) & _MASK32 ^ _rot32(a, r5)
    a = (a + c) & _MASK32
    c = (c - b) & _MASK32 ^ _rot32(b, r6)
    b = (b + a) & _MASK32
    return a, b, c


def lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` (initval 0): HDF5's metadata checksum."""
    a = b = c = (_LOOKUP3_INIT + len(data)) & _MASK32
    if not data:
        return c
    padded = data + b"\0" * (-len(data) % _LOOKUP3_BLOCK)
    words = [int.from_bytes(padded[i : i + 4], "little") for i in range(0, len(padded), 4)]
    for i in range(0, len(words) - 3, 3):
        a, b, c = _mix(
            (a + words[i]) & _MASK32, (b + words[i + 1]) & _MASK32, (c + words[i + 2]) & _MASK32
        )
    a, b, c = (a + words[-3]) & _MASK32, (b + words[-2]) & _MASK32, (c + words[-1]) & _MASK32
    for x, y, k in _FINAL_STEPS:
        abc = [a, b, c]
        abc[x] = ((abc[x] ^ abc[y]) - _rot32(abc[y], k)) & _MASK32
        a, b, c = abc
    return c


def clear_write_flags(path: Path, *, allow_swmr: bool) -> bool:
    """Clear the superblock's "open for writing" flags left by a killed writer (``h5clear -s``).

    Only when no process holds an HDF5 lock on the file, and (unless ``allow_swmr``) only for
    non-SWMR flags: a live SWMR writer holds no lock, so its flags are never touched here.
    Returns True if flags were cleared.
    """
    try:
        fh = open(path, "r+b")
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live writer holds it
        head = fh.read(_HEAD_BYTES)
        if head[:8] != _HDF5_SIGNATURE or head[_VERSION_OFFSET] not in _FLAGGED_VERSIONS:
            return False
        end = _ADDRESSES_START + _N_ADDRESSES * head[_OFFSET_SIZE_OFFSET]
        flags = head[_FLAGS_OFFSET]
        stored = int.from_bytes(head[end : end + _CHECKSUM_BYTES], "little")
        if flags == 0 or stored != lookup3(head[:end]):
            return False
        if flags & _SWMR_WRITE_FLAG and not allow_swmr:
            return False
        fixed = head[:_FLAGS_OFFSET] + b"\0" + head[_FLAGS_OFFSET + 1 : end]
        fh.seek(0)
        fh.write(fixed + lookup3(fixed).to_bytes(_CHECKSUM_BYTES, "little"))
        fh.flush()
        os.fsync(fh.fileno())
    return True
