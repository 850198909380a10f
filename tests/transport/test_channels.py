"""Connection ordering per profile: first-is-main (qemu-7.2) and peek-by-magic (qemu-10)."""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from multifd.transport.channels import (
    ChannelError,
    accept_channels,
    classify_magic,
    connect_channels,
)
from multifd.transport.sockets import Listener, connect, recv_exactly
from multifd.transport.uri import TcpAddress, UnixAddress

pytestmark = pytest.mark.timeout(60)

QEVM = struct.pack(">I", 0x5145564D)
MFD = struct.pack(">I", 0x11223344)


@pytest.fixture(params=["tcp", "unix"])
def listener(request: pytest.FixtureRequest, tmp_path: Path):
    addr = TcpAddress("127.0.0.1", 0) if request.param == "tcp" else UnixAddress(
        str(tmp_path / "m.sock"))
    with Listener(addr) as lst:
        yield lst


def _hello(kind: str, ident: int) -> bytes:
    return (QEVM if kind == "main" else MFD) + struct.pack(">I", ident)


def _assert_closed(sock: socket.socket) -> None:
    sock.settimeout(2)
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass


def test_classify_magic() -> None:
    assert classify_magic(QEVM) == "main"
    assert classify_magic(MFD) == "multifd"
    with pytest.raises(ChannelError, match=r"47 45 54 20 .*b'GET '"):
        classify_magic(b"GET ")


def test_qemu72_first_connection_is_main(listener: Listener) -> None:
    result: dict[str, object] = {}

    def dest() -> None:
        result["v"] = accept_channels(listener, 3, "qemu-7.2", timeout=5)

    t = threading.Thread(target=dest)
    t.start()
    main, chans = connect_channels(listener.address, 3, "qemu-7.2", timeout=5)
    # 7.2 has no peek: the multifd sockets may write first, main may stay silent.
    for i, c in enumerate(chans):
        c.sendall(_hello("multifd", i))
    main.sendall(_hello("main", 99))
    t.join(5)
    dmain, dchans = result["v"]  # type: ignore[misc]
    assert recv_exactly(dmain, 8) == _hello("main", 99)
    assert [bytes(recv_exactly(c, 8)) for c in dchans] == [_hello("multifd", i) for i in range(3)]
    for s in [main, *chans, dmain, *dchans]:
        s.close()


def _connect_in_order(
    addr: TcpAddress | UnixAddress, order: list[tuple[str, int]], delay: float = 0.02
) -> list[socket.socket]:
    socks = []
    for kind, ident in order:
        s = connect(addr, 5)
        s.sendall(_hello(kind, ident))
        socks.append(s)
        time.sleep(delay)  # make the accept order the connect order
    return socks


def test_qemu10_peek_with_shuffled_order(listener: Listener) -> None:
    order = [("multifd", 2), ("multifd", 0), ("main", 0), ("multifd", 3), ("multifd", 1)]
    result: dict[str, object] = {}
    t = threading.Thread(
        target=lambda: result.setdefault("v", accept_channels(listener, 4, "qemu-10", 5)))
    t.start()
    socks = _connect_in_order(listener.address, order)
    t.join(5)
    dmain, dchans = result["v"]  # type: ignore[misc]
    assert recv_exactly(dmain, 8) == _hello("main", 0)
    # Multifd sockets come back in accept order; the peeked bytes are still there.
    got = [bytes(recv_exactly(c, 8)) for c in dchans]
    assert got == [_hello("multifd", i) for i in (2, 0, 3, 1)]
    for c in [dmain, *dchans]:
        assert c.gettimeout() is None  # blocking again
    for s in [*socks, dmain, *dchans]:
        s.close()


def test_qemu10_slow_channel_does_not_block_others(listener: Listener) -> None:
    result: dict[str, object] = {}
    t = threading.Thread(
        target=lambda: result.setdefault("v", accept_channels(listener, 2, "qemu-10", 5)))
    t.start()
    addr = listener.address
    slow = connect(addr, 5)  # connected first, says its magic last, in two pieces
    others = _connect_in_order(addr, [("main", 0), ("multifd", 1)])
    slow.sendall(MFD[:2])
    time.sleep(0.05)
    slow.sendall(MFD[2:] + struct.pack(">I", 7))
    t.join(5)
    dmain, dchans = result["v"]  # type: ignore[misc]
    assert recv_exactly(dmain, 4) == QEVM
    assert [bytes(recv_exactly(c, 8)) for c in dchans] == [_hello("multifd", 7),
                                                          _hello("multifd", 1)]
    for s in [slow, *others, dmain, *dchans]:
        s.close()


def test_qemu10_garbage_first_bytes(listener: Listener) -> None:
    socks = _connect_in_order(listener.address, [("main", 0)])
    bad = connect(listener.address, 5)
    bad.sendall(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ChannelError) as info:
        accept_channels(listener, 2, "qemu-10", timeout=5)
    assert str(info.value) == (
        "connection 2 (accept order, qemu-10) does not start with the QEVM magic or the "
        "multifd magic 0x11223344: first bytes 0x47455420")
    for s in [*socks, bad]:
        s.close()


def test_qemu10_eof_before_magic(listener: Listener) -> None:
    s = connect(listener.address, 5)
    s.sendall(b"QE")
    s.close()
    with pytest.raises(ChannelError, match="closed after sending only 2 bytes"):
        accept_channels(listener, 1, "qemu-10", timeout=5)


def test_qemu10_eof_without_bytes(listener: Listener) -> None:
    connect(listener.address, 5).close()
    with pytest.raises(ChannelError, match="closed before sending its first 4 bytes"):
        accept_channels(listener, 1, "qemu-10", timeout=5)


def test_qemu10_extra_connections_refused(listener: Listener, caplog) -> None:
    order = [("main", 0), ("main", 1), ("multifd", 0), ("multifd", 1), ("multifd", 2)]
    socks = _connect_in_order(listener.address, order)
    with caplog.at_level(logging.ERROR, logger="multifd.transport.channels"):
        dmain, dchans = accept_channels(listener, 2, "qemu-10", timeout=5)
    assert recv_exactly(dmain, 8) == _hello("main", 0)
    assert [bytes(recv_exactly(c, 8)) for c in dchans] == [_hello("multifd", 0),
                                                          _hello("multifd", 1)]
    assert "second main channel" in caplog.text
    _assert_closed(socks[1])  # the refused one sees EOF (or a reset: its bytes went unread)
    for s in [*socks, dmain, *dchans]:
        s.close()


def test_qemu72_extra_queued_connections_refused(listener: Listener, caplog) -> None:
    socks = [connect(listener.address, 5) for _ in range(4)]
    time.sleep(0.05)
    with caplog.at_level(logging.ERROR, logger="multifd.transport.channels"):
        dmain, dchans = accept_channels(listener, 2, "qemu-7.2", timeout=5)
    assert len(dchans) == 2
    assert "refusing incoming migration connection" in caplog.text
    _assert_closed(socks[3])
    for s in [*socks, dmain, *dchans]:
        s.close()


@pytest.mark.parametrize("profile", ["qemu-7.2", "qemu-10"])
def test_timeout_names_counts(listener: Listener, profile: str) -> None:
    socks = _connect_in_order(listener.address, [("main", 0), ("multifd", 0)])
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"expected 3 multifd channels, got 1 after 0.3 s"):
        accept_channels(listener, 3, profile, timeout=0.3)
    assert time.monotonic() - t0 < 2
    for s in socks:
        s.close()


@pytest.mark.parametrize("profile", ["qemu-7.2", "qemu-10"])
def test_timeout_without_main(listener: Listener, profile: str) -> None:
    with pytest.raises(TimeoutError, match=r"no main migration channel after 0\.2 s"):
        accept_channels(listener, 2, profile, timeout=0.2)


def test_qemu10_silent_connection_times_out(listener: Listener) -> None:
    silent = connect(listener.address, 5)  # never sends its magic
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        accept_channels(listener, 1, "qemu-10", timeout=0.3)
    assert time.monotonic() - t0 < 2
    silent.close()


def test_no_multifd_channels_takes_first_as_main(listener: Listener) -> None:
    s = connect(listener.address, 5)  # no peek without multifd, even in qemu-10
    dmain, dchans = accept_channels(listener, 0, "qemu-10", timeout=5)
    assert dchans == []
    s.sendall(b"xyz")
    assert recv_exactly(dmain, 3) == b"xyz"
    s.close()
    dmain.close()


def test_connect_channels_main_is_accepted_first(listener: Listener) -> None:
    main, chans = connect_channels(listener.address, 2, "qemu-10", timeout=5)
    first = listener.accept(2)
    main.sendall(b"M")
    assert recv_exactly(first, 1) == b"M"
    for s in [main, *chans, first]:
        s.close()


def test_connect_channels_failure_closes_everything() -> None:
    with Listener(TcpAddress("127.0.0.1", 0)) as lst:
        addr = lst.address
    with pytest.raises(ConnectionError):
        connect_channels(addr, 2, "qemu-7.2", timeout=1)


def test_unknown_profile() -> None:
    with pytest.raises(ValueError, match="unknown profile 'qemu-9'"):
        connect_channels(TcpAddress("127.0.0.1", 1), 1, "qemu-9", timeout=1)


def test_profile_object_accepted(listener: Listener) -> None:
    from multifd.migration.profile import QEMU_10

    socks = _connect_in_order(listener.address, [("multifd", 0), ("main", 0)])
    dmain, dchans = accept_channels(listener, 1, QEMU_10, timeout=5)
    assert recv_exactly(dmain, 4) == QEVM
    for s in [*socks, dmain, *dchans]:
        s.close()


# -- a source that gives up during set-up: taken connections are watched -----------------

def _rst(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _in_thread(accept: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    """Run `accept` in a thread; `out` gets its result ("v") or error ("exc"), and the
    seconds it took ("s")."""
    out: dict[str, object] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            out["v"] = accept()
        except Exception as exc:
            out["exc"] = exc
        out["s"] = time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _accept_in_thread(listener: Listener, n: int,
                      profile: str) -> tuple[threading.Thread, dict[str, object]]:
    return _in_thread(lambda: accept_channels(listener, n, profile, 10))


@pytest.mark.parametrize("profile", ["qemu-7.2", "qemu-10"])
def test_reset_of_taken_connection_fails_at_once(profile: str) -> None:
    """Main and multifd channel 0 (of 2) connect with their first bytes, then the source
    resets channel 0: the set-up fails naming it, long before the 10 s accept timeout."""
    with Listener(TcpAddress("127.0.0.1", 0)) as lst:
        t, out = _accept_in_thread(lst, 2, profile)
        socks = _connect_in_order(lst.address, [("main", 0), ("multifd", 0)])
        _rst(socks[1])
        t.join(10)
        exc = out.get("exc")
        assert isinstance(exc, ChannelError), out
        # qemu-10 names it by accept order if the reset came before its peek
        assert re.fullmatch(r"(multifd connection 1|incoming connection 2 \(accept order\)) "
                            r"was reset by the source during channel set-up"
                            r"(, before its first 4 bytes arrived)? \(Connection reset by "
                            r"peer\)(, while waiting for 1 more multifd channel)?",
                            str(exc)), exc
        assert float(out["s"]) < 5  # type: ignore[arg-type]
        socks[0].close()


@pytest.mark.parametrize("profile", ["qemu-7.2", "qemu-10"])
def test_reset_of_main_fails_at_once(profile: str) -> None:
    with Listener(TcpAddress("127.0.0.1", 0)) as lst:
        t, out = _accept_in_thread(lst, 1, profile)
        (main,) = _connect_in_order(lst.address, [("main", 0)], delay=0.1)
        _rst(main)
        t.join(10)
        assert str(out.get("exc")) == (
            "the main channel was reset by the source during channel set-up (Connection "
            "reset by peer), while waiting for 1 more multifd channel"), out


def test_qemu72_taken_connection_closed_before_a_byte(listener: Listener) -> None:
    """7.2 takes connections by order, before any byte: one the source closes without
    sending anything fails the set-up at once (EOF, told apart from data by MSG_PEEK)."""
    t, out = _accept_in_thread(listener, 2, "qemu-7.2")
    connect(listener.address, 5).close()
    t.join(10)
    assert str(out.get("exc")) == (
        "the main channel was closed by the source during channel set-up, before sending a "
        "byte, while waiting for 2 more multifd channels"), out
    assert float(out["s"]) < 5  # type: ignore[arg-type]


@pytest.mark.parametrize("profile", ["qemu-7.2", "qemu-10"])
def test_taken_connection_ended_after_its_bytes_is_not_an_error(
        listener: Listener, profile: str) -> None:
    """A source may end a connection once it sent all it had (a finished source closes
    its channels): while the rest are awaited that is no failure, and the bytes are kept."""
    t, out = _accept_in_thread(listener, 2, profile)
    (main,) = _connect_in_order(listener.address, [("main", 7)])
    main.shutdown(socket.SHUT_WR)
    time.sleep(0.1)  # the accept loop sees the end while it still waits for the others
    chans = _connect_in_order(listener.address, [("multifd", 0), ("multifd", 1)])
    t.join(10)
    assert "v" in out, out
    dmain, dchans = out["v"]  # type: ignore[misc]
    assert recv_exactly(dmain, 8) == _hello("main", 7)
    dmain.settimeout(2)
    assert dmain.recv(1) == b""
    assert [bytes(recv_exactly(c, 8)) for c in dchans] == [_hello("multifd", 0),
                                                          _hello("multifd", 1)]
    for s in [main, *chans, dmain, *dchans]:
        s.close()


def test_tls_reset_of_taken_main_fails_at_once(tmp_path: Path) -> None:
    """Under TLS (channels by order): the source resets main after its handshake while the
    destination waits for the multifd connections."""
    from multifd.transport.tls import TlsConfig, accept_tls_channels, connect_tls
    from tests.security.certs import make_creds

    make_creds(tmp_path)
    tls = TlsConfig(tmp_path, "localhost")
    with Listener(TcpAddress("127.0.0.1", 0)) as lst:
        t, out = _in_thread(lambda: accept_tls_channels(lst, 2, tls, 10))
        main = connect_tls(lst.address, tls, 5)
        time.sleep(0.2)  # the server has finished its side of the handshake
        _rst(main)
        t.join(10)
        assert str(out.get("exc")) == (
            "the main channel was reset by the source during channel set-up (Connection "
            "reset by peer), while waiting for 2 more multifd channels"), out
        assert float(out["s"]) < 5  # type: ignore[arg-type]


# -- a first connection that is no migration source: its magic is checked on arrival -----

RANDOM = bytes.fromhex("8e2f61d0") + bytes(range(60))  # fixed "random" bytes, no magic
FIRST_BYTES = {"random": RANDOM, "bad magic": b"\x12\x34\x56\x78" + bytes(60),
               "truncated": b"QE"}


def _who(profile: str, seq: int = 1, role: str = "main") -> str:
    if profile == "qemu-7.2":
        return f"connection {seq} ({role} channel by order, qemu-7.2)"
    return f"connection {seq} (accept order, qemu-10)"


@pytest.mark.parametrize("profile", ["qemu-7.2", "qemu-10"])
@pytest.mark.parametrize("case", list(FIRST_BYTES))
def test_bad_first_connection_fails_at_once(listener: Listener, profile: str,
                                            case: str) -> None:
    """Random bytes, a wrong magic or a header cut short on the first connection fail the
    set-up at once, naming the connection and its bytes; qemu-7.2 used to hold it until
    the accept timeout (10 s here) waiting for the multifd channels."""
    t, out = _accept_in_thread(listener, 2, profile)
    s = connect(listener.address, 5)
    t0 = time.monotonic()
    s.sendall(FIRST_BYTES[case])
    if case == "truncated":
        s.shutdown(socket.SHUT_WR)
    t.join(10)
    took = time.monotonic() - t0
    if case == "truncated":
        want = (f"{_who(profile)} closed after sending only 2 bytes (0x5145): a truncated "
                "header, its 4-byte magic never arrived")
    elif profile == "qemu-7.2":
        want = (f"{_who(profile)} does not start with the QEVM magic: first bytes "
                f"0x{FIRST_BYTES[case][:4].hex()}")
    else:
        want = (f"{_who(profile)} does not start with the QEVM magic or the multifd magic "
                f"0x11223344: first bytes 0x{FIRST_BYTES[case][:4].hex()}")
    assert isinstance(out.get("exc"), ChannelError), out
    assert str(out["exc"]) == want
    assert took < 2, took
    s.close()


def test_qemu72_multifd_connection_with_wrong_magic(listener: Listener) -> None:
    """The second connection is a multifd channel by order: a QEVM there is refused."""
    t, out = _accept_in_thread(listener, 2, "qemu-7.2")
    socks = _connect_in_order(listener.address, [("main", 0), ("main", 1)])
    t.join(10)
    assert str(out.get("exc")) == (
        "connection 2 (multifd channel by order, qemu-7.2) does not start with the multifd "
        "magic 0x11223344: first bytes 0x5145564d"), out
    assert float(out["s"]) < 2  # type: ignore[arg-type]
    for s in socks:
        s.close()


def test_qemu72_wrong_magic_queued_before_accept(listener: Listener) -> None:
    """All connections already queued, main's bytes wrong: caught before handing over."""
    bad = connect(listener.address, 5)
    bad.sendall(b"\x12\x34\x56\x78")
    good = _connect_in_order(listener.address, [("multifd", 0)])
    time.sleep(0.05)
    with pytest.raises(ChannelError, match=r"^connection 1 \(main channel by order, "
                       r"qemu-7\.2\) does not start with the QEVM magic: first bytes "
                       r"0x12345678$"):
        accept_channels(listener, 1, "qemu-7.2", timeout=5)
    for s in [bad, *good]:
        s.close()


def test_qemu72_magic_in_pieces_is_kept(listener: Listener) -> None:
    """A magic that arrives in pieces is waited for, and the check consumes no byte."""
    t, out = _accept_in_thread(listener, 1, "qemu-7.2")
    main = connect(listener.address, 5)
    main.sendall(QEVM[:2])
    time.sleep(0.1)
    main.sendall(QEVM[2:] + struct.pack(">I", 5))
    (chan,) = _connect_in_order(listener.address, [("multifd", 3)])
    t.join(10)
    dmain, dchans = out["v"]  # type: ignore[misc]
    assert recv_exactly(dmain, 8) == _hello("main", 5)
    assert [bytes(recv_exactly(c, 8)) for c in dchans] == [_hello("multifd", 3)]
    for s in [main, chan, dmain, *dchans]:
        s.close()
