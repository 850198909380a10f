"""Non-RAM sections: our Python devices and QEMU's `globalstate`, both directions.

QEMU sections carry no length (qemu-reference.md 1.5): a loader must know each device's
layout. Our devices' bodies are one VMState-style buffer with a be32 length in front, so
our decoder can delimit them by idstr; `globalstate` is QEMU's own (be32 size + 100-byte
run-state buffer, migration/global_state.c), which tells the destination whether to run.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from multifd.migration.handlers import LoadHandler, SaveHandler
from multifd.wire.constants import SectionType

if TYPE_CHECKING:
    from multifd.machine.device import Device

GLOBALSTATE_IDSTR = "globalstate"
GLOBALSTATE_SIZE = 104
MIG_PRI_GLOBALSTATE = -1  # after every device: the last FULL section, as we always sent it
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


class DeviceSaveHandler(SaveHandler):
    """One device on the main stream: START/PART/END sections when live, FULL otherwise."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.idstr = device.idstr
        self.instance_id = device.instance_id
        self.version_id = device.version_id
        self.live = device.is_live()
        self.done = False
        self.full_size: int | None = None
        self.main_bytes = 0  # device data written to the main stream (bodies, no headers)

    def is_live(self) -> bool:
        return self.live

    def _section(self, kind: SectionType, data: bytes) -> None:
        self.write_section(kind, encode_body(data))
        self.main_bytes += len(data)

    def setup(self) -> None:
        if self.live:
            self._section(SectionType.START, self.device.save_setup())

    def pending(self, exact: bool = False) -> tuple[int, int]:
        return (self.device.pending() if self.live and not self.done else 0), 0

    def iterate(self, final: bool) -> bool:
        if self.done:
            return True
        if not self.live:  # non-iterable: one FULL section at switchover
            self._write_full()
            self.done = True
            return True
        if not final and self.device.pending() == 0:
            return True
        data, done = self.device.save_iterate(final)
        if final and done:
            self._section(SectionType.END, data)
            self.done = True
        elif data:
            self._section(SectionType.PART, data)
        return done

    def _write_full(self) -> None:
        data = self.device.save_state()
        self.full_size = 4 + len(data)
        self._section(SectionType.FULL, data)

    def vmdesc(self) -> dict[str, Any] | None:
        if self.full_size is None:
            return None
        return vmdesc_entry(self.idstr, self.instance_id, self.version_id, self.full_size)

    def stats(self) -> dict[str, int]:
        return {"device_state_main_bytes": self.main_bytes}


class GlobalStateSaveHandler(SaveHandler):
    """QEMU's `globalstate` (migration/global_state.c): the run state the destination
    resumes into, the last FULL section."""

    idstr = GLOBALSTATE_IDSTR
    priority = MIG_PRI_GLOBALSTATE

    def __init__(self, runstate: str) -> None:
        self.runstate = runstate

    def iterate(self, final: bool) -> bool:
        self.write_section(SectionType.FULL, [encode_globalstate(self.runstate)])
        return True

    def vmdesc(self) -> dict[str, Any] | None:
        return vmdesc_entry(GLOBALSTATE_IDSTR, 0, 1, GLOBALSTATE_SIZE, fields=[
            {"name": "size", "type": "uint32", "size": 4},
            {"name": "runstate", "type": "buffer", "size": 100}])


class DeviceLoadHandler(LoadHandler):
    """Destination side of a device's main-stream sections."""

    def __init__(self, device: Device, on_setup: Callable[[Device], None] | None = None) -> None:
        self.device = device
        self.idstr = device.idstr
        self.instance_id = device.instance_id
        self.version_id = device.version_id
        self._on_setup = on_setup
        self.main_bytes = 0

    def stats(self) -> dict[str, int]:
        return {"device_state_main_bytes": self.main_bytes}

    def load_state(self, kind: SectionType, version_id: int, data: Any) -> None:
        self.main_bytes += len(data)
        if kind == SectionType.FULL:
            self.device.load_state(data, version_id)
        elif kind == SectionType.START:
            self.device.load_setup(data)
            if self._on_setup is not None:  # a live device's load job may start now
                self._on_setup(self.device)
        else:
            self.device.load_iterate(data)


class GlobalStateLoadHandler(LoadHandler):
    """Reads the source's run state: the destination runs only if the source was running."""

    idstr = GLOBALSTATE_IDSTR
    runstate: str | None = None

    def load_state(self, kind: SectionType, version_id: int, data: Any) -> None:
        self.runstate = decode_globalstate(data)


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
