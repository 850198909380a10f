"""Python state through a mapped-ram file: MigrationSource(file:) -> MigrationDestination(file:).

Round trips with 1, 2 and 4 channels (multifd on and off), with device state (which goes
in the main stream: no multifd packets exist in a file), with direct-io where the file
system allows it, while the workload writes; the file is sparse; bad files fail with an
error naming the block and the offset and leave the destination paused.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from multifd.machine.demo import DemoWorkload, build_demo_machine, expected_checksum
from multifd.machine.machine import Machine
from multifd.machine.ramblock import RamBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.mapped_ram import direct_io_supported
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.source import MigrationSource
from multifd.wire.mapped_ram import MappedRamHeader

RAM = 16 << 20
DEV = 1 << 20
MiB = 1 << 20


def _setup(channels: int, multifd: bool = True, **params: object
           ) -> tuple[MigrationParameters, MigrationCapabilities]:
    p = MigrationParameters()
    p.set({"max-bandwidth": 0, "multifd-channels": channels, **params})
    c = MigrationCapabilities()
    c.set([{"capability": "multifd", "state": multifd},
           {"capability": "mapped-ram", "state": True}])
    return p, c


def _save(machine: Machine, path: Path, channels: int, multifd: bool = True,
          **params: object) -> MigrationSource:
    p, c = _setup(channels, multifd, **params)
    src = MigrationSource(machine, params=p, caps=c)
    src.start(f"file:{path}")
    assert str(src.wait(60)) == "completed", src.error
    return src


def _restore(machine: Machine, path: Path, channels: int, multifd: bool = True,
             **params: object) -> MigrationDestination:
    p, c = _setup(channels, multifd, **params)
    machine.set_incoming()
    dst = MigrationDestination(machine, params=p, caps=c)
    dst.listen(f"file:{path}")
    dst.wait(60)
    return dst


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("channels", "multifd"), [(1, False), (1, True), (2, True),
                                                   (4, True)])
def test_live_round_trip_with_device_state(tmp_path: Path, channels: int,
                                           multifd: bool) -> None:
    """The demo workload keeps writing while the source saves; the restored machine
    finishes the computation with the uninterrupted checksum. The device's state goes
    in the main stream (mapped-ram has no multifd device-state packets)."""
    path = tmp_path / "vm.mr"
    steps = 1500
    src_m = build_demo_machine(RAM, total_steps=steps, device_state_size=DEV)
    src_m.start()
    work = DemoWorkload(src_m, dirty_rate_mib_s=64.0)
    work.run_in_thread()
    try:
        src = _save(src_m, path, channels, multifd)
    finally:
        work.stop(10)
        src_m.close()
    ds = src.device_state_stats()
    assert ds["device_state_multifd_bytes"] == 0 and ds["device_state_main_bytes"] > 0
    dst_m = build_demo_machine(RAM, populate=False, device_state_size=DEV)
    try:
        dst = _restore(dst_m, path, channels, multifd)
        assert str(dst.status.status) == "completed", dst.error
        assert dst_m.is_running  # the source was running
        DemoWorkload(dst_m).run_to_completion()
        assert dst_m.checksum() == expected_checksum(RAM, 1, steps, device_state_size=DEV)
    finally:
        dst_m.close()


def _sparse_machine() -> Machine:
    """64 MiB, mostly zero: a few scattered pages and one 1 MiB run of data."""
    blk = RamBlock("ram", 64 * MiB)
    rng = np.random.default_rng(7)
    blk.pages[rng.choice(blk.num_pages, 100, replace=False)] = 0x5A
    blk.array[8 * MiB : 9 * MiB] = rng.integers(1, 255, MiB, dtype=np.uint8)
    return Machine([blk, RamBlock("rom", 64 << 10)])


@pytest.mark.timeout(60)
def test_sparse_file_and_paused_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sparse.mr"
    src_m = _sparse_machine()
    _save(src_m, path, 2)
    st = os.stat(path)
    assert st.st_size > 64 * MiB  # every page has its slot
    assert st.st_blocks * 512 < 4 * MiB  # but zero pages are holes
    dst_m = Machine([RamBlock("ram", 64 * MiB), RamBlock("rom", 64 << 10)], incoming=True)
    dst = _restore(dst_m, path, 3)
    assert str(dst.status.status) == "completed", dst.error
    assert not dst_m.is_running  # the source was not running
    assert dst_m.checksum() == src_m.checksum()


def test_restore_into_used_ram_zeroes_absent_pages(tmp_path: Path) -> None:
    """A destination whose RAM is not fresh (fresh_ram=False): pages missing from the
    bitmap are made zero, as QEMU does when loading into a VM that ran."""
    path = tmp_path / "used.mr"
    src_m = _sparse_machine()
    _save(src_m, path, 2)
    dst_m = Machine([RamBlock("ram", 64 * MiB), RamBlock("rom", 64 << 10)], incoming=True)
    for b in dst_m.blocks.values():
        b.array[:] = 0xEE
    p, c = _setup(2)
    dst = MigrationDestination(dst_m, params=p, caps=c, fresh_ram=False)
    dst.listen(f"file:{path}")
    assert str(dst.wait(60)) == "completed", dst.error
    assert dst_m.checksum() == src_m.checksum()


@pytest.mark.timeout(60)
def test_direct_io_round_trip(tmp_path: Path) -> None:
    why = direct_io_supported(tmp_path / "probe")
    if why is not None:
        pytest.skip(f"environment: {tmp_path} refuses O_DIRECT (direct-io): {why}")
    path = tmp_path / "direct.mr"
    src_m = _sparse_machine()
    _save(src_m, path, 2, **{"direct-io": True})
    dst_m = Machine([RamBlock("ram", 64 * MiB), RamBlock("rom", 64 << 10)], incoming=True)
    dst = _restore(dst_m, path, 2, **{"direct-io": True})
    assert str(dst.status.status) == "completed", dst.error
    assert dst_m.checksum() == src_m.checksum()


def test_refused_combinations(tmp_path: Path) -> None:
    m = Machine([RamBlock("ram", MiB)])
    for uri, params, want in [
        ("tcp:127.0.0.1:1", {}, "needs a file: URI"),
        (f"file:{tmp_path / 'x'}", {"multifd-compression": "zstd"}, "compression"),
        (f"file:{tmp_path / 'x'},offset=4096", {}, "offset"),
    ]:
        p, c = _setup(2, **params)
        src = MigrationSource(m, params=p, caps=c)
        src.start(uri)
        assert str(src.wait(10)) == "failed"
        assert src.error is not None and want in src.error


# -------------------------------------------------------------------------- bad files


def _one_block_file(tmp_path: Path) -> tuple[Path, bytes, int]:
    """A paused 1 MiB single-block machine saved to a file; (path, bytes, header offset)."""
    blk = RamBlock("ram", MiB)
    blk.array[:] = 7
    path = tmp_path / "one.mr"
    _save(Machine([blk]), path, 1, multifd=False)
    raw = path.read_bytes()
    at = raw.index(b"\x03ram" + struct.pack(">Q", MiB)) + 4 + 8  # block entry, then header
    assert MappedRamHeader.decode(raw, offset=at).page_size == 4096
    return path, raw, at


def _load_error(path: Path) -> tuple[Machine, str]:
    m = Machine([RamBlock("ram", MiB)], incoming=True)
    dst = _restore(m, path, 2)
    assert str(dst.status.status) == "failed"
    assert not m.is_running
    assert dst.error is not None
    return m, dst.error


def test_truncated_file(tmp_path: Path) -> None:
    path, raw, at = _one_block_file(tmp_path)
    hdr = MappedRamHeader.decode(raw, offset=at)
    path.write_bytes(raw[: hdr.pages_offset + 4096])
    m, err = _load_error(path)
    assert "'ram'" in err and "past the end of the file" in err
    m.close()


def test_wrong_page_size(tmp_path: Path) -> None:
    path, raw, at = _one_block_file(tmp_path)
    bad = bytearray(raw)
    struct.pack_into(">Q", bad, at + 4, 8192)
    path.write_bytes(bad)
    m, err = _load_error(path)
    assert "'ram'" in err and "page size" in err and f"at byte {at}" in err
    m.close()


def test_bitmap_runs_into_the_pages(tmp_path: Path) -> None:
    """A header whose bitmap (32 bytes for 256 pages) would run past its pages_offset."""
    path, raw, at = _one_block_file(tmp_path)
    hdr = MappedRamHeader.decode(raw, offset=at)
    bad = bytearray(raw)
    struct.pack_into(">Q", bad, at + 12, hdr.pages_offset - 8)
    path.write_bytes(bad)
    m, err = _load_error(path)
    assert "'ram'" in err and "bitmap" in err and "pages_offset" in err
    m.close()


def test_overlapping_regions(tmp_path: Path) -> None:
    """The second block's pages placed over the first block's: refused at its header."""
    a, b = RamBlock("a", MiB), RamBlock("b", MiB)
    a.array[:] = 1
    path = tmp_path / "two.mr"
    _save(Machine([a, b]), path, 1, multifd=False)
    raw = bytearray(path.read_bytes())
    first = MappedRamHeader.decode(raw, offset=raw.index(b"\x01a") + 2 + 8)
    at_b = raw.index(b"\x01b" + struct.pack(">Q", MiB)) + 2 + 8
    struct.pack_into(">Q", raw, at_b + 20, first.pages_offset)
    path.write_bytes(raw)
    m = Machine([RamBlock("a", MiB), RamBlock("b", MiB)], incoming=True)
    dst = _restore(m, path, 1)
    assert str(dst.status.status) == "failed" and dst.error is not None
    assert "block 'b'" in dst.error and "pages_offset before bitmap_offset" in dst.error
    assert f"at byte {at_b}" in dst.error
    m.close()


def test_not_a_mapped_ram_file(tmp_path: Path) -> None:
    blk = RamBlock("ram", MiB)
    path = tmp_path / "stream.bin"
    p = MigrationParameters()
    p.set({"max-bandwidth": 0})
    src = MigrationSource(Machine([blk]), params=p)
    src.start(f"file:{path}")
    assert str(src.wait(10)) == "completed", src.error
    m, err = _load_error(path)
    assert "not a mapped-ram file" in err
    m.close()


@pytest.mark.timeout(120)
def test_demo_save_to_and_restore_from(tmp_path: Path) -> None:
    """`multifd demo --save-to` then `--restore-from`: the report verifies the checksum."""
    import json
    import subprocess
    import sys

    path = tmp_path / "demo.mr"
    common = ["--ram", "32M", "--steps", "1500", "--channels", "2", "--json"]
    for flag in ("--save-to", "--restore-from"):
        res = subprocess.run([sys.executable, "-m", "multifd.cli", "demo", flag, str(path),
                              *common], capture_output=True, text=True, timeout=100)
        assert res.returncode == 0, res.stderr + res.stdout
        report = json.loads(res.stdout)
        assert report["status"] == "completed"
    assert report["verified"] and report["checksum"] == report["expected"]
