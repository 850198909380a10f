"""mapped-ram: the per-block MappedRamHeader and the dirty-bitmap helpers.

QEMU source: migration/ram.c (`mapped_ram_setup_ramblock`, `ram_save_file_bmap`,
`parse_ramblock_mapped_ram`), docs/devel/migration/mapped-ram.rst; qemu-reference.md §6.
MappedRamHeader (28 bytes, packed, big-endian), written after each block entry::

    0 be32 version (1) | 4 be64 page_size | 12 be64 bitmap_offset | 20 be64 pages_offset

bitmap_offset is the file position right after the header; pages_offset rounds
bitmap_offset + bitmap_size up to 1 MiB; page i lives at pages_offset + i * page_size. The
bitmap is raw host `unsigned long` words (little-endian u64 on x86-64): bit i = page i written.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Final

import numpy as np

from multifd.wire.constants import (
    MAPPED_RAM_FILE_OFFSET_ALIGNMENT,
    MAPPED_RAM_HDR_VERSION,
    MAPPED_RAM_HEADER_SIZE,
)
from multifd.wire.errors import BadLength, BadOffset, Mismatch, Truncated, UnsupportedVersion

__all__ = [
    "MappedRamHeader",
    "bitmap_size",
    "bitmap_to_pages",
    "pages_offset_for",
    "pages_to_bitmap",
]

_HDR: Final = struct.Struct(">IQQQ")
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
