"""Listener/connect on TCP and unix sockets, exact receive, gather send."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from multifd.transport.sockets import (
    IOV_MAX,
    ConnectionClosed,
    Listener,
    connect,
    recv_exactly,
    recv_exactly_into,
    sendmsg_all,
)
from multifd.transport.uri import TcpAddress, UnixAddress, parse_uri

pytestmark = pytest.mark.timeout(60)


def test_tcp_listener_port_zero_and_connect() -> None:
    with Listener(TcpAddress("127.0.0.1", 0)) as lst:
        addr = lst.address
        assert isinstance(addr, TcpAddress)
        assert addr.host == "127.0.0.1" and addr.port > 0
        client = connect(addr, timeout=5)
        server = lst.accept(timeout=5)
        try:
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert client.gettimeout() is None and server.gettimeout() is None
            client.sendall(b"hello")
            assert recv_exactly(server, 5) == b"hello"
        finally:
            client.close()
            server.close()


def test_tcp_ipv6_listener() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    try:
        lst = Listener(parse_uri("tcp:[::1]:0"))  # type: ignore[arg-type]
    except OSError as exc:
        pytest.skip(f"::1 not configured: {exc}")
    with lst:
        assert str(lst.address).startswith("tcp:[::1]:")
        c = connect(lst.address, 5)
        s = lst.accept(5)
        c.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
        c.close()
        s.close()


def test_unix_listener_unlinks_its_path(tmp_path: Path) -> None:
    path = str(tmp_path / "mig.sock")
    lst = Listener(UnixAddress(path))
    assert os.path.exists(path)
    assert lst.address == UnixAddress(path)
    c = connect(UnixAddress(path), 5)
    s = lst.accept(5)
    c.sendall(b"abc")
    assert recv_exactly(s, 3) == b"abc"
    c.close()
    s.close()
    lst.close()
    assert not os.path.exists(path)
    lst.close()  # idempotent


def test_unix_listener_replaces_stale_socket_but_not_files(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    Listener(UnixAddress(path))._sock.close()  # leave the file behind, like a crash
    assert os.path.exists(path)
    with Listener(UnixAddress(path)):
        pass
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    with pytest.raises(OSError, match="not a socket"):
        Listener(UnixAddress(str(regular)))
    assert regular.read_text() == "keep me"


def test_accept_timeout_is_bounded() -> None:
    with Listener(TcpAddress("127.0.0.1", 0)) as lst:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="no connection"):
            lst.accept(timeout=0.2)
        assert time.monotonic() - t0 < 2


def test_connect_refused_names_address() -> None:
    with Listener(TcpAddress("127.0.0.1", 0)) as lst:
        addr = lst.address
    with pytest.raises(ConnectionError, match=str(addr)):
        connect(addr, timeout=2)


def test_connect_unix_missing(tmp_path: Path) -> None:
    with pytest.raises(ConnectionError, match="cannot connect to unix:"):
        connect(UnixAddress(str(tmp_path / "nope")), timeout=1)


def test_recv_exactly_into_eof_names_missing_bytes() -> None:
    a, b = socket.socketpair()
    a.sendall(b"12345")
    a.close()
    buf = bytearray(12)
    with pytest.raises(ConnectionClosed) as info:
        recv_exactly_into(b, buf, what="MultiFDInit_t")
    assert info.value.missing == 7 and info.value.expected == 12
    assert "7 of 12 bytes of MultiFDInit_t missing" in str(info.value)
    assert bytes(buf[:5]) == b"12345"
    b.close()


def test_recv_exactly_into_assembles_pieces() -> None:
    a, b = socket.socketpair()
    payload = random.Random(127).randbytes(100_000)  # seeded: a failure reproduces

    def writer() -> None:
        for i in range(0, len(payload), 777):
            a.sendall(payload[i : i + 777])

    t = threading.Thread(target=writer)
    t.start()
    buf = bytearray(len(payload))
    recv_exactly_into(b, memoryview(buf))
    t.join()
    assert buf == payload
    a.close()
    b.close()


def _small_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return a, b


def _drain(sock: socket.socket, n: int, out: bytearray) -> None:
    view = memoryview(out)
    got = 0
    while got < n:
        # Small reads force the sender into many partial sendmsg calls.
        k = sock.recv_into(view[got:], min(1000, n - got))
        assert k
        got += k


class _CountingSock:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls: list[int] = []
        self.partial = 0

    def sendmsg(self, buffers: list[memoryview]) -> int:
        assert len(buffers) <= IOV_MAX
        self.calls.append(len(buffers))
        n = self.sock.sendmsg(buffers)
        if n < sum(len(b) for b in buffers):
            self.partial += 1
        return n


def test_sendmsg_all_many_buffers_with_partial_sends() -> None:
    a, b = _small_pair()
    bufs: list[bytes | bytearray | memoryview] = []
    for i in range(3000):  # > IOV_MAX buffers, mixed types and sizes, some empty
        size = (i * 37) % 300
        data = bytes((i + j) & 0xFF for j in range(size))
        bufs.append(memoryview(data) if i % 3 == 0 else (bytearray(data) if i % 3 == 1 else data))
    expected = b"".join(bytes(x) for x in bufs)
    out = bytearray(len(expected))
    t = threading.Thread(target=_drain, args=(b, len(expected), out))
    t.start()
    wrapped = _CountingSock(a)
    assert sendmsg_all(wrapped, bufs) == len(expected)
    t.join(10)
    assert out == expected
    assert max(wrapped.calls) <= IOV_MAX
    assert len(wrapped.calls) >= 3
    a.close()
    b.close()


class _TrickleSock:
    """Takes at most a few bytes per call, like a kernel with a full send buffer."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.calls = 0
        self.step = 1

    def sendmsg(self, buffers: list[memoryview]) -> int:
        assert 0 < len(buffers) <= IOV_MAX
        assert all(isinstance(b, memoryview) for b in buffers)
        self.calls += 1
        self.step = self.step * 7 % 1013 + 1
        budget = self.step
        taken = 0
        for buf in buffers:
            k = min(len(buf), budget - taken)
            self.data += buf[:k]
            taken += k
            if taken == budget:
                break
        return taken


def test_sendmsg_all_resumes_partial_sends_exactly() -> None:
    bufs = [bytes([i & 0xFF]) * ((i * 13) % 50) for i in range(2500)]
    fake = _TrickleSock()
    expected = b"".join(bufs)
    assert sendmsg_all(fake, bufs) == len(expected)
    assert fake.data == expected
    assert fake.calls > 100  # many partial sends were resumed


def test_sendmsg_all_numpy_page_views() -> None:
    import numpy as np
    a, b = _small_pair()
    ram = np.arange(64 * 4096 // 8, dtype=np.uint64)
    pages = [memoryview(ram)[i * 512 : (i + 1) * 512] for i in range(0, 64, 2)]
    expected = b"".join(p.tobytes() for p in pages)
    out = bytearray(len(expected) + 3)
    t = threading.Thread(target=_drain, args=(b, len(expected) + 3, out))
    t.start()
    assert sendmsg_all(a, [b"HDR", *pages]) == len(expected) + 3
    t.join(10)
    assert out[:3] == b"HDR" and out[3:] == expected
    a.close()
    b.close()


def test_sendmsg_all_empty() -> None:
    a, b = socket.socketpair()
    assert sendmsg_all(a, []) == 0
    assert sendmsg_all(a, [b"", bytearray()]) == 0
    a.close()
    b.close()
