"""Multifd channel codecs: init packet, RAM packet (7.2 and HEAD layouts), device-state packet.

QEMU sources: migration/multifd.h, multifd.c, multifd-nocomp.c, multifd-device-state.c
(qemu-reference.md §3.2-3.4). All integers are big-endian.

MultiFDInit_t, first 64 bytes of every channel::

    0 be32 magic 0x11223344 | 4 be32 version 1 | 8 uuid[16] | 24 u8 id | 25 zero[39]

RAM packet, always header + the whole offset array (packet_len = 320 + 8*page_count)::

    0 be32 magic | 4 be32 version | 8 be32 flags | 12 be32 pages_alloc | 16 be32 normal_pages
    20 be32 next_packet_size | 24 be64 packet_num | 32 be32 zero_pages (HEAD; unused in 7.2)
    36 zero[28] | 64 ramblock[256] NUL-padded | 320 be64 offset[page_count]
    then next_packet_size payload bytes when the packet has normal pages

Device-state packet (HEAD 10.0+, flags == 0x40)::

    0 be32 magic | 4 be32 version | 8 be32 flags | 12 idstr[256] | 268 be32 instance_id
    272 be32 next_packet_size (> 0) | 276 payload

A connection is: init packet, then packets, each followed by its payload. `ChannelDecoder`
decodes one recorded or live connection incrementally (h11 style: `receive_data`,
`receive_eof`, `next_event`).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np

from multifd.wire.buffer import NEED_DATA, NeedData, ReceiveBuffer, _NeedDataType
from multifd.wire.constants import (
    MULTIFD_COMMON_HEADER_SIZE,
    MULTIFD_COMPRESSION_MASK_HEAD,
    MULTIFD_COMPRESSION_MASK_V7_2,
    MULTIFD_DEVICE_STATE_HEADER_SIZE,
    MULTIFD_IDSTR_SIZE,
    MULTIFD_INIT_PACKET_SIZE,
    MULTIFD_MAGIC,
    MULTIFD_MAX_COMPRESSED_PAYLOAD,
    MULTIFD_PACKET_HEADER_SIZE,
    MULTIFD_VERSION,
    TARGET_PAGE_SIZE,
    MultifdFlag,
    PacketLayout,
    page_count,
    ram_packet_len,
)
from multifd.wire.errors import (
    BadCount,
    BadLength,
    BadMagic,
    BadName,
    BadOffset,
    BadRecordType,
    Mismatch,
    Truncated,
    UnsupportedVersion,
    WireError,
)
from multifd.wire.ram_batch import be64_run_start

__all__ = [
    "DEFAULT_MAX_DEVICE_STATE_PAYLOAD",
    "ChannelDecoder",
    "DeviceStatePacket",
    "DeviceStatePacketHeader",
    "EndOfChannel",
    "InitPacket",
    "RamPacket",
    "RamPacketEncoder",
    "RamPacketHeader",
    "compression_mask",
    "decode_common_header",
    "decode_device_state_packet",
    "decode_ram_packet",
    "encode_device_state_header",
    "validate_init",
]

_INIT: Final = struct.Struct(">II16sB7x32x")
_COMMON: Final = struct.Struct(">III")
# flags, pages_alloc, normal, next_packet_size, packet_num, zero_pages(HEAD), unused, ramblock
_RAM: Final = struct.Struct(">IIIIIIQI28x256s")
_DEVSTATE: Final = struct.Struct(">III256sII")
_U32_MAX: Final = 0xFFFFFFFF
_U64_MAX: Final = 0xFFFFFFFFFFFFFFFF

assert _INIT.size == MULTIFD_INIT_PACKET_SIZE
assert _RAM.size == MULTIFD_PACKET_HEADER_SIZE
assert _DEVSTATE.size == MULTIFD_DEVICE_STATE_HEADER_SIZE

# Device buffers are opaque and may exceed the RAM payload limit (VFIO reads up to 1 MiB of
# data per buffer, plus its 12-byte header); this bound only stops lying lengths.
DEFAULT_MAX_DEVICE_STATE_PAYLOAD: Final = 64 * 1024 * 1024

_SYNC: Final = int(MultifdFlag.SYNC)
_DEVICE_STATE: Final = int(MultifdFlag.DEVICE_STATE)


def compression_mask(layout: PacketLayout) -> int:
    """The flags bits that hold the compression method (3 bits in 7.2, 5 in HEAD)."""
    return MULTIFD_COMPRESSION_MASK_V7_2 if layout is PacketLayout.V7_2 else (
        MULTIFD_COMPRESSION_MASK_HEAD
    )


def _name_from_field(raw: bytes) -> str:
    """A NUL-padded 256-byte name; byte 255 is treated as NUL as QEMU forces it."""
    end = raw.find(0, 0, MULTIFD_IDSTR_SIZE - 1)
    if end < 0:
        end = MULTIFD_IDSTR_SIZE - 1
    return raw[:end].decode("utf-8", "surrogateescape")


def _name_to_field(name: str, what: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) >= MULTIFD_IDSTR_SIZE or 0 in raw:
        raise ValueError(f"{what} {name!r} must be < 256 bytes without NUL")
    return raw


# --------------------------------------------------------------------------- init packet


@dataclass(frozen=True, slots=True)
class InitPacket:
    """MultiFDInit_t: the sender's UUID and this channel's id (0..channels-1)."""

    uuid: bytes
    channel_id: int

    def __post_init__(self) -> None:
        if len(self.uuid) != 16:
            raise ValueError("uuid must be 16 bytes")
        if not 0 <= self.channel_id <= 0xFF:
            raise ValueError("channel_id must fit in a u8")

    def encode(self) -> bytes:
        return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, bytes(self.uuid), self.channel_id)

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, *, offset: int = 0) -> InitPacket:
        """Decode the 64 bytes at buf[offset:]; validates magic and version only."""
        if len(buf) - offset < MULTIFD_INIT_PACKET_SIZE:
            raise Truncated("multifd init packet too short", field="length",
                            value=max(0, len(buf) - offset))
        magic, version, uuid, cid = _INIT.unpack_from(buf, offset)
        if magic != MULTIFD_MAGIC:
            raise BadMagic("not a multifd channel", field="magic", value=magic)
        if version != MULTIFD_VERSION:
            raise UnsupportedVersion("multifd init packet version", field="version",
                                     value=version)
        return cls(uuid=uuid, channel_id=cid)


def validate_init(
    pkt: InitPacket, *, uuid: bytes | None, channels: int, seen: set[int]
) -> None:
    """The receiver's checks on a channel's init packet; adds the id to `seen` if valid.

    uuid=None skips the UUID check (QEMU compares with its own, all zeros without -uuid).
    Stricter than QEMU's `id > channels`: id == channels is rejected too.
    """
    if uuid is not None and pkt.uuid != uuid:
        raise Mismatch(
            f"multifd channel uuid {pkt.uuid.hex()} differs from expected {bytes(uuid).hex()}",
            field="uuid", value=pkt.uuid,
        )
    if pkt.channel_id >= channels:
        raise BadCount(
            f"multifd channel id {pkt.channel_id} out of range for {channels} channels",
            field="channel_id", value=pkt.channel_id,
        )
    if pkt.channel_id in seen:
        raise Mismatch(f"multifd channel id {pkt.channel_id} connected twice",
                       field="channel_id", value=pkt.channel_id)
    seen.add(pkt.channel_id)


# --------------------------------------------------------------------------- common header


def decode_common_header(buf12: bytes | bytearray | memoryview) -> int:
    """Validate magic and version of the first 12 bytes of a packet; returns the flags."""
    if len(buf12) < MULTIFD_COMMON_HEADER_SIZE:
        raise Truncated("multifd packet header too short", field="length", value=len(buf12))
    magic, version, flags = _COMMON.unpack_from(buf12, 0)
    if magic != MULTIFD_MAGIC:
        raise BadMagic("bad multifd packet magic", field="magic", value=magic)
    if version != MULTIFD_VERSION:
        raise UnsupportedVersion("multifd packet version", field="version", value=version)
    return int(flags)


# --------------------------------------------------------------------------- RAM packet


@dataclass(slots=True, eq=False)
class RamPacketHeader:
    """A decoded RAM packet header.

    `offsets` (native uint64) holds only the used entries: normal pages first, then zero
    pages (HEAD). Stale fields of page-less 7.2 packets are kept as sent, not validated.
    Not frozen: a frozen dataclass costs ~2.5 us more per packet to build.
    """

    flags: int
    pages_alloc: int
    normal_pages: int
    next_packet_size: int
    packet_num: int
    zero_pages: int
    ramblock: str
    # None when run_start says it all: the array is then built on first use only (the
    # receive path of the common packet never needs it).
    explicit_offsets: np.ndarray | None
    layout: PacketLayout = PacketLayout.HEAD
    # offsets[0] when the used offsets are consecutive pages (the common packet: one run
    # of memory, no per-page work), else None.
    run_start: int | None = None
    page_size: int = TARGET_PAGE_SIZE

    @property
    def offsets(self) -> np.ndarray:
        if self.explicit_offsets is None:  # a run: run_start, +page_size, ...
            used = self.normal_pages + self.zero_pages
            self.explicit_offsets = (np.arange(used, dtype=np.uint64) * np.uint64(self.page_size)
                                     + np.uint64(self.run_start))
        return self.explicit_offsets

    @property
    def is_sync(self) -> bool:
        return bool(self.flags & _SYNC)

    @property
    def compression(self) -> int:
        """The compression method field (a MultifdFlag value, 0 = none)."""
        return self.flags & compression_mask(self.layout)

    @property
    def has_pages(self) -> bool:
        return self.normal_pages + self.zero_pages > 0

    @property
    def payload_size(self) -> int:
        """Bytes that follow the header: next_packet_size only when there are normal pages."""
        return self.next_packet_size if self.normal_pages else 0

    @property
    def normal_offsets(self) -> np.ndarray:
        return self.offsets[: self.normal_pages]

    @property
    def zero_offsets(self) -> np.ndarray:
        return self.offsets[self.normal_pages :]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RamPacketHeader):
            return NotImplemented
        return (
            self.flags == other.flags
            and self.pages_alloc == other.pages_alloc
            and self.normal_pages == other.normal_pages
            and self.next_packet_size == other.next_packet_size
            and self.packet_num == other.packet_num
            and self.zero_pages == other.zero_pages
            and self.ramblock == other.ramblock
            and self.layout == other.layout
            and np.array_equal(self.offsets, other.offsets)
        )

    __hash__ = None  # type: ignore[assignment]


def decode_ram_packet(
    buf: bytes | bytearray | memoryview,
    *,
    layout: PacketLayout,
    page_size: int = TARGET_PAGE_SIZE,
    blocks: Mapping[str, int] | None = None,
    max_payload: int = MULTIFD_MAX_COMPRESSED_PAYLOAD,
    compression_flag: int | None = None,
) -> RamPacketHeader:
    """Decode and validate one whole RAM packet (common header included, packet_len bytes).

    blocks maps block name -> used_length; when given, a packet with pages must name a known
    block and every used offset must lie inside it. compression_flag, when given, is the
    locally configured method, checked only for packets that carry pages (as QEMU does).
    """
    npages = page_count(page_size)
    plen = MULTIFD_PACKET_HEADER_SIZE + 8 * npages
    if len(buf) != plen:
        raise BadLength("RAM packet has the wrong size", field="length", value=len(buf))
    magic, version, flags, alloc, normal, nps, num, zero_raw, rb = _RAM.unpack_from(buf, 0)
    if magic != MULTIFD_MAGIC:
        raise BadMagic("bad multifd packet magic", field="magic", value=magic)
    if version != MULTIFD_VERSION:
        raise UnsupportedVersion("multifd packet version", field="version", value=version)
    if flags & _DEVICE_STATE:
        raise BadRecordType("device-state flag on a RAM packet", field="flags", value=flags)
    if alloc > npages:
        raise BadCount(f"pages_alloc above page_count {npages}", field="pages_alloc",
                       value=alloc)
    if normal > alloc:
        raise BadCount("normal_pages above pages_alloc", field="normal_pages", value=normal)
    zero = 0
    if layout is PacketLayout.HEAD:
        zero = zero_raw
        if zero > alloc - normal:
            raise BadCount("zero_pages above pages_alloc - normal_pages", field="zero_pages",
                           value=zero)
    used = normal + zero
    ramblock = _name_from_field(rb)
    if used:
        method = flags & compression_mask(layout)
        # 7.2 checks the method only when reading page data (normal > 0); HEAD when
        # normal + zero > 0.
        if compression_flag is not None and (normal or layout is PacketLayout.HEAD) and (
            method != compression_flag
        ):
            raise Mismatch(f"compression flags {method:#x}, expected {compression_flag:#x}",
                           field="flags", value=flags)
        if normal:
            if nps > max_payload:
                raise BadLength("payload above the limit", field="next_packet_size", value=nps)
            if method == 0 and nps != normal * page_size:
                raise BadLength(f"uncompressed payload must be {normal} pages",
                                field="next_packet_size", value=nps)
            if method and nps == 0:
                raise BadLength("empty compressed payload", field="next_packet_size",
                                value=nps)
        elif layout is PacketLayout.HEAD and nps:
            raise BadLength("zero-only packet with a payload", field="next_packet_size",
                            value=nps)
        if blocks is not None and ramblock not in blocks:
            raise BadName("unknown RAM block", field="ramblock", value=ramblock)
        # The common packet (consecutive pages) is valid by its first and last offset.
        offs = None
        run = be64_run_start(buf, MULTIFD_PACKET_HEADER_SIZE, used, page_size)
        if run is not None and (run % page_size or (blocks is not None and (
                run + (used - 1) * page_size > blocks[ramblock] - page_size))):
            run = None
        if run is None:
            offs = np.frombuffer(buf, dtype=">u8", count=used,
                                 offset=MULTIFD_PACKET_HEADER_SIZE).astype(np.uint64)
            _check_offsets(offs, page_size, ramblock, blocks)
    else:
        offs = np.empty(0, dtype=np.uint64)
        run = None
    return RamPacketHeader(flags, alloc, normal, nps, num, zero, ramblock, offs, layout, run,
                           page_size)


def _check_offsets(offs: np.ndarray, page_size: int, ramblock: str,
                   blocks: Mapping[str, int] | None) -> None:
    """Every offset page-aligned and (with `blocks`) inside the block: two reductions (an
    OR for the alignment, a max for the bound); the index of a bad one only on error."""
    mask = page_size - 1
    if offs.size and int(np.bitwise_or.reduce(offs)) & mask:
        at = int(np.flatnonzero(offs & np.uint64(mask))[0])
        raise BadOffset("page offset not page-aligned", field="offset", value=int(offs[at]))
    if blocks is not None and offs.size:
        limit = blocks[ramblock] - page_size
        if limit < 0 or int(offs.max()) > limit:
            at = 0 if limit < 0 else int(np.flatnonzero(offs > np.uint64(limit))[0])
            raise BadOffset(f"page offset outside RAM block {ramblock!r}", field="offset",
                            value=int(offs[at]))


class RamPacketEncoder:
    """Builds RAM packets into one preallocated packet_len buffer (one per channel).

    The returned memoryview aliases that buffer: send it before encoding the next packet.
    """

    def __init__(self, layout: PacketLayout, page_size: int = TARGET_PAGE_SIZE) -> None:
        self.layout = layout
        self.page_size = page_size
        self.page_count = page_count(page_size)
        self.packet_len = ram_packet_len(page_size)
        self._buf = bytearray(self.packet_len)
        self._view = memoryview(self._buf)
        self._offs = np.frombuffer(self._buf, dtype=">u8", count=self.page_count,
                                   offset=MULTIFD_PACKET_HEADER_SIZE)

    def encode(
        self,
        *,
        flags: int,
        packet_num: int,
        ramblock: str,
        normal: np.ndarray,
        zero: np.ndarray | None = None,
        next_packet_size: int,
        pages_alloc: int | None = None,
    ) -> memoryview:
        """Fill the buffer with one packet; flags must already hold the method bits."""
        n = len(normal)
        z = 0 if zero is None else len(zero)
        if z and self.layout is PacketLayout.V7_2:
            raise ValueError("the 7.2 layout has no zero pages in multifd packets")
        alloc = self.page_count if pages_alloc is None else pages_alloc
        if not 0 <= alloc <= self.page_count or n + z > alloc:
            raise ValueError(f"{n}+{z} pages do not fit pages_alloc {alloc}")
        if flags & _DEVICE_STATE or not 0 <= flags <= _U32_MAX:
            raise ValueError(f"bad RAM packet flags {flags:#x}")
        if not 0 <= next_packet_size <= _U32_MAX or not 0 <= packet_num <= _U64_MAX:
            raise ValueError("next_packet_size or packet_num out of range")
        name = _name_to_field(ramblock, "ramblock")
        _RAM.pack_into(self._buf, 0, MULTIFD_MAGIC, MULTIFD_VERSION, flags, alloc, n,
                       next_packet_size, packet_num, z, name)
        offs = self._offs
        offs[:n] = normal
        if z:
            offs[n : n + z] = zero
        offs[n + z :] = 0
        return self._view

    def encode_sync(self, packet_num: int) -> memoryview:
        """A HEAD-style SYNC-only packet: flags 0x01, every count 0, zeroed name and array.

        QEMU 7.2 accepts it too (pages_alloc 0 <= page_count, no pages).
        """
        _RAM.pack_into(self._buf, 0, MULTIFD_MAGIC, MULTIFD_VERSION, _SYNC, 0, 0, 0,
                       packet_num, 0, b"")
        self._offs[:] = 0
        return self._view


# --------------------------------------------------------------------------- device state


@dataclass(frozen=True, slots=True)
class DeviceStatePacketHeader:
    """MultiFDPacketDeviceState_t without the common header: who the buffer is for."""

    idstr: str
    instance_id: int
    next_packet_size: int

    def encode(self) -> bytes:
        return encode_device_state_header(self.idstr, self.instance_id, self.next_packet_size)


def encode_device_state_header(idstr: str, instance_id: int, next_packet_size: int) -> bytes:
    """The 276-byte device-state packet header (flags exactly 0x40); payload follows."""
    name = _name_to_field(idstr, "idstr")
    if not 0 <= instance_id <= _U32_MAX:
        raise ValueError("instance_id must fit in a be32")
    if not 0 < next_packet_size <= _U32_MAX:
        raise ValueError("a device-state packet needs 1..2^32-1 payload bytes")
    return _DEVSTATE.pack(MULTIFD_MAGIC, MULTIFD_VERSION, _DEVICE_STATE, name, instance_id,
                          next_packet_size)


def decode_device_state_packet(
    buf276: bytes | bytearray | memoryview,
    *,
    max_payload: int = DEFAULT_MAX_DEVICE_STATE_PAYLOAD,
) -> DeviceStatePacketHeader:
    """Decode and validate a device-state packet header (common header included)."""
    if len(buf276) != MULTIFD_DEVICE_STATE_HEADER_SIZE:
        raise BadLength("device-state packet header has the wrong size", field="length",
                        value=len(buf276))
    magic, version, flags, raw, instance_id, nps = _DEVSTATE.unpack_from(buf276, 0)
    if magic != MULTIFD_MAGIC:
        raise BadMagic("bad multifd packet magic", field="magic", value=magic)
    if version != MULTIFD_VERSION:
        raise UnsupportedVersion("multifd packet version", field="version", value=version)
    if not flags & _DEVICE_STATE:
        raise BadRecordType("not a device-state packet", field="flags", value=flags)
    if flags & _SYNC:
        raise BadRecordType("SYNC device state packet", field="flags", value=flags)
    if flags != _DEVICE_STATE:
        raise BadRecordType("device state packet with compression or unknown flags",
                            field="flags", value=flags)
    if raw[MULTIFD_IDSTR_SIZE - 1] != 0:
        raise BadName("device state idstr not NUL-terminated", field="idstr", value=raw[:32])
    if nps == 0:
        raise BadLength("empty device state packet", field="next_packet_size", value=0)
    if nps > max_payload:
        raise BadLength("device state payload above the limit", field="next_packet_size",
                        value=nps)
    return DeviceStatePacketHeader(idstr=_name_from_field(raw), instance_id=instance_id,
                                   next_packet_size=nps)


# --------------------------------------------------------------------------- channel decoder


@dataclass(frozen=True, slots=True)
class RamPacket:
    """A RAM packet and its payload (empty unless the packet has normal pages)."""

    header: RamPacketHeader
    payload: bytes
    offset: int = 0  # absolute stream offset of the packet


@dataclass(frozen=True, slots=True)
class DeviceStatePacket:
    """A device-state packet and its opaque buffer."""

    header: DeviceStatePacketHeader
    payload: bytes
    offset: int = 0


@dataclass(frozen=True, slots=True)
class EndOfChannel:
    """The connection ended cleanly at a packet boundary after `length` bytes."""

    length: int


ChannelEvent = InitPacket | RamPacket | DeviceStatePacket | EndOfChannel | _NeedDataType


@dataclass(slots=True)
class _Pending:
    header: RamPacketHeader | DeviceStatePacketHeader
    offset: int
    size: int


@dataclass(slots=True)
class _State:
    init_done: bool = False
    pending: _Pending | None = None
    error: WireError | None = None
    ended: bool = False


class ChannelDecoder:
    """Incremental decoder of one multifd connection: init packet, then packets + payloads.

    layout=None detects the layout: 7.2 until a packet proves HEAD, which is a device-state
    packet (flag 0x40), non-zero bytes 32..35 (zero_pages; 7.2 never writes them), or a SYNC
    packet with pages_alloc 0 (7.2 always sends page_count there). Packets before the proof
    decode identically under both layouts because their zero_pages field is 0. Once HEAD,
    always HEAD. Errors carry the absolute offset of the offending packet; after an error or
    the end, the decoder keeps returning the same outcome.
    """

    def __init__(
        self,
        layout: PacketLayout | None = None,
        page_size: int = TARGET_PAGE_SIZE,
        max_payload: int = MULTIFD_MAX_COMPRESSED_PAYLOAD,
        blocks: Mapping[str, int] | None = None,
        *,
        compression_flag: int | None = None,
        max_device_state_payload: int = DEFAULT_MAX_DEVICE_STATE_PAYLOAD,
    ) -> None:
        self._layout = layout
        self._detect = layout is None
        self.page_size = page_size
        self.packet_len = ram_packet_len(page_size)
        self.max_payload = max_payload
        self.blocks = blocks
        self.compression_flag = compression_flag
        self.max_device_state_payload = max_device_state_payload
        self._buf = ReceiveBuffer()
        self._st = _State()

    @property
    def layout(self) -> PacketLayout | None:
        """The layout in use: when detecting, None before the first packet, then V7_2 until
        a packet proves HEAD."""
        return self._layout

    @property
    def offset(self) -> int:
        """Absolute offset of the next undecoded byte (start of the pending record)."""
        return self._buf.record_offset

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._buf.closed:
            raise RuntimeError("receive_data after receive_eof")
        if data:
            self._buf.feed(data)

    def receive_eof(self) -> None:
        self._buf.close()

    def next_event(self) -> ChannelEvent:
        st = self._st
        if st.error is not None:
            raise st.error
        if st.ended:
            return EndOfChannel(self._buf.record_offset)
        buf = self._buf
        start = buf.record_offset
        try:
            event = self._next(buf, start)
        except NeedData:
            buf.rollback()
            if not buf.closed:
                return NEED_DATA
            at = st.pending.offset if st.pending is not None else start
            err: WireError = Truncated(self._truncation_text(), field="available",
                                       value=buf.available, offset=at)
            st.error = err
            raise err from None
        except WireError as e:
            buf.rollback()
            st.error = e.at(start)
            raise
        return event

    def _truncation_text(self) -> str:
        st = self._st
        if not st.init_done:
            return "multifd channel ended inside its init packet"
        if st.pending is not None:
            return "multifd channel ended inside a packet payload"
        return "multifd channel ended inside a packet header"

    def _next(self, buf: ReceiveBuffer, start: int) -> ChannelEvent:
        st = self._st
        if not st.init_done:
            if buf.closed and buf.available == 0:
                raise NeedData
            pkt = InitPacket.decode(buf.take(MULTIFD_INIT_PACKET_SIZE))
            buf.commit()
            st.init_done = True
            return pkt
        if st.pending is None:
            if buf.available == 0 and buf.closed:
                st.ended = True
                return EndOfChannel(start)
            flags = decode_common_header(buf.peek(MULTIFD_COMMON_HEADER_SIZE))
            if flags & _DEVICE_STATE:
                if not self._detect and self._layout is PacketLayout.V7_2:
                    raise BadRecordType("device-state packet on a QEMU 7.2 channel",
                                        field="flags", value=flags)
                dhdr = decode_device_state_packet(buf.take(MULTIFD_DEVICE_STATE_HEADER_SIZE),
                                                  max_payload=self.max_device_state_payload)
                self._layout = PacketLayout.HEAD
                st.pending = _Pending(dhdr, start, dhdr.next_packet_size)
            else:
                raw = buf.take(self.packet_len)
                layout = self._layout
                if layout is None or (self._detect and layout is PacketLayout.V7_2):
                    layout = self._sniff(raw, flags)
                hdr = decode_ram_packet(
                    raw, layout=layout, page_size=self.page_size, blocks=self.blocks,
                    max_payload=self.max_payload, compression_flag=self.compression_flag,
                )
                self._layout = layout
                st.pending = _Pending(hdr, start, hdr.payload_size)
            buf.commit()
        pending = st.pending
        payload = buf.take(pending.size) if pending.size else b""
        buf.commit()
        st.pending = None
        if isinstance(pending.header, RamPacketHeader):
            return RamPacket(pending.header, payload, pending.offset)
        return DeviceStatePacket(pending.header, payload, pending.offset)

    @staticmethod
    def _sniff(raw: bytes, flags: int) -> PacketLayout:
        zero_raw = int.from_bytes(raw[32:36], "big")
        pages_alloc = int.from_bytes(raw[12:16], "big")
        if zero_raw or (flags & _SYNC and pages_alloc == 0):
            return PacketLayout.HEAD
        return PacketLayout.V7_2
