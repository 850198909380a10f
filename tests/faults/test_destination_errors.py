"""The destination's error names the broken connection: deterministic versions of the
fault-matrix races (a scripted source on raw sockets, so nothing depends on timing): each
once a bug, fixed with the test that pins it.

Each test drives a `MigrationDestination` with a fake source that connects main (the
``QEVM`` file header only, so the loader then blocks reading main) and multifd channels
(valid init packets), and then breaks one connection.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from multifd.machine.demo import build_demo_machine
from multifd.migration.destination import MigrationDestination
from multifd.migration.profile import get_profile
from multifd.wire.packet import InitPacket
from tests.faults._cell import params

FILE_HEADER = b"QEVM" + struct.pack(">I", 3)

def _rst(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Dest:
    """A destination for 2 multifd channels on 127.0.0.1 and the fake source's sockets."""

    def __init__(self, profile: str, accept_timeout: float = 3.0) -> None:
        p, c = params()
        self.machine = build_demo_machine(1 << 20, populate=False)
        self.machine.set_incoming()
        self.dst = MigrationDestination(self.machine, params=p, caps=c,
                                        profile=get_profile(profile),
                                        accept_timeout=accept_timeout)
        _, host, port = self.dst.listen("tcp:127.0.0.1:0").rsplit(":", 2)
        self.addr = (host, int(port))
        self.socks: list[socket.socket] = []

    def connect(self, first_bytes: bytes) -> socket.socket:
        s = socket.create_connection(self.addr, timeout=5)
        self.socks.append(s)
        if first_bytes:
            s.sendall(first_bytes)
        return s

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.dst.cancel()
        self.dst.wait(10)
        self.machine.close()


@pytest.fixture
def dest(request: pytest.FixtureRequest) -> Iterator[_Dest]:
    d = _Dest(request.param)
    try:
        yield d
    finally:
        d.close()


def _init(channel_id: int) -> bytes:
    return InitPacket(uuid=bytes(16), channel_id=channel_id).encode()


@pytest.mark.parametrize("dest", ["qemu-7.2", "qemu-10"], indirect=True)
def test_reset_during_channel_setup_is_the_error(dest: _Dest) -> None:
    """Main and channel 0 (of 2) connect, then the source dies: the destination fails
    because of that reset, naming the connection, not by timing out on the missing
    channel 1 (qemu-10 may not have peeked them yet: then it names the connection by its
    accept order)."""
    main = dest.connect(FILE_HEADER)
    chan = dest.connect(_init(0))
    _rst(main)
    _rst(chan)
    assert str(dest.dst.wait(10)) == "failed"
    assert re.match(r"(the main channel|multifd connection 1|incoming connection [12] "
                    r"\(accept order\)) was reset by the source during channel set-up"
                    r".*\(Connection reset by peer\)", dest.dst.error or ""), dest.dst.error


@pytest.mark.parametrize("dest", ["qemu-7.2"], indirect=True)
def test_reset_before_init_packet_names_the_multifd_connection(dest: _Dest) -> None:
    """The second multifd connection is reset before its init packet (7.2 takes
    connections in order, so it is the one being read): the error says a multifd
    connection was reset, not just "[Errno 104] Connection reset by peer"."""
    dest.connect(FILE_HEADER)
    dest.connect(_init(0))
    _rst(dest.connect(b""))
    assert str(dest.dst.wait(10)) == "failed"
    err = dest.dst.error or ""
    assert "Connection reset by peer" in err, err  # what happened ...
    assert re.search(r"multifd (channel|connection)", err), err  # ... and to what
    assert err == ("multifd connection 2: reset by the source while reading its init "
                   "packet (Connection reset by peer)"), err


def _all_up(dest: _Dest) -> tuple[socket.socket, socket.socket]:
    """Main and both channels connected and taken: the destination is active, its loader
    blocked reading main (it has only the file header). Returns (main, channel 1)."""
    main = dest.connect(FILE_HEADER)
    dest.connect(_init(0))
    chan1 = dest.connect(_init(1))
    assert dest.dst.status.wait_for(["active"], 10) is not None, dest.dst.error
    return main, chan1


@pytest.mark.parametrize("dest", ["qemu-7.2", "qemu-10"], indirect=True)
def test_main_reset_while_loading_names_the_main_channel(dest: _Dest) -> None:
    """The source resets main while the loader reads it: the error says main was reset."""
    main, _ = _all_up(dest)
    _rst(main)
    assert str(dest.dst.wait(10)) == "failed"
    err = dest.dst.error or ""
    assert "Connection reset by peer" in err and "main channel" in err, err


@pytest.mark.parametrize("main_end", ["fin", "reset"])
@pytest.mark.parametrize("dest", ["qemu-7.2", "qemu-10"], indirect=True)
def test_channel_reset_while_loading_is_the_error(dest: _Dest, main_end: str) -> None:
    """Every channel is up and the loader waits on main; channel 1 is reset, and only
    after the destination has failed does the source drop main (close or reset). The error
    is channel 1's reset (the cause), not main's end (the fallout)."""
    main, chan1 = _all_up(dest)
    _rst(chan1)
    rcv = dest.dst.receiver
    assert rcv is not None
    deadline = time.monotonic() + 10
    while rcv.error is None:  # the channel thread has seen the reset
        assert time.monotonic() < deadline, "the receiver never noticed the reset"
        time.sleep(0.005)
    assert re.match(r"multifd channel 1 failed: ConnectionResetError", str(rcv.error))
    if main_end == "fin":  # the source gives up: a clean close of main ...
        main.close()
    else:  # ... or an abort (what ours does: SO_LINGER 0)
        _rst(main)
    assert str(dest.dst.wait(10)) == "failed"
    assert re.match(r"multifd channel 1 failed: ConnectionResetError", dest.dst.error or ""), \
        dest.dst.error
