"""Run a real QEMU process with a QMP unix socket and drive it (tests and benchmarks).

One `QemuProcess` = one `qemu-system-x86_64` with `-qmp unix:<sock>,server=on,wait=off`,
driven through qemu.qmp's synchronous legacy client. Every wait is bounded: start-up (the
QMP socket must appear and greet within `start_timeout`, a watchdog kills QEMU otherwise),
each QMP command (`cmd_timeout`), and migration polling (`wait_migration(timeout=...)`).
`close()` always ends the process (QMP `quit`, then SIGKILL) and removes its temp dir.

Versions: "7.2" is Debian 12's `qemu-system-x86_64` on PATH; "10.0" is the binary unpacked
by `.ci/qemu10` into `<repo>/.cache/qemu10/root` (or `$MULTIFD_QEMU10_ROOT`), run with
`-L <root>/usr/share/qemu -L /usr/share/seabios` (see shared/qemu72-peer.md, last section).
KVM is used when /dev/kvm can be opened read-write, TCG otherwise (`$MULTIFD_ACCEL` wins).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

QEMU72 = "7.2"
QEMU10 = "10.0"
VERSIONS = (QEMU72, QEMU10)

DEFAULT_START_TIMEOUT_S = 30.0
DEFAULT_CMD_TIMEOUT_S = 30.0
SEABIOS_DIR = "/usr/share/seabios"
FINAL_MIGRATION_STATES = frozenset({"completed", "failed", "cancelled"})


class QemuError(RuntimeError):
    """QEMU failed to start, a QMP command failed, or a wait ran out of time."""


class QmpCommandError(QemuError):
    """A QMP command returned an error object (`klass` is its QMP error class)."""

    def __init__(self, command: str, klass: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {klass}: {desc}")
        self.command = command
        self.klass = klass
        self.desc = desc


# -- binaries ------------------------------------------------------------------------------

def repo_root() -> Path:
    """The checkout holding this package (src layout: <repo>/src/multifd/qemu/qemuproc.py)."""
    return Path(__file__).resolve().parents[3]


def qemu10_root() -> Path:
    """Folder the QEMU 10.0 .debs are unpacked into (`.ci/qemu10`)."""
    env = os.environ.get("MULTIFD_QEMU10_ROOT")
    return Path(env) if env else repo_root() / ".cache" / "qemu10" / "root"


def binary(version: str = QEMU72) -> list[str]:
    """argv prefix that runs QEMU `version` ("7.2" or "10.0"), including its `-L` args.

    Raises QemuError when that QEMU is not installed.
    """
    if version == QEMU72:
        path = shutil.which("qemu-system-x86_64")
        if path is None:
            raise QemuError("qemu-system-x86_64 (QEMU 7.2) is not on PATH")
        return [path]
    if version == QEMU10:
        root = qemu10_root()
        exe = root / "usr" / "bin" / "qemu-system-x86_64"
        if not os.access(exe, os.X_OK):
            raise QemuError(f"QEMU 10.0 not unpacked at {root} (run .ci/qemu10)")
        return [str(exe), "-L", str(root / "usr" / "share" / "qemu"), "-L", SEABIOS_DIR]
    raise ValueError(f"unknown QEMU version {version!r}; expected one of {VERSIONS}")


def available(version: str = QEMU72) -> bool:
    try:
        binary(version)
    except QemuError:
        return False
    return True


def kvm_usable() -> bool:
    """True when /dev/kvm opens read-write (existence alone is not enough)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def default_accel() -> str:
    env = os.environ.get("MULTIFD_ACCEL")
    if env in ("kvm", "tcg"):
        return env
    return "kvm" if kvm_usable() else "tcg"


# -- the process ---------------------------------------------------------------------------

class QemuProcess:
    """A QEMU x86_64 machine under QMP control. Use as a context manager, or call close().

    `extra_args` are appended to the standard command line
    `-M <machine> -accel <accel> -m <MiB> [-S] -nographic -nodefaults -name <name>,...
    -qmp unix:<sock>,server=on,wait=off [-incoming <incoming>]`.
    """

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        version: str = QEMU72,
        name: str = "vm",
        machine: str = "pc",
        memory_mib: int = 2048,
        paused: bool = True,
        incoming: str | None = None,
        accel: str | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT_S,
        cmd_timeout: float = DEFAULT_CMD_TIMEOUT_S,
        env: dict[str, str] | None = None,
    ) -> None:
        self.version = version
        self.name = name
        self.accel = accel or default_accel()
        self.start_timeout = start_timeout
        self.cmd_timeout = cmd_timeout
        self._tmp = Path(tempfile.mkdtemp(prefix=f"multifd-qemu-{name}-"))
        self.qmp_path = self._tmp / "qmp.sock"
        self.log_path = self._tmp / "qemu.log"
        self.argv: list[str] = [
            *binary(version),
            "-M", machine, "-accel", self.accel, "-m", str(memory_mib),
            *(["-S"] if paused else []),
            "-nographic", "-nodefaults", "-name", f"{name},debug-threads=on",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *(["-incoming", incoming] if incoming else []),
            *extra_args,
        ]
        self._env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: Any = None
        self._log: Any = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> QemuProcess:
        """Start QEMU and connect QMP; raises QemuError (and kills QEMU) on any failure."""
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=self._env)
        deadline = time.monotonic() + self.start_timeout
        try:
            while not self.qmp_path.exists():
                if self.proc.poll() is not None:
                    raise QemuError(f"QEMU exited with {self.proc.returncode} at start-up"
                                    f"{self._log_tail()}")
                if time.monotonic() > deadline:
                    raise QemuError(f"QEMU's QMP socket did not appear within "
                                    f"{self.start_timeout:.0f} s{self._log_tail()}")
                time.sleep(0.01)
            # The legacy client's connect() has no timeout: a watchdog kills a QEMU that
            # does not greet in time, which makes connect() fail instead of hanging.
            done = threading.Event()
            proc = self.proc

            def watchdog() -> None:
                if not done.wait(max(0.0, deadline - time.monotonic())):
                    proc.kill()

            threading.Thread(target=watchdog, daemon=True, name=f"qmp-watchdog-{self.name}").start()
            try:
                while True:
                    qmp = QEMUMonitorProtocol(str(self.qmp_path), nickname=self.name)
                    try:
                        qmp.connect()
                        break
                    except Exception as exc:
                        # The socket file exists from bind() on; listen() may come later.
                        refused = "Connection refused" in str(exc)
                        if not refused or time.monotonic() > deadline or (
                                self.proc.poll() is not None):
                            raise QemuError(f"QMP connect to {self.name} failed: {exc}"
                                            f"{self._log_tail()}") from exc
                        time.sleep(0.02)
            finally:
                done.set()
            qmp.settimeout(self.cmd_timeout)
            self._qmp = qmp
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Quit QEMU (QMP quit, then SIGKILL after 2 s), close QMP, remove the temp dir."""
        if self._qmp is not None:
            qmp, self._qmp = self._qmp, None
            if self.proc is not None and self.proc.poll() is None:
                with contextlib.suppress(Exception):
                    qmp.settimeout(2.0)
                    qmp.cmd_raw("quit")
            with contextlib.suppress(Exception):
                qmp.close()
        if self.proc is not None:
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10.0)
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> QemuProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise QemuError("QEMU is not started")
        return self.proc.pid

    def log(self) -> str:
        """QEMU's stdout+stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _log_tail(self, n: int = 2000) -> str:
        text = self.log().strip()
        return f"\n--- {self.name} log ---\n{text[-n:]}" if text else ""

    # -- QMP -------------------------------------------------------------------------------
    def cmd(self, command: str, timeout: float | None = None, **args: Any) -> Any:
        """Execute a QMP command; return its "return" value or raise QmpCommandError."""
        if self._qmp is None:
            raise QemuError(f"{self.name}: QMP is not connected")
        if timeout is not None:
            self._qmp.settimeout(timeout)
        try:
            resp = self._qmp.cmd_raw(command, args or None)
        except Exception as exc:
            raise QemuError(f"{self.name}: QMP {command} failed: {exc!r}"
                            f"{self._log_tail()}") from exc
        finally:
            if timeout is not None:
                self._qmp.settimeout(self.cmd_timeout)
        if "error" in resp:
            err = resp["error"]
            raise QmpCommandError(command, err.get("class", "?"), err.get("desc", "?"))
        return resp.get("return")

    def events(self) -> list[dict[str, Any]]:
        """QMP events received so far (and clears them)."""
        if self._qmp is None:
            return []
        evs: list[dict[str, Any]] = self._qmp.get_events(wait=False)
        self._qmp.clear_events()
        return evs

    def status(self) -> str:
        """query-status's run state, e.g. "prelaunch", "running", "paused", "postmigrate"."""
        return str(self.cmd("query-status")["status"])

    # -- migration -------------------------------------------------------------------------
    def set_migration(
        self,
        *,
        multifd: bool = True,
        channels: int = 2,
        compression: str = "none",
        max_bandwidth: int | None = 10**12,
        caps: dict[str, bool] | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        """migrate-set-capabilities + migrate-set-parameters (qemu72-peer.md §2 sequence).

        max_bandwidth None leaves QEMU's default (128 MiB/s, which caps multifd too).
        """
        capabilities = [{"capability": "multifd", "state": multifd}]
        capabilities += [{"capability": k, "state": v} for k, v in (caps or {}).items()]
        self.cmd("migrate-set-capabilities", capabilities=capabilities)
        p: dict[str, Any] = {}
        if multifd:
            p["multifd-channels"] = channels
            p["multifd-compression"] = compression
        if max_bandwidth is not None:
            p["max-bandwidth"] = max_bandwidth
        p.update(params or {})
        if p:
            self.cmd("migrate-set-parameters", **p)

    def migrate_incoming(self, uri: str = "tcp:127.0.0.1:0") -> str:
        """migrate-incoming (QEMU started with `incoming="defer"`); returns the bound URI
        (for tcp port 0: the port QEMU picked, read from query-migrate's socket-address)."""
        self.cmd("migrate-incoming", uri=uri)
        if not uri.startswith("tcp:"):
            return uri
        info = self.cmd("query-migrate")
        for addr in info.get("socket-address", []):
            if addr.get("type") in ("inet", "tcp") or "port" in addr:
                return f"tcp:{addr.get('host', '127.0.0.1')}:{addr['port']}"
        return uri

    def migrate(self, uri: str) -> None:
        self.cmd("migrate", uri=uri)

    def query_migrate(self) -> dict[str, Any]:
        return dict(self.cmd("query-migrate"))

    def wait_migration(self, timeout: float = 120.0, interval: float = 0.02,
                       *, check: bool = True) -> dict[str, Any]:
        """Poll query-migrate until completed / failed / cancelled; return the last answer.

        A destination reports nothing (empty dict) until its incoming migration starts, and
        "active" until the load ends. With `check`, a non-completed final state raises.
        On timeout raises QemuError with the last answer.
        """
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while True:
            if not self.alive:
                raise QemuError(f"{self.name}: QEMU exited during migration"
                                f"{self._log_tail()}")
            info = self.query_migrate()
            if info.get("status") in FINAL_MIGRATION_STATES:
                break
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name}: migration not finished within {timeout:.0f} s: "
                                f"{info}")
            time.sleep(interval)
        if check and info.get("status") != "completed":
            raise QemuError(f"{self.name}: migration {info.get('status')}: "
                            f"{info.get('error-desc', '')}{self._log_tail()}")
        return info

    # -- memory ----------------------------------------------------------------------------
    def pmemsave(self, addr: int, size: int, path: Path | str | None = None) -> bytes | Path:
        """Guest-physical memory [addr, addr+size). With `path`: written there, returns the
        path; without: returned as bytes (read from a temp file; keep it small)."""
        target = Path(path) if path is not None else self._tmp / f"pmem-{addr:x}-{size:x}.bin"
        timeout = max(self.cmd_timeout, size / (256 << 20))  # >= 256 MiB/s
        self.cmd("pmemsave", timeout=timeout, val=addr, size=size, filename=str(target))
        if path is not None:
            return target
        try:
            return target.read_bytes()
        finally:
            target.unlink(missing_ok=True)

    def pmem_sha256(self, addr: int, size: int) -> str:
        """sha256 of guest-physical [addr, addr+size), through a pmemsave temp file."""
        target = self._tmp / f"pmem-{addr:x}-{size:x}.sha"
        self.pmemsave(addr, size, target)
        try:
            return file_sha256(target)
        finally:
            target.unlink(missing_ok=True)


def file_sha256(path: Path | str, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
