"""query-migrate's measured figures against a workload whose dirty rate is known.

A writer thread marks pages of ``pc.ram`` dirty in order, at a fixed pace, while a
bandwidth-limited migration runs; dirty-pages-rate must match that pace, pages-per-second
the pages actually sent, and the bytes must split at the pause into precopy/downtime.
"""

from __future__ import annotations

import statistics
import threading
import time

import pytest

from multifd.machine.demo import RAM_BLOCK, build_demo_machine
from multifd.machine.machine import Machine
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.profile import get_profile
from multifd.migration.source import MigrationSource

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
RAM = 128 * MiB
DIRTY_MIB_S = 50
PAGE = 4096
CHUNK_PAGES = 128  # pages marked per tick


class PacedWriter:
    """Marks ``DIRTY_MIB_S`` MiB/s of pages dirty, sequentially (wrapping), on a schedule
    that catches up after a late tick, and counts what it marked."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.block = machine.blocks[RAM_BLOCK]
        self.marked = 0
        self.t0 = 0.0
        self.t1 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> float:
        """Stop and return the true rate in pages/s."""
        self._stop.set()
        self._thread.join(10)
        return self.marked / (self.t1 - self.t0)

    def _run(self) -> None:
        rate = DIRTY_MIB_S * MiB / PAGE
        pages = self.block.num_pages
        pos = 0
        self.t0 = time.monotonic()
        while not self._stop.is_set() and self.machine.is_running:  # a paused guest writes nothing
            due = int((time.monotonic() - self.t0) * rate)
            while self.marked + CHUNK_PAGES <= due:
                n = min(CHUNK_PAGES, pages - pos)
                self.block.mark_dirty(pos * PAGE, n * PAGE)
                self.marked += n
                pos = (pos + n) % pages
            self.t1 = time.monotonic()
            time.sleep(0.005)


def _params() -> tuple[MigrationParameters, MigrationCapabilities]:
    p = MigrationParameters()
    p.set({"max-bandwidth": 64 * MiB, "multifd-channels": 2})
    c = MigrationCapabilities()
    c.set([{"capability": "multifd", "state": True}])
    return p, c


def test_measured_rates_match_the_workload() -> None:
    p, c = _params()
    dst_machine = build_demo_machine(RAM, populate=False)
    dst_machine.set_incoming()
    dst = MigrationDestination(dst_machine, params=p, caps=c, profile=get_profile("qemu-10"))
    bound = dst.listen("tcp:127.0.0.1:0")
    src_machine = build_demo_machine(RAM)
    src_machine.start()
    src = MigrationSource(src_machine, params=p, caps=c, profile=get_profile("qemu-10"))

    # Nothing ran yet: no figures at all.
    assert src.query() == {}
    for name in ("dirty_pages_rate", "pages_per_second", "downtime_bytes", "precopy_bytes"):
        assert getattr(src.stats, name) == 0, name

    writer = PacedWriter(src_machine)
    writer.start()
    time.sleep(0.05)
    src.start(bound)
    rates: list[int] = []
    pps: list[int] = []
    t_active = 0.0
    while src.wait(0.05).value not in ("completed", "failed", "cancelled"):
        info = src.query()
        if info.get("status") != "active":
            continue
        t_active = t_active or time.monotonic()
        ram = info["ram"]
        assert ram["downtime-bytes"] == 0 and ram["precopy-bytes"] == ram["transferred"]
        rates.append(ram["dirty-pages-rate"])
        if ram["pages-per-second"]:
            pps.append(ram["pages-per-second"])
    true_rate = writer.stop()
    assert str(src.wait(60)) == "completed", src.error
    assert str(dst.wait(60)) == "completed", dst.error
    info = src.query()
    ram = info["ram"]
    active_s = src.t_pause - src.t_setup_done
    seen = sorted(set(rates))
    print(f"\ntrue rate {true_rate:.0f} pages/s; dirty-pages-rate seen {seen}; "
          f"final {src.stats.dirty_pages_rate}; syncs {ram['dirty-sync-count']}; "
          f"active {active_s:.2f} s; pps median {statistics.median(pps):.0f} "
          f"(sent/active {(ram['normal'] + ram['duplicate']) / active_s:.0f}) "
          f"of {len(pps)}; precopy {ram['precopy-bytes']} downtime {ram['downtime-bytes']} "
          f"transferred {ram['transferred']}; downtime {info['downtime']} ms")
    src_machine.close()
    dst_machine.close()

    assert active_s >= 2.0  # long enough for 1 s rate periods
    assert ram["dirty-sync-count"] >= 3  # setup, live syncs, the final one
    assert "dirty-pages-rate" not in ram  # completed: QEMU leaves it out
    # dirty-pages-rate: the last period measured while active, and the counter after.
    assert rates and rates[-1] > 0
    assert rates[-1] == pytest.approx(true_rate, rel=0.3)
    assert src.stats.dirty_pages_rate == pytest.approx(true_rate, rel=0.3)
    # pages-per-second: over 100 ms windows; its median agrees with pages sent / time.
    pages = ram["normal"] + ram["duplicate"]
    mean_pps = pages / active_s
    assert ram["pages-per-second"] > 0
    assert mean_pps / 2 <= statistics.median(pps) <= mean_pps * 2
    # The bytes split at the pause.
    assert 0 < ram["downtime-bytes"] < ram["transferred"]
    assert ram["precopy-bytes"] + ram["downtime-bytes"] == ram["transferred"]
    assert ram["postcopy-bytes"] == 0
