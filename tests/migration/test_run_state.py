"""The source's run state after a failed migration is the one it had before (QEMU's
migration_iteration_finish: vm_start() if it was live, else runstate_set(vm_old_state))."""

from __future__ import annotations

import pytest

from multifd.machine.machine import Machine, RunState
from multifd.machine.ramblock import RamBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.source import MigrationSource


def _boom_at_switchover(phase: str) -> None:
    if phase == "switchover":
        raise RuntimeError("injected failure after the pause")


@pytest.mark.parametrize("start", [RunState.PRELAUNCH, RunState.PAUSED, RunState.RUNNING])
def test_failure_after_switchover_restores_the_run_state(start: RunState) -> None:
    src = Machine([RamBlock("pc.ram", 1 << 20)])
    dst = Machine([RamBlock("pc.ram", 1 << 20)], incoming=True)
    if start is RunState.RUNNING:
        src.start()
    elif start is RunState.PAUSED:
        src.set_state(RunState.PAUSED)
    events: list[str] = []
    src.on_state_change.append(lambda ev, _st: events.append(ev))
    dest = MigrationDestination(dst, accept_timeout=10)
    uri = dest.listen("tcp:127.0.0.1:0")
    source = MigrationSource(src)
    source.on_phase = _boom_at_switchover
    try:
        source.start(uri)
        assert str(source.wait(30)) == "failed"
        assert source.error == "injected failure after the pause"
        assert src.state is start
        assert events == (["STOP", "RESUME"] if start is RunState.RUNNING else [])
        dest.wait(30)
    finally:
        src.close()
        dst.close()
