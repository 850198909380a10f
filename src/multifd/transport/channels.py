"""Main + multifd connection set-up and ordering, per profile (qemu-reference.md §3.1).

Source (both profiles): connect the main socket and wait until the connect completes,
then connect the N multifd sockets to the same address. A QEMU 7.2 destination takes the
first connection it accepts as the main channel, so main must be fully connected first.
The caller writes the QEVM header / MultiFDInit_t packets.

Destination:
* ``qemu-7.2``: the first accepted connection is main, the next N are multifd.
* ``qemu-10``: each connection is classified by peeking its first 4 bytes (MSG_PEEK):
  ``QEVM`` (0x5145564D) = main, 0x11223344 = multifd, anything else is an error. Peeks run
  through one selector so a slow channel never blocks the classification of the others.
  With no multifd channels, the first connection is main (QEMU only peeks with multifd).

Every wait shares one deadline. Connections beyond the expected count are closed with an
error logged. Multifd sockets come back in accept order; their init packets tell the ids.
"""

from __future__ import annotations

import logging
import select
import selectors
import socket
import struct
import time
from typing import Any

from multifd.transport.sockets import Listener, connect
from multifd.transport.uri import TcpAddress, UnixAddress

__all__ = ["ChannelError", "accept_channels", "classify_magic", "connect_channels"]

log = logging.getLogger(__name__)

QEVM_MAGIC = 0x5145564D
MULTIFD_MAGIC = 0x11223344
_PEEK_PROFILES = {"qemu-7.2": False, "qemu-10": True}


class ChannelError(ConnectionError):
    """Channel set-up failed: wrong first bytes, a duplicate main, too few channels."""


def _peeks(profile: Any) -> bool:
    if isinstance(profile, str):
        try:
            return _PEEK_PROFILES[profile]
        except KeyError:
            raise ValueError(
                f"unknown profile {profile!r} (expected one of: {', '.join(_PEEK_PROFILES)})"
            ) from None
    return bool(profile.peek_channels)


def classify_magic(first4: bytes) -> str:
    """Return ``"main"`` or ``"multifd"`` for a connection's first 4 bytes, else raise."""
    (magic,) = struct.unpack(">I", first4)
    if magic == QEVM_MAGIC:
        return "main"
    if magic == MULTIFD_MAGIC:
        return "multifd"
    raise ChannelError(
        f"unknown channel: first bytes {first4.hex(' ')} ({first4!r}) are neither the main "
        f"stream magic 0x{QEVM_MAGIC:08X} ('QEVM') nor the multifd magic 0x{MULTIFD_MAGIC:08X}"
    )


def _check_count(n_multifd: int) -> None:
    if not 0 <= n_multifd <= 255:
        raise ValueError(f"n_multifd must be between 0 and 255, got {n_multifd}")


def connect_channels(
    addr: TcpAddress | UnixAddress, n_multifd: int, profile: Any, timeout: float
) -> tuple[socket.socket, list[socket.socket]]:
    """Connect main (completed first), then ``n_multifd`` multifd sockets, within ``timeout``."""
    _check_count(n_multifd)
    _peeks(profile)  # validates the profile name
    deadline = time.monotonic() + timeout
    main = connect(addr, timeout)
    chans: list[socket.socket] = []
    try:
        for i in range(n_multifd):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"connecting multifd channels to {addr}: {i} of {n_multifd} connected "
                    f"after {timeout:g} s"
                )
            chans.append(connect(addr, remaining))
    except BaseException:
        for s in chans:
            s.close()
        main.close()
        raise
    return main, chans


def accept_channels(
    listener: Listener, n_multifd: int, profile: Any, timeout: float
) -> tuple[socket.socket, list[socket.socket]]:
    """Accept main + ``n_multifd`` multifd connections per ``profile``, within ``timeout``."""
    _check_count(n_multifd)
    peek = _peeks(profile) and n_multifd > 0
    start = time.monotonic()
    deadline = start + timeout
    main: socket.socket | None = None
    multifd: list[tuple[int, socket.socket]] = []
    pending: dict[socket.socket, int] = {}  # accepted, first bytes not seen yet -> seq
    seq = 0

    def close_all() -> None:
        for s in [*pending, *(s for _, s in multifd), *([main] if main else [])]:
            s.close()

    with selectors.DefaultSelector() as sel:
        sel.register(listener.fileno(), selectors.EVENT_READ, None)
        try:
            while main is None or len(multifd) < n_multifd:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _timeout_error(main is not None, n_multifd, len(multifd), timeout)
                for key, _ in sel.select(remaining):
                    if key.data is None:
                        conn = listener.accept_nowait()
                        if conn is None:
                            continue
                        seq += 1
                        if not peek:
                            if main is None:
                                main = conn
                            elif len(multifd) < n_multifd:
                                multifd.append((seq, conn))
                            else:
                                _refuse(conn, "more connections than 1 main + "
                                        f"{n_multifd} multifd channels")
                            continue
                        pending[conn] = seq
                        sel.register(conn, selectors.EVENT_READ, seq)
                    else:
                        conn = key.fileobj
                        assert isinstance(conn, socket.socket)
                        kind = _peek_kind(conn)
                        if kind is None:
                            continue  # fewer than 4 bytes so far
                        sel.unregister(conn)
                        del pending[conn]
                        if kind == "main":
                            if main is None:
                                main = conn
                            else:
                                _refuse(conn, "a second main channel (QEVM)")
                        elif len(multifd) < n_multifd:
                            multifd.append((key.data, conn))
                        else:
                            _refuse(conn, f"more than {n_multifd} multifd channels")
        except BaseException:
            close_all()
            raise
    for conn in pending:
        _refuse(conn, "a connection beyond the expected channels")
    # Refuse connections already queued beyond the expected count.
    while (extra := listener.accept_nowait()) is not None:
        _refuse(extra, f"a connection beyond 1 main + {n_multifd} multifd channels")
    multifd.sort(key=lambda item: item[0])
    for _, conn in multifd:
        conn.setblocking(True)
    main.setblocking(True)
    return main, [conn for _, conn in multifd]


def _peek_kind(conn: socket.socket) -> str | None:
    try:
        head = conn.recv(4, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        raise ChannelError(f"reading the first bytes of an incoming channel failed: {exc}") from exc
    if not head:
        raise ChannelError("an incoming channel closed before sending its first 4 bytes")
    if len(head) < 4:
        if _peer_closed(conn):
            raise ChannelError(
                f"an incoming channel closed after sending only {len(head)} bytes "
                f"({head.hex(' ')}); its first 4 bytes never arrived"
            )
        # Stop polling a readable-but-short socket in a busy loop: wait briefly for the rest.
        time.sleep(0.001)
        return None
    return classify_magic(head)


def _peer_closed(conn: socket.socket) -> bool:
    """True when the peer shut down its side while unread bytes are still queued (Linux)."""
    rdhup = getattr(select, "POLLRDHUP", 0)
    if not rdhup:
        return False
    poller = select.poll()
    poller.register(conn, rdhup)
    return any(ev & rdhup for _, ev in poller.poll(0))


def _refuse(conn: socket.socket, why: str) -> None:
    try:
        peer = conn.getpeername()
    except OSError:
        peer = "?"
    log.error("refusing incoming migration connection from %s: %s", peer or "unix peer", why)
    conn.close()


def _timeout_error(have_main: bool, expected: int, got: int, timeout: float) -> TimeoutError:
    if not have_main:
        return TimeoutError(
            f"no main migration channel after {timeout:g} s "
            f"(multifd channels: expected {expected}, got {got})"
        )
    return TimeoutError(f"expected {expected} multifd channels, got {got} after {timeout:g} s")
