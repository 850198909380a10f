"""Kernel write tracking (machine/tracking.py): unmarked numpy writes are found, merged with
manual marks, at 4 KiB granularity even on huge pages, and never lost when they race a sync.

Each test of a kernel mode runs once per mode the running kernel offers; the others are
skipped with the reason (conftest.py prints which modes ran).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from multifd.machine import tracking
from multifd.machine.machine import Machine, RunState
from multifd.machine.ramblock import _THP_MIN, RamBlock
from multifd.machine.tracking import HOT_GRANULE, HOT_PROBE, HOT_STREAK, available_modes

PS = 4096


def _dirty(block: RamBlock) -> list[int]:
    return np.flatnonzero(block.sync_dirty_bitmap()).tolist()


def _thp_kib(addr: int) -> int:
    """AnonHugePages of the mapping that holds ``addr`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def test_auto_takes_the_first_mode_the_kernel_offers() -> None:
    modes = available_modes()
    want = next((m for m in ("uffd-wp", "soft-dirty") if modes[m] is None), "manual")
    with RamBlock("a", 16 * PS, tracking="auto") as block:
        assert block.tracking == want
    with RamBlock("m", 16 * PS) as block:
        assert block.tracking == "manual"  # the default: nothing changes for old callers


def test_unavailable_or_unknown_mode_is_refused_with_the_reason() -> None:
    for mode, why in available_modes().items():
        if why is not None:
            with pytest.raises(OSError, match="not available here"):
                RamBlock("x", PS, tracking=mode)
        else:
            with RamBlock("x", PS, tracking=mode) as block:
                assert block.tracking == mode
    with pytest.raises(ValueError, match="tracking must be one of"):
        RamBlock("x", PS, tracking="dirty-ring")
    with RamBlock("small", PS, page_size=1024, tracking="auto") as block:
        assert block.tracking == "manual"  # the kernel cannot see below its page size
    with pytest.raises(ValueError, match="needs pages of a multiple"):
        RamBlock("small", PS, page_size=1024, tracking="uffd-wp")
    with pytest.raises(AttributeError):
        RamBlock("x", PS).tracking = "manual"  # type: ignore[misc]


def test_manual_mode_sees_only_marks() -> None:
    with RamBlock("m", 16 * PS) as block:
        block.sync_dirty_bitmap()
        block.array[3 * PS] = 1  # unmarked: invisible without kernel tracking
        block.mark_dirty(5 * PS, 1)
        assert _dirty(block) == [5]


def test_kernel_finds_unmarked_writes_merged_with_marks(kernel_mode: str) -> None:
    with RamBlock("k", 64 * PS, tracking=kernel_mode) as block:
        block.start_dirty_log()
        assert block.sync_dirty_bitmap().all()
        words = block.array.view(np.uint64)
        words[3 * PS // 8] = 7
        words[40 * PS // 8 + 5] = 9
        block.mark_dirty(10 * PS, 1)  # a mark with no write: merged all the same
        assert _dirty(block) == [3, 10, 40]
        assert _dirty(block) == []  # re-armed
        block.array[63 * PS + PS - 1] = 1
        assert _dirty(block) == [63]


def test_block_pages_bigger_than_the_kernels(kernel_mode: str) -> None:
    with RamBlock("big", 8 * 4 * PS, page_size=4 * PS, tracking=kernel_mode) as block:
        block.start_dirty_log()
        block.sync_dirty_bitmap()
        block.array[5 * 4 * PS + 3 * PS] = 1  # the last kernel page of block page 5
        assert _dirty(block) == [5]


def test_stop_dirty_log_disarms_and_start_rearms(kernel_mode: str) -> None:
    with RamBlock("k", 32 * PS, tracking=kernel_mode) as block:
        block.start_dirty_log()
        block.sync_dirty_bitmap()
        block.stop_dirty_log()
        block.array[::PS] = 5
        assert _dirty(block) == []
        block.start_dirty_log()
        assert block.sync_dirty_bitmap().all()
        block.array[2 * PS] = 6
        assert _dirty(block) == [2]


def test_huge_pages_tracked_at_4k(kernel_mode: str) -> None:
    """uffd-wp: the first write to a protected huge page splits it (the rest stays
    protected); soft-dirty blocks do not ask for THP. Either way: one page per write."""
    size = 4 * _THP_MIN
    with RamBlock("thp", size, tracking=kernel_mode) as block:
        block.array[:] = 1  # populate (huge pages where THP is on)
        thp = _thp_kib(block.array.ctypes.data)
        if kernel_mode == "soft-dirty":
            assert thp == 0
        block.start_dirty_log()
        block.sync_dirty_bitmap()
        for page in (1000, 1001, 2047, 3000):
            block.array[page * PS + 17] = 2
        assert _dirty(block) == [1000, 1001, 2047, 3000]
        assert _dirty(block) == []
        print(f"{kernel_mode}: {thp} KiB of the block were huge pages before the writes")


def _require_uffd_wp() -> None:
    if (why := available_modes()["uffd-wp"]) is not None:
        pytest.skip(f"environment: this kernel has no uffd-wp tracking ({why})")


def test_hot_range_stays_reported_then_cools_down() -> None:
    """uffd-wp leaves a range rewritten at every sync unprotected: it must then be reported
    at every sync (never lost), and go back to per-page tracking once writes stop."""
    _require_uffd_wp()
    with RamBlock("hot", 4 * HOT_GRANULE * PS, tracking="uffd-wp") as block:
        block.start_dirty_log()
        block.sync_dirty_bitmap()
        hot = slice(HOT_GRANULE * PS, 2 * HOT_GRANULE * PS)
        for i in range(HOT_STREAK + 1):
            block.array[hot] = i + 1
            dirty = block.sync_dirty_bitmap()
            assert dirty[HOT_GRANULE : 2 * HOT_GRANULE].all()
            assert not dirty[: HOT_GRANULE].any() and not dirty[2 * HOT_GRANULE :].any()
        # one write in the (now unprotected) hot range: reported with the whole range
        block.array[HOT_GRANULE * PS + 3 * PS] = 99
        assert block.sync_dirty_bitmap()[HOT_GRANULE + 3]
        for _ in range(HOT_PROBE + 2):  # no more writes: the probe re-protects it
            last = _dirty(block)
        assert last == []
        block.array[HOT_GRANULE * PS + 7 * PS] = 1
        assert _dirty(block) == [HOT_GRANULE + 7]


def test_blocks_are_tracked_independently(kernel_mode: str) -> None:
    """soft-dirty clears are process-wide: a sync of one block must not lose the other's."""
    with RamBlock("a", 16 * PS, tracking=kernel_mode) as a, \
            RamBlock("b", 16 * PS, tracking=kernel_mode) as b:
        a.start_dirty_log()
        b.start_dirty_log()
        a.sync_dirty_bitmap()
        b.sync_dirty_bitmap()
        a.array[2 * PS] = 1
        b.array[9 * PS] = 1
        assert _dirty(a) == [2]
        b.array[11 * PS] = 1
        assert _dirty(a) == []
        assert _dirty(b) == [9, 11]


def _race(block: RamBlock, machine: Machine | None, seconds: float, writers: int,
          span: int = 0, interval: float = 0.002) -> tuple[int, int, int]:
    """Writers store ever-increasing values at random words of the first ``span`` pages
    (0: all; numpy, no marking) while the main thread syncs and copies the reported pages
    into a shadow (what a migration does); after the writers stop, one last sync and copy
    must make the shadow equal the block. Syncs every ``interval``; every 25th follows a
    throttle turned on or off.
    Returns how many syncs raced the writers, and after how many of them uffd-wp had ranges
    left unprotected (hot) and a sample of one protected (a probe)."""
    span = span or block.num_pages
    shadow = np.zeros_like(block.pages)
    stop = threading.Event()
    words = block.words
    counts = [0] * writers
    errors: list[BaseException] = []

    def write(k: int) -> None:
        rng = np.random.default_rng(k)
        value = np.uint64(k << 56)
        ctx = machine.workload() if machine is not None else None
        try:
            if ctx is not None:
                ctx.__enter__()
            while not stop.is_set():
                pages = rng.integers(0, span, 64)
                cols = rng.integers(0, words.shape[1], 64)
                for n in range(0, 64, 8):
                    value += np.uint64(1)
                    words[pages[n : n + 8], cols[n : n + 8]] = value
                    if n == 32:  # a chunk spanning pages, too
                        p = int(pages[n])
                        block.array[p * PS - 100 if p else 0 : p * PS + 100] = n
                counts[k] += 64
                if machine is not None:
                    machine.safe_point(stop)
        except BaseException as exc:  # surface in the main thread
            errors.append(exc)
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)

    block.start_dirty_log()
    threads = [threading.Thread(target=write, args=(k,), daemon=True) for k in range(writers)]
    for t in threads:
        t.start()
    syncs = hot = probed = 0
    tracker = getattr(block, "_tracker", None)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if syncs % 25 == 24:
            block.set_throttled(syncs % 50 == 24)
        idx = np.flatnonzero(block.sync_dirty_bitmap())
        shadow[idx] = block.pages[idx]
        syncs += 1
        hot += bool(getattr(tracker, "_open", np.zeros(1)).any())
        probed += bool(getattr(tracker, "_sampled", np.zeros(1)).any())
        time.sleep(interval)
    stop.set()
    if machine is not None:
        machine.kick()
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert min(counts) > 1000, counts  # the writers really raced the syncs
    idx = np.flatnonzero(block.sync_dirty_bitmap())
    shadow[idx] = block.pages[idx]
    bad = np.flatnonzero((shadow != block.pages).any(axis=1))
    assert bad.size == 0, f"{bad.size} page(s) lost a write, first {bad[:10].tolist()}"
    return syncs, hot, probed


def test_writes_racing_syncs_are_never_lost(kernel_mode: str) -> None:
    """Workload threads (safe points between steps: soft-dirty holds them during a sync)."""
    with Machine() as m:
        block = m.add_block(RamBlock("race", 2 * _THP_MIN, tracking=kernel_mode))
        block.array[:] = 3  # populated, THP where available
        m.start()
        syncs = _race(block, m, 1.5, writers=2)[0]
        assert syncs >= 20
        print(f"{kernel_mode}: {syncs} syncs raced 2 writers, shadow exact")


def test_uffd_wp_needs_no_cooperation_from_writers() -> None:
    """uffd-wp: plain threads that never reach a safe point lose nothing either."""
    _require_uffd_wp()
    with RamBlock("race", 2 * _THP_MIN, tracking="uffd-wp") as block:
        assert _race(block, None, 1.5, writers=2)[0] >= 20


def test_uffd_wp_hot_ranges_lose_no_racing_write() -> None:
    """Writers busy on two 2 MiB ranges: those go unprotected (hot), are re-probed by
    samples and protected whole by throttle changes while the writers race; the shadow
    still ends exact."""
    _require_uffd_wp()
    with RamBlock("race", 2 * _THP_MIN, tracking="uffd-wp") as block:
        # 10 ms between syncs: the writers rewrite the two ranges almost whole (hot)
        syncs, hot, probed = _race(block, None, 1.5, writers=2, span=2 * HOT_GRANULE,
                                   interval=0.01)
        assert syncs >= 2 * HOT_PROBE
        assert 0 < hot < syncs  # hot ranges were used, and closed again
        assert probed > 0


def test_uffd_wp_hot_range_probes_back_off_and_throttle_counts_exactly() -> None:
    """A range rewritten whole before every sync stays open and is reported whole at every
    sync; its probes (a sample protected again) come ever later while it stays busy; a
    final sync only reports; a throttle protects it whole at the next sync, and counts
    exactly while it is on."""
    _require_uffd_wp()
    with Machine() as m:
        block = m.add_block(RamBlock("hot", 2 * HOT_GRANULE * PS, tracking="uffd-wp"))
        block.start_dirty_log()
        block.sync_dirty_bitmap()
        tracker = block._tracker
        probes = []
        for i in range(40):
            block.array[: HOT_GRANULE * PS] = i + 1
            dirty = block.sync_dirty_bitmap()
            assert dirty[:HOT_GRANULE].all() and not dirty[HOT_GRANULE:].any()
            if tracker._sampled[0]:
                probes.append(i)
        assert probes[0] == HOT_STREAK - 1 + HOT_PROBE
        gaps = np.diff(probes).tolist()  # each wait twice the last
        assert len(gaps) == 2 and gaps[1] - 1 == 2 * (gaps[0] - 1), probes
        assert tracker._open[0]
        state = [tracker._open.copy(), tracker._wait.copy(), tracker._sampled.copy()]
        assert block.sync_dirty_bitmap(final=True)[:HOT_GRANULE].all()  # switchover: report
        assert all((a == b).all() for a, b in zip(state, [tracker._open, tracker._wait,
                                                          tracker._sampled], strict=True))
        m.set_throttle(50)
        block.array[3 * PS] = 1
        assert block.sync_dirty_bitmap()[:HOT_GRANULE].all()  # open until now: whole
        assert not tracker._open.any()
        block.array[5 * PS] = 1
        assert _dirty(block) == [5]
        for i in range(HOT_STREAK + 1):  # throttled: rewritten whole, counted exactly
            block.array[: HOT_GRANULE * PS] = i + 1
            assert _dirty(block) == list(range(HOT_GRANULE))
        assert not tracker._open.any()
        m.set_throttle(0)
        for i in range(HOT_STREAK + 1):
            block.array[: HOT_GRANULE * PS] = i + 1
            block.sync_dirty_bitmap()
        assert tracker._open[0]  # unthrottled: hot again


def test_quiesced_holds_workload_without_state_change() -> None:
    with Machine() as m:
        m.start()
        events: list[str] = []
        m.on_state_change.append(lambda ev, _st: events.append(ev))
        inside = threading.Event()
        stop = threading.Event()
        steps = [0]

        def work() -> None:
            with m.workload():
                inside.set()
                while m.safe_point(stop):
                    steps[0] += 1

        t = threading.Thread(target=work, daemon=True)
        t.start()
        inside.wait(5)
        with m.quiesced(timeout=5), m.quiesced():  # reentrant
            before = steps[0]
            time.sleep(0.05)
            assert steps[0] == before  # held at its safe point
            assert m.state is RunState.RUNNING
        deadline = time.monotonic() + 10
        while steps[0] == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert steps[0] > before  # released
        stop.set()
        m.kick()
        t.join(5)
        assert events == []


class _FakeSoftDirty:
    """A stand-in for the kernel's soft-dirty bits (this kernel may have none): one bool per
    page per tracker, set by `write`, all cleared by clear_refs, like the real ones."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bits: dict[int, np.ndarray] = {}
        self.clears = 0
        monkeypatch.setattr(tracking, "clear_refs", self._clear)
        monkeypatch.setattr(tracking.SoftDirtyTracker, "read_bits",
                            lambda t: self.bits.setdefault(id(t), np.zeros(t.num_pages,
                                                                           bool)).copy())

    def _clear(self) -> None:
        self.clears += 1
        for b in self.bits.values():
            b[:] = False

    def write(self, t: tracking.SoftDirtyTracker, page: int) -> None:
        self.bits.setdefault(id(t), np.zeros(t.num_pages, bool))[page] = True


def test_soft_dirty_bookkeeping_with_a_simulated_kernel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs everywhere: a process-wide clear must not lose another block's bits, syncs hold
    the owners' workloads (quiesce), and a disarmed tracker reports nothing."""
    fake = _FakeSoftDirty(monkeypatch)
    held: list[str] = []

    def quiesce(name: str) -> Any:
        @contextlib.contextmanager
        def hold() -> Iterator[None]:
            held.append(name)
            yield

        return hold

    a = tracking.SoftDirtyTracker(0, 16 * PS, PS, quiesce("a"))
    b = tracking.SoftDirtyTracker(1 << 30, 16 * PS, PS, quiesce("b"))
    try:
        a.arm()
        b.arm()
        fake.write(a, 1)
        fake.write(b, 2)
        out_a = np.zeros(16, bool)
        a.collect(out_a)  # clears the whole process: b's bit is saved first
        assert np.flatnonzero(out_a).tolist() == [1]
        assert {"a", "b"} <= set(held[-2:]) and fake.clears >= 3
        assert b.count() == 1
        fake.write(b, 5)
        out_b = np.zeros(16, bool)
        b.collect(out_b)
        assert np.flatnonzero(out_b).tolist() == [2, 5]
        b.collect(out_b := np.zeros(16, bool))
        assert not out_b.any()
        b.disarm()
        fake.write(b, 7)
        b.collect(out_b)
        assert not out_b.any() and b.count() == 0
    finally:
        a.close()
        b.close()


def test_memfd_block_tracked_and_remapped(kernel_mode: str) -> None:
    """A memfd-backed block (cpr-transfer) is tracked too; after its range is mapped anew
    (memfd.adopt) `remapped()` starts tracking over: the next sync reports every page."""
    from multifd.machine import memfd

    with RamBlock("shm", 32 * PS, backing="memfd", tracking=kernel_mode) as block, \
            RamBlock("other", 32 * PS, backing="memfd") as donor:
        block.array[:] = 1
        block.start_dirty_log()
        block.sync_dirty_bitmap()
        block.array[4 * PS] = 2
        assert _dirty(block) == [4]
        donor.array[:] = 7
        fd = os.dup(memfd.fd_of(donor))  # type: ignore[arg-type]
        memfd.adopt(block, fd)
        block.remapped()
        assert block.array[0] == 7
        assert block.sync_dirty_bitmap().all()
        block.array[9 * PS] = 3
        assert _dirty(block) == [9]
