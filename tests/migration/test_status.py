"""Migration status machine: QEMU names, allowed transitions, listeners, waits."""

from __future__ import annotations

import threading
import time

import pytest

from multifd.migration.status import (
    FINAL_STATUSES,
    IllegalTransition,
    MigrationStatus,
    StatusMachine,
)

pytestmark = pytest.mark.timeout(60)

S = MigrationStatus


def test_qemu_names() -> None:
    names = {s.value for s in MigrationStatus}
    for n in ("none", "setup", "cancelling", "cancelled", "active", "postcopy-active",
              "postcopy-paused", "postcopy-recover", "completed", "failed", "colo",
              "pre-switchover", "device", "wait-unplug"):
        assert n in names
    assert str(S.POSTCOPY_ACTIVE) == "postcopy-active"
    assert S("wait-unplug") is S.WAIT_UNPLUG


def test_source_happy_path_and_listeners() -> None:
    sm = StatusMachine()
    seen: list[MigrationStatus] = []
    sm.add_listener(seen.append)
    for st in (S.SETUP, S.ACTIVE, S.DEVICE, S.COMPLETED):
        sm.set(st)
    assert seen == [S.SETUP, S.ACTIVE, S.DEVICE, S.COMPLETED]
    assert sm.status is S.COMPLETED and sm.current is S.COMPLETED
    assert sm.is_final() and not sm.is_running()


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ([], S.ACTIVE),
        ([], S.COMPLETED),
        ([S.SETUP], S.COMPLETED),
        ([S.SETUP], S.DEVICE),
        ([S.SETUP, S.ACTIVE, S.DEVICE], S.ACTIVE),
        ([S.SETUP, S.ACTIVE, S.COMPLETED], S.FAILED),
        ([S.SETUP, S.ACTIVE, S.COMPLETED], S.CANCELLING),
        ([S.SETUP, S.CANCELLING], S.ACTIVE),
        ([S.SETUP, S.CANCELLING], S.FAILED),
        ([S.SETUP, S.CANCELLING, S.CANCELLED], S.CANCELLED),
        ([S.SETUP, S.FAILED], S.ACTIVE),
    ],
)
def test_illegal_transitions(path: list[MigrationStatus], bad: MigrationStatus) -> None:
    sm = StatusMachine()
    for st in path:
        sm.set(st)
    before = sm.status
    with pytest.raises(IllegalTransition, match=f"{before} -> {bad}"):
        sm.set(bad)
    assert sm.status is before


@pytest.mark.parametrize("at", [S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE, S.WAIT_UNPLUG])
def test_cancel_and_fail_from_any_running_status(at: MigrationStatus) -> None:
    path = {S.SETUP: [S.SETUP], S.ACTIVE: [S.SETUP, S.ACTIVE],
            S.PRE_SWITCHOVER: [S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER],
            S.DEVICE: [S.SETUP, S.ACTIVE, S.DEVICE], S.WAIT_UNPLUG: [S.SETUP, S.WAIT_UNPLUG]}[at]
    a, b = StatusMachine(), StatusMachine()
    for st in path:
        a.set(st)
        b.set(st)
    a.set(S.CANCELLING)
    a.set(S.CANCELLED)
    b.set(S.FAILED, error="socket closed")
    assert b.error == "socket closed"


def test_error_cleared_by_new_migration() -> None:
    sm = StatusMachine()
    sm.set(S.SETUP)
    assert sm.fail("boom")
    assert sm.status is S.FAILED and sm.error == "boom"
    sm.set(S.SETUP)
    assert sm.error is None
    sm.error = "set by hand"
    assert sm.error == "set by hand"


def test_cancel_wins_over_fail() -> None:
    sm = StatusMachine()
    sm.set(S.SETUP)
    assert sm.cancel()
    assert not sm.cancel()
    assert not sm.fail("late error")
    assert sm.status is S.CANCELLING
    sm.set(S.CANCELLED)
    assert not sm.cancel()


def test_try_set_compare_and_set() -> None:
    sm = StatusMachine()
    sm.set(S.SETUP)
    assert not sm.try_set(S.ACTIVE, S.DEVICE)
    assert sm.try_set(S.SETUP, S.ACTIVE)
    assert sm.status is S.ACTIVE


def test_string_statuses_and_old_value() -> None:
    sm = StatusMachine()
    assert sm.set("setup") is S.NONE
    assert sm.set("active") is S.SETUP
    with pytest.raises(ValueError):
        sm.set("bogus")


def test_wait_for() -> None:
    sm = StatusMachine()
    sm.set(S.SETUP)
    t0 = time.monotonic()
    assert sm.wait_for([S.COMPLETED], timeout=0.1) is None
    assert time.monotonic() - t0 < 1

    def run() -> None:
        time.sleep(0.05)
        sm.set(S.ACTIVE)
        sm.set(S.DEVICE)
        sm.set(S.COMPLETED)

    threading.Thread(target=run).start()
    assert sm.wait_for(FINAL_STATUSES, timeout=5) is S.COMPLETED
    assert sm.wait_for("completed", timeout=0) is S.COMPLETED


def test_listener_errors_do_not_break_the_machine(caplog: pytest.LogCaptureFixture) -> None:
    sm = StatusMachine()
    seen: list[MigrationStatus] = []

    def bad(_: MigrationStatus) -> None:
        raise RuntimeError("listener bug")

    sm.add_listener(bad)
    sm.add_listener(seen.append)
    sm.set(S.SETUP)
    assert seen == [S.SETUP]
    assert "listener bug" in caplog.text
    sm.remove_listener(bad)
    sm.set(S.ACTIVE)
    assert seen == [S.SETUP, S.ACTIVE]


def test_listener_may_read_status() -> None:
    sm = StatusMachine()
    got: list[tuple[MigrationStatus, MigrationStatus]] = []
    sm.add_listener(lambda st: got.append((st, sm.status)))
    sm.set(S.SETUP)
    assert got == [(S.SETUP, S.SETUP)]


def test_events_in_order_under_threads() -> None:
    sm = StatusMachine()
    sm.set(S.SETUP)
    sm.set(S.ACTIVE)
    seen: list[MigrationStatus] = []
    sm.add_listener(seen.append)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(sm.cancel())) for _ in range(8)]
    threads += [threading.Thread(target=lambda: results.append(sm.fail("x"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert len(seen) == 1 and seen[0] in (S.CANCELLING, S.FAILED)
