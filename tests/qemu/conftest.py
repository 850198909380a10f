"""Real-QEMU fixtures: which binary per version, QEMU processes that always die, the CLI.

`qemu_binary(version)` is the coordination point with the benchmarks and the 10.0 set-up:
"7.2" is Debian's `qemu-system-x86_64`; "10.0" is `.cache/qemu10/root/usr/bin/...` (made
by `.ci/qemu10`) with its `-L` args, and 10.0 tests skip only when that binary is absent.
QEMU processes come from `multifd.qemu.qemuproc` (bounded start/QMP/migration waits,
quit-then-kill on close); the `vms` fixture closes every one it started at teardown.
The guest is the captures' one: 64 MiB, paused (-S), pattern-4MiB.bin at 0x100000.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from multifd.qemu.qemuproc import QemuProcess
from tests.conftest import PATTERN_OFFSET, Q72

REPO = Path(__file__).resolve().parents[2]
QEMU10_ROOT = REPO / ".cache" / "qemu10" / "root"
QEMU10_SKIP = "QEMU 10.0 not unpacked (run .ci/qemu10)"
PATTERN = Q72 / "pattern-4MiB.bin"
PROFILE = {"7.2": "qemu-7.2", "10.0": "qemu-10"}
CLI_TIMEOUT_S = 60.0


def qemu_binary(version: str) -> list[str]:
    """argv prefix running QEMU `version`: ["qemu-system-x86_64"] for "7.2"; the unpacked
    10.0 binary plus `-L <root>/usr/share/qemu -L /usr/share/seabios` for "10.0".

    Skips the calling test when that QEMU is missing (10.0: QEMU10_SKIP)."""
    if version == "7.2":
        path = shutil.which("qemu-system-x86_64")
        if path is None:
            pytest.skip("qemu-system-x86_64 (QEMU 7.2) not installed (run .ci/run)")
        return [path]
    if version == "10.0":
        exe = QEMU10_ROOT / "usr" / "bin" / "qemu-system-x86_64"
        if not os.access(exe, os.X_OK):
            pytest.skip(QEMU10_SKIP)
        return [str(exe), "-L", str(QEMU10_ROOT / "usr" / "share" / "qemu"),
                "-L", "/usr/share/seabios"]
    raise ValueError(f"unknown QEMU version {version!r}")


class Vms:
    """Starts QEMU processes for one test and closes all of them afterwards."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[QemuProcess] = []

    def start(self, version: str, name: str, *, machine: str = "pc", pattern: bool = False,
              incoming: str | None = None, uuid: str | None = None) -> QemuProcess:
        qemu_binary(version)  # skips when absent
        extra: list[str] = []
        if pattern:
            extra += ["-device", f"loader,file={PATTERN},addr={PATTERN_OFFSET:#x}"]
        if uuid:
            extra += ["-uuid", uuid]
        vm = QemuProcess(extra, version=version, name=name, machine=machine, memory_mib=64,
                         incoming=incoming, start_timeout=20, cmd_timeout=10)
        self.started.append(vm)
        return vm.start()

    def close(self) -> None:
        for vm in self.started:
            vm.close()


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[Vms]:
    v = Vms(tmp_path)
    try:
        yield v
    finally:
        v.close()


@pytest.fixture(scope="session")
def pattern_bytes() -> bytes:
    return PATTERN.read_bytes()


# ------------------------------------------------------------------------------ the CLI


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "multifd.cli", *args]


def run_cli(*args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout)


class Incoming:
    """`multifd incoming` running in the background; `result()` waits (bounded)."""

    def __init__(self, uri: str, image: Path, *args: str) -> None:
        self.uri = uri
        self.proc = subprocess.Popen(cli("incoming", uri, "--save", str(image), "--json",
                                         *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "listening on ..." once the socket listens
        if not line.startswith("listening on "):
            self.proc.kill()
            _out, err = self.proc.communicate(timeout=5)
            raise AssertionError(f"multifd incoming did not listen: {line}{err}")

    def finish(self, timeout: float = CLI_TIMEOUT_S) -> tuple[str, str]:
        try:
            return self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
            raise AssertionError(f"multifd incoming hung; stderr: {err}") from None

    def result(self) -> dict[str, Any]:
        out, err = self.finish()
        assert self.proc.returncode == 0, f"multifd incoming failed: {err}"
        return dict(json.loads(out))


def set_multifd(vm: QemuProcess, channels: int, compression: str) -> None:
    vm.set_migration(multifd=channels > 0, channels=max(channels, 1), compression=compression)


def record(vms: Vms, version: str, tmp: Path, *, channels: int, compression: str = "none",
           machine: str = "pc", uuid: str | None = None, extra: tuple[str, ...] = ()
           ) -> tuple[Path, dict[str, Any]]:
    """QEMU `version` (pattern guest) -> `multifd incoming` -> IMAGE; returns (IMAGE, json)."""
    src = vms.start(version, "src", machine=machine, pattern=True, uuid=uuid)
    set_multifd(src, channels, compression)
    image = tmp / f"{version}-{machine}-{channels}-{compression}.img"
    inc = Incoming(f"unix:{tmp}/in.sock", image, "--profile", PROFILE[version],
                   "--channels", str(channels), "--compression", compression,
                   "--idle-timeout", "20", *extra)
    try:
        src.migrate(inc.uri)
        src.wait_migration(timeout=30)
    except BaseException:
        inc.proc.kill()
        inc.finish(5)
        raise
    summary = inc.result()
    src.close()
    return image, summary


def replay(vms: Vms, version: str, image: Path, tmp: Path, *, channels: int,
           compression: str = "none", machine: str = "pc", uuid: str | None = None,
           extra: tuple[str, ...] = ()) -> tuple[Any, dict[str, Any]]:
    """IMAGE -> `multifd migrate` -> fresh QEMU (`-incoming defer`); returns (vm, json)."""
    dst = vms.start(version, "dst", machine=machine, incoming="defer", uuid=uuid)
    set_multifd(dst, channels, compression)
    uri = f"unix:{tmp}/out.sock"
    dst.migrate_incoming(uri)
    res = run_cli("migrate", str(image), uri, "--profile", PROFILE[version], "--channels",
                  str(channels), "--compression", compression, "--json", "--idle-timeout", "20",
                  *extra)
    assert res.returncode == 0, f"multifd migrate failed: {res.stderr}"
    dst.wait_migration(timeout=30)
    return dst, dict(json.loads(res.stdout))


def assert_pattern(vm: Any, pattern: bytes) -> None:
    got = vm.pmemsave(PATTERN_OFFSET, len(pattern))
    assert got == pattern, f"{vm.name}: guest memory at {PATTERN_OFFSET:#x} differs"


def load_exec(vms: Vms, version: str, image: Path, machine: str, pattern: bytes) -> None:
    """QEMU itself loads IMAGE with -incoming "exec:cat IMAGE"."""
    vm = vms.start(version, "exec", machine=machine, incoming=f"exec:cat {image}")
    vm.wait_migration(timeout=30)
    assert vm.status() == "prelaunch"
    assert_pattern(vm, pattern)
    vm.close()
