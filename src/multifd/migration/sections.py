"""Non-RAM sections: our Python devices and QEMU's `globalstate`, both directions.

QEMU sections carry no length (qemu-reference.md 1.5): a loader must know each device's
layout. Our devices' bodies are one VMState-style buffer with a be32 length in front, so
our decoder can delimit them by idstr; `globalstate` is QEMU's own (be32 size + 100-byte
run-state buffer, migration/global_state.c), which tells the destination whether to run.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from multifd.wire.constants import SectionType
from multifd.wire.stream import SectionFooter, SectionHeader, encode_record

if TYPE_CHECKING:
    from multifd.machine.device import Device
    from multifd.migration.mainstream import MainStreamWriter

GLOBALSTATE_IDSTR = "globalstate"
GLOBALSTATE_SIZE = 104
_U32 = struct.Struct(">I")


def encode_body(data: bytes) -> list[bytes]:
    """A length-prefixed device body (be32 length, then the bytes)."""
    if len(data) > 0xFFFFFFFF:
        raise ValueError("device section larger than 4 GiB")
    return [_U32.pack(len(data)), data]


def encode_globalstate(runstate: str) -> bytes:
    name = runstate.encode()[:99]
    return _U32.pack(len(name) + 1) + name.ljust(100, b"\x00")


def decode_globalstate(body: bytes) -> str:
    if len(body) != GLOBALSTATE_SIZE:
        raise ValueError(f"globalstate body is {len(body)} bytes, expected {GLOBALSTATE_SIZE}")
    (size,) = _U32.unpack_from(body)
    raw = body[4 : 4 + min(size, 100)]
    return raw.split(b"\x00", 1)[0].decode("ascii", "replace")


def vmdesc_entry(
    idstr: str,
    instance_id: int,
    version: int,
    size: int,
    fields: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One device of the VMDESCRIPTION JSON, in QEMU's shape."""
    return {
        "name": idstr,
        "instance_id": instance_id,
        "vmsd_name": idstr,
        "version": version,
        "fields": fields
        or [
            {"name": "size", "type": "uint32", "size": 4},
            {"name": "data", "type": "buffer", "size": size - 4},
        ],
    }


class DeviceSaveHandler:
    """Writes one device's sections: START/PART/END when live, FULL otherwise."""

    def __init__(
        self, device: Device, section_id: int, main: MainStreamWriter, *,
        multifd_state: bool = False,
    ) -> None:
        self.device = device
        self.section_id = section_id
        self.main = main
        self.live = device.is_live()
        # Bulk state goes as multifd buffers (migration/device_state.py); the main stream
        # then carries only START (setup) and an empty END, like VFIO's dummy end-of-state.
        self.multifd_state = multifd_state
        self.done = not self.live
        self.full_size: int | None = None

    def _section(self, kind: SectionType, data: bytes, *, named: bool) -> None:
        d = self.device
        if named:
            hdr = SectionHeader(kind, self.section_id, d.idstr, d.instance_id, d.version_id)
        else:
            hdr = SectionHeader(kind, self.section_id)
        self.main.write(encode_record(hdr))
        for part in encode_body(data):
            self.main.write(part)
        self.main.write(encode_record(SectionFooter(self.section_id)))

    def pending(self) -> int:
        return self.device.pending() if self.live and not self.done else 0

    def save_setup(self) -> None:
        if self.live:
            self._section(SectionType.START, self.device.save_setup(), named=True)

    def iterate(self, final: bool) -> None:
        if not self.live or self.done or (not final and self.device.pending() == 0):
            return
        if self.multifd_state:
            if final:
                self._section(SectionType.END, b"", named=False)
                self.done = True
            return
        data, done = self.device.save_iterate(final)
        if final and done:
            self._section(SectionType.END, data, named=False)
            self.done = True
        elif data:
            self._section(SectionType.PART, data, named=False)

    def complete(self) -> None:
        """Switchover: iterate with final=True until the device reports done."""
        while self.live and not self.done:
            self.iterate(final=True)

    def save_full(self) -> None:
        if self.live:
            return
        data = self.device.save_state()
        self.full_size = 4 + len(data)
        self._section(SectionType.FULL, data, named=True)


class _FixedBody:
    """A body of known size (QEMU's globalstate is 104 bytes)."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size

    def read(self, buf: Any, limit: int) -> bytes:
        return bytes(buf.take(self.size))

    def encode(self, data: bytes) -> bytes:
        if len(data) != self.size:
            raise ValueError(f"{self.name} body must be {self.size} bytes")
        return data


GLOBALSTATE_BODY = _FixedBody(GLOBALSTATE_IDSTR, GLOBALSTATE_SIZE)
