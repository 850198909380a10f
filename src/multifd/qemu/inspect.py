"""Offline inspection of recorded QEMU migrations: rebuild guest RAM, list what is inside.

Input: one main stream (a `migrate "exec:cat > f"` file, a recorded main connection or a
mapped-ram file) and any number of recorded multifd connections (any order: the init
packet's channel id identifies each).

Ordering follows QEMU's destination (qemu-reference.md §3.6): the main stream is applied in
order; each sync marker on it (RAM EOS with 7.2 / legacy per-section sync, MULTIFD_FLUSH
0x200 with HEAD's per-round sync) releases, on every channel, the packets up to and
including that channel's next SYNC packet. Packets after the last SYNC are applied at the
end. A 7.2 SYNC packet may carry pages (applied, then the SYNC counts); page-less packets
only count. Pages are placed per packet with numpy fancy indexing, not a per-page loop.
"""

from __future__ import annotations

import gzip
import mmap
import os
import stat
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multifd.compress import Decompressor, get_method
from multifd.wire.buffer import NEED_DATA
from multifd.wire.constants import Command, SectionType
from multifd.wire.errors import (
    BadLength,
    BadName,
    BadOffset,
    Mismatch,
    Truncated,
    WireError,
    lookup,
)
from multifd.wire.mapped_ram import bitmap_size, bitmap_to_pages
from multifd.wire.packet import (
    ChannelDecoder,
    DeviceStatePacket,
    EndOfChannel,
    InitPacket,
    RamPacket,
)
from multifd.wire.ram import (
    RamBlockInfo,
    RamCompressedPage,
    RamEos,
    RamMemSize,
    RamMultifdFlush,
    RamPage,
    RamXbzrle,
    RamZero,
)
from multifd.wire.stream import (
    CommandRecord,
    Configuration,
    DeviceTail,
    FileHeader,
    MainStreamDecoder,
    SectionFooter,
    SectionHeader,
    VmDescription,
)
from multifd.wire.vmdesc import checked_vmdesc, find_vmdesc, parse_vmdesc_json, split_device_tail

__all__ = [
    "ChannelStats",
    "InspectError",
    "InspectResult",
    "PacketInfo",
    "SectionInfo",
    "inspect_files",
    "inspect_streams",
    "load_input",
]

CHUNK = 1 << 20
MAX_GUNZIP = 1 << 34  # a .gz main stream is unpacked into memory, at most this much


class InspectError(Exception):
    """A WireError tied to the file it happened in (for the one-line CLI message)."""

    def __init__(self, error: WireError, file: str) -> None:
        self.error = error
        self.file = file
        super().__init__(self.line())

    def line(self) -> str:
        at = self.error.offset if self.error.offset is not None else 0
        return f"{self.error.describe()}, at byte {at} of {self.file}"


@dataclass(frozen=True, slots=True)
class PacketInfo:
    offset: int
    packet_num: int
    flags: int
    pages_alloc: int
    normal_pages: int
    zero_pages: int
    next_packet_size: int
    payload_len: int
    ramblock: str
    is_sync: bool


@dataclass
class ChannelStats:
    id: int
    file: str
    uuid: bytes = b""
    layout: str = ""
    packets: int = 0
    sync_packets: int = 0
    device_state_packets: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    compression: str = "none"
    payload_bytes: int = 0
    packet_log: list[PacketInfo] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SectionInfo:
    kind: str
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    offset: int
    size: int


@dataclass
class InspectResult:
    main_file: str
    stream_version: int = 0
    configuration: Configuration | None = None
    ram_total: int = 0
    ram_blocks: list[RamBlockInfo] = field(default_factory=list)
    sync_mode: str = "none"  # "per-section" (EOS), "per-round" (MULTIFD_FLUSH), "none"
    sync_markers: int = 0
    main_normal_pages: int = 0
    main_zero_pages: int = 0
    mapped_ram_pages: int = 0
    mapped_ram_present: dict[str, int] = field(default_factory=dict)  # bits set, per block
    channels: list[ChannelStats] = field(default_factory=list)
    sections: list[SectionInfo] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    tail_offset: int | None = None
    tail_size: int = 0
    tail_split: bool = False
    vmdesc_size: int | None = None
    ram: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def machine(self) -> str | None:
        return self.configuration.machine if self.configuration else None

    @property
    def normal_pages(self) -> int:
        return (self.main_normal_pages + self.mapped_ram_pages
                + sum(c.normal_pages for c in self.channels))

    @property
    def zero_pages(self) -> int:
        return self.main_zero_pages + sum(c.zero_pages for c in self.channels)

    def block_content(self, name: str) -> np.ndarray:
        """The block's final content (never-sent pages are zero)."""
        info = next((b for b in self.ram_blocks if b.name == name), None)
        if info is None:
            raise KeyError(name)
        arr = self.ram.get(name)
        if arr is None:
            return np.zeros(info.used_length, dtype=np.uint8)
        return arr[: info.used_length]

    def to_json(self) -> dict[str, Any]:
        cfg = self.configuration
        return {
            "main_stream": self.main_file,
            "stream_version": self.stream_version,
            "machine": self.machine,
            "capabilities": list(cfg.capabilities or ()) if cfg else [],
            "uuid": cfg.uuid.hex() if cfg and cfg.uuid else None,
            "ram_total": self.ram_total,
            "ram_blocks": [
                {"name": b.name, "used_length": b.used_length,
                 **({"mapped_ram": {"bitmap_offset": b.mapped_ram.bitmap_offset,
                                    "pages_offset": b.mapped_ram.pages_offset}}
                    if b.mapped_ram is not None else {})}
                for b in self.ram_blocks
            ],
            "normal_pages": self.normal_pages,
            "zero_pages": self.zero_pages,
            "main_stream_pages": {"normal": self.main_normal_pages,
                                  "zero": self.main_zero_pages},
            "mapped_ram_pages": self.mapped_ram_pages,
            "mapped_ram_present": self.mapped_ram_present,
            "sync_mode": self.sync_mode,
            "sync_markers": self.sync_markers,
            "channels": [
                {"id": c.id, "file": c.file, "packets": c.packets,
                 "sync_packets": c.sync_packets, "device_state_packets": c.device_state_packets,
                 "normal_pages": c.normal_pages, "zero_pages": c.zero_pages,
                 "compression": c.compression, "layout": c.layout,
                 "payload_bytes": c.payload_bytes}
                for c in self.channels
            ],
            "sections": [
                {"idstr": s.idstr, "instance_id": s.instance_id, "version_id": s.version_id,
                 "kind": s.kind, "section_id": s.section_id, "offset": s.offset,
                 "size": s.size}
                for s in self.sections
            ],
            "commands": self.commands,
            "device_tail": None if self.tail_offset is None else {
                "offset": self.tail_offset, "size": self.tail_size, "split": self.tail_split},
            "vmdesc_size": self.vmdesc_size,
            "devices": self.devices,
        }


# --------------------------------------------------------------------------- inputs


def load_input(path: str | os.PathLike[str]) -> bytes | mmap.mmap:
    """The file's bytes: mmap for plain files, unpacked in memory for gzip files."""
    p = Path(path)
    with p.open("rb") as f:
        head = f.read(2)
        if head == b"\x1f\x8b":
            f.seek(0)
            try:
                with gzip.GzipFile(fileobj=f) as gz:
                    data = gz.read(MAX_GUNZIP + 1)
            except EOFError:  # malformed input (exit 2), not an I/O error
                raise InspectError(Truncated("gzip stream ends before its end-of-stream "
                                             "marker", offset=f.tell()), str(p)) from None
            except (gzip.BadGzipFile, zlib.error) as e:
                raise InspectError(WireError(f"not a valid gzip stream ({e})"), str(p)) from None
            if len(data) > MAX_GUNZIP:
                raise OSError(f"{p}: unpacked gzip stream is too large")
            return data
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # a pipe: read it, bounded
            data = head + f.read(MAX_GUNZIP + 1)
            if len(data) > MAX_GUNZIP:
                raise OSError(f"{p}: stream from a pipe is too large (read it from a file)")
            return data
        if p.stat().st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _chunks(data: bytes | mmap.mmap) -> Iterator[memoryview]:
    mv = memoryview(data)
    for i in range(0, len(mv), CHUNK):
        yield mv[i : i + CHUNK]


# --------------------------------------------------------------------------- RAM image


class _Ram:
    """Lazily allocated numpy arrays, one per block (np.zeros: untouched pages cost nothing)."""

    def __init__(self, result: InspectResult, page_size: int) -> None:
        self.result = result
        self.ps = page_size
        self.lengths: dict[str, int] = {}

    def set_blocks(self, blocks: Sequence[RamBlockInfo]) -> None:
        for b in blocks:
            self.lengths[b.name] = b.used_length

    def pages(self, block: str, *, record: str, offset: int | None = None) -> np.ndarray:
        """The block as rows of pages. ``block`` comes from the stream: a name the MEM_SIZE
        list did not declare is an UnknownName naming ``record`` (never a KeyError)."""
        arr = self.result.ram.get(block)
        if arr is None:
            used = lookup(self.lengths, block, kind="RAM block", field="block",
                          record=record, offset=offset)
            n = -(-used // self.ps)
            arr = np.zeros(n * self.ps, dtype=np.uint8)
            self.result.ram[block] = arr
        return arr.reshape(-1, self.ps)

    def page(self, block: str, addr: int, *, record: str, offset: int) -> np.ndarray:
        """One page of a main-stream record, its offset checked against the final block
        list (pages decoded before a later MEM_SIZE were checked against the old one)."""
        pages = self.pages(block, record=record, offset=offset)
        if addr % self.ps or addr + self.ps > self.lengths[block]:
            raise BadOffset(f"{record} page offset outside RAM block {block!r}",
                            field="offset", value=addr, offset=offset)
        return pages[addr // self.ps]


def _uleb(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 28:
            raise BadLength("bad XBZRLE run length")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def xbzrle_apply(page: np.ndarray, data: bytes) -> None:
    """Apply an XBZRLE delta (runs of: uleb unchanged, uleb new, new bytes) to one page."""
    pos = out = 0
    size = len(page)
    while pos < len(data):
        skip, pos = _uleb(data, pos)
        out += skip
        if pos >= len(data):
            break
        n, pos = _uleb(data, pos)
        if out + n > size or pos + n > len(data):
            raise BadLength("XBZRLE run beyond the page")
        page[out : out + n] = np.frombuffer(data, dtype=np.uint8, count=n, offset=pos)
        out += n
        pos += n
    if out > size:
        raise BadLength("XBZRLE delta beyond the page")


# --------------------------------------------------------------------------- channels


class _Channel:
    def __init__(self, name: str, data: bytes | mmap.mmap, blocks: dict[str, int],
                 ram: _Ram, page_size: int) -> None:
        self.name = name
        self.dec = ChannelDecoder(None, page_size, blocks=blocks)
        self._chunks = _chunks(data)
        self.ram = ram
        self.ps = page_size
        self.decompressor: Decompressor | None = None
        self.method_flag: int | None = None
        self.ended = False
        self.stats = ChannelStats(-1, name)
        init = self._event()
        if not isinstance(init, InitPacket):
            raise InspectError(Truncated("multifd channel without an init packet", offset=0),
                               name)
        self.stats.id = init.channel_id
        self.stats.uuid = init.uuid

    def _event(self) -> object:
        try:
            while True:
                ev = self.dec.next_event()
                if ev is not NEED_DATA:
                    return ev
                chunk = next(self._chunks, None)
                if chunk is None:
                    self.dec.receive_eof()
                else:
                    self.dec.receive_data(chunk)
        except WireError as e:
            raise InspectError(e, self.name) from None

    def run(self, until_sync: bool, marker: int = 0) -> None:
        while not self.ended:
            ev = self._event()
            if isinstance(ev, EndOfChannel):
                self.ended = True
                if until_sync:
                    raise InspectError(
                        Mismatch(f"multifd channel {self.stats.id} ended before the SYNC "
                                 f"for main-stream sync marker {marker}", offset=ev.length),
                        self.name)
                return
            if isinstance(ev, DeviceStatePacket):
                self.stats.device_state_packets += 1
                self.stats.packets += 1
                continue
            assert isinstance(ev, RamPacket)
            try:
                self._apply(ev)
            except WireError as e:
                raise InspectError(e.at(ev.offset), self.name) from None
            if ev.header.is_sync and until_sync:
                return

    def _apply(self, pkt: RamPacket) -> None:
        h = pkt.header
        st = self.stats
        st.packets += 1
        st.layout = h.layout.value
        if h.is_sync:
            st.sync_packets += 1
        st.packet_log.append(PacketInfo(pkt.offset, h.packet_num, h.flags, h.pages_alloc,
                                        h.normal_pages, h.zero_pages, h.next_packet_size,
                                        len(pkt.payload), h.ramblock, h.is_sync))
        normal, zero = h.normal_pages, h.zero_pages
        if not normal and not zero:
            return  # SYNC-only or an empty 7.2 packet: its other fields are stale
        if normal or h.compression:
            self._check_method(h.compression)
        pages = self.ram.pages(h.ramblock, record=f"multifd packet {h.packet_num}",
                               offset=pkt.offset)
        if normal:
            idx = (h.normal_offsets // np.uint64(self.ps)).astype(np.intp)
            st.payload_bytes += len(pkt.payload)
            if self.method_flag == 0:
                src = np.frombuffer(pkt.payload, dtype=np.uint8).reshape(normal, self.ps)
            else:
                assert self.decompressor is not None
                out = np.empty(normal * self.ps, dtype=np.uint8)
                self.decompressor.decompress_packet(pkt.payload, memoryview(out))
                src = out.reshape(normal, self.ps)
            pages[idx] = src
            st.normal_pages += normal
        if zero:
            zidx = (h.zero_offsets // np.uint64(self.ps)).astype(np.intp)
            pages[zidx] = 0
            st.zero_pages += zero

    def _check_method(self, flag: int) -> None:
        if self.method_flag is None:
            try:
                method = get_method(flag)
            except ValueError:
                raise Mismatch("unsupported multifd compression", field="flags",
                               value=flag) from None
            self.method_flag = flag
            self.decompressor = method.new_decompressor()
            self.stats.compression = method.name
        elif flag != self.method_flag:
            raise Mismatch(f"compression flags {flag:#x} differ from the channel's "
                           f"{self.method_flag:#x}", field="flags", value=flag)


# --------------------------------------------------------------------------- main stream


_KIND: dict[int, str] = {SectionType.START: "start", SectionType.PART: "part",
                         SectionType.END: "end", SectionType.FULL: "full"}


def _decode_main(name: str, data: bytes | mmap.mmap, result: InspectResult) -> tuple[
        list[tuple[int, object]], bytes]:
    """Decode the main stream; return the RAM operations in order (with the offset of each
    record, for errors found when they are applied) and the device tail."""
    dec = MainStreamDecoder()
    ops: list[tuple[int, object]] = []
    tail = bytearray()
    open_sec: tuple[SectionHeader, int] | None = None
    starts: dict[int, SectionHeader] = {}
    vmdesc_raw: bytes | None = None

    def drain() -> None:
        nonlocal open_sec, vmdesc_raw
        while True:
            at = dec.offset
            rec = dec.next_record()
            if rec is NEED_DATA:
                return
            if isinstance(rec, RamZero | RamPage | RamXbzrle | RamCompressedPage | RamEos
                          | RamMultifdFlush):
                ops.append((at, rec))
            elif isinstance(rec, DeviceTail):
                tail.extend(rec.data)
            elif isinstance(rec, SectionHeader):
                open_sec = (rec, at)
                if rec.type in (SectionType.START, SectionType.FULL):
                    starts[rec.section_id] = rec
            elif isinstance(rec, SectionFooter):
                if open_sec is None:  # the decoder pairs them; never an assert on input
                    raise Mismatch("section footer without an open section",
                                   field="section_id", value=rec.section_id, offset=at)
                hdr, start = open_sec
                first = starts.get(hdr.section_id, hdr)
                result.sections.append(SectionInfo(
                    _kind(hdr.type), hdr.section_id, first.idstr, first.instance_id,
                    first.version_id, start, dec.offset - start))
                open_sec = None
            elif isinstance(rec, RamMemSize):
                result.ram_total = rec.total
                result.ram_blocks = list(rec.blocks)
                ops.append((at, rec))
            elif isinstance(rec, FileHeader):
                result.stream_version = rec.version
            elif isinstance(rec, Configuration):
                result.configuration = rec
            elif isinstance(rec, CommandRecord):
                try:
                    result.commands.append(Command(rec.cmd).name)
                except ValueError:
                    result.commands.append(str(rec.cmd))
            elif isinstance(rec, VmDescription):
                vmdesc_raw = rec.json

    try:
        for chunk in _chunks(data):
            dec.receive_data(chunk)
            drain()
        dec.receive_eof()
        drain()
        result.tail_offset = dec.tail_offset
        result.tail_size = len(tail)
        if vmdesc_raw is not None:
            result.vmdesc_size = len(vmdesc_raw)
            # the stream ends with the record: 0x06, be32 length, the JSON
            _set_devices(result, checked_vmdesc(parse_vmdesc_json(vmdesc_raw),
                                                 dec.offset - len(vmdesc_raw) - 5))
        if dec.tail_offset is not None:
            _split_tail(bytes(tail), dec.tail_offset, result)
    except WireError as e:
        raise InspectError(e, name) from None
    return ops, bytes(tail)


def _kind(t: int) -> str:
    return _KIND.get(t, str(t))


def _set_devices(result: InspectResult, vmdesc: dict[str, Any]) -> None:
    result.devices = [
        {"name": d.get("name"), "instance_id": d.get("instance_id"),
         "vmsd_name": d.get("vmsd_name"), "version": d.get("version")}
        for d in vmdesc.get("devices", []) if isinstance(d, dict)
    ]


def _split_tail(tail: bytes, base: int, result: InspectResult) -> None:
    found = find_vmdesc(tail)
    if found is None:
        # QEMU ends a stream with EOF (0x00), then the vmdesc unless suppress-vmdesc is on:
        # a tail that ends in neither was cut short.
        if not tail.endswith(b"\x00"):
            raise Truncated("stream ended inside the device sections (no QEMU_VM_EOF or "
                            "VMDESCRIPTION at its end)", offset=base + len(tail))
        return
    off, vmdesc = found
    result.vmdesc_size = len(tail) - off - 5
    vmdesc = checked_vmdesc(vmdesc, base + off)
    _set_devices(result, vmdesc)
    split = split_device_tail(tail, vmdesc, base_offset=base)
    result.tail_split = split.split
    for s in split.sections:
        result.sections.append(SectionInfo(_kind(s.type), s.section_id, s.idstr,
                                           s.instance_id, s.version_id, s.offset, s.size))


_RECORD_NAME = {RamZero: "ZERO record", RamPage: "PAGE record", RamXbzrle: "XBZRLE record",
                RamCompressedPage: "COMPRESS_PAGE record"}


def _apply_main_op(at: int, op: object, ram: _Ram, result: InspectResult) -> None:
    ps = ram.ps
    assert isinstance(op, RamZero | RamPage | RamXbzrle | RamCompressedPage)
    page = ram.page(op.block, op.offset, record=_RECORD_NAME[type(op)], offset=at)
    if isinstance(op, RamZero):
        page[:] = op.fill
        result.main_zero_pages += 1
        return
    if isinstance(op, RamPage):
        page[:] = np.frombuffer(op.data, dtype=np.uint8)
    elif isinstance(op, RamCompressedPage):
        try:
            raw = zlib.decompress(op.data, bufsize=ps)
        except zlib.error:
            raise BadLength("COMPRESS_PAGE payload is not a zlib stream") from None
        if len(raw) != ps:
            raise BadLength("COMPRESS_PAGE does not inflate to one page", field="len",
                            value=len(raw))
        page[:] = np.frombuffer(raw, dtype=np.uint8)
    elif isinstance(op, RamXbzrle):
        xbzrle_apply(page, op.data)
    result.main_normal_pages += 1


def inspect_streams(
    main: tuple[str, bytes | mmap.mmap],
    channels: Sequence[tuple[str, bytes | mmap.mmap]] = (),
    *,
    page_size: int = 4096,
) -> InspectResult:
    """Decode a main stream and its multifd channels and rebuild the RAM blocks."""
    name, data = main
    result = InspectResult(name)
    ops, _tail = _decode_main(name, data, result)
    ram = _Ram(result, page_size)
    ram.set_blocks(result.ram_blocks)
    lengths = dict(ram.lengths)

    chans: dict[int, _Channel] = {}
    for cname, cdata in channels:
        ch = _Channel(cname, cdata, lengths, ram, page_size)
        if ch.stats.id in chans:
            raise InspectError(Mismatch(f"two files for multifd channel {ch.stats.id}",
                                        field="channel_id", value=ch.stats.id, offset=24),
                               cname)
        chans[ch.stats.id] = ch
    ordered = [chans[k] for k in sorted(chans)]
    result.channels = [c.stats for c in ordered]

    per_round = any(isinstance(op, RamMultifdFlush) for _, op in ops)
    marker_type = RamMultifdFlush if per_round else RamEos
    has_channels = bool(ordered)
    result.sync_mode = "per-round" if per_round else ("per-section" if has_channels else "none")
    for at, op in ops:
        if isinstance(op, marker_type):
            result.sync_markers += 1
            for ch in ordered:
                ch.run(until_sync=True, marker=result.sync_markers)
        elif isinstance(op, RamMemSize):
            continue
        elif not isinstance(op, RamEos | RamMultifdFlush):
            try:
                _apply_main_op(at, op, ram, result)
            except WireError as e:
                raise InspectError(e, name) from None
    for ch in ordered:
        ch.run(until_sync=False)
    if not has_channels and not per_round:
        result.sync_markers = 0
    _apply_mapped_ram(name, data, ram, result)
    return result


def _apply_mapped_ram(name: str, data: bytes | mmap.mmap, ram: _Ram,
                      result: InspectResult) -> None:
    ps = ram.ps
    for b in result.ram_blocks:
        mr = b.mapped_ram
        if mr is None or (mr.pages_offset == 0 and mr.bitmap_offset == 0):
            continue
        if mr.page_size != ps:
            raise InspectError(Mismatch("mapped-ram page size", field="page_size",
                                        value=mr.page_size), name)
        npages = b.used_length // ps
        bsize = bitmap_size(npages)
        if mr.bitmap_offset + bsize > len(data):
            raise InspectError(Truncated("mapped-ram bitmap beyond the end of the file",
                                         field="block", value=b.name, offset=len(data)), name)
        mask = bitmap_to_pages(memoryview(data)[mr.bitmap_offset : mr.bitmap_offset + bsize],
                               npages)
        idx = np.flatnonzero(mask)
        result.mapped_ram_present[b.name] = len(idx)
        if not len(idx):
            continue
        if mr.pages_offset + npages * ps > len(data):
            raise InspectError(BadOffset("mapped-ram pages beyond the end of the file",
                                         field="block", value=b.name, offset=len(data)), name)
        src = np.frombuffer(data, dtype=np.uint8, count=npages * ps,
                            offset=mr.pages_offset).reshape(npages, ps)
        ram.pages(b.name, record="mapped-ram block", offset=mr.bitmap_offset)[idx] = src[idx]
        result.mapped_ram_pages += len(idx)


def inspect_files(
    main: str | os.PathLike[str], channels: Sequence[str | os.PathLike[str]] = ()
) -> InspectResult:
    """inspect_streams() on files (OSError for unreadable files, InspectError for bad data)."""
    main_data = load_input(main)
    chan_data = [(str(c), load_input(c)) for c in channels]
    return inspect_streams((str(main), main_data), chan_data)


def resolve_dump_spec(spec: str, blocks: Sequence[str]) -> tuple[str, str]:
    """Split "BLOCK:OUTFILE" where BLOCK may itself contain colons (PCI ids)."""
    for i, ch in enumerate(spec):
        if ch == ":" and spec[:i] in blocks and spec[i + 1 :]:
            return spec[:i], spec[i + 1 :]
    raise BadName("unknown RAM block in --dump-ram (expected BLOCK:OUTFILE)", field="spec",
                  value=spec)
