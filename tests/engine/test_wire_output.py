"""What the Sender writes, read back with the wire layer's own ChannelDecoder (QEMU's
format as qemu-reference.md 3.3-3.6 and the 10.0 captures show it)."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from multifd.machine.ramblock import RamBlock
from multifd.multifd import DeviceStatePayload, RamPayload, Sender
from multifd.wire.constants import PacketLayout
from multifd.wire.packet import (
    ChannelDecoder,
    DeviceStatePacket,
    EndOfChannel,
    InitPacket,
    RamPacket,
)
from tests.engine._engine import UUID, page_offsets


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_packets_as_qemu_10_sends_them(compression: str) -> None:
    blk = RamBlock("pc.ram", 256 * 4096)
    blk.pages[::2] = 0x42  # pages 0,2,4..: data; odd pages: zero
    blk.pages[128:] = 0  # second batch: zero only
    socks = [socket.socketpair() for _ in range(2)]
    streams = [bytearray(), bytearray()]

    def drain(k: int) -> None:
        while chunk := socks[k][1].recv(1 << 20):
            streams[k] += chunk

    readers = [threading.Thread(target=drain, args=(k,)) for k in range(2)]
    for t in readers:
        t.start()
    s = Sender([a for a, _ in socks], uuid=UUID, layout=PacketLayout.HEAD,
               compression=compression, zero_page_detection=True)
    s.start()
    s.sync()  # setup sync, like ram_save_setup
    slot = s.new_slot()
    offs = page_offsets(blk)
    for i in (0, 128):
        slot.payload(RamPayload).fill(blk, offs[i : i + 128])
        slot = s.send(slot)
    slot.payload(DeviceStatePayload).fill("vfio-dev", 3, b"state")
    slot = s.send(slot)
    s.sync()
    s.close()
    for t in readers:
        t.join(5)
    for _, b in socks:
        b.close()
    flag = {"none": 0, "zstd": 4}[compression]
    ids, events = [], []
    for data in streams:
        dec = ChannelDecoder(PacketLayout.HEAD, blocks={"pc.ram": blk.used_length},
                             compression_flag=flag)
        dec.receive_data(data)
        dec.receive_eof()
        evs = []
        while not isinstance(ev := dec.next_event(), EndOfChannel):
            evs.append(ev)
        assert isinstance(evs[0], InitPacket) and evs[0].uuid == UUID
        ids.append(evs[0].channel_id)
        events += evs[1:]
    assert sorted(ids) == [0, 1]
    rams = [e for e in events if isinstance(e, RamPacket)]
    syncs = [e.header for e in rams if e.header.is_sync]
    assert len(syncs) == 4
    assert all(h.flags == 1 and h.pages_alloc == 0 and not h.has_pages for h in syncs)
    data_pk = [e.header for e in rams if not e.header.is_sync]
    nums = sorted(h.packet_num for h in [*syncs, *data_pk])
    assert nums == list(range(6))  # one global counter, SYNCs included
    by_normal = {h.normal_pages: h for h in data_pk}
    mixed, zero_only = by_normal[64], by_normal[0]
    assert mixed.zero_pages == 64 and mixed.flags == flag and mixed.pages_alloc == 128
    assert np.array_equal(mixed.normal_offsets, offs[0:128:2])
    assert zero_only.zero_pages == 128 and zero_only.next_packet_size == 0
    assert zero_only.flags == flag  # 10.0: zero-only packets carry the method bits
    dev = [e for e in events if isinstance(e, DeviceStatePacket)]
    assert len(dev) == 1 and dev[0].payload == b"state"
    assert (dev[0].header.idstr, dev[0].header.instance_id) == ("vfio-dev", 3)
