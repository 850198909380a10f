"""The zstd method (QEMU multifd-zstd.c): one never-closed zstd frame per channel.

Per packet: one compress call over the packet's pages joined in a bounce buffer, in
FLUSH_BLOCK mode (ZSTD_e_flush), so the receiver can decode the packet completely. Levels
0..20, default 1 (libzstd reads 0 as its default level 3, as in QEMU). The receiver bounds
its output to len(out) + 1 bytes, so a bomb never inflates further.
Uses `compression.zstd` (Python >= 3.14) or its backport `backports.zstd`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from multifd.compress import Buffer, CompressionMethod, Compressor, Decompressor
from multifd.wire.constants import MultifdFlag
from multifd.wire.errors import BadLength, WireError

if sys.version_info >= (3, 14):
    from compression.zstd import ZstdCompressor, ZstdDecompressor, ZstdError
else:
    from backports.zstd import ZstdCompressor, ZstdDecompressor, ZstdError


class ZstdStreamCompressor(Compressor):
    def __init__(self, level: int) -> None:
        self._c = ZstdCompressor(level=level)

    def compress_packet(self, pages: Sequence[Buffer]) -> list[Buffer]:
        if not pages:
            return []
        data = pages[0] if len(pages) == 1 else b"".join(pages)
        return [self._c.compress(data, mode=ZstdCompressor.FLUSH_BLOCK)]


class ZstdStreamDecompressor(Decompressor):
    def __init__(self) -> None:
        self._d = ZstdDecompressor()

    def decompress_packet(self, payload: Buffer, out: memoryview) -> None:
        dst = memoryview(out).cast("B")
        n = dst.nbytes
        try:
            data = self._d.decompress(payload, max_length=n + 1)
        except (ZstdError, EOFError) as e:
            raise WireError(f"corrupt zstd payload: {e}", field="next_packet_size",
                            value=memoryview(payload).nbytes) from None
        if len(data) > n:
            raise BadLength(f"zstd payload inflates to more than {n} bytes", field="size",
                            value=len(data))
        if self._d.eof:
            raise WireError("zstd frame ended inside a migration", field="unused",
                            value=len(self._d.unused_data))
        if len(data) != n:
            raise BadLength(f"zstd payload inflates to {len(data)} bytes, expected {n}",
                            field="size", value=len(data))
        dst[:] = data


class ZstdMethod(CompressionMethod):
    name = "zstd"
    flag = MultifdFlag.ZSTD
    default_level = 1
    min_level = 0
    max_level = 20

    def new_compressor(self, level: int | None = None) -> Compressor:
        lv = self.check_level(level)
        assert lv is not None
        return ZstdStreamCompressor(lv)

    def new_decompressor(self) -> Decompressor:
        return ZstdStreamDecompressor()


METHOD = ZstdMethod()
