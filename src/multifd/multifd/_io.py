"""Blocking socket helpers for the channel threads: gather-send and exact receive.

`sendmsg_all` is the transport's (one implementation for the main stream and the
channels); `recv_exact_into` / `recvmsg_exact_into` fill memoryviews completely or raise
`Truncated` (a channel hanging up inside a packet is a stream error here). They hold
no lock and release the GIL inside the socket calls; a `shutdown()` from another thread
makes any of them return (EOF or an OSError), which is how the core aborts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from multifd.transport.sockets import SEND_STALL_TIMEOUT_S, SendStalled, send_views, sendmsg_all
from multifd.wire.errors import Truncated

try:
    IOV_MAX = max(16, int(os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
    IOV_MAX = 1024

Buffer = bytes | bytearray | memoryview


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


# One gather-send for every layer: the transport's (partial sends resumed without copying,
# IOV_MAX batches, `SendStalled` when the peer takes no byte for the stall timeout).
__all__ = ["SEND_STALL_TIMEOUT_S", "SendStalled", "byte_views", "recv_at_least_into",
           "recv_exact_into", "recvmsg_exact_into", "send_views", "sendmsg_all"]


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
