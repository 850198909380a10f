"""End to end: two `multifd serve` processes driven by the unmodified qemu.qmp clients.

Checksum rule: the destination runs with autostart off (``-S``, QEMU's rule), so after
``completed`` it stays ``paused`` holding exactly the migrated state, while the source
sits in ``postmigrate``; their ``x-query-checksum`` must then be equal. After ``cont`` the
destination's workload carries on from the migrated step, and once it reaches
``--steps`` its checksum equals the straight-through computation (`expected_checksum`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from multifd.machine.demo import expected_checksum

pytestmark = pytest.mark.timeout(90)
MiB = 1 << 20
RAM = 32 * MiB
SEED = 5


class Served:
    """A `multifd serve` child process and its QMP socket path."""

    def __init__(self, sockdir: Path, name: str, *extra: str) -> None:
        self.path = str(sockdir / f"{name}.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "multifd.cli", "serve", "--qmp", f"unix:{self.path}",
             "--ram", str(RAM), "--seed", str(SEED), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"serve {name} died: {self.proc.stderr.read() if self.proc.stderr else ''}"
        assert json.loads(line)["qmp"] == [f"unix:{self.path}"]

    def stop(self) -> int:
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def procs() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


SETUP_CAPS = [{"capability": "multifd", "state": True}, {"capability": "events", "state": True}]


async def _until(client: QMPClient, status: str, timeout: float = 30) -> list[str]:
    """MIGRATION statuses seen until ``status`` (a final status other than it fails)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        ev = await asyncio.wait_for(client.events.get(), deadline - time.monotonic())
        if ev["event"] != "MIGRATION":
            continue
        st = ev["data"]["status"]
        assert "seconds" in ev["timestamp"] and "microseconds" in ev["timestamp"]
        seen.append(st)
        if st == status:
            return seen
        assert st not in ("completed", "failed", "cancelled"), (seen, status)


# The live test's workload: 16 MiB/s of dirtying (64 steps/s) on the source, so its 1200
# steps last ~19 s - far longer than the migration - and flat out on the destination, so
# it finishes the rest within moments after `cont`.
LIVE_STEPS = 1200
LIVE_SOURCE_RATE = "16"
# ~1 s for the first pass of 32 MiB: the workload dirties pages meanwhile, which later
# passes send again.
LIVE_PARAMS = {"multifd-channels": 2, "max-bandwidth": 32 * MiB}


@pytest.mark.parametrize("profile", ["qemu-10", "qemu-7.2"])
def test_migrate_between_serve_processes(sockdir: Path, procs: list[Served],
                                         profile: str) -> None:
    steps = LIVE_STEPS
    src = Served(sockdir, "src", "--profile", profile, "--steps", str(steps),
                 "--dirty-rate", LIVE_SOURCE_RATE)
    procs.append(src)
    dst = Served(sockdir, "dst", "--profile", profile, "--incoming", "defer", "-S",
                 "--dirty-rate", "0")
    procs.append(dst)
    mig = f"unix:{sockdir / 'mig.sock'}"

    async def drive() -> None:
        s, d = QMPClient("src"), QMPClient("dst")
        await s.connect(src.path)
        await d.connect(dst.path)
        for c in (s, d):
            await c.execute("migrate-set-capabilities", {"capabilities": SETUP_CAPS})
            await c.execute("migrate-set-parameters", LIVE_PARAMS)
        assert (await s.execute("query-status"))["status"] == "running"  # type: ignore[index]
        assert (await d.execute("query-status")) == {"status": "inmigrate", "running": False,
                                                     "singlestep": False}
        await d.execute("migrate-incoming", {"uri": mig})
        assert (await d.execute("query-migrate"))["socket-address"] == [  # type: ignore[index]
            {"type": "unix", "path": mig.removeprefix("unix:")}]
        deadline = time.monotonic() + 30
        while not (work := await s.execute("x-query-workload"))["step"]:  # type: ignore[index]
            assert time.monotonic() < deadline, "the source's workload never started"
            await asyncio.sleep(0.01)
        assert work["running"] is True, work  # type: ignore[index]
        step_at_migrate = work["step"]  # type: ignore[index]
        await s.execute("migrate", {"uri": mig})
        src_seen = await _until(s, "completed")
        dst_seen = await _until(d, "completed")
        assert src_seen[0] == "setup" and "active" in src_seen
        assert dst_seen[0] == "setup" and "active" in dst_seen
        assert (await s.execute("query-status"))["status"] == "postmigrate"  # type: ignore[index]
        assert (await d.execute("query-status"))["status"] == "paused"  # type: ignore[index]
        info = await s.execute("query-migrate")
        assert info["status"] == "completed"  # type: ignore[index]
        assert info["ram"]["total"] >= RAM and "downtime" in info  # type: ignore[index]
        s_sum = await s.execute("x-query-checksum")
        d_sum = await d.execute("x-query-checksum")
        assert s_sum == d_sum
        s_step = (await s.execute("x-query-workload"))["step"]  # type: ignore[index]
        d_work = await d.execute("x-query-workload")
        assert d_work["step"] == s_step and d_work["total-steps"] == steps  # type: ignore[index]
        # A live migration: the workload ran on during it (it advanced after `migrate`)
        # and was still running when the switchover stopped it (short of its last step),
        # and the pages it dirtied meanwhile were sent again: more pages went out than the
        # machine has.
        assert step_at_migrate < s_step < steps, (step_at_migrate, s_step)
        ram = info["ram"]  # type: ignore[index]
        assert ram["dirty-sync-count"] >= 2, ram
        assert ram["normal"] + ram["duplicate"] > ram["total"] // ram["page-size"], ram
        # the destination carries on from the migrated step to the end
        await d.execute("cont")
        deadline = time.monotonic() + 30
        while (await d.execute("x-query-workload"))["step"] < steps:  # type: ignore[index]
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        final = await d.execute("x-query-checksum")
        assert final == {"checksum": expected_checksum(RAM, SEED, steps)}
        assert (await s.execute("x-query-checksum")) == s_sum  # the source stayed put
        for c in (s, d):
            await c.execute("quit")
            with contextlib.suppress(Exception):
                await c.disconnect()

    asyncio.run(drive())
    assert src.stop() == 0
    assert dst.stop() == 0


def _err(c: QEMUMonitorProtocol, name: str, **args: Any) -> str:
    with pytest.raises(ExecuteError) as ei:
        c.cmd(name, **args)
    assert ei.value.error_class == "GenericError"
    return str(ei.value)


def test_cancel_and_errors_during_migration(sockdir: Path, procs: list[Served]) -> None:
    steps = 400
    src = Served(sockdir, "src", "--steps", str(steps))
    procs.append(src)
    dst = Served(sockdir, "dst", "--incoming", "defer")
    procs.append(dst)
    mig = f"unix:{sockdir / 'mig.sock'}"
    s, d = QEMUMonitorProtocol(src.path), QEMUMonitorProtocol(dst.path)
    s.connect()
    d.connect()
    s.settimeout(20)
    d.settimeout(20)
    slow = {"multifd-channels": 2, "max-bandwidth": 4 * MiB}  # 32 MiB takes ~8 s
    for c in (s, d):
        c.cmd("migrate-set-capabilities", capabilities=SETUP_CAPS)
        c.cmd("migrate-set-parameters", **slow)
    assert "waiting for an incoming migration" in _err(d, "migrate", uri=mig)
    d.cmd("migrate-incoming", uri=mig)
    assert "already been started" in _err(d, "migrate-incoming", uri=mig)
    s.cmd("migrate", uri=mig)
    deadline = time.monotonic() + 20
    while s.cmd("query-migrate")["status"] != "active":  # type: ignore[index]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # errors while a migration runs; nothing changes
    caps = s.cmd("query-migrate-capabilities")
    params = s.cmd("query-migrate-parameters")
    assert _err(s, "migrate", uri=mig) == "There's a migration process in progress"
    assert _err(s, "migrate-set-capabilities", capabilities=[
        {"capability": "multifd", "state": False}]) == "There's a migration process in progress"
    assert "cannot be changed while a migration" in _err(
        s, "migrate-set-parameters", **{"multifd-channels": 4})
    assert "cannot be changed while a migration" in _err(
        d, "migrate-set-parameters", **{"multifd-compression": "zlib"})
    assert s.cmd("query-migrate-capabilities") == caps
    assert s.cmd("query-migrate-parameters") == params
    s.cmd("migrate-set-parameters", **{"downtime-limit": 200})  # live-tunable: accepted
    assert s.cmd("query-migrate")["status"] == "active"  # type: ignore[index]
    s.cmd("migrate_cancel")
    statuses = []
    deadline = time.monotonic() + 20
    while "cancelled" not in statuses:
        ev = s.pull_event(wait=max(0.1, deadline - time.monotonic()))
        if ev and ev["event"] == "MIGRATION":
            statuses.append(ev["data"]["status"])
    assert statuses[-2:] == ["cancelling", "cancelled"]
    assert s.cmd("query-migrate")["status"] == "cancelled"  # type: ignore[index]
    assert s.cmd("query-status") == {"status": "running", "running": True, "singlestep": False}
    # the source's state is intact: its workload finishes with the straight-through result
    deadline = time.monotonic() + 30
    while s.cmd("x-query-workload")["step"] < steps:  # type: ignore[index]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert s.cmd("x-query-checksum") == {"checksum": expected_checksum(RAM, SEED, steps)}
    # the destination notices the source went away
    deadline = time.monotonic() + 20
    while d.cmd("query-migrate")["status"] != "failed":  # type: ignore[index]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert d.cmd("query-status")["status"] == "inmigrate"  # type: ignore[index]
    for c in (s, d):
        c.cmd("quit")
        with contextlib.suppress(Exception):
            c.close()
    assert src.stop() == 0
    assert dst.stop() == 0
