"""The device-state buffer header carried at the start of a device-state packet's payload.

QEMU source: hw/vfio/migration-multifd.c (`VFIODeviceStatePacket`, big-endian since 10.0),
qemu-reference.md §5.4. Layout (12 bytes, then the data)::

    0 be32 version (0) | 4 be32 idx (buffer sequence number; 0xFFFFFFFF invalid)
    8 be32 flags (bit0 CONFIG_STATE: this is the device config, the last buffer) | 12 data

The receiver stores buffers by idx (they arrive on any channel, in any order) and loads them
strictly in idx order.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Final

from multifd.wire.constants import (
    DEVICE_STATE_BUFFER_HEADER_SIZE,
    DEVICE_STATE_BUFFER_VERSION,
    DEVICE_STATE_FLAG_CONFIG_STATE,
)
from multifd.wire.errors import BadCount, BadRecordType, Truncated, UnsupportedVersion

__all__ = ["DeviceStateBufferHeader"]

_HDR: Final = struct.Struct(">III")
_KNOWN_FLAGS: Final = DEVICE_STATE_FLAG_CONFIG_STATE
_IDX_INVALID: Final = 0xFFFFFFFF

assert _HDR.size == DEVICE_STATE_BUFFER_HEADER_SIZE


@dataclass(frozen=True, slots=True)
class DeviceStateBufferHeader:
    """Index and flags of one device-state buffer."""

    idx: int
    flags: int = 0
    version: int = DEVICE_STATE_BUFFER_VERSION

    SIZE: ClassVar[int] = DEVICE_STATE_BUFFER_HEADER_SIZE

    @property
    def is_config_state(self) -> bool:
        return bool(self.flags & DEVICE_STATE_FLAG_CONFIG_STATE)

    def encode(self) -> bytes:
        if not 0 <= self.idx < _IDX_INVALID:
            raise ValueError("idx must be 0..0xFFFFFFFE")
        if self.flags & ~_KNOWN_FLAGS or self.flags < 0:
            raise ValueError(f"unknown device-state buffer flags {self.flags:#x}")
        return _HDR.pack(self.version, self.idx, self.flags)

    @classmethod
    def decode(
        cls, buf: bytes | bytearray | memoryview, *, offset: int = 0
    ) -> DeviceStateBufferHeader:
        """Decode the 12 bytes at buf[offset:]; the data is buf[offset + 12:]."""
        if len(buf) - offset < DEVICE_STATE_BUFFER_HEADER_SIZE:
            raise Truncated("device-state buffer shorter than its header", field="length",
                            value=max(0, len(buf) - offset))
        version, idx, flags = _HDR.unpack_from(buf, offset)
        if version != DEVICE_STATE_BUFFER_VERSION:
            raise UnsupportedVersion("device-state buffer version", field="version",
                                     value=version)
        if idx == _IDX_INVALID:
            raise BadCount("invalid device-state buffer index", field="idx", value=idx)
        if flags & ~_KNOWN_FLAGS:
            raise BadRecordType("unknown device-state buffer flags", field="flags",
                                value=flags)
        return cls(idx=idx, flags=flags, version=version)
