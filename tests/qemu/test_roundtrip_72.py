"""QEMU 7.2 -> `multifd incoming` -> IMAGE -> `multifd migrate` -> QEMU 7.2, and IMAGE
loaded by QEMU itself (`-incoming "exec:cat IMAGE"`); the pattern must survive every hop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multifd.qemu.image import read_image
from tests.conftest import PATTERN_OFFSET
from tests.qemu.conftest import (
    Vms,
    assert_pattern,
    load_exec,
    record,
    replay,
    run_cli,
)

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(120)]

# A representative matrix (the full cross product is slow and adds little).
MATRIX = [
    pytest.param(0, "none", "pc", id="off-pc"),
    pytest.param(2, "none", "pc", id="2ch-none-pc"),
    pytest.param(1, "zlib", "pc", id="1ch-zlib-pc"),
    pytest.param(4, "zstd", "pc", id="4ch-zstd-pc"),
    pytest.param(2, "none", "q35", id="2ch-none-q35"),
]


@pytest.mark.parametrize(("channels", "compression", "machine"), MATRIX)
def test_roundtrip(vms: Vms, tmp_path: Path, pattern_bytes: bytes, channels: int,
                   compression: str, machine: str) -> None:
    image, rx = record(vms, "7.2", tmp_path, channels=channels, compression=compression,
                       machine=machine)
    want_machine = "pc-i440fx-7.2" if machine == "pc" else "pc-q35-7.2"
    assert rx["machine"] == want_machine
    assert rx["channels"] == channels
    assert rx["pages"]["normal"] >= 768  # the pattern's non-zero pages, plus ROMs
    assert rx["blocks"][0] == {"name": "pc.ram", "used_length": 64 << 20}
    with read_image(image) as img:
        assert bytes(img.blocks["pc.ram"].view[PATTERN_OFFSET : PATTERN_OFFSET + (4 << 20)]) \
            == pattern_bytes
        assert not img.switchover_start
    dst, tx = replay(vms, "7.2", image, tmp_path, channels=channels, compression=compression,
                     machine=machine)
    assert dst.status() == "prelaunch"
    assert_pattern(dst, pattern_bytes)
    total_pages = sum(b["used_length"] for b in rx["blocks"]) // 4096
    assert tx["pages"]["normal"] + tx["pages"]["zero"] == total_pages
    assert 768 <= tx["pages"]["normal"] <= rx["pages"]["normal"]  # 7.2 may resend a page
    dst.close()
    load_exec(vms, "7.2", image, machine, pattern_bytes)


def test_uuid_roundtrip(vms: Vms, tmp_path: Path, pattern_bytes: bytes) -> None:
    """Both QEMUs run with -uuid U: the init packets must carry U both ways (--uuid)."""
    u = "6a1c2b3d-0000-4000-8000-0123456789ab"
    image, _ = record(vms, "7.2", tmp_path, channels=1, uuid=u, extra=("--uuid", u))
    dst, _ = replay(vms, "7.2", image, tmp_path, channels=1, uuid=u, extra=("--uuid", u))
    assert_pattern(dst, pattern_bytes)


def test_inspect_image(vms: Vms, tmp_path: Path, pattern_bytes: bytes) -> None:
    """`multifd inspect IMAGE` reads our images; --dump-ram gives the guest RAM back."""
    image, rx = record(vms, "7.2", tmp_path, channels=2)
    dump = tmp_path / "pc.ram.bin"
    res = run_cli("inspect", str(image), "--json", "--dump-ram", f"pc.ram:{dump}")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["machine"] == "pc-i440fx-7.2"
    assert 768 <= info["normal_pages"] <= rx["pages"]["normal"]  # 7.2 may resend a page
    assert info["zero_pages"] + info["normal_pages"] == sum(
        b["used_length"] for b in rx["blocks"]) // 4096
    assert info["device_tail"]["size"] > 0 and info["vmdesc_size"]
    ram = dump.read_bytes()
    assert len(ram) == 64 << 20
    assert ram[PATTERN_OFFSET : PATTERN_OFFSET + len(pattern_bytes)] == pattern_bytes
