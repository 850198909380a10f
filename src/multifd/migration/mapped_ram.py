"""mapped-ram engine: RAM at fixed file offsets, written and read by N parallel channels.

QEMU source: migration/ram.c (`mapped_ram_setup_ramblock`, `ram_save_file_bmap`,
`parse_ramblock_mapped_ram`), migration/multifd-nocomp.c and migration/file.c
(`file_write_ramblock_iov`, `multifd_file_recv_data`); byte layout in wire/mapped_ram.py.

    source (MigrationSource, file:PATH + mapped-ram)     channels (WorkerPool, N fds)
    main fd: QEVM, configuration [capabilities: mapped-ram]
    ram START: MEM_SIZE, per block: entry + header, seek past the region
    each pass: dirty pages, a window at a time  ---->   zero scan; pwritev of every run
                                                        of data pages straight from RAM;
                                                        bitmap bit set (data) / clear (zero)
    before every bitmap sync: wait for the jobs (a page is never in flight twice)
    END: last pass, wait, write every bitmap (pwrite), EOS; devices, EOF, vmdesc (main fd)

    destination (MigrationDestination, file:PATH + mapped-ram)
    main fd: decode the stream, seeking past each block region (wire seek_past_region)
    MEM_SIZE: check every region, read each bitmap, preadv runs of pages into RAM on the
    N channels (pages missing from the bitmap stay zero); the rest of the stream as usual

There are no multifd packets in a mapped-ram file, so multifd device-state packets are
never used with it (QEMU's `multifd_device_state_supported` is false with mapped-ram):
device state travels in the main stream. With the `direct-io` parameter the channel fds
are opened O_DIRECT (RAM views are page-aligned and so are file offsets, so no bounce
buffer is needed); the main fd stays buffered, as QEMU's does.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from multifd.machine.workers import Aborted, Job, WorkerError, WorkerPool
from multifd.migration.ram import RamLoadHandler, RamSaveHandler
from multifd.wire.buffer import NEED_DATA
from multifd.wire.constants import SectionType
from multifd.wire.errors import Mismatch, Truncated, WireError
from multifd.wire.mapped_ram import (
    BlockRegion,
    bitmap_to_pages,
    check_pages_in_file,
    check_region,
    check_regions,
    page_runs,
    pages_to_bitmap,
    plan_block_list,
)
from multifd.wire.ram import RamBlockInfo, RamEos, RamMemSize, encode_ram_record
from multifd.wire.stream import Configuration, MainStreamDecoder

if TYPE_CHECKING:
    from multifd.machine.machine import Machine
    from multifd.machine.ramblock import RamBlock
    from multifd.migration.mainstream import MainStreamWriter
    from multifd.migration.profile import Profile

__all__ = [
    "MappedRamError",
    "MappedRamInput",
    "MappedRamLoadHandler",
    "MappedRamOutput",
    "MappedRamSaveHandler",
    "direct_io_supported",
    "seek_past_region",
]

log = logging.getLogger(__name__)
READ_CHUNK = 1 << 20  # main-stream reads; also QEMU's MAPPED_RAM_LOAD_BUF_SIZE
JOB_BYTES = 64 << 20  # page bytes per load job
MAX_IO = 1 << 30  # bytes per pwritev/preadv call (Linux caps one call near 2 GiB)
CAPABILITY = "mapped-ram"


class MappedRamError(Exception):
    """A mapped-ram file could not be written or read (one-line message)."""


def direct_io_supported(path: str | os.PathLike[str]) -> str | None:
    """None when O_DIRECT works for files in `path`'s directory, else why not (tmpfs and
    some other file systems refuse it)."""
    if not hasattr(os, "O_DIRECT"):
        return "O_DIRECT is not available on this platform"
    d = os.path.dirname(os.path.abspath(path)) or "."
    probe = os.path.join(d, f".multifd-odirect-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as e:
        return f"O_DIRECT refused in {d}: {e.strerror or e}"
    try:
        import mmap

        buf = mmap.mmap(-1, 4096)
        try:
            os.pwritev(fd, [buf], 0)
        except OSError as e:
            return f"O_DIRECT write refused in {d}: {e.strerror or e}"
        finally:
            buf.close()
    finally:
        os.close(fd)
        os.unlink(probe)
    return None


# ------------------------------------------------------------------------- channel I/O


def _pwrite_all(fd: int, mv: memoryview, off: int) -> None:
    while len(mv):
        n = os.pwritev(fd, [mv[:MAX_IO]], off)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        mv, off = mv[n:], off + n


def _pread_all(fd: int, mv: memoryview, off: int, what: str) -> None:
    while len(mv):
        n = os.preadv(fd, [mv[:MAX_IO]], off)
        if n <= 0:
            raise Truncated(f"{what}: file ends inside the page data", offset=off)
        mv, off = mv[n:], off + n


def _idx_runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, count) of each run of consecutive values of an ascending index array."""
    if not idx.size:
        return idx, idx
    cut = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate(([0], cut))]
    ends = idx[np.concatenate((cut - 1, [idx.size - 1]))] + 1
    return starts, ends - starts


def write_window(fd: int, block: RamBlock, pages: np.ndarray, pages_offset: int,
                 bmap: np.ndarray) -> tuple[int, int, int]:
    """A channel's job: zero-scan `pages` (ascending) of `block`, pwritev each run of data
    pages from the RAM view to its slot, set/clear their bits. Returns (normal, zero,
    bytes written)."""
    zero = block.zero_pages(pages)
    data = pages[~zero]
    bmap[pages[zero]] = False
    bmap[data] = True
    ps = block.page_size
    view = block.view
    starts, counts = _idx_runs(data)
    for s, c in zip(starts.tolist(), counts.tolist(), strict=True):
        _pwrite_all(fd, view[s * ps : (s + c) * ps], pages_offset + s * ps)
    return int(data.size), int(pages.size - data.size), int(data.size) * ps


def read_runs(fd: int, block: RamBlock, runs: Sequence[tuple[int, int]],
              pages_offset: int) -> int:
    """A channel's job: preadv each (first page, count) run straight into RAM."""
    ps = block.page_size
    view = block.view
    for s, c in runs:
        _pread_all(fd, view[s * ps : (s + c) * ps], pages_offset + s * ps,
                   f"block {block.name!r} page {s}")
    return sum(c for _, c in runs)


class _Channels:
    """N file descriptors on one file and a WorkerPool with one worker per fd; jobs take
    fds in turn (positional I/O, so two jobs may even share one)."""

    def __init__(self, path: str, channels: int, flags: int, *, direct_io: bool,
                 name: str) -> None:
        if channels < 1:
            raise ValueError("mapped-ram needs at least one channel")
        self.note: str | None = None
        self.direct_io = False
        if direct_io:
            why = direct_io_supported(path)
            if why is None:
                flags |= os.O_DIRECT
                self.direct_io = True
            else:
                self.note = f"direct-io off: {why}; using buffered I/O"
                log.warning("mapped-ram %s", self.note)
        self.fds: list[int] = []
        try:
            for _ in range(channels):
                self.fds.append(os.open(path, flags))
        except BaseException:
            self.close()
            raise
        self.pool = WorkerPool(name, max_workers=channels)
        self._jobs: deque[Job] = deque()
        self._next = 0
        self.limit = 2 * channels

    def submit(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Queue fn(fd, *args); returns results of jobs that had to be waited for to keep
        at most 2 x channels outstanding."""
        fd = self.fds[self._next % len(self.fds)]
        self._next += 1
        self._jobs.append(self.pool.submit(fn, fd, *args, name=f"{self.pool.name}-io"))
        done = []
        while len(self._jobs) > self.limit:
            done.append(self._result(self._jobs.popleft()))
        return done

    def drain(self) -> list[Any]:
        """Wait for every queued job; their results in submission order."""
        out = []
        while self._jobs:
            out.append(self._result(self._jobs.popleft()))
        return out

    @staticmethod
    def _result(job: Job) -> Any:
        try:
            return job.result()
        except Aborted:
            raise MappedRamError("mapped-ram channel I/O aborted") from None
        except WorkerError as e:
            if isinstance(e.cause, WireError):
                raise e.cause from None
            raise MappedRamError(f"mapped-ram channel: {e.cause}") from e.cause

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            if pool.outstanding:
                pool.abort()
            pool.close(timeout=30)
        for fd in self.fds:
            os.close(fd)
        self.fds = []


# ------------------------------------------------------------------------------ writing


class _MappedRamFile:
    """The main fd (buffered: the stream, seeks, bitmaps) and the channels on one file."""

    def __init__(self, path: str, channels: int, *, write: bool, direct_io: bool) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC if write
                          else os.O_RDONLY, 0o644)
        try:
            self.size = os.fstat(self.fd).st_size
            self.channels = _Channels(path, channels, os.O_WRONLY if write else os.O_RDONLY,
                                      direct_io=direct_io,
                                      name=f"mapped-ram-{'save' if write else 'load'}")
        except BaseException:
            os.close(self.fd)
            raise

    def abort(self) -> None:
        """Stop queued page I/O and the main-stream reader (a cancelled migration)."""
        self.channels.pool.abort()

    def close(self) -> None:
        self.channels.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class MappedRamOutput(_MappedRamFile):
    """A mapped-ram file being written; `send` is a MainStreamWriter's sink."""

    def __init__(self, path: str, channels: int = 1, *, direct_io: bool = False) -> None:
        super().__init__(path, channels, write=True, direct_io=direct_io)

    def send(self, bufs: Sequence[Any]) -> None:
        views = [memoryview(b).cast("B") for b in bufs]
        while views:
            n = os.writev(self.fd, views[:1024])
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def seek(self, pos: int) -> None:
        os.lseek(self.fd, pos, os.SEEK_SET)

    def pwrite(self, data: bytes, off: int) -> None:
        _pwrite_all(self.fd, memoryview(data), off)

    def write_block_list(self, main: MainStreamWriter, blocks: Sequence[tuple[str, int]],
                         page_size: int) -> list[BlockRegion]:
        """The MEM_SIZE list at the current position, seeking past each block's region."""
        main.flush()
        pieces, regions, end = plan_block_list(blocks, self.tell(), page_size)
        for off, data in pieces:
            self.seek(off)
            main.write(data)
            main.flush()
        self.seek(end)
        return regions

    def write_bitmaps(self, regions: Sequence[BlockRegion], bmaps: Sequence[np.ndarray]) -> None:
        """ram_save_file_bmap: every block's bitmap at its bitmap_offset."""
        for r, m in zip(regions, bmaps, strict=True):
            self.pwrite(pages_to_bitmap(m), r.header.bitmap_offset)


def save_blocks(out: MappedRamOutput, blocks: Sequence[RamBlock],
                regions: Sequence[BlockRegion], window: int = 8192) -> tuple[int, int]:
    """Write whole blocks (a paused VM image) on the channels and then their bitmaps;
    returns (pages written, zero pages)."""
    bmaps = [np.zeros(b.num_pages, dtype=bool) for b in blocks]
    results: list[tuple[int, int, int]] = []
    for b, r, m in zip(blocks, regions, bmaps, strict=True):
        for s in range(0, b.num_pages, window):
            pages = np.arange(s, min(s + window, b.num_pages), dtype=np.int64)
            results += out.channels.submit(write_window, b, pages, r.header.pages_offset, m)
    results += out.channels.drain()
    out.write_bitmaps(regions, bmaps)
    return sum(x[0] for x in results), sum(x[1] for x in results)


class MappedRamSaveHandler(RamSaveHandler):
    """The "ram" section of a mapped-ram source: the same dirty tracking and passes as
    RamSaveHandler, but pages go to their file slots on the channels, not to packets."""

    def __init__(self, machine: Machine, main: MainStreamWriter, profile: Profile,
                 out: MappedRamOutput, on_bytes: Callable[[int], None] | None = None) -> None:
        super().__init__(machine, main, profile, None)
        sizes = {b.page_size for b in self.blocks}
        if len(sizes) > 1:
            raise ValueError("mapped-ram needs one page size for every RAM block")
        self.out = out
        self.on_bytes = on_bytes
        self.regions: list[BlockRegion] = []
        self.file_bmap = [np.zeros(b.num_pages, dtype=bool) for b in self.blocks]

    def save_setup(self) -> None:
        """START body: the block list with a header per block (the file seeks past each
        region), the first bitmap sync, EOS. No multifd sync: the channels are local."""
        self.regions = self.out.write_block_list(
            self.main, [(b.name, b.used_length) for b in self.blocks], self.page_size)
        for b in self.blocks:
            b.start_dirty_log()
        self.bitmap_sync(first=True)
        self.main.write(encode_ram_record(RamEos()))

    def bitmap_sync(self, first: bool = False) -> None:
        """Every queued write lands first: a page re-dirtied now is then written again
        only after its older copy (the channels' MULTIFD_SYNC_LOCAL)."""
        self._account(self.out.channels.drain())
        super().bitmap_sync(first)

    def iterate(self, final: bool) -> bool:
        if not final:
            return super().iterate(False)
        self.bitmap_sync()
        self.section_header(SectionType.END)
        while not self.walk(final=True):
            pass
        self._account(self.out.channels.drain())
        self.out.write_bitmaps(self.regions, self.file_bmap)
        self.section_end()
        self.section_footer()
        self.cleanup()
        return True

    def _send_window(self, i: int, block: RamBlock, pages: np.ndarray) -> None:
        self._account(self.out.channels.submit(
            write_window, block, pages, self.regions[i].header.pages_offset, self.file_bmap[i]))

    def _account(self, results: list[tuple[int, int, int]]) -> None:
        for normal, zero, nbytes in results:
            self.counters.normal += normal
            self.counters.duplicate += zero
            if self.on_bytes is not None:
                self.on_bytes(nbytes)


# ------------------------------------------------------------------------------ reading


def seek_past_region(dec: MainStreamDecoder, pos: int, size: int) -> int:
    """The next file position to read after NEED_DATA: past a block region when one is
    pending. A region past the end of the file is a truncated file, named here."""
    pos += dec.seek_past_region()
    if pos > size:
        name = dec.ram_reader.skip_block
        raise Truncated(f"block {name!r}: its region ends at {pos:#x}, past the end of the "
                        f"file ({size} bytes)", offset=size)
    return pos


class MappedRamInput(_MappedRamFile):
    """A mapped-ram file being read."""

    def __init__(self, path: str, channels: int = 1, *, direct_io: bool = False) -> None:
        super().__init__(path, channels, write=False, direct_io=direct_io)

    def run_main(self, dec: MainStreamDecoder, apply: Callable[[Any], bool | None],
                 page_size: int) -> None:
        """Decode the main stream from the start of the file, seeking past each block
        region; checks the capability and every region before `apply` sees MEM_SIZE.
        Stops when `apply` returns True (the stream is complete) or at the end."""
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        pos = 0
        while True:
            if self.channels.pool.aborted:
                raise MappedRamError("mapped-ram load aborted")
            n = os.preadv(self.fd, [view], pos)
            pos += n
            if n:
                dec.receive_data(view[:n])
            else:
                dec.receive_eof()
            while (rec := dec.next_record()) is not NEED_DATA:
                if isinstance(rec, Configuration) and CAPABILITY not in (rec.capabilities or ()):
                    raise Mismatch("Capability mapped-ram is on, but received capability is "
                                   "off (not a mapped-ram file)", offset=0)
                if isinstance(rec, RamMemSize):
                    self.check_blocks(rec, page_size)
                if apply(rec):
                    return
            pos = seek_past_region(dec, pos, self.size)
            if not n:
                if not dec.finished:
                    raise Truncated("the file ends before the end of the stream",
                                    offset=dec.offset)
                return

    def check_blocks(self, rec: RamMemSize, page_size: int) -> None:
        """Every block's region: page size, bitmap before its pages, inside the file, no
        overlap. Runs before any RAM is allocated for the list."""
        regions = []
        for info in rec.blocks:
            if info.mapped_ram is None:
                raise Mismatch(f"block {info.name!r} has no mapped-ram header")
            r = BlockRegion(info.name, info.used_length, info.mapped_ram)
            check_region(r, page_size=page_size, file_size=self.size)
            if not r.ignored and r.end > self.size:
                raise Truncated(f"block {info.name!r}: region ends at {r.end:#x}, past the "
                                f"end of the file ({self.size} bytes)",
                                offset=r.header.bitmap_offset)
            regions.append(r)
        check_regions(regions)

    def read_bitmap(self, r: BlockRegion) -> np.ndarray:
        raw = os.pread(self.fd, r.bitmap_len, r.header.bitmap_offset)
        if len(raw) < r.bitmap_len:
            raise Truncated(f"block {r.name!r}: bitmap past the end of the file",
                            offset=r.header.bitmap_offset)
        mask = bitmap_to_pages(raw, r.num_pages)
        check_pages_in_file(r, mask, self.size)
        return mask

    def load_blocks(self, blocks: Mapping[str, RamBlock],
                    infos: Sequence[RamBlockInfo],
                    received: Mapping[str, np.ndarray] | None = None,
                    *, zero_absent: bool = False) -> tuple[int, int]:
        """Read every listed block's present pages into RAM on the channels. Pages missing
        from the bitmap are zero: left alone in fresh RAM, made zero with `zero_absent`
        (RAM that held something: QEMU's handle_zero_mapped_ram). Returns (present,
        absent)."""
        present = absent = 0
        for info in infos:
            assert info.mapped_ram is not None
            r = BlockRegion(info.name, info.used_length, info.mapped_ram)
            if r.ignored:
                continue
            block = blocks[info.name]
            mask = self.read_bitmap(r)
            got = received.get(info.name) if received is not None else None
            if got is not None:
                got |= mask
            if zero_absent:
                block.zero_out(np.flatnonzero(~mask))
            n = int(np.count_nonzero(mask))
            present += n
            absent += r.num_pages - n
            self._submit_runs(block, mask, r.header.pages_offset)
        self.channels.drain()
        return present, absent

    def _submit_runs(self, block: RamBlock, mask: np.ndarray, pages_offset: int) -> None:
        starts, counts = page_runs(mask)
        per_job = max(1, JOB_BYTES // block.page_size)
        job: list[tuple[int, int]] = []
        size = 0
        for s, c in zip(starts.tolist(), counts.tolist(), strict=True):
            while c:
                take = min(c, per_job - size)
                job.append((s, take))
                size += take
                s, c = s + take, c - take
                if size >= per_job:
                    self.channels.submit(read_runs, block, job, pages_offset)
                    job, size = [], 0
        if job:
            self.channels.submit(read_runs, block, job, pages_offset)


class MappedRamLoadHandler(RamLoadHandler):
    """The "ram" section of a mapped-ram destination: at MEM_SIZE every block's pages are
    read from the file (the region checks ran in MappedRamInput.run_main)."""

    input: MappedRamInput | None = None  # set once the file is open

    def load_state(self, kind: SectionType, version_id: int, data: Any) -> None:
        if isinstance(data, RamMemSize):
            self._check_blocks(data)
            assert self.input is not None
            present, absent = self.input.load_blocks(  # no received maps: RAM not fresh
                self.blocks, data.blocks, self.received, zero_absent=not self.received)
            self.normal += present
            self.zero += absent
            return
        super().load_state(kind, version_id, data)


# ---------------------------------------------------------------------- engine hooks


def _file_channels(addr: Any, params: Any, caps: Any) -> tuple[str, int, bool]:
    """What `file:` + mapped-ram allows (QEMU's migrate_caps_check / params check)."""
    from multifd.transport.uri import FileAddress

    if not isinstance(addr, FileAddress):
        raise ValueError(f"mapped-ram needs a file: URI, not {addr}")
    if addr.offset:
        raise ValueError("mapped-ram with file:PATH,offset=N is not supported")
    if params.multifd_compression != "none":
        raise ValueError("mapped-ram cannot be used with multifd compression")
    if params.get("tls-creds"):
        raise ValueError("mapped-ram cannot be used with TLS")
    channels = int(params.multifd_channels) if caps.get("multifd") else 1
    return addr.path, channels, bool(params.get("direct-io"))


def mapped_ram_output(addr: Any, params: Any, caps: Any) -> MappedRamOutput | None:
    """The source's file when the mapped-ram capability is on, else None."""
    if not caps.get(CAPABILITY):
        return None
    path, channels, direct = _file_channels(addr, params, caps)
    return MappedRamOutput(path, channels, direct_io=direct)


def mapped_ram_input(addr: Any, params: Any, caps: Any) -> MappedRamInput | None:
    """The destination's file when the mapped-ram capability is on, else None."""
    if not caps.get(CAPABILITY):
        return None
    path, channels, direct = _file_channels(addr, params, caps)
    return MappedRamInput(path, channels, direct_io=direct)
