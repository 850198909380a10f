"""In-process QMP server tests: protocol details, commands, errors, events, lifecycle."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from multifd.machine.demo import build_demo_machine
from multifd.machine.machine import Machine
from multifd.qmp import QmpServer, serve_qmp
from multifd.qmp import server as server_mod

from .conftest import RawClient

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


@pytest.fixture
def machine() -> Iterator[Machine]:
    m = build_demo_machine(4 * MiB, seed=3)
    yield m
    m.close()


@pytest.fixture
def served(machine: Machine, sockdir: Path) -> Iterator[tuple[QmpServer, str]]:
    path = str(sockdir / "m.sock")
    srv = serve_qmp(machine, f"unix:{path}")
    yield srv, path
    srv.close()


@pytest.fixture
def qmp(served: tuple[QmpServer, str]) -> Iterator[QEMUMonitorProtocol]:
    c = QEMUMonitorProtocol(served[1])
    c.connect()
    c.settimeout(10)
    yield c
    c.close()


def _error(c: QEMUMonitorProtocol, name: str, args: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    reply = c.cmd_raw(name, args)
    assert "error" in reply, reply
    return reply["error"]


# -- protocol ---------------------------------------------------------------------------------
def test_greeting_and_negotiation(served: tuple[QmpServer, str]) -> None:
    raw = RawClient(served[1])
    try:
        greeting = raw.recv()
        assert greeting == {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                                "package": greeting["QMP"]["version"]["package"]},
                                    "capabilities": []}}
        assert greeting["QMP"]["version"]["package"].startswith("multifd ")
        raw.send({"execute": "query-status", "id": 1})
        assert raw.recv() == {"error": {"class": "CommandNotFound", "desc":
                              "Expecting capabilities negotiation with 'qmp_capabilities'"},
                              "id": 1}
        raw.send({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
        assert raw.recv()["error"]["desc"] == "Capability 'oob' not available"
        raw.send({"execute": "qmp_capabilities", "id": "neg"})
        assert raw.recv() == {"return": {}, "id": "neg"}
        raw.send({"execute": "qmp_capabilities"})
        assert raw.recv()["error"]["class"] == "CommandNotFound"
        # id of any JSON type is echoed back
        raw.send({"execute": "query-status", "id": {"x": [1, 2]}})
        assert raw.recv() == {"return": {"status": "prelaunch", "running": False,
                                         "singlestep": False}, "id": {"x": [1, 2]}}
    finally:
        raw.close()


@pytest.mark.parametrize(("line", "desc"), [
    (b"{not json}\n", "JSON parse error"),
    (b'{"execute": }', "JSON parse error"),
    (b"17\n", "QMP input must be a JSON object"),
    (b"[1, 2]\n", "QMP input must be a JSON object"),
    (b'{"arguments": {}}\n', "QMP input lacks member 'execute'"),
    (b'{"execute": 5}\n', "QMP input member 'execute' must be a string"),
    (b'{"execute": "stop", "arguments": []}\n',
     "QMP input member 'arguments' must be an object"),
    (b'{"execute": "stop", "bogus": 1}\n', "QMP input member 'bogus' is unexpected"),
])
def test_malformed_input(served: tuple[QmpServer, str], line: bytes, desc: str) -> None:
    raw = RawClient(served[1])
    try:
        raw.recv()
        raw.send({"execute": "qmp_capabilities"})
        raw.recv()
        raw.send_raw(line)
        err = raw.recv()["error"]
        assert err["class"] == "GenericError" and err["desc"].startswith(desc)
        raw.send({"execute": "query-version", "id": 7})  # the connection still works
        assert raw.recv()["id"] == 7
    finally:
        raw.close()


def test_unknown_command_and_bad_arguments(qmp: QEMUMonitorProtocol) -> None:
    assert _error(qmp, "no-such-command") == {
        "class": "CommandNotFound", "desc": "The command no-such-command has not been found"}
    assert _error(qmp, "migrate")["desc"] == "Parameter 'uri' is missing"
    assert _error(qmp, "migrate", {"uri": 5})["desc"] == \
        "Invalid parameter type for 'uri', expected: string"
    assert _error(qmp, "migrate", {"uri": "tcp:1.2.3.4:5", "detach": "yes"})["desc"] == \
        "Invalid parameter type for 'detach', expected: boolean"
    assert _error(qmp, "query-status", {"x": 1})["desc"] == "Parameter 'x' is unexpected"
    assert "resume" in _error(qmp, "migrate", {"uri": "tcp:1.2.3.4:5", "resume": True})["desc"]
    assert "Block migration" in _error(qmp, "migrate", {"uri": "tcp:1.2.3.4:5",
                                                        "blk": True})["desc"]
    assert "tcp:" in _error(qmp, "migrate", {"uri": "bogus"})["desc"]
    assert qmp.cmd("query-migrate") == {}  # nothing started


def test_query_commands_and_version(qmp: QEMUMonitorProtocol) -> None:
    names = {c["name"] for c in qmp.cmd("query-commands")}  # type: ignore[union-attr]
    assert {"qmp_capabilities", "query-version", "query-status", "query-commands", "migrate",
            "migrate-incoming", "migrate_cancel", "query-migrate", "migrate-set-capabilities",
            "query-migrate-capabilities", "migrate-set-parameters",
            "query-migrate-parameters", "stop", "cont", "quit", "x-query-checksum"} <= names
    v = qmp.cmd("query-version")
    assert v["qemu"] == {"major": 7, "minor": 2, "micro": 0}  # type: ignore[index]


def test_stream_without_newlines(served: tuple[QmpServer, str]) -> None:
    raw = RawClient(served[1])
    try:
        raw.recv()
        # no newlines, two messages in one write, one split across writes, a brace in a string
        raw.send_raw(b'{"execute": "qmp_capabilities"}{"execute": "query-version", "id": "a}"}'
                     b'  {"execute": "query-st')
        assert raw.recv() == {"return": {}}
        assert raw.recv()["id"] == "a}"
        time.sleep(0.05)
        raw.send_raw(b'atus", "id": ["\\"", 2]}')
        assert raw.recv() == {"return": {"status": "prelaunch", "running": False,
                                         "singlestep": False}, "id": ['"', 2]}
    finally:
        raw.close()


# -- parameters and capabilities ---------------------------------------------------------------
def test_parameters_validation_changes_nothing(qmp: QEMUMonitorProtocol) -> None:
    before = qmp.cmd("query-migrate-parameters")
    assert before["multifd-channels"] == 2 and before["max-bandwidth"] == 134217728  # type: ignore[index]
    cases = [
        ({"no-such-param": 1}, "Parameter 'no-such-param' is unexpected"),
        ({"multifd-channels": "4"}, "Invalid parameter type for 'multifd-channels'"),
        ({"multifd-channels": 0}, "Parameter 'multifd-channels' expects"),
        ({"multifd-channels": 256}, "Parameter 'multifd-channels' expects"),
        ({"downtime-limit": 2_000_001}, "Parameter 'downtime-limit' expects"),
        ({"multifd-compression": "lz4"}, "does not accept value 'lz4'"),
        # a good member with a bad one: nothing is applied
        ({"multifd-channels": 8, "max-bandwidth": -1}, "Parameter 'max-bandwidth' expects"),
    ]
    for args, desc in cases:
        err = _error(qmp, "migrate-set-parameters", args)
        assert err["class"] == "GenericError" and desc in err["desc"], (args, err)
    assert qmp.cmd("query-migrate-parameters") == before
    qmp.cmd("migrate-set-parameters", **{"multifd-channels": 4, "downtime-limit": 100})
    after = qmp.cmd("query-migrate-parameters")
    assert after["multifd-channels"] == 4 and after["downtime-limit"] == 100  # type: ignore[index]


def test_capabilities(qmp: QEMUMonitorProtocol) -> None:
    caps = {c["capability"]: c["state"] for c in qmp.cmd("query-migrate-capabilities")}  # type: ignore[union-attr]
    assert caps["multifd"] is False and caps["events"] is False
    for args, desc in [
        ({"capabilities": [{"capability": "warp-drive", "state": True}]},
         "does not accept value 'warp-drive'"),
        ({"capabilities": [{"capability": "multifd", "state": "on"}]},
         "Invalid parameter type for 'state'"),
        ({"capabilities": [{"capability": "multifd", "state": True},
                           {"capability": "postcopy-ram", "state": True}]},
         "postcopy-ram is not supported"),
        ({"capabilities": {"capability": "multifd"}}, "expected: array"),
    ]:
        assert desc in _error(qmp, "migrate-set-capabilities", args)["desc"]
    caps2 = {c["capability"]: c["state"] for c in qmp.cmd("query-migrate-capabilities")}  # type: ignore[union-attr]
    assert caps2 == caps
    qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True},
                                                     {"capability": "events", "state": True}])
    on = {c["capability"] for c in qmp.cmd("query-migrate-capabilities") if c["state"]}  # type: ignore[union-attr]
    assert on == {"multifd", "events"}


def test_migrate_incoming_needs_defer(qmp: QEMUMonitorProtocol) -> None:
    assert _error(qmp, "migrate-incoming", {"uri": "tcp:127.0.0.1:0"})["desc"] == \
        "For use with '-incoming defer'"


# -- run state, events, checksum ---------------------------------------------------------------
def test_stop_cont_events_and_checksum(machine: Machine, served: tuple[QmpServer, str],
                                       qmp: QEMUMonitorProtocol) -> None:
    other = QEMUMonitorProtocol(served[1])
    other.connect()
    try:
        assert qmp.cmd("x-query-checksum") == {"checksum": machine.checksum()}
        qmp.cmd("cont")
        assert qmp.cmd("query-status") == {"status": "running", "running": True,
                                           "singlestep": False}
        qmp.cmd("stop")
        assert qmp.cmd("query-status")["status"] == "paused"  # type: ignore[index]
        for c in (qmp, other):  # every negotiated client gets every event
            evs = [c.pull_event(wait=5.0), c.pull_event(wait=5.0)]
            assert [e["event"] for e in evs] == ["RESUME", "STOP"]  # type: ignore[index]
            ts = evs[0]["timestamp"]  # type: ignore[index]
            assert abs(ts["seconds"] + ts["microseconds"] / 1e6 - time.time()) < 30
    finally:
        other.close()


def test_unix_socket_is_owner_only(served: tuple[QmpServer, str]) -> None:
    mode = os.stat(served[1]).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_tcp_listener_and_close_leaves_no_threads(machine: Machine, sockdir: Path) -> None:
    before = set(threading.enumerate())
    srv = serve_qmp(machine, ["tcp:127.0.0.1:0", f"unix:{sockdir / 'b.sock'}"])
    host, port = srv.addresses[0].removeprefix("tcp:").rsplit(":", 1)
    clients = []
    for addr in ((host, int(port)), str(sockdir / "b.sock")):
        c = QEMUMonitorProtocol(addr)
        c.connect()
        assert c.cmd("query-status")["status"] == "prelaunch"  # type: ignore[index]
        clients.append(c)
    srv.close()
    assert not (sockdir / "b.sock").exists()
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []
    for c in clients:
        with contextlib.suppress(EOFError):  # the server went away first
            c.close()


def test_quit(served: tuple[QmpServer, str], qmp: QEMUMonitorProtocol) -> None:
    srv = served[0]
    assert qmp.cmd("quit") == {}
    assert srv.wait_quit(5)
    ev = qmp.pull_event(wait=5.0)
    assert ev is not None and ev["event"] == "SHUTDOWN"


def test_close_flushes_a_reply_being_written(served: tuple[QmpServer, str]) -> None:
    """close() lets a writer finish a reply it is already sending (as with ``quit``).

    The reply is larger than the socket buffers, so the writer is inside sendall with an
    empty queue when close() starts; the client reads only after that.
    """
    srv, path = served
    big = "x" * (4 * MiB)
    srv.register("x-big", lambda _a: {"data": big})
    raw = RawClient(path)
    raw.recv()
    raw.send({"execute": "qmp_capabilities"})
    raw.recv()
    raw.send({"execute": "x-big"})
    time.sleep(0.2)  # the writer has taken the reply and blocks in sendall
    closer = threading.Thread(target=srv.close)
    closer.start()
    time.sleep(0.1)
    try:
        assert raw.recv_reply() == {"return": {"data": big}}
    finally:
        closer.join(10)
        raw.close()
    assert not closer.is_alive()


def test_slow_client_never_blocks_emit(served: tuple[QmpServer, str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    srv, path = served
    monkeypatch.setattr(server_mod, "MAX_QUEUED", 16)
    raw = RawClient(path)
    raw.recv()
    raw.send({"execute": "qmp_capabilities"})
    raw.recv()
    assert srv.client_count == 1
    t0 = time.monotonic()
    for i in range(50_000):  # the raw client never reads
        srv.emit("MIGRATION_PASS", {"pass": i})
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 5
    while srv.client_count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.client_count == 0  # the stuck client was dropped
    raw.close()


def test_embedded_migration_with_events(sockdir: Path) -> None:
    """serve_qmp on two in-process machines; autostart on: the destination resumes."""
    src_m = build_demo_machine(4 * MiB, seed=9)
    src_m.start()  # a running source: its globalstate tells the destination to run
    dst_m = build_demo_machine(4 * MiB, seed=9, populate=False)
    dst_m.set_incoming()
    src = serve_qmp(src_m, f"unix:{sockdir / 's.sock'}")
    dst = serve_qmp(dst_m, f"unix:{sockdir / 'd.sock'}", incoming_defer=True, fresh_ram=True)
    s, d = QEMUMonitorProtocol(str(sockdir / "s.sock")), QEMUMonitorProtocol(
        str(sockdir / "d.sock"))
    try:
        s.connect()
        d.connect()
        for c in (s, d):
            c.cmd("migrate-set-capabilities", capabilities=[
                {"capability": "multifd", "state": True}, {"capability": "events",
                                                           "state": True}])
        d.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        port = d.cmd("query-migrate")["socket-address"][0]["port"]  # type: ignore[index]
        s.cmd("migrate", uri=f"tcp:127.0.0.1:{port}", detach=True)
        names: list[tuple[str, Any]] = []
        while ("MIGRATION", "completed") not in names:
            ev = s.pull_event(wait=10.0)
            assert ev is not None
            names.append((ev["event"], ev.get("data", {}).get("status")))
        assert ("MIGRATION_PASS", None) in names
        assert names[0] == ("MIGRATION", "setup")
        seen: list[str] = []
        while "RESUME" not in seen:
            ev = d.pull_event(wait=10.0)
            assert ev is not None
            seen.append(ev["event"])
        assert d.cmd("query-status")["status"] == "running"  # type: ignore[index]
        assert s.cmd("query-status")["status"] == "postmigrate"  # type: ignore[index]
        assert src_m.checksum() == dst_m.checksum()
        assert d.cmd("x-query-checksum") == s.cmd("x-query-checksum")
    finally:
        for c in (s, d):
            with contextlib.suppress(Exception):
                c.close()
        src.close()
        dst.close()
        src_m.close()
        dst_m.close()
