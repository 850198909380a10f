"""Hostile peers against the live destination / Receiver (no TLS): SYNC flood, a
never-ending VMDESCRIPTION, decompression bombs, wrong UUID / channel ids, duplicates and
extra connections. Each must fail or stall with bounded memory, never run away.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from multifd.compress import get_method
from multifd.machine.demo import build_demo_machine
from multifd.machine.ramblock import RamBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.profile import get_profile
from multifd.migration.source import MigrationSource
from multifd.multifd import Receiver
from multifd.wire.constants import PacketLayout
from multifd.wire.errors import WireError
from multifd.wire.packet import InitPacket, RamPacketEncoder

MiB = 1 << 20
UUID = bytes(range(16))


def _flood(sock: socket.socket, packet: bytes, stop: threading.Event, sent: list[int]) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            sock.sendall(packet)
            sent[0] += len(packet)
        except TimeoutError:
            continue  # the receiver stopped reading: backpressure, as it should
        except OSError:
            return


def test_sync_flood_is_backpressured() -> None:
    """A channel that sends nothing but SYNC packets: the receiver stops at the first
    one (the main stream never releases it), so the flood fills socket buffers only."""
    blk = RamBlock("pc.ram", 64 * 4096)
    r = Receiver(channels=1, uuid=UUID, layout=PacketLayout.HEAD, blocks={"pc.ram": blk})
    a, b = socket.socketpair()
    a.sendall(InitPacket(UUID, 0).encode())
    r.add_channel(b, timeout=5)
    sync = bytes(RamPacketEncoder(PacketLayout.HEAD).encode_sync(1))
    stop = threading.Event()
    sent = [0]
    tracemalloc.start()
    try:
        t = threading.Thread(target=_flood, args=(a, sync, stop, sent), daemon=True)
        t.start()
        time.sleep(1.0)
        stats = r.channel_stats()[0]
        assert stats["sync_packets"] == 1  # blocked at the first SYNC, reading nothing more
        peak = tracemalloc.get_traced_memory()[1]
        assert peak < 4 * MiB
        assert sent[0] < 64 * MiB  # kernel buffers, not our memory, absorbed the rest
    finally:
        tracemalloc.stop()
        stop.set()
        t0 = time.monotonic()
        r.abort("test over")
        assert time.monotonic() - t0 < 3
        a.close()


def test_sync_flood_released_by_matching_main_is_bounded() -> None:
    """Even when the main stream releases every SYNC, each costs a header read only."""
    blk = RamBlock("pc.ram", 16 * 4096)
    r = Receiver(channels=1, uuid=UUID, layout=PacketLayout.HEAD, blocks={"pc.ram": blk})
    a, b = socket.socketpair()
    a.sendall(InitPacket(UUID, 0).encode())
    r.add_channel(b, timeout=5)
    enc = RamPacketEncoder(PacketLayout.HEAD)
    n = 2000
    t = threading.Thread(target=lambda: a.sendall(b"".join(
        bytes(enc.encode_sync(i)) for i in range(n))), daemon=True)
    t.start()
    tracemalloc.start()
    try:
        for _ in range(n):
            r.sync_main(timeout=5)
        assert tracemalloc.get_traced_memory()[1] < 8 * MiB
    finally:
        tracemalloc.stop()
        a.close()
        r.close()
    assert r.syncs == n


def _params(multifd: bool) -> tuple[MigrationParameters, MigrationCapabilities]:
    p = MigrationParameters()
    p.set({"max-bandwidth": 0, "multifd-channels": 2})
    c = MigrationCapabilities()
    c.set([{"capability": "multifd", "state": multifd}])
    return p, c


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real main stream from our source (no multifd) for a 4 MiB demo machine."""
    path = Path(tmp_path_factory.mktemp("stream")) / "s.bin"
    p, c = _params(False)
    m = build_demo_machine(4 * MiB, total_steps=10)
    src = MigrationSource(m, params=p, caps=c, profile=get_profile("qemu-10"))
    src.start(f"file:{path}")
    assert str(src.wait(30)) == "completed", src.error
    m.close()
    return path.read_bytes()


def _destination(multifd: bool = False, **kw: object) -> tuple[MigrationDestination, str]:
    p, c = _params(multifd)
    m = build_demo_machine(4 * MiB, populate=False)
    m.set_incoming()
    dst = MigrationDestination(m, params=p, caps=c, profile=get_profile("qemu-10"),
                               accept_timeout=5, **kw)  # type: ignore[arg-type]
    uri = dst.listen("tcp:127.0.0.1:0")
    return dst, uri


def _connect(uri: str) -> socket.socket:
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    return socket.create_connection((host, int(port)))


@pytest.mark.parametrize("length", [0xFFFFFFFF, 0x7FFFFFFF])
def test_never_ending_vmdesc(stream: bytes, length: int) -> None:
    """After EOF, a VMDESCRIPTION whose length is absurd and whose bytes never stop: the
    destination refuses the length at once instead of buffering the flood."""
    vm = stream.rindex(b"\x06")  # the trailer: 0x06 be32 len json
    assert stream[vm - 1] == 0  # ... right after QEMU_VM_EOF
    dst, uri = _destination()
    s = _connect(uri)
    stop = threading.Event()
    sent = [0]
    head = stream[:vm] + b"\x06" + struct.pack(">I", length)
    s.sendall(head)
    t = threading.Thread(target=_flood, args=(s, b"{" * 65536, stop, sent), daemon=True)
    t.start()
    try:
        assert str(dst.wait(10)) == "failed"
        assert "VMDESCRIPTION" in (dst.error or "")
    finally:
        stop.set()
        t.join(5)
        s.close()
        dst.machine.close()
    assert sent[0] < 256 * MiB


def test_truncated_stream_fails_cleanly(stream: bytes) -> None:
    dst, uri = _destination()
    s = _connect(uri)
    s.sendall(stream[: len(stream) // 2])
    s.close()
    assert str(dst.wait(10)) == "failed"
    assert dst.error and "\n" not in dst.error
    dst.machine.close()


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_decompression_bomb_is_bounded(method: str) -> None:
    """64 MiB of zeros compressed to a few KiB, declared as one page: refused after at
    most one page + 1 byte of output (compress/ bounds max_length before inflating)."""
    m = get_method(method)
    if method == "zlib":
        c = zlib.compressobj(1)
        bomb = c.compress(bytes(64 * MiB)) + c.flush(zlib.Z_SYNC_FLUSH)
    else:
        comp = m.new_compressor(level=1)
        bomb = b"".join(bytes(b) for b in comp.compress_packet([bytes(64 * MiB)]))
    assert len(bomb) < 1 * MiB
    out = np.zeros(4096, dtype=np.uint8)
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="more than 4096"):
            m.new_decompressor().decompress_packet(bomb, memoryview(out))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * MiB + len(bomb)


def _raw_multifd_source(uri: str, inits: list[bytes]) -> list[socket.socket]:
    main = _connect(uri)
    main.sendall(b"QEVM\x00\x00\x00\x03")  # classified as main by the qemu-10 peek
    socks = [main]
    for init in inits:
        c = _connect(uri)
        c.sendall(init)
        socks.append(c)
    return socks


@pytest.mark.parametrize(("inits", "text"), [
    ([InitPacket(bytes(16), 0).encode(), InitPacket(UUID, 1).encode()], "uuid"),
    ([InitPacket(UUID, 0).encode(), InitPacket(UUID, 7).encode()], "channel_id"),
    ([InitPacket(UUID, 1).encode(), InitPacket(UUID, 1).encode()], "connected twice"),
    ([InitPacket(UUID, 0).encode(), b"\x11\x22\x33\x44" + bytes(60)], "version"),
])
def test_destination_refuses_bad_channels(inits: list[bytes], text: str) -> None:
    """No TLS: a channel with another UUID, an id out of range or already used, or a bad
    init packet fails the incoming migration with a reason naming the field."""
    dst, uri = _destination(multifd=True, uuid=UUID)
    socks = _raw_multifd_source(uri, inits)
    try:
        assert str(dst.wait(10)) == "failed"
        assert text in (dst.error or ""), dst.error
    finally:
        for s in socks:
            s.close()
        dst.machine.close()


def test_destination_refuses_extra_connections() -> None:
    """Connections beyond 1 main + N multifd are closed unread; the listener then goes
    away, so later ones are refused by the kernel."""
    dst, uri = _destination(multifd=True, uuid=UUID)
    socks = _raw_multifd_source(uri, [InitPacket(UUID, 0).encode(),
                                      InitPacket(UUID, 1).encode()])
    extra = _raw_multifd_source(uri, [InitPacket(UUID, 1).encode()])[1:]
    try:
        for s in extra:
            s.settimeout(5)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
        time.sleep(0.2)
        with pytest.raises(OSError):
            _connect(uri).close()
    finally:
        for s in socks + extra:
            s.close()
        dst.cancel()
        dst.wait(10)
        dst.machine.close()
