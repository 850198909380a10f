"""Single-stream transports: ``exec:`` pipes, ``file:`` and ``fd:``, plus `open_stream`.

Every stream here has the small interface the migration code needs from a socket:
``sendall``, ``sendmsg`` (so `sockets.sendmsg_all` works unchanged), ``recv_into``,
``fileno`` and ``close``. The source opens with mode ``"w"`` (we write the migration
stream), the destination with ``"r"``. ``exec:`` runs ``sh -c CMD`` like QEMU: the source
writes to its stdin, the destination reads its stdout; closing waits for the command and
reports a non-zero exit, because a failed ``exec:`` command means a lost stream.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
from collections.abc import Iterable
from typing import Any, Literal, Protocol

from multifd.transport.sockets import IOV_MAX, Listener, connect
from multifd.transport.uri import (
    Address,
    ExecCommand,
    FdAddress,
    FileAddress,
    TcpAddress,
    UnixAddress,
)

__all__ = ["ExecFailed", "FdStream", "FileStream", "ProcessStream", "Stream", "open_stream"]

Mode = Literal["r", "w"]


class Stream(Protocol):
    """What the migration code uses from any single-stream transport."""

    def sendall(self, data: Any, /) -> None: ...
    def sendmsg(self, buffers: Iterable[Any], /) -> int: ...
    def recv_into(self, buffer: Any, nbytes: int = ..., flags: int = ...) -> int: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...


class ExecFailed(OSError):
    """The ``exec:`` command exited with a non-zero status (or could not be waited for)."""


class _FdIO:
    """Blocking reads/writes on one file descriptor, with the socket-like method names."""

    _fd: int
    _mode: Mode
    _name: str

    def fileno(self) -> int:
        return self._fd

    def _check(self, mode: Mode) -> None:
        if self._fd < 0:
            raise OSError(f"{self._name} is closed")
        if self._mode != mode:
            op = "written" if mode == "w" else "read"
            raise OSError(f"{self._name} was opened for {_MODE_WORD[self._mode]}; cannot be {op}")

    def sendmsg(self, buffers: Iterable[Any], /) -> int:
        self._check("w")
        bufs = list(buffers)[:IOV_MAX]
        return os.writev(self._fd, bufs) if bufs else 0

    def sendall(self, data: Any, /) -> None:
        self._check("w")
        mv = memoryview(data).cast("B")
        while mv:
            n = os.write(self._fd, mv)
            mv = mv[n:]

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._check("r")
        mv = memoryview(buffer).cast("B")
        if nbytes:
            mv = mv[:nbytes]
        return os.readv(self._fd, [mv])

    def recv(self, n: int) -> bytes:
        self._check("r")
        return os.read(self._fd, n)

    def __enter__(self) -> _FdIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


_MODE_WORD = {"r": "reading", "w": "writing"}


class ProcessStream(_FdIO):
    """``exec:CMD``: ``sh -c CMD`` with its stdin (mode w) or stdout (mode r) as the stream."""

    def __init__(self, command: str, mode: Mode, wait_timeout: float = 30.0) -> None:
        if mode not in ("r", "w"):
            raise ValueError(f"mode must be 'r' or 'w', got {mode!r}")
        self.command = command
        self._mode = mode
        self._name = f"exec:{command}"
        self._wait_timeout = wait_timeout
        self._proc = subprocess.Popen(
            ["sh", "-c", command],
            stdin=subprocess.PIPE if mode == "w" else subprocess.DEVNULL,
            stdout=subprocess.PIPE if mode == "r" else None,
            bufsize=0,
        )
        pipe = self._proc.stdin if mode == "w" else self._proc.stdout
        assert pipe is not None
        self._pipe = pipe
        self._fd = pipe.fileno()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def sendall(self, data: Any, /) -> None:
        try:
            super().sendall(data)
        except BrokenPipeError as exc:
            raise BrokenPipeError(f"{self._name}: the command stopped reading ({exc})") from exc

    def close(self) -> None:
        """Close our end, wait for the command; raise `ExecFailed` on a non-zero exit."""
        if self._fd < 0:
            return
        self._fd = -1
        with contextlib.suppress(OSError):
            self._pipe.close()
        try:
            rc = self._proc.wait(timeout=self._wait_timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            raise ExecFailed(
                f"{self._name}: command did not exit within {self._wait_timeout:g} s; killed"
            ) from None
        if rc != 0:
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            raise ExecFailed(f"{self._name}: command {how}")


class FileStream(_FdIO):
    """``file:PATH[,offset=N]``: write (truncating after ``offset``) or read from ``offset``."""

    def __init__(self, path: str, mode: Mode, offset: int = 0) -> None:
        if mode not in ("r", "w"):
            raise ValueError(f"mode must be 'r' or 'w', got {mode!r}")
        self.path = path
        self._mode = mode
        self._name = f"file:{path}"
        if mode == "w":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                # Keep what lies before the offset (a caller's header), drop any old tail.
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    os.ftruncate(fd, offset)
                if offset:
                    os.lseek(fd, offset, os.SEEK_SET)
            except BaseException:
                os.close(fd)
                raise
        else:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if offset:
                    os.lseek(fd, offset, os.SEEK_SET)
            except BaseException:
                os.close(fd)
                raise
        self._fd = fd

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        os.close(fd)


class FdStream(_FdIO):
    """``fd:N`` that is a pipe or a file; the stream owns (and closes) the descriptor."""

    def __init__(self, fd: int, mode: Mode) -> None:
        if mode not in ("r", "w"):
            raise ValueError(f"mode must be 'r' or 'w', got {mode!r}")
        self._fd = fd
        self._mode = mode
        self._name = f"fd:{fd}"

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        os.close(fd)


def open_stream(addr: Address, mode: Mode, timeout: float = 30.0) -> Stream:
    """Open any single-stream transport: the source uses ``"w"``, the destination ``"r"``.

    For ``tcp:``/``unix:`` the source connects and the destination listens and accepts one
    connection (both within ``timeout``); the result is then a plain socket.
    """
    if mode not in ("r", "w"):
        raise ValueError(f"mode must be 'r' or 'w', got {mode!r}")
    if isinstance(addr, ExecCommand):
        return ProcessStream(addr.command, mode)
    if isinstance(addr, FileAddress):
        return FileStream(addr.path, mode, addr.offset)
    if isinstance(addr, FdAddress):
        try:
            st = os.fstat(addr.fd)
        except OSError as exc:
            raise OSError(exc.errno, f"fd:{addr.fd} is not an open descriptor") from exc
        if stat.S_ISSOCK(st.st_mode):
            sock = socket.socket(fileno=addr.fd)
            sock.setblocking(True)
            return sock
        return FdStream(addr.fd, mode)
    if isinstance(addr, TcpAddress | UnixAddress):
        if mode == "w":
            return connect(addr, timeout)
        with Listener(addr, backlog=1) as listener:
            return listener.accept(timeout)
    raise TypeError(f"unsupported address {addr!r}")
