"""A running guest that keeps dirtying memory, recorded mid-run and replayed.

QEMU 7.2 runs the boot-sector guest (multifd.qemu.guest: it counts passes into every page
of a working set at 16 MiB), `multifd incoming` records it while it runs (QEMU iterates;
we must apply every round in order), `multifd migrate` replays the image into a fresh
QEMU, and after `cont` the replayed guest continues: its working set is consistent and
its pass counter advances past the recorded one.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from multifd.qemu import guest
from multifd.qemu.qemuproc import QemuProcess

from .conftest import Incoming, run_cli, set_multifd

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

WSS = 1024  # pages: 4 MiB written over and over


def _working_set(vm: QemuProcess) -> guest.WorkingSet:
    return guest.check_working_set(vm.pmemsave(guest.WSS_BASE, WSS * guest.PAGE_SIZE), WSS)


@pytest.mark.parametrize("channels", [0, 2])
def test_running_guest_recorded_and_replayed(tmp_path: Path, channels: int) -> None:
    img = guest.image(tmp_path / "g.img", WSS)
    image = tmp_path / "live.img"
    with QemuProcess(guest.drive_args(img), name="src", memory_mib=64) as src:
        set_multifd(src, channels, "none")
        src.cmd("cont")
        deadline = time.monotonic() + 60  # SeaBIOS hands over after ~4-10 s
        while not _working_set(src).started:
            assert time.monotonic() < deadline, "guest never wrote its working set"
            time.sleep(0.1)
        time.sleep(0.3)  # it is now rewriting its working set continuously
        assert src.status() == "running"
        inc = Incoming(f"unix:{tmp_path}/in.sock", image, "--profile", "qemu-7.2",
                       "--channels", str(channels), "--idle-timeout", "30")
        src.migrate(inc.uri)
        info = src.wait_migration(timeout=60)
        summary = inc.result()
        recorded = _working_set(src)  # the source stopped at completion (postmigrate)
        assert src.status() == "postmigrate"
    assert recorded.consistent, recorded.problem
    # a live migration: QEMU iterated (several dirty syncs) and pages came more than once
    assert info["ram"]["dirty-sync-count"] >= 2, info
    assert summary["pages"]["normal"] >= WSS

    with QemuProcess(guest.drive_args(img), name="dst", memory_mib=64,
                     incoming="defer") as dst:
        set_multifd(dst, channels, "none")
        uri = f"unix:{tmp_path}/out.sock"
        dst.migrate_incoming(uri)
        res = run_cli("migrate", str(image), uri, "--profile", "qemu-7.2", "--channels",
                      str(channels), "--idle-timeout", "30")
        assert res.returncode == 0, res.stderr
        dst.wait_migration(timeout=60)
        loaded = _working_set(dst)
        # exactly the memory the source had when it stopped
        assert loaded == recorded
        dst.cmd("cont")
        time.sleep(0.5)
        dst.cmd("stop")
        later = _working_set(dst)
        assert later.consistent, later.problem
        assert later.max_pass > recorded.max_pass, (recorded, later)
