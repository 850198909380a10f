"""Save handlers: registry order and section ids, the switchover loop, and live-phase
device state that overlaps RAM instead of blocking it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from multifd.machine.demo import BigStateDevice
from multifd.machine.device import DeviceStateError
from multifd.machine.machine import Machine
from multifd.machine.ramblock import RamBlock
from multifd.migration import ram as ram_mod
from multifd.migration.destination import MigrationDestination
from multifd.migration.handlers import MIG_PRI_DEFAULT, LoadHandlers, SaveHandler, SaveHandlers
from multifd.migration.mainstream import MainStreamWriter
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.profile import QEMU_10
from multifd.migration.source import MigrationSource
from multifd.wire.constants import SectionType
from multifd.wire.errors import BadName, Mismatch


class Recorder(SaveHandler):
    """A handler that logs its calls and is done after ``rounds`` final iterations."""

    def __init__(self, name: str, log: list[str], *, live: bool = True, rounds: int = 1,
                 priority: int = MIG_PRI_DEFAULT) -> None:
        self.idstr = name
        self.log = log
        self.live = live
        self.rounds = rounds
        self.priority = priority

    def is_live(self) -> bool:
        return self.live

    def iterate(self, final: bool) -> bool:
        self.log.append(f"{self.idstr}:{'final' if final else 'live'}")
        if not final:
            return False
        self.rounds -= 1
        return self.rounds <= 0


def _registry(*handlers: SaveHandler) -> SaveHandlers:
    reg = SaveHandlers(MainStreamWriter(lambda bufs: None))
    for h in handlers:
        reg.register(h)
    return reg


def test_registration_gives_section_ids_priority_gives_order() -> None:
    log: list[str] = []
    a, b, c = Recorder("a", log), Recorder("b", log, priority=5), Recorder("c", log)
    reg = _registry(a, b, c)
    assert [h.section_id for h in (a, b, c)] == [0, 1, 2]
    assert [h.idstr for h in reg] == ["b", "a", "c"]  # higher priority first, then stable


def test_switchover_runs_live_handlers_until_done_then_the_rest() -> None:
    log: list[str] = []
    reg = _registry(Recorder("ram", log), Recorder("slow", log, rounds=3),
                    Recorder("full", log, live=False), Recorder("dev", log))
    checks: list[int] = []
    reg.switchover(check=lambda left: checks.append(len(left)))
    assert log == ["ram:final", "slow:final", "dev:final",  # round 1 of the live group
                   "slow:final", "slow:final",  # only the one not done yet
                   "full:final"]  # non-iterable sections after every live one
    assert checks == [3, 1, 1, 1]  # before every round, with the handlers left


def test_switchover_check_stops_the_loop() -> None:
    log: list[str] = []
    reg = _registry(Recorder("forever", log, rounds=10**9))

    def check(left: list[SaveHandler]) -> None:
        if len(log) >= 3:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        reg.switchover(check=check)
    assert len(log) == 3


def test_load_registry_lookups_are_checked() -> None:
    class Sink(Recorder):
        pass

    from multifd.migration.handlers import LoadHandler

    class L(LoadHandler):
        idstr = "dev"
        version_id = 2

        def load_state(self, kind: SectionType, version_id: int, data: Any) -> None:
            pass

    reg = LoadHandlers()
    h = reg.register(L())
    with pytest.raises(ValueError, match="two load handlers for dev/0"):
        reg.register(L())
    assert reg.open_section(7, "dev", 0, 2) is h
    assert reg.section(7) == (h, 2)
    with pytest.raises(BadName, match=r"unknown section \(idstr=nope/0\)"):
        reg.open_section(8, "nope", 0, 1)
    with pytest.raises(Mismatch, match="version 3 is newer than ours"):
        reg.open_section(8, "dev", 0, 3)
    with pytest.raises(Mismatch, match="section body for an unknown section"):
        reg.section(9)


# -- live-phase device state overlaps RAM ---------------------------------------------------

class GatedDevice(BigStateDevice):
    """Its live save job holds its buffers back until RAM has iterated three more times:
    that only happens if RAM keeps going while the device's job runs."""

    ram_rounds: list[int]

    def save_state_buffers(self, final: bool) -> Iterator[Any]:
        if not final and not getattr(self, "_gated", False):
            self._gated = True
            start = self.ram_rounds[0]
            deadline = time.monotonic() + 20
            while self.ram_rounds[0] < start + 3:
                if time.monotonic() > deadline:
                    raise DeviceStateError("RAM did not iterate while the live job ran")
                time.sleep(0.002)
        yield from super().save_state_buffers(final)


def _pc() -> tuple[MigrationParameters, MigrationCapabilities]:
    p = MigrationParameters()
    # 1 ms: the device's pending state keeps the migration in the live phase meanwhile
    p.set({"multifd-channels": 2, "downtime-limit": 1})
    c = MigrationCapabilities()
    c.set([{"capability": "multifd", "state": True}])
    return p, c


def _migrate(dev: BigStateDevice) -> tuple[MigrationSource, MigrationDestination,
                                          BigStateDevice, Machine, Machine]:
    src = Machine([RamBlock("pc.ram", 4 << 20)])
    src.add_device(dev)
    src.blocks["pc.ram"].view[:4096] = b"\x5a" * 4096
    dst = Machine([RamBlock("pc.ram", 4 << 20)])
    dst_dev = BigStateDevice(dev.size, chunk_size=dev.chunk_size, populate=False)
    dst.add_device(dst_dev)
    dst.set_incoming()
    p, c = _pc()
    dest = MigrationDestination(dst, params=p, caps=c, profile=QEMU_10, accept_timeout=10)
    uri = dest.listen("tcp:127.0.0.1:0")
    p, c = _pc()
    source = MigrationSource(src, params=p, caps=c, profile=QEMU_10)
    source.start(uri)
    source.wait(60)
    dest.wait(60)
    return source, dest, dst_dev, src, dst


def test_live_device_state_overlaps_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    rounds = [0]
    real = ram_mod.RamSaveHandler.iterate

    def counted(self: ram_mod.RamSaveHandler, final: bool) -> bool:
        if not final:
            rounds[0] += 1
        return real(self, final)

    monkeypatch.setattr(ram_mod.RamSaveHandler, "iterate", counted)
    dev = GatedDevice(4 << 20, chunk_size=64 << 10)
    dev.ram_rounds = rounds
    source, dest, dst_dev, src, dst = _migrate(dev)
    try:
        assert (str(source.status.status), str(dest.status.status)) == (
            "completed", "completed"), (source.error, dest.error)
        assert dst_dev.checksum() == dev.checksum()
        assert bytes(dst.blocks["pc.ram"].view[:4096]) == b"\x5a" * 4096
        st = source.device_state_stats()
        assert st["device_state_multifd_bytes"] >= 4 << 20  # the bulk went in the live phase
        assert source.device_state_stats() == dest.device_state_stats()
    finally:
        src.close()
        dst.close()


class FailingLiveDevice(BigStateDevice):
    def save_state_buffers(self, final: bool) -> Iterator[Any]:
        if not final:
            yield from list(super().save_state_buffers(final))[:2]
            raise DeviceStateError("the device's live save broke")
        yield from super().save_state_buffers(final)


def test_a_failed_live_job_fails_the_migration_naming_it() -> None:
    dev = FailingLiveDevice(4 << 20, chunk_size=64 << 10)
    source, dest, _dst_dev, src, dst = _migrate(dev)
    try:
        assert str(source.status.status) == "failed"
        assert "save-live:bigstate" in (source.error or "")
        assert "the device's live save broke" in (source.error or "")
        assert str(dest.status.status) == "failed"
        assert src.is_running is False  # never started: stays as it was
    finally:
        src.close()
        dst.close()
