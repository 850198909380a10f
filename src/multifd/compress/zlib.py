"""The zlib method (QEMU multifd-zlib.c): one zlib-wrapped deflate stream per channel.

Per packet: one deflate call over the packet's pages joined in a bounce buffer (QEMU copies
too: the guest may be writing them), then Z_SYNC_FLUSH so the payload ends on a byte
boundary. The stream is never finished (no adler32 trailer). Levels 0..9, default 1.
The receiver bounds its output to len(out) + 1 bytes, so a bomb never inflates further.

Receiving: `zlib.decompressobj` returns a new bytes object that then has to be copied into
RAM. When ctypes can load the libz the interpreter's zlib module uses (`libz.so.1`), the
receiver calls inflate() with the RAM view itself as the output buffer instead: one
z_stream per channel, the GIL released for the call, no intermediate bytes; without it,
decompress + one copy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import zlib
from collections.abc import Sequence

import numpy as np

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


class _ZStream(ctypes.Structure):
    """z_stream (zlib.h; its layout is zlib's ABI, checked by inflateInit_'s size argument)."""

    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint), ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong), ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p), ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int), ("adler", ctypes.c_ulong), ("reserved", ctypes.c_ulong),
    ]


Z_OK, Z_STREAM_END, Z_BUF_ERROR, Z_SYNC_FLUSH = 0, 1, -5, 2


def _load_libz() -> ctypes.CDLL | None:
    """The system libz (the one the zlib module links), or None: decompress + copy then."""
    name = ctypes.util.find_library("z")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)  # CDLL: calls release the GIL
        lib.zlibVersion.restype = ctypes.c_char_p
        lib.zlibVersion.argtypes = []
        lib.inflateInit_.restype = ctypes.c_int
        lib.inflateInit_.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_char_p, ctypes.c_int]
        lib.inflate.restype = ctypes.c_int
        lib.inflate.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_int]
        lib.inflateEnd.restype = ctypes.c_int
        lib.inflateEnd.argtypes = [ctypes.POINTER(_ZStream)]
    except (OSError, AttributeError):
        return None
    return lib


_LIB = _load_libz()


class ZlibIntoDecompressor(Decompressor):
    """Inflates each payload straight into `out` (see the module docstring)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._z = _ZStream()
        self._ref = ctypes.byref(self._z)
        ret = lib.inflateInit_(self._ref, lib.zlibVersion(), ctypes.sizeof(_ZStream))
        if ret != Z_OK:
            raise MemoryError(f"inflateInit failed ({ret})")
        self._live = True
        self._probe = ctypes.create_string_buffer(1)

    def __del__(self) -> None:
        self._end()

    def _end(self) -> None:
        if getattr(self, "_live", False):
            self._live = False
            self._lib.inflateEnd(self._ref)

    def _inflate(self, size: int) -> int:
        """One inflate(Z_SYNC_FLUSH); WireError on a corrupt stream or a finished one."""
        ret: int = self._lib.inflate(self._ref, Z_SYNC_FLUSH)
        if ret == Z_STREAM_END:
            self._end()
            raise WireError("zlib stream ended inside a migration", field="unused",
                            value=self._z.avail_in)
        if ret not in (Z_OK, Z_BUF_ERROR):  # Z_BUF_ERROR: no progress possible, not fatal
            msg = self._z.msg.decode(errors="replace") if self._z.msg else f"error {ret}"
            self._end()
            raise WireError(f"corrupt zlib payload: {msg}", field="next_packet_size",
                            value=size)
        return ret

    def decompress_packet(self, payload: Buffer, out: memoryview) -> None:
        src = np.frombuffer(payload, np.uint8)
        if not self._live:
            raise WireError("zlib stream already failed", field="next_packet_size",
                            value=src.size)
        dst = np.frombuffer(out, np.uint8)
        if dst.flags.writeable is False:
            raise ValueError("decompress_packet needs a writable output view")
        n, z = dst.size, self._z
        if src.size > 0xFFFFFFFF or n > 0xFFFFFFFF:  # avail_in / avail_out are 32-bit
            raise BadLength("zlib payload too large", field="next_packet_size",
                            value=max(src.size, n))
        z.next_in, z.avail_in = src.ctypes.data, src.size
        z.next_out, z.avail_out = dst.ctypes.data, n
        while True:  # inflate stops when either side runs out; repeat while it progresses
            before = (z.avail_in, z.avail_out)
            self._inflate(src.size)
            if not z.avail_in or not z.avail_out or (z.avail_in, z.avail_out) == before:
                break
        got = n - z.avail_out
        if got == n:
            # output full: what is left (input, or output pending in the stream) must
            # inflate to nothing, like the sync-flush marker QEMU ends each packet with
            while True:
                z.next_out, z.avail_out = ctypes.addressof(self._probe), 1
                before_in = z.avail_in
                self._inflate(src.size)
                if z.avail_out == 0:
                    self._end()
                    raise BadLength(f"zlib payload inflates to more than {n} bytes",
                                    field="size", value=n + 1)
                if not z.avail_in or z.avail_in == before_in:
                    break
        if z.avail_in:
            self._end()
            raise WireError("zlib payload has bytes after its data", field="unused",
                            value=z.avail_in)
        if got != n:
            self._end()
            raise BadLength(f"zlib payload inflates to {got} bytes, expected {n}",
                            field="size", value=got)


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
        if _LIB is not None:
            return ZlibIntoDecompressor(_LIB)
        return ZlibDecompressor()


METHOD = ZlibMethod()
