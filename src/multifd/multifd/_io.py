"""Blocking socket primitives for the channel threads and the transport: gather-send
and exact receive.

They live in the core so that it depends on nothing above it; `multifd.transport.sockets`
re-exports the send side (one implementation for the main stream and the channels).
`sendmsg_all` / `send_views` resume partial sends without copying and raise `SendStalled`
when the peer takes no byte for the stall timeout; `recv_exact_into` /
`recvmsg_exact_into` fill memoryviews completely or raise `Truncated` (a channel hanging
up inside a packet is a stream error here). They hold no lock and release the GIL inside
the socket calls; a `shutdown()` from another thread makes any of them return (EOF or an
OSError), which is how the core aborts.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from multifd.wire.errors import Truncated

__all__ = ["IOV_MAX", "SEND_STALL_TIMEOUT_S", "SendStalled", "byte_views",
           "recv_at_least_into", "recv_exact_into", "recvmsg_exact_into", "send_views",
           "sendmsg_all"]

try:  # Linux: UIO_MAXIOV (1024), the most buffers one sendmsg/recvmsg accepts
    IOV_MAX = max(16, int(os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
    IOV_MAX = 1024

SEND_STALL_TIMEOUT_S = 5.0  # a send making no progress this long means a dead/stalled peer

Buffer = bytes | bytearray | memoryview


class SendStalled(TimeoutError):
    """The peer accepted no byte for the stall timeout: it is dead or stopped reading."""


class _Writable(Protocol):
    def sendmsg(self, buffers: Iterable[Any], /) -> int: ...


def byte_views(buffers: Sequence[object]) -> list[memoryview]:
    """1-D unsigned-byte views of `buffers` (numpy blocks and memoryviews alike)."""
    out: list[memoryview] = []
    for b in buffers:
        v = b if isinstance(b, memoryview) else memoryview(b)  # type: ignore[arg-type]
        if v.format != "B" or v.ndim != 1:
            v = v.cast("B")
        if v.nbytes:
            out.append(v)
    return out


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` completely; EOF first raises Truncated (the peer hung up in the middle
    of a record)."""
    n = len(view)
    got = 0
    while got < n:
        # MSG_WAITALL: one syscall for the whole view unless a signal or EOF intervenes.
        r = sock.recv_into(view[got:] if got else view, n - got, socket.MSG_WAITALL)
        if r == 0:
            raise Truncated("channel closed in the middle of a packet", field="bytes_missing",
                            value=n - got)
        got += r


def recv_at_least_into(sock: socket.socket, view: memoryview, need: int) -> int:
    """Read into `view` until at least `need` bytes are in (more if they are there already,
    up to len(view)); returns the count, 0 on EOF before the first byte.

    A packet's kind is known from its first bytes while its header may be longer: this
    reads whatever is there in one call (usually the whole header) without waiting for
    bytes a malformed packet may never send.
    """
    got = 0
    n = len(view)
    while got < need:
        r = sock.recv_into(view[got:] if got else view, n - got)
        if r == 0:
            if got == 0:
                return 0
            raise Truncated("channel closed in the middle of a packet", field="bytes_missing",
                            value=need - got)
        got += r
    return got


def recvmsg_exact_into(sock: socket.socket, views: list[memoryview]) -> None:
    """Scatter-receive until every view is full (views are consumed; pass a fresh list)."""
    if len(views) == 1:
        recv_exact_into(sock, views[0])
        return
    i = 0
    n = len(views)
    while i < n:
        r = sock.recvmsg_into(views[i : i + IOV_MAX])[0]
        if r == 0:
            missing = sum(len(v) for v in views[i:])
            raise Truncated("channel closed in the middle of a packet", field="bytes_missing",
                            value=missing)
        while r:
            size = len(views[i])
            if r >= size:
                r -= size
                i += 1
            else:
                views[i] = views[i][r:]
                r = 0


def _send_batch(sock: _Writable, batch: list[memoryview], stall_timeout: float | None) -> int:
    """One ``sendmsg``; on a real socket wait at most ``stall_timeout`` s for buffer space."""
    if stall_timeout is None or not isinstance(sock, socket.socket):
        return sock.sendmsg(batch)
    while True:
        try:
            return sock.sendmsg(batch, [], socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            pass
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        if not poller.poll(stall_timeout * 1000):
            raise SendStalled(f"peer stalled: no byte accepted for {stall_timeout:g} s "
                              "(dead or not reading)")


def sendmsg_all(sock: _Writable, buffers: Sequence[Any],
                stall_timeout: float | None = SEND_STALL_TIMEOUT_S) -> int:
    """Gather-send every buffer in order, resuming after partial sends without copying.

    At most IOV_MAX buffers go into one ``sendmsg`` call. Returns the bytes sent. On a
    socket, no progress for ``stall_timeout`` seconds raises `SendStalled` (None: no limit).
    """
    return send_views(sock, [mv for mv in (memoryview(b).cast("B") for b in buffers)
                             if len(mv)], stall_timeout)


def send_views(sock: _Writable, views: list[memoryview],
               stall_timeout: float | None = SEND_STALL_TIMEOUT_S) -> int:
    """`sendmsg_all` of non-empty 1-D byte memoryviews (consumed: pass a fresh list),
    for callers that hold them already (the multifd channels, once per batch)."""
    total = 0
    i = 0
    count = len(views)
    while i < count:
        batch = views[i : i + IOV_MAX]
        sent = _send_batch(sock, batch, stall_timeout)
        total += sent
        # Advance past fully-sent buffers, slice the partly-sent one in place.
        while sent:
            head = views[i]
            if sent >= len(head):
                sent -= len(head)
                i += 1
            else:
                views[i] = head[sent:]
                sent = 0
    return total
