"""mapped-ram: the per-block MappedRamHeader and the dirty-bitmap helpers.

QEMU source: migration/ram.c (`mapped_ram_setup_ramblock`, `ram_save_file_bmap`,
`parse_ramblock_mapped_ram`), docs/devel/migration/mapped-ram.rst; qemu-reference.md §6.
MappedRamHeader (28 bytes, packed, big-endian), written after each block entry::

    0 be32 version (1) | 4 be64 page_size | 12 be64 bitmap_offset | 20 be64 pages_offset

bitmap_offset is the file position right after the header; pages_offset rounds
bitmap_offset + bitmap_size up to 1 MiB; page i lives at pages_offset + i * page_size. The
bitmap is raw host `unsigned long` words (little-endian u64 on x86-64): bit i = page i written.

The main stream around it (QEMU 10.0, `ram_save_setup` + `mapped_ram_setup_ramblock`): the
ram SECTION_START body opens with be64 (total | MEM_SIZE); each block entry (counted idstr,
be64 used_length, MappedRamHeader) is written at the current file position, then the file
seeks to pages_offset + used_length, where the next entry (or, after the last block, the
START's EOS and the rest of the stream: PART/END sections holding only EOS, device
sections, EOF, vmdesc) goes on::

    [..ram START hdr][MEM_SIZE][entry 1][hdr 1][bitmap 1][pad to 1 MiB][pages 1 ...]
    [entry 2][hdr 2][bitmap 2][pad][pages 2 ...] ... [EOS][footer][PART ...]...[EOF][vmdesc]

`plan_block_list` gives those pieces and offsets; `check_region`/`check_regions` validate
what a file claims (names the block and the offset) before anything is allocated or read.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

import numpy as np

from multifd.wire.constants import (
    MAPPED_RAM_FILE_OFFSET_ALIGNMENT,
    MAPPED_RAM_HDR_VERSION,
    MAPPED_RAM_HEADER_SIZE,
    RamFlag,
)
from multifd.wire.errors import BadLength, BadOffset, Mismatch, Truncated, UnsupportedVersion

__all__ = [
    "BlockRegion",
    "MappedRamHeader",
    "bitmap_size",
    "bitmap_to_pages",
    "check_pages_in_file",
    "check_region",
    "check_regions",
    "header_for",
    "page_runs",
    "pages_offset_for",
    "pages_to_bitmap",
    "plan_block_list",
]

_HDR: Final = struct.Struct(">IQQQ")
_U64: Final = struct.Struct(">Q")
assert _HDR.size == MAPPED_RAM_HEADER_SIZE


@dataclass(frozen=True, slots=True)
class MappedRamHeader:
    """Where a block's bitmap and pages live in a mapped-ram file (both 0: ignored block)."""

    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int

    SIZE: ClassVar[int] = MAPPED_RAM_HEADER_SIZE

    def encode(self) -> bytes:
        self._validate()
        return _HDR.pack(self.version, self.page_size, self.bitmap_offset, self.pages_offset)

    @classmethod
    def decode(
        cls,
        buf: bytes | bytearray | memoryview,
        *,
        offset: int = 0,
        page_size: int | None = None,
    ) -> MappedRamHeader:
        """Decode the 28 bytes at buf[offset:]; page_size, when given, must match."""
        if len(buf) - offset < MAPPED_RAM_HEADER_SIZE:
            raise Truncated("mapped-ram header too short", field="length",
                            value=max(0, len(buf) - offset))
        hdr = cls(*_HDR.unpack_from(buf, offset))
        hdr._validate()
        if page_size is not None and hdr.page_size != page_size:
            raise Mismatch(f"mapped-ram page size differs from ours ({page_size})",
                           field="page_size", value=hdr.page_size)
        return hdr

    def _validate(self) -> None:
        if not 0 <= self.version <= MAPPED_RAM_HDR_VERSION:
            raise UnsupportedVersion("mapped-ram header version", field="version",
                                     value=self.version)
        ps = self.page_size
        if ps <= 0 or ps & (ps - 1):
            raise BadLength("mapped-ram page size not a power of two", field="page_size",
                            value=ps)
        if self.pages_offset % ps:
            raise BadOffset("mapped-ram pages_offset not page-aligned", field="pages_offset",
                            value=self.pages_offset)
        if self.pages_offset < self.bitmap_offset:
            raise BadOffset("mapped-ram pages_offset before bitmap_offset",
                            field="pages_offset", value=self.pages_offset)


def bitmap_size(num_pages: int) -> int:
    """Bytes of a bitmap for num_pages bits, in whole 64-bit words."""
    if num_pages < 0:
        raise ValueError("negative page count")
    return (num_pages + 63) // 64 * 8


def pages_offset_for(bitmap_offset: int, bitmap_size: int) -> int:
    """pages_offset: the first 1 MiB boundary at or after the end of the bitmap."""
    align = MAPPED_RAM_FILE_OFFSET_ALIGNMENT
    return (bitmap_offset + bitmap_size + align - 1) // align * align


def bitmap_to_pages(bitmap_bytes: bytes | bytearray | memoryview, num_pages: int) -> np.ndarray:
    """A bool array, True where page i's bit is set; bits past num_pages are ignored."""
    need = bitmap_size(num_pages)
    if len(bitmap_bytes) < need:
        raise BadLength(f"mapped-ram bitmap shorter than {need} bytes", field="length",
                        value=len(bitmap_bytes))
    raw = np.frombuffer(bitmap_bytes, dtype=np.uint8, count=need)
    return np.unpackbits(raw, count=num_pages, bitorder="little").view(np.bool_)


def pages_to_bitmap(mask: np.ndarray) -> bytes:
    """The on-disk bitmap (little-endian u64 words) of a bool/0-1 array of pages."""
    m = np.asarray(mask).astype(np.bool_, copy=False).ravel()
    packed = np.packbits(m, bitorder="little")
    size = bitmap_size(len(m))
    if len(packed) == size:
        return packed.tobytes()
    return packed.tobytes() + bytes(size - len(packed))


# --------------------------------------------------------------------------- file layout


@dataclass(frozen=True, slots=True)
class BlockRegion:
    """One block's place in a mapped-ram file: its header and what it reserves."""

    name: str
    used_length: int
    header: MappedRamHeader

    @property
    def num_pages(self) -> int:
        return self.used_length // self.header.page_size

    @property
    def bitmap_len(self) -> int:
        return bitmap_size(self.num_pages)

    @property
    def end(self) -> int:
        """First byte after the block's pages: where the next entry starts."""
        return self.header.pages_offset + self.used_length

    @property
    def ignored(self) -> bool:
        """Both offsets 0: an x-ignore-shared block, nothing reserved."""
        return self.header.pages_offset == 0 and self.header.bitmap_offset == 0


def header_for(header_at: int, used_length: int, page_size: int) -> MappedRamHeader:
    """The header QEMU writes at file offset `header_at` (mapped_ram_setup_ramblock): the
    bitmap right after its 28 bytes, the pages at the next 1 MiB boundary."""
    bmp = header_at + MAPPED_RAM_HEADER_SIZE
    size = bitmap_size(used_length // page_size)
    return MappedRamHeader(MAPPED_RAM_HDR_VERSION, page_size, bmp, pages_offset_for(bmp, size))


def plan_block_list(
    blocks: Sequence[tuple[str, int]], at: int, page_size: int
) -> tuple[list[tuple[int, bytes]], list[BlockRegion], int]:
    """The MEM_SIZE block list of a mapped-ram stream whose MEM_SIZE word is at file offset
    `at`: the (offset, bytes) pieces to write, each block's region, and the offset where
    the stream goes on (the START's EOS)."""
    total = 0
    for name, used in blocks:
        if used <= 0 or used % page_size:
            raise BadLength(f"block {name!r}: used_length not a whole number of pages",
                            field="used_length", value=used)
        total += used
    pieces: list[tuple[int, bytes]] = []
    regions: list[BlockRegion] = []
    start, cur = at, bytearray(_U64.pack(total | RamFlag.MEM_SIZE))
    for name, used in blocks:
        raw = name.encode()
        if not 0 < len(raw) <= 255:
            raise BadLength("block name must be 1..255 bytes", field="idstr", value=name)
        cur += bytes((len(raw),)) + raw + _U64.pack(used)
        hdr = header_for(start + len(cur), used, page_size)
        cur += hdr.encode()
        pieces.append((start, bytes(cur)))
        region = BlockRegion(name, used, hdr)
        regions.append(region)
        start, cur = region.end, bytearray()
    return pieces, regions, start



def check_region(region: BlockRegion, *, page_size: int, file_size: int,
                 at: int | None = None) -> None:
    """What one block entry claims, checked against our page size and the file's size
    (`at`: where its header is, for the error). Nothing is read or allocated before this."""
    hdr, name = region.header, region.name
    where = at if at is not None else hdr.bitmap_offset - MAPPED_RAM_HEADER_SIZE
    if region.ignored:
        return
    if hdr.page_size != page_size:
        raise Mismatch(f"block {name!r}: mapped-ram page size differs from ours "
                       f"({page_size})", field="page_size", value=hdr.page_size, offset=where)
    if region.used_length % page_size:
        raise BadLength(f"block {name!r}: used_length not a whole number of pages",
                        field="used_length", value=region.used_length, offset=where)
    if hdr.bitmap_offset + region.bitmap_len > hdr.pages_offset:
        raise BadOffset(f"block {name!r}: bitmap ({region.bitmap_len} bytes) runs past the "
                        f"block's pages_offset {hdr.pages_offset:#x}",
                        field="bitmap_offset", value=hdr.bitmap_offset, offset=where)
    if hdr.bitmap_offset + region.bitmap_len > file_size:
        raise Truncated(f"block {name!r}: bitmap past the end of the file ({file_size} bytes)",
                        field="bitmap_offset", value=hdr.bitmap_offset, offset=where)


def check_regions(regions: Sequence[BlockRegion]) -> None:
    """No two blocks' reserved regions (bitmap through last page) overlap."""
    live = sorted((r for r in regions if not r.ignored), key=lambda r: r.header.bitmap_offset)
    for a, b in itertools.pairwise(live):
        if b.header.bitmap_offset < a.end:
            raise BadOffset(f"block {b.name!r}: region overlaps block {a.name!r} "
                            f"(which ends at {a.end:#x})", field="bitmap_offset",
                            value=b.header.bitmap_offset)


def check_pages_in_file(region: BlockRegion, mask: np.ndarray, file_size: int) -> None:
    """Every page the bitmap says is present lies inside the file."""
    idx = np.flatnonzero(mask)
    if not idx.size:
        return
    last = int(idx[-1])
    end = region.header.pages_offset + (last + 1) * region.header.page_size
    if end > file_size:
        raise Truncated(f"block {region.name!r}: page {last} is in the bitmap but past the "
                        f"end of the file ({file_size} bytes)", field="page", value=last,
                        offset=end - region.header.page_size)


def page_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first page, page count) of every run of True in `mask`, without a loop per page."""
    m = np.asarray(mask, dtype=np.bool_).ravel()
    edges = np.diff(np.concatenate(([0], m.view(np.int8), [0])).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    return starts, np.flatnonzero(edges == -1) - starts
