"""RAM section records (wire/ram.py): round trips, CONTINUE tracking, validation."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multifd.wire import NEED_DATA, ReceiveBuffer
from multifd.wire.buffer import NeedData
from multifd.wire.errors import BadLength, BadName, BadOffset, BadRecordType, WireError
from multifd.wire.mapped_ram import MappedRamHeader
from multifd.wire.ram import (
    RamBlockInfo,
    RamCompressedPage,
    RamEos,
    RamMemSize,
    RamMultifdFlush,
    RamPage,
    RamRecordReader,
    RamRecordWriter,
    RamSettings,
    RamXbzrle,
    RamZero,
    encode_ram_record,
)

PS = 4096


def decode_all(data: bytes, s: RamSettings = RamSettings(), blocks=None, chunk: int = 0):
    """Decode RAM records; chunk > 0 feeds that many bytes at a time."""
    reader = RamRecordReader(s, blocks)
    buf = ReceiveBuffer()
    out = []
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    for piece in pieces:
        buf.feed(piece)
        while True:
            try:
                rec = reader.read(buf)
            except NeedData:
                buf.rollback()
                break
            buf.commit()
            if rec is not None:
                out.append(rec)
    assert buf.available == 0
    return out, reader


names = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)
offsets = st.integers(0, (1 << 40) // PS).map(lambda n: n * PS)


@st.composite
def record_sequences(draw):
    """A valid sequence: CONTINUE only after a record of the same block."""
    recs = []
    last = None
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["zero", "page", "xbz", "comp", "eos", "flush"]))
        if kind == "eos":
            recs.append(RamEos())
            continue
        if kind == "flush":
            recs.append(RamMultifdFlush())
            continue
        block = draw(names) if last is None or draw(st.booleans()) else last
        cont = block == last and draw(st.booleans())
        off = draw(offsets)
        if kind == "zero":
            recs.append(RamZero(off, block, draw(st.integers(0, 255)), cont))
        elif kind == "page":
            recs.append(RamPage(off, block, draw(st.binary(min_size=PS, max_size=PS)), cont))
        elif kind == "xbz":
            recs.append(RamXbzrle(off, block, draw(st.binary(max_size=200)), cont))
        else:
            recs.append(RamCompressedPage(off, block, draw(st.binary(max_size=300)), cont))
        last = block
    return recs


@settings(max_examples=60, deadline=None)
@given(record_sequences(), st.integers(0, 50))
def test_record_round_trip(recs, chunk):
    data = b"".join(encode_ram_record(r) for r in recs)
    out, _ = decode_all(data, chunk=chunk)
    assert out == recs
    assert b"".join(encode_ram_record(r) for r in out) == data


block_infos = st.builds(
    RamBlockInfo,
    names,
    st.integers(0, 1 << 30).map(lambda n: n * PS),
    st.one_of(st.none(), st.integers(0, 1 << 63)),
    st.one_of(st.none(), st.integers(0, 1 << 63)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(block_infos, max_size=6, unique_by=lambda b: b.name), st.booleans(),
       st.booleans(), st.integers(0, 20))
def test_mem_size_round_trip(blocks, with_ps, with_addr, chunk):
    blocks = [
        RamBlockInfo(b.name, b.used_length + PS, (b.page_size or PS) if with_ps else None,
                     (b.addr or 0) if with_addr else None)
        for b in blocks
    ]
    s = RamSettings(postcopy_page_size_fields=with_ps, ignore_shared=with_addr)
    rec = RamMemSize(sum(b.used_length for b in blocks), tuple(blocks))
    data = encode_ram_record(rec, s)
    out, reader = decode_all(data, s, chunk=chunk)
    assert out == [rec]
    assert encode_ram_record(out[0], s) == data
    assert reader.block_lengths == {b.name: b.used_length for b in blocks}


def test_writer_sets_continue():
    w = RamRecordWriter()
    page = bytes(range(256)) * 16
    data = (w.mem_size([RamBlockInfo("pc.ram", 16 * PS), RamBlockInfo("rom", PS)])
            + w.zero("pc.ram", 0) + w.zero("pc.ram", PS) + w.page("pc.ram", 2 * PS, page)
            + w.page("rom", 0, page) + w.zero("pc.ram", 3 * PS) + w.multifd_flush() + w.eos())
    head, body = w.page_iov("pc.ram", 4 * PS, memoryview(page))
    assert bytes(body) == page and struct.unpack(">Q", head)[0] == 4 * PS | 0x08 | 0x20
    out, _ = decode_all(data)
    assert [getattr(r, "cont", None) for r in out] == [None, False, True, True, False, False,
                                                       None, None]
    assert out[3] == RamPage(2 * PS, "pc.ram", page, True)
    assert out[5] == RamZero(3 * PS, "pc.ram", 0, False)
    # the writer's output is the same as the generic encoder with the decoded cont bits
    assert b"".join(encode_ram_record(r) for r in out) == data


def test_mapped_ram_block_entry_skips_region():
    s = RamSettings(mapped_ram=True)
    hdr_at = 8 + 1 + 6 + 8
    mr = MappedRamHeader(1, PS, hdr_at + 28, 0x100000)
    rec = RamMemSize(2 * PS, (RamBlockInfo("pc.ram", 2 * PS, mapped_ram=mr),))
    entry = encode_ram_record(rec, s)
    region = bytes(0x100000 + 2 * PS - len(entry))
    data = entry + region + encode_ram_record(RamEos())
    for chunk in (0, 4096, 777):
        out, reader = decode_all(data, s, chunk=chunk)
        assert out == [rec, RamEos()]
        assert reader.skipped == [(len(entry), len(region))]


def test_mapped_ram_rejects_page_records():
    s = RamSettings(mapped_ram=True)
    with pytest.raises(BadRecordType):
        decode_all(encode_ram_record(RamZero(0, "pc.ram")), s)


def _err(data, s=RamSettings(), blocks=None):
    with pytest.raises(WireError) as ei:
        decode_all(data, s, blocks)
    return ei.value


def test_lying_mem_size_total_is_bounded():
    # total much larger than the listed blocks: the list stops at the end of data (NEED_DATA)
    data = struct.pack(">Q", (1 << 50) | 4) + b"\x06pc.ram" + struct.pack(">Q", PS)
    out, reader = decode_all(data)
    assert out == [] and reader.in_mem_size
    # a block longer than what is left of the total
    bad = struct.pack(">Q", PS | 4) + b"\x06pc.ram" + struct.pack(">Q", 2 * PS)
    assert isinstance(_err(bad), BadLength)
    # zero-length entries cannot make it collect forever
    many = struct.pack(">Q", PS | 4) + b"".join(
        bytes([2]) + f"{i:02x}".encode() + bytes(8) for i in range(200))
    e = _err(many, RamSettings(max_blocks=100))
    assert "too many" in e.what


def test_validation_errors():
    page = bytes(PS)
    assert isinstance(_err(struct.pack(">Q", 0x22) + b"\x00"), BadName)  # CONTINUE, no block
    e = _err(encode_ram_record(RamZero(0, "nope")), blocks={"pc.ram": PS})
    assert isinstance(e, BadName) and e.what == "unknown RAM block" and e.offset == 8
    e = _err(encode_ram_record(RamPage(PS, "pc.ram", page)), blocks={"pc.ram": PS})
    assert isinstance(e, BadOffset) and e.offset == 0
    assert isinstance(_err(struct.pack(">Q", 0x200), RamSettings(allow_multifd_flush=False)),
                      BadRecordType)
    assert "Unknown combination" in _err(struct.pack(">Q", 0x0A) + b"\x01a").what  # ZERO|PAGE
    assert isinstance(_err(struct.pack(">Q", 0x80)), BadRecordType)  # HOOK
    assert isinstance(_err(struct.pack(">Q", 0x400)), BadRecordType)  # unknown bit
    assert isinstance(_err(struct.pack(">Q", 0x1010)), BadOffset)  # EOS with an offset
    xbz = struct.pack(">Q", 0x40) + b"\x01a" + struct.pack(">BH", 1, PS + 1)
    assert isinstance(_err(xbz), BadLength)
    assert isinstance(_err(struct.pack(">Q", 0x40) + b"\x01a\x02\x00\x00"), BadRecordType)
    assert isinstance(_err(struct.pack(">Q", 0x02) + b"\x00\x00"), BadName)  # empty name
    comp = struct.pack(">Q", 0x100) + b"\x01a" + struct.pack(">I", 5000)
    assert isinstance(_err(comp), BadLength)
    with pytest.raises(BadOffset):
        encode_ram_record(RamZero(5, "pc.ram"))


def test_blocks_learned_from_mem_size():
    w = RamRecordWriter()
    data = w.mem_size([RamBlockInfo("pc.ram", PS)]) + w.zero("other", 0)
    e = _err(data)
    assert isinstance(e, BadName)
    assert NEED_DATA is not None
