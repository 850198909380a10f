"""Kernel write tracking for RAM blocks: which pages were written, without the writers' help.

A `RamBlock` normally learns of writes from its owner (``mark_dirty``); one forgotten call
is silent corruption. The kernel can tell us instead:

* ``uffd-wp`` (Linux >= 6.7): the block is registered with a userfaultfd in write-protect
  mode with ``UFFD_FEATURE_WP_ASYNC``: the kernel resolves a write to a protected page by
  itself (no fault-handling thread) and the page's PTE loses its uffd-wp bit. One
  ``PAGEMAP_SCAN`` ioctl per sync (``PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC``,
  category ``PAGE_IS_WRITTEN``) reports the written pages and write-protects them again.
* ``soft-dirty`` (kernels with ``CONFIG_MEM_SOFT_DIRTY``, e.g. Debian's): bit 55 of each
  ``/proc/self/pagemap`` entry, cleared (for the WHOLE process) by writing 4 to
  ``/proc/self/clear_refs``.
* ``manual``: no kernel help; only ``mark_dirty`` marks (always merged with the above).

``auto`` takes the first of uffd-wp, soft-dirty that the running kernel offers (checked
once, at run time: `UFFDIO_API` features and a real scan; a soft-dirty bit seen on a page
written after a clear), else manual. Layouts of the ioctl structs: Linux
``include/uapi/linux/userfaultfd.h`` and ``include/uapi/linux/fs.h`` (`pm_scan_arg`,
`page_region`), all fields u64 in native byte order.

THE RULE (a sync never loses a write that raced it):

* uffd-wp: the scan reports a page and write-protects it again under the page-table lock,
  one PTE at a time, then flushes the TLB before returning. A write that reached the PTE
  before the scan looked at it is reported now, and its data is in memory when the ioctl
  returns (the sender reads the page after the sync); a later write faults on the fresh
  protection and is reported by the next scan. A page never protected (not yet faulted in
  at arm time) carries no uffd-wp bit once written, so the scan reports it; a range we
  unprotect on purpose (hot ranges below) is reported whole at every sync without a scan:
  unprotecting can only add pages, never lose one.
* soft-dirty: reading the bits and clearing them are two system calls, and a write between
  them would be cleared unseen. So the read and the clear happen while every owning
  machine's workload threads are held at a safe point (`Machine.quiesced`), and, since a
  clear is process-wide, the bits of every other armed soft-dirty block are collected
  into its pending set before each clear. Writers that never reach a safe point (threads
  outside the machine's workload) are not stopped: for them use uffd-wp or mark by hand.

Huge pages: blocks of >= 4 MiB ask for THP. uffd-wp keeps 4 KiB granularity with them: the
first write to a write-protected huge PMD in async mode splits the PMD into 4 KiB PTEs
(the other 511 stay protected), and khugepaged does not collapse PTEs carrying uffd-wp
bits. A range registered with userfaultfd gets no new huge pages (the kernel keeps
per-page faults there: seen on 6.18), so a block registers on first use (its
start_dirty_log or first sync), and memory filled before that keeps its huge pages.
soft-dirty marks a huge PMD dirty as a whole (2 MiB granularity), so soft-dirty blocks
ask for no THP (MADV_NOHUGEPAGE).

Hot ranges (uffd-wp): a write to a freshly protected page costs a kernel fault (~1.5 us).
A workload rewriting the same memory between every sync would pay one per page per sync,
so a 2 MiB range found busy (more than `HOT_FRACTION` written) at `HOT_STREAK` syncs in a
row is left unprotected (reported written whole by every sync, per the rule above: the
price is sending its unwritten pages too). After `HOT_PROBE` syncs it is probed: one
`HOT_SAMPLE`-page slice of it (a different one each time) is protected again, so the next
sync measures it at an eighth of the faults. Busy, the range stays open and waits twice as
long for its next probe (up to `HOT_PROBE_MAX` syncs); cool, it is protected whole again.
A throttled machine (auto-converge) gets exact counts, which is what converges: a change
of the throttle calls `set_throttled`, the next sync protects every open range again, and
none opens while the throttle is on (the faults cost a throttled workload little).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator

import numpy as np

__all__ = [
    "MODES",
    "SoftDirtyTracker",
    "Tracker",
    "UffdWpTracker",
    "available_modes",
    "make_tracker",
    "resolve_mode",
]

MODES = ("auto", "uffd-wp", "soft-dirty", "manual")

# -- userfaultfd (include/uapi/linux/userfaultfd.h) ---------------------------------------
_UFFD_API = 0xAA
_UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api {api, features, ioctls})
_UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, {start, len, mode, ioctls})
_UFFDIO_UNREGISTER = 0x8010AA01  # _IOR(0xAA, 0x01, struct uffdio_range {start, len})
_UFFDIO_WRITEPROTECT = 0xC018AA06  # _IOWR(0xAA, 0x06, {start, len, mode})
_USERFAULTFD_IOC_NEW = 0xAA00  # _IO(0xAA, 0x00) on /dev/userfaultfd
_UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFDIO_REGISTER_MODE_WP = 1 << 1
_UFFDIO_WRITEPROTECT_MODE_WP = 1
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "ppc64le": 364, "s390x": 355}

# -- PAGEMAP_SCAN (include/uapi/linux/fs.h) ------------------------------------------------
_PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg), 12 x u64 = 96 bytes
_PM_SCAN_WP_MATCHING = 1 << 0
_PM_SCAN_CHECK_WPASYNC = 1 << 1
_PAGE_IS_WRITTEN = 1 << 1
_SCAN_VEC = 1 << 14  # page_region {start, end, categories} entries per ioctl

# -- soft-dirty (Documentation/admin-guide/mm/pagemap.rst) --------------------------------
_SOFT_DIRTY_BIT = np.uint64(55)
_PAGEMAP_CHUNK = 1 << 16  # pagemap entries read per pread (512 KiB)

# Hot ranges (uffd-wp): granule of HOT_GRANULE pages; hot when more than HOT_FRACTION of
# it was written at HOT_STREAK syncs in a row (the over-report is at most 2x; a range
# written while protected runs slower, so a higher fraction kept a writer rewriting its
# 256 MiB flat out from ever getting there: 66 % slower). Probed by a sample of
# HOT_SAMPLE pages after HOT_PROBE syncs, then after twice as many each time it is still
# hot, up to HOT_PROBE_MAX: probing whole ranges every 4 syncs cost a writer rewriting
# 256 MiB flat out a quarter of its speed (every 4th interval all faults). No range opens
# while the machine is throttled (`set_throttled`): a throttled workload at 99 % still
# wrote half of its 16 MiB per 1 s pass, was reported whole at every sync, and the long
# passes kept it writing half: auto-converge never converged.
HOT_GRANULE = 512
HOT_FRACTION = 1 / 2
HOT_STREAK = 2
HOT_PROBE = 4
HOT_PROBE_MAX = 64
HOT_SAMPLE = 64

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


def _ioctl(fd: int, request: int, arg: ctypes.Array[ctypes.c_uint64] | int) -> int:
    """ioctl through libc (ctypes drops the GIL, so writers run during a long scan)."""
    ret = _libc.ioctl(fd, request, arg if isinstance(arg, int) else ctypes.addressof(arg))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _u64s(*values: int) -> ctypes.Array[ctypes.c_uint64]:
    return (ctypes.c_uint64 * len(values))(*values)


def _mark_regions(out: np.ndarray, first: np.ndarray, last: np.ndarray) -> None:
    """``out[f:l] = True`` for each half-open page range, in time proportional to the pages
    marked: long ranges as slices, short ones through one index array."""
    lens = last - first
    big = lens >= 256
    for s, e in zip(first[big].tolist(), last[big].tolist(), strict=True):
        out[s:e] = True
    f, n = first[~big], lens[~big]
    if f.size:  # page p of the concatenated ranges is page p + (start - ranges before)
        out[np.arange(int(n.sum())) + np.repeat(f - (np.cumsum(n) - n), n)] = True


class Tracker:
    """Kernel tracking of one page-aligned range: ``collect`` ORs the pages written since
    the previous collect (or arm) into a bool-per-page array and re-arms."""

    mode = "manual"

    def arm(self) -> None:
        """Start tracking from now: earlier writes are forgotten."""

    def collect(self, out: np.ndarray, final: bool = False) -> None:
        """OR the pages written since the last collect/arm into ``out`` and re-arm;
        ``final``: the last collect of a migration, with the writers stopped (no need to
        learn how they write)."""

    def count(self) -> int:
        """An estimate of the pages the next collect will report (cheap: no scan)."""
        return 0

    def set_throttled(self, on: bool) -> None:
        """The writers' throttle changed (`on`: they are throttled now): forget what was
        learnt about their pace, and count exactly while they are throttled."""

    def disarm(self) -> None:
        """Stop tracking (writes no longer cost a fault)."""

    def close(self) -> None:
        """Release kernel resources; the range must still be mapped."""


# -- uffd-wp ------------------------------------------------------------------------------


def _open_pagemap() -> int:
    """This process's /proc/self/pagemap, one fd per tracker, closed with it (scans and reads
    use positioned calls; a process-wide cached fd would outlive every migration)."""
    return os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)


def _open_uffd() -> int:
    """A userfaultfd: the syscall, else /dev/userfaultfd (the way in without privilege)."""
    nr = _SYS_USERFAULTFD.get(os.uname().machine)
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    err = errno.ENOSYS
    if nr is not None:
        fd = _libc.syscall(nr, flags)
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        raise OSError(err, f"userfaultfd: {os.strerror(err)}") from None
    try:
        return _ioctl(dev, _USERFAULTFD_IOC_NEW, flags)
    finally:
        os.close(dev)


class UffdWpTracker(Tracker):
    """userfaultfd write-protect in async mode + PAGEMAP_SCAN (see the module docstring)."""

    mode = "uffd-wp"

    def __init__(self, addr: int, length: int, page_size: int) -> None:
        if addr % mmap.PAGESIZE or length % mmap.PAGESIZE:
            raise ValueError("uffd-wp tracking needs a page-aligned range")
        if page_size % mmap.PAGESIZE:
            raise ValueError(f"uffd-wp tracks {mmap.PAGESIZE}-byte pages, block pages "
                             f"are {page_size}")
        self.addr, self.length, self.page_size = addr, length, page_size
        self.num_pages = length // page_size
        self._fd = _open_uffd()
        try:
            api = _u64s(_UFFD_API, _UFFD_FEATURE_WP_ASYNC, 0)
            _ioctl(self._fd, _UFFDIO_API, api)
            if not api[1] & _UFFD_FEATURE_WP_ASYNC:
                raise OSError(errno.EOPNOTSUPP, "the kernel lacks UFFD_FEATURE_WP_ASYNC")
            _ioctl(self._fd, _UFFDIO_REGISTER, _u64s(addr, length, _UFFDIO_REGISTER_MODE_WP, 0))
        except BaseException:
            os.close(self._fd)
            raise
        self._pagemap = _open_pagemap()
        self._vec = np.zeros((_SCAN_VEC, 3), dtype=np.uint64)
        self._lock = threading.Lock()  # one scan at a time (the hot-range state)
        granules = -(-self.num_pages // HOT_GRANULE)
        self._streak = np.zeros(granules, dtype=np.int8)
        self._open = np.zeros(granules, dtype=bool)  # hot: left unprotected
        self._wait = np.zeros(granules, dtype=np.int16)  # open: syncs left until its probe
        self._period = np.full(granules, HOT_PROBE, dtype=np.int16)  # its next wait
        self._sampled = np.zeros(granules, dtype=bool)  # open, its sample protected
        self._probes = np.zeros(granules, dtype=np.int64)  # which sample is next
        self._cool_all = False  # protect every open range at the next sync
        self._throttled = False  # open no range (set_throttled)
        self._last = 0  # pages the last collect reported
        self.armed = False

    def _protect(self, start: int, length: int, on: bool) -> None:
        mode = _UFFDIO_WRITEPROTECT_MODE_WP if on else 0
        _ioctl(self._fd, _UFFDIO_WRITEPROTECT, _u64s(start, length, mode))

    def _scan(self, first: int, end: int, rearm: bool, out: np.ndarray | None) -> int:
        """PAGEMAP_SCAN over pages [first, end) (continuing while the vector fills):
        written pages into ``out`` (indexed by page of the block); returns how many."""
        flags = _PM_SCAN_CHECK_WPASYNC | (_PM_SCAN_WP_MATCHING if rearm else 0)
        start = self.addr + first * self.page_size
        stop = min(self.addr + end * self.page_size, self.addr + self.length)
        vec = self._vec
        total = 0
        while start < stop:
            arg = _u64s(96, flags, start, stop, 0, vec.ctypes.data, _SCAN_VEC, 0, 0,
                        _PAGE_IS_WRITTEN, 0, _PAGE_IS_WRITTEN)
            n = _ioctl(self._pagemap, _PAGEMAP_SCAN, arg)
            if n:
                rel = vec[:n, :2].astype(np.int64) - self.addr
                lo, hi = rel[:, 0] // self.page_size, -(-rel[:, 1] // self.page_size)
                total += int((hi - lo).sum())
                if out is not None:
                    _mark_regions(out, lo, hi)
            if n < _SCAN_VEC or arg[4] >= stop:  # arg[4]: walk_end
                break
            start = arg[4]
        return total

    def _granule_runs(self, mask: np.ndarray) -> list[tuple[int, int]]:
        """Runs of consecutive True granules as (first page, end page)."""
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return []
        breaks = np.flatnonzero(np.diff(idx) != 1)
        starts = np.concatenate(([idx[0]], idx[breaks + 1])) * HOT_GRANULE
        ends = (np.concatenate((idx[breaks], [idx[-1]])) + 1) * HOT_GRANULE
        return list(zip(starts.tolist(), np.minimum(ends, self.num_pages).tolist(),
                        strict=True))

    def _protect_pages(self, first: int, end: int, on: bool) -> None:
        self._protect(self.addr + first * self.page_size, (end - first) * self.page_size, on)

    def _protect_granules(self, mask: np.ndarray, on: bool) -> None:
        for first, end in self._granule_runs(mask):
            self._protect_pages(first, end, on)

    def _samples(self, mask: np.ndarray) -> list[tuple[int, int]]:
        """The probe sample (first page, end page) of each granule in ``mask``: one
        HOT_SAMPLE-page slice, a different one at each probe of the granule."""
        g = np.flatnonzero(mask)
        first = g * HOT_GRANULE + (self._probes[g] % (HOT_GRANULE // HOT_SAMPLE)) * HOT_SAMPLE
        end = np.minimum(first + HOT_SAMPLE, self.num_pages)
        return [(f, e) for f, e in zip(first.tolist(), end.tolist(), strict=True) if f < e]

    def arm(self) -> None:
        with self._lock:
            self._protect(self.addr, self.length, True)
            self._streak[:] = 0
            self._open[:] = False
            self._sampled[:] = False
            self._period[:] = HOT_PROBE
            self._cool_all = False
            self.armed = True

    def collect(self, out: np.ndarray, final: bool = False) -> None:
        with self._lock:
            if not self.armed:
                return
            was_open, sampled = self._open, self._sampled
            # padded to whole granules, for the per-granule counts
            written = np.zeros(self._streak.size * HOT_GRANULE, dtype=bool)
            if not was_open.any():
                self._scan(0, self.num_pages, True, written)  # the one call: report, re-arm
            else:
                for first, end in self._granule_runs(~was_open):
                    self._scan(first, end, True, written)
                for first, end in self._samples(sampled):  # exact inside the sample
                    self._scan(first, end, True, written)
                for first, end in self._granule_runs(was_open):  # unprotected: whole
                    out[first:end] = True
            out |= written[: self.num_pages]
            # pages written per granule: add its bools 8 at a time (one u64 = 8 byte
            # lanes, each lane <= HOT_GRANULE / 8 so none overflows), then add the 8 lanes
            lanes = written.view(np.uint64).reshape(-1, HOT_GRANULE // 8).sum(axis=1)
            per = lanes.view(np.uint8).reshape(-1, 8).sum(axis=1, dtype=np.int64)
            self._last = int(per[~was_open].sum()) + int(np.count_nonzero(was_open)) * HOT_GRANULE
            if not final:  # the hot-range ioctls would only lengthen a switchover
                self._update_hot(per, was_open, sampled)

    def _update_hot(self, per: np.ndarray, was_open: np.ndarray, sampled: np.ndarray) -> None:
        """Open busy 2 MiB ranges, probe open ones, close cooled ones (see the module
        docstring). ``per``: pages written per granule; exact for the granules protected
        since the last sync, and inside the sample of the sampled ones."""
        seen = ~was_open
        busy = per > HOT_GRANULE * HOT_FRACTION
        self._streak[seen] = np.where(busy[seen],
                                      np.minimum(self._streak[seen] + 1, HOT_STREAK), 0)
        self._period[seen & ~busy] = HOT_PROBE  # cool: a new streak starts over
        opened = seen & (self._streak >= HOT_STREAK) & (not self._throttled)
        still = sampled & (per > HOT_SAMPLE * HOT_FRACTION)  # the sample says still hot
        cooled = was_open & (self._cool_all | (sampled & ~still))
        self._cool_all = False
        # cooled: protected again whole (reported whole by this sync), measured next sync
        self._protect_granules(cooled, True)
        self._streak[cooled] = 0
        self._period[cooled] = HOT_PROBE
        for first, end in self._samples(still & ~cooled):  # back to fully open
            self._protect_pages(first, end, False)
        self._protect_granules(opened, False)
        waited = opened | (still & ~cooled)  # a new wait, twice the last
        self._wait[waited] = self._period[waited]
        self._period[waited] = np.minimum(self._period[waited] * 2, HOT_PROBE_MAX)
        self._open = (was_open & ~cooled) | opened
        self._wait[self._open & ~waited] -= 1
        # probes: protect a sample now; the next sync measures it
        self._sampled = self._open & ~waited & (self._wait <= 0)
        self._probes[self._sampled] += 1
        for first, end in self._samples(self._sampled):
            self._protect_pages(first, end, True)

    def set_throttled(self, on: bool) -> None:
        with self._lock:  # the next sync protects every open range again: exact after it
            self._cool_all = True
            self._throttled = on

    def count(self) -> int:
        return self._last if self.armed else 0  # a scan would cost as much as a sync

    def disarm(self) -> None:
        with self._lock:
            if self.armed:
                self.armed = False
                try:
                    self._protect(self.addr, self.length, False)
                except OSError:
                    pass  # the range was remapped (a handover): nothing protected is left

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            try:
                _ioctl(self._fd, _UFFDIO_UNREGISTER, _u64s(self.addr, self.length))
            except OSError:
                pass  # closing the fd unregisters too
            os.close(self._fd)
            os.close(self._pagemap)
            self._fd = -1
            self.armed = False


# -- soft-dirty ---------------------------------------------------------------------------

Quiesce = Callable[[], contextlib.AbstractContextManager[object]]


def clear_refs() -> None:
    """Clear the soft-dirty bit of every page of this process (and write-protect them)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("4")


class _SoftDirtyRegistry:
    """The process-wide side of soft-dirty: the armed trackers, and one clear for all."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.armed: list[SoftDirtyTracker] = []

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Hold the workload of every machine owning an armed block at a safe point."""
        with contextlib.ExitStack() as stack:
            for quiesce in {t.quiesce for t in self.armed if t.quiesce is not None}:
                stack.enter_context(quiesce())
            yield

    def clear(self, *, keep: SoftDirtyTracker | None = None) -> None:
        """Clear every soft-dirty bit of the process, first saving each armed tracker's
        bits (except ``keep``'s, which the caller has just read) into its pending set."""
        for t in self.armed:
            if t is not keep:
                t.pending |= t.read_bits()
        clear_refs()


_soft = _SoftDirtyRegistry()


class SoftDirtyTracker(Tracker):
    """Soft-dirty bits from /proc/self/pagemap (see the module docstring)."""

    mode = "soft-dirty"

    def __init__(self, addr: int, length: int, page_size: int,
                 quiesce: Quiesce | None = None) -> None:
        if page_size % mmap.PAGESIZE:
            raise ValueError(f"soft-dirty tracks {mmap.PAGESIZE}-byte pages, block pages "
                             f"are {page_size}")
        self.addr, self.length = addr, length
        self.num_pages = length // page_size
        self._ratio = page_size // mmap.PAGESIZE  # kernel pages per block page
        self.quiesce = quiesce  # set by the owning Machine (Machine.quiesced)
        self.pending = np.zeros(self.num_pages, dtype=bool)
        self._words = np.empty(min(length // mmap.PAGESIZE, _PAGEMAP_CHUNK), dtype=np.uint64)
        self._pagemap = _open_pagemap()

    def read_bits(self) -> np.ndarray:
        """Soft-dirty bit per block page, read chunk by chunk (8 bytes of pagemap per
        kernel page)."""
        kpages = self.length // mmap.PAGESIZE
        bits = np.empty(kpages, dtype=bool)
        base = self.addr // mmap.PAGESIZE * 8
        for first in range(0, kpages, _PAGEMAP_CHUNK):
            n = min(_PAGEMAP_CHUNK, kpages - first)
            buf = self._words[:n]
            view = memoryview(buf).cast("B")
            got = 0
            while got < n * 8:
                r = os.preadv(self._pagemap, [view[got:]], base + first * 8 + got)
                if r <= 0:
                    raise OSError(errno.EIO, "short read of /proc/self/pagemap")
                got += r
            np.not_equal((buf >> _SOFT_DIRTY_BIT) & np.uint64(1), 0, out=bits[first:first + n])
        return bits if self._ratio == 1 else bits.reshape(-1, self._ratio).any(axis=1)

    def arm(self) -> None:
        with _soft.lock, _soft.quiet():
            if self not in _soft.armed:
                _soft.armed.append(self)
            _soft.clear(keep=self)
            self.pending[:] = False

    def collect(self, out: np.ndarray, final: bool = False) -> None:
        with _soft.lock:
            if self not in _soft.armed:
                return
            with _soft.quiet():
                self.pending |= self.read_bits()
                _soft.clear(keep=self)
            out |= self.pending
            self.pending[:] = False

    def count(self) -> int:
        with _soft.lock:  # exact, but reads the pagemap: 8 bytes per page
            if self not in _soft.armed:
                return 0
            return int(np.count_nonzero(self.pending | self.read_bits()))

    def disarm(self) -> None:
        with _soft.lock:
            if self in _soft.armed:
                _soft.armed.remove(self)
            self.pending[:] = False

    def close(self) -> None:
        self.disarm()
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1


# -- detection ----------------------------------------------------------------------------

_probe_lock = threading.Lock()
_probed: dict[str, str | None] = {}


def _probe_uffd_wp() -> str | None:
    """None if uffd-wp async + PAGEMAP_SCAN work here, else why not."""
    mm = mmap.mmap(-1, 4 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(mm, dtype=np.uint8)
    try:
        t = UffdWpTracker(arr.ctypes.data, len(mm), mmap.PAGESIZE)
    except OSError as exc:
        del arr
        mm.close()
        return f"userfaultfd write-protect async mode unavailable: {exc.strerror or exc}"
    try:
        arr[:] = 1
        t.arm()
        arr[mmap.PAGESIZE * 2] = 2
        seen = np.zeros(4, dtype=bool)
        t.collect(seen)
        if seen.tolist() != [False, False, True, False]:
            return f"PAGEMAP_SCAN reported {seen.tolist()} after one write to page 2"
        return None
    except OSError as exc:
        return f"PAGEMAP_SCAN unavailable: {exc.strerror or exc}"
    finally:
        t.close()
        del arr
        mm.close()


def _probe_soft_dirty() -> str | None:
    """None if soft-dirty bits show up here. Must run before any soft-dirty tracker is
    armed (it clears the process's bits): `available_modes` runs it once, first."""
    if not os.path.exists("/proc/self/clear_refs"):
        return "/proc/self/clear_refs is missing"
    mm = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(mm, dtype=np.uint8)
    try:
        t = SoftDirtyTracker(arr.ctypes.data, len(mm), mmap.PAGESIZE)
        try:
            arr[0] = 1
            clear_refs()
            if t.read_bits()[0]:
                return "soft-dirty bit still set after clear_refs"
            arr[0] = 2
            if not t.read_bits()[0]:
                return "the kernel sets no soft-dirty bits (CONFIG_MEM_SOFT_DIRTY off)"
            return None
        finally:
            t.close()
    except OSError as exc:
        return f"soft-dirty unavailable: {exc.strerror or exc}"
    finally:
        del arr
        mm.close()


def available_modes() -> dict[str, str | None]:
    """Each kernel mode -> None when it works here, else the reason (probed once)."""
    with _probe_lock:
        if not _probed:
            _probed["uffd-wp"] = _probe_uffd_wp()
            _probed["soft-dirty"] = _probe_soft_dirty()
        return dict(_probed)


def resolve_mode(mode: str, page_size: int = mmap.PAGESIZE) -> str:
    """The mode in force for a requested one: ``auto`` -> the first that works; an
    explicit kernel mode the kernel lacks raises OSError saying why. The kernel tracks its
    own pages: blocks whose pages are not a multiple of them get manual (or ValueError)."""
    if mode not in MODES:
        raise ValueError(f"tracking must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "manual":
        return mode
    if page_size % mmap.PAGESIZE:
        if mode == "auto":
            return "manual"
        raise ValueError(f"tracking={mode!r} needs pages of a multiple of "
                         f"{mmap.PAGESIZE} bytes, got {page_size}")
    modes = available_modes()
    if mode == "auto":
        return next((m for m, why in modes.items() if why is None), "manual")
    why = modes[mode]
    if why is not None:
        raise OSError(errno.EOPNOTSUPP, f"tracking={mode!r} is not available here: {why}")
    return mode


def make_tracker(mode: str, addr: int, length: int, page_size: int,
                 quiesce: Quiesce | None = None) -> Tracker | None:
    """A tracker for a resolved mode (None for manual)."""
    if mode == "uffd-wp":
        return UffdWpTracker(addr, length, page_size)
    if mode == "soft-dirty":
        return SoftDirtyTracker(addr, length, page_size, quiesce)
    return None
