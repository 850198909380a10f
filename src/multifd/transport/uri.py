"""Migration URIs with QEMU's syntax: ``tcp:``, ``unix:``, ``exec:``, ``file:`` and ``fd:``.

``parse_uri`` turns the string an operator types (``migrate``/``migrate-incoming`` ``uri``,
the CLI) into a frozen address object; ``str(address)`` gives the URI back, so an address
can be echoed in errors and in ``socket-address``. Only stream sockets carry multifd
channels (QEMU's ``migrate_protocol_allow_multi_channels``): everything else is a single
stream.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "Address",
    "BadUri",
    "ExecCommand",
    "FdAddress",
    "FileAddress",
    "TcpAddress",
    "UnixAddress",
    "parse_uri",
    "supports_multifd",
]


class BadUri(ValueError):
    """A migration URI that cannot be used; the message says which part is wrong."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"invalid migration URI {uri!r}: {reason}")
        self.uri = uri
        self.reason = reason


@dataclass(frozen=True)
class TcpAddress:
    """``tcp:HOST:PORT``; an empty host means every interface (listen side)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = self.host
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    """``unix:PATH``: a unix stream socket."""

    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class ExecCommand:
    """``exec:CMD``: a shell command whose stdin (source) or stdout (destination) is the stream."""

    command: str

    def __str__(self) -> str:
        return f"exec:{self.command}"


@dataclass(frozen=True)
class FileAddress:
    """``file:PATH[,offset=N]``: the stream is stored in a file, starting at byte ``offset``."""

    path: str
    offset: int = 0

    def __str__(self) -> str:
        if self.offset:
            return f"file:{self.path},offset={self.offset}"
        return f"file:{self.path}"


@dataclass(frozen=True)
class FdAddress:
    """``fd:N``: an already-open file descriptor (socket, pipe or file) given by number."""

    fd: int

    def __str__(self) -> str:
        return f"fd:{self.fd}"


Address = TcpAddress | UnixAddress | ExecCommand | FileAddress | FdAddress

_SCHEMES = ("tcp", "unix", "exec", "file", "fd")
_KNOWN_UNSUPPORTED = {
    "vsock": "vsock: sockets are not supported",
    "rdma": "rdma: is not supported",
    "channels": "use a URI string, not a channel list",
}
_SIZE_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_uri(uri: str) -> Address:
    """Parse a QEMU migration URI; raise `BadUri` naming the wrong part."""
    if not isinstance(uri, str):
        raise BadUri(repr(uri), f"expected a string, got {type(uri).__name__}")
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise BadUri(uri, f"missing transport prefix (expected one of {_scheme_list()})")
    if scheme in _KNOWN_UNSUPPORTED:
        raise BadUri(uri, _KNOWN_UNSUPPORTED[scheme])
    if scheme == "tcp":
        return _parse_tcp(uri, rest)
    if scheme == "unix":
        if not rest:
            raise BadUri(uri, "unix: needs a socket path")
        if "\0" in rest:
            raise BadUri(uri, "unix socket path contains a NUL byte")
        return UnixAddress(rest)
    if scheme == "exec":
        if not rest.strip():
            raise BadUri(uri, "exec: needs a command")
        return ExecCommand(rest)
    if scheme == "file":
        return _parse_file(uri, rest)
    if scheme == "fd":
        if not re.fullmatch(r"[0-9]+", rest):
            raise BadUri(
                uri, f"fd: needs a file descriptor number, got {rest!r} (named fds not supported)"
            )
        return FdAddress(int(rest))
    raise BadUri(uri, f"unknown transport {scheme!r} (expected one of {_scheme_list()})")


def supports_multifd(addr: Address) -> bool:
    """True when the transport can carry extra multifd connections (stream sockets only)."""
    return isinstance(addr, TcpAddress | UnixAddress)


def _scheme_list() -> str:
    return ", ".join(f"{s}:" for s in _SCHEMES)


def _parse_tcp(uri: str, rest: str) -> TcpAddress:
    if "," in rest:
        raise BadUri(uri, f"tcp: options are not supported ({rest[rest.index(','):]!r})")
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise BadUri(uri, "unterminated '[' in IPv6 address")
        host = rest[1:end]
        tail = rest[end + 1 :]
        if not tail.startswith(":"):
            raise BadUri(uri, "expected ':PORT' after the bracketed IPv6 address")
        port_s = tail[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BadUri(uri, f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_s = rest.rpartition(":")
        if not sep:
            raise BadUri(uri, "tcp: needs HOST:PORT")
        if ":" in host:
            raise BadUri(uri, "an IPv6 address must be written in brackets, e.g. tcp:[::1]:4444")
    if not port_s:
        raise BadUri(uri, "missing port")
    if not port_s.isdigit():
        raise BadUri(uri, f"port {port_s!r} is not a number")
    port = int(port_s)
    if port > 65535:
        raise BadUri(uri, f"port {port} is out of range 0..65535")
    return TcpAddress(host, port)


def _parse_file(uri: str, rest: str) -> FileAddress:
    path, offset = rest, 0
    idx = rest.rfind(",offset=")
    if idx >= 0:
        path, text = rest[:idx], rest[idx + len(",offset=") :]
        offset = _parse_size(uri, text)
    if not path:
        raise BadUri(uri, "file: needs a path")
    return FileAddress(path, offset)


def _parse_size(uri: str, text: str) -> int:
    m = re.fullmatch(r"(0[xX][0-9a-fA-F]+|[0-9]+)([bBkKmMgGtT]?)", text)
    if not m:
        raise BadUri(uri, f"offset {text!r} is not a non-negative integer")
    number = int(m.group(1), 0) if m.group(1)[:2].lower() == "0x" else int(m.group(1))
    return number * _SIZE_SUFFIX[m.group(2).lower()]
