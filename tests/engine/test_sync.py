"""The SYNC barrier: a page rewritten every round arrives in its final version.

The source rewrites the same pages each round, sends them from two producers, calls
`sync()`, then posts marker k on a "main stream" (a queue); the destination calls
`sync_main()` for each marker. Without the barrier the ordering guarantee is gone: a
deterministic scenario below makes an old copy land after the new one.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

from multifd.multifd import RamPayload
from multifd.wire.constants import PacketLayout
from tests.engine._engine import make_pair, page_offsets, random_block


def round_content(block, k: int) -> None:
    """Round k's version of every page: a distinct value per (page, round)."""
    w = block.words
    w[:] = np.arange(block.num_pages, dtype=np.uint64)[:, None] * np.uint64(1000) + np.uint64(k)
    block.pages[k % 7 :: 7] = 0  # some pages turn zero this round, data again later


@pytest.mark.parametrize("layout", [PacketLayout.V7_2, PacketLayout.HEAD])
def test_final_round_wins_under_heavy_dirtying(layout: PacketLayout) -> None:
    rounds = 12
    src = random_block("pc.ram", 1 << 20, seed=1)
    head = layout is PacketLayout.HEAD
    pair, _ = make_pair({"pc.ram": src}, channels=4, layout=layout, compression="zstd",
                        zero_page_detection=head, dst_fill=0xEE)
    main_stream: queue.Queue[int | None] = queue.Queue()
    acks: queue.Queue[int] = queue.Queue()
    dst = pair.dst["pc.ram"]
    seen_bad: list[int] = []
    errs: list[BaseException] = []

    def destination() -> None:
        try:
            while (k := main_stream.get(timeout=10)) is not None:
                pair.receiver.sync_main(timeout=10)
                # Source waits for our ack before round k+1: memory must be round k exactly.
                if not np.array_equal(dst.array, src.array):
                    seen_bad.append(k)
                acks.put(k)
        except BaseException as e:
            errs.append(e)
            acks.put(-1)

    t = threading.Thread(target=destination)
    t.start()
    try:
        for k in range(rounds):
            round_content(src, k)
            nz = np.bitwise_or.reduce(src.words, axis=1) != 0
            idx = np.arange(src.num_pages) if head else np.flatnonzero(nz)
            if not head:  # 7.2: zero pages travel on the main stream; apply them here
                dst.pages[~nz] = 0
            rng = np.random.default_rng(k)
            parts = np.array_split(rng.permutation(idx), 2)

            def produce(part: np.ndarray) -> None:
                slot = pair.sender.new_slot()
                offs = page_offsets(src, np.sort(part))
                for i in range(0, offs.shape[0], 37):
                    slot.payload(RamPayload).fill(src, offs[i : i + 37])
                    slot = pair.sender.send(slot)

            ps = [threading.Thread(target=produce, args=(p,)) for p in parts]
            for p in ps:
                p.start()
            for p in ps:
                p.join()
            pair.sender.sync()
            main_stream.put(k)  # the EOS / MULTIFD_FLUSH marker, right after sync()
            assert acks.get(timeout=10) == k
        main_stream.put(None)
        t.join(10)
        assert not errs and not seen_bad
        assert np.array_equal(dst.array, src.array)
        assert pair.receiver.syncs == rounds
        assert all(s["sync_packets"] == rounds for s in pair.sender.channel_stats())
    finally:
        main_stream.put(None)
        t.join(10)
        pair.close()


def _two_rounds_one_page(with_sync: bool) -> int:
    """Round 1 writes 0x11 to 8 pages (goes to channel 0), round 2 writes 0x22 (channel 1).

    The destination connects channel 1 first and lets it run for a while before channel 0
    arrives, i.e. channel 0 is slow. Returns the byte the destination ends with.
    """
    src = random_block("pc.ram", 64 * 4096, seed=2)
    pair, socks = make_pair({"pc.ram": src}, channels=2, connect=False)
    markers: queue.Queue[int | None] = queue.Queue()
    offs = page_offsets(src, np.arange(8))
    try:
        slot = pair.sender.new_slot()
        for value in (0x11, 0x22):
            src.pages[:8] = value
            slot.payload(RamPayload).fill(src, offs)
            slot = pair.sender.send(slot)  # round-robin: round 1 -> ch0, round 2 -> ch1
            # pages go out as views of RAM: let the packet leave before the next rewrite
            deadline = time.monotonic() + 5
            while pair.sender.channel_stats()[0].get("packets", 0) < 1:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            if with_sync:
                pair.sender.sync()
                markers.put(value)
        markers.put(None)
        pair.receiver.add_channel(socks[1][1], timeout=5)
        deadline = time.monotonic() + (0.3 if with_sync else 5)
        # without SYNC nothing holds channel 1 back; with it, it waits at its SYNC
        while time.monotonic() < deadline:
            if pair.receiver.channel_stats()[1].get("normal_pages", 0) == 8:
                break
            time.sleep(0.01)
        pair.receiver.add_channel(socks[0][1], timeout=5)
        while markers.get(timeout=5) is not None:
            pair.receiver.sync_main(timeout=5)
        if not with_sync:  # wait until both packets are applied
            deadline = time.monotonic() + 5
            while sum(s.get("normal_pages", 0)
                      for s in pair.receiver.channel_stats().values()) < 16:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        return int(pair.dst["pc.ram"].array[0])
    finally:
        pair.close()


def test_sync_keeps_rounds_ordered_across_channels() -> None:
    assert _two_rounds_one_page(with_sync=True) == 0x22


def test_hazard_is_real_without_sync() -> None:
    """Same traffic without the barrier: the older copy (slow channel 0) lands last."""
    assert _two_rounds_one_page(with_sync=False) == 0x11


def test_sync_written_after_pending_job_and_exactly_one_per_channel() -> None:
    src = random_block("pc.ram", 1 << 20, seed=3)
    pair, _ = make_pair({"pc.ram": src}, channels=3, dst_fill=0)
    try:
        for r in range(3):
            slot = pair.sender.new_slot()
            offs = page_offsets(src)
            for i in range(0, offs.shape[0], 128):
                slot.payload(RamPayload).fill(src, offs[i : i + 128])
                slot = pair.sender.send(slot)
            pair.sender.sync()  # no wait for the destination between send and sync
            pair.receiver.sync_main(timeout=5)
            assert np.array_equal(pair.dst["pc.ram"].array, src.array)
            assert [s["sync_packets"] for s in pair.sender.channel_stats()] == [r + 1] * 3
    finally:
        pair.close()


def test_sync_main_gives_up_when_check_raises() -> None:
    """A channel whose SYNC never comes (stalled) must not hold the loader forever: the
    check it passes (the destination: is the main channel reset?) ends the wait, and the
    error names the channel that is late."""
    import socket

    from multifd.machine import RamBlock
    from multifd.multifd import MultifdError
    from multifd.multifd.receiver import Receiver
    from multifd.wire.constants import MultifdFlag
    from multifd.wire.packet import InitPacket, RamPacketEncoder

    uuid = bytes(range(16))
    block = RamBlock("pc.ram", 1 << 20)
    rx = Receiver(channels=2, uuid=uuid, layout=PacketLayout.HEAD, blocks={"pc.ram": block})
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        for cid, (a, b) in enumerate(pairs):
            a.sendall(InitPacket(uuid, cid).encode())
            rx.add_channel(b, timeout=5)
        sync = RamPacketEncoder(PacketLayout.HEAD).encode(
            flags=int(MultifdFlag.SYNC), packet_num=0, ramblock="pc.ram",
            normal=np.zeros(0, np.uint64), next_packet_size=0)
        pairs[0][0].sendall(sync)  # channel 0 reaches its SYNC, channel 1 stays silent
        calls = []

        def check() -> None:
            calls.append(time.monotonic())
            if len(calls) == 3:
                raise ConnectionError("main channel reset")

        t0 = time.monotonic()
        with pytest.raises(MultifdError, match=r"main channel reset.*channel 1 had not"):
            rx.sync_main(timeout=10, check=check)
        assert time.monotonic() - t0 < 2
    finally:
        rx.close()
        for a, _ in pairs:
            a.close()
        block.close()
