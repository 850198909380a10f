"""Receive buffer shared by the incremental decoders (the wsproto pattern).

Bytes are fed in any chunking. A decoder reads a record with `take*`; if the record is not
complete yet, `take*` raises `NeedData`, the decoder calls `rollback()` and reports
`NEED_DATA`, and nothing is consumed. After a whole record, `commit()` forgets the bytes it
used. Offsets are absolute stream positions, for error messages.
"""

from __future__ import annotations

import struct
from typing import Final

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

_COMPACT_AT = 1 << 16


class _NeedDataType:
    """Sentinel type: the decoder needs more bytes before it can return a record."""

    _instance: _NeedDataType | None = None

    def __new__(cls) -> _NeedDataType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"

    def __bool__(self) -> bool:
        return False


NEED_DATA: Final = _NeedDataType()


class NeedData(Exception):
    """Raised inside a decoder when the current record is incomplete (never escapes)."""


class ReceiveBuffer:
    """A growable byte buffer with a read position, a commit mark and absolute offsets."""

    def __init__(self, base_offset: int = 0) -> None:
        self._data = bytearray()
        self._pos = 0  # read position inside _data
        self._mark = 0  # position of the last commit inside _data
        self._base = base_offset  # absolute offset of _data[0]
        self.closed = False  # the producer said no more bytes will come

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._data += data

    def close(self) -> None:
        self.closed = True

    @property
    def offset(self) -> int:
        """Absolute stream offset of the read position."""
        return self._base + self._pos

    @property
    def record_offset(self) -> int:
        """Absolute offset of the start of the record being decoded (the last commit)."""
        return self._base + self._mark

    @property
    def available(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        if n < 0:
            raise ValueError("negative length")
        end = self._pos + n
        if end > len(self._data):
            raise NeedData
        with memoryview(self._data) as mv:
            out = bytes(mv[self._pos : end])
        self._pos = end
        return out

    def take_into(self, out: memoryview) -> None:
        """Copy exactly len(out) bytes into out (e.g. straight into a RAM page)."""
        n = len(out)
        end = self._pos + n
        if end > len(self._data):
            raise NeedData
        with memoryview(self._data) as mv:
            out[:] = mv[self._pos : end]
        self._pos = end

    def take_upto(self, n: int) -> bytes:
        """Take what is there, at most n bytes (for opaque tails); never raises NeedData."""
        end = min(self._pos + n, len(self._data))
        out = bytes(self._data[self._pos : end])
        self._pos = end
        return out

    def peek_upto(self, n: int) -> bytes:
        """A copy of what is there from the read position, at most n bytes."""
        end = min(self._pos + n, len(self._data))
        with memoryview(self._data) as mv:
            return bytes(mv[self._pos : end])

    def skip(self, n: int) -> None:
        end = self._pos + n
        if end > len(self._data):
            raise NeedData
        self._pos = end

    def peek(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise NeedData
        return bytes(self._data[self._pos : end])

    def peek_u8(self) -> int:
        if self._pos >= len(self._data):
            raise NeedData
        return self._data[self._pos]

    def take_u8(self) -> int:
        if self._pos >= len(self._data):
            raise NeedData
        v = self._data[self._pos]
        self._pos += 1
        return v

    def take_u16(self) -> int:
        if self._pos + 2 > len(self._data):
            raise NeedData
        (v,) = _U16.unpack_from(self._data, self._pos)
        self._pos += 2
        return int(v)

    def take_u32(self) -> int:
        if self._pos + 4 > len(self._data):
            raise NeedData
        (v,) = _U32.unpack_from(self._data, self._pos)
        self._pos += 4
        return int(v)

    def take_u64(self) -> int:
        if self._pos + 8 > len(self._data):
            raise NeedData
        (v,) = _U64.unpack_from(self._data, self._pos)
        self._pos += 8
        return int(v)

    def take_counted(self) -> bytes:
        """A QEMU counted string: u8 length then that many bytes, no NUL."""
        n = self.take_u8()
        return self.take(n)

    def jump(self, n: int) -> None:
        """Seekable input: the next n stream bytes were skipped, never fed (a mapped-ram
        region). Only with everything fed consumed and committed."""
        if n < 0 or self._pos != len(self._data) or self._mark != self._pos:
            raise ValueError("jump needs a consumed, committed buffer and n >= 0")
        self._base += self._pos + n
        del self._data[:]
        self._pos = self._mark = 0

    def commit(self) -> None:
        """The record is complete: forget the bytes it used."""
        self._mark = self._pos
        if self._pos >= _COMPACT_AT and self._pos * 2 >= len(self._data):
            del self._data[: self._pos]
            self._base += self._pos
            self._pos = 0
            self._mark = 0

    def rollback(self) -> None:
        """The record is incomplete: return to the last commit."""
        self._pos = self._mark
