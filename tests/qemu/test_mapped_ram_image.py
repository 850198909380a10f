"""mapped-ram files as VM images, without a QEMU binary: QEMU 10.0's recorded file read
with parallel preadv, written back byte for byte, converted both ways by `multifd
convert`, described by `multifd inspect`; bad files fail naming the block and offset."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multifd.qemu.image import ImageError, read_image
from multifd.qemu.mapped_ram import (
    configuration_with,
    is_mapped_ram_file,
    read_any_image,
    read_mapped_ram_image,
    write_mapped_ram_image,
)
from tests.conftest import PATTERN_OFFSET
from tests.qemu.conftest import run_cli

pytestmark = pytest.mark.timeout(60)


def test_qemu10_file_reads_and_writes_back_identically(mapped_ram_file: Path, tmp_path: Path,
                                                       pattern: bytes) -> None:
    assert is_mapped_ram_file(mapped_ram_file)
    with read_mapped_ram_image(mapped_ram_file, channels=3) as img:
        ram = img.blocks["pc.ram"].view
        assert bytes(ram[PATTERN_OFFSET : PATTERN_OFFSET + len(pattern)]) == pattern
        assert (img.normal_pages, img.zero_pages) == (818, 15696)
        assert img.switchover_start and img.machine == "pc-i440fx-10.0"
        # the image's configuration is format-free; writing mapped-ram lists the capability
        assert b"mapped-ram" not in img.configuration
        assert configuration_with(img.configuration, True) in mapped_ram_file.read_bytes()[:80]
        out = tmp_path / "ours.mr"
        size = write_mapped_ram_image(img, out, channels=2)
    assert size == os.stat(out).st_size == os.stat(mapped_ram_file).st_size
    assert out.read_bytes() == mapped_ram_file.read_bytes()
    assert os.stat(out).st_blocks * 512 < 8 << 20  # 73.5 MB apparent, zero pages are holes


def test_convert_both_ways(mapped_ram_file: Path, tmp_path: Path, pattern: bytes) -> None:
    stream, back = tmp_path / "vm.stream", tmp_path / "vm.mr"
    res = run_cli("convert", str(mapped_ram_file), str(stream), "--format", "stream")
    assert res.returncode == 0, res.stderr
    assert not is_mapped_ram_file(stream)
    with read_image(stream) as img:
        ram = img.blocks["pc.ram"].view
        assert bytes(ram[PATTERN_OFFSET : PATTERN_OFFSET + len(pattern)]) == pattern
    res = run_cli("convert", str(stream), str(back), "--channels", "3", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["format"] == "mapped-ram"
    assert summary["allocated_bytes"] < summary["apparent_bytes"] // 4
    assert back.read_bytes() == mapped_ram_file.read_bytes()  # QEMU's own file again


def test_inspect_prints_headers_presence_and_sizes(mapped_ram_file: Path) -> None:
    res = run_cli("inspect", str(mapped_ram_file))
    assert res.returncode == 0, res.stderr
    assert ("header: version 1, page_size 0x1000, bitmap_offset 0x8e, pages_offset 0x100000; "
            "pages present 768, absent 15,616") in res.stdout
    assert "file: apparent 73,516,452 bytes, allocated" in res.stdout
    res = run_cli("inspect", str(mapped_ram_file), "--json")
    doc = json.loads(res.stdout)
    assert doc["mapped_ram_present"]["pc.ram"] == 768
    assert doc["file_bytes"]["apparent"] == 73_516_452


def _pc_ram_header_at(raw: bytes) -> int:
    return raw.index(b"\x06pc.ram" + struct.pack(">Q", 0x4000000)) + 7 + 8


def test_truncated_file_names_the_block(mapped_ram_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.mr"
    bad.write_bytes(mapped_ram_file.read_bytes()[: 0x200000])
    with pytest.raises(ImageError, match=r"block 'pc.ram'.*past the end of the file"):
        read_any_image(bad)


def test_lying_length_is_refused_before_allocation(mapped_ram_file: Path,
                                                   tmp_path: Path) -> None:
    """MEM_SIZE total and pc.ram's used_length raised to 1 TiB: refused from the file's
    size, before a block of that size is made."""
    raw = bytearray(mapped_ram_file.read_bytes()[: 0x4100000])  # through pc.ram's region
    at = _pc_ram_header_at(raw)
    total = struct.unpack_from(">Q", raw, 0x5B)[0] & ~0xFFF
    struct.pack_into(">Q", raw, 0x5B, (total - 0x4000000 + (1 << 40)) | 4)
    struct.pack_into(">Q", raw, at - 8, 1 << 40)
    bad = tmp_path / "lie.mr"
    bad.write_bytes(raw)
    with pytest.raises(ImageError, match=r"pc.ram"):
        read_any_image(bad)


def test_wrong_page_size_names_block_and_offset(mapped_ram_file: Path,
                                                tmp_path: Path) -> None:
    raw = bytearray(mapped_ram_file.read_bytes())
    at = _pc_ram_header_at(raw)
    struct.pack_into(">Q", raw, at + 4, 0x10000)
    bad = tmp_path / "ps.mr"
    bad.write_bytes(raw)
    with pytest.raises(ImageError, match=rf"block 'pc.ram'.*page size.*at byte {at}"):
        read_any_image(bad)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Our source's mapped-ram file of a paused two-block machine (1 MiB + 64 KiB)."""
    from multifd.machine.machine import Machine
    from multifd.machine.ramblock import RamBlock
    from multifd.migration.params import MigrationCapabilities, MigrationParameters
    from multifd.migration.source import MigrationSource

    a, b = RamBlock("pc.ram", 1 << 20), RamBlock("pc.bios", 64 << 10)
    a.pages[::3] = 0x11
    b.array[:] = 0x22
    path = tmp_path_factory.mktemp("mr") / "small.mr"
    p = MigrationParameters()
    p.set({"max-bandwidth": 0})
    c = MigrationCapabilities()
    c.set([{"capability": "mapped-ram", "state": True}])
    src = MigrationSource(Machine([a, b]), params=p, caps=c)
    src.start(f"file:{path}")
    assert str(src.wait(30)) == "completed", src.error
    return path.read_bytes()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.one_of(st.integers(0, 0x1100),  # header .. first bitmap
                                    st.integers(0x200000, 0x200100)),  # second block entry
                          st.integers(0, 255)), min_size=1, max_size=4),
       st.sampled_from([None, 0x100, 0x100040, 0x180000]))
def test_damaged_files_fail_cleanly(small_file: bytes, tmp_path: Path,
                                    edits: list[tuple[int, int]], cut: int | None) -> None:
    """Damaged headers, block entries and bitmaps, and cut files: a result or an
    ImageError, never another exception, a hang or a huge allocation."""
    raw = bytearray(small_file)
    for at, val in edits:
        raw[at % len(raw)] = val
    if cut is not None:
        del raw[cut:]
    bad = tmp_path / "damaged.mr"
    bad.write_bytes(raw)
    try:
        with read_mapped_ram_image(bad, channels=2) as img:
            assert sum(b.used_length for b in img.blocks.values()) <= len(raw)
    except ImageError:
        pass
