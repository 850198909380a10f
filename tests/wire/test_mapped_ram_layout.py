"""mapped-ram file layout: the block list pieces QEMU 10.0 writes, region checks, page runs,
and the main-stream decoder seeking past block regions (checked on QEMU 10.0's file)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tests.conftest import CAPTURES_ROOT

from multifd.wire.buffer import NEED_DATA
from multifd.wire.errors import BadLength, BadOffset, Mismatch, Truncated
from multifd.wire.mapped_ram import (
    BlockRegion,
    MappedRamHeader,
    bitmap_size,
    check_pages_in_file,
    check_region,
    check_regions,
    header_for,
    page_runs,
    plan_block_list,
)
from multifd.wire.ram import RamMemSize
from multifd.wire.stream import DeviceTail, MainStreamDecoder

CAP = CAPTURES_ROOT / "qemu10-captures" / "mapped-ram" / "main.bin.gz"
BLOCKS = [("pc.ram", 0x4000000), ("/rom@etc/acpi/tables", 0x20000), ("pc.bios", 0x40000),
          ("pc.rom", 0x20000), ("/rom@etc/table-loader", 0x1000), ("/rom@etc/acpi/rsdp", 0x1000)]


@pytest.fixture(scope="module")
def qemu_file() -> bytes:
    with gzip.open(CAP) as f:
        return f.read()


def test_block_list_is_byte_exact_with_qemu10(qemu_file: bytes) -> None:
    """MEM_SIZE at 0x5b; every (offset, bytes) piece equals QEMU's; the stream goes on at
    0x4601000 with the START's EOS (README §6)."""
    pieces, regions, end = plan_block_list(BLOCKS, 0x5B, 4096)
    assert [off for off, _ in pieces] == [0x5B, 0x4100000, 0x4220000, 0x4340000, 0x4420000,
                                          0x4501000]
    for off, data in pieces:
        assert qemu_file[off : off + len(data)] == data
    assert end == 0x4601000
    assert qemu_file[end : end + 8] == (0x10).to_bytes(8, "big")  # EOS
    assert regions[0].header == MappedRamHeader(1, 4096, 0x8E, 0x100000)
    check_regions(regions)
    for r in regions:
        check_region(r, page_size=4096, file_size=len(qemu_file))


@given(st.lists(st.tuples(st.text("abc/.", min_size=1, max_size=30),
                          st.integers(1, 5000)), min_size=1, max_size=6,
                unique_by=lambda t: t[0]),
       st.integers(0, 1 << 30))
def test_plan_is_consistent(blocks: list[tuple[str, int]], at: int) -> None:
    pieces, regions, end = plan_block_list([(n, p * 4096) for n, p in blocks], at, 4096)
    check_regions(regions)
    prev_end = at
    for (off, data), r in zip(pieces, regions, strict=True):
        assert off == prev_end
        hdr_at = off + len(data) - MappedRamHeader.SIZE
        assert MappedRamHeader.decode(data, offset=len(data) - 28) == r.header
        assert r.header == header_for(hdr_at, r.used_length, 4096)
        assert r.header.pages_offset % (1 << 20) == 0
        assert r.header.bitmap_offset + bitmap_size(r.num_pages) <= r.header.pages_offset
        prev_end = r.end
    assert end == prev_end


def _region(bmp: int, pages: int, used: int = 0x10000, ps: int = 4096,
            name: str = "b") -> BlockRegion:
    return BlockRegion(name, used, MappedRamHeader(1, ps, bmp, pages))


def test_region_checks_name_block_and_offset() -> None:
    with pytest.raises(Mismatch, match=r"block 'b'.*page size") as e:
        check_region(_region(0x100, 0x100000, ps=8192), page_size=4096, file_size=1 << 30)
    assert e.value.offset == 0x100 - 28
    with pytest.raises(BadOffset, match=r"bitmap .* runs past"):
        check_region(_region(0x100000 - 4, 0x100000), page_size=4096, file_size=1 << 30)
    with pytest.raises(Truncated, match="bitmap past the end"):
        check_region(_region(0x100, 0x100000), page_size=4096, file_size=0x101)
    with pytest.raises(BadLength, match="whole number"):
        check_region(_region(0x100, 0x100000, used=4097), page_size=4096, file_size=1 << 30)
    check_region(_region(0, 0), page_size=65536, file_size=0)  # ignored block
    with pytest.raises(BadOffset, match=r"block 'c'.*overlaps block 'b'"):
        check_regions([_region(0x100, 0x100000, name="b"),
                       _region(0x100000 + 0x8000, 0x200000, name="c")])
    mask = np.zeros(16, dtype=bool)
    mask[15] = True
    with pytest.raises(Truncated, match="page 15"):
        check_pages_in_file(_region(0x100, 0x100000), mask, 0x100000 + 15 * 4096)
    check_pages_in_file(_region(0x100, 0x100000), mask, 0x100000 + 16 * 4096)


@given(arrays(np.bool_, st.integers(0, 300)))
def test_page_runs(mask: np.ndarray) -> None:
    starts, counts = page_runs(mask)
    rebuilt = np.zeros(mask.size, dtype=bool)
    for s, c in zip(starts.tolist(), counts.tolist(), strict=True):
        assert c > 0
        rebuilt[s : s + c] = True
    assert np.array_equal(rebuilt, mask)
    assert all(starts[1:] > starts[:-1] + counts[:-1]) if starts.size > 1 else True


def test_decoder_seeks_past_regions(qemu_file: bytes) -> None:
    """Fed the way a file reader feeds it (1 MiB reads, jumping where the decoder says),
    the whole QEMU 10.0 file decodes while reading only ~1.3 MiB of its 70 MiB."""
    dec = MainStreamDecoder(opaque_tail=True)
    pos = fed = 0
    seen: list[object] = []
    while True:
        chunk = qemu_file[pos : pos + (1 << 20)]
        pos += len(chunk)
        fed += len(chunk)
        if chunk:
            dec.receive_data(chunk)
        else:
            dec.receive_eof()
        while (rec := dec.next_record()) is not NEED_DATA:
            seen.append(rec)
        pos += dec.seek_past_region()
        if not chunk:
            break
    assert dec.finished
    mem = next(r for r in seen if isinstance(r, RamMemSize))
    assert [b.name for b in mem.blocks] == [n for n, _ in BLOCKS]
    tail = b"".join(r.data for r in seen if isinstance(r, DeviceTail))
    assert dec.tail_offset == 0x4601036  # README §6: the first device ("timer") section
    assert tail == qemu_file[0x4601036:]
    assert fed < 8 << 20
