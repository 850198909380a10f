"""The zlib method (QEMU multifd-zlib.c): one zlib-wrapped deflate stream per channel.

Per packet: one deflate call over the packet's pages joined in a bounce buffer (QEMU copies
too: the guest may be writing them), then Z_SYNC_FLUSH so the payload ends on a byte
boundary. The stream is never finished (no adler32 trailer). Levels 0..9, default 1.
The receiver bounds its output to len(out) + 1 bytes, so a bomb never inflates further.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from multifd.compress import Buffer, CompressionMethod, Compressor, Decompressor
from multifd.wire.constants import MultifdFlag
from multifd.wire.errors import BadLength, WireError


class ZlibCompressor(Compressor):
    def __init__(self, level: int) -> None:
        self._c = zlib.compressobj(level)  # deflateInit defaults: zlib wrapper, 15-bit window

    def compress_packet(self, pages: Sequence[Buffer]) -> list[Buffer]:
        if not pages:
            return []
        data = pages[0] if len(pages) == 1 else b"".join(pages)
        head = self._c.compress(data)
        tail = self._c.flush(zlib.Z_SYNC_FLUSH)
        return [head, tail] if head else [tail]


class ZlibDecompressor(Decompressor):
    def __init__(self) -> None:
        self._d = zlib.decompressobj()

    def decompress_packet(self, payload: Buffer, out: memoryview) -> None:
        dst = memoryview(out).cast("B")
        n = dst.nbytes
        try:
            data = self._d.decompress(payload, n + 1)
        except zlib.error as e:
            raise WireError(f"corrupt zlib payload: {e}", field="next_packet_size",
                            value=memoryview(payload).nbytes) from None
        if len(data) > n or self._d.unconsumed_tail:
            raise BadLength(f"zlib payload inflates to more than {n} bytes", field="size",
                            value=len(data))
        if self._d.eof:
            raise WireError("zlib stream ended inside a migration", field="unused",
                            value=len(self._d.unused_data))
        if len(data) != n:
            raise BadLength(f"zlib payload inflates to {len(data)} bytes, expected {n}",
                            field="size", value=len(data))
        dst[:] = data


class ZlibMethod(CompressionMethod):
    name = "zlib"
    flag = MultifdFlag.ZLIB
    default_level = 1
    min_level = 0
    max_level = 9

    def new_compressor(self, level: int | None = None) -> Compressor:
        lv = self.check_level(level)
        assert lv is not None
        return ZlibCompressor(lv)

    def new_decompressor(self) -> Decompressor:
        return ZlibDecompressor()


METHOD = ZlibMethod()
