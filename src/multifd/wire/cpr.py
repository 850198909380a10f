"""The CPR state message of a cpr-transfer handover: which RAM blocks the passed fds back.

QEMU source: migration/cpr.c (`cpr_state_save` / `cpr_state_load`: be32
QEMU_CPR_FILE_MAGIC 0x51435052 "QCPR", be32 QEMU_CPR_FILE_VERSION 1, then the
`vmstate_cpr_state` list of `CprFd {name, id, fd}`), include/migration/cpr.h. QEMU sends
it on a second channel (`cpr` in migrate's channel list) and each fd with its own
SCM_RIGHTS message; we send it at the head of the main unix socket, in one message whose
ancillary data carries every fd, in entry order. Layout (big-endian)::

    preamble (12 bytes):  0 be32 magic 0x51435052 | 4 be32 version 1 | 8 be32 body_len
    body:                 0 be32 count, then count entries:
                          u8 name_len | name (UTF-8, 1..255) | be32 id | be64 length

`length` is the RAM block's used_length; the fd for entry i is the i-th SCM_RIGHTS fd.
The main stream (QEVM ...) follows on the same socket.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from multifd.wire.errors import (
    BadCount,
    BadLength,
    BadMagic,
    BadName,
    Truncated,
    UnsupportedVersion,
)

__all__ = ["CPR_MAGIC", "CPR_VERSION", "MAX_CPR_FDS", "PREAMBLE_SIZE", "CprFd",
           "decode_body", "decode_preamble", "encode_state"]

CPR_MAGIC: Final = 0x51435052  # "QCPR"
CPR_VERSION: Final = 1
MAX_CPR_FDS: Final = 253  # SCM_MAX_FD, the kernel's limit of fds in one message
_PREAMBLE: Final = struct.Struct(">III")
_ENTRY_TAIL: Final = struct.Struct(">IQ")
PREAMBLE_SIZE: Final = _PREAMBLE.size
# Longest body: count + MAX_CPR_FDS entries with 255-byte names.
MAX_BODY: Final = 4 + MAX_CPR_FDS * (1 + 255 + _ENTRY_TAIL.size)


@dataclass(frozen=True, slots=True)
class CprFd:
    """One passed fd: the RAM block it backs (QEMU's CprFd name/id) and its length."""

    name: str
    length: int
    id: int = 0


def encode_state(entries: list[CprFd]) -> bytes:
    """Preamble + body for `entries` (the fds themselves go in the ancillary data)."""
    if len(entries) > MAX_CPR_FDS:
        raise ValueError(f"at most {MAX_CPR_FDS} fds fit one SCM_RIGHTS message, "
                         f"got {len(entries)}")
    parts = [struct.pack(">I", len(entries))]
    for e in entries:
        name = e.name.encode("utf-8")
        if not 1 <= len(name) <= 255:
            raise ValueError(f"CPR fd name must be 1..255 UTF-8 bytes, got {e.name!r}")
        parts += [bytes([len(name)]), name, _ENTRY_TAIL.pack(e.id, e.length)]
    body = b"".join(parts)
    return _PREAMBLE.pack(CPR_MAGIC, CPR_VERSION, len(body)) + body


def decode_preamble(buf: bytes | bytearray | memoryview) -> int:
    """Check magic and version; return the body length that follows."""
    if len(buf) < PREAMBLE_SIZE:
        raise Truncated("CPR state preamble", field="length", value=len(buf), offset=0)
    magic, version, body_len = _PREAMBLE.unpack_from(buf)
    if magic != CPR_MAGIC:
        raise BadMagic("not a CPR state (is the peer in mode cpr-transfer?)", field="magic",
                       value=magic, offset=0)
    if version != CPR_VERSION:
        raise UnsupportedVersion("CPR state version", field="version", value=version,
                                 offset=4)
    if not 4 <= body_len <= MAX_BODY:
        raise BadLength("CPR state body length", field="body_len", value=body_len, offset=8)
    return int(body_len)


def decode_body(buf: bytes | bytearray | memoryview) -> list[CprFd]:
    """The entries of a body (exactly `body_len` bytes)."""
    view = memoryview(buf).cast("B")
    base = PREAMBLE_SIZE
    if len(view) < 4:
        raise Truncated("CPR state body", field="length", value=len(view), offset=base)
    (count,) = struct.unpack_from(">I", view)
    if count > MAX_CPR_FDS:
        raise BadCount("CPR state fd count", field="count", value=count, offset=base)
    pos = 4
    out: list[CprFd] = []
    for _ in range(count):
        if pos >= len(view):
            raise Truncated("CPR state entry", offset=base + pos)
        n = view[pos]
        end = pos + 1 + n + _ENTRY_TAIL.size
        if n == 0 or end > len(view):
            raise Truncated("CPR state entry", field="name_len", value=n, offset=base + pos)
        try:
            name = bytes(view[pos + 1 : pos + 1 + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise BadName("CPR state entry name is not UTF-8", offset=base + pos) from None
        fd_id, length = _ENTRY_TAIL.unpack_from(view, pos + 1 + n)
        out.append(CprFd(name, int(length), int(fd_id)))
        pos = end
    if pos != len(view):
        raise BadLength("CPR state body has trailing bytes", field="extra",
                        value=len(view) - pos, offset=base + pos)
    return out
