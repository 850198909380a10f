"""VMDESCRIPTION trailer and device-tail splitting (wire/vmdesc.py)."""

from __future__ import annotations

import json
import struct

import pytest
from tests.conftest import CAPTURE_IDS, CAPTURES

from multifd.wire.errors import BadLength, BadName, Mismatch
from multifd.wire.stream import DeviceTail, MainStreamDecoder
from multifd.wire.vmdesc import find_vmdesc, parse_vmdesc_json, split_device_tail


def section(sid: int, name: str, inst: int, body: bytes, ver: int = 1) -> bytes:
    raw = name.encode()
    return (b"\x04" + struct.pack(">I", sid) + bytes([len(raw)]) + raw
            + struct.pack(">II", inst, ver) + body + b"\x7e" + struct.pack(">I", sid))


def trailer(devices) -> bytes:
    js = json.dumps({"page_size": 4096, "devices": devices}).encode()
    return b"\x00\x06" + struct.pack(">I", len(js)) + js


def test_split_synthetic_with_decoy_footers():
    # bodies contain footer-like bytes that are not followed by the next header
    a = section(3, "timer", 0, b"\x7e\x00\x00\x00\x03junk")
    b = section(4, "dma", 0, b"\x7e\x00\x00\x00\x04\x04")
    c = section(5, "dma", 1, b"")
    devs = [{"name": "timer", "instance_id": 0}, {"name": "dma", "instance_id": 0},
            {"name": "dma", "instance_id": 1}]
    tail = a + b + c + trailer(devs)
    off, vm = find_vmdesc(tail)
    assert tail[off] == 6 and vm["devices"] == devs
    split = split_device_tail(tail, vm, base_offset=1000)
    assert split.split and [s.size for s in split.sections] == [len(a), len(b), len(c)]
    assert [s.offset for s in split.sections] == [1000, 1000 + len(a), 1000 + len(a) + len(b)]
    assert split.sections[0].body == b"\x7e\x00\x00\x00\x03junk"
    assert split.eof_offset == 1000 + len(a + b + c) and split.vmdesc_offset == 1000 + off


def test_split_errors():
    devs = [{"name": "timer", "instance_id": 0}, {"name": "dma", "instance_id": 0}]
    a = section(3, "timer", 0, b"xx")
    with pytest.raises(Mismatch):  # the second section is not the one the vmdesc lists
        split_device_tail(a + section(4, "rtc", 0, b"") + trailer(devs), None)
    bad_footer = a[:-4] + struct.pack(">I", 9)
    with pytest.raises(Mismatch):
        split_device_tail(bad_footer + section(4, "dma", 0, b"") + trailer(devs), None)
    assert not split_device_tail(a + b"\x00", None).split  # no vmdesc: unsplit


def test_find_vmdesc_none_and_limits():
    assert find_vmdesc(b"") is None
    assert find_vmdesc(b"\x00\x06\x00\x00\x00\x05{abc") is None  # not JSON
    assert find_vmdesc(b"\x00\x06\x00\x00\x00\x09{}") is None  # length does not reach end
    with pytest.raises(BadLength):
        parse_vmdesc_json(b"{}" * 10, limit=5)
    with pytest.raises(BadName):
        parse_vmdesc_json(b"[1]")
    with pytest.raises(BadName):
        parse_vmdesc_json(b"[" * 100000)


@pytest.mark.parametrize("cap", CAPTURES, ids=CAPTURE_IDS)
def test_split_capture_tails(cap):
    data = cap.main.read_bytes()
    dec = MainStreamDecoder()
    dec.receive_data(data)
    dec.receive_eof()
    tail = b"".join(r.data for r in dec if isinstance(r, DeviceTail))
    assert dec.tail_offset is not None and data[dec.tail_offset :] == tail
    _, vm = find_vmdesc(tail)
    split = split_device_tail(tail, vm, base_offset=dec.tail_offset)
    names = [(d["name"], d["instance_id"]) for d in vm["devices"]]
    assert [(s.idstr, s.instance_id) for s in split.sections] == names
    assert len(names) == (31 if cap.machine.endswith("7.2") else 30)
    # sections are contiguous and end with EOF right before the vmdesc
    pos = dec.tail_offset
    for s in split.sections:
        assert s.offset == pos and data[pos + s.size - 5] == 0x7E
        pos += s.size
    assert split.eof_offset == pos and data[pos] == 0 and split.vmdesc_offset == pos + 1
