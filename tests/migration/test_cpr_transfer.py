"""mode cpr-transfer: a same-host handover passes the RAM blocks' memfds (SCM_RIGHTS) and
sends only device and run state; both processes then map the same pages.

The two sides run in one process here (two Machines, two mappings of each memfd), which
is what two processes see too: separate virtual ranges over the same pages.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from multifd.machine.device import BytesDevice
from multifd.machine.machine import Machine, RunState
from multifd.machine.ramblock import RamBlock
from multifd.migration.cpr import CprError
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.source import MigrationSource
from multifd.transport.fdpass import recv_with_fds, send_with_fds
from multifd.wire.cpr import PREAMBLE_SIZE, CprFd, decode_body, decode_preamble, encode_state
from multifd.wire.errors import BadMagic, WireError

pytestmark = pytest.mark.timeout(60)

SIZES = {"ram": 8 << 20, "vram": 1 << 20}


def _machine(backing: str = "memfd", incoming: bool = False) -> Machine:
    blocks = [RamBlock(n, s, backing=backing) for n, s in SIZES.items()]
    devices = [BytesDevice("cpu", b"" if incoming else b"registers" * 100),
               BytesDevice("nic", b"" if incoming else b"mac")]
    return Machine(blocks, devices, incoming=incoming)


def _params(**extra: object) -> MigrationParameters:
    return MigrationParameters(mode="cpr-transfer", **extra)


def _caps(multifd: bool = True) -> MigrationCapabilities:
    caps = MigrationCapabilities()
    caps.set([{"capability": "multifd", "state": multifd}])
    return caps


def _handover(tmp_path: Path, src_m: Machine, dst_m: Machine,
              multifd: bool = True) -> tuple[MigrationSource, MigrationDestination]:
    dst = MigrationDestination(dst_m, params=_params(), caps=_caps(multifd))
    uri = dst.listen(f"unix:{tmp_path / 'cpr.sock'}")
    src = MigrationSource(src_m, params=_params(), caps=_caps(multifd))
    src.start(uri)
    assert str(src.wait(30)) == "completed", src.error
    assert str(dst.wait(30)) == "completed", dst.error
    return src, dst


@pytest.mark.parametrize("multifd", [True, False])
def test_handover_shares_the_pages_and_moves_device_state(tmp_path: Path,
                                                          multifd: bool) -> None:
    src_m, dst_m = _machine(), _machine(incoming=True)
    rng = np.random.default_rng(1)
    for b in src_m.blocks.values():
        b.array[:] = rng.integers(0, 256, b.used_length, dtype=np.uint8)
    dst_views = {n: b.array for n, b in dst_m.blocks.items()}  # held before the handover
    src_m.start()
    before = {n: b.checksum() for n, b in src_m.blocks.items()}
    src, _ = _handover(tmp_path, src_m, dst_m, multifd)

    assert src_m.state is RunState.POSTMIGRATE
    assert dst_m.is_running
    assert dst_m.device("cpu").data == b"registers" * 100  # type: ignore[attr-defined]
    assert dst_m.device("nic").data == b"mac"  # type: ignore[attr-defined]
    for n, b in dst_m.blocks.items():
        assert b.checksum() == before[n]
        assert b.backing == "memfd"
    # the RAM was not sent: the stream held device and run state only
    assert src.query()["ram"]["transferred"] < 64 << 10
    # a write on the destination, through a view taken before the handover, lands in the
    # memfd's pages: a third mapping of the passed file sees it
    dst_views["ram"][123] = 0xAB
    fd = os.dup(dst_m.block("ram")._fd)  # type: ignore[arg-type]
    try:
        import mmap

        with mmap.mmap(fd, SIZES["ram"]) as third:
            assert third[123] == 0xAB
    finally:
        os.close(fd)
    # the source was detached: its writes no longer reach the destination's pages
    assert src_m.block("ram").backing == "anon"
    dst_views["ram"][0:8] = 0x11
    src_m.block("ram").array[0:8] = 7
    assert (dst_views["ram"][0:8] == 0x11).all()
    src_m.close()
    dst_m.close()


def test_a_paused_source_stays_paused_on_the_destination(tmp_path: Path) -> None:
    src_m, dst_m = _machine(), _machine(incoming=True)
    _handover(tmp_path, src_m, dst_m)
    assert dst_m.state is RunState.PAUSED
    src_m.close()
    dst_m.close()


def test_handover_under_a_running_workload(tmp_path: Path) -> None:
    """A writer between safe points: the destination sees every write made before the
    pause and nothing after (the source's workload is stopped for good)."""
    src_m, dst_m = _machine(), _machine(incoming=True)
    arr = src_m.block("ram").array.view(np.uint64)
    src_m.start()
    stop = threading.Event()
    count = [0]

    def writer() -> None:
        with src_m.workload():
            while src_m.safe_point(stop):
                arr[count[0] % arr.size] = count[0] + 1
                count[0] += 1

    t = threading.Thread(target=writer)
    t.start()
    _handover(tmp_path, src_m, dst_m)
    n = count[0]
    stop.set()
    src_m.kick()
    t.join(5)
    assert n > 0 and count[0] == n  # the source never wrote again
    got = dst_m.block("ram").array.view(np.uint64)
    idx = np.arange(min(n, arr.size))
    assert (got[idx] >= idx + 1).all()
    src_m.close()
    dst_m.close()


def test_anonymous_blocks_fail_before_anything_runs(tmp_path: Path) -> None:
    src_m = _machine(backing="anon")
    src_m.start()
    src = MigrationSource(src_m, params=_params(), caps=_caps())
    with pytest.raises(CprError, match=r"memfd-backed.*'ram', 'vram'"):
        src.start(f"unix:{tmp_path / 'x.sock'}")
    assert src_m.is_running and str(src.status.status) == "none"
    src_m.close()


@pytest.mark.parametrize("uri", ["tcp:127.0.0.1:0", "exec:cat >/dev/null"])
def test_a_non_unix_uri_fails_before_anything_runs(uri: str) -> None:
    src_m = _machine()
    src_m.start()
    with pytest.raises(CprError, match="needs a unix: URI"):
        MigrationSource(src_m, params=_params(), caps=_caps()).start(uri)
    assert src_m.is_running
    with pytest.raises(CprError, match="needs a unix: URI"):
        MigrationDestination(_machine(incoming=True), params=_params()).listen(uri)
    src_m.close()


def test_tls_is_refused(tmp_path: Path) -> None:
    src_m = _machine()
    with pytest.raises(CprError, match="TLS"):
        MigrationSource(src_m, params=_params(**{"tls-creds": str(tmp_path)}),
                        caps=_caps()).start(f"unix:{tmp_path / 's'}")
    src_m.close()


def test_destination_with_other_blocks_fails_and_keeps_the_source(tmp_path: Path) -> None:
    src_m = _machine()
    src_m.block("ram").array[:4] = 9
    src_m.start()
    dst_m = Machine([RamBlock("ram", 4 << 20)], [BytesDevice("cpu"), BytesDevice("nic")],
                    incoming=True)
    dst = MigrationDestination(dst_m, params=_params(), caps=_caps())
    src = MigrationSource(src_m, params=_params(), caps=_caps())
    src.start(dst.listen(f"unix:{tmp_path / 'cpr.sock'}"))
    assert str(dst.wait(30)) == "failed"
    assert "do not match" in (dst.error or "")
    assert str(src.wait(30)) == "failed"
    assert src_m.is_running and src_m.block("ram").backing == "memfd"
    assert (src_m.block("ram").array[:4] == 9).all()
    assert not dst_m.is_running
    src_m.close()
    dst_m.close()


def test_a_normal_destination_names_the_mode(tmp_path: Path) -> None:
    src_m, dst_m = _machine(), _machine(incoming=True)
    dst = MigrationDestination(dst_m)
    src = MigrationSource(src_m, params=_params(), caps=_caps())
    src.start(dst.listen(f"unix:{tmp_path / 'cpr.sock'}"))
    assert str(dst.wait(30)) == "failed"
    assert str(src.wait(30)) == "failed"
    src_m.close()
    dst_m.close()


# -- the CPR state message ---------------------------------------------------------------


def test_cpr_state_round_trip_and_errors() -> None:
    entries = [CprFd("ram", 1 << 30), CprFd("vram", 4096, id=3)]
    data = encode_state(entries)
    assert data[:4] == b"QCPR"
    body_len = decode_preamble(data[:PREAMBLE_SIZE])
    assert decode_body(data[PREAMBLE_SIZE:PREAMBLE_SIZE + body_len]) == entries
    with pytest.raises(BadMagic, match="cpr-transfer"):
        decode_preamble(b"QEVM" + data[4:PREAMBLE_SIZE])
    with pytest.raises(WireError):
        decode_body(data[PREAMBLE_SIZE:-1])
    with pytest.raises(WireError):
        decode_body(data[PREAMBLE_SIZE:] + b"x")


def test_fds_pass_exactly_and_leave_the_stream_intact() -> None:
    a, b = socket.socketpair()
    fd = os.memfd_create("t")
    os.write(fd, b"hello")
    try:
        send_with_fds(a, encode_state([CprFd("ram", 5)]), [fd])
        a.sendall(b"QEVM")  # the main stream follows on the same socket
        _, body, fds = recv_with_fds(b, PREAMBLE_SIZE, 4, decode_preamble)
        assert decode_body(body) == [CprFd("ram", 5)] and len(fds) == 1
        assert os.pread(fds[0], 5, 0) == b"hello"
        os.close(fds[0])
        assert b.recv(4) == b"QEVM"
    finally:
        os.close(fd)
        a.close()
        b.close()


def test_arrays_handed_over_keep_kernel_tracking(tmp_path: Path) -> None:
    """`Machine.array` (tracking="auto") through a handover, then a live precopy of the
    destination under a writer that never marks: the mapping the handover installed is
    tracked too (memfd.adopt re-registers it), so no write is lost."""
    src_m = Machine()
    a = src_m.array("state", (1 << 19,), "uint64", backing="memfd")
    if src_m.block("state").tracking == "manual":
        pytest.skip("environment: this kernel offers no write tracking (neither uffd-wp "
                    "nor soft-dirty)")
    a[:] = np.arange(a.size, dtype=np.uint64)
    dst_m = Machine(incoming=True)
    b = dst_m.array("state", (1 << 19,), "uint64")
    src_m.start()
    _handover(tmp_path, src_m, dst_m)
    assert (b == np.arange(b.size, dtype=np.uint64)).all()

    third = Machine(incoming=True)
    c = third.array("state", (1 << 19,), "uint64")
    stop = threading.Event()

    def writer() -> None:
        k = 0
        with dst_m.workload():
            while dst_m.safe_point(stop, idle=0.0002):  # paced: precopy converges
                b[(k * 4099) % b.size] = k + 10**9  # no marking
                k += 1

    t = threading.Thread(target=writer)
    t.start()
    params = MigrationParameters(**{"max-bandwidth": 0, "downtime-limit": 50})
    dst = MigrationDestination(third, caps=_caps(False))
    src = MigrationSource(dst_m, params=params, caps=_caps(False))
    src.start(dst.listen("tcp:127.0.0.1:0"))
    assert str(src.wait(30)) == "completed", src.error
    assert str(dst.wait(30)) == "completed", dst.error
    stop.set()
    dst_m.kick()
    t.join(5)
    assert (b >= 10**9).any()  # the writer ran
    assert (c == b).all()  # b is frozen since the pause (postmigrate)
    for m in (src_m, dst_m, third):
        m.close()


def test_a_peer_passing_other_fds_is_refused(tmp_path: Path) -> None:
    """A CPR state whose fds are disk files: refused before anything is mapped."""
    dst_m = _machine(incoming=True)
    dst = MigrationDestination(dst_m, params=_params(), caps=_caps())
    uri = dst.listen(f"unix:{tmp_path / 'cpr.sock'}")
    files = [open(tmp_path / n, "wb+") for n in SIZES]  # noqa: SIM115
    for f, size in zip(files, SIZES.values(), strict=True):
        f.truncate(size)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(uri.removeprefix("unix:"))
        send_with_fds(s, encode_state([CprFd(n, sz) for n, sz in SIZES.items()]),
                      [f.fileno() for f in files])
        assert str(dst.wait(30)) == "failed"
    assert "not a memfd" in (dst.error or "")
    assert dst_m.block("ram").backing == "memfd"  # its own, untouched
    for f in files:
        f.close()
    dst_m.close()


def test_cpr_state_decoders_only_raise_wire_errors() -> None:
    """Mutated and truncated messages: a WireError naming the problem, nothing else."""
    good = encode_state([CprFd("ram", 1 << 30), CprFd("vram", 4096, id=3)])
    rng = np.random.default_rng(7)
    for _ in range(3000):
        buf = bytearray(good[: rng.integers(0, len(good) + 1)])
        for pos in rng.integers(0, max(len(buf), 1), rng.integers(0, 4)):
            if buf:
                buf[pos] = rng.integers(0, 256)
        try:
            body_len = decode_preamble(buf[:PREAMBLE_SIZE])
            decode_body(buf[PREAMBLE_SIZE : PREAMBLE_SIZE + body_len])
        except WireError:
            pass
