"""Stream sockets for migration: connect, listen/accept, exact receive, gather send.

Every socket is tuned the same way on both ends: TCP_NODELAY (headers and small records
must not wait for Nagle), keepalive with a short idle/interval so a dead peer fails the
migration in seconds instead of hours, and larger kernel buffers only where the system
allows more than the default (setting SO_RCVBUF below the autotuning ceiling would turn
Linux's autotuning off and slow loopback down). Every wait is bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import stat
import time
from typing import Any, Protocol

# The gather-send lives in the channel core, which sits below the transport and may not
# import it; re-exported here, its home for the main stream and the tools.
from multifd.multifd._io import (
    IOV_MAX,
    SEND_STALL_TIMEOUT_S,
    SendStalled,
    send_views,
    sendmsg_all,
)
from multifd.transport.uri import Address, TcpAddress, UnixAddress

__all__ = [
    "IOV_MAX",
    "SEND_STALL_TIMEOUT_S",
    "ConnectionClosed",
    "Listener",
    "SendStalled",
    "connect",
    "recv_exactly",
    "recv_exactly_into",
    "send_views",
    "sendmsg_all",
    "tune_socket",
]

_BUFFER_SIZE = 4 << 20
_KEEPIDLE_S = 3  # idle 3 s + 3 probes x 1 s: a silent dead peer is found in ~6 s (< 10 s)
_KEEPINTVL_S = 1
_KEEPCNT = 3


class ConnectionClosed(ConnectionError):
    """The peer closed the stream before a complete record arrived."""

    def __init__(self, missing: int, expected: int, what: str = "data") -> None:
        super().__init__(
            f"connection closed by peer: {missing} of {expected} bytes of {what} missing"
        )
        self.missing = missing
        self.expected = expected


class _Readable(Protocol):
    def recv_into(self, buffer: Any, nbytes: int = ..., flags: int = ...) -> int: ...


def _sysctl_max(name: str) -> int:
    try:
        with open(f"/proc/sys/net/core/{name}") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def tune_socket(sock: socket.socket) -> None:
    """Apply the migration socket options (best effort: options a family lacks are skipped)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_KEEPIDLE"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _KEEPIDLE_S)
            if hasattr(socket, "TCP_KEEPINTVL"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPINTVL_S)
            if hasattr(socket, "TCP_KEEPCNT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _KEEPCNT)
    # Only raise buffers where the kernel lets us go beyond its autotuning defaults.
    if _sysctl_max("wmem_max") >= _BUFFER_SIZE:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUFFER_SIZE)
    if _sysctl_max("rmem_max") >= _BUFFER_SIZE:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUFFER_SIZE)


def connect(addr: Address, timeout: float) -> socket.socket:
    """Connect a tuned, blocking stream socket to ``addr`` within ``timeout`` seconds."""
    if isinstance(addr, UnixAddress):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            tune_socket(sock)
            sock.settimeout(timeout)
            sock.connect(addr.path)
            sock.settimeout(None)
        except BaseException as exc:
            sock.close()
            raise _connect_error(addr, exc) from exc
        return sock
    if isinstance(addr, TcpAddress):
        deadline = time.monotonic() + timeout
        host = addr.host or "localhost"
        try:
            infos = socket.getaddrinfo(host, addr.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConnectionError(f"cannot resolve {host!r} for {addr}: {exc}") from exc
        last: BaseException | None = None
        for family, type_, proto, _, sockaddr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                tune_socket(sock)
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.connect(sockaddr)
                sock.settimeout(None)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
                if time.monotonic() >= deadline:
                    break
        raise _connect_error(addr, last or TimeoutError("no address to try")) from last
    raise TypeError(f"connect() needs a tcp: or unix: address, got {addr}")


def _connect_error(addr: Address, exc: BaseException) -> BaseException:
    if isinstance(exc, TimeoutError):
        return TimeoutError(f"connecting to {addr} timed out")
    if isinstance(exc, OSError):
        return ConnectionError(f"cannot connect to {addr}: {exc.strerror or exc}")
    return exc


class Listener:
    """A listening stream socket; ``address`` is the real bound address (port 0 resolved)."""

    def __init__(self, addr: TcpAddress | UnixAddress, backlog: int = 16) -> None:
        self._created_path: str | None = None
        self._created_ino: tuple[int, int] | None = None
        if isinstance(addr, UnixAddress):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                _remove_stale_socket(addr.path)
                sock.bind(addr.path)
                st = os.stat(addr.path)
                self._created_path = addr.path
                self._created_ino = (st.st_dev, st.st_ino)
                tune_socket(sock)
                sock.listen(backlog)
            except OSError as exc:
                sock.close()
                raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror or exc}") from exc
        elif isinstance(addr, TcpAddress):
            try:
                sock = self._tcp_socket(addr, backlog)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror or exc}") from exc
        else:
            raise TypeError(f"Listener needs a tcp: or unix: address, got {addr}")
        sock.setblocking(False)
        self._sock = sock
        self._requested = addr
        self._closed = False

    @staticmethod
    def _tcp_socket(addr: TcpAddress, backlog: int) -> socket.socket:
        if not addr.host and socket.has_dualstack_ipv6():
            sock = socket.create_server(
                ("", addr.port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=backlog
            )
        else:
            host = addr.host or "0.0.0.0"
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            if ":" not in host:
                with contextlib.suppress(socket.gaierror):
                    family = socket.getaddrinfo(host, addr.port, type=socket.SOCK_STREAM)[0][0]
            sock = socket.create_server((host, addr.port), family=family, backlog=backlog)
        # Set before accept so accepted sockets inherit the buffer sizes (window scaling).
        tune_socket(sock)
        return sock

    @property
    def address(self) -> TcpAddress | UnixAddress:
        if isinstance(self._requested, UnixAddress):
            return self._requested
        name = self._sock.getsockname()
        host = self._requested.host if self._requested.host else name[0]
        return TcpAddress(host, name[1])

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept_nowait(self) -> socket.socket | None:
        """Accept one pending connection (tuned, blocking) or return None when none is queued."""
        conn = accept_nowait(self._sock)
        if conn is not None:
            tune_socket(conn)
        return conn

    def accept(self, timeout: float | None) -> socket.socket:
        """Wait at most ``timeout`` seconds for a connection; raise `TimeoutError` after."""
        if self._closed:
            raise OSError(errno.EBADF, f"listener on {self._requested} is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if sel.select(remaining):
                    conn = self.accept_nowait()
                    if conn is not None:
                        return conn
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"no connection on {self.address} within {timeout:g} s"
                    )

    def close(self) -> None:
        """Close the socket and unlink the unix socket path this listener created."""
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        if self._created_path is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self._created_path)
                if (st.st_dev, st.st_ino) == self._created_ino:
                    os.unlink(self._created_path)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Listener({self.address})"


def _remove_stale_socket(path: str) -> None:
    """Remove an old socket file at ``path`` (as QEMU does); refuse to replace anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    os.unlink(path)


def accept_nowait(listener: socket.socket) -> socket.socket | None:
    """Accept one queued connection from a non-blocking listener as a blocking socket, or
    None when nothing is queued (or the client gave up before we got to it)."""
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
            return None
        raise
    conn.setblocking(True)
    return conn


def recv_exactly_into(sock: _Readable, view: Any, what: str = "data") -> None:
    """Fill ``view`` completely from ``sock``; EOF first raises `ConnectionClosed`."""
    mv = memoryview(view).cast("B")
    total = len(mv)
    got = 0
    real_socket = isinstance(sock, socket.socket)
    while got < total:
        if real_socket:
            n = sock.recv_into(mv[got:], total - got, socket.MSG_WAITALL)
        else:
            n = sock.recv_into(mv[got:])
        if n == 0:
            raise ConnectionClosed(total - got, total, what)
        got += n


def recv_exactly(sock: _Readable, n: int, what: str = "data") -> bytearray:
    """Read exactly ``n`` bytes (convenience for small records; hot paths use recv_exactly_into)."""
    buf = bytearray(n)
    recv_exactly_into(sock, buf, what)
    return buf
