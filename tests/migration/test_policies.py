"""Timeout policies (migration/policy.py) on in-process migrations over 127.0.0.1.

The workload dirties pages faster than ``max-bandwidth`` sends them, so the migration
never converges by itself; it rewrites each page with its own bytes, so the source's
checksum proves that a failed migration left the state as it was.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from multifd.machine.demo import RAM_BLOCK, build_demo_machine
from multifd.machine.machine import Machine
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import MigrationCapabilities, MigrationParameters, ParameterError
from multifd.migration.policy import SourcePolicy, Watchdog, completion_timeout_s
from multifd.migration.source import MigrationSource
from multifd.migration.stats import MigrationStats
from multifd.qmp import serve_qmp

pytestmark = pytest.mark.timeout(90)
MiB = 1 << 20
RAM = 8 * MiB
SLOW = 2_000_000  # max-bandwidth, bytes/s: 8 MiB take ~4 s


class Dirtier:
    """A workload thread writing random pages back unchanged, ~8 pages per ms of its
    running time (it sleeps inside the workload, so the cpu throttle slows it down)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.stop_ev = threading.Event()
        self.max_throttle = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        block = self.machine.block(RAM_BLOCK)
        rng = np.random.default_rng(7)
        with self.machine.workload():
            while self.machine.safe_point(self.stop_ev):
                idx = np.unique(rng.integers(0, block.num_pages, 8))
                block.pages[idx] = block.pages[idx].copy()
                block.mark_dirty_pages(idx)
                self.max_throttle = max(self.max_throttle, self.machine.throttle)
                time.sleep(0.001)

    def stop(self) -> None:
        self.stop_ev.set()
        self.machine.kick()
        self.thread.join(10)


def _params(**kw: Any) -> tuple[MigrationParameters, MigrationCapabilities]:
    p = MigrationParameters()
    p.set({"max-bandwidth": SLOW, **{k.replace("_", "-"): v for k, v in kw.items()}})
    c = MigrationCapabilities()
    c.set([{"capability": "multifd", "state": True}])
    return p, c


def _migrate(**kw: Any) -> tuple[MigrationSource, MigrationDestination, Machine, Machine,
                                  Dirtier]:
    dm = build_demo_machine(RAM, populate=False)
    dm.set_incoming()
    p, c = _params(**kw)
    dst = MigrationDestination(dm, params=p, caps=c)
    uri = dst.listen("tcp:127.0.0.1:0")
    sm = build_demo_machine(RAM, seed=5)
    sm.start()
    work = Dirtier(sm)
    p, c = _params(**kw)
    src = MigrationSource(sm, params=p, caps=c)
    src.start(uri)
    return src, dst, sm, dm, work


@pytest.fixture
def machines() -> Iterator[list[Machine]]:
    made: list[Machine] = []
    yield made
    for m in made:
        m.close()


def test_completion_timeout_cancel(machines: list[Machine]) -> None:
    before = build_demo_machine(RAM, seed=5)
    checksum = before.checksum()
    before.close()
    src, dst, sm, dm, work = _migrate(x_completion_timeout=2)
    machines += [sm, dm]
    assert str(src.wait(20)) == "failed"
    took = src.t_end - src.t_start
    work.stop()
    assert 2.0 <= took < 4.0, took
    assert src.error is not None and src.error.startswith("x-completion-timeout"), src.error
    assert "within 2 s" in src.error and "remaining" in src.error and "pass" in src.error
    assert src.query()["x-timeout-action"] == "cancel"
    assert sm.is_running and sm.checksum() == checksum
    assert str(dst.wait(10)) == "failed"


def test_completion_timeout_switchover(machines: list[Machine]) -> None:
    src, dst, sm, dm, work = _migrate(x_completion_timeout=2, x_timeout_strategy="switchover",
                                      downtime_limit=1)
    machines += [sm, dm]
    assert str(src.wait(30)) == "completed", src.error
    assert str(dst.wait(10)) == "completed", dst.error
    work.stop()
    assert src.query()["x-timeout-action"] == "switchover"
    assert src.downtime_ms > 1  # forced: above the downtime limit, and reported
    assert dm.checksum() == sm.checksum()


def test_completion_timeout_throttle(machines: list[Machine]) -> None:
    # throttle fast: 95 % at the timeout, 99 % at the next auto-converge step
    src, dst, sm, dm, work = _migrate(x_completion_timeout=2, x_timeout_strategy="throttle",
                                      cpu_throttle_initial=95, cpu_throttle_increment=4)
    machines += [sm, dm]
    assert str(src.wait(60)) == "completed", src.error
    assert str(dst.wait(10)) == "completed", dst.error
    work.stop()
    assert src.query()["x-timeout-action"] == "throttle"
    assert work.max_throttle >= 95
    assert sm.throttle == 0  # auto-converge ends with the migration
    assert dm.checksum() == sm.checksum()


def test_progress_timeout(machines: list[Machine]) -> None:
    src, dst, sm, dm, work = _migrate(x_progress_timeout=1)
    machines += [sm, dm]
    assert str(src.wait(30)) == "failed"
    work.stop()
    assert src.error is not None and src.error.startswith("x-progress-timeout"), src.error
    assert "has not gone down for 1 s" in src.error and "remaining" in src.error
    assert sm.is_running
    assert "x-timeout-action" not in src.query()
    assert str(dst.wait(10)) == "failed"


def test_source_idle_timeout_names_channels(machines: list[Machine]) -> None:
    """A destination that accepts every connection and then reads nothing."""
    lsock = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with lsock:
            lsock.settimeout(10)
            for _ in range(3):  # main + 2 channels
                held.append(lsock.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    sm = build_demo_machine(64 * MiB, seed=5)
    machines.append(sm)
    sm.start()
    p, c = _params(max_bandwidth=0, x_idle_timeout=1)
    src = MigrationSource(sm, params=p, caps=c)
    src.start(f"tcp:127.0.0.1:{lsock.getsockname()[1]}")
    assert str(src.wait(20)) == "failed"
    took = src.t_end - src.t_setup_done
    for s in held:
        s.close()
    assert src.error is not None and src.error.startswith("x-idle-timeout"), src.error
    assert "the destination accepted nothing" in src.error
    assert "main channel silent" in src.error and "multifd channel 1 silent" in src.error
    assert took < 1 + 2, took
    assert sm.is_running


def test_effective_completion_timeout_is_the_sum() -> None:
    p = MigrationParameters()
    assert completion_timeout_s(p, 4 << 30) == 0  # off by default
    p.set({"x-completion-timeout": 10, "x-completion-timeout-per-gib": 3})
    assert completion_timeout_s(p, 4 << 30) == 22
    assert completion_timeout_s(p, 512 * MiB) == 11.5


def test_policy_acts_once_and_reads_parameters_live() -> None:
    p = MigrationParameters(**{"x-completion-timeout": 5, "x-timeout-strategy": "throttle"})
    pol = SourcePolicy(p)
    pol.reset(100.0, RAM)
    st = MigrationStats()
    st.remaining = 10 * MiB
    pol.check(104.0, st)
    assert pol.take() is None
    pol.check(105.0, st)
    assert pol.take() == "throttle" and pol.take() is None
    pol.check(120.0, st)  # once per migration
    assert pol.take() is None
    p.set({"x-progress-timeout": 3})  # migrate-set-parameters during the migration
    with pytest.raises(Exception, match="x-progress-timeout: remaining has not gone down"):
        pol.check(121.0, st)


def test_watchdog_hold_and_silence() -> None:
    counts = {"main channel": 0, "multifd channel 0": 0}
    fired: list[str] = []
    w = Watchdog(lambda: dict(counts), lambda: 2.0, fired.append, peer="source", verb="sent")
    assert w.idle(0.0) is None
    counts["main channel"] = 5
    assert w.idle(1.5) is None
    assert w.idle(3.0) is None  # main moved 1.5 s ago
    w.hold(True)  # busy on our side: silence does not count
    assert w.idle(10.0) is None
    w.hold(False)
    msg = w.idle(12.5)
    assert msg is not None and msg.startswith("x-idle-timeout: the source sent nothing")
    assert "main channel silent 2.5 s" in msg and "multifd channel 0 silent 2.5 s" in msg


def test_parameters_defaults_and_ranges() -> None:
    p = MigrationParameters()
    d = p.as_dict()
    assert d["x-progress-timeout"] == 0 and d["x-completion-timeout"] == 0
    assert d["x-completion-timeout-per-gib"] == 0 and d["x-timeout-strategy"] == "cancel"
    assert d["x-idle-timeout"] == 30 and d["x-confirm-timeout"] == 5
    assert d["x-accept-timeout"] == 30
    with pytest.raises(ParameterError, match="x-timeout-strategy"):
        p.set({"x-timeout-strategy": "retry"})
    with pytest.raises(ParameterError, match="x-confirm-timeout"):
        p.set({"x-confirm-timeout": 0})


def test_qmp_shows_and_sets_policy_parameters(machines: list[Machine]) -> None:
    m = build_demo_machine(4 * MiB, seed=3)
    machines.append(m)
    with tempfile.TemporaryDirectory(prefix="pol") as d:
        srv = serve_qmp(m, f"unix:{d}/m.sock")
        c = QEMUMonitorProtocol(f"{d}/m.sock")
        try:
            c.connect()
            c.settimeout(10)
            q = c.cmd("query-migrate-parameters")
            assert q["x-idle-timeout"] == 30 and q["x-timeout-strategy"] == "cancel"
            reply = c.cmd_raw("migrate-set-parameters", {"x-completion-timeout": 7,
                                                         "x-timeout-strategy": "switchover",
                                                         "x-progress-timeout": 3})
            assert reply == {"return": {}}, reply
            q = c.cmd("query-migrate-parameters")
            assert (q["x-completion-timeout"], q["x-timeout-strategy"],
                    q["x-progress-timeout"]) == (7, "switchover", 3)
            reply = c.cmd_raw("migrate-set-parameters", {"x-timeout-strategy": "later"})
            assert "x-timeout-strategy" in reply["error"]["desc"]
        finally:
            c.close()
            srv.close()
