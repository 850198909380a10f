"""Multifd channel codecs: init / RAM / device-state packets and ChannelDecoder.

Golden tests run on every real channel capture (QEMU 7.2 and 10.0), vendored in tests/data.
"""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import Q10, Q72

from multifd.wire import NEED_DATA, WireError
from multifd.wire.constants import (
    MULTIFD_MAX_COMPRESSED_PAYLOAD,
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
)
from multifd.wire.packet import (
    ChannelDecoder,
    DeviceStatePacket,
    DeviceStatePacketHeader,
    EndOfChannel,
    InitPacket,
    RamPacket,
    RamPacketEncoder,
    decode_common_header,
    decode_device_state_packet,
    decode_ram_packet,
    encode_device_state_header,
    validate_init,
)

V72 = PacketLayout.V7_2
HEAD = PacketLayout.HEAD
PLEN = ram_packet_len()
BLOCKS = {
    "pc.ram": 0x4000000,
    "/rom@etc/acpi/tables": 0x20000,
    "pc.bios": 0x40000,
    "pc.rom": 0x20000,
    "/rom@etc/table-loader": 0x1000,
    "/rom@etc/acpi/rsdp": 0x1000,
}
# (file, channel id, packets, sync packets, normal pages) from qemu-captures/README.md and
# qemu72-peer.md §4.2; the per-capture totals equal query-migrate's "normal" (817).
CAPTURES_72 = [
    ("multifd2-none/conn1-src2dst.bin", 0, 7, 3, 385),
    ("multifd2-none/conn2-src2dst.bin", 1, 9, 3, 432),
    ("multifd2-zlib/conn1-src2dst.bin", 0, 9, 3, 387),
    ("multifd2-zlib/conn2-src2dst.bin", 1, 7, 3, 430),
    ("multifd2-zstd/conn1-src2dst.bin", 1, 8, 3, 431),
    ("multifd2-zstd/conn2-src2dst.bin", 0, 8, 3, 386),
]
CAPTURES_10 = [
    (f"{scen}/{ch['file']}", ch)
    for scen in ("multifd2-none", "multifd2-zlib", "multifd2-zstd")
    for ch in json.loads((Q10 / scen / "meta.json").read_text())["channel_files"]
]
METHOD_FLAG = {"none": 0, "zlib": 2, "zstd": 4}


def drain(dec: ChannelDecoder) -> list[object]:
    """Every event until NEED_DATA or the end (EndOfChannel included)."""
    out: list[object] = []
    while True:
        ev = dec.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, EndOfChannel):
            return out


def decode_all(data: bytes, **kw: object) -> list[object]:
    dec = ChannelDecoder(**kw)  # type: ignore[arg-type]
    dec.receive_data(data)
    dec.receive_eof()
    return drain(dec)


# --------------------------------------------------------------------------- init packet


def test_init_packet_layout_and_round_trip() -> None:
    uuid = bytes(range(16))
    raw = InitPacket(uuid, 3).encode()
    assert len(raw) == 64
    assert raw[:8] == bytes.fromhex("1122334400000001")
    assert raw[8:24] == uuid and raw[24] == 3 and raw[25:] == bytes(39)
    assert InitPacket.decode(raw) == InitPacket(uuid, 3)
    assert InitPacket.decode(b"xx" + raw, offset=2) == InitPacket(uuid, 3)


@given(st.binary(min_size=16, max_size=16), st.integers(0, 255))
def test_init_packet_property(uuid: bytes, cid: int) -> None:
    assert InitPacket.decode(InitPacket(uuid, cid).encode()) == InitPacket(uuid, cid)


def test_init_packet_errors() -> None:
    raw = bytearray(InitPacket(bytes(16), 0).encode())
    bad = bytearray(raw)
    bad[0] = 0x12
    with pytest.raises(BadMagic):
        InitPacket.decode(bad)
    bad = bytearray(raw)
    bad[7] = 2
    with pytest.raises(UnsupportedVersion):
        InitPacket.decode(bad)
    with pytest.raises(Truncated):
        InitPacket.decode(raw[:63])
    with pytest.raises(ValueError):
        InitPacket(bytes(15), 0)
    with pytest.raises(ValueError):
        InitPacket(bytes(16), 256)


def test_validate_init() -> None:
    seen: set[int] = set()
    u = bytes([7]) * 16
    validate_init(InitPacket(u, 0), uuid=u, channels=2, seen=seen)
    validate_init(InitPacket(u, 1), uuid=None, channels=2, seen=seen)
    assert seen == {0, 1}
    with pytest.raises(Mismatch, match="connected twice"):
        validate_init(InitPacket(u, 1), uuid=u, channels=2, seen=seen)
    with pytest.raises(BadCount, match="out of range for 2 channels"):
        validate_init(InitPacket(u, 2), uuid=u, channels=2, seen=set())
    with pytest.raises(Mismatch, match="uuid"):
        validate_init(InitPacket(bytes(16), 0), uuid=u, channels=2, seen=set())


def test_common_header() -> None:
    assert decode_common_header(bytes.fromhex("11223344 00000001 00000041")) == 0x41
    with pytest.raises(BadMagic):
        decode_common_header(bytes.fromhex("5145564d 00000001 00000000"))
    with pytest.raises(UnsupportedVersion):
        decode_common_header(bytes.fromhex("11223344 00000002 00000000"))
    with pytest.raises(Truncated):
        decode_common_header(b"\x11\x22")


# --------------------------------------------------------------------------- RAM packet


def test_ram_packet_layout_matches_qemu10_capture() -> None:
    """Our encoder reproduces the first data packet of qemu10 multifd2-none/chan-0 byte
    for byte (header at 0xac0; normal then zero offsets)."""
    data = (Q10 / "multifd2-none/chan-0.bin").read_bytes()
    raw = data[0xAC0 : 0xAC0 + PLEN]
    hdr = decode_ram_packet(raw, layout=HEAD, blocks=BLOCKS, compression_flag=0)
    assert (hdr.flags, hdr.pages_alloc, hdr.normal_pages, hdr.zero_pages) == (0, 128, 96, 32)
    assert (hdr.next_packet_size, hdr.packet_num, hdr.ramblock) == (0x60000, 5, "pc.ram")
    assert hdr.offsets.dtype == np.uint64 and hdr.offsets.dtype.isnative
    assert hdr.normal_offsets[3] == 0x17E000 and hdr.zero_offsets[0] == 0x15F000
    enc = RamPacketEncoder(HEAD)
    out = enc.encode(flags=0, packet_num=5, ramblock="pc.ram", normal=hdr.normal_offsets,
                     zero=hdr.zero_offsets, next_packet_size=0x60000)
    assert bytes(out) == raw


def test_sync_packet_matches_qemu10_capture() -> None:
    data = (Q10 / "multifd2-none/chan-0.bin").read_bytes()
    assert bytes(RamPacketEncoder(HEAD).encode_sync(1)) == data[64 : 64 + PLEN]
    # 7.2 accepts the HEAD-style SYNC (pages_alloc 0, no pages)
    hdr = decode_ram_packet(data[64 : 64 + PLEN], layout=V72, blocks=BLOCKS,
                            compression_flag=4)
    assert hdr.is_sync and not hdr.has_pages and hdr.payload_size == 0


@st.composite
def ram_packets(draw: st.DrawFn) -> tuple[PacketLayout, int, dict[str, object]]:
    layout = draw(st.sampled_from([V72, HEAD]))
    page_size = draw(st.sampled_from([4096, 16384]))
    pc = page_count(page_size)
    n = draw(st.integers(0, pc))
    z = draw(st.integers(0, pc - n)) if layout is HEAD else 0
    npages_block = draw(st.integers(max(1, n + z), 4 * pc))
    pages = draw(st.permutations(range(npages_block)))[: n + z]
    offs = np.array(pages, dtype=np.uint64) * np.uint64(page_size)
    name = draw(st.text(st.characters(blacklist_characters="\x00", codec="utf-8"),
                        min_size=1, max_size=60).filter(lambda s: len(s.encode()) < 256))
    method = draw(st.sampled_from([0, 2, 4]))
    sync = draw(st.booleans())
    nps = n * page_size if method == 0 else draw(st.integers(1, 1 << 20))
    if n == 0:
        nps = 0
    alloc = draw(st.integers(n + z, pc))
    return layout, page_size, {
        "flags": method | int(sync), "packet_num": draw(st.integers(0, 2**64 - 1)),
        "ramblock": name, "normal": offs[:n], "zero": offs[n:] if z else None,
        "next_packet_size": nps, "pages_alloc": alloc, "_block_len": npages_block * page_size,
    }


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(ram_packets())
def test_ram_packet_round_trip_property(case: tuple[PacketLayout, int, dict]) -> None:
    layout, page_size, kw = case
    block_len = kw.pop("_block_len")
    enc = RamPacketEncoder(layout, page_size)
    raw = bytes(enc.encode(**kw))
    assert len(raw) == ram_packet_len(page_size)
    hdr = decode_ram_packet(raw, layout=layout, page_size=page_size,
                            blocks={kw["ramblock"]: block_len},
                            compression_flag=kw["flags"] & 0x0E)
    n = len(kw["normal"])
    z = 0 if kw["zero"] is None else len(kw["zero"])
    assert (hdr.flags, hdr.packet_num, hdr.pages_alloc) == (
        kw["flags"], kw["packet_num"], kw["pages_alloc"])
    assert (hdr.normal_pages, hdr.zero_pages, hdr.ramblock) == (n, z, kw["ramblock"])
    assert hdr.next_packet_size == kw["next_packet_size"]
    assert hdr.is_sync == bool(kw["flags"] & 1)
    assert hdr.compression == kw["flags"] & 0x0E
    assert np.array_equal(hdr.normal_offsets, kw["normal"])
    assert np.array_equal(hdr.zero_offsets, kw["zero"] if z else [])
    used = hdr.offsets
    run = n + z > 0 and np.array_equal(used, used[0] + np.arange(n + z, dtype=np.uint64)
                                       * np.uint64(page_size))
    assert hdr.run_start == (int(used[0]) if run else None)
    # unused offset positions are zero on the wire
    tail = np.frombuffer(raw, dtype=">u8", offset=320 + 8 * (n + z))
    assert not tail.any()


def _packet(layout: PacketLayout = HEAD, **kw: object) -> bytearray:
    args: dict[str, object] = {
        "flags": 0, "packet_num": 9, "ramblock": "pc.ram",
        "normal": np.array([0x100000, 0x1000], dtype=np.uint64),
        "zero": np.array([0x5000], dtype=np.uint64) if layout is HEAD else None,
        "next_packet_size": 2 * 4096,
    }
    args.update(kw)
    return bytearray(RamPacketEncoder(layout).encode(**args))  # type: ignore[arg-type]


def _set32(buf: bytearray, off: int, v: int) -> bytearray:
    struct.pack_into(">I", buf, off, v)
    return buf


def _set64(buf: bytearray, off: int, v: int) -> bytearray:
    struct.pack_into(">Q", buf, off, v)
    return buf


@pytest.mark.parametrize(
    ("mutate", "layout", "kw", "exc", "text"),
    [
        (lambda b: _set32(b, 0, 0x5145564D), HEAD, {}, BadMagic, "magic"),
        (lambda b: _set32(b, 4, 2), HEAD, {}, UnsupportedVersion, "version"),
        (lambda b: _set32(b, 12, 129), HEAD, {}, BadCount, "pages_alloc"),
        (lambda b: _set32(b, 16, 129), V72, {}, BadCount, "normal_pages"),
        (lambda b: _set32(_set32(b, 12, 4), 16, 5), HEAD, {}, BadCount, "normal_pages"),
        (lambda b: _set32(b, 32, 127), HEAD, {}, BadCount, "zero_pages"),
        (lambda b: _set32(_set32(b, 12, 3), 32, 2), HEAD, {}, BadCount, "zero_pages"),
        (lambda b: _set64(b, 320, 0x100001), HEAD, {}, BadOffset, "page-aligned"),
        (lambda b: _set64(b, 336, 0x100800), HEAD, {}, BadOffset, "page-aligned"),
        (lambda b: _set64(b, 328, 0x4000000), V72, {}, BadOffset, "outside"),
        (lambda b: _set64(b, 336, 0x3FFF000 + 4096), HEAD, {}, BadOffset, "outside"),
        (lambda b: b, HEAD, {"ramblock": "pc.nope"}, BadName, "unknown RAM block"),
        (lambda b: _set32(b, 20, 4096), HEAD, {}, BadLength, "uncompressed"),
        (lambda b: _set32(b, 20, 3 * 4096), V72, {}, BadLength, "uncompressed"),
        (lambda b: _set32(b, 8, 0x40), HEAD, {}, BadRecordType, "device-state"),
        (lambda b: b, HEAD, {"flags": 2, "next_packet_size": (1 << 20) + 1},
         BadLength, "above the limit"),
        (lambda b: b, HEAD, {"flags": 4, "next_packet_size": 0}, BadLength, "empty"),
        (lambda b: b, HEAD, {"normal": np.zeros(0, np.uint64), "next_packet_size": 5},
         BadLength, "zero-only"),
        (lambda b: b[:-1], HEAD, {}, BadLength, "wrong size"),
        # consecutive runs (validated by their first and last offset) are checked too
        (lambda b: b, V72, {"normal": np.array([0x100800, 0x101800], np.uint64)},
         BadOffset, "page-aligned"),
        (lambda b: b, V72, {"normal": np.array([0x3FFF000, 0x4000000], np.uint64)},
         BadOffset, "outside"),
        (lambda b: b, HEAD, {"normal": np.array([0x3FFE000, 0x3FFF000], np.uint64),
                             "zero": np.array([0x4000000], np.uint64)}, BadOffset, "outside"),
    ],
)
def test_ram_packet_validation(mutate, layout, kw, exc, text) -> None:  # type: ignore[no-untyped-def]
    raw = mutate(_packet(layout, **kw))
    with pytest.raises(exc, match=text):
        decode_ram_packet(bytes(raw), layout=layout, blocks=BLOCKS)


@given(st.lists(st.integers(0, 0x4000000 // 4096 + 2), min_size=1, max_size=128),
       st.integers(0, 127), st.sampled_from([0, 1, 0x800]))
def test_offsets_checked_like_entry_by_entry(pages: list[int], at: int, skew: int) -> None:
    """Any offset array (runs or not, shuffled as QEMU 10's zero pages are): accepted
    exactly when every entry is aligned and inside the block; the error names the first
    bad entry, misalignment before range."""
    offs = [p * 4096 for p in pages]
    offs[at % len(offs)] += skew
    raw = _packet(HEAD, normal=np.zeros(0, np.uint64), zero=np.array(offs, np.uint64),
                  next_packet_size=0)
    limit = BLOCKS["pc.ram"] - 4096
    misaligned = [o for o in offs if o % 4096]
    outside = [o for o in offs if o > limit]
    if not misaligned and not outside:
        assert list(decode_ram_packet(bytes(raw), layout=HEAD, blocks=BLOCKS).offsets) == offs
        return
    with pytest.raises(BadOffset) as ei:
        decode_ram_packet(bytes(raw), layout=HEAD, blocks=BLOCKS)
    assert ei.value.value == (misaligned or outside)[0]
    assert ("page-aligned" if misaligned else "outside") in str(ei.value)


def test_compression_flag_checked_only_with_pages() -> None:
    raw = bytes(_packet(HEAD, flags=2, next_packet_size=100))
    with pytest.raises(Mismatch, match=r"compression flags 0x2, expected 0x4"):
        decode_ram_packet(raw, layout=HEAD, compression_flag=4)
    assert decode_ram_packet(raw, layout=HEAD, compression_flag=2).compression == 2
    # HEAD zero-only packet carries the method bits and is checked
    zonly = bytes(_packet(HEAD, flags=4, normal=np.zeros(0, np.uint64), next_packet_size=0))
    with pytest.raises(Mismatch):
        decode_ram_packet(zonly, layout=HEAD, compression_flag=2)
    # 7.2 checks only when there are normal pages; page-less packets carry 0 (quirk 3)
    empty = bytes(_packet(V72, flags=1, normal=np.zeros(0, np.uint64), next_packet_size=7))
    assert decode_ram_packet(empty, layout=V72, compression_flag=2).is_sync
    # HEAD SYNC-only packet: flags 0x01 even with compression on
    sync = bytes(RamPacketEncoder(HEAD).encode_sync(3))
    assert decode_ram_packet(sync, layout=HEAD, compression_flag=4).packet_num == 3


def test_stale_fields_of_pageless_packets_are_not_validated() -> None:
    raw = _packet(V72, flags=1, normal=np.zeros(0, np.uint64), next_packet_size=113406,
                  ramblock="pc.nope", pages_alloc=128)
    for i in range(128):  # stale, unaligned, out-of-range offsets
        _set64(raw, 320 + 8 * i, 0xDEADBEEF01 + i)
    hdr = decode_ram_packet(bytes(raw), layout=V72, blocks=BLOCKS, compression_flag=2)
    assert hdr.ramblock == "pc.nope" and hdr.next_packet_size == 113406
    assert len(hdr.offsets) == 0 and hdr.payload_size == 0
    # stale offsets past the used count are ignored as well
    raw = _packet(V72)
    _set64(raw, 320 + 8 * 5, 0xFFFFFFFF01)
    assert len(decode_ram_packet(bytes(raw), layout=V72, blocks=BLOCKS).offsets) == 2


def test_v72_ignores_bytes_32_to_35() -> None:
    raw = _set32(_packet(V72), 32, 0xFFFFFFFF)
    hdr = decode_ram_packet(bytes(raw), layout=V72, blocks=BLOCKS)
    assert hdr.zero_pages == 0 and len(hdr.offsets) == 2


def test_ramblock_without_nul_is_cut_at_byte_255() -> None:
    raw = _packet(HEAD)
    raw[64:320] = b"A" * 256
    hdr = decode_ram_packet(bytes(raw), layout=HEAD)
    assert hdr.ramblock == "A" * 255


def test_encoder_rejects_misuse() -> None:
    enc = RamPacketEncoder(V72)
    one = np.array([0], dtype=np.uint64)
    with pytest.raises(ValueError):
        enc.encode(flags=0, packet_num=0, ramblock="b", normal=one, zero=one,
                   next_packet_size=4096)
    with pytest.raises(ValueError):
        enc.encode(flags=0, packet_num=0, ramblock="b", normal=np.zeros(129, np.uint64),
                   next_packet_size=0)
    with pytest.raises(ValueError):
        enc.encode(flags=0x40, packet_num=0, ramblock="b", normal=one, next_packet_size=1)
    with pytest.raises(ValueError):
        enc.encode(flags=0, packet_num=0, ramblock="x" * 256, normal=one,
                   next_packet_size=4096)


def test_encoder_reuses_one_buffer_and_clears_old_offsets() -> None:
    enc = RamPacketEncoder(HEAD)
    a = enc.encode(flags=0, packet_num=1, ramblock="a" * 200,
                   normal=np.arange(128, dtype=np.uint64) * 4096, next_packet_size=128 * 4096)
    b = enc.encode(flags=0, packet_num=2, ramblock="b",
                   normal=np.array([4096], np.uint64), next_packet_size=4096)
    assert a.obj is b.obj  # same preallocated buffer
    hdr = decode_ram_packet(bytes(b), layout=HEAD)
    assert hdr.ramblock == "b"
    assert bytes(b)[66:320] == bytes(254)
    assert not np.frombuffer(bytes(b), ">u8", offset=328).any()


# --------------------------------------------------------------------------- device state


def test_device_state_header_layout_and_round_trip() -> None:
    raw = encode_device_state_header("0000:00:02.0/vfio", 7, 1000)
    assert len(raw) == 276
    assert raw[:12] == bytes.fromhex("11223344 00000001 00000040")
    assert raw[12:29] == b"0000:00:02.0/vfio" and raw[29:268] == bytes(239)
    assert raw[268:] == struct.pack(">II", 7, 1000)
    hdr = decode_device_state_packet(raw)
    assert hdr == DeviceStatePacketHeader("0000:00:02.0/vfio", 7, 1000)
    assert hdr.encode() == raw


@given(st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=80)
       .filter(lambda s: len(s.encode()) < 256),
       st.integers(0, 2**32 - 1), st.integers(1, 1 << 26))
def test_device_state_property(idstr: str, inst: int, size: int) -> None:
    raw = encode_device_state_header(idstr, inst, size)
    assert decode_device_state_packet(raw) == DeviceStatePacketHeader(idstr, inst, size)


@pytest.mark.parametrize(
    ("off", "value", "exc", "text"),
    [
        (8, 0x41, BadRecordType, "SYNC device state"),
        (8, 0x44, BadRecordType, "compression"),
        (8, 0x42, BadRecordType, "compression"),
        (8, 0x00, BadRecordType, "not a device-state"),
        (272, 0, BadLength, "empty device state packet"),
        (272, (64 << 20) + 1, BadLength, "above the limit"),
        (0, 0x11223345, BadMagic, "magic"),
        (4, 0, UnsupportedVersion, "version"),
    ],
)
def test_device_state_validation(off: int, value: int, exc: type, text: str) -> None:
    raw = bytearray(encode_device_state_header("dev", 0, 10))
    struct.pack_into(">I", raw, off, value)
    with pytest.raises(exc, match=text):
        decode_device_state_packet(bytes(raw))


def test_device_state_idstr_must_end_with_nul_and_sizes() -> None:
    raw = bytearray(encode_device_state_header("dev", 0, 10))
    raw[12:268] = b"d" * 256
    with pytest.raises(BadName, match="NUL"):
        decode_device_state_packet(bytes(raw))
    with pytest.raises(BadLength):
        decode_device_state_packet(encode_device_state_header("dev", 0, 10)[:275])
    with pytest.raises(BadLength):
        decode_device_state_packet(encode_device_state_header("dev", 0, 10), max_payload=9)
    with pytest.raises(ValueError):
        encode_device_state_header("dev", 0, 0)


# --------------------------------------------------------------------------- ChannelDecoder


@pytest.mark.parametrize(("name", "cid", "npkt", "nsync", "normal"), CAPTURES_72)
def test_channel_decoder_qemu72_captures(name: str, cid: int, npkt: int, nsync: int,
                                         normal: int) -> None:
    scen = name.split("/")[0].removeprefix("multifd2-")
    data = (Q72 / name).read_bytes()
    evs = decode_all(data, blocks=BLOCKS, compression_flag=METHOD_FLAG[scen])
    assert evs[0] == InitPacket(bytes(16), cid)
    assert evs[-1] == EndOfChannel(len(data))
    pkts = evs[1:-1]
    assert all(isinstance(p, RamPacket) for p in pkts)
    assert len(pkts) == npkt
    assert sum(p.header.is_sync for p in pkts) == nsync
    assert sum(p.header.normal_pages for p in pkts) == normal
    assert all(p.header.zero_pages == 0 and p.header.pages_alloc == 128 for p in pkts)
    assert all(len(p.payload) == p.header.payload_size for p in pkts)
    assert pkts[0].header.is_sync and pkts[0].header.normal_pages == 0
    # the explicit layout gives the same events; detection stays on 7.2
    assert decode_all(data, layout=V72, blocks=BLOCKS) == evs
    dec = ChannelDecoder(blocks=BLOCKS)
    dec.receive_data(data)
    drain(dec)
    assert dec.layout is V72


def test_qemu72_quirks_in_none_capture() -> None:
    data = (Q72 / "multifd2-none/conn1-src2dst.bin").read_bytes()
    pkts = decode_all(data, blocks=BLOCKS, compression_flag=0)[1:-1]
    seq = [(p.header.packet_num, p.header.is_sync, p.header.normal_pages,
            p.header.next_packet_size, p.header.ramblock, len(p.payload)) for p in pkts]
    assert seq == [
        (0, True, 0, 0, "", 0),
        (2, False, 128, 524288, "pc.ram", 524288),
        (4, False, 128, 524288, "pc.ram", 524288),
        (6, False, 128, 524288, "pc.ram", 524288),
        (12, True, 1, 4096, "/rom@etc/acpi/tables", 4096),  # SYNC carrying a page
        (12, False, 0, 4096, "/rom@etc/acpi/tables", 0),  # empty duplicate, stale size
        (14, True, 0, 4096, "/rom@etc/acpi/tables", 0),  # stale fields
    ]
    assert pkts[1].payload[:19] == b"QEMU72-PAGE-000000-"


def test_qemu72_stale_offsets_in_sync_packet() -> None:
    """A zlib SYNC packet carries stale next/ramblock and 128 stale offsets; flags 0x01."""
    data = (Q72 / "multifd2-zlib/conn2-src2dst.bin").read_bytes()
    pkts = [p for p in decode_all(data, blocks=BLOCKS, compression_flag=2)[1:-1]
            if p.header.is_sync and p.header.normal_pages == 0 and p.header.next_packet_size]
    assert pkts
    p = pkts[0]
    raw = data[p.offset : p.offset + PLEN]
    assert np.frombuffer(raw, ">u8", offset=320).all()  # stale, all non-zero
    assert len(p.header.offsets) == 0 and p.payload == b"" and p.header.flags == 1


@pytest.mark.parametrize(("name", "meta"), CAPTURES_10, ids=[c[0] for c in CAPTURES_10])
def test_channel_decoder_qemu10_captures(name: str, meta: dict) -> None:
    data = (Q10 / name).read_bytes()
    method = meta["compression"][0]
    evs = decode_all(data, blocks=BLOCKS, compression_flag=METHOD_FLAG[method])
    assert evs[0] == InitPacket(bytes(16), meta["channel_id"])
    assert evs[-1] == EndOfChannel(len(data))
    pkts = evs[1:-1]
    assert len(pkts) == meta["packets"]
    assert sum(p.header.is_sync for p in pkts) == meta["sync_packets"]
    assert sum(p.header.normal_pages for p in pkts) == meta["normal_pages"]
    assert sum(p.header.zero_pages for p in pkts) == meta["zero_pages"]
    assert sum(len(p.payload) for p in pkts) == meta["payload_bytes"]
    assert sum(p.header.zero_pages > 0 for p in pkts) == meta["zero_page_packets"]
    assert sorted({p.header.ramblock for p in pkts if p.header.has_pages}) == sorted(
        meta["ramblocks"])
    syncs = [p.header for p in pkts if p.header.is_sync]
    assert all(h.pages_alloc == 0 and h.flags == 1 and not h.has_pages for h in syncs)
    assert decode_all(data, layout=HEAD, blocks=BLOCKS) == evs
    dec = ChannelDecoder()
    dec.receive_data(data[: 64 + PLEN])
    drain(dec)
    assert dec.layout is HEAD  # the first SYNC (pages_alloc 0) proves HEAD


def test_qemu10_read_as_v72_keeps_framing_but_loses_zero_pages() -> None:
    """What a 7.2 receiver would see (§3.8): same packets and payloads, zero pages ignored."""
    data = (Q10 / "multifd2-zlib/chan-1.bin").read_bytes()
    head = decode_all(data, layout=HEAD, blocks=BLOCKS)
    v72 = decode_all(data, layout=V72, blocks=BLOCKS)
    assert len(v72) == len(head)
    assert [e.payload for e in v72[1:-1]] == [e.payload for e in head[1:-1]]
    assert all(e.header.zero_pages == 0 for e in v72[1:-1])


ALL_CHANNEL_FILES = [Q72 / c[0] for c in CAPTURES_72] + [Q10 / c[0] for c in CAPTURES_10]


@pytest.mark.parametrize("path", ALL_CHANNEL_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_random_chunking_gives_identical_events(path) -> None:  # type: ignore[no-untyped-def]
    data = path.read_bytes()
    whole = decode_all(data, blocks=BLOCKS)
    rng = random.Random(path.name)
    for _ in range(2):
        dec = ChannelDecoder(blocks=BLOCKS)
        evs: list[object] = []
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 7, 64, 1343, 1345, 4096, 70000, 600000])
            dec.receive_data(data[pos : pos + step])
            pos += step
            evs += drain(dec)
        dec.receive_eof()
        evs += drain(dec)
        assert evs == whole


@pytest.mark.parametrize("path", [Q72 / "multifd2-zstd/conn2-src2dst.bin",
                                  Q10 / "multifd2-zlib/chan-1.bin"],
                         ids=["72-zstd", "10-zlib"])
def test_truncation_never_raises_anything_but_wire_errors(path) -> None:  # type: ignore[no-untyped-def]
    data = path.read_bytes()
    whole = decode_all(data)
    bounds = [64] + [e.offset for e in whole if isinstance(e, RamPacket)]
    ends = {len(data), *(e.offset + PLEN + len(e.payload) for e in whole
                         if isinstance(e, RamPacket)), 64}
    cuts = {0, 1, 12, 63, 65, 76, len(data) - 1}
    for b in bounds:
        cuts |= {b - 1, b, b + 1, b + 11, b + 12, b + PLEN - 1, b + PLEN, b + PLEN + 1}
    rng = random.Random(1)
    cuts |= {rng.randrange(len(data)) for _ in range(60)}
    for cut in sorted(c for c in cuts if 0 <= c <= len(data)):
        dec = ChannelDecoder()
        dec.receive_data(data[:cut])
        before = drain(dec)
        assert not any(isinstance(e, EndOfChannel) for e in before)
        dec.receive_eof()
        if cut in ends:
            assert drain(dec)[-1] == EndOfChannel(cut)
            assert before == whole[: len(before)]
        else:
            with pytest.raises(Truncated) as ei:
                drain(dec)
            assert ei.value.offset is not None and ei.value.offset <= cut
            with pytest.raises(Truncated):  # the decoder stays failed
                dec.next_event()


def test_garbage_only_raises_wire_errors() -> None:
    data = bytearray((Q10 / "multifd2-zstd/chan-0.bin").read_bytes()[:20000])
    rng = random.Random(5)
    for _ in range(150):
        bad = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        try:
            decode_all(bytes(bad), blocks=BLOCKS)
        except WireError:
            pass


def test_error_carries_absolute_offset_of_the_packet() -> None:
    data = bytearray((Q72 / "multifd2-none/conn2-src2dst.bin").read_bytes())
    pkts = decode_all(bytes(data))[1:-1]
    third = pkts[2].offset
    data[third] ^= 0xFF
    dec = ChannelDecoder()
    dec.receive_data(bytes(data))
    with pytest.raises(BadMagic) as ei:
        drain(dec)
    assert ei.value.offset == third
    assert f"at byte {third}" in str(ei.value)
    data = bytearray((Q72 / "multifd2-none/conn2-src2dst.bin").read_bytes())
    struct.pack_into(">Q", data, pkts[1].offset + 320, 0x4000000)
    with pytest.raises(BadOffset) as ei2:
        decode_all(bytes(data), blocks=BLOCKS)
    assert ei2.value.offset == pkts[1].offset


def test_empty_connection_and_init_errors() -> None:
    with pytest.raises(Truncated, match="init packet"):
        decode_all(b"")
    with pytest.raises(BadMagic):
        decode_all(b"QEVM" + bytes(60))
    dec = ChannelDecoder()
    dec.receive_eof()
    with pytest.raises(RuntimeError):
        dec.receive_data(b"x")


def _head_stream() -> tuple[bytes, list[object]]:
    """A synthetic HEAD channel: init, SYNC, zero-only packet, device state, data, SYNC."""
    enc = RamPacketEncoder(HEAD)
    parts = [InitPacket(bytes([1]) * 16, 1).encode(), bytes(enc.encode_sync(0))]
    parts.append(bytes(enc.encode(flags=0, packet_num=1, ramblock="pc.ram",
                                  normal=np.zeros(0, np.uint64),
                                  zero=np.arange(3, dtype=np.uint64) * 4096,
                                  next_packet_size=0)))
    ds = struct.pack(">III", 0, 0, 1) + b"config"
    parts.append(encode_device_state_header("0000:00:03.0/vfio", 0, len(ds)) + ds)
    page = b"\xab" * 4096
    parts.append(bytes(enc.encode(flags=0, packet_num=2, ramblock="pc.bios",
                                  normal=np.array([0x3F000], np.uint64),
                                  next_packet_size=4096)) + page)
    parts.append(bytes(enc.encode_sync(3)))
    return b"".join(parts), ["init", "sync", "zero", "dev", "data", "sync"]


def test_channel_decoder_device_state_and_detection() -> None:
    data, _ = _head_stream()
    evs = decode_all(data, blocks=BLOCKS)
    assert isinstance(evs[3], DeviceStatePacket)
    assert evs[3].header == DeviceStatePacketHeader("0000:00:03.0/vfio", 0, 18)
    assert evs[3].payload[12:] == b"config"
    assert evs[2].header.zero_pages == 3 and evs[2].payload == b""
    assert evs[4].payload == b"\xab" * 4096
    assert evs[-1] == EndOfChannel(len(data))
    # an explicit 7.2 layout refuses device-state packets
    with pytest.raises(BadRecordType, match=r"7\.2"):
        decode_all(data, layout=V72)


def test_detection_by_zero_pages_and_device_state_alone() -> None:
    enc72 = RamPacketEncoder(V72)
    sync72 = bytes(enc72.encode(flags=1, packet_num=0, ramblock="",
                                normal=np.zeros(0, np.uint64), next_packet_size=0))
    init = InitPacket(bytes(16), 0).encode()
    zero_only = bytes(RamPacketEncoder(HEAD).encode(
        flags=0, packet_num=1, ramblock="pc.ram", normal=np.zeros(0, np.uint64),
        zero=np.array([0], np.uint64), next_packet_size=0))
    dec = ChannelDecoder()
    dec.receive_data(init + sync72)
    drain(dec)
    assert dec.layout is V72
    dec.receive_data(zero_only)
    ev = drain(dec)[-1]
    assert dec.layout is HEAD and ev.header.zero_pages == 1
    dec = ChannelDecoder()
    dec.receive_data(init + sync72 + encode_device_state_header("d", 0, 1) + b"x")
    assert isinstance(drain(dec)[-1], DeviceStatePacket)
    assert dec.layout is HEAD


def test_channel_decoder_limits_payloads() -> None:
    init = InitPacket(bytes(16), 0).encode()
    dec = ChannelDecoder(max_device_state_payload=100)
    dec.receive_data(init + encode_device_state_header("d", 0, 101))
    with pytest.raises(BadLength):
        drain(dec)
    pkt = bytes(RamPacketEncoder(HEAD).encode(
        flags=2, packet_num=1, ramblock="pc.ram", normal=np.array([0], np.uint64),
        next_packet_size=MULTIFD_MAX_COMPRESSED_PAYLOAD + 1))
    with pytest.raises(BadLength):
        decode_all(init + pkt)
    with pytest.raises(Mismatch):
        decode_all(init + pkt, max_payload=1 << 30, compression_flag=4)


@st.composite
def head_streams(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, int, int]]]:
    """A random HEAD connection: SYNCs, RAM packets (normal/zero pages), device state."""
    enc = RamPacketEncoder(HEAD)
    parts = [InitPacket(bytes(16), draw(st.integers(0, 7))).encode()]
    expect: list[tuple[str, int, int]] = []
    for num in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["sync", "ram", "dev"]))
        if kind == "sync":
            parts.append(bytes(enc.encode_sync(num)))
            expect.append(("sync", 0, 0))
        elif kind == "ram":
            n = draw(st.integers(0, 4))
            z = draw(st.integers(0 if n else 1, 4))
            offs = np.array(draw(st.permutations(range(16)))[: n + z], np.uint64) * 4096
            parts.append(bytes(enc.encode(flags=0, packet_num=num, ramblock="pc.rom",
                                          normal=offs[:n], zero=offs[n:],
                                          next_packet_size=n * 4096)) + b"\x5a" * n * 4096)
            expect.append(("ram", n, z))
        else:
            size = draw(st.integers(1, 3000))
            parts.append(encode_device_state_header("dev", num, size) + b"d" * size)
            expect.append(("dev", size, 0))
    return b"".join(parts), expect


@settings(max_examples=60, deadline=None)
@given(head_streams(), st.lists(st.integers(1, 5000), min_size=1, max_size=20))
def test_channel_decoder_property(case: tuple[bytes, list], chunks: list[int]) -> None:
    data, expect = case
    dec = ChannelDecoder(blocks=BLOCKS)
    evs: list[object] = []
    pos, i = 0, 0
    while pos < len(data):
        step = chunks[i % len(chunks)]
        dec.receive_data(data[pos : pos + step])
        pos, i = pos + step, i + 1
        evs += drain(dec)
    dec.receive_eof()
    evs += drain(dec)
    assert evs == decode_all(data, blocks=BLOCKS)
    got = []
    for ev in evs[1:-1]:
        if isinstance(ev, DeviceStatePacket):
            got.append(("dev", len(ev.payload), 0))
        elif ev.header.is_sync:
            got.append(("sync", 0, 0))
        else:
            assert ev.payload == b"\x5a" * 4096 * ev.header.normal_pages
            got.append(("ram", ev.header.normal_pages, ev.header.zero_pages))
    assert got == expect
    assert evs[-1] == EndOfChannel(len(data))
