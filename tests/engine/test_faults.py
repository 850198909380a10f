"""Init-packet validation, malformed packets, and abort/close with blocked threads."""

from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest

from multifd.machine.ramblock import RamBlock
from multifd.multifd import MultifdError, RamPayload, Receiver
from multifd.wire.constants import PacketLayout
from multifd.wire.errors import BadCount, BadMagic, Mismatch
from multifd.wire.packet import InitPacket, RamPacketEncoder, encode_device_state_header
from tests.engine._engine import UUID, make_pair, multifd_threads, page_offsets, random_block


def _receiver(layout=PacketLayout.HEAD, compression="none", channels=2, **kw):
    dst = RamBlock("pc.ram", 64 * 4096)
    dst.array[:] = 0xAB
    errors: list[Exception] = []
    r = Receiver(channels=channels, uuid=UUID, layout=layout, compression=compression,
                 blocks={"pc.ram": dst}, on_error=errors.append, **kw)
    return r, dst, errors


def _channel(r: Receiver, cid: int = 0) -> socket.socket:
    a, b = socket.socketpair()
    a.sendall(InitPacket(UUID, cid).encode())
    r.add_channel(b, timeout=5)
    return a


@pytest.mark.parametrize(
    ("init", "exc", "text"),
    [
        (b"\x12\x34\x56\x78" + bytes(60), BadMagic, "magic"),
        (InitPacket(bytes(16), 0).encode(), Mismatch, "uuid"),
        (InitPacket(UUID, 2).encode(), BadCount, "channel_id"),
    ],
)
def test_init_packet_validation(init: bytes, exc: type, text: str) -> None:
    r, _, _ = _receiver()
    a, b = socket.socketpair()
    try:
        a.sendall(init)
        with pytest.raises(exc, match=text):
            r.add_channel(b, timeout=5)
    finally:
        a.close()
        b.close()
        r.close()


def test_duplicate_channel_id_and_init_timeout() -> None:
    r, _, _ = _receiver()
    a = _channel(r, 1)
    c, d = socket.socketpair()
    e, f = socket.socketpair()
    try:
        c.sendall(InitPacket(UUID, 1).encode())
        with pytest.raises(Mismatch, match="connected twice"):
            r.add_channel(d, timeout=5)
        with pytest.raises(MultifdError, match="timed out"):
            r.add_channel(f, timeout=0.05)  # nothing sent
        with pytest.raises(MultifdError, match="timed out"):
            r.wait_all_channels(timeout=0.05)
    finally:
        for s in (a, c, d, e, f):
            s.close()
        r.close()


def _packet(layout=PacketLayout.HEAD, *, flags=0, block="pc.ram", normal=(0,), zero=(),
            size=None, patch=None) -> bytes:
    enc = RamPacketEncoder(layout)
    n = np.asarray(normal, dtype=np.uint64)
    z = np.asarray(zero, dtype=np.uint64)
    hdr = bytearray(enc.encode(flags=flags, packet_num=0, ramblock=block, normal=n, zero=z,
                               next_packet_size=len(n) * 4096 if size is None else size))
    if patch:
        patch(hdr)
    return bytes(hdr) + b"\x77" * (len(n) * 4096 if size is None else size)


@pytest.mark.parametrize("chunk", [None, 1, 700])
def test_packets_back_to_back_in_any_chunks(chunk: int | None) -> None:
    """Short device-state packets, RAM packets and a SYNC in one write or in small writes:
    bytes a header read takes past a short header are used by what follows, in order."""
    got: list[tuple[str, int, bytes]] = []
    r, dst, errors = _receiver(channels=1, device_state_sink=lambda i, n, d: got.append(
        (i, n, bytes(d))))
    dst.pages[2] = 0x55  # a zero page must clear it
    bufs = [("a", 0, b"x"), ("b", 1, b"yz" * 10), ("c", 2, bytes(range(256)) * 2)]
    stream = b"".join(encode_device_state_header(i, n, len(d)) + d for i, n, d in bufs[:2])
    stream += _packet(normal=(4096,))
    stream += encode_device_state_header("c", 2, 512) + bufs[2][2]
    stream += _packet(normal=(), zero=(2 * 4096,))
    stream += _packet(flags=0x01, normal=())
    a = _channel(r, 0)
    try:
        step = chunk or len(stream)
        for pos in range(0, len(stream), step):
            a.sendall(stream[pos : pos + step])
        r.sync_main(timeout=10)
        assert got == bufs and errors == []
        assert (dst.pages[1] == 0x77).all() and not dst.pages[2].any()
        assert (dst.pages[3] == 0xAB).all()
        assert r.channel_stats()[0]["device_state_buffers"] == 3
    finally:
        a.close()
        r.close()


BAD_PACKETS = {
    "offset outside the block": (_packet(normal=(64 * 4096,)), "outside RAM block"),
    "huge offset": (_packet(normal=(2**63,)), "outside RAM block"),
    "unknown block": (_packet(block="nope"), "unknown RAM block"),
    "count above page_count": (
        _packet(patch=lambda h: struct.pack_into(">II", h, 12, 129, 129)), "pages_alloc"),
    "zero count too big": (
        _packet(patch=lambda h: struct.pack_into(">I", h, 32, 128)), "zero_pages"),
    "wrong compression flag": (_packet(flags=0x04), "compression"),
    "bad magic": (b"\x00" * 1344, "magic"),
    "payload size lie": (_packet(size=4095), "next_packet_size"),
    "empty device state": (
        encode_device_state_header("dev", 0, 1)[:-4] + bytes(4), "empty device state"),
}


@pytest.mark.parametrize("name", list(BAD_PACKETS))
def test_malformed_packet_fails_receiver_without_touching_memory(name: str) -> None:
    data, text = BAD_PACKETS[name]
    r, dst, errors = _receiver()
    before = dst.array.copy()
    a = _channel(r, 0)
    try:
        a.sendall(data)
        with pytest.raises(MultifdError, match=text):
            r.sync_main(timeout=5)
        assert r.error is not None and "channel 0" in str(r.error)
        deadline = time.monotonic() + 5  # on_error runs on the channel thread
        while not errors and time.monotonic() < deadline:
            time.sleep(0.005)
        assert errors == [r.error]
        assert np.array_equal(dst.array, before)
    finally:
        a.close()
        r.close()


def test_device_state_rejected_on_7_2_and_without_sink() -> None:
    r, _, _ = _receiver(layout=PacketLayout.V7_2)
    a = _channel(r, 0)
    try:
        a.sendall(encode_device_state_header("dev", 0, 3) + b"abc")
        with pytest.raises(MultifdError, match=r"kind not allowed with layout 7\.2"):
            r.sync_main(timeout=5)
    finally:
        a.close()
        r.close()
    r, _, _ = _receiver()
    a = _channel(r, 0)
    try:
        a.sendall(encode_device_state_header("dev", 0, 3) + b"abc")
        with pytest.raises(MultifdError, match="no device-state sink"):
            r.sync_main(timeout=5)
    finally:
        a.close()
        r.close()


def test_sync_with_pages_and_empty_packets_of_7_2() -> None:
    """7.2 quirks: a SYNC packet carrying pages (pages first), an empty non-SYNC packet."""
    r, dst, _ = _receiver(layout=PacketLayout.V7_2, channels=1)
    a = _channel(r, 0)
    try:
        a.sendall(_packet(PacketLayout.V7_2, flags=0x01, normal=(4096, 8192)))
        a.sendall(_packet(PacketLayout.V7_2, normal=()))
        a.sendall(_packet(PacketLayout.V7_2, normal=(0,)))
        deadline = time.monotonic() + 5
        while r.channel_stats()[0].get("normal_pages", 0) < 2:  # the SYNC's own pages
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.05)
        # held at the SYNC: its pages are in, the packet after it is not (checked before
        # sync_main releases the channel, which may then apply it at once)
        assert (dst.pages[1:3] == 0x77).all() and (dst.pages[0] == 0xAB).all()
        r.sync_main(timeout=5)
        a.close()  # EOF at a packet boundary ends the channel cleanly
        deadline = time.monotonic() + 5
        while r.channel_stats()[0].get("normal_pages", 0) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert (dst.pages[0] == 0x77).all()
        time.sleep(0.05)
        assert r.error is None
        with pytest.raises(MultifdError, match="closed before its SYNC"):
            r.sync_main(timeout=5)
    finally:
        a.close()
        r.close()


def test_eof_inside_a_packet_is_an_error() -> None:
    r, _, _ = _receiver()
    a = _channel(r, 0)
    try:
        a.sendall(_packet()[:2000])
        a.close()
        with pytest.raises(MultifdError, match="middle of a packet"):
            r.sync_main(timeout=5)
    finally:
        r.close()


def test_abort_sender_blocked_in_send_and_sync() -> None:
    """Nobody reads the channels: send() and sync() block; abort() frees them promptly."""
    src = random_block("pc.ram", 4 << 20, seed=1)
    pair, socks = make_pair({"pc.ram": src}, channels=2, connect=False)
    outcome: dict[str, BaseException] = {}
    sends = [0]

    def producer() -> None:
        slot = pair.sender.new_slot()
        offs = page_offsets(src)
        try:
            for _ in range(100):
                for i in range(0, offs.shape[0], 128):
                    slot.payload(RamPayload).fill(src, offs[i : i + 128])
                    slot = pair.sender.send(slot)
                    sends[0] += 1
        except BaseException as e:
            outcome["send"] = e

    def syncer() -> None:
        try:
            pair.sender.sync()
        except BaseException as e:
            outcome["sync"] = e

    ts = [threading.Thread(target=producer), threading.Thread(target=syncer)]
    ts[0].start()
    # sync() only blocks behind queued packets: start it once the producer is stuck
    # (socket buffers full), not before its first send (the SYNCs would go out at once).
    deadline = time.monotonic() + 10
    last = -1
    while sends[0] != last and time.monotonic() < deadline:
        last = sends[0]
        time.sleep(0.2)
    ts[1].start()
    time.sleep(0.3)
    assert all(t.is_alive() for t in ts)  # really blocked
    t0 = time.monotonic()
    pair.sender.abort("operator cancel")
    for t in ts:
        t.join(5)
    assert time.monotonic() - t0 < 2
    assert isinstance(outcome.get("send"), MultifdError)
    assert isinstance(outcome.get("sync"), MultifdError)
    assert "operator cancel" in str(outcome["send"])
    with pytest.raises(MultifdError):
        pair.sender.sync()
    pair.receiver.close()
    for _, b in socks:
        b.close()
    assert not multifd_threads()


def test_close_receiver_with_threads_blocked_in_recv_sync_and_sync_main() -> None:
    src = random_block("pc.ram", 1 << 20, seed=2)
    pair, _ = make_pair({"pc.ram": src}, channels=3)
    try:
        pair.sender.sync()  # every channel now waits at its SYNC ...
        time.sleep(0.1)
        waiter_err: list[BaseException] = []
        # ... and a sync_main that never gets all of them (one channel missing forever)
        r2, _, _ = _receiver(channels=2)
        c = _channel(r2, 0)  # channel 0 of r2 blocks in recv, channel 1 never comes

        def waiter() -> None:
            try:
                r2.sync_main()
            except BaseException as e:
                waiter_err.append(e)

        w = threading.Thread(target=waiter)
        w.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        pair.receiver.close()  # threads blocked at the SYNC barrier
        r2.close()  # thread blocked in recv + sync_main blocked
        w.join(5)
        assert time.monotonic() - t0 < 2
        assert waiter_err and isinstance(waiter_err[0], MultifdError)
        c.close()
    finally:
        pair.sender.abort("test over")
    assert not multifd_threads()


def test_sender_close_drains_pending_work() -> None:
    src = random_block("pc.ram", 2 << 20, seed=3)
    pair, _ = make_pair({"pc.ram": src}, channels=2, dst_fill=0)
    slot = pair.sender.new_slot()
    offs = page_offsets(src)
    for i in range(0, offs.shape[0], 128):
        slot.payload(RamPayload).fill(src, offs[i : i + 128])
        slot = pair.sender.send(slot)
    pair.sender.close()  # graceful: everything queued is written, then EOF
    deadline = time.monotonic() + 5
    while any(t.name.startswith("multifdrecv") for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert pair.receiver.error is None
    assert np.array_equal(pair.dst["pc.ram"].array, src.array)
    pair.receiver.close()
