"""End to end: a demo machine with a BigStateDevice migrated over 127.0.0.1 (in-process)."""

from __future__ import annotations

import threading
import time

import pytest

from multifd.machine.demo import (
    CpuDevice,
    DemoWorkload,
    build_demo_machine,
    expected_checksum,
)
from multifd.machine.machine import Machine
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.profile import get_profile
from multifd.migration.source import MigrationSource

RAM = 8 << 20
DEV = 16 << 20


def _pc(channels: int = 2) -> tuple[MigrationParameters, MigrationCapabilities]:
    p = MigrationParameters()
    p.set({"multifd-channels": channels})
    c = MigrationCapabilities()
    c.set([{"capability": "multifd", "state": True}])
    return p, c


def migrate(src: Machine, dst: Machine, profile: str = "qemu-10",
            ) -> tuple[MigrationSource, MigrationDestination]:
    dst.set_incoming()
    p, c = _pc()
    dest = MigrationDestination(dst, params=p, caps=c, profile=get_profile(profile),
                                accept_timeout=10)
    uri = dest.listen("tcp:127.0.0.1:0")
    p, c = _pc()
    source = MigrationSource(src, params=p, caps=c, profile=get_profile(profile))
    source.start(uri)
    source.wait(60)
    dest.wait(60)
    return source, dest


def _no_device_threads() -> bool:
    deadline = time.monotonic() + 5
    names: list[str] = []
    while time.monotonic() < deadline:
        names = [t.name for t in threading.enumerate()
                 if t.name.startswith(("devsave", "devload", "multifd"))]
        if not names:
            return True
        time.sleep(0.02)
    raise AssertionError(f"threads left behind: {names}")


@pytest.mark.parametrize(("via", "profile", "expect_buffers"), [
    ("multifd", "qemu-10", True),
    ("main", "qemu-10", False),
    ("multifd", "qemu-7.2", False),  # 7.2 never gets device-state packets: main fallback
])
def test_paused_machine_checksums(via: str, profile: str, expect_buffers: bool) -> None:
    src = build_demo_machine(RAM, device_state_size=DEV, device_state_via_multifd=via == "multifd")
    dst = build_demo_machine(RAM, device_state_size=DEV, populate=False,
                             device_state_via_multifd=via == "multifd")
    try:
        s, d = migrate(src, dst, profile)
        assert (str(s.status.status), str(d.status.status)) == ("completed", "completed"), (
            s.error, d.error)
        assert dst.checksum() == src.checksum()
        sent, got = s.device_state_stats(), d.device_state_stats()
        assert sent == got
        if expect_buffers:
            assert sent["device_state_bytes"] >= DEV and sent["device_state_buffers"] > 16
            per = s.channel_stats()
            assert all(c.get("wire_bytes_device_state", 0) > 0 for c in per)
            assert all(c.get("wire_bytes_ram", 0) > 0 for c in per)
        else:
            assert sent["device_state_buffers"] == 0
            assert all("wire_bytes_device_state" not in c for c in s.channel_stats())
    finally:
        src.close()
        dst.close()
    _no_device_threads()


def test_live_workload_device_state_via_multifd() -> None:
    """The workload dirties the device while the live phase streams it; the destination
    finishes the computation with the checksum of a run without migration."""
    steps = 1500
    src = build_demo_machine(RAM, device_state_size=DEV, total_steps=steps, pages_per_step=16)
    dst = build_demo_machine(RAM, device_state_size=DEV, populate=False)
    try:
        src.start()
        wl = DemoWorkload(src, dirty_rate_mib_s=8)
        wl.run_in_thread()
        time.sleep(0.05)
        s, d = migrate(src, dst)
        wl.stop(10)
        assert str(d.status.status) == "completed", (s.error, d.error)
        cpu = dst.device("cpu")
        assert isinstance(cpu, CpuDevice) and 0 < cpu.step < steps
        assert s.device_state_stats()["device_state_buffers"] > DEV // (1 << 20)
        dst.resume()
        DemoWorkload(dst).run_to_completion()
        want = expected_checksum(RAM, 1, steps, pages_per_step=16, device_state_size=DEV)
        assert dst.checksum() == want
    finally:
        src.close()
        dst.close()
    _no_device_threads()


def test_destination_expects_multifd_but_source_sends_main() -> None:
    """A configuration mismatch fails with a clear error instead of hanging."""
    src = build_demo_machine(RAM, device_state_size=DEV, device_state_via_multifd=False)
    dst = build_demo_machine(RAM, device_state_size=DEV, populate=False)
    try:
        _s, d = migrate(src, dst)
        assert str(d.status.status) == "failed"
        assert d.error == ("device state incomplete: bigstate: CONFIG_STATE buffer never "
                           "arrived (0 applied, 0 held)")
        assert not dst.is_running
    finally:
        src.close()
        dst.close()
    _no_device_threads()


def test_source_sends_multifd_to_device_that_does_not_take_it() -> None:
    src = build_demo_machine(RAM, device_state_size=DEV)
    dst = build_demo_machine(RAM, device_state_size=DEV, populate=False,
                             device_state_via_multifd=False)
    try:
        _s, d = migrate(src, dst)
        assert str(d.status.status) == "failed"
        assert d.error is not None and "does not take multifd state" in d.error
    finally:
        src.close()
        dst.close()
    _no_device_threads()
