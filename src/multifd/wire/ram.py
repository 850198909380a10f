"""RAM section records of the main stream (QEMU `migration/ram.c`, `ram_load_precopy`).

Every record opens with a be64 word = offset-in-block | flags; the flags live in the bits
below the target page size (RAM_SAVE_FLAG_*, constants.RamFlag):

    MEM_SIZE 0x004   word = total bytes of all blocks; then per block, until the running
                     sum of used_length reaches the total (there is no block count):
                     counted idstr, be64 used_length, [be64 page_size] (postcopy),
                     [be64 GPA] (x-ignore-shared), [28-byte MappedRamHeader] (mapped-ram;
                     the file then seeks: the next entry starts at pages_offset+used_length)
    ZERO     0x002   [counted block name unless CONTINUE 0x020], u8 fill
    PAGE     0x008   [name], TPS raw bytes
    XBZRLE   0x040   [name], u8 encoding flag 0x01, be16 len (<= TPS), len bytes
    COMPRESS 0x100   [name], be32 len (<= compressBound(TPS)), an independent zlib stream
    EOS      0x010   the word alone (end of the RAM section body)
    FLUSH    0x200   the word alone (HEAD >= 8.1 multifd sync marker; 7.2 rejects it)

CONTINUE means "same block as the previous page record on this stream"; `cont` on each
record keeps whether the bit was on the wire so that re-encoding is byte-exact.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from multifd.wire.buffer import NeedData, ReceiveBuffer
from multifd.wire.constants import (
    MAPPED_RAM_HEADER_SIZE,
    XBZRLE_ENCODING_FLAG,
    RamFlag,
)
from multifd.wire.errors import (
    BadCount,
    BadLength,
    BadName,
    BadOffset,
    BadRecordType,
)

if TYPE_CHECKING:
    from multifd.wire.mapped_ram import MappedRamHeader

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_XBZ = struct.Struct(">BH")

# zlib's compressBound(4096): QEMU rejects longer COMPRESS_PAGE payloads.
def compress_bound(n: int) -> int:
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class RamBlockInfo:
    """One entry of the MEM_SIZE block list."""

    name: str
    used_length: int
    page_size: int | None = None  # present on the wire only with postcopy + huge pages
    addr: int | None = None  # guest-physical address, only with x-ignore-shared
    mapped_ram: MappedRamHeader | None = None


@dataclass(frozen=True, slots=True)
class RamMemSize:
    total: int
    blocks: tuple[RamBlockInfo, ...]


@dataclass(frozen=True, slots=True)
class RamZero:
    offset: int
    block: str
    fill: int = 0
    cont: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class RamZeroRun:
    """Consecutive ZERO records (fill 0) of one block, decoded in one go.

    Only produced when `RamSettings.batch_zero_runs` is on: a 7.2 source sends one 9-byte
    record per zero page (262,144 for 1 GiB), far too many for one Python object each.
    `cont` is the first record's CONTINUE bit; every later record has it set.
    """

    block: str
    offsets: np.ndarray
    cont: bool = False


@dataclass(frozen=True, slots=True)
class RamPage:
    offset: int
    block: str
    data: bytes
    cont: bool = False


@dataclass(frozen=True, slots=True)
class RamXbzrle:
    offset: int
    block: str
    data: bytes
    cont: bool = False


@dataclass(frozen=True, slots=True)
class RamCompressedPage:
    offset: int
    block: str
    data: bytes
    cont: bool = False


@dataclass(frozen=True, slots=True)
class RamEos:
    pass


@dataclass(frozen=True, slots=True)
class RamMultifdFlush:
    pass


RamPageRecord = RamZero | RamPage | RamXbzrle | RamCompressedPage
RamRecord = RamMemSize | RamPageRecord | RamZeroRun | RamEos | RamMultifdFlush


@dataclass(frozen=True, slots=True)
class RamSettings:
    """What the two ends agreed on (capabilities, machine-type compat properties)."""

    page_size: int = 4096
    postcopy_page_size_fields: bool = False  # every block entry carries be64 page_size
    ignore_shared: bool = False  # every block entry carries be64 GPA
    mapped_ram: bool = False  # every block entry carries a MappedRamHeader (and seeks)
    allow_multifd_flush: bool = True  # False = 7.2: 0x200 is an error
    allow_compress_page: bool = True  # False = HEAD >= 9.1: 0x100 is gone
    max_blocks: int = 4096  # a lying MEM_SIZE total cannot make us collect forever
    batch_zero_runs: bool = False  # decode runs of ZERO records as one RamZeroRun

    def __post_init__(self) -> None:
        ps = self.page_size
        if ps < 1024 or ps & (ps - 1):
            raise ValueError(f"page_size must be a power of two >= 1024, not {ps}")


_ZERO_REC = np.dtype([("word", ">u8"), ("fill", "u1")])
_ZERO_RUN_MAX = 1 << 16  # records looked at per run (576 KiB)

_PAGE_KINDS: dict[int, type] = {
    int(RamFlag.ZERO): RamZero,
    int(RamFlag.PAGE): RamPage,
    int(RamFlag.XBZRLE): RamXbzrle,
    int(RamFlag.COMPRESS_PAGE): RamCompressedPage,
}
_KIND_FLAG: dict[type, int] = {cls: int(flag) for flag, cls in _PAGE_KINDS.items()}
_KNOWN_FLAGS = int(
    RamFlag.ZERO
    | RamFlag.MEM_SIZE
    | RamFlag.PAGE
    | RamFlag.EOS
    | RamFlag.CONTINUE
    | RamFlag.XBZRLE
    | RamFlag.COMPRESS_PAGE
    | RamFlag.MULTIFD_FLUSH
)
_CONT = int(RamFlag.CONTINUE)
_MEM_SIZE = int(RamFlag.MEM_SIZE)
_EOS = int(RamFlag.EOS)
_FLUSH = int(RamFlag.MULTIFD_FLUSH)


# --------------------------------------------------------------------------- encoding


def _counted(name: str) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) <= 255:
        raise BadName("block name must be 1..255 bytes", field="idstr", value=name)
    return bytes((len(raw),)) + raw


def _check_offset(offset: int, settings: RamSettings) -> None:
    if offset < 0 or offset & (settings.page_size - 1) or offset >= 1 << 64:
        raise BadOffset("page offset not page-aligned", field="offset", value=offset)


def encode_block_entry(info: RamBlockInfo, settings: RamSettings = RamSettings()) -> bytes:
    """One MEM_SIZE list entry; optional fields are written when set on `info`."""
    out = _counted(info.name) + _U64.pack(info.used_length)
    if info.page_size is not None:
        out += _U64.pack(info.page_size)
    if info.addr is not None:
        out += _U64.pack(info.addr)
    if info.mapped_ram is not None:
        out += info.mapped_ram.encode()
    return out


def encode_ram_record(rec: RamRecord, settings: RamSettings = RamSettings()) -> bytes:
    """Encode one record, using `rec.cont` verbatim (the caller tracks the last block)."""
    if isinstance(rec, RamZeroRun):
        from multifd.wire.ram_batch import encode_zero_run

        return encode_zero_run(rec.block, rec.offsets, first_continues=rec.cont)
    if isinstance(rec, RamEos):
        return _U64.pack(RamFlag.EOS)
    if isinstance(rec, RamMultifdFlush):
        return _U64.pack(RamFlag.MULTIFD_FLUSH)
    if isinstance(rec, RamMemSize):
        _check_offset(rec.total, settings)
        if sum(b.used_length for b in rec.blocks) != rec.total:
            raise BadLength("MEM_SIZE total != sum of used_length", field="total", value=rec.total)
        parts = [_U64.pack(rec.total | RamFlag.MEM_SIZE)]
        parts += [encode_block_entry(b, settings) for b in rec.blocks]
        return b"".join(parts)
    flag = _KIND_FLAG.get(type(rec))
    if flag is None:
        raise TypeError(f"not a RAM record: {rec!r}")
    _check_offset(rec.offset, settings)
    word = rec.offset | flag | (RamFlag.CONTINUE if rec.cont else 0)
    head = _U64.pack(word) + (b"" if rec.cont else _counted(rec.block))
    if isinstance(rec, RamZero):
        return head + bytes((rec.fill & 0xFF,))
    data = rec.data
    if isinstance(rec, RamPage):
        if len(data) != settings.page_size:
            raise BadLength("PAGE data must be one page", field="len", value=len(data))
        return head + data
    if isinstance(rec, RamXbzrle):
        if len(data) > settings.page_size:
            raise BadLength("XBZRLE data longer than a page", field="len", value=len(data))
        return head + _XBZ.pack(XBZRLE_ENCODING_FLAG, len(data)) + data
    if len(data) > compress_bound(settings.page_size):
        raise BadLength("compressed page too long", field="len", value=len(data))
    return head + _U32.pack(len(data)) + data


@dataclass
class RamRecordWriter:
    """Sender side: keeps `last_sent_block` for one stream and sets CONTINUE itself."""

    settings: RamSettings = field(default_factory=RamSettings)
    last_sent_block: str | None = None

    def reset(self) -> None:
        self.last_sent_block = None

    def _head(self, block: str, offset: int, flag: int) -> bytes:
        _check_offset(offset, self.settings)
        if block == self.last_sent_block:
            return _U64.pack(offset | flag | RamFlag.CONTINUE)
        name = _counted(block)
        self.last_sent_block = block
        return _U64.pack(offset | flag) + name

    def mem_size(self, blocks: Sequence[RamBlockInfo]) -> bytes:
        total = sum(b.used_length for b in blocks)
        return encode_ram_record(RamMemSize(total, tuple(blocks)), self.settings)

    def zero(self, block: str, offset: int, fill: int = 0) -> bytes:
        return self._head(block, offset, RamFlag.ZERO) + bytes((fill & 0xFF,))

    def page_iov(
        self, block: str, offset: int, data: bytes | memoryview
    ) -> list[bytes | memoryview]:
        """Header and the page as separate buffers, for a gathered sendmsg."""
        if len(data) != self.settings.page_size:
            raise BadLength("PAGE data must be one page", field="len", value=len(data))
        return [self._head(block, offset, RamFlag.PAGE), data]

    def page(self, block: str, offset: int, data: bytes | memoryview) -> bytes:
        head, body = self.page_iov(block, offset, data)
        return bytes(head) + bytes(body)

    def xbzrle(self, block: str, offset: int, data: bytes) -> bytes:
        if len(data) > self.settings.page_size:
            raise BadLength("XBZRLE data longer than a page", field="len", value=len(data))
        head = self._head(block, offset, RamFlag.XBZRLE)
        return head + _XBZ.pack(XBZRLE_ENCODING_FLAG, len(data)) + data

    def eos(self) -> bytes:
        return _U64.pack(RamFlag.EOS)

    def multifd_flush(self) -> bytes:
        if not self.settings.allow_multifd_flush:
            raise BadRecordType("MULTIFD_FLUSH is not spoken by this peer", field="flags",
                                value=int(RamFlag.MULTIFD_FLUSH))
        return _U64.pack(RamFlag.MULTIFD_FLUSH)


# --------------------------------------------------------------------------- decoding


class RamRecordReader:
    """Incremental decoder of RAM records from a ReceiveBuffer (used by the main stream).

    `read(buf)` returns a record, or None when it made progress without finishing one
    (one MEM_SIZE block entry, or part of a mapped-ram skip); it raises NeedData when the
    buffer holds too little (the caller rolls back) and WireError subclasses. It commits
    the buffer itself after each MEM_SIZE block entry so a long list or a mapped-ram skip
    never has to sit in memory whole.
    """

    def __init__(
        self, settings: RamSettings = RamSettings(), blocks: Mapping[str, int] | None = None
    ) -> None:
        self.settings = settings
        self._given = dict(blocks) if blocks is not None else None
        self.block_lengths: dict[str, int] | None = self._given  # known blocks, stream's view
        self.last_block: str | None = None
        self._ms_total = 0
        self._ms_left = 0
        self._ms_blocks: list[RamBlockInfo] | None = None
        self._skip = 0
        self.skipped: list[tuple[int, int]] = []  # (offset, length) of mapped-ram regions
        self.skip_block: str | None = None  # the block whose region is skipped last

    def take_skip(self) -> int:
        """The rest of a pending mapped-ram region skip, handed to a caller that seeks past
        it instead of feeding it (a file); the reader forgets it."""
        n, self._skip = self._skip, 0
        return n

    @property
    def in_mem_size(self) -> bool:
        return self._ms_blocks is not None

    def read(self, buf: ReceiveBuffer) -> RamRecord | None:
        if self._skip:
            n = min(self._skip, buf.available)
            buf.skip(n)
            buf.commit()
            self._skip -= n
            if self._skip:
                raise NeedData
            return None
        if self._ms_blocks is not None:
            return self._read_block_entry(buf)
        return self._read_record(buf)

    # -- one record word
    def _read_record(self, buf: ReceiveBuffer) -> RamRecord | None:
        s = self.settings
        at = buf.offset
        word = buf.take_u64()
        mask = s.page_size - 1
        flags = word & mask
        addr = word & ~mask
        if flags & ~_KNOWN_FLAGS:
            raise BadRecordType("Unknown combination of migration flags", field="flags",
                                value=flags, offset=at)
        cont = bool(flags & _CONT)
        kind = flags & ~_CONT
        if kind == _MEM_SIZE and not cont:
            return self._start_mem_size(addr, at)
        if kind in (_EOS, _FLUSH) and not cont:
            if kind == _FLUSH and not s.allow_multifd_flush:
                raise BadRecordType("Unknown combination of migration flags", field="flags",
                                    value=flags, offset=at)
            if addr:
                raise BadOffset("EOS/FLUSH word carries an offset", field="offset",
                                value=addr, offset=at)
            return RamEos() if kind == _EOS else RamMultifdFlush()
        cls = _PAGE_KINDS.get(kind)
        if cls is None or (cls is RamCompressedPage and not s.allow_compress_page):
            raise BadRecordType("Unknown combination of migration flags", field="flags",
                                value=flags, offset=at)
        if s.mapped_ram:
            raise BadRecordType("page record in a mapped-ram stream", field="flags",
                                value=flags, offset=at)
        block = self._block_name(buf, cont, at)
        self._check_page(block, addr, at)
        if cls is RamZero:
            fill = buf.take_u8()
            self.last_block = block
            if s.batch_zero_runs and fill == 0:
                return self._zero_run(buf, block, addr, cont)
            return RamZero(addr, block, fill, cont)
        if cls is RamPage:
            data = buf.take(s.page_size)
        elif cls is RamXbzrle:
            fat = buf.offset
            enc = buf.take_u8()
            if enc != XBZRLE_ENCODING_FLAG:
                raise BadRecordType("unknown XBZRLE encoding", field="encoding", value=enc,
                                    offset=fat)
            n = buf.take_u16()
            if n > s.page_size:
                raise BadLength("XBZRLE length above the page size", field="len", value=n,
                                offset=fat + 1)
            data = buf.take(n)
        else:
            fat = buf.offset
            n = buf.take_u32()
            if n > compress_bound(s.page_size):
                raise BadLength("compressed page too long", field="len", value=n, offset=fat)
            data = buf.take(n)
        self.last_block = block
        return cls(addr, block, data, cont)

    def _zero_run(self, buf: ReceiveBuffer, block: str, addr: int, cont: bool) -> RamZeroRun:
        """Take every following ZERO|CONTINUE record with fill 0 that is already here."""
        ahead = buf.peek_upto(_ZERO_RUN_MAX * _ZERO_REC.itemsize)
        n = len(ahead) // _ZERO_REC.itemsize
        recs = np.frombuffer(ahead, dtype=_ZERO_REC, count=n)
        mask = np.uint64(self.settings.page_size - 1)
        ok = ((recs["word"] & mask) == np.uint64(RamFlag.ZERO | RamFlag.CONTINUE)) & (
            recs["fill"] == 0)
        bad = np.flatnonzero(~ok)
        k = int(bad[0]) if bad.size else n
        offsets = np.empty(k + 1, dtype=np.uint64)
        offsets[0] = addr
        offsets[1:] = recs["word"][:k] & ~mask
        if k:
            used = self.block_lengths.get(block) if self.block_lengths is not None else None
            top = int(offsets[1:].max())
            if used is not None and top + self.settings.page_size > used:
                at = buf.offset + int(np.argmax(offsets[1:] == top)) * _ZERO_REC.itemsize
                raise BadOffset("page offset beyond the block's used_length",
                                field="offset", value=top, offset=at)
            buf.skip(k * _ZERO_REC.itemsize)
        return RamZeroRun(block, offsets, cont)

    def _block_name(self, buf: ReceiveBuffer, cont: bool, at: int) -> str:
        if cont:
            if self.last_block is None:
                raise BadName("CONTINUE without a previous block", field="flags",
                              value=int(RamFlag.CONTINUE), offset=at)
            return self.last_block
        nat = buf.offset
        raw = buf.take_counted()
        name = _decode_name(raw, nat)
        if self.block_lengths is not None and name not in self.block_lengths:
            raise BadName("unknown RAM block", field="block", value=name, offset=nat)
        return name

    def _check_page(self, block: str, addr: int, at: int) -> None:
        if self.block_lengths is None:
            return
        used = self.block_lengths.get(block)
        if used is not None and addr + self.settings.page_size > used:
            raise BadOffset("page offset beyond the block's used_length", field="offset",
                            value=addr, offset=at)

    # -- MEM_SIZE block list
    def _start_mem_size(self, total: int, at: int) -> RamMemSize | None:
        self._ms_total = total
        self._ms_left = total
        self._ms_blocks = []
        return self._finish_mem_size() if total == 0 else None

    def _finish_mem_size(self) -> RamMemSize:
        blocks = tuple(self._ms_blocks or ())
        self._ms_blocks = None
        lengths = {b.name: b.used_length for b in blocks}
        if self._given is not None:
            lengths = {**self._given, **lengths}
        self.block_lengths = lengths
        return RamMemSize(self._ms_total, blocks)

    def _read_block_entry(self, buf: ReceiveBuffer) -> RamRecord | None:
        s = self.settings
        assert self._ms_blocks is not None
        at = buf.offset
        name = _decode_name(buf.take_counted(), at)
        used = buf.take_u64()
        page_size = buf.take_u64() if s.postcopy_page_size_fields else None
        addr = buf.take_u64() if s.ignore_shared else None
        mr = None
        if s.mapped_ram:
            hat = buf.offset
            raw = buf.take(MAPPED_RAM_HEADER_SIZE)
            mr = _decode_mapped_ram(raw, hat, name)
        if self._given is not None and name not in self._given:
            raise BadName("unknown RAM block", field="block", value=name, offset=at)
        if any(b.name == name for b in self._ms_blocks):
            raise BadName("RAM block listed twice", field="block", value=name, offset=at)
        if used > self._ms_left:
            raise BadLength("block lengths exceed the MEM_SIZE total", field="used_length",
                            value=used, offset=at)
        if len(self._ms_blocks) >= s.max_blocks:
            raise BadCount("too many RAM blocks", field="blocks", value=len(self._ms_blocks),
                           offset=at)
        info = RamBlockInfo(name, used, page_size, addr, mr)
        self._ms_blocks.append(info)
        self._ms_left -= used
        if mr is not None and (mr.pages_offset or mr.bitmap_offset):
            end = mr.pages_offset + used
            here = buf.offset
            if mr.pages_offset < here or mr.bitmap_offset < here:
                raise BadOffset(f"block {name!r}: mapped-ram region before its header",
                                field="pages_offset", value=mr.pages_offset, offset=at)
            if end > here:
                self._skip = end - here
                self.skip_block = name
                self.skipped.append((here, end - here))
        buf.commit()
        if self._ms_left == 0:
            # A pending mapped-ram skip of the last block runs at the next read().
            return self._finish_mem_size()
        return None


def _decode_name(raw: bytes, at: int) -> str:
    if not raw:
        raise BadName("empty block name", field="idstr", value=raw, offset=at)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise BadName("block name is not UTF-8", field="idstr", value=raw, offset=at) from None


def _decode_mapped_ram(raw: bytes, at: int, name: str) -> MappedRamHeader:
    from multifd.wire.errors import WireError
    from multifd.wire.mapped_ram import MappedRamHeader

    try:
        return MappedRamHeader.decode(raw)  # validates version, page size, offsets
    except WireError as e:
        e.what = f"block {name!r}: {e.what}"
        e.args = (e.describe(),)
        raise e.at(at) from None
