"""Mismatched settings and bad input against QEMU 7.2: a one-line error from our side,
a non-zero exit, no hang (every wait is bounded by --timeout), QEMU still answering QMP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.qemu.conftest import Incoming, Vms, assert_pattern, record, run_cli, set_multifd

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(90)]

UUID = "6a1c2b3d-0000-4000-8000-0123456789ab"
SHORT = "3"  # --timeout for the cases that must time out


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One recorded 7.2 image (multifd 2 channels, none) shared by the migrate cases."""
    tmp = tmp_path_factory.mktemp("errors")
    v = Vms(tmp)
    try:
        path, _ = record(v, "7.2", tmp, channels=2)
    finally:
        v.close()
    yield path


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def _incoming_fails(vms: Vms, tmp: Path, *, src_channels: int, src_compression: str = "none",
                    src_uuid: str | None = None, args: tuple[str, ...]) -> str:
    src = vms.start("7.2", "src", pattern=True, uuid=src_uuid)
    set_multifd(src, src_channels, src_compression)
    inc = Incoming(f"unix:{tmp}/in.sock", tmp / "x.img", "--profile", "qemu-7.2",
                   "--timeout", SHORT, *args)
    src.migrate(inc.uri)
    _out, err = inc.finish(30)
    assert inc.proc.returncode == 1
    assert not (tmp / "x.img").exists()
    info = src.wait_migration(timeout=20, check=False)
    assert info["status"] == "failed"
    assert src.status() == "prelaunch"  # the source VM is untouched (still paused)
    return _one_line(err)


def test_incoming_wrong_uuid(vms: Vms, tmp_path: Path) -> None:
    line = _incoming_fails(vms, tmp_path, src_channels=2, src_uuid=UUID,
                           args=("--channels", "2"))
    assert "uuid" in line and UUID.replace("-", "") in line


def test_incoming_wrong_channel_count(vms: Vms, tmp_path: Path) -> None:
    line = _incoming_fails(vms, tmp_path, src_channels=2, args=("--channels", "4"))
    assert "expected 4 multifd channels, got 2" in line


def test_incoming_wrong_compression(vms: Vms, tmp_path: Path) -> None:
    line = _incoming_fails(vms, tmp_path, src_channels=2, src_compression="zlib",
                           args=("--channels", "2", "--compression", "none"))
    assert "compression" in line


def test_incoming_multifd_expected_but_off(vms: Vms, tmp_path: Path) -> None:
    line = _incoming_fails(vms, tmp_path, src_channels=0, args=("--channels", "2"))
    assert "multifd channels" in line


def _dst(vms: Vms, tmp: Path, channels: int, compression: str = "none",
         uuid: str | None = None) -> tuple[Any, str]:
    dst = vms.start("7.2", "dst", incoming="defer", uuid=uuid)
    set_multifd(dst, channels, compression)
    uri = f"unix:{tmp}/out.sock"
    dst.migrate_incoming(uri)
    return dst, uri


def _dst_sane(dst: Any) -> None:
    """The destination never runs half-loaded: it still waits (QMP answers, not running),
    or QEMU 7.2 ended itself with an error after the failed load (its own policy)."""
    if dst.alive:
        assert dst.status() in ("inmigrate", "prelaunch")
        assert dst.query_migrate().get("status") != "completed"
    else:
        assert dst.proc.returncode != 0


def test_migrate_truncated_image(vms: Vms, tmp_path: Path, image: Path,
                                 pattern_bytes: bytes) -> None:
    data = image.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        bad = tmp_path / "bad.img"
        bad.write_bytes(data[:cut])
        if cut == len(data) // 2:
            assert run_cli("inspect", str(bad)).returncode == 2
        dst, uri = _dst(vms, tmp_path, 2)
        res = run_cli("migrate", str(bad), uri, "--profile", "qemu-7.2", "--channels", "2",
                      "--timeout", SHORT, timeout=30)
        assert res.returncode == 1
        assert "bad.img" in _one_line(res.stderr)
        # Nothing was sent: the destination still waits and takes a good image.
        assert dst.status() == "inmigrate"
        res = run_cli("migrate", str(image), uri, "--profile", "qemu-7.2", "--channels", "2",
                      timeout=30)
        assert res.returncode == 0, res.stderr
        dst.wait_migration(timeout=20)
        assert_pattern(dst, pattern_bytes)
        dst.close()


@pytest.mark.parametrize(("dst_channels", "args"), [
    pytest.param(2, ("--channels", "1"), id="fewer-channels"),
    pytest.param(0, ("--channels", "2"), id="multifd-off-there"),
])
def test_migrate_wrong_channel_count(vms: Vms, tmp_path: Path, image: Path,
                                     dst_channels: int, args: tuple[str, ...]) -> None:
    dst, uri = _dst(vms, tmp_path, dst_channels)
    res = run_cli("migrate", str(image), uri, "--profile", "qemu-7.2", "--timeout", SHORT,
                  *args, timeout=30)
    assert res.returncode == 1
    line = _one_line(res.stderr)
    assert "multifd-channels" in line
    _dst_sane(dst)


def test_migrate_wrong_compression(vms: Vms, tmp_path: Path, image: Path) -> None:
    dst, uri = _dst(vms, tmp_path, 2, "none")
    res = run_cli("migrate", str(image), uri, "--profile", "qemu-7.2", "--channels", "2",
                  "--compression", "zstd", "--timeout", SHORT, timeout=30)
    assert res.returncode == 1
    assert "multifd-compression = zstd" in _one_line(res.stderr)
    _dst_sane(dst)


def test_migrate_wrong_uuid(vms: Vms, tmp_path: Path, image: Path) -> None:
    dst, uri = _dst(vms, tmp_path, 2, uuid=UUID)
    res = run_cli("migrate", str(image), uri, "--profile", "qemu-7.2", "--channels", "2",
                  "--timeout", SHORT, timeout=30)
    assert res.returncode == 1
    assert "-uuid = 00000000-0000-0000-0000-000000000000" in _one_line(res.stderr)
    _dst_sane(dst)
