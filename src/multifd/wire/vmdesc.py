"""The VMDESCRIPTION trailer and splitting the opaque device tail with it (savevm.c §1.7).

Trailer layout: ... 0x00 (QEMU_VM_EOF), 0x06, be32 len, len bytes of JSON, end of stream.
The JSON lists the non-iterable devices in the order they were saved:
`{"page_size": N, "devices": [{"name": idstr, "instance_id": n, ...}, ...]}` (HEAD puts a
"configuration" member first). QEMU sections carry no length, so a section of the tail ends
where its footer `7E <be32 id>` is immediately followed by the next expected section
header `04 <be32 any> <counted next idstr> <be32 next instance>`, or by 0x00 (EOF) after
the last device. This is the same trick QEMU's analyze-migration.py relies on.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from multifd.wire.constants import SectionType
from multifd.wire.errors import BadLength, BadName, Mismatch, WireError

__all__ = [
    "DeviceSection",
    "TailSplit",
    "find_vmdesc",
    "parse_vmdesc_json",
    "split_device_tail",
]

_U32 = struct.Struct(">I")
DEFAULT_MAX_VMDESC = 64 * 1024 * 1024


def parse_vmdesc_json(raw: bytes, *, limit: int = DEFAULT_MAX_VMDESC) -> dict[str, Any]:
    """Parse the JSON with a size limit; it must be an object with a "devices" list."""
    if len(raw) > limit:
        raise BadLength("VMDESCRIPTION above the limit", field="len", value=len(raw))
    try:
        obj = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadName(f"VMDESCRIPTION is not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("devices", []), list):
        raise BadName("VMDESCRIPTION is not an object with a devices list")
    return obj


def find_vmdesc(
    data: bytes | bytearray | memoryview, *, limit: int = DEFAULT_MAX_VMDESC
) -> tuple[int, dict[str, Any]] | None:
    """Locate the trailing `0x06 be32 len json` that runs exactly to the end of data.

    Returns (offset of the 0x06 byte, parsed JSON) or None. The byte before it must be the
    EOF marker 0x00.
    """
    mv = memoryview(data)
    end = len(mv)
    lo = max(1, end - 5 - limit)
    raw = bytes(mv[lo - 1 :]) if lo > 1 else bytes(mv)
    base = lo - 1 if lo > 1 else 0
    pos = len(raw)
    while True:
        pos = raw.rfind(b"\x00\x06", 0, pos)
        if pos < 0:
            return None
        p = base + pos + 1  # offset of 0x06
        if p + 5 <= end and _U32.unpack_from(mv, p + 1)[0] == end - p - 5:
            try:
                return p, parse_vmdesc_json(bytes(mv[p + 5 :]), limit=limit)
            except WireError:
                pass
        pos = pos  # continue the search strictly before this candidate
        if pos == 0:
            return None


@dataclass(frozen=True, slots=True)
class DeviceSection:
    """One section of the device tail; offset/size cover header..footer inclusive."""

    type: int
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    offset: int
    size: int
    body: bytes


@dataclass(frozen=True, slots=True)
class TailSplit:
    sections: tuple[DeviceSection, ...]
    eof_offset: int | None  # offset of the 0x00 after the last section (None: unsplit)
    vmdesc_offset: int | None  # offset of the 0x06 trailer, if any
    split: bool  # False: no vmdesc, the tail stays one opaque piece


def _header_at(tail: bytes, pos: int) -> tuple[int, int, str, int, int, int] | None:
    """(type, id, idstr, instance, version, body_start) of a START/FULL header at pos."""
    if pos + 6 > len(tail):
        return None
    t = tail[pos]
    if t not in (SectionType.START, SectionType.FULL):
        return None
    sid = _U32.unpack_from(tail, pos + 1)[0]
    n = tail[pos + 5]
    end = pos + 6 + n + 8
    if n == 0 or end > len(tail):
        return None
    idstr = tail[pos + 6 : pos + 6 + n].decode(errors="replace")
    inst, ver = struct.unpack_from(">II", tail, pos + 6 + n)
    return t, sid, idstr, inst, ver, end


def _next_header_bytes(name: str, instance: int) -> tuple[bytes, bytes]:
    raw = name.encode()
    return bytes((SectionType.FULL,)), bytes((len(raw),)) + raw + _U32.pack(instance)


def checked_vmdesc(vmdesc: dict[str, Any], offset: int | None = None) -> dict[str, Any]:
    """The vmdesc, once every device entry names its section: a string "name" and a u32
    "instance_id" (the tail is split by them; a null or a string there is a WireError)."""
    for i, d in enumerate(vmdesc.get("devices", [])):
        if not isinstance(d, dict):
            continue
        name, inst = d.get("name", ""), d.get("instance_id", 0)
        if not isinstance(name, str):
            raise BadName(f"VMDESCRIPTION device {i} has no string name", field="name",
                          value=repr(name)[:80], offset=offset)
        if isinstance(inst, bool) or not isinstance(inst, int) or not 0 <= inst < 1 << 32:
            raise BadName(f"VMDESCRIPTION device {i} ({name[:64]}) has no u32 instance_id",
                          field="instance_id", value=repr(inst)[:80], offset=offset)
    return vmdesc


def split_device_tail(
    tail: bytes, vmdesc: dict[str, Any] | None, *, base_offset: int = 0
) -> TailSplit:
    """Cut the tail into sections using the vmdesc device order; offsets get base_offset.

    Raises Mismatch/Truncated (with offsets) when a header or footer does not line up.
    """
    found = find_vmdesc(tail)
    vm_off = found[0] if found else None
    if vmdesc is None and found is not None:
        vmdesc = found[1]
    if vmdesc is None:
        return TailSplit((), None, None, False)
    checked_vmdesc(vmdesc, base_offset + vm_off if vm_off is not None else None)
    devices = [
        (str(d.get("name", "")), int(d.get("instance_id", 0)))
        for d in vmdesc.get("devices", [])
        if isinstance(d, dict)
    ]
    limit = vm_off - 1 if vm_off is not None else len(tail)
    sections: list[DeviceSection] = []
    pos = 0
    for i, (name, inst) in enumerate(devices):
        hdr = _header_at(tail, pos)
        if hdr is None:
            raise Mismatch("device tail: no section header where one was expected",
                           field="device", value=name, offset=base_offset + pos)
        t, sid, idstr, instance, version, body_start = hdr
        if (idstr, instance) != (name, inst):
            raise Mismatch(f"device tail: section is not the vmdesc's next device ({name})",
                           field="idstr", value=idstr, offset=base_offset + pos)
        footer = bytes((SectionType.FOOTER,)) + _U32.pack(sid)
        if i + 1 < len(devices):
            lead, rest = _next_header_bytes(*devices[i + 1])
        else:
            lead, rest = bytes((SectionType.EOF,)), b""
        search = body_start
        while True:
            f = tail.find(footer, search, limit)
            if f < 0:
                raise Mismatch("device tail: no footer followed by the vmdesc's next section",
                               field="idstr", value=idstr, offset=base_offset + pos)
            nxt = f + 5
            if rest:
                ok = tail[nxt : nxt + 1] == lead and tail[nxt + 5 : nxt + 5 + len(rest)] == rest
            else:
                ok = nxt == limit and tail[nxt : nxt + 1] == lead
            if ok:
                break
            search = f + 1
        sections.append(DeviceSection(t, sid, idstr, instance, version, base_offset + pos,
                                      nxt - pos, bytes(tail[body_start:f])))
        pos = nxt
    if pos >= len(tail) or tail[pos] != SectionType.EOF:
        raise Mismatch("device tail: no QEMU_VM_EOF after the last device", field="type",
                       value=tail[pos] if pos < len(tail) else None, offset=base_offset + pos)
    return TailSplit(tuple(sections), base_offset + pos,
                     None if vm_off is None else base_offset + vm_off, True)
