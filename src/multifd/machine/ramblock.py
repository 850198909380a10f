"""A named, page-aligned RAM block with a numpy dirty bitmap (QEMU's RAMBlock).

The block is an anonymous ``mmap`` exposed as a memoryview and as numpy views (bytes, pages,
64-bit words). Owners mark what they write, and/or the kernel tracks the writes
(``tracking=``, machine/tracking.py); the migration thread takes snapshots with
:meth:`RamBlock.sync_dirty_bitmap` (QEMU's ``migration_bitmap_sync``), which merges both.

The rule that makes the bitmap lossless: writers mark AFTER writing the data, and marking and
syncing take the same lock. A write racing a sync therefore lands either in this snapshot
(its data is already in memory when the snapshot is taken, so the sender reads it after the
sync) or in the next one; it is never lost. Kernel tracking keeps the same rule for the
writes nobody marks (tracking.py states how).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import threading
from collections.abc import Callable, Mapping

import numpy as np

from multifd.machine import memfd
from multifd.wire.ram_batch import is_run

from .tracking import Tracker, make_tracker, resolve_mode

__all__ = ["RamBlock"]

# Pages scanned per numpy call in zero_pages(): bounds the temporary to 8 MiB of 4 KiB pages.
_ZERO_SCAN_CHUNK = 2048
# Bytes hashed per update() call in checksum(): hashlib drops the GIL for large buffers.
_HASH_CHUNK = 64 << 20
# Blocks at least this big ask for transparent huge pages.
_THP_MIN = 4 << 20


class RamBlock:
    """Named guest-RAM-like buffer; ``used_length`` is ``size`` rounded up to ``page_size``.

    ``tracking``: ``"manual"`` (only marks), ``"uffd-wp"``, ``"soft-dirty"`` or ``"auto"``
    (the first kernel mode that works here, else manual); an explicit kernel mode the
    kernel lacks raises OSError saying why.
    """

    def __init__(self, name: str, size: int, *, page_size: int = 4096,
                 backing: str = "anon", tracking: str = "manual") -> None:
        encoded = name.encode("utf-8") if isinstance(name, str) else b""
        if not encoded or len(encoded) > 255:
            raise ValueError(f"RAM block name must be 1..255 UTF-8 bytes, got {name!r}")
        if page_size < 8 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 8, got {page_size}")
        if size <= 0:
            raise ValueError(f"RAM block size must be positive, got {size}")
        self.name = name
        self.page_size = page_size
        self.num_pages = -(-size // page_size)
        self.used_length = self.num_pages * page_size
        # backing "memfd": pages another process can map (cpr-transfer, machine/memfd.py)
        self._mm: mmap.mmap | None
        self._tracking = resolve_mode(tracking, page_size)
        self._mm, self._fd = memfd.allocate(name, self.used_length, backing)
        # fewer page faults on first touch (big win for GiB blocks); but soft-dirty marks a
        # huge page dirty as a whole, so its blocks keep 4 KiB pages (even with THP=always)
        advice = (getattr(mmap, "MADV_NOHUGEPAGE", None) if self._tracking == "soft-dirty"
                  else getattr(mmap, "MADV_HUGEPAGE", None))
        if self.used_length >= _THP_MIN and advice is not None:
            try:
                self._mm.madvise(advice)
            except OSError:
                pass
        self._view: memoryview = memoryview(self._mm)
        self._array: np.ndarray = np.frombuffer(self._mm, dtype=np.uint8)
        self._pages = self._array.reshape(self.num_pages, page_size)
        self._words = self._array.view(np.uint64).reshape(self.num_pages, page_size // 8)
        self._lock = threading.Lock()
        self._bitmap = np.zeros(self.num_pages, dtype=bool)
        self._logging = True
        self._closed = False
        self._quiesce: Callable[[], contextlib.AbstractContextManager[object]] | None = None
        # registered on first use (start_dirty_log or a sync), so memory filled before
        # that still gets huge pages: a VMA armed for uffd-wp faults in 4 KiB pages
        self._tracker: Tracker | None = None

    # -- views ---------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise ValueError(f"RAM block {self.name!r} is closed")

    @property
    def view(self) -> memoryview:
        """Writable memoryview of the whole block (zero-copy)."""
        self._check()
        return self._view

    @property
    def array(self) -> np.ndarray:
        """1-D ``uint8`` numpy view of the block."""
        self._check()
        return self._array

    @property
    def pages(self) -> np.ndarray:
        """``uint8`` view shaped ``(num_pages, page_size)``."""
        self._check()
        return self._pages

    @property
    def words(self) -> np.ndarray:
        """``uint64`` view shaped ``(num_pages, page_size // 8)``, for fast zero scans."""
        self._check()
        return self._words

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def tracking(self) -> str:
        """The write tracking in force: "uffd-wp", "soft-dirty" or "manual"."""
        return self._tracking

    def _kernel_armed(self) -> bool:
        """Register and arm kernel tracking if the mode has it and it is not yet; True if
        it was armed just now (the writes before are unknown: every page counts dirty)."""
        if self._tracking == "manual" or self._tracker is not None:
            return False
        with self._lock:  # once per block: marks wait for the registration
            if self._tracker is not None:
                return False
            tracker = make_tracker(self._tracking, self._array.ctypes.data,
                                   self.used_length, self.page_size, self._quiesced)
            if tracker is None:
                return False
            tracker.arm()
            self._tracker = tracker
            return True

    def remapped(self) -> None:
        """The block's address range was mapped anew (memfd.adopt / detach): kernel
        tracking registered the old mapping, so it starts over on the new one (at the next
        sync, which then reports every page)."""
        self._check()
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None

    def set_throttled(self, on: bool) -> None:
        """The writers' throttle changed (`on`: they are throttled now): kernel tracking
        counts exactly from the next sync on while they are (see machine/tracking.py)."""
        if self._tracker is not None:
            self._tracker.set_throttled(on)

    def set_quiesce(
        self, quiesce: Callable[[], contextlib.AbstractContextManager[object]] | None
    ) -> None:
        """How to hold the block's writers at a safe point (soft-dirty syncs need it);
        `Machine.add_block` sets `Machine.quiesced`."""
        self._quiesce = quiesce

    def _quiesced(self) -> contextlib.AbstractContextManager[object]:
        return self._quiesce() if self._quiesce is not None else contextlib.nullcontext()

    @property
    def backing(self) -> str:
        """"memfd" while the pages are a memfd this block can hand over, else "anon"."""
        return "anon" if self._fd is None else "memfd"

    # -- writes and dirty tracking ---------------------------------------------------------

    def _page_range(self, start: int, length: int) -> tuple[int, int]:
        if start < 0 or length < 0 or start + length > self.used_length:
            raise ValueError(
                f"range {start}+{length} outside RAM block {self.name!r} "
                f"(used_length={self.used_length})"
            )
        first = start // self.page_size
        end = -(-(start + length) // self.page_size)
        return first, end

    def write(self, offset: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Copy ``data`` to ``offset`` and mark the touched pages dirty (data first)."""
        self._check()
        src = memoryview(data).cast("B")
        first, end = self._page_range(offset, src.nbytes)
        self._view[offset : offset + src.nbytes] = src
        if self._logging and end > first:
            with self._lock:
                self._bitmap[first:end] = True

    def mark_dirty(self, start: int, length: int) -> None:
        """Mark the pages overlapping ``[start, start + length)`` dirty."""
        self._check()
        first, end = self._page_range(start, length)
        if self._logging and end > first:
            with self._lock:
                self._bitmap[first:end] = True

    def mark_dirty_pages(self, idx: np.ndarray) -> None:
        """Bulk path: mark the page indices in ``idx`` dirty (one numpy call)."""
        self._check()
        if not self._logging:
            return
        idx = np.asarray(idx)
        if idx.size == 0:
            return
        if idx.dtype == bool:
            if idx.shape != (self.num_pages,):
                raise ValueError("boolean page mask must have one entry per page")
            with self._lock:
                self._bitmap |= idx
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.num_pages:
            raise ValueError(
                f"page index out of range for RAM block {self.name!r}: "
                f"min={lo} max={hi} num_pages={self.num_pages}"
            )
        with self._lock:
            self._bitmap[idx] = True

    def mark_all_dirty(self) -> None:
        """Every page dirty (first pass of a migration sends the whole block)."""
        self._check()
        with self._lock:
            self._bitmap[:] = True

    def sync_dirty_bitmap(self, *, final: bool = False) -> np.ndarray:
        """Return the dirty bitmap snapshot (bool per page) and start a clean one.

        The swap happens under the writers' lock, so the snapshot holds every write whose
        mark came before it; the rest will be in the next snapshot. The caller owns the
        returned array. ``final``: the writers are stopped and tracking ends after this
        sync (a migration's switchover), so kernel tracking only reports.
        """
        self._check()
        fresh = np.zeros(self.num_pages, dtype=bool)
        with self._lock:
            snapshot, self._bitmap = self._bitmap, fresh
            logging = self._logging
        if logging and self._tracking != "manual":
            if self._kernel_armed():
                snapshot[:] = True  # the kernel could not see the writes before it
            else:
                assert self._tracker is not None
                self._tracker.collect(snapshot, final=final)  # re-armed at once
        return snapshot

    def dirty_count(self) -> int:
        """Pages dirty and not yet taken by a sync: the marks, plus the kernel tracker's
        estimate (uffd-wp: what the last sync found, as scanning costs a sync)."""
        self._check()
        with self._lock:
            marked = int(np.count_nonzero(self._bitmap))
            logging = self._logging
        if logging and self._tracking != "manual":
            if self._tracker is None:
                return self.num_pages  # not armed yet: nothing is known clean
            marked = min(self.num_pages, marked + self._tracker.count())
        return marked

    def start_dirty_log(self, *, all_dirty: bool = True) -> None:
        """Enable marking and kernel tracking; by default mark every page dirty (QEMU's
        ram_init_bitmaps)."""
        self._check()
        if not self._kernel_armed() and self._tracker is not None:
            self._tracker.arm()  # before the marks: a write after it is tracked
        with self._lock:
            self._logging = True
            if all_dirty:
                self._bitmap[:] = True

    def stop_dirty_log(self) -> None:
        """Disable marking and kernel tracking (writes no longer cost a fault) and clear
        the bitmap."""
        self._check()
        with self._lock:
            self._logging = False
            self._bitmap[:] = False
        if self._tracker is not None:
            self._tracker.disarm()

    @property
    def dirty_logging(self) -> bool:
        return self._logging

    # -- scans ---------------------------------------------------------------------------

    def zero_pages(self, idx: np.ndarray) -> np.ndarray:
        """For each page index in ``idx``, True if the page is all zero.

        Like QEMU's buffer_is_zero it decides most pages early: one word per page first (a
        data page almost always ends there, one cache line read), then a full scan of the
        pages whose first word is zero, in chunks so a whole-block scan never allocates a
        block-sized temporary (runs of consecutive pages are scanned through a view).
        """
        self._check()
        idx = np.asarray(idx, dtype=np.int64)
        words = self._words
        zero = words[idx, 0] == 0
        cand = np.flatnonzero(zero)
        for pos in range(0, cand.shape[0], _ZERO_SCAN_CHUNK):
            part = cand[pos : pos + _ZERO_SCAN_CHUNK]
            pages = idx[part]
            if is_run(pages, 1):
                rows = words[int(pages[0]) : int(pages[-1]) + 1]
                if not rows.max():  # the usual case: all zero, one pass (~2x count_nonzero)
                    continue
            else:
                rows = words[pages]
            zero[part] = rows.max(axis=1) == 0  # max: ~1.5x faster than any() here
        return zero

    def zero_pages_range(self, start: int, count: int) -> np.ndarray:
        """`zero_pages` of the consecutive pages start..start+count-1 (a packet's run):
        the first words are read through a strided view, no index arrays."""
        self._check()
        rows = self._words[start : start + count]
        zero = rows[:, 0] == 0
        if zero.any():
            cand = np.flatnonzero(zero)
            zero[cand] = rows[cand].max(axis=1) == 0
        return zero

    def zero_out_range(self, start: int, count: int,
                       received: np.ndarray | None = None) -> int:
        """`zero_out` of the consecutive pages start..start+count-1 (a packet's zero run):
        with `received`, a run never written (the usual case) costs one slice test."""
        if received is not None:
            hit = received[start : start + count]
            if not hit.any():
                return 0
            dirty = np.flatnonzero(hit) + start
        else:
            dirty = np.flatnonzero(~self.zero_pages_range(start, count)) + start
        if dirty.size:
            self.pages[dirty] = 0
        return int(dirty.size)

    def zero_out(self, idx: np.ndarray, received: np.ndarray | None = None) -> int:
        """Make the pages `idx` zero, writing only those that may not be zero: an untouched
        page reads as zero without being allocated, and writing it would fault it in (a
        fresh destination receives most zero pages for memory it never touched).

        `received` (bool per page, fresh RAM only): the pages written since the block was
        zero; the others are skipped without a look (QEMU's receivedmap). Without it, each
        page is scanned. Returns how many pages were written."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return 0
        if received is not None:
            # Zero pages usually come as a run, maybe shuffled (QEMU 10 swaps them to the
            # end of a packet): a short span never written needs one slice test, no gather.
            lo, hi = int(idx.min()), int(idx.max())
            if hi - lo < 2 * idx.size and not received[lo : hi + 1].any():
                return 0
            dirty = idx[received[idx]]
        else:
            dirty = idx[~self.zero_pages(idx)]
        if dirty.size:
            self.pages[dirty] = 0
        return int(dirty.size)

    def checksum(self) -> str:
        """SHA-256 hex digest of the block contents (hashed in place, no full copy)."""
        self._check()
        h = hashlib.sha256()
        view = self._view
        for pos in range(0, self.used_length, _HASH_CHUNK):
            h.update(view[pos : pos + _HASH_CHUNK])
        return h.hexdigest()

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap the block; later use raises ValueError. Idempotent.

        If someone still holds a numpy view, the mapping is released when that view dies.
        """
        if self._closed:
            return
        self._closed = True
        if self._tracker is not None:
            self._tracker.close()  # while the range is still mapped
            self._tracker = None
        mm = self._mm
        self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._view.release()
        del self._pages, self._words, self._array
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # an outside view still exports the buffer; freed with it

    def __enter__(self) -> RamBlock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.used_length} bytes"
        return (f"RamBlock({self.name!r}, {state}, page_size={self.page_size}, "
                f"tracking={self._tracking!r})")


def received_maps(blocks: Mapping[str, RamBlock]) -> dict[str, np.ndarray]:
    """An all-False "received" map (bool per page) per block of fresh, all-zero RAM, for
    the loaders that fill it: see `RamBlock.zero_out`."""
    return {name: np.zeros(b.num_pages, dtype=bool) for name, b in blocks.items()}
