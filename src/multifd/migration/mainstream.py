"""The main migration channel's writer: QEMUFile's job in Python.

Small records (section headers, ZERO runs, commands) are collected and sent in one gather
call when the buffer fills or at a flush point (every sync marker, every section end), so
the main channel costs few syscalls. Bytes are counted for query-migrate and charged to
the rate limiter like QEMU charges its QEMUFile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

Buffer = bytes | bytearray | memoryview


class ByteCounter(Protocol):
    def add_main_bytes(self, n: int) -> None: ...


class MainStreamWriter:
    """Buffered writer over a `send(buffers)` callable (a socket's sendmsg, a pipe, a file)."""

    def __init__(
        self,
        send: Callable[[Sequence[Buffer]], None],
        *,
        on_bytes: Callable[[int], None] | None = None,
        buffer_size: int = 256 * 1024,
    ) -> None:
        self._send = send
        self._on_bytes = on_bytes
        self._parts: list[Buffer] = []
        self._pending = 0
        self._limit = buffer_size
        self.bytes_written = 0

    def write(self, data: Buffer) -> None:
        if not data:
            return
        self._parts.append(data)
        self._pending += len(data)
        if self._pending >= self._limit:
            self.flush()

    def flush(self) -> None:
        if not self._parts:
            return
        parts, n = self._parts, self._pending
        self._parts, self._pending = [], 0
        self._send(parts)
        self.bytes_written += n
        if self._on_bytes is not None:
            self._on_bytes(n)
