"""The zstd method (QEMU multifd-zstd.c): one never-closed zstd frame per channel.

Per packet: one compress call in FLUSH_BLOCK mode (ZSTD_e_flush), so the receiver can
decode the packet completely: over the one view of RAM a run of consecutive pages is (the
common packet, no copy), scattered pages joined first. Levels
0..20, default 1 (libzstd reads 0 as its default level 3, as in QEMU). The receiver bounds
its output to len(out) + 1 bytes, so a bomb never inflates further.
Uses `compression.zstd` (Python >= 3.14) or its backport `backports.zstd`.

Receiving: neither binding can decompress into a caller's buffer (their `decompress`
returns a new bytes object, assembled with the GIL held, that then has to be copied into
RAM). So the receiver calls libzstd's ZSTD_decompressStream through ctypes with the RAM
view as its output buffer: one DCtx per channel, the GIL released for the whole call, no
intermediate bytes. The libzstd is the one the binding's extension already loaded (it
exports the ZSTD_* symbols, or links the system libzstd); the system library is tried next,
and without either the binding's `decompress` + one copy is used.

Sending stays with the binding: it sizes its output to ZSTD_compressBound at once and
releases the GIL for the codec. Measured against a ctypes
ZSTD_compressStream2 fed each page view from RAM (issue #17, random pages, thread CPU per
512 KiB packet, medians of 7): one view 216 vs 214 us; 4 views 244 (join) vs 254; 16 views
228 vs 314 (per-call overhead, and zstd copies small inputs into its own buffer anyway);
reusing a ring of 8 output buffers per channel cost 256 vs 234 us (cache-cold output).
The GIL: perf puts ~11% of the binding's call outside ZSTD_compressStream2 (the copy of
its output into an exact-size bytes, ~20 us per packet, GIL held); the ctypes call saves
that but a fresh output buffer per packet page-faults (clear_page 2.3% of samples vs 0.4%).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Sequence

import numpy as np

from multifd.compress import Buffer, CompressionMethod, Compressor, Decompressor
from multifd.wire.constants import MultifdFlag
from multifd.wire.errors import BadLength, WireError

if sys.version_info >= (3, 14):
    from compression.zstd import ZstdCompressor, ZstdDecompressor, ZstdError
else:
    from backports.zstd import ZstdCompressor, ZstdDecompressor, ZstdError


class _InBuffer(ctypes.Structure):
    """ZSTD_inBuffer (stable ABI since libzstd 1.0)."""

    _fields_ = [("src", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


class _OutBuffer(ctypes.Structure):
    """ZSTD_outBuffer."""

    _fields_ = [("dst", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


_ERROR_MIN = (1 << 64) - 200  # ZSTD_isError(code) only for codes this large (-maxCode..-1)
PAGE = 4096

_ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


class _CustomMem(ctypes.Structure):
    """ZSTD_customMem (zstd.h, experimental API, exported by the library since 1.0)."""

    _fields_ = [("customAlloc", _ALLOC), ("customFree", _FREE), ("opaque", ctypes.c_void_p)]


class _PageAlignedMem:
    """A ZSTD_customMem whose blocks start on a page boundary.

    Why: libzstd copies each raw (incompressible) block from the payload into its window
    buffer with memcpy. glibc's memcpy uses `rep movsb` for such sizes, and on AMD Zen
    CPUs (glibc 2.36 does not steer around it there) `rep movsb` runs ~20x slower when
    the destination is 1..31 bytes past the source modulo 4096 (measured here: a 128 KiB
    copy 80 us instead of 4 us). With malloc'd buffers whether a channel hits that was
    luck (issue #17: 300 us of the ~390 us per 512 KiB packet, varying from context to
    context). libzstd allocates its input and window buffers as one block, the window one
    128 KiB block size past its start, so page-aligned blocks and a page-aligned payload
    buffer (the receiver's) put each copy's destination just before its source: the fast
    case. Measured (bench/ceiling.py recv_zstd, channel CPU per 512 KiB packet, 5 rounds,
    machine loaded): malloc'd buffers 352 us (203-457), page-aligned 156 us (124-185).
    """

    def __init__(self) -> None:
        self._blocks: dict[int, np.ndarray] = {}
        self._alloc_cb = _ALLOC(self._alloc)
        self._free_cb = _FREE(self._free)
        self.struct = _CustomMem(self._alloc_cb, self._free_cb, None)

    def _alloc(self, _opaque: int | None, size: int) -> int | None:
        try:
            raw = np.empty(size + PAGE, np.uint8)
        except MemoryError:
            return None  # libzstd reports memory_allocation
        addr = raw.ctypes.data
        addr += -addr % PAGE
        self._blocks[addr] = raw
        return addr

    def _free(self, _opaque: int | None, addr: int | None) -> None:
        if addr:
            self._blocks.pop(addr, None)


def _load_libzstd() -> ctypes.CDLL | None:
    """libzstd with the streaming API, or None (then the bytes + copy path is used).

    The binding's extension first: it is already mapped and is the libzstd the sender's
    compressor uses. CDLL (not PyDLL) calls release the GIL.
    """
    candidates: list[str] = []
    try:
        if sys.version_info >= (3, 14):
            import _zstd as ext  # type: ignore[import-not-found]
        else:
            from backports.zstd import _zstd as ext
        if getattr(ext, "__file__", None):
            candidates.append(ext.__file__)
    except ImportError:
        pass
    found = ctypes.util.find_library("zstd")
    if found:
        candidates.append(found)
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
            lib.ZSTD_versionNumber.restype = ctypes.c_uint
            if lib.ZSTD_versionNumber() < 10400:  # 1.4.0: ZSTD_decompressStream is stable
                continue
            lib.ZSTD_createDCtx.restype = ctypes.c_void_p
            lib.ZSTD_createDCtx.argtypes = []
            if hasattr(lib, "ZSTD_createDCtx_advanced"):
                lib.ZSTD_createDCtx_advanced.restype = ctypes.c_void_p
                lib.ZSTD_createDCtx_advanced.argtypes = [_CustomMem]
            lib.ZSTD_freeDCtx.restype = ctypes.c_size_t
            lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
            lib.ZSTD_decompressStream.restype = ctypes.c_size_t
            lib.ZSTD_decompressStream.argtypes = [
                ctypes.c_void_p, ctypes.POINTER(_OutBuffer), ctypes.POINTER(_InBuffer)]
            lib.ZSTD_isError.restype = ctypes.c_uint
            lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
            lib.ZSTD_getErrorName.restype = ctypes.c_char_p
            lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            continue
        return lib
    return None


_LIB = _load_libzstd()


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


class ZstdIntoDecompressor(Decompressor):
    """Decompresses each payload straight into `out` (see the module docstring)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._mem: _PageAlignedMem | None = None
        if hasattr(lib, "ZSTD_createDCtx_advanced"):
            self._mem = _PageAlignedMem()
            self._dctx = lib.ZSTD_createDCtx_advanced(self._mem.struct)
        else:
            self._dctx = lib.ZSTD_createDCtx()
        if not self._dctx:
            raise MemoryError("ZSTD_createDCtx failed")
        self._in = _InBuffer()
        self._out = _OutBuffer()
        self._probe = ctypes.create_string_buffer(1)
        self._in_ref = ctypes.byref(self._in)
        self._out_ref = ctypes.byref(self._out)

    def __del__(self) -> None:
        dctx, self._dctx = getattr(self, "_dctx", None), None
        if dctx:
            self._lib.ZSTD_freeDCtx(dctx)

    def _step(self) -> int:
        """One ZSTD_decompressStream call; WireError on a libzstd error code."""
        ret: int = self._lib.ZSTD_decompressStream(self._dctx, self._out_ref, self._in_ref)
        if ret >= _ERROR_MIN and self._lib.ZSTD_isError(ret):
            name = self._lib.ZSTD_getErrorName(ret).decode(errors="replace")
            self._dctx, dctx = None, self._dctx  # unusable from now on, as documented
            self._lib.ZSTD_freeDCtx(dctx)
            raise WireError(f"corrupt zstd payload: {name}", field="next_packet_size",
                            value=self._in.size)
        return ret

    def decompress_packet(self, payload: Buffer, out: memoryview) -> None:
        if not self._dctx:
            raise WireError("zstd stream already failed", field="next_packet_size",
                            value=memoryview(payload).nbytes)
        # numpy gives the address of any buffer (read-only payloads too), without a copy;
        # the arrays keep the buffers exported (alive, not resizable) across the calls.
        src = np.frombuffer(payload, np.uint8)
        dst = np.frombuffer(out, np.uint8)
        if dst.flags.writeable is False:
            raise ValueError("decompress_packet needs a writable output view")
        n = dst.size
        i, o = self._in, self._out
        i.src, i.size, i.pos = src.ctypes.data, src.size, 0
        o.dst, o.size, o.pos = dst.ctypes.data, n, 0
        ret = self._step()
        # libzstd loops internally; repeat only while it still makes progress
        while o.pos < n and i.pos < i.size and ret:
            before = (i.pos, o.pos)
            ret = self._step()
            if (i.pos, o.pos) == before:
                break
        got = o.pos
        if got == n and ret:
            # output full: anything left (input or data buffered in the DCtx) is excess
            o.dst, o.size, o.pos = ctypes.addressof(self._probe), 1, 0
            ret = self._step()
            if o.pos or i.pos < i.size:
                raise BadLength(f"zstd payload inflates to more than {n} bytes",
                                field="size", value=n + o.pos)
        if ret == 0:
            raise WireError("zstd frame ended inside a migration", field="unused",
                            value=i.size - i.pos)
        if got != n:
            raise BadLength(f"zstd payload inflates to {got} bytes, expected {n}",
                            field="size", value=got)


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
        if _LIB is not None:
            return ZstdIntoDecompressor(_LIB)
        return ZstdStreamDecompressor()


METHOD = ZstdMethod()
