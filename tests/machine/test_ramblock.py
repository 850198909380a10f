"""RamBlock: views, dirty tracking (lossless under a racing writer), zero scans, lifetime."""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pytest

from multifd.machine import RamBlock


def test_geometry_and_views_share_memory() -> None:
    with RamBlock("pc.ram", 10_000) as b:
        assert b.used_length == 12_288 and b.num_pages == 3 and b.page_size == 4096
        assert b.array.shape == (12_288,) and b.pages.shape == (3, 4096)
        assert b.words.shape == (3, 512) and b.words.dtype == np.uint64
        b.view[4096] = 7
        assert b.array[4096] == 7 and b.pages[1, 0] == 7 and b.words[1, 0] == 7
        b.pages[2, :] = 1
        assert bytes(b.view[8192:8196]) == b"\x01" * 4


def test_custom_page_size_and_validation() -> None:
    with RamBlock("x", 1, page_size=512) as b:
        assert b.used_length == 512 and b.num_pages == 1
    with pytest.raises(ValueError):
        RamBlock("", 4096)
    with pytest.raises(ValueError):
        RamBlock("x" * 256, 4096)
    with pytest.raises(ValueError):
        RamBlock("x", 0)
    with pytest.raises(ValueError):
        RamBlock("x", 4096, page_size=3000)


def test_write_marks_touched_pages_and_sync_clears() -> None:
    with RamBlock("b", 16 * 4096) as b:
        assert b.dirty_count() == 0
        b.write(4095, b"ab")  # straddles pages 0 and 1
        b.write(5 * 4096, np.ones(4096, dtype=np.uint8))
        assert bytes(b.view[4095:4097]) == b"ab"
        assert b.dirty_count() == 3
        snap = b.sync_dirty_bitmap()
        assert snap.dtype == bool and np.flatnonzero(snap).tolist() == [0, 1, 5]
        assert b.dirty_count() == 0
        assert not b.sync_dirty_bitmap().any()


def test_mark_apis() -> None:
    with RamBlock("b", 16 * 4096) as b:
        b.mark_dirty(3 * 4096 + 1, 4096)  # pages 3 and 4
        b.mark_dirty_pages(np.array([9, 9, 15]))
        mask = np.zeros(16, dtype=bool)
        mask[12] = True
        b.mark_dirty_pages(mask)
        b.mark_dirty_pages(np.array([], dtype=np.int64))
        assert np.flatnonzero(b.sync_dirty_bitmap()).tolist() == [3, 4, 9, 12, 15]
        b.mark_all_dirty()
        assert b.dirty_count() == 16
        with pytest.raises(ValueError):
            b.mark_dirty_pages(np.array([16]))
        with pytest.raises(ValueError):
            b.mark_dirty_pages(np.array([-1]))
        with pytest.raises(ValueError):
            b.mark_dirty(15 * 4096, 4097)
        with pytest.raises(ValueError):
            b.write(16 * 4096 - 1, b"xy")


def test_dirty_log_on_off() -> None:
    with RamBlock("b", 8 * 4096) as b:
        assert b.dirty_logging
        b.stop_dirty_log()
        b.write(0, b"x")
        b.mark_dirty_pages(np.array([3]))
        assert b.dirty_count() == 0
        b.start_dirty_log(all_dirty=False)
        assert b.dirty_count() == 0
        b.write(0, b"x")
        assert b.dirty_count() == 1
        b.start_dirty_log()
        assert b.dirty_count() == 8


def test_zero_pages_random_contiguous_and_chunked() -> None:
    n = 5000  # more than one scan chunk
    with RamBlock("b", n * 4096) as b:
        rng = np.random.default_rng(3)
        nonzero = rng.choice(n, size=700, replace=False)
        # one non-zero byte anywhere in the page must count
        b.pages[nonzero, rng.integers(0, 4096, size=700)] = 1
        expected = np.ones(n, dtype=bool)
        expected[nonzero] = False
        assert np.array_equal(b.zero_pages(np.arange(n)), expected)
        sample = rng.integers(0, n, size=3000)
        assert np.array_equal(b.zero_pages(sample), expected[sample])
        assert np.array_equal(b.zero_pages(np.arange(100, 200)), expected[100:200])
        assert b.zero_pages(np.array([], dtype=np.int64)).shape == (0,)
        for start, count in ((0, n), (100, 128), (n - 128, 128), (7, 1)):
            assert np.array_equal(b.zero_pages_range(start, count),
                                  expected[start : start + count])
        b.pages[n - 1, 4095] = 9  # last byte of the block
        assert not b.zero_pages(np.array([n - 1]))[0]
        assert not b.zero_pages_range(n - 1, 1)[0]


def test_checksum_is_sha256_of_contents() -> None:
    with RamBlock("b", 3 * 4096) as b:
        b.array[:] = np.arange(b.used_length, dtype=np.uint64).astype(np.uint8)
        assert b.checksum() == hashlib.sha256(b.array.tobytes()).hexdigest()


def test_close_guards_use_and_tolerates_outside_views() -> None:
    b = RamBlock("b", 4 * 4096)
    outside = b.pages[1]
    b.close()
    b.close()  # idempotent
    assert b.closed
    for use in (
        lambda: b.view,
        lambda: b.array,
        lambda: b.pages,
        lambda: b.words,
        lambda: b.write(0, b"x"),
        lambda: b.sync_dirty_bitmap(),
        lambda: b.checksum(),
        lambda: b.zero_pages(np.array([0])),
    ):
        with pytest.raises(ValueError, match="closed"):
            use()
    outside[0] = 1  # the outside view keeps the mapping alive
    assert outside[0] == 1


def test_no_dirty_bit_lost_under_concurrent_writer() -> None:
    """A sender that syncs, then copies the pages of each snapshot, ends with an exact copy
    after a final sync, while a writer keeps rewriting pages (some of them continuously)."""
    npages = 256
    with RamBlock("b", npages * 4096) as src:
        dst = np.zeros_like(src.pages)
        stop = threading.Event()
        hot = 7  # rewritten on every iteration
        versions = {"n": 0}

        def writer() -> None:
            rng = np.random.default_rng(11)
            v = 0
            while not stop.is_set():
                v += 1
                payload = np.full(4096, v & 0xFF, dtype=np.uint8)
                payload[:8] = np.frombuffer(v.to_bytes(8, "little"), np.uint8)
                src.write(hot * 4096, payload)
                idx = np.unique(rng.integers(0, npages, size=8))
                src.pages[idx] = payload  # bulk path: write, then mark
                src.mark_dirty_pages(idx)
                versions["n"] = v

        t = threading.Thread(target=writer)
        src.mark_all_dirty()
        t.start()
        syncs = 0
        try:
            deadline = time.monotonic() + 10
            while (syncs < 100 or versions["n"] < 500) and time.monotonic() < deadline:
                idx = np.flatnonzero(src.sync_dirty_bitmap())
                dst[idx] = src.pages[idx]
                syncs += 1
                time.sleep(0)  # let the writer run between syncs
        finally:
            stop.set()
            t.join()
        idx = np.flatnonzero(src.sync_dirty_bitmap())  # the final, quiescent sync
        dst[idx] = src.pages[idx]
        assert versions["n"] >= 500 and syncs >= 100
        assert int.from_bytes(dst[hot, :8].tobytes(), "little") == versions["n"]
        assert np.array_equal(dst, src.pages)


def test_zero_out_leaves_untouched_pages_unallocated() -> None:
    import numpy as np

    from multifd.machine.ramblock import RamBlock

    blk = RamBlock("z", 64 << 20)
    try:
        blk.pages[[3, 10]] = 7
        rss_before = _rss_kib()
        written = blk.zero_out(np.arange(blk.num_pages))
        assert written == 2
        assert not blk.array.any()
        # reading 64 MiB of never-touched memory did not allocate it
        assert _rss_kib() - rss_before < 16 << 10
    finally:
        blk.close()


def test_zero_out_with_a_received_map_writes_only_received_pages() -> None:
    import numpy as np

    from multifd.machine.ramblock import RamBlock, received_maps

    blk = RamBlock("z", 1 << 20)
    try:
        received = received_maps({"z": blk})["z"]
        assert received.shape == (blk.num_pages,) and not received.any()
        blk.pages[[1, 2]] = 9
        received[[2, 5]] = True
        # Page 1 is not in the map: the caller promised it is zero, so it is not looked at.
        assert blk.zero_out(np.arange(8), received) == 2
        assert blk.pages[1].all() and not blk.pages[2].any()
        # the range form: the same rule, and a run never received touches nothing
        blk.pages[[2, 5, 6]] = 3
        assert blk.zero_out_range(8, 100, received) == 0
        assert blk.zero_out_range(0, 8, received) == 2
        assert blk.pages[1].all() and blk.pages[6].all() and not blk.pages[[2, 5]].any()
        assert blk.zero_out_range(0, 8) == 2  # no map: pages 1 and 6 hold data
        assert not blk.pages[:8].any()
    finally:
        blk.close()


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
