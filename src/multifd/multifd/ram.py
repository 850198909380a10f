"""The RAM page-batch payload kind: up to page_count pages of one RAM block per packet.

Wire form (qemu-reference.md 3.3, QEMU `multifd-nocomp.c`, `multifd-zero-page.c`,
`multifd-zlib.c`, `multifd-zstd.c`): the 320-byte header + full offset array, then
`next_packet_size` payload bytes — the normal pages raw (nocomp) or one per-channel
compressed stream segment. Offsets are normal pages first, then (HEAD layout) zero pages.

Send: pages go out as views of the block's memory: one view for the common payload of
consecutive pages (`RamPayload.run_start`, found while validating it), else one view per
contiguous run found with numpy; a scattered batch is gathered into a per-channel bounce
buffer with one `np.take`. With in-channel zero-page detection (qemu-10 profile) one numpy
reduction per batch partitions normal/zero pages (a run's first words are read through a
strided view); zero pages travel as offsets only. Compression is one
`compress_packet` call per packet on the channel's persistent compressor, only when the
packet has normal pages. Flags carry the compression bits whenever the packet has pages
(normal or zero, as QEMU 10.0 sends; SYNC-only packets have none).

Receive: the header is validated against the blocks before memory is touched (a packet
of consecutive pages by its first and last offset, `RamPacketHeader.run_start`); nocomp
pages are received straight into RAM (`recvmsg_into` on the runs) or, when scattered, into
a per-channel scratch then scattered with numpy; compressed payloads are read into the
per-channel input buffer and decompressed into RAM (one run) or the scratch.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

from multifd.multifd.slots import (
    Payload,
    RecvChannelContext,
    RecvOps,
    SendChannelContext,
    SendOps,
    register_recv_ops,
    register_send_ops,
)
from multifd.wire.constants import (
    MULTIFD_MAX_COMPRESSED_PAYLOAD,
    PacketLayout,
    page_count,
    ram_packet_len,
)
from multifd.wire.errors import BadLength, lookup
from multifd.wire.packet import RamPacketEncoder, decode_ram_packet
from multifd.wire.ram_batch import is_page_run, is_run

# More runs than this in one packet: gather/scatter through the bounce buffer instead of
# one iovec per run (a memcpy of <= 512 KiB is cheaper than many tiny iovecs + Python).
MAX_RUNS = 16

_EMPTY = np.zeros(0, dtype=np.uint64)


class RamPayload(Payload):
    """Offsets (bytes, page-aligned) of up to page_count pages of one block.

    Fill with `fill(block, offsets)` (copies into the slot's own array) or write
    `offsets[:n]` yourself and call `set(block, n)`.
    """

    __slots__ = ("_bounce", "_encoder", "block", "capacity", "num", "offsets", "page_size",
                 "run_start")

    def __init__(self, page_size: int = 4096) -> None:
        self.page_size = page_size
        self.capacity = page_count(page_size)
        self.offsets = np.zeros(self.capacity, dtype=np.uint64)
        self.block: Any = None
        self.num = 0
        # offsets[0] when the pages are consecutive (found while validating): the channel
        # then sends one view of the block with no per-page index work.
        self.run_start: int | None = None
        # The packet this payload becomes (made on first use, kept with the slot): its
        # header, and a gather buffer for scattered pages, live until the payload is sent.
        self._encoder: RamPacketEncoder | None = None
        self._bounce: np.ndarray | None = None

    def encoder(self, layout: PacketLayout) -> RamPacketEncoder:
        enc = self._encoder
        if enc is None or enc.layout is not layout:
            enc = self._encoder = RamPacketEncoder(layout, self.page_size)
        return enc

    def bounce(self) -> np.ndarray:
        if self._bounce is None:
            self._bounce = np.empty((self.capacity, self.page_size), dtype=np.uint8)
        return self._bounce

    @classmethod
    def new_for_slot(cls, page_size: int) -> RamPayload:
        return cls(page_size)

    def fill(self, block: Any, offsets: Any) -> None:
        """Take the pages at byte `offsets` (any int array-like) of `block`."""
        offs = np.asarray(offsets)
        n = offs.shape[0]
        if n > self.capacity:
            raise ValueError(f"{n} pages exceed the packet capacity {self.capacity}")
        np.copyto(self.offsets[:n], offs, casting="unsafe")
        self.set(block, n)

    def set(self, block: Any, n: int) -> None:
        """Use `offsets[:n]` (already written by the caller) of `block`."""
        if not 0 <= n <= self.capacity:
            raise ValueError(f"page count {n} outside 0..{self.capacity}")
        run = None
        if n:
            offs = self.offsets[:n]
            ps = self.page_size
            if block.page_size != ps:
                raise ValueError(f"block {block.name!r} page size {block.page_size} != {ps}")
            limit = block.used_length - ps
            if is_page_run(offs, ps, limit):
                run = int(offs[0])
            elif int(offs.max()) > limit or (offs % ps).any():
                raise ValueError(f"offsets outside or unaligned in block {block.name!r}")
        self.block = block
        self.num = n
        self.run_start = run

    def clear(self) -> None:
        self.block = None
        self.num = 0
        self.run_start = None

    def is_empty(self) -> bool:
        return self.num == 0


def page_runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start page, length) of each run of consecutive page indices, in list order."""
    n = idx.shape[0]
    if is_run(idx, 1):
        return idx[:1], np.array([n], dtype=np.int64)
    brk = np.flatnonzero(idx[1:] != idx[:-1] + 1) + 1
    starts = np.empty(brk.shape[0] + 1, dtype=np.int64)
    starts[0] = 0
    starts[1:] = brk
    lengths = np.empty_like(starts)
    lengths[:-1] = starts[1:] - starts[:-1]
    lengths[-1] = n - starts[-1]
    return idx[starts], lengths


class RamSendOps(SendOps):
    payload_type = RamPayload
    stat_name = "ram"

    def logical_bytes(self, payload: RamPayload) -> int:
        return payload.num * payload.page_size

    def prepare(self, payload: RamPayload, ch: SendChannelContext) -> list[Any]:
        block = payload.block
        ps = ch.page_size
        offs = payload.offsets[: payload.num]
        run = payload.run_start
        zero_off = _EMPTY
        if ch.zero_page_detection:
            zero = (block.zero_pages_range(run // ps, payload.num) if run is not None
                    else block.zero_pages(offs // np.uint64(ps)))
            if zero.any():
                zero_off = offs[zero]
                offs = offs[~zero]
                run = None
        nn = offs.shape[0]
        data: list[Any] = []
        if nn:
            if run is not None:  # the common packet: consecutive pages, one view of RAM
                pages: list[Any] = [block.view[run : run + nn * ps]]
            else:
                idx = offs // np.uint64(ps)
                starts, lengths = page_runs(idx)
                if starts.shape[0] <= MAX_RUNS:
                    view = block.view
                    pages = [view[s * ps : (s + c) * ps]
                             for s, c in zip(starts.tolist(), lengths.tolist(), strict=True)]
                else:
                    bounce = payload.bounce()
                    np.take(block.pages, idx, axis=0, out=bounce[:nn])
                    pages = [memoryview(bounce[:nn]).cast("B")]
            data = ch.compressor.compress_packet(pages)
        flag = ch.compression_flag
        nz_count = zero_off.shape[0]
        header = payload.encoder(ch.layout).encode(
            flags=flag if (nn or nz_count) else 0,
            packet_num=ch.next_packet_num(),
            ramblock=block.name,
            normal=offs,
            zero=zero_off,
            next_packet_size=sum(memoryview(b).nbytes for b in data) if flag else nn * ps,
        )
        st = ch.stats
        st.add("normal_pages", nn)
        if nz_count:
            st.add("zero_pages", nz_count)
        return [header, *data]

    def check(self, payload: RamPayload, layout: PacketLayout) -> None:
        if payload.block is None:
            raise ValueError("RAM payload without a block")


class _RecvState:
    __slots__ = ("inbuf", "plen", "scratch", "scratch_view")

    def __init__(self, page_size: int, compressed: bool) -> None:
        n = page_count(page_size)
        self.plen = ram_packet_len(page_size)
        self.scratch = np.empty((n, page_size), dtype=np.uint8)
        self.scratch_view = memoryview(self.scratch).cast("B")
        # page-aligned (mmap): see compress/zstd.py _PageAlignedMem for why it matters
        self.inbuf = (memoryview(mmap.mmap(-1, MULTIFD_MAX_COMPRESSED_PAYLOAD)) if compressed
                      else None)


class RamRecvOps(RecvOps):
    kind_bits = 0
    layouts = frozenset({PacketLayout.V7_2, PacketLayout.HEAD})

    def header_size(self, page_size: int) -> int:
        return ram_packet_len(page_size)

    def receive(self, ch: RecvChannelContext, flags: int) -> bool:
        ps = ch.page_size
        compressed = ch.decompressor is not None
        state = ch.state(self, lambda: _RecvState(ps, compressed))
        plen = state.plen
        header = ch.header[:plen]
        if ch.have < plen:
            ch.read_exact(header[ch.have :])
        cfg = ch.config
        hdr = decode_ram_packet(
            header,
            layout=ch.layout,
            page_size=ps,
            blocks=cfg.block_sizes,
            max_payload=MULTIFD_MAX_COMPRESSED_PAYLOAD,
            compression_flag=ch.compression_flag,
        )
        nn = hdr.normal_pages
        nzero = hdr.zero_pages
        # A packet without normal pages has no payload: 7.2 leaves a stale
        # next_packet_size there (qemu72-peer.md 4.2, quirk 3), and QEMU ignores it.
        size = hdr.payload_size
        if not compressed and size != nn * ps:
            raise BadLength("nocomp payload size differs from normal_pages x page size",
                            field="next_packet_size", value=size)
        st = ch.stats
        st.add("wire_bytes_ram", plen + size)
        if not nn and not nzero:
            return hdr.is_sync
        block = lookup(cfg.blocks, hdr.ramblock, kind="RAM block", record="multifd packet",
                       field="ramblock")
        received = cfg.received.get(hdr.ramblock)
        run = hdr.run_start
        if run is not None:
            # The common packet: consecutive pages, normal ones first. One view of RAM,
            # no per-page index arrays (the interpreter runs cache-cold after a copy).
            first = run // ps
            if nn:
                dest = block.view[first * ps : (first + nn) * ps]
                if compressed:
                    payload = state.inbuf[:size]
                    ch.read_exact(payload)
                    ch.decompressor.decompress_packet(payload, dest)
                else:
                    ch.read_exact(dest)
                if received is not None:
                    received[first : first + nn] = True
                st.add("normal_pages", nn)
            if nzero:
                block.zero_out_range(first + nn, nzero, received)
                st.add("zero_pages", nzero)
            return hdr.is_sync
        offsets = hdr.offsets
        if nn:
            idx = (offsets[:nn] // ps).astype(np.int64)
            if compressed:
                payload = state.inbuf[:size]
                ch.read_exact(payload)
                ch.decompressor.decompress_packet(payload, state.scratch_view[: nn * ps])
                block.pages[idx] = state.scratch[:nn]
            else:
                starts, lengths = page_runs(idx)
                if starts.shape[0] <= MAX_RUNS:
                    view = block.view
                    ch.read_scatter([view[s * ps : (s + c) * ps] for s, c in
                                     zip(starts.tolist(), lengths.tolist(), strict=True)])
                else:
                    ch.read_exact(state.scratch_view[: nn * ps])
                    block.pages[idx] = state.scratch[:nn]
            if received is not None:
                received[idx] = True
            st.add("normal_pages", nn)
        if nzero:
            zidx = (offsets[nn : nn + nzero] // ps).astype(np.int64)
            # Write only pages that may hold data (QEMU skips the others too): with
            # fresh RAM, pages never received are zero already; otherwise look.
            block.zero_out(zidx, received)
            st.add("zero_pages", nzero)
        return hdr.is_sync


register_send_ops(RamSendOps())
register_recv_ops(RamRecvOps())
