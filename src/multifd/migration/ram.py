"""The "ram" section handler (QEMU migration/ram.c), source and destination side.

Source: after a dirty-bitmap sync, pages to send sit in a per-block `todo` bitmap. An
iteration walks it from a cursor in block order, 128 pages (one multifd packet) at a time:
page batches go into RAM payload slots handed to `Sender.send`; zero pages go where
zero-page-detection says (legacy: ZERO records on the main stream, the only choice of
qemu-7.2; multifd: zero offsets inside packets, qemu-10's default; none: sent as data).
A pass ends when the walk wraps; a page is sent at most once per pass and
passes are separated by a multifd sync, which is what keeps an old copy of a page from
overtaking a newer one on another channel (qemu-reference.md §3.6).

Destination: applies ZERO/PAGE records from the main stream and runs the multifd sync
barrier at the markers the profile uses (EOS for qemu-7.2, MULTIFD_FLUSH for qemu-10).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from multifd.migration.handlers import LoadHandler, SaveHandler
from multifd.migration.params import zero_page_default
from multifd.multifd.ram import RamPayload
from multifd.multifd.slots import SendSlot
from multifd.wire.constants import RAM_SECTION_IDSTR, RAM_SECTION_VERSION, SectionType, page_count
from multifd.wire.errors import BadRecordType, Mismatch, lookup
from multifd.wire.ram import (
    RamBlockInfo,
    RamEos,
    RamMemSize,
    RamMultifdFlush,
    RamPage,
    RamZero,
    RamZeroRun,
    encode_ram_record,
)
from multifd.wire.ram_batch import encode_page_run, encode_zero_run

if TYPE_CHECKING:
    from multifd.machine.machine import Machine
    from multifd.machine.ramblock import RamBlock
    from multifd.migration.mainstream import MainStreamWriter
    from multifd.migration.profile import Profile
    from multifd.multifd.sender import Sender

MAX_WAIT_S = 0.050  # QEMU's MAX_WAIT: the longest a RAM iteration runs
RATE_PERIOD_S = 1.0  # dirty-pages-rate period (QEMU: a sync more than 1000 ms later)
_WINDOW = 8192  # pages taken from todo at a time (64 packets)
_TODO_STRETCH = 8 * _WINDOW  # pages of todo indexed at a time
_SCAN_AHEAD = 2048  # pages zero-scanned ahead per wait for a free channel slot


class RamCounters:
    """Page counters that query-migrate reports (duplicate = zero pages)."""

    def __init__(self) -> None:
        self.normal = 0
        self.duplicate = 0
        self.dirty_sync_count = 0
        self.dirty_pages_last_sync = 0
        self.last_sync_time = 0.0
        # dirty-pages-rate as QEMU's migration_update_rates: pages newly dirty summed over
        # syncs until a period of at least 1 s closes, then divided by its length.
        self.dirty_pages_period = 0
        self.period_start = 0.0
        self.dirty_pages_rate = 0
        # The latest live bitmap sync: its duration and the pages it found written (the
        # final sync's cost is estimated from these: migration/downtime.py)
        self.sync_s = 0.0
        self.sync_dirtied = 0
        # Every page the live syncs found dirty (also those already in todo), and when
        # the first and every live sync ended: the measured dirty rate the demo compares
        # with its workload, over the same intervals.
        self.dirtied_pages = 0
        self.sync_instants: list[float] = []
        # The final (paused) sync: its duration, the pages it found written and the pages
        # todo then held (what the switchover sends): the timeline's switchover figures.
        self.final_sync_s = 0.0
        self.final_dirtied = 0
        self.final_pages = 0


class RamSaveHandler(SaveHandler):
    """Source side of the "ram" section: a live handler whose final iteration sends
    everything left after the last bitmap sync."""

    idstr = RAM_SECTION_IDSTR
    instance_id = 0
    version_id = RAM_SECTION_VERSION

    def __init__(
        self,
        machine: Machine,
        main: MainStreamWriter,
        profile: Profile,
        sender: Sender | None,
        *,
        fresh_destination: bool = True,
        zero_page_detection: str | None = None,
    ) -> None:
        self.machine = machine
        self.main = main
        self.profile = profile
        self.sender = sender
        # QEMU's zero-page-detection (params.effective_zero_page_detection); None: the
        # profile's own (multifd for qemu-10, legacy for qemu-7.2).
        self.zero_page_detection = zero_page_detection or zero_page_default(profile)
        self.blocks: list[RamBlock] = list(machine.blocks.values())
        self.todo = [np.zeros(b.num_pages, dtype=bool) for b in self.blocks]
        # Pages the destination holds a copy of. A zero page never sent needs no transfer:
        # the destination's RAM starts zeroed (QEMU's destination assumes the same when it
        # skips zero pages it never received, multifd_recv_zero_page_process).
        self.sent = (
            [np.zeros(b.num_pages, dtype=bool) for b in self.blocks]
            if fresh_destination
            else None
        )
        self.todo_count = 0
        self.cursor_block = 0
        self.cursor_page = 0
        self.unsynced = False  # pages went to channels since the last multifd sync
        self.last_main_block: str | None = None  # CONTINUE tracking for main-stream records
        self.counters = RamCounters()
        self.paused = False  # the final iteration began (the machine is paused)
        self.page_size = self.blocks[0].page_size if self.blocks else 4096
        self.slot = SendSlot(self.page_size)
        self.batch = page_count(self.page_size)
        # Zero scan ahead of the send cursor, done while every channel slot is full (the
        # producer would only wait): zero status of todo pages of block `cursor_block` in
        # [window end, _scan_end). Valid until the next bitmap sync, which consumes the
        # dirty bits that would otherwise report a page written after its scan.
        self._scan_zero = [np.zeros(b.num_pages, dtype=bool) for b in self.blocks]
        self._scan_end = 0
        self._window_end = 0

    # -- the save handler ---------------------------------------------------------------------
    def is_live(self) -> bool:
        return True

    def setup(self) -> None:
        self.section_header(SectionType.START)
        self.save_setup()
        self.section_footer()

    def pending(self, exact: bool = False) -> tuple[int, int]:
        """Pages in todo; ``exact`` first folds the dirty bitmap in (migration_bitmap_sync)."""
        if exact:
            self.bitmap_sync()
        return self.pending_bytes(), 0

    def iterate(self, final: bool) -> bool:
        """A PART section of at most MAX_WAIT; or, paused, the END section with the last
        bitmap sync and everything left (ram_save_complete)."""
        if not final:
            self.section_header(SectionType.PART)
            done = self.walk()
            self.section_end()
            self.section_footer()
            return done
        self.paused = True
        self.bitmap_sync()
        self.section_header(SectionType.END)
        while not self.walk(final=True):
            pass
        self.section_end()
        self.section_footer()
        return True  # tracking stops in cleanup(), after the last byte: not in the downtime

    def cleanup(self) -> None:
        for b in self.blocks:
            try:
                if b.dirty_logging:
                    b.stop_dirty_log()
            except Exception:  # a closed block tracks nothing
                pass

    # -- setup ------------------------------------------------------------------------------
    def save_setup(self) -> None:
        """SECTION_START body: the block list, the first sync, EOS (ram_save_setup)."""
        infos = tuple(RamBlockInfo(b.name, b.used_length) for b in self.blocks)
        total = sum(b.used_length for b in self.blocks)
        self.main.write(encode_ram_record(RamMemSize(total, infos)))
        for b in self.blocks:
            b.start_dirty_log()
        self.bitmap_sync(first=True)
        if self.sender is not None:
            self._multifd_sync(force=True)
        self.main.write(encode_ram_record(RamEos()))

    # -- dirty tracking -----------------------------------------------------------------------
    def bitmap_sync(self, first: bool = False) -> None:
        """migration_bitmap_sync: fold every block's dirty bits into todo."""
        t_start = time.monotonic()
        added = dirtied = 0
        for b, todo in zip(self.blocks, self.todo, strict=True):
            if first:
                b.sync_dirty_bitmap()
                todo[:] = True
                added += b.num_pages
            else:
                snap = b.sync_dirty_bitmap(final=self.paused)
                dirtied += int(np.count_nonzero(snap))
                added += int(np.count_nonzero(snap & ~todo))
                todo |= snap
        self.todo_count += added
        self._scan_end = 0  # scans before this sync may miss writes whose bits it consumed
        c = self.counters
        now = time.monotonic()
        c.dirty_sync_count += 1
        c.dirty_pages_last_sync = added
        c.last_sync_time = now
        if first:  # every page starts dirty: none was dirtied by the workload yet
            c.period_start = now
            c.dirty_pages_period = 0
            c.sync_instants = [now]
            return
        if not self.paused:  # the live syncs measure the guest and the sync's cost
            c.sync_s, c.sync_dirtied = now - t_start, dirtied
            c.dirtied_pages += dirtied
            c.sync_instants.append(now)
        else:
            c.final_sync_s, c.final_dirtied, c.final_pages = now - t_start, dirtied, self.todo_count
        c.dirty_pages_period += added
        if now - c.period_start > RATE_PERIOD_S:
            c.dirty_pages_rate = int(c.dirty_pages_period / (now - c.period_start))
            c.period_start = now
            c.dirty_pages_period = 0

    def pending_bytes(self) -> int:
        return self.todo_count * self.page_size

    def dirty_estimate_bytes(self) -> int:
        """Pages dirtied since the last sync (not yet folded into todo)."""
        return sum(b.dirty_count() * b.page_size for b in self.blocks)

    # -- sending --------------------------------------------------------------------------
    def walk(self, final: bool = False) -> bool:
        """Send todo pages from the cursor; stop after MAX_WAIT (unless final) or at the wrap.

        Returns True when the pass is complete and nothing is left in todo.
        """
        deadline = None if final else time.monotonic() + MAX_WAIT_S
        while self.cursor_block < len(self.blocks):
            block = self.blocks[self.cursor_block]
            todo = self.todo[self.cursor_block]
            while self.cursor_page < block.num_pages:
                # todo is read a stretch at a time: an iteration sends ~50 ms worth, so
                # indexing the whole rest of a large block each time would be wasted.
                start = self.cursor_page
                end = min(start + _TODO_STRETCH, block.num_pages)
                idx = np.flatnonzero(todo[start:end])
                idx += start
                for win in range(0, idx.size, _WINDOW):
                    pages = idx[win : win + _WINDOW]
                    todo[pages] = False
                    self.todo_count -= int(pages.size)
                    last = int(pages[-1]) + 1
                    self._window_end = last
                    self._send_window(self.cursor_block, block, pages)
                    self.cursor_page = last
                    if deadline is not None and time.monotonic() > deadline:
                        return False
                self.cursor_page = end
            self.cursor_block += 1
            self.cursor_page = 0
            self._scan_end = 0
        # The walk wrapped: the pass is over.
        self.cursor_block = 0
        self.cursor_page = 0
        self._scan_end = 0
        if self.sender is not None and not self.profile.sync_per_section:
            self._multifd_sync()
        return self.todo_count == 0

    def _send_window(self, i: int, block: RamBlock, pages: np.ndarray) -> None:
        """Send up to _WINDOW pages of block i: one zero scan for the whole window, then
        ZERO records (main-stream zero pages) and packets or PAGE records of self.batch.

        zero-page-detection (QEMU's ram_save_target_page): `none` looks at no page, so
        every page goes as data and none is skipped; `legacy` (and `multifd` without
        channels) finds them here and sends ZERO records; `multifd` leaves it to the
        channels (zero offsets in the packets)."""
        mode = self.zero_page_detection
        zero_on_main = mode == "legacy" or (mode == "multifd" and self.sender is None)
        zero: np.ndarray | None = None
        if zero_on_main:
            zero = self._zero_pages(block, pages)
        elif mode == "multifd" and self.sent is not None:  # the channels find zero pages;
            fresh = ~self.sent[i][pages]  # never-sent ones are looked at here, to skip them
            zero = np.zeros(pages.size, dtype=bool)
            if fresh.any():
                zero[fresh] = self._zero_pages(block, pages[fresh])
        if self.sent is not None and zero is not None:
            # A zero page the destination never received needs no transfer: its RAM
            # starts zeroed (QEMU's destination relies on the same, see __init__).
            sent = self.sent[i]
            skip = zero & ~sent[pages]
            sent[pages[~zero]] = True
            nskip = int(np.count_nonzero(skip))
            if nskip:
                self.counters.duplicate += nskip
                keep = ~skip
                pages, zero = pages[keep], zero[keep]
        ps = np.uint64(block.page_size)
        if zero_on_main and zero is not None:
            nz = int(np.count_nonzero(zero))
            if nz:
                self._write_zero(block, pages[zero].astype(np.uint64) * ps)
                self.counters.duplicate += nz
                pages = pages[~zero]
        offsets = pages.astype(np.uint64) * ps
        for pos in range(0, offsets.size, self.batch):
            self._send_pages(block, pages[pos : pos + self.batch],
                             offsets[pos : pos + self.batch])

    def _zero_pages(self, block: RamBlock, pages: np.ndarray) -> np.ndarray:
        """Zero mask of `pages` (ascending, of the cursor block): scanned ahead or now."""
        done = int(np.searchsorted(pages, self._scan_end))
        if done == 0:
            return block.zero_pages(pages)
        zero = self._scan_zero[self.cursor_block][pages]
        if done < pages.size:
            zero[done:] = block.zero_pages(pages[done:])
        return zero

    def _scan_ahead(self) -> bool:
        """Scan the next _SCAN_AHEAD todo pages past the current window; False when the
        rest of the block is scanned already."""
        i = self.cursor_block
        block, todo = self.blocks[i], self.todo[i]
        start = max(self._scan_end, self._window_end)
        if start >= block.num_pages:
            return False
        end = min(start + _SCAN_AHEAD, block.num_pages)
        pages = np.flatnonzero(todo[start:end]) + start
        if pages.size:
            self._scan_zero[i][pages] = block.zero_pages(pages)
        self._scan_end = end
        return True

    def _send_pages(self, block: RamBlock, pages: np.ndarray, offsets: np.ndarray) -> None:
        """Pages with data (qemu-10 multifd: maybe zero, the channel looks) of one batch."""
        if self.sender is None:
            cont = self.last_main_block == block.name
            self.main.write(
                encode_page_run(block.name, offsets, block.pages[pages], first_continues=cont)
            )
            self.last_main_block = block.name
            self.counters.normal += int(pages.size)
            return
        self.counters.normal += int(offsets.size)  # qemu-10: corrected by the channel stats
        self.slot.payload(RamPayload).fill(block, offsets)
        while (got := self.sender.try_send(self.slot)) is None:
            if not self._scan_ahead():  # nothing left to scan: wait for a slot
                got = self.sender.send(self.slot)
                break
        self.slot = got
        self.unsynced = True

    def _write_zero(self, block: RamBlock, offsets: np.ndarray) -> None:
        if offsets.size == 0:
            return
        cont = self.last_main_block == block.name
        self.main.write(encode_zero_run(block.name, offsets, first_continues=cont))
        self.last_main_block = block.name

    def _multifd_sync(self, force: bool = False) -> None:
        """One SYNC per channel, then the marker; the marker is flushed before more pages."""
        assert self.sender is not None
        if not (self.unsynced or force):
            return
        self.sender.sync()
        self.unsynced = False
        if not self.profile.sync_per_section:
            self.main.write(encode_ram_record(RamMultifdFlush()))
            self.main.flush()

    def section_end(self) -> None:
        """Close a PART/END section body: per-section sync for 7.2, then EOS."""
        if self.sender is not None:
            if self.profile.sync_per_section:
                self._multifd_sync(force=True)
            else:
                self._multifd_sync()
        self.main.write(encode_ram_record(RamEos()))


def apply_page_record(blocks: Mapping[str, RamBlock], received: Mapping[str, np.ndarray],
                      rec: object) -> tuple[int, int] | None:
    """Apply a main-stream ZERO, ZERO run or PAGE record to RAM; returns the (normal, zero)
    pages it held, None for another record. The block a record names is looked up checked
    (a hostile stream gets a WireError naming it, not a KeyError). With ``received`` maps
    (fresh RAM), a zero page never written is left alone (RamBlock.zero_out)."""
    if isinstance(rec, RamZero | RamPage):
        blk = lookup(blocks, rec.block, kind="RAM block", record=type(rec).__name__,
                     field="block")
        got = received.get(rec.block)
        page = rec.offset // blk.page_size
        if isinstance(rec, RamPage):
            blk.view[rec.offset : rec.offset + blk.page_size] = rec.data
        elif not rec.fill:
            blk.zero_out(np.array([page]), got)
            return 0, 1
        else:
            blk.pages[page] = rec.fill
        if got is not None:
            got[page] = True
        return (1, 0) if isinstance(rec, RamPage) else (0, 1)
    if isinstance(rec, RamZeroRun):
        blk = lookup(blocks, rec.block, kind="RAM block", record="ZERO run", field="block")
        blk.zero_out(rec.offsets // blk.page_size, received.get(rec.block))
        return 0, int(rec.offsets.size)
    return None


class RamLoadHandler(LoadHandler):
    """Destination side of the "ram" section: the block list is checked, ZERO/PAGE records
    go into RAM, and the multifd sync barrier runs at the profile's marker (EOS for
    qemu-7.2, MULTIFD_FLUSH for qemu-10) through ``sync(required)``."""

    idstr = RAM_SECTION_IDSTR
    version_id = RAM_SECTION_VERSION

    def __init__(
        self,
        machine: Machine,
        profile: Profile,
        received: dict[str, np.ndarray],
        sync: Callable[[bool], None],
    ) -> None:
        self.blocks = machine.blocks
        self.profile = profile
        self.received = received  # pages written by this migration (fresh RAM only)
        self.sync = sync
        self.normal = 0  # pages received on the main stream
        self.zero = 0

    def load_state(self, kind: SectionType, version_id: int, data: Any) -> None:
        rec = data
        pages = apply_page_record(self.blocks, self.received, rec)
        if pages is not None:
            self.normal += pages[0]
            self.zero += pages[1]
        elif isinstance(rec, RamEos):
            if self.profile.sync_per_section:
                self.sync(False)
        elif isinstance(rec, RamMultifdFlush):
            self.sync(True)
        elif isinstance(rec, RamMemSize):
            self._check_blocks(rec)
        else:  # XBZRLE, compressed pages: capabilities we never negotiate
            raise BadRecordType(f"unsupported RAM record {type(rec).__name__}")

    def _check_blocks(self, rec: RamMemSize) -> None:
        for info in rec.blocks:
            blk = lookup(self.blocks, info.name, kind="RAM block", record="MEM_SIZE",
                         field="block")
            if blk.used_length != info.used_length:
                raise Mismatch(
                    f"RAM block {info.name!r} is {info.used_length} bytes on the source and "
                    f"{blk.used_length} here"
                )
