"""The "none" method (QEMU multifd-nocomp.c): the payload is the normal pages' raw bytes.

The sender gathers the page views themselves (no copy); a receiver normally reads straight
into guest RAM and does not need the decompressor, which is a checked copy for symmetry.
"""

from __future__ import annotations

from collections.abc import Sequence

from multifd.compress import Buffer, CompressionMethod, Compressor, Decompressor
from multifd.wire.constants import MultifdFlag
from multifd.wire.errors import BadLength


class NoneCompressor(Compressor):
    def compress_packet(self, pages: Sequence[Buffer]) -> list[Buffer]:
        return list(pages)


class NoneDecompressor(Decompressor):
    def decompress_packet(self, payload: Buffer, out: memoryview) -> None:
        n = memoryview(out).nbytes
        got = memoryview(payload).nbytes
        if got != n:
            raise BadLength(f"uncompressed payload must be {n} bytes", field="size",
                            value=got)
        memoryview(out).cast("B")[:] = memoryview(payload).cast("B")


class NoneMethod(CompressionMethod):
    name = "none"
    flag = MultifdFlag.NOCOMP

    def new_compressor(self, level: int | None = None) -> Compressor:
        self.check_level(level)
        return NoneCompressor()

    def new_decompressor(self) -> Decompressor:
        return NoneDecompressor()


METHOD = NoneMethod()
