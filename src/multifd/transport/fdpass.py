"""Passing file descriptors over a unix stream socket (SCM_RIGHTS), message-exact.

Used by cpr-transfer (migration/cpr.py) to hand memfds to the new process at the head of
the main channel. The receiver reads exactly the message's bytes, never into the stream
that follows, and owns (and on any error closes) every fd it was given. The kernel
attaches the fds to the first byte of the message, so they come with the first recvmsg.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Callable, Sequence

from multifd.transport.sockets import ConnectionClosed, recv_exactly, recv_exactly_into

__all__ = ["recv_with_fds", "send_with_fds"]


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """Send `data` with `fds` attached (all of `data`, even if the first send is short)."""
    if sock.family != socket.AF_UNIX:
        raise ValueError("file descriptors can only pass over a unix: socket")
    sent = socket.send_fds(sock, [data], list(fds))
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_with_fds(sock: socket.socket, head: int, max_fds: int,
                  body_len: Callable[[bytes], int]) -> tuple[bytes, bytes, list[int]]:
    """Read a `head`-byte preamble with its fds, then `body_len(preamble)` more bytes.

    Returns (preamble, body, fds); the caller owns the fds. Too many fds (the kernel
    truncated them), EOF, or a body_len error close every fd received and raise.
    """
    fds: list[int] = []
    try:
        buf = bytearray(head)
        anc_space = socket.CMSG_SPACE(max_fds * array.array("i").itemsize)
        n, anc, flags, _ = sock.recvmsg_into([buf], anc_space, socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            raise ValueError(f"the peer passed more than {max_fds} file descriptors")
        if n == 0:
            raise ConnectionClosed(head, head, "CPR state")
        if n < head:
            recv_exactly_into(sock, memoryview(buf)[n:], "CPR state")
        preamble = bytes(buf)
        body = bytes(recv_exactly(sock, body_len(preamble), "CPR state"))
        return preamble, body, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
