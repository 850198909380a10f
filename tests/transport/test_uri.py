"""URI parsing: QEMU's syntax, clear errors, round trip through str()."""

from __future__ import annotations

import pytest

from multifd.transport.uri import (
    BadUri,
    ExecCommand,
    FdAddress,
    FileAddress,
    TcpAddress,
    UnixAddress,
    parse_uri,
    supports_multifd,
)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("tcp:127.0.0.1:4444", TcpAddress("127.0.0.1", 4444)),
        ("tcp:localhost:0", TcpAddress("localhost", 0)),
        ("tcp::4444", TcpAddress("", 4444)),
        ("tcp:[::1]:4444", TcpAddress("::1", 4444)),
        ("tcp:[fe80::1]:65535", TcpAddress("fe80::1", 65535)),
        ("unix:/tmp/mig.sock", UnixAddress("/tmp/mig.sock")),
        ("unix:rel/path:with:colons", UnixAddress("rel/path:with:colons")),
        ("exec:cat > /tmp/x", ExecCommand("cat > /tmp/x")),
        ("exec:gzip -c | ssh host 'cat > f'", ExecCommand("gzip -c | ssh host 'cat > f'")),
        ("file:/tmp/vm.img", FileAddress("/tmp/vm.img", 0)),
        ("file:/tmp/vm.img,offset=4096", FileAddress("/tmp/vm.img", 4096)),
        ("file:/tmp/vm.img,offset=0x1000", FileAddress("/tmp/vm.img", 4096)),
        ("file:/tmp/vm.img,offset=1M", FileAddress("/tmp/vm.img", 1 << 20)),
        ("file:/tmp/a,b.img", FileAddress("/tmp/a,b.img", 0)),
        ("fd:7", FdAddress(7)),
    ],
)
def test_valid(uri: str, expected: object) -> None:
    assert parse_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "tcp:127.0.0.1:4444",
        "tcp:[::1]:4444",
        "unix:/tmp/s",
        "exec:cat",
        "file:/x",
        "file:/x,offset=16",
        "fd:3",
    ],
)
def test_str_round_trip(uri: str) -> None:
    assert str(parse_uri(uri)) == uri
    assert parse_uri(str(parse_uri(uri))) == parse_uri(uri)


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("", "missing transport prefix"),
        ("127.0.0.1:4444", "unknown transport '127.0.0.1'"),
        ("ftp:host:1", "unknown transport 'ftp'"),
        ("tcp:host", "tcp: needs HOST:PORT"),
        ("tcp:host:", "missing port"),
        ("tcp:host:http", "port 'http' is not a number"),
        ("tcp:host:65536", "out of range"),
        ("tcp:host:-1", "not a number"),
        ("tcp:::1:4444", "must be written in brackets"),
        ("tcp:[::1:4444", "unterminated"),
        ("tcp:[::1]4444", "expected ':PORT'"),
        ("tcp:[nothost]:1", "is not an IPv6 address"),
        ("tcp:host:1,ipv4=on", "options are not supported"),
        ("unix:", "needs a socket path"),
        ("exec:", "needs a command"),
        ("exec:   ", "needs a command"),
        ("file:", "needs a path"),
        ("file:,offset=3", "needs a path"),
        ("file:/x,offset=abc", "offset 'abc'"),
        ("file:/x,offset=-1", "offset '-1'"),
        ("fd:", "fd: needs a file descriptor number"),
        ("fd:myfd", "named fds not supported"),
        ("vsock:3:4444", "vsock"),
        ("rdma:host:1", "rdma"),
    ],
)
def test_invalid(uri: str, fragment: str) -> None:
    with pytest.raises(BadUri) as info:
        parse_uri(uri)
    assert fragment in str(info.value)
    assert repr(uri) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_not_a_string() -> None:
    with pytest.raises(BadUri, match="expected a string"):
        parse_uri(4444)  # type: ignore[arg-type]


def test_supports_multifd() -> None:
    assert supports_multifd(parse_uri("tcp:127.0.0.1:1"))
    assert supports_multifd(parse_uri("unix:/tmp/s"))
    for uri in ("exec:cat", "file:/x", "fd:3"):
        assert not supports_multifd(parse_uri(uri))
