"""Mismatched settings and bad input against QEMU 7.2 and 10.0: a one-line error from our
side, a non-zero exit, no hang (every wait is bounded by --idle-timeout), and the QEMU peer in
the state QEMU itself puts it in (read off repeated runs of each case):

* it keeps waiting for the rest of the migration (still ``inmigrate``, QMP answering) when
  it never got to load anything: too few channels (7.2, 10.0), a wrong UUID (7.2: it logs
  the mismatch and waits for good channels);
* it ends itself with exit status 1 and its error in the log once a load has failed (an
  incoming migration that fails exits QEMU: 7.2 always, 10.0 with migrate-incoming's
  ``exit-on-error`` default): multifd off there (it reads a multifd channel as the main
  stream: "Not a migration stream"), a compression mismatch, a wrong UUID (10.0).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.qemu.conftest import (
    PROFILE,
    Incoming,
    Vms,
    assert_pattern,
    qemu_binary,
    record,
    run_cli,
    set_multifd,
)

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(90),
              pytest.mark.parametrize("version", ["7.2", "10.0"])]

UUID = "6a1c2b3d-0000-4000-8000-0123456789ab"
SHORT = "3"  # --idle-timeout for the cases that must time out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """One recorded image per QEMU version (multifd 2 channels, none), recorded on first
    use and shared by the migrate cases."""
    tmp = tmp_path_factory.mktemp("errors")
    v = Vms(tmp)

    class Lazy(dict[str, Path]):
        def __missing__(self, version: str) -> Path:
            qemu_binary(version)  # skips when absent
            self[version], _ = record(v, version, tmp, channels=2)
            return self[version]

    try:
        yield Lazy()
    finally:
        v.close()


@pytest.fixture
def image(images: dict[str, Path], version: str) -> Path:
    return images[version]


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def _incoming_fails(vms: Vms, tmp: Path, version: str, *, src_channels: int,
                    src_compression: str = "none", src_uuid: str | None = None,
                    args: tuple[str, ...], may_finish_sending: bool = False) -> str:
    src = vms.start(version, "src", pattern=True, uuid=src_uuid)
    set_multifd(src, src_channels, src_compression)
    inc = Incoming(f"unix:{tmp}/in.sock", tmp / "x.img", "--profile", PROFILE[version],
                   "--idle-timeout", SHORT, *args)
    src.migrate(inc.uri)
    _out, err = inc.finish(30)
    assert inc.proc.returncode == 1
    assert not (tmp / "x.img").exists()
    info = src.wait_migration(timeout=20, check=False)
    if may_finish_sending and version == "7.2" and info["status"] == "completed":
        # QEMU 7.2 has no return path: when its whole (compressed) guest fit in the socket
        # buffers before we read a packet, it finished on its side (as towards QEMU).
        assert src.status() == "postmigrate"
    else:
        assert info["status"] == "failed"
        assert src.status() == "prelaunch"  # the source VM is untouched (still paused)
    return _one_line(err)


def test_incoming_wrong_uuid(vms: Vms, tmp_path: Path, version: str) -> None:
    line = _incoming_fails(vms, tmp_path, version, src_channels=2, src_uuid=UUID,
                           args=("--channels", "2"))
    assert "uuid" in line and UUID.replace("-", "") in line


def test_incoming_wrong_channel_count(vms: Vms, tmp_path: Path, version: str) -> None:
    line = _incoming_fails(vms, tmp_path, version, src_channels=2, args=("--channels", "4"))
    assert "expected 4 multifd channels, got 2" in line


def test_incoming_wrong_compression(vms: Vms, tmp_path: Path, version: str) -> None:
    line = _incoming_fails(vms, tmp_path, version, src_channels=2, src_compression="zlib",
                           args=("--channels", "2", "--compression", "none"),
                           may_finish_sending=True)
    assert "compression" in line


def test_incoming_multifd_expected_but_off(vms: Vms, tmp_path: Path, version: str) -> None:
    line = _incoming_fails(vms, tmp_path, version, src_channels=0, args=("--channels", "2"))
    assert "multifd channels" in line


def _dst(vms: Vms, tmp: Path, version: str, channels: int, compression: str = "none",
          uuid: str | None = None) -> tuple[Any, str]:
    dst = vms.start(version, "dst", incoming="defer", uuid=uuid)
    set_multifd(dst, channels, compression)
    uri = f"unix:{tmp}/out.sock"
    dst.migrate_incoming(uri)
    return dst, uri


def _qemu_waits(dst: Any, version: str) -> None:
    """QEMU is still up and waiting for the migration: inmigrate, nothing loaded. Its
    query-migrate has no status on 7.2 while it waits for channels, "setup" on 10.0."""
    assert dst.alive, dst.log()[-2000:]
    assert dst.status() == "inmigrate"
    info = dst.query_migrate()
    if version == "7.2":
        assert "status" not in info, info
    else:
        assert info["status"] == "setup", info
    assert dst.alive  # and it did not go away while answering


def _qemu_exited(dst: Any, *log: str) -> None:
    """QEMU ended itself with exit status 1, its log naming why (regexes `log`)."""
    assert dst.proc.wait(timeout=20) == 1, dst.log()[-2000:]
    text = dst.log()
    for rx in log:
        assert re.search(rx, text), (rx, text[-2000:])


def test_migrate_truncated_image(vms: Vms, tmp_path: Path, image: Path, version: str,
                                 pattern_bytes: bytes) -> None:
    data = image.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        bad = tmp_path / "bad.img"
        bad.write_bytes(data[:cut])
        if cut == len(data) // 2:
            assert run_cli("inspect", str(bad)).returncode == 2
        dst, uri = _dst(vms, tmp_path, version, 2)
        res = run_cli("migrate", str(bad), uri, "--profile", PROFILE[version], "--channels", "2",
                      "--idle-timeout", SHORT, timeout=30)
        assert res.returncode == 1
        assert "bad.img" in _one_line(res.stderr)
        # Nothing was sent: the destination still waits and takes a good image.
        assert dst.status() == "inmigrate"
        res = run_cli("migrate", str(image), uri, "--profile", PROFILE[version], "--channels", "2",
                      timeout=30)
        assert res.returncode == 0, res.stderr
        dst.wait_migration(timeout=20)
        assert_pattern(dst, pattern_bytes)
        dst.close()


@pytest.mark.parametrize(("dst_channels", "args"), [
    pytest.param(2, ("--channels", "1"), id="fewer-channels"),
    pytest.param(0, ("--channels", "2"), id="multifd-off-there"),
])
def test_migrate_wrong_channel_count(vms: Vms, tmp_path: Path, image: Path, version: str,
                                     dst_channels: int, args: tuple[str, ...]) -> None:
    dst, uri = _dst(vms, tmp_path, version, dst_channels)
    res = run_cli("migrate", str(image), uri, "--profile", PROFILE[version],
                  "--idle-timeout", SHORT, *args, timeout=30)
    assert res.returncode == 1
    line = _one_line(res.stderr)
    assert "multifd-channels" in line
    if dst_channels:  # it waits for a second channel that never comes
        _qemu_waits(dst, version)
    else:  # multifd off: a multifd channel read as the main stream fails the load
        _qemu_exited(dst, r"Not a migration stream",
                     r"load of migration failed: Invalid argument")


def test_migrate_wrong_compression(vms: Vms, tmp_path: Path, image: Path,
                                   version: str) -> None:
    dst, uri = _dst(vms, tmp_path, version, 2, "none")
    res = run_cli("migrate", str(image), uri, "--profile", PROFILE[version], "--channels", "2",
                  "--compression", "zstd", "--idle-timeout", SHORT, timeout=30)
    assert res.returncode == 1
    assert "multifd-compression = zstd" in _one_line(res.stderr)
    if version == "7.2":
        _qemu_exited(dst, r"load of migration failed: Input/output error")
    else:  # a zstd packet (flag 4) where it expects none
        _qemu_exited(dst, r"multifd \d: flags received 4 flags expected 0")


def test_migrate_wrong_uuid(vms: Vms, tmp_path: Path, image: Path, version: str) -> None:
    dst, uri = _dst(vms, tmp_path, version, 2, uuid=UUID)
    res = run_cli("migrate", str(image), uri, "--profile", PROFILE[version], "--channels", "2",
                  "--idle-timeout", SHORT, timeout=30)
    assert res.returncode == 1
    assert "-uuid = 00000000-0000-0000-0000-000000000000" in _one_line(res.stderr)
    mismatch = (r"failed to receive packet via multifd channel \d: multifd: received uuid "
                rf"'00000000-0000-0000-0000-000000000000' and expected uuid '{UUID}'")
    if version == "7.2":  # it logs the mismatch and keeps waiting for good channels
        assert re.search(mismatch, dst.log()), dst.log()[-2000:]
        _qemu_waits(dst, version)
    else:
        _qemu_exited(dst, mismatch)
