"""mapped-ram with a real QEMU 10.0: its files read by us, ours loaded by it.

The guest is the captures' one (64 MiB, paused, pattern at 0x100000); QEMU 10.0 is the
unpacked `.ci/qemu10` binary (the tests skip only when it is absent).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from multifd.qemu.mapped_ram import read_any_image
from tests.conftest import PATTERN_OFFSET
from tests.qemu.conftest import Vms, assert_pattern, record, run_cli, set_multifd

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(120)]


def _qemu_save(vms: Vms, path: Path, channels: int) -> None:
    """QEMU 10.0 `migrate file:PATH` with mapped-ram (+ multifd when channels)."""
    src = vms.start("10.0", "src", pattern=True)
    src.set_migration(multifd=channels > 0, channels=max(channels, 1),
                      caps={"mapped-ram": True})
    src.migrate(f"file:{path}")
    src.wait_migration(timeout=30)
    src.close()


def _qemu_restore(vms: Vms, path: Path, name: str, *, multifd: bool, pattern: bytes) -> None:
    """A fresh QEMU 10.0 loads PATH with `migrate-incoming file:` + mapped-ram."""
    dst = vms.start("10.0", name, incoming="defer")
    dst.set_migration(multifd=multifd, channels=2, caps={"mapped-ram": True})
    dst.migrate_incoming(f"file:{path}")
    dst.wait_migration(timeout=30)
    assert dst.status() == "prelaunch"
    assert_pattern(dst, pattern)
    dst.close()


def test_qemu10_file_restored_by_us_then_migrated_to_qemu10(
        vms: Vms, tmp_path: Path, pattern_bytes: bytes) -> None:
    """QEMU 10.0 saves (mapped-ram, multifd 2 channels) -> we read the file with parallel
    preadv (the pattern is there) -> `multifd migrate FILE tcp:` with 3 channels -> QEMU."""
    saved = tmp_path / "qemu.mr"
    _qemu_save(vms, saved, channels=2)
    st = os.stat(saved)
    assert st.st_blocks * 512 < st.st_size // 4  # QEMU leaves zero pages as holes
    with read_any_image(saved) as img:
        ram = img.blocks["pc.ram"].view
        assert bytes(ram[PATTERN_OFFSET : PATTERN_OFFSET + len(pattern_bytes)]) == pattern_bytes
        assert img.switchover_start
    dst = vms.start("10.0", "dst", incoming="defer")
    set_multifd(dst, 3, "none")
    uri = dst.migrate_incoming("tcp:127.0.0.1:0")
    res = run_cli("migrate", str(saved), uri, "--profile", "qemu-10", "--channels", "3",
                  "--json", "--idle-timeout", "20")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["channels"] == 3
    dst.wait_migration(timeout=30)
    assert dst.status() == "prelaunch"
    assert_pattern(dst, pattern_bytes)


def test_incoming_mapped_ram_restored_by_qemu10(vms: Vms, tmp_path: Path,
                                                pattern_bytes: bytes) -> None:
    """Live QEMU 10.0 -> `multifd incoming --format mapped-ram` -> QEMU 10.0 restores the
    file with mapped-ram + multifd (2 channels) and with mapped-ram alone."""
    image, rx = record(vms, "10.0", tmp_path, channels=2,
                       extra=("--format", "mapped-ram", "--save-channels", "2"))
    assert rx["image_bytes"] == os.stat(image).st_size
    out = run_cli("inspect", str(image))
    assert out.returncode == 0, out.stderr
    assert "capabilities: mapped-ram" in out.stdout and "allocated" in out.stdout
    _qemu_restore(vms, image, "dst-multifd", multifd=True, pattern=pattern_bytes)
    _qemu_restore(vms, image, "dst-plain", multifd=False, pattern=pattern_bytes)
