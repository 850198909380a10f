"""Main stream codec (wire/stream.py): round trips, state machine, validation, limits."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multifd.wire import NEED_DATA
from multifd.wire.constants import Command, SectionType
from multifd.wire.errors import (
    BadLength,
    BadMagic,
    BadName,
    BadRecordType,
    Mismatch,
    Truncated,
    UnsupportedVersion,
    WireError,
)
from multifd.wire.ram import RamBlockInfo, RamEos, RamMemSize, RamMultifdFlush, RamZero
from multifd.wire.stream import (
    LENGTH_PREFIXED,
    CommandRecord,
    Configuration,
    DeviceTail,
    EndOfStream,
    FileHeader,
    MainStreamDecoder,
    PackagedData,
    SectionBody,
    SectionFooter,
    SectionHeader,
    VmDescription,
    encode_record,
)

PS = 4096
HDR = encode_record(FileHeader()) + encode_record(Configuration("pc-q35-7.2"))


def decode(data: bytes, chunk: int = 0, eof: bool = True, **kw):
    d = MainStreamDecoder(**kw)
    out = []
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    for p in pieces:
        d.receive_data(p)
        out += list(d)
    if eof:
        d.receive_eof()
        out += list(d)
    return out, d


def merge_tail(recs):
    """Join consecutive DeviceTail chunks (chunking is arbitrary)."""
    out = []
    for r in recs:
        if isinstance(r, DeviceTail) and out and isinstance(out[-1], DeviceTail):
            out[-1] = DeviceTail(out[-1].data + r.data)
        else:
            out.append(r)
    return out


names = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30)
u32 = st.integers(0, 0xFFFFFFFF)
configs = st.builds(
    Configuration,
    names,
    st.one_of(st.none(), u32),
    st.one_of(st.none(), st.lists(names, max_size=4).map(tuple)),
    st.one_of(st.none(), st.binary(min_size=16, max_size=16)),
)


@st.composite
def streams(draw):
    """A valid record sequence: header, config, ram/dev sections, commands, EOF, vmdesc."""
    recs = [FileHeader(), draw(configs)]
    ram_id = draw(u32)
    dev_ids = {}
    have_page = False
    recs += [SectionHeader(SectionType.START, ram_id, "ram", 0, 4),
             RamMemSize(PS, (RamBlockInfo("pc.ram", PS),)),
             RamMultifdFlush(), RamEos(), SectionFooter(ram_id)]
    for _ in range(draw(st.integers(0, 5))):
        k = draw(st.sampled_from(["ram", "dev", "cmd", "pkg"]))
        if k == "ram":
            t = draw(st.sampled_from([SectionType.PART, SectionType.END]))
            cont = have_page and draw(st.booleans())
            have_page = True
            recs += [SectionHeader(t, ram_id), RamZero(0, "pc.ram", 0, cont),
                     RamEos(), SectionFooter(ram_id)]
        elif k == "dev":
            sid = draw(u32.filter(lambda v: v != ram_id))
            if sid in dev_ids:
                hdr = SectionHeader(SectionType.PART, sid)
            else:
                hdr = SectionHeader(SectionType.FULL, sid, "mydev", draw(u32), draw(u32))
                dev_ids[sid] = hdr
            recs += [hdr, SectionBody(draw(st.binary(max_size=100))), SectionFooter(sid)]
        elif k == "cmd":
            cmd = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 9, 10, 11]))
            n = {1: 0, 2: 4, 3: draw(st.sampled_from([0, 16])), 4: 0, 5: 0, 8: 0, 9: 0,
                 11: 0}.get(cmd, draw(st.integers(0, 40)))
            recs.append(CommandRecord(cmd, draw(st.binary(min_size=n, max_size=n))))
        else:
            data = draw(st.binary(max_size=64))
            recs += [CommandRecord(Command.PACKAGED, struct.pack(">I", len(data))),
                     PackagedData(data)]
    if draw(st.booleans()):
        recs.append(DeviceTail(b"\x04" + struct.pack(">I", 99) + b"\x05timer" + bytes(8)
                               + draw(st.binary(max_size=50))))
    else:
        recs.append(EndOfStream())
        if draw(st.booleans()):
            recs.append(VmDescription(draw(st.binary(max_size=80))))
    return recs


def _drop_empty(recs):
    return [r for r in recs if not (isinstance(r, PackagedData) and not r.data)]


@settings(max_examples=80, deadline=None)
@given(streams(), st.integers(0, 64))
def test_stream_round_trip(recs, chunk):
    data = b"".join(encode_record(r) for r in recs)
    out, d = decode(data, chunk, body_parsers={"mydev": LENGTH_PREFIXED})
    assert d.finished
    assert merge_tail(out) == recs
    assert b"".join(encode_record(r) for r in out) == data


@settings(max_examples=40, deadline=None)
@given(streams(), st.data())
def test_truncation_never_crashes(recs, data_st):
    data = b"".join(encode_record(r) for r in recs)
    cut = data_st.draw(st.integers(0, len(data)))
    try:
        decode(data[:cut], body_parsers={"mydev": LENGTH_PREFIXED})
    except WireError as e:
        assert e.offset is not None and 0 <= e.offset <= cut


@given(configs)
def test_configuration_round_trip(cfg):
    data = encode_record(FileHeader()) + encode_record(cfg)
    d2 = MainStreamDecoder()
    d2.receive_data(data)
    d2.receive_eof()
    assert d2.next_record() == FileHeader()
    assert d2.next_record() == cfg
    with pytest.raises(Truncated):
        d2.next_record()


def test_configuration_waits_for_next_byte():
    d = MainStreamDecoder()
    d.receive_data(HDR)
    assert d.next_record() == FileHeader()
    assert d.next_record() is NEED_DATA  # a subsection may still follow
    d.receive_data(b"\x00")
    assert d.next_record() == Configuration("pc-q35-7.2")
    assert d.next_record() == EndOfStream()


def expect(data: bytes, cls: type[WireError], **kw) -> WireError:
    with pytest.raises(cls) as ei:
        decode(data, **kw)
    return ei.value


def test_header_errors():
    assert expect(b"QEVX\x00\x00\x00\x03", BadMagic).offset == 0
    assert expect(b"QEVM\x00\x00\x00\x02", UnsupportedVersion).offset == 4
    assert expect(b"QEVM\x00\x00\x00\x04", UnsupportedVersion).offset == 4
    assert isinstance(expect(b"QEVM\x00\x00\x00\x03\x01", BadRecordType), BadRecordType)
    out, _ = decode(b"QEVM\x00\x00\x00\x03\x00", expect_configuration=False)
    assert out == [FileHeader(), EndOfStream()]


def test_unknown_type_byte_is_named():
    e = expect(HDR + b"\x09", BadRecordType)
    assert e.value == 9 and e.offset == len(HDR)
    assert "unknown section type" in str(e)
    assert expect(HDR + b"\x06\x00\x00\x00\x00", BadRecordType).what.startswith("VMDESC")
    assert expect(HDR + b"\x7e\x00\x00\x00\x01", BadRecordType).what.startswith("section")


def test_footer_must_match():
    start = encode_record(SectionHeader(SectionType.START, 2, "ram", 0, 4))
    body = encode_record(RamMemSize(0, ())) + encode_record(RamEos())
    e = expect(HDR + start + body + encode_record(SectionFooter(3)), Mismatch)
    assert e.offset == len(HDR) + len(start) + len(body) + 1
    e = expect(HDR + start + body + b"\x00", BadRecordType)
    assert "footer" in e.what


def test_part_of_unknown_section():
    assert expect(HDR + b"\x02\x00\x00\x00\x07", Mismatch).value == 7


def test_commands():
    ok = [CommandRecord(1), CommandRecord(2, b"\x00\x00\x00\x01"), CommandRecord(3, bytes(16)),
          CommandRecord(11)]
    out, _ = decode(HDR + b"".join(encode_record(c) for c in ok) + b"\x00")
    assert out[2:-1] == ok
    assert expect(HDR + b"\x08\x00\x0c\x00\x00", BadRecordType).value == 12
    assert expect(HDR + b"\x08\x00\x00\x00\x00", BadRecordType).value == 0
    assert expect(HDR + b"\x08\x00\x02\x00\x03abc", BadLength).value == 3
    assert expect(HDR + b"\x08\x00\x03\x00\x08" + bytes(8), BadLength).value == 8
    e = expect(HDR + b"\x08\x00\x0b\x00\x00", BadRecordType, allow_switchover_start=False)
    assert e.value == 11
    # PACKAGED: the L raw bytes after it, with a limit
    pkg = HDR + b"\x08\x00\x07\x00\x04\x00\x00\x00\x03abc\x00"
    out, _ = decode(pkg)
    assert out[2:] == [CommandRecord(7, b"\x00\x00\x00\x03"), PackagedData(b"abc"),
                       EndOfStream()]
    assert expect(pkg, BadLength, max_record=2).value == 3


def test_vmdesc_limit_and_trailing_data():
    assert expect(HDR + b"\x00\x06\x00\x00\x01\x00", BadLength, max_vmdesc=255).value == 256
    assert isinstance(expect(HDR + b"\x00\x06\x00\x00\x00\x00\x00", BadRecordType),
                      BadRecordType)
    assert isinstance(expect(HDR + b"\x00\x01", BadRecordType), BadRecordType)


def test_body_limit_and_no_tail():
    dev = encode_record(SectionHeader(SectionType.FULL, 5, "mydev", 0, 1))
    body = struct.pack(">I", 1000) + bytes(1000)
    e = expect(HDR + dev + body, BadLength, body_parsers={"mydev": LENGTH_PREFIXED},
               max_record=999)
    assert e.value == 1000 and e.offset == len(HDR) + len(dev)
    e = expect(HDR + dev + body, BadName, opaque_tail=False)
    assert e.value == "mydev"


def test_opaque_tail_chunks_and_offset():
    dev = encode_record(SectionHeader(SectionType.FULL, 5, "timer", 0, 1))
    tail = dev + bytes(300_000) + b"\x00"
    out, d = decode(HDR + tail, chunk=70_000)
    assert d.tail_offset == len(HDR) and d.in_tail and d.finished
    chunks = [r for r in out if isinstance(r, DeviceTail)]
    assert len(chunks) > 1 and b"".join(c.data for c in chunks) == tail


def test_truncated_stream_messages():
    e = expect(HDR + b"\x00"[:0], Truncated)
    assert e.what == "stream ended before QEMU_VM_EOF" and e.offset == len(HDR), e
    d = MainStreamDecoder()
    d.receive_data(HDR + b"\x01\x00\x00")
    list(d)
    d.receive_eof()
    with pytest.raises(Truncated) as ei:
        d.next_record()
    assert ei.value.offset == len(HDR)
    with pytest.raises(Truncated):  # the error sticks
        d.next_record()
