"""Blocking socket helpers for the channel threads: gather-send and exact receive.

Private to the multifd core. `sendmsg_all` sends a list of buffers with as few
`sendmsg` calls as possible (batches of IOV_MAX, partial sends resumed without copying);
`recv_exact_into` / `recvmsg_exact_into` fill memoryviews completely or raise. They hold
no lock and release the GIL inside the socket calls; a `shutdown()` from another thread
makes any of them return (EOF or an OSError), which is how the core aborts.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Sequence

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


SEND_STALL_TIMEOUT_S = 5.0  # a sendmsg making no progress this long: dead/stalled peer


class SendStalled(TimeoutError):
    """The peer took no byte for `SEND_STALL_TIMEOUT_S`: it is dead or stopped reading."""


def send_some(sock: socket.socket, views: Sequence[memoryview],
              stall_timeout: float | None) -> int:
    """One gather send that waits at most `stall_timeout` s for buffer space.

    Non-blocking send + poll, so a peer that stops reading turns into `SendStalled`
    instead of a thread blocked forever (a shutdown() from another thread still wakes it).
    """
    if stall_timeout is None:
        return sock.sendmsg(views)
    while True:
        try:
            return sock.sendmsg(views, [], socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            pass
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        if not poller.poll(stall_timeout * 1000):
            raise SendStalled(f"peer stalled: no byte accepted for {stall_timeout:g} s "
                              "(dead or not reading)")


def sendmsg_all(sock: socket.socket, buffers: Sequence[object],
                stall_timeout: float | None = SEND_STALL_TIMEOUT_S) -> int:
    """Send every byte of `buffers` in order with gather `sendmsg`; returns the total.

    Raises `SendStalled` when no byte goes out for `stall_timeout` seconds (None: wait).
    """
    views = byte_views(buffers)
    n = len(views)
    i = 0
    total = 0
    while i < n:
        sent = send_some(sock, views[i : i + IOV_MAX], stall_timeout)
        total += sent
        while sent:
            size = len(views[i])
            if sent >= size:
                sent -= size
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0
    return total


def recv_exact_into(sock: socket.socket, view: memoryview, *, eof_ok: bool = False) -> bool:
    """Fill `view` completely. Returns False on EOF before the first byte if `eof_ok`.

    EOF anywhere else raises Truncated (the peer hung up in the middle of a record).
    """
    n = len(view)
    got = 0
    while got < n:
        # MSG_WAITALL: one syscall for the whole view unless a signal or EOF intervenes.
        r = sock.recv_into(view[got:] if got else view, n - got, socket.MSG_WAITALL)
        if r == 0:
            if got == 0 and eof_ok:
                return False
            raise Truncated("channel closed in the middle of a packet", field="bytes_missing",
                            value=n - got)
        got += r
    return True


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
