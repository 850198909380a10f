"""Sender -> Receiver over socketpairs: both layouts, none/zlib/zstd, 1..8 channels,
several producers, device state sharing the channels, zero pages, stats."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from multifd.multifd import DeviceStatePayload, MultifdError, RamPayload, SendSlot
from multifd.wire.constants import PacketLayout
from tests.engine._engine import make_pair, page_offsets, random_block

MiB = 1 << 20


def send_block(sender, block, idx, slot: SendSlot | None = None) -> SendSlot:
    slot = slot or sender.new_slot()
    offs = page_offsets(block, idx)
    for i in range(0, offs.shape[0], 128):
        slot.payload(RamPayload).fill(block, offs[i : i + 128])
        slot = sender.send(slot)
    return slot


def producers(sender, block, nthreads: int, idx: np.ndarray) -> None:
    """Split `idx` between `nthreads` producer threads, each with its own slot."""
    parts = np.array_split(idx, nthreads)
    errs: list[BaseException] = []

    def run(part: np.ndarray) -> None:
        try:
            send_block(sender, block, part)
        except BaseException as e:  # pragma: no cover - reported below
            errs.append(e)

    ts = [threading.Thread(target=run, args=(p,)) for p in parts]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs, errs


@pytest.mark.parametrize("layout", [PacketLayout.V7_2, PacketLayout.HEAD])
@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("channels", [1, 2, 4, 8])
def test_ram_roundtrip(layout: PacketLayout, compression: str, channels: int) -> None:
    src = random_block("pc.ram", 3 * MiB, seed=channels)
    head = layout is PacketLayout.HEAD
    pair, _ = make_pair({"pc.ram": src}, channels=channels, layout=layout,
                        compression=compression, zero_page_detection=head, dst_fill=0x5A)
    try:
        if head:  # qemu-10: every page goes, zero pages detected in the channels
            idx = np.arange(src.num_pages)
        else:  # qemu-7.2: the migration thread leaves zero pages to the main stream
            idx = np.flatnonzero(np.bitwise_or.reduce(src.words, axis=1))
            pair.dst["pc.ram"].pages[np.setdiff1d(np.arange(src.num_pages), idx)] = 0
        producers(pair.sender, src, 3, idx)
        pair.sender.sync()
        pair.receiver.sync_main(timeout=10)
        assert np.array_equal(pair.dst["pc.ram"].array, src.array)
        s_stats, r_stats = pair.sender.channel_stats(), pair.receiver.channel_stats()
        assert [s["sync_packets"] for s in s_stats] == [1] * channels
        assert [r["sync_packets"] for r in r_stats.values()] == [1] * channels
        normal = sum(s.get("normal_pages", 0) for s in s_stats)
        zero = sum(s.get("zero_pages", 0) for s in s_stats)
        assert normal == sum(r.get("normal_pages", 0) for r in r_stats.values())
        assert normal + zero == idx.shape[0]
        expected_zero = int((~np.bitwise_or.reduce(src.words, axis=1).astype(bool)).sum())
        assert zero == (expected_zero if head else 0)
        wire = sum(s["wire_bytes_ram"] for s in s_stats)
        assert wire == sum(r["wire_bytes_ram"] for r in r_stats.values())
        if compression == "none":
            assert wire == normal * 4096 + 1344 * sum(s["packets"] for s in s_stats)
    finally:
        pair.close()
    assert not pair.errors


def test_several_blocks_many_producers_scattered_pages() -> None:
    """Scattered batches (bounce-buffer path) from 4 producers over 2 blocks."""
    a = random_block("a", 2 * MiB, seed=1, zero_every=3)
    b = random_block("b", 1 * MiB, seed=2, zero_every=5)
    pair, _ = make_pair({"a": a, "b": b}, channels=4, zero_page_detection=True, dst_fill=1)
    try:
        rng = np.random.default_rng(3)
        ts = []
        for blk in (a, b):
            perm = rng.permutation(blk.num_pages)  # no contiguous runs at all
            for part in np.array_split(perm, 2):
                ts.append(threading.Thread(target=send_block, args=(pair.sender, blk, part)))
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        pair.sender.sync()
        pair.receiver.sync_main(timeout=10)
        assert np.array_equal(pair.dst["a"].array, a.array)
        assert np.array_equal(pair.dst["b"].array, b.array)
    finally:
        pair.close()


def test_zero_pages_overwrite_old_data_head() -> None:
    """HEAD: zero pages inside packets land as zeros over pages that held data."""
    src = random_block("pc.ram", 1 * MiB, seed=4, zero_every=2)
    pair, _ = make_pair({"pc.ram": src}, channels=2, zero_page_detection=True, dst_fill=0xFF)
    try:
        send_block(pair.sender, src, np.arange(src.num_pages))
        pair.sender.sync()
        pair.receiver.sync_main(timeout=10)
        dst = pair.dst["pc.ram"]
        zero = ~np.bitwise_or.reduce(src.words, axis=1).astype(bool)
        assert zero.sum() > src.num_pages // 2
        assert not dst.pages[zero].any()
        assert np.array_equal(dst.array, src.array)
        assert sum(s.get("zero_pages", 0) for s in pair.sender.channel_stats()) == zero.sum()
    finally:
        pair.close()


def test_fresh_ram_skips_untouched_zero_pages_but_clears_received_ones() -> None:
    src = random_block("pc.ram", 512 * 1024, seed=5, zero_every=2)
    pair, _ = make_pair({"pc.ram": src}, channels=2, zero_page_detection=True, fresh_ram=True)
    try:
        send_block(pair.sender, src, np.arange(src.num_pages))
        pair.sender.sync()
        pair.receiver.sync_main(timeout=10)
        assert np.array_equal(pair.dst["pc.ram"].array, src.array)
        # round 2: every data page becomes zero; the destination must clear them
        src.array[:] = 0
        send_block(pair.sender, src, np.arange(src.num_pages))
        pair.sender.sync()
        pair.receiver.sync_main(timeout=10)
        assert not pair.dst["pc.ram"].array.any()
    finally:
        pair.close()


def _qemu10_order(pages: np.ndarray) -> np.ndarray:
    """The order QEMU 10's multifd_send_zero_page_detect leaves an all-zero batch in:
    each zero page is swapped to the end of the array."""
    out = pages.copy()
    i, j = 0, out.shape[0] - 1
    while i <= j:
        out[i], out[j] = out[j], out[i]
        j -= 1
    return out


@pytest.mark.parametrize("span", ["run", "wide"])
def test_fresh_ram_shuffled_zero_pages(span: str) -> None:
    """Zero pages in QEMU 10's shuffled order: a span never written needs no write, and a
    page written earlier inside it (or inside a wide span) is still cleared."""
    src = random_block("pc.ram", 4 * MiB, seed=9, zero_every=10**9)  # no zero page
    pair, _ = make_pair({"pc.ram": src}, channels=1, zero_page_detection=True,
                        fresh_ram=True)
    dst = pair.dst["pc.ram"]
    try:
        written = np.array([5, 700, 850])
        send_block(pair.sender, src, written)  # round 1: three data pages
        pair.sender.sync()
        pair.receiver.sync_main(timeout=10)
        batch = (np.arange(128) + 300 if span == "run"  # never written: untouched
                 else np.arange(128) * 7 + 5)  # 5..894: spans 890 pages, holds page 5
        with_hit = np.arange(128) + 640  # holds page 700
        src.array[:] = 0
        for pages in (batch, with_hit):
            send_block(pair.sender, src, _qemu10_order(pages))
        pair.sender.sync()
        pair.receiver.sync_main(timeout=10)
        assert not dst.pages[np.concatenate([batch, with_hit])].any()
        assert dst.pages[850].any()  # in no batch: kept
        assert dst.pages[5].any() == (span == "run")
        zero = sum(s.get("zero_pages", 0) for s in pair.receiver.channel_stats().values())
        assert zero == 256
    finally:
        pair.close()


@pytest.mark.parametrize("channels", [1, 3])
def test_device_state_interleaved_with_ram(channels: int) -> None:
    src = random_block("pc.ram", 2 * MiB, seed=6)
    pair, _ = make_pair({"pc.ram": src}, channels=channels, zero_page_detection=True)
    rng = np.random.default_rng(7)
    buffers = {(f"dev{d}", d * 10 + i): rng.integers(0, 256, int(rng.integers(1, 300_000)),
                                                     dtype=np.uint8).tobytes()
               for d in range(3) for i in range(12)}

    def device_producer(dev: str) -> None:
        slot = pair.sender.new_slot()
        for (idstr, inst), buf in buffers.items():
            if idstr == dev:
                slot.payload(DeviceStatePayload).fill(idstr, inst, buf)
                slot = pair.sender.send(slot)

    try:
        ts = [threading.Thread(target=device_producer, args=(f"dev{d}",)) for d in range(3)]
        ts += [threading.Thread(target=send_block, args=(pair.sender, src,
                                                         np.arange(src.num_pages)))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        pair.sender.sync()
        pair.receiver.sync_main(timeout=10)
        got = {(i, n): d for i, n, d in pair.sink}
        assert len(pair.sink) == len(buffers)
        assert got == buffers
        assert np.array_equal(pair.dst["pc.ram"].array, src.array)
        st = pair.sender.channel_stats()
        assert sum(s.get("device_state_buffers", 0) for s in st) == len(buffers)
        assert sum(s.get("wire_bytes_device_state", 0) for s in st) == sum(
            276 + len(b) for b in buffers.values())
        if channels > 1:  # both kinds really shared the channels
            assert sum(1 for s in st if s.get("device_state_buffers")) > 1
    finally:
        pair.close()


def test_slot_reuses_payload_objects() -> None:
    slot = SendSlot()
    ram = slot.payload(RamPayload)
    assert slot.payload(RamPayload) is ram and slot.active is ram
    dev = slot.payload(DeviceStatePayload)
    assert slot.active is dev and slot.payload(RamPayload) is ram


def test_payload_remembers_a_page_run() -> None:
    """Consecutive pages are found while validating; the channel then sends one view."""
    blk = random_block("pc.ram", 64 * 4096, seed=2)
    p = RamPayload()
    p.fill(blk, np.arange(3, 6) * 4096)
    assert p.run_start == 3 * 4096 and p.num == 3
    p.fill(blk, [0, 2 * 4096])
    assert p.run_start is None
    p.fill(blk, [63 * 4096])
    assert p.run_start == 63 * 4096
    p.clear()
    assert p.run_start is None and p.is_empty()


def test_send_rejects_bad_payloads() -> None:
    src = random_block("pc.ram", 256 * 1024, seed=8)
    pair, _ = make_pair({"pc.ram": src}, channels=1, layout=PacketLayout.V7_2)
    try:
        slot = pair.sender.new_slot()
        with pytest.raises(ValueError):
            pair.sender.send(slot)  # empty
        with pytest.raises(ValueError):
            slot.payload(RamPayload).fill(src, [src.used_length])  # outside the block
        with pytest.raises(ValueError):
            slot.payload(RamPayload).fill(src, [100])  # unaligned
        with pytest.raises(ValueError):
            slot.payload(RamPayload).fill(src, np.arange(129) * 4096)  # > page_count
        slot.payload(DeviceStatePayload).fill("dev", 0, b"x")
        with pytest.raises(ValueError, match="HEAD"):
            pair.sender.send(slot)  # no device state on a 7.2 peer
        with pytest.raises(ValueError):
            slot.payload(DeviceStatePayload).fill("dev", 0, b"")
    finally:
        pair.close()


def test_sender_error_names_channel_and_cause() -> None:
    src = random_block("pc.ram", 1 * MiB, seed=9)
    pair, socks = make_pair({"pc.ram": src}, channels=2, connect=False)
    socks[1][1].close()  # the peer of channel 1 goes away
    try:
        with pytest.raises(MultifdError, match=r"channel 1 .*(Pipe|Reset|Connection)"):
            for _ in range(50):
                send_block(pair.sender, src, np.arange(src.num_pages))
                pair.sender.sync(timeout=5)
    finally:
        pair.sender.abort("test")
        pair.receiver.close()
        socks[0][1].close()
