"""MigrationSource -> MigrationDestination in one process over 127.0.0.1.

Live runs use the demo workload (it keeps dirtying memory during the migration) and are
verified by the checksum of the same computation run without migration. Failure runs
check the source's promise: it keeps running and its state is untouched.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from multifd.machine.demo import DemoWorkload, build_demo_machine, expected_checksum
from multifd.machine.machine import Machine
from multifd.machine.ramblock import RamBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.profile import get_profile
from multifd.migration.source import MigrationSource

RAM = 16 << 20
STEPS = 4000


def _setup(
    multifd: bool = True, **params: object
) -> tuple[MigrationParameters, MigrationCapabilities]:
    p = MigrationParameters()
    p.set({"max-bandwidth": 0, **params})
    c = MigrationCapabilities()
    c.set([{"capability": "multifd", "state": multifd}, {"capability": "events", "state": True}])
    return p, c


def _live_migration(profile: str, uri: str = "tcp:127.0.0.1:0", *, multifd: bool = True,
                    dirty_rate: float = 64.0, **params: object) -> tuple[MigrationSource,
                                                                          MigrationDestination,
                                                                          Machine]:
    p, c = _setup(multifd, **params)
    dst_machine = build_demo_machine(RAM, populate=False)
    dst_machine.set_incoming()
    dst = MigrationDestination(dst_machine, params=p, caps=c, profile=get_profile(profile))
    bound = dst.listen(uri)
    src_machine = build_demo_machine(RAM, total_steps=STEPS)
    src_machine.start()
    work = DemoWorkload(src_machine, dirty_rate_mib_s=dirty_rate)
    work.run_in_thread()
    time.sleep(0.05)
    src = MigrationSource(src_machine, params=p, caps=c, profile=get_profile(profile))
    src.start(bound)
    assert str(src.wait(60)) == "completed", src.error
    work.stop(10)
    assert str(dst.wait(60)) == "completed", dst.error
    src_machine.close()
    return src, dst, dst_machine


@pytest.mark.parametrize(
    ("profile", "compression", "channels"),
    [
        ("qemu-10", "none", 1),
        ("qemu-10", "zstd", 2),
        ("qemu-10", "zlib", 4),
        ("qemu-10", "none", 8),
        ("qemu-7.2", "none", 2),
        ("qemu-7.2", "zlib", 1),
        ("qemu-7.2", "zstd", 4),
    ],
)
def test_live_migration_verified(profile: str, compression: str, channels: int) -> None:
    src, dst, machine = _live_migration(
        profile, **{"multifd-compression": compression, "multifd-channels": channels})
    assert machine.is_running
    DemoWorkload(machine).run_to_completion()
    assert machine.checksum() == expected_checksum(RAM, 1, STEPS)
    assert dst.query() == {"status": "completed"}  # QEMU's destination reports status only
    q = src.query()
    assert q["status"] == "completed"
    for key in ("total-time", "downtime", "setup-time"):
        assert key in q
    ram = q["ram"]
    assert ram["total"] == machine.total_ram()
    assert ram["normal"] > 0 and ram["dirty-sync-count"] >= 2
    per_channel = src.channel_stats()
    assert len(per_channel) == channels
    assert all(ch["sync_packets"] >= 1 for ch in per_channel)
    machine.close()


@pytest.mark.parametrize("profile", ["qemu-10", "qemu-7.2"])
def test_single_stream_tcp(profile: str) -> None:
    _, _, machine = _live_migration(profile, multifd=False)
    DemoWorkload(machine).run_to_completion()
    assert machine.checksum() == expected_checksum(RAM, 1, STEPS)
    machine.close()


def _paused_machine(seed: int = 3) -> Machine:
    m = build_demo_machine(RAM, seed=seed, total_steps=10)
    return m


@pytest.mark.parametrize("kind", ["file", "exec"])
def test_file_and_exec_transports(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "stream.bin"
    out_uri = f"file:{path}" if kind == "file" else f"exec:cat > {path}"
    in_uri = f"file:{path}" if kind == "file" else f"exec:cat {path}"
    p, c = _setup(multifd=False)
    src_machine = _paused_machine()
    src = MigrationSource(src_machine, params=p, caps=c)
    src.start(out_uri)
    assert str(src.wait(30)) == "completed", src.error
    assert path.read_bytes()[:4] == b"QEVM"
    dst_machine = build_demo_machine(RAM, seed=3, populate=False)
    dst_machine.set_incoming()
    dst = MigrationDestination(dst_machine, params=p, caps=c)
    dst.listen(in_uri)
    assert str(dst.wait(30)) == "completed", dst.error
    assert dst_machine.checksum() == src_machine.checksum()
    assert not dst_machine.is_running  # the source was paused: so is the destination
    src_machine.close()
    dst_machine.close()


def _running_machine_without_workload() -> Machine:
    m = build_demo_machine(RAM, seed=5, total_steps=10)
    m.start()
    return m


@pytest.mark.parametrize("phase", ["setup", "active", "device"])
def test_cancel_keeps_source_running_and_intact(phase: str) -> None:
    p, c = _setup(**{"max-bandwidth": 8 << 20})  # slow enough to catch it mid-way
    dst_machine = build_demo_machine(RAM, seed=5, populate=False)
    dst_machine.set_incoming()
    dst = MigrationDestination(dst_machine, params=p, caps=c)
    uri = dst.listen("tcp:127.0.0.1:0")
    machine = _running_machine_without_workload()
    before = machine.checksum()
    hit = threading.Event()
    src: MigrationSource

    def on_event(name: str, data: dict[str, object]) -> None:
        if name == "MIGRATION" and data.get("status") == phase and not hit.is_set():
            hit.set()
            src.cancel()

    src = MigrationSource(machine, params=p, caps=c, on_event=on_event)
    if phase == "device":
        p.set({"max-bandwidth": 0})
    src.start(uri)
    st = src.wait(30)
    assert hit.is_set()
    assert str(st) == "cancelled"
    assert machine.is_running
    assert machine.checksum() == before
    if phase == "setup" and str(dst.wait(2)) == "setup":
        dst.cancel()  # never connected: like QEMU, a destination waits until told
    assert str(dst.wait(30)) == "failed"
    assert not dst_machine.is_running
    machine.close()
    dst_machine.close()


def test_dead_destination_fails_source_quickly() -> None:
    p, c = _setup(**{"max-bandwidth": 4 << 20})
    dst_machine = build_demo_machine(RAM, populate=False)
    dst_machine.set_incoming()
    dst = MigrationDestination(dst_machine, params=p, caps=c)
    uri = dst.listen("tcp:127.0.0.1:0")
    machine = _running_machine_without_workload()
    before = machine.checksum()
    src = MigrationSource(machine, params=p, caps=c)
    src.start(uri)
    assert src.status.wait_for(["active"], 10) is not None
    time.sleep(0.2)
    t0 = time.monotonic()
    dst.cancel()  # the destination goes away mid-migration
    st = src.wait(10)
    assert str(st) == "failed"
    assert time.monotonic() - t0 < 10
    assert src.error
    assert machine.is_running and machine.checksum() == before
    # a retry to a fresh destination succeeds
    p.set({"max-bandwidth": 0})
    dst2_machine = build_demo_machine(RAM, seed=5, populate=False)
    dst2_machine.set_incoming()
    dst2 = MigrationDestination(dst2_machine, params=p, caps=c)
    src2 = MigrationSource(machine, params=p, caps=c)
    src2.start(dst2.listen("tcp:127.0.0.1:0"))
    assert str(src2.wait(30)) == "completed", src2.error
    assert str(dst2.wait(30)) == "completed", dst2.error
    assert dst2_machine.checksum() == machine.checksum()
    for m in (machine, dst_machine, dst2_machine):
        m.close()


# A destination that refuses the stream resets its connections: the source, which has no
# return path, fails on the broken connection ("multifd channel 0 failed: BrokenPipeError:
# [Errno 32] Broken pipe"; on another timing a reset, or the main channel closed).
REFUSED_BY_DESTINATION = r"Broken pipe|Connection reset by peer|closed the main channel"


def _assert_source_failed_untouched(src: MigrationSource, machine: Machine, before: str,
                                    events: list[str]) -> None:
    """The source failed (never "completed" into a destination that refused the stream),
    and its machine - not running when the migration started - was neither started nor
    changed. (Its state label is prelaunch, or paused when the failure came after the
    switchover relabelled it; no RESUME or STOP either way.)"""
    assert str(src.wait(30)) == "failed", src.error
    assert re.search(REFUSED_BY_DESTINATION, src.error or ""), src.error
    assert not machine.is_running and events == [], (machine.state, events)
    assert machine.checksum() == before


def test_machine_type_mismatch_is_a_clear_error() -> None:
    p, c = _setup()
    dst_machine = build_demo_machine(RAM, populate=False)
    dst_machine.set_incoming()
    dst = MigrationDestination(dst_machine, params=p, caps=c, machine_type="other-machine")
    uri = dst.listen("tcp:127.0.0.1:0")
    machine = _paused_machine()
    before = machine.checksum()
    events: list[str] = []
    machine.on_state_change.append(lambda event, _state: events.append(event))
    src = MigrationSource(machine, params=p, caps=c)
    src.start(uri)
    assert str(dst.wait(30)) == "failed"
    assert "machine type received is 'multifd-python' and local is 'other-machine'" in (
        dst.error or "")
    _assert_source_failed_untouched(src, machine, before, events)
    assert not dst_machine.is_running
    machine.close()
    dst_machine.close()


@pytest.mark.parametrize(("blocks", "words"), [
    ([("pc.ram", RAM // 2), ("pc.bios", 256 << 10)], ["pc.ram", str(RAM)]),
    ([("pc.ram", RAM)], ["unknown RAM block", "pc.bios"]),
])
def test_ram_block_mismatch_is_a_clear_error(blocks: list[tuple[str, int]],
                                             words: list[str]) -> None:
    p, c = _setup()
    dst_machine = Machine([RamBlock(n, size) for n, size in blocks], [])
    dst_machine.set_incoming()
    dst = MigrationDestination(dst_machine, params=p, caps=c)
    uri = dst.listen("tcp:127.0.0.1:0")
    machine = _paused_machine()
    before = machine.checksum()
    events: list[str] = []
    machine.on_state_change.append(lambda event, _state: events.append(event))
    src = MigrationSource(machine, params=p, caps=c)
    src.start(uri)
    assert str(dst.wait(30)) == "failed"
    for w in words:
        assert w in (dst.error or "")
    _assert_source_failed_untouched(src, machine, before, events)
    assert not dst_machine.is_running
    machine.close()
    dst_machine.close()


def test_events_and_status_sequence() -> None:
    p, c = _setup()
    events: list[tuple[str, dict[str, object]]] = []
    dst_machine = build_demo_machine(RAM, populate=False)
    dst_machine.set_incoming()
    dst = MigrationDestination(dst_machine, params=p, caps=c)
    uri = dst.listen("tcp:127.0.0.1:0")
    machine = _running_machine_without_workload()
    src = MigrationSource(machine, params=p, caps=c,
                          on_event=lambda n, d: events.append((n, d)))
    src.start(uri)
    assert str(src.wait(30)) == "completed"
    statuses = [d["status"] for n, d in events if n == "MIGRATION"]
    assert statuses == ["setup", "active", "device", "completed"]
    passes = [d["pass"] for n, d in events if n == "MIGRATION_PASS"]
    assert passes == sorted(passes) and passes[0] == 1
    assert not machine.is_running  # a completed source stays stopped (QEMU: postmigrate)
    assert str(dst.wait(30)) == "completed"
    assert dst_machine.is_running
    machine.close()
    dst_machine.close()


def test_auto_converge_throttles_a_workload_that_outruns_the_link() -> None:
    """Dirtying far faster than max-bandwidth never converges; auto-converge throttles the
    workload until it does (QEMU's cpu-throttle-* parameters), and the result verifies."""
    p, c = _setup(**{"max-bandwidth": 16 << 20, "downtime-limit": 100,
                     "cpu-throttle-initial": 50, "cpu-throttle-increment": 20})
    c.set([{"capability": "auto-converge", "state": True}])
    dst_machine = build_demo_machine(RAM, populate=False)
    dst_machine.set_incoming()
    dst = MigrationDestination(dst_machine, params=p, caps=c)
    uri = dst.listen("tcp:127.0.0.1:0")
    src_machine = build_demo_machine(RAM, total_steps=10**6)
    src_machine.start()
    work = DemoWorkload(src_machine, dirty_rate_mib_s=0)  # flat out
    work.run_in_thread()
    src = MigrationSource(src_machine, params=p, caps=c)
    src.start(uri)
    seen = 0
    deadline = time.monotonic() + 60
    while not src.status.is_final() and time.monotonic() < deadline:
        seen = max(seen, src.query().get("cpu-throttle-percentage", 0))
        time.sleep(0.05)
    assert str(src.wait(5)) == "completed", src.error
    work.stop(10)
    assert seen >= 50
    assert src_machine.throttle == 0  # switched off again after the migration
    assert str(dst.wait(30)) == "completed", dst.error
    assert dst_machine.checksum() == src_machine.checksum()
    src_machine.close()
    dst_machine.close()
