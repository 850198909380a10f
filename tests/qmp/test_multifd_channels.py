"""QMP `x-query-multifd-channels` (ours) and query-migrate's expected-downtime / x-eta-ms
during a real multifd migration between two in-process QMP servers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from multifd.machine.demo import build_demo_machine
from multifd.qmp.commands import serve_qmp
from tests.qmp.conftest import RawClient

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
RAM = 64 * MiB


def _cmd(c: RawClient, name: str, **args: Any) -> Any:
    c.send({"execute": name, "arguments": args} if args else {"execute": name})
    reply = c.recv_reply()
    assert "return" in reply, reply
    return reply["return"]


def _client(path: str) -> RawClient:
    c = RawClient(path)
    c.recv()  # greeting
    _cmd(c, "qmp_capabilities")
    return c


def test_channels_and_estimates_over_qmp(sockdir: Path) -> None:
    src_m = build_demo_machine(RAM, seed=3)
    dst_m = build_demo_machine(RAM, seed=3, populate=False)
    src_m.start()
    dst_m.set_incoming()
    servers = [serve_qmp(src_m, f"unix:{sockdir}/s.sock"),
               serve_qmp(dst_m, f"unix:{sockdir}/d.sock", incoming_defer=True)]
    s, d = _client(f"{sockdir}/s.sock"), _client(f"{sockdir}/d.sock")
    try:
        for c in (s, d):
            _cmd(c, "migrate-set-capabilities",
                 capabilities=[{"capability": "multifd", "state": True}])
            _cmd(c, "migrate-set-parameters", **{"multifd-channels": 2})
        assert _cmd(s, "x-query-multifd-channels") == []  # no migration yet
        _cmd(s, "migrate-set-parameters", **{"max-bandwidth": 32 * MiB})  # ~2 s: observable
        _cmd(d, "migrate-incoming", uri="tcp:127.0.0.1:0")
        port = _cmd(d, "query-migrate")["socket-address"][0]["port"]
        _cmd(s, "migrate", uri=f"tcp:127.0.0.1:{port}")
        active: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while (info := _cmd(s, "query-migrate"))["status"] != "completed":
            assert info["status"] not in ("failed", "cancelled"), info
            assert time.monotonic() < deadline, info
            if info["status"] == "active" and info.get("ram", {}).get("mbps"):
                active.append(info)
            time.sleep(0.05)
        # running: expected-downtime and x-eta-ms are there and sane
        assert active, "never saw the migration active"
        for a in active:
            assert 0 <= a["expected-downtime"] < 60_000, a
            assert "x-eta-ms" in a
        etas = [i["x-eta-ms"] for i in active if i["x-eta-ms"] is not None]
        assert etas, "no ETA while nothing dirties the RAM (it always converges)"
        # 64 MiB at 32 MiB/s: never more than the time the whole RAM takes, with margin
        assert all(0 <= e <= 10_000 for e in etas), etas
        assert "x-eta-ms" not in info and "downtime" in info  # completed: QEMU's members
        while _cmd(d, "query-migrate")["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        src_ch = _cmd(s, "x-query-multifd-channels")
        dst_ch = _cmd(d, "x-query-multifd-channels")
        assert [c["id"] for c in src_ch] == [0, 1] == [c["id"] for c in dst_ch]
        assert {c["role"] for c in src_ch} == {"source"}
        assert {c["role"] for c in dst_ch} == {"destination"}
        for a, b in zip(src_ch, dst_ch, strict=True):
            assert a["bytes"] == b["bytes"] > 0  # every byte sent was received
            assert a["packets"] == b["packets"] > 0
            for c in (a, b):
                assert c["busy-time"] > 0 and 0 < c["busy-percent"] <= 100, c
            assert a["slot-waits"] >= 0 and a["slot-wait-time"] >= 0
            assert b["sync-waits"] > 0  # every pass ends at the SYNC barrier
    finally:
        for c in (s, d):
            c.close()
        for srv in servers:
            srv.close()
        src_m.close()
        dst_m.close()
