"""Main + multifd connection set-up and ordering, per profile (qemu-reference.md §3.1).

Source (both profiles): connect the main socket and wait until the connect completes,
then connect the N multifd sockets to the same address. A QEMU 7.2 destination takes the
first connection it accepts as the main channel, so main must be fully connected first.
The caller writes the QEVM header / MultiFDInit_t packets.

Destination:
* ``qemu-7.2``: the first accepted connection is main, the next N are multifd. Each is
  taken as it is accepted (a 7.2 source may keep main silent until its channels are up),
  and its first 4 bytes are checked against its role's magic as soon as they arrive.
* ``qemu-10``: each connection is classified by peeking its first 4 bytes (MSG_PEEK):
  ``QEVM`` (0x5145564D) = main, 0x11223344 = multifd, anything else is an error. Peeks run
  through one selector so a slow channel never blocks the classification of the others.
  With no multifd channels, the first connection is main (QEMU only peeks with multifd).

Every wait shares one deadline. Connections beyond the expected count are closed with an
error logged. Multifd sockets come back in accept order; their init packets tell the ids.
While it waits for the rest, the connections already taken are watched (`SetupWatch`): a
source that resets one, or closes one before sending a byte, has given up, and the set-up
fails at once naming that connection instead of timing out on the missing channels; so
does a 7.2 connection whose first bytes are not its role's magic, or that closes after
fewer than 4 bytes.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from multifd.transport.sockets import Listener, connect
from multifd.transport.uri import TcpAddress, UnixAddress

__all__ = ["ChannelError", "SetupWatch", "accept_channels", "classify_magic",
           "connect_channels"]

log = logging.getLogger(__name__)

QEVM_MAGIC = 0x5145564D
MULTIFD_MAGIC = 0x11223344
_QEVM = struct.pack(">I", QEVM_MAGIC)
_MULTIFD = struct.pack(">I", MULTIFD_MAGIC)
_PEEK_PROFILES = {"qemu-7.2": False, "qemu-10": True}
_RDHUP = getattr(select, "POLLRDHUP", 0)  # Linux: the peer shut down its sending side
_WAKE_S = 0.25  # longest single poll: a listener closed by another thread (cancel) is seen


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


class SetupWatch:
    """Polls a listener and the connections an accept loop has already taken.

    Why: while the loop waits for the remaining channels, a source that resets a taken
    connection, or closes it before sending a byte, has given up on the migration; waiting
    on until the accept timeout would report the missing channels instead of that cause.
    A taken connection's bytes are never consumed: data arriving on it is normal, so only
    POLLRDHUP / POLLERR / POLLHUP wake the loop for it (and POLLIN until its magic, when
    it was taken with one, has been checked), and an EOF is told apart from queued data
    with MSG_PEEK. A connection the source ended after sending its first bytes
    is not a failure by itself (a finished source closes its channels; whoever reads those
    bytes finds out whether they are whole): it stops being watched for that.
    """

    def __init__(self, listener: Listener, waiting_for: Callable[[], str]) -> None:
        self._listener = listener
        self._waiting_for = waiting_for  # e.g. "1 more multifd channel", for the error
        self._listen_fd = listener.fileno()
        self._poll = select.poll()
        self._poll.register(self._listen_fd, select.POLLIN)
        self._taken: dict[int, tuple[socket.socket, Callable[[], str]]] = {}
        self._magic: dict[int, tuple[bytes, str]] = {}  # fd -> (expected, who): unchecked

    def register(self, conn: socket.socket, events: int) -> None:
        """Poll `conn` (not taken yet, e.g. waiting to be peeked) for `events` too."""
        self._poll.register(conn, events)

    def unregister(self, conn: socket.socket) -> None:
        self._poll.unregister(conn)

    def take(self, conn: socket.socket, label: Callable[[], str],
             magic: bytes = b"", who: str = "") -> None:
        """Watch `conn` until the loop ends; `label()` names it in the error.

        With `magic` (taken by order, unpeeked), its first bytes are checked against it as
        soon as they arrive: a wrong magic or a truncated one fails at once, naming `who`,
        instead of holding the set-up until the accept timeout."""
        fd = conn.fileno()
        if magic:
            self._magic[fd] = (magic, who)
        self._poll.register(conn, _RDHUP | (select.POLLIN if magic else 0))
        self._taken[fd] = (conn, label)

    def check_arrived(self) -> None:
        """Check the magics already here before the loop hands its connections over (all
        may have been queued at once); ends, resets and magics yet to come are left to
        whoever reads the connections next, as before."""
        if self._magic:
            for fd, ev in self._poll.poll(0):
                if fd in self._magic:
                    self._check_magic(fd, self._taken[fd][0], ev)

    def wait(self, timeout: float) -> list[tuple[int, int]]:
        """Wait up to `timeout` s (at most `_WAKE_S`); returns the (fd, events) of the
        listener and the registered connections. Raises ChannelError when the source
        reset or closed a taken connection, OSError when the listener was closed."""
        if self._listener.fileno() < 0:
            raise OSError(errno.EBADF, "the migration listener was closed during set-up")
        events = dict(self._poll.poll(math.ceil(min(timeout, _WAKE_S) * 1000)))
        if events.get(self._listen_fd, 0) & select.POLLNVAL:
            raise OSError(errno.EBADF, "the migration listener was closed during set-up")
        for fd, (conn, label) in list(self._taken.items()):  # in taking order: main first
            ev = events.pop(fd, 0)
            if ev and fd in self._magic:
                self._check_magic(fd, conn, ev)
                if not ev & ~select.POLLIN:
                    continue  # data only: nothing for _lost to look at
            why = self._lost(fd, conn, ev) if ev else None
            if why is not None:
                what, detail = why
                raise ChannelError(f"{label()} {what} during channel set-up{detail}, while "
                                   f"waiting for {self._waiting_for()}")
        return list(events.items())

    def _check_magic(self, fd: int, conn: socket.socket, ev: int) -> None:
        """Compare taken connection `conn`'s first bytes with its magic, without consuming
        them; errors, resets and an EOF before any byte are left to `_lost`."""
        if ev & (select.POLLNVAL | select.POLLERR):
            return
        try:
            head = socket.socket.recv(conn, 4, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            return
        if not head:
            return
        magic, who = self._magic[fd]
        if len(head) < 4:
            if ev & (select.POLLHUP | _RDHUP):
                raise ChannelError(_truncated(who, head))
            time.sleep(0.001)  # level-triggered: wait briefly for the rest
            return
        if head != magic:
            name = "the QEVM magic" if magic == _QEVM else f"the multifd magic 0x{magic.hex()}"
            raise ChannelError(f"{who} does not start with {name}: first bytes 0x{head.hex()}")
        del self._magic[fd]
        self._poll.modify(fd, _RDHUP)

    def _lost(self, fd: int, conn: socket.socket, ev: int) -> tuple[str, str] | None:
        """What the source did to taken connection `conn`, and how (None: nothing fatal)."""
        if ev & select.POLLNVAL:  # closed under us: nothing left to watch
            self._forget(fd)
            return None
        if ev & select.POLLERR:
            err = conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return _failed(err)
        try:  # the raw transport, also under TLS (whose own recv never peeks)
            head = socket.socket.recv(conn, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return _failed(exc.errno or 0, exc)
        pending = getattr(conn, "pending", None)  # TLS: plaintext already decrypted
        if not head and not (pending is not None and pending()):
            return "was closed by the source", ", before sending a byte"
        # Ended after its first bytes: level-triggered, so stop asking about the end.
        if ev & select.POLLHUP:
            self._forget(fd)
        else:
            self._poll.modify(fd, 0)  # a later reset still reports POLLERR/POLLHUP
        return None

    def _forget(self, fd: int) -> None:
        del self._taken[fd]
        self._magic.pop(fd, None)
        try:
            self._poll.unregister(fd)
        except KeyError:
            pass


def _truncated(who: str, head: bytes) -> str:
    n = len(head)
    return (f"{who} closed after sending only {n} byte{'s' if n > 1 else ''} "
            f"(0x{head.hex()}): a truncated header, its 4-byte magic never arrived")


def _failed(err: int, exc: OSError | None = None) -> tuple[str, str]:
    text = f" ({os.strerror(err) if err else exc})"
    return ("was reset by the source", text) if err == errno.ECONNRESET else ("failed", text)


def _waiting_text(need_main: bool, missing: int) -> str:
    parts = ["the main channel"] if need_main else []
    if missing:
        parts.append(f"{missing} more multifd channel{'s' if missing > 1 else ''}")
    return " and ".join(parts) or "nothing"


def accept_channels(
    listener: Listener, n_multifd: int, profile: Any, timeout: float
) -> tuple[socket.socket, list[socket.socket]]:
    """Accept main + ``n_multifd`` multifd connections per ``profile``, within ``timeout``.

    Taken connections are watched while the rest are awaited (`SetupWatch`); "multifd
    connection N" in its errors counts multifd connections from 1 in accept order (their
    ids are in init packets nobody has read yet)."""
    _check_count(n_multifd)
    peek = _peeks(profile) and n_multifd > 0
    start = time.monotonic()
    deadline = start + timeout
    main: socket.socket | None = None
    multifd: list[tuple[int, socket.socket]] = []
    pending: dict[int, tuple[socket.socket, int]] = {}  # fd -> (conn, seq): not peeked yet
    seq = 0

    def close_all() -> None:
        for s in [*(c for c, _ in pending.values()), *(s for _, s in multifd),
                  *([main] if main else [])]:
            s.close()

    def multifd_label(s: int) -> Callable[[], str]:
        # by accept order among the multifd connections known when the error is raised
        return lambda: f"multifd connection {1 + sum(q < s for q, _ in multifd)}"

    watch = SetupWatch(listener, lambda: _waiting_text(main is None,
                                                       n_multifd - len(multifd)))
    listen_fd = listener.fileno()
    try:
        while main is None or len(multifd) < n_multifd:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timeout_error(main is not None, n_multifd, len(multifd), timeout)
            for fd, _ in watch.wait(remaining):
                if fd == listen_fd:
                    conn = listener.accept_nowait()
                    if conn is None:
                        continue
                    seq += 1
                    if not peek:
                        if main is None:
                            main = conn
                            watch.take(conn, lambda: "the main channel", _QEVM,
                                       _by_order(seq, "main"))
                        elif len(multifd) < n_multifd:
                            multifd.append((seq, conn))
                            watch.take(conn, multifd_label(seq), _MULTIFD,
                                       _by_order(seq, "multifd"))
                        else:
                            _refuse(conn, "more connections than 1 main + "
                                    f"{n_multifd} multifd channels")
                        continue
                    pending[conn.fileno()] = (conn, seq)
                    watch.register(conn, select.POLLIN)
                elif fd in pending:
                    conn, cseq = pending[fd]
                    kind = _peek_kind(conn, cseq)
                    if kind is None:
                        continue  # fewer than 4 bytes so far
                    watch.unregister(conn)
                    del pending[fd]
                    if kind == "main":
                        if main is None:
                            main = conn
                            watch.take(conn, lambda: "the main channel")
                        else:
                            _refuse(conn, "a second main channel (QEVM)")
                    elif len(multifd) < n_multifd:
                        multifd.append((cseq, conn))
                        watch.take(conn, multifd_label(cseq))
                    else:
                        _refuse(conn, f"more than {n_multifd} multifd channels")
        watch.check_arrived()
    except BaseException:
        close_all()
        raise
    for conn, _ in pending.values():
        _refuse(conn, "a connection beyond the expected channels")
    # Refuse connections already queued beyond the expected count.
    while (extra := listener.accept_nowait()) is not None:
        _refuse(extra, f"a connection beyond 1 main + {n_multifd} multifd channels")
    multifd.sort(key=lambda item: item[0])
    for _, conn in multifd:
        conn.setblocking(True)
    main.setblocking(True)
    return main, [conn for _, conn in multifd]


def _by_order(seq: int, role: str) -> str:
    return f"connection {seq} ({role} channel by order, qemu-7.2)"


def _peek_kind(conn: socket.socket, seq: int) -> str | None:
    try:
        head = conn.recv(4, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        if exc.errno == errno.ECONNRESET:
            raise ChannelError(
                f"incoming connection {seq} (accept order) was reset by the source during "
                f"channel set-up, before its first 4 bytes arrived ({exc.strerror})"
            ) from exc
        raise ChannelError(f"reading the first bytes of incoming connection {seq} (accept "
                           f"order) failed: {exc}") from exc
    who = f"connection {seq} (accept order, qemu-10)"
    if not head:
        raise ChannelError("an incoming channel closed before sending its first 4 bytes "
                           f"(connection {seq} by accept order, qemu-10)")
    if len(head) < 4:
        if _peer_closed(conn):
            raise ChannelError(_truncated(who, head))
        # Stop polling a readable-but-short socket in a busy loop: wait briefly for the rest.
        time.sleep(0.001)
        return None
    if head not in (_QEVM, _MULTIFD):
        raise ChannelError(f"{who} does not start with the QEVM magic or the multifd magic "
                           f"0x{_MULTIFD.hex()}: first bytes 0x{head.hex()}")
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
