"""Fixtures for the QMP tests: short unix socket paths and a raw line client."""

from __future__ import annotations

import json
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (tmp_path can exceed the 108-byte limit)."""
    with tempfile.TemporaryDirectory(prefix="qmp") as d:
        yield Path(d)


class RawClient:
    """A bare QMP line client, for protocol details the real clients hide."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, obj: Any) -> None:
        self.send_raw(json.dumps(obj).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "connection closed"
        return json.loads(line)

    def recv_reply(self) -> dict[str, Any]:
        """The next non-event message."""
        while True:
            msg = self.recv()
            if "event" not in msg:
                return msg

    def close(self) -> None:
        self.file.close()
        self.sock.close()
