"""Single-stream transports: exec: pipes, file: (with offset), fd:, and open_stream."""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

import pytest

from multifd.transport.exec import ExecFailed, FileStream, ProcessStream, open_stream
from multifd.transport.sockets import ConnectionClosed, recv_exactly, recv_exactly_into, sendmsg_all
from multifd.transport.uri import TcpAddress, UnixAddress, parse_uri

pytestmark = pytest.mark.timeout(60)

PAYLOAD = random.Random(18).randbytes(300_000)  # seeded: a failure reproduces


def _chunks() -> list[bytes]:
    return [PAYLOAD[i : i + 4096] for i in range(0, len(PAYLOAD), 4096)]


def test_exec_round_trip_through_a_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    out = open_stream(parse_uri(f"exec:cat > {target}"), "w")
    assert sendmsg_all(out, _chunks()) == len(PAYLOAD)
    out.sendall(b"tail")
    out.close()
    assert target.read_bytes() == PAYLOAD + b"tail"

    inp = open_stream(parse_uri(f"exec:cat {target}"), "r")
    buf = bytearray(len(PAYLOAD) + 4)
    recv_exactly_into(inp, buf)
    assert buf == PAYLOAD + b"tail"
    with pytest.raises(ConnectionClosed):
        recv_exactly(inp, 1)
    inp.close()


def test_exec_pipeline_compresses(tmp_path: Path) -> None:
    target = tmp_path / "out.gz"
    out = open_stream(parse_uri(f"exec:gzip -c > {target}"), "w")
    out.sendall(PAYLOAD)
    out.close()
    inp = open_stream(parse_uri(f"exec:gzip -dc {target}"), "r")
    assert recv_exactly(inp, len(PAYLOAD)) == PAYLOAD
    inp.close()


def test_exec_nonzero_exit_is_reported() -> None:
    inp = ProcessStream("printf abc; exit 3", "r")
    assert recv_exactly(inp, 3) == b"abc"
    with pytest.raises(ExecFailed, match="exited with status 3"):
        inp.close()
    inp.close()  # second close is a no-op


def test_exec_writer_whose_command_fails() -> None:
    out = ProcessStream("exit 5", "w")
    with pytest.raises(BrokenPipeError, match="stopped reading"):
        for _ in range(100):
            out.sendall(PAYLOAD)
    with pytest.raises(ExecFailed, match="exited with status 5"):
        out.close()


def test_exec_wrong_direction() -> None:
    s = ProcessStream("cat >/dev/null", "w")
    with pytest.raises(OSError, match="opened for writing"):
        s.recv_into(bytearray(1))
    s.close()


def test_file_round_trip_with_offset(tmp_path: Path) -> None:
    path = tmp_path / "vm.img"
    path.write_bytes(b"H" * 100 + b"old tail that must go" * 100)
    out = open_stream(parse_uri(f"file:{path},offset=100"), "w")
    sendmsg_all(out, _chunks())
    out.close()
    data = path.read_bytes()
    assert data[:100] == b"H" * 100  # what lies before the offset is kept
    assert data[100:] == PAYLOAD  # the old tail is gone

    inp = open_stream(parse_uri(f"file:{path},offset=100"), "r")
    assert recv_exactly(inp, len(PAYLOAD)) == PAYLOAD
    with pytest.raises(ConnectionClosed, match="1 of 1 bytes"):
        recv_exactly(inp, 1)
    inp.close()


def test_file_without_offset_truncates(tmp_path: Path) -> None:
    path = tmp_path / "vm.img"
    path.write_bytes(b"x" * 1000)
    with FileStream(str(path), "w") as out:
        out.sendall(b"abc")
    assert path.read_bytes() == b"abc"


def test_file_missing_for_reading(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_stream(parse_uri(f"file:{tmp_path / 'nope'}"), "r")


def test_fd_pipe_and_socket() -> None:
    r, w = os.pipe()
    out = open_stream(parse_uri(f"fd:{w}"), "w")
    inp = open_stream(parse_uri(f"fd:{r}"), "r")
    out.sendall(b"through a pipe")
    out.close()
    assert recv_exactly(inp, 14) == b"through a pipe"
    inp.close()

    a, b = socket.socketpair()
    sock_stream = open_stream(parse_uri(f"fd:{a.detach()}"), "w")
    assert isinstance(sock_stream, socket.socket)
    sock_stream.sendall(b"sock")
    assert recv_exactly(b, 4) == b"sock"
    sock_stream.close()
    b.close()


def test_fd_not_open() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError, match=f"fd:{r} is not an open descriptor"):
        open_stream(parse_uri(f"fd:{r}"), "r")


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_open_stream_sockets(kind: str, tmp_path: Path) -> None:
    if kind == "tcp":
        probe = socket.create_server(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        addr: TcpAddress | UnixAddress = TcpAddress("127.0.0.1", port)
    else:
        addr = UnixAddress(str(tmp_path / "s.sock"))
    result: dict[str, object] = {}
    t = threading.Thread(target=lambda: result.setdefault("s", open_stream(addr, "r", 5)))
    t.start()
    for _ in range(200):  # wait for the listener to appear
        try:
            out = open_stream(addr, "w", 5)
            break
        except ConnectionError:
            threading.Event().wait(0.01)
    else:
        pytest.fail("listener never came up")
    t.join(5)
    inp = result["s"]
    out.sendall(b"ping")
    assert recv_exactly(inp, 4) == b"ping"  # type: ignore[arg-type]
    out.close()
    inp.close()  # type: ignore[attr-defined]


def test_open_stream_bad_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        open_stream(parse_uri(f"file:{tmp_path / 'x'}"), "a")  # type: ignore[arg-type]
