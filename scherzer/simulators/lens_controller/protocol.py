"""The lens controller's line protocol: frames (sequence number, text, CRC-16/CCITT), their
encoding and decoding, numbers and status words, error codes (docs/lens-protocol.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import IntEnum

#: Longest accepted line in bytes, including the terminating LF (and CR, if sent).
MAX_LINE_BYTES = 128
#: Sequence numbers are decimal integers in [0, SEQ_MODULUS).
SEQ_MODULUS = 65536
#: Identification string of the emulated controller (reply to IDN).
EMULATOR_IDN = "SCHERZER,LC-EMU,0001,1.0"


class ErrorCode(IntEnum):
    """Numeric error codes of ``ERR`` replies (the name follows the number on the wire)."""

    CHECKSUM = 10
    FRAMING = 11
    LINE_TOO_LONG = 12
    ENCODING = 13
    UNKNOWN_COMMAND = 20
    BAD_ARGS = 21
    LIMIT = 30
    BUSY = 40


class FrameError(ValueError):
    """A line that is not a valid frame; ``code`` says why, ``seq`` is its seq if readable."""

    def __init__(self, code: ErrorCode, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.seq = seq


@dataclass(frozen=True)
class Frame:
    """A decoded line: ``seq`` (None for ``-``) and its words (command or OK/ERR and values)."""

    seq: int | None
    words: tuple[str, ...]


def crc16_ccitt(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: polynomial 0x1021, initial value 0xFFFF, no reflection, no final XOR.

    Check value: ``crc16_ccitt(b"123456789") == 0x29B1``.
    """
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def encode_frame(seq: int | None, text: str) -> bytes:
    """``<seq> <text> *<CRC as 4 upper-case hex digits>\\r\\n``; seq None is written ``-``."""
    seq_token = "-" if seq is None else str(seq)
    body = f"{seq_token} {text}".encode("ascii")
    return body + b" *%04X\r\n" % crc16_ccitt(body)


def _parse_seq(token: str) -> int | None:
    """Decimal seq in [0, 65535] or None for ``-``; ValueError otherwise."""
    if token == "-":
        return None
    if not (token.isdigit() and token.isascii() and len(token) <= 5):
        raise ValueError(token)
    value = int(token)
    if value >= SEQ_MODULUS:
        raise ValueError(token)
    return value


def decode_frame(line: bytes) -> Frame:
    """Decode one line (without LF; a trailing CR is ignored) or raise :class:`FrameError`."""
    if len(line) + 1 > MAX_LINE_BYTES:  # + 1 for the LF
        raise FrameError(ErrorCode.LINE_TOO_LONG, f"line longer than {MAX_LINE_BYTES} bytes")
    if line.endswith(b"\r"):
        line = line[:-1]
    if any(b < 0x20 or b > 0x7E for b in line):
        raise FrameError(ErrorCode.ENCODING, "non-printable or non-ASCII byte in line")
    star = line.rfind(b" *")
    checksum = line[star + 2 :]
    if star < 0 or len(checksum) != 4 or not _is_hex(checksum):
        raise FrameError(ErrorCode.FRAMING, "expected '<seq> <command> [args] *<CRC16 hex4>'")
    body = line[:star]
    words = tuple(body.decode("ascii").split())
    try:
        seq = _parse_seq(words[0]) if words else None
    except ValueError:
        raise FrameError(ErrorCode.FRAMING, "sequence number must be 0..65535 or '-'") from None
    if int(checksum, 16) != crc16_ccitt(body):
        raise FrameError(ErrorCode.CHECKSUM, f"CRC mismatch (want {crc16_ccitt(body):04X})", seq)
    if len(words) < 2:
        raise FrameError(ErrorCode.FRAMING, "missing command after sequence number", seq)
    return Frame(seq, words[1:])


def _is_hex(token: bytes) -> bool:
    return all(chr(b) in "0123456789abcdefABCDEF" for b in token)


_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,3})?")


def parse_number(token: str) -> float:
    """A finite decimal number (no inf/nan/underscores); ValueError otherwise."""
    if len(token) > 24 or not _NUMBER.fullmatch(token):
        raise ValueError(f"not a number: {token[:24]!r}")
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {token[:24]!r}")
    return value


def parse_status(words: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` words of a STATUS reply -> dict (other words are ignored)."""
    pairs = (w.split("=", 1) for w in words if "=" in w)
    return {key: value for key, value in pairs}


# ====================================================================== emulated controller
