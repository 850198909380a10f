"""mapped-ram header and bitmap helpers, checked against QEMU 10.0's mapped-ram file."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tests.conftest import CAPTURES_ROOT

from multifd.wire.errors import BadLength, BadOffset, Mismatch, Truncated, UnsupportedVersion
from multifd.wire.mapped_ram import (
    MappedRamHeader,
    bitmap_size,
    bitmap_to_pages,
    pages_offset_for,
    pages_to_bitmap,
)

CAP = CAPTURES_ROOT / "qemu10-captures" / "mapped-ram"
PATTERN = CAPTURES_ROOT / "qemu-captures" / "pattern-4MiB.bin"


def test_header_layout_and_round_trip() -> None:
    hdr = MappedRamHeader(1, 4096, 0x8E, 0x100000)
    raw = hdr.encode()
    assert raw == bytes.fromhex(
        "00000001 0000000000001000 000000000000008e 0000000000100000")
    assert MappedRamHeader.decode(raw) == hdr
    assert MappedRamHeader.decode(b"ab" + raw, offset=2, page_size=4096) == hdr
    assert MappedRamHeader.SIZE == 28
    assert MappedRamHeader.decode(MappedRamHeader(1, 4096, 0, 0).encode()).pages_offset == 0


@given(st.integers(0, 1), st.integers(9, 21), st.integers(0, 2**40), st.integers(0, 2**20))
def test_header_property(version: int, shift: int, bmp: int, extra_pages: int) -> None:
    ps = 1 << shift
    pages = (bmp + ps - 1) // ps * ps + extra_pages * ps
    hdr = MappedRamHeader(version, ps, bmp, pages)
    assert MappedRamHeader.decode(hdr.encode()) == hdr


@pytest.mark.parametrize(
    ("fields", "exc"),
    [
        ((2, 4096, 0, 0x100000), UnsupportedVersion),
        ((1, 4095, 0, 0x100000), BadLength),
        ((1, 0, 0, 0x100000), BadLength),
        ((1, 4096, 0, 0x100800), BadOffset),
        ((1, 4096, 0x200000, 0x100000), BadOffset),
    ],
)
def test_header_validation(fields: tuple[int, int, int, int], exc: type) -> None:
    import struct

    with pytest.raises(exc):
        MappedRamHeader.decode(struct.pack(">IQQQ", *fields))
    with pytest.raises(exc):
        MappedRamHeader(*fields).encode()


def test_header_short_and_page_size_mismatch() -> None:
    with pytest.raises(Truncated):
        MappedRamHeader.decode(bytes(27))
    with pytest.raises(Mismatch):
        MappedRamHeader.decode(MappedRamHeader(1, 4096, 0, 0).encode(), page_size=65536)


def test_sizes_and_alignment() -> None:
    assert [bitmap_size(n) for n in (0, 1, 64, 65, 16384)] == [0, 8, 8, 16, 2048]
    assert pages_offset_for(0x8E, 2048) == 0x100000
    assert pages_offset_for(0x4100039, 8) == 0x4200000
    assert pages_offset_for(0x100000 - 8, 8) == 0x100000
    assert pages_offset_for(0x100000 - 7, 8) == 0x200000


@given(arrays(np.bool_, st.integers(0, 700)))
def test_bitmap_round_trip(mask: np.ndarray) -> None:
    bmp = pages_to_bitmap(mask)
    assert len(bmp) == bitmap_size(len(mask))
    assert np.array_equal(bitmap_to_pages(bmp, len(mask)), mask)
    # little-endian u64 words: bit i of the word array is page i
    words = np.frombuffer(bmp, dtype="<u8")
    for i in np.flatnonzero(mask)[:20].tolist():
        assert (int(words[i // 64]) >> (i % 64)) & 1


def test_bitmap_too_short() -> None:
    with pytest.raises(BadLength):
        bitmap_to_pages(bytes(8), 65)
    mask = bitmap_to_pages(b"\xff" * 8, 3)  # bits past num_pages are ignored
    assert len(mask) == 3 and mask.all()


def test_qemu10_mapped_ram_file() -> None:
    """Every block's header and bitmap in QEMU 10.0's file decode as the README says, and
    the set bits of pc.ram are exactly the non-zero pattern pages found at their slots."""
    meta = json.loads((CAP / "meta.json").read_text())
    table = [
        ("pc.ram", 0x4000000, 0x72, 0x8E, 0x100000, 768),
        ("/rom@etc/acpi/tables", 0x20000, 0x410001D, 0x4100039, 0x4200000, 2),
        ("pc.bios", 0x40000, 0x4220010, 0x422002C, 0x4300000, 46),
        ("pc.rom", 0x20000, 0x434000F, 0x434002B, 0x4400000, 0),
        ("/rom@etc/table-loader", 0x1000, 0x442001E, 0x442003A, 0x4500000, 1),
        ("/rom@etc/acpi/rsdp", 0x1000, 0x450101B, 0x4501037, 0x4600000, 1),
    ]
    assert meta["layout"]  # the capture documents its own layout
    pattern = PATTERN.read_bytes()
    with gzip.open(CAP / "main.bin.gz") as f:
        head = f.read(0x100000 + 0x100000 + len(pattern))
        f.seek(0x4100000)
        tail = f.read(0x4601040 - 0x4100000)

    def at(off: int, n: int) -> bytes:
        return head[off : off + n] if off < len(head) else tail[off - 0x4100000 :][:n]

    for name, used, hdr_at, bmp_at, pages_at, nbits in table:
        idstr = name.encode()
        assert at(hdr_at - 8 - len(idstr), len(idstr)) == idstr
        hdr = MappedRamHeader.decode(at(hdr_at, 28), page_size=4096)
        assert hdr == MappedRamHeader(1, 4096, bmp_at, pages_at)
        npages = used // 4096
        assert hdr.bitmap_offset == hdr_at + 28
        assert hdr.pages_offset == pages_offset_for(hdr.bitmap_offset, bitmap_size(npages))
        mask = bitmap_to_pages(at(bmp_at, bitmap_size(npages)), npages)
        assert int(mask.sum()) == nbits
        assert pages_to_bitmap(mask) == at(bmp_at, bitmap_size(npages))
        if name == "pc.ram":
            expect = np.zeros(npages, dtype=bool)
            pat = np.frombuffer(pattern, np.uint8).reshape(-1, 4096)
            expect[256 : 256 + 1024] = pat.any(axis=1)
            assert np.array_equal(mask, expect)
            slot = pages_at + 0x100000
            assert head[slot : slot + len(pattern)] == pattern
