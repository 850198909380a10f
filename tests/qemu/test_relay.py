"""`multifd relay`: QEMU source -> relay -> QEMU destination, live, with real QEMUs.

Every cell: the destination starts with `-incoming defer` and its multifd settings, the
relay listens, the source migrates to the relay; the pattern blob must arrive intact (or,
for the live boot-sector guest, the guest must keep running on the destination)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from multifd.qemu import guest
from multifd.qemu.qemuproc import QemuError, QemuProcess
from tests.qemu.conftest import (
    CLI_TIMEOUT_S,
    Vms,
    assert_pattern,
    cli,
    load_exec,
    run_cli,
    set_multifd,
)

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(120)]


class RelayProc:
    """`multifd relay ... --json` in the background; `result()` waits (bounded)."""

    def __init__(self, listen: str, dest: str, *args: str) -> None:
        self.proc = subprocess.Popen(cli("relay", listen, dest, "--json", *args),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            _out, err = self.proc.communicate(timeout=5)
            raise AssertionError(f"multifd relay did not listen: {line}{err}")

    def finish(self, timeout: float = CLI_TIMEOUT_S) -> tuple[int, dict[str, Any], str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
            raise AssertionError(f"multifd relay hung; stderr: {err}") from None
        return self.proc.returncode, json.loads(out) if out.strip() else {}, err

    def result(self) -> dict[str, Any]:
        rc, out, err = self.finish()
        assert rc == 0, f"multifd relay failed: {err}"
        assert out["status"] == "completed" and out["error"] is None
        return out


def relay_cell(vms: Vms, tmp: Path, *, src_version: str = "7.2", dst_version: str = "7.2",
               machine: str = "pc", channels: int = 2, compression: str = "none",
               out_channels: int | None = None, out_compression: str | None = None,
               extra: tuple[str, ...] = (), src_params: dict[str, Any] | None = None,
               profile: str = "qemu-7.2", src: Any = None, dst: Any = None
               ) -> tuple[Any, Any, RelayProc]:
    """Start dst (defer) and src, the relay between them, and the migration; returns
    (src, dst, relay) with the migration under way."""
    oc = channels if out_channels is None else out_channels
    ocomp = compression if out_compression is None else out_compression
    if dst is None:
        dst = vms.start(dst_version, "dst", machine=machine, incoming="defer")
    set_multifd(dst, oc, ocomp)
    dst.migrate_incoming(f"unix:{tmp}/dst.sock")
    if src is None:
        src = vms.start(src_version, "src", machine=machine, pattern=True)
    set_multifd(src, channels, compression)
    if src_params:
        src.cmd("migrate-set-parameters", **src_params)
    relay = RelayProc(f"unix:{tmp}/relay.sock", f"unix:{tmp}/dst.sock", "--profile", profile,
                      "--channels", str(channels), "--compression", compression,
                      "--out-channels", str(oc), "--out-compression", ocomp,
                      "--idle-timeout", "20", *extra)
    src.migrate(f"unix:{tmp}/relay.sock")
    return src, dst, relay


def _done(src: Any, dst: Any, relay: RelayProc) -> dict[str, Any]:
    try:
        src.wait_migration(timeout=30)
        out = relay.result()
    except BaseException:
        relay.proc.kill()
        raise
    dst.wait_migration(timeout=30)
    assert src.query_migrate()["status"] == "completed"
    return out


@pytest.mark.parametrize(("channels", "compression", "out_channels", "out_compression"), [
    pytest.param(2, "none", 3, "zstd", id="2none-3zstd"),
    pytest.param(2, "none", 2, "none", id="passthrough"),
    pytest.param(0, "none", 2, "zlib", id="off-2zlib"),
    pytest.param(2, "zstd", 0, "none", id="2zstd-off"),
])
def test_relay_72_paused(vms: Vms, tmp_path: Path, pattern_bytes: bytes, channels: int,
                         compression: str, out_channels: int, out_compression: str) -> None:
    """7.2 -> relay -> 7.2, paused pattern guest: the blob arrives; counts add up."""
    src, dst, relay = relay_cell(vms, tmp_path, channels=channels, compression=compression,
                                 out_channels=out_channels, out_compression=out_compression)
    out = _done(src, dst, relay)
    assert dst.status() == "prelaunch"
    assert_pattern(dst, pattern_bytes)
    assert out["in"]["channels"] == channels and out["out"]["channels"] == out_channels
    assert out["out"]["compression"] == out_compression
    assert out["passthrough"] is (channels == out_channels and compression == out_compression)
    total = (64 << 20) // 4096
    for side in ("in", "out"):
        pages = out[side]["pages"]
        assert pages["normal"] >= 768 and pages["normal"] + pages["zero"] >= total, side
        assert len(out[side]["per_channel"]) == out[side]["channels"]
        if out[side]["channels"]:
            assert out[side]["syncs"] == out["passes"] >= 3, side
            assert all(c["bytes"] > 0 for c in out[side]["per_channel"]), side
    assert out["in"]["pages"] == out["out"]["pages"]
    assert 0 < out["peak_rss_mib"] < 256
    assert out["relay_added_ms"] is not None and out["total_time_ms"] > 0


def test_relay_record_loads_into_qemu(vms: Vms, tmp_path: Path, pattern_bytes: bytes) -> None:
    """--record IMAGE: QEMU loads it with exec:cat, `multifd inspect` reads it; and the
    --timeline-json samples with both sides' channels."""
    image = tmp_path / "rec.img"
    timeline = tmp_path / "timeline.json"
    src, dst, relay = relay_cell(vms, tmp_path, channels=2, out_channels=1,
                                 extra=("--record", str(image), "--timeline-json",
                                        str(timeline)))
    out = _done(src, dst, relay)
    assert out["recorded"] == str(image)
    doc = json.loads(timeline.read_text())
    assert doc["samples"][-1]["transferred"] == out["in"]["bytes"]["total"]
    assert len(doc["channels"]["source"]) == 2 and len(doc["channels"]["destination"]) == 1
    assert_pattern(dst, pattern_bytes)
    dst.close()
    res = run_cli("inspect", str(image), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["machine"] == "pc-i440fx-7.2"
    load_exec(vms, "7.2", image, "pc", pattern_bytes)


@pytest.mark.slow
def test_relay_live_boot_guest(vms: Vms, tmp_path: Path) -> None:
    """The boot-sector guest rewriting its working set: 7.2 live through the relay (2
    channels in, 3 zlib out); the destination holds exactly the source's final memory and
    the guest runs on after `cont`."""
    wss = 1024
    img = guest.image(tmp_path / "g.img", wss)

    def working_set(vm: QemuProcess) -> guest.WorkingSet:
        return guest.check_working_set(vm.pmemsave(guest.WSS_BASE, wss * guest.PAGE_SIZE), wss)

    src = QemuProcess(guest.drive_args(img), name="src", memory_mib=64, start_timeout=20,
                      cmd_timeout=10)
    dst = QemuProcess(guest.drive_args(img), name="dst", memory_mib=64, incoming="defer",
                      start_timeout=20, cmd_timeout=10)
    vms.started += [src, dst]
    src.start()
    dst.start()
    src.cmd("cont")
    deadline = time.monotonic() + 60  # SeaBIOS hands over after ~4-10 s
    while not working_set(src).started:
        assert time.monotonic() < deadline, "guest never wrote its working set"
        time.sleep(0.1)
    time.sleep(0.3)
    src, dst, relay = relay_cell(vms, tmp_path, channels=2, out_channels=3,
                                 out_compression="zlib", src=src, dst=dst)
    info = src.wait_migration(timeout=60)
    out = relay.result()
    dst.wait_migration(timeout=30)
    assert info["ram"]["dirty-sync-count"] >= 2, info  # it was live: several passes
    assert out["passes"] >= 3 and out["out"]["syncs"] == out["passes"]
    recorded = working_set(src)
    assert src.status() == "postmigrate"
    assert recorded.consistent, recorded.problem
    loaded = working_set(dst)
    assert loaded == recorded
    dst.cmd("cont")
    time.sleep(0.5)
    assert dst.status() == "running"
    dst.cmd("stop")
    later = working_set(dst)
    assert later.consistent, later.problem
    assert later.max_pass > recorded.max_pass, (recorded, later)


@pytest.mark.parametrize(("channels", "compression", "out_channels", "out_compression"), [
    pytest.param(2, "none", 1, "zlib", id="2none-1zlib"),
    pytest.param(2, "zstd", 2, "zstd", id="passthrough-zstd"),
])
def test_relay_10_to_10(vms: Vms, tmp_path: Path, pattern_bytes: bytes, channels: int,
                        compression: str, out_channels: int, out_compression: str) -> None:
    """10.0 -> relay -> 10.0 with the qemu-10 profile (zero pages in packets, FLUSH)."""
    src, dst, relay = relay_cell(vms, tmp_path, src_version="10.0", dst_version="10.0",
                                 channels=channels, compression=compression,
                                 out_channels=out_channels, out_compression=out_compression,
                                 profile="qemu-10")
    out = _done(src, dst, relay)
    assert_pattern(dst, pattern_bytes)
    assert out["in"]["profile"] == out["out"]["profile"] == "qemu-10"
    assert out["in"]["pages"] == out["out"]["pages"]
    assert out["out"]["syncs"] == out["passes"] >= 2


@pytest.mark.parametrize(("src_version", "dst_version"), [("7.2", "10.0"), ("10.0", "7.2")])
def test_relay_across_versions(vms: Vms, tmp_path: Path, pattern_bytes: bytes,
                               src_version: str, dst_version: str) -> None:
    """7.2 <-> 10.0 with the 7.2 machine type on the 10.0 side (the qemu-7.2 profile)."""
    src, dst, relay = relay_cell(vms, tmp_path, src_version=src_version,
                                 dst_version=dst_version, machine="pc-i440fx-7.2",
                                 channels=2, out_channels=3, out_compression="zstd")
    _done(src, dst, relay)
    assert_pattern(dst, pattern_bytes)


def test_relay_tls_upstream_clear_downstream(vms: Vms, tmp_path: Path,
                                             pattern_bytes: bytes) -> None:
    """The source migrates over TLS (x509, QEMU's layout) to the relay; clear onwards."""
    from tests.conftest import PATTERN_OFFSET
    from tests.qemu.conftest import PATTERN
    from tests.security.certs import make_creds

    creds = tmp_path / "creds"
    make_creds(creds)
    src = QemuProcess(["-object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client",
                       "-device", f"loader,file={PATTERN},addr={PATTERN_OFFSET:#x}"],
                      version="7.2", name="src", memory_mib=64, start_timeout=20,
                      cmd_timeout=10)
    vms.started.append(src)
    src.start()
    src, dst, relay = relay_cell(vms, tmp_path, channels=2, out_channels=2, src=src,
                                 src_params={"tls-creds": "tls0", "tls-hostname": "localhost"},
                                 extra=("--tls-creds", str(creds)))
    out = _done(src, dst, relay)
    assert_pattern(dst, pattern_bytes)
    assert out["passthrough"] is True


FAULTS = [  # out 3 zlib: transcoded; out 2 none: passthrough (payloads spliced)
    pytest.param("in:reset-channel:1@iterate", 3, id="in-reset"),
    pytest.param("in:reset-channel:1@iterate", 2, id="in-reset-passthrough"),
    pytest.param("in:stall-channel:0@iterate", 3, id="in-stall"),
    pytest.param("in:close-main@iterate", 3, id="in-close-main"),
    pytest.param("out:reset-channel:0@iterate", 3, id="out-reset"),
    pytest.param("out:reset-channel:1@iterate", 2, id="out-reset-passthrough"),
    pytest.param("out:stall-channel:2@iterate", 3, id="out-stall"),
    pytest.param("out:close-main@setup", 3, id="out-close-main"),
]


@pytest.mark.parametrize(("spec", "out_channels"), FAULTS)
def test_relay_fault_ends_both_sides(vms: Vms, tmp_path: Path, spec: str,
                                     out_channels: int) -> None:
    """A fault on either side: the relay exits 1 with one error line naming the side, the
    source's migration fails (the guest stays as it was), the destination's incoming
    migration fails; all within 10 s."""
    t0 = time.monotonic()
    src, dst, relay = relay_cell(vms, tmp_path, channels=2, out_channels=out_channels,
                                 out_compression="zlib" if out_channels == 3 else "none",
                                 # ~2 s for the 4 MiB blob: the source is still sending
                                 src_params={"max-bandwidth": 2 << 20},
                                 extra=("--inject-fault", spec, "--idle-timeout", "3"))
    rc, out, err = relay.finish(timeout=10)
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    side = spec.split(":")[0]
    want = "upstream" if side == "in" else "downstream"
    assert lines[0].startswith(f"error: {want}"), lines[0]
    assert out["status"] == "failed" and out["error"] == lines[0][len("error: "):]
    info = src.wait_migration(timeout=10, check=False)
    assert info["status"] == "failed", info
    assert src.alive and src.status() == "prelaunch"
    deadline = time.monotonic() + 10
    while not _incoming_failed(dst):
        assert time.monotonic() < deadline, "the destination did not fail"
        time.sleep(0.05)
    assert time.monotonic() - t0 < 15


def _incoming_failed(vm: QemuProcess) -> bool:
    """The destination's incoming migration failed (QEMU 7.2 exits then; 10.0 may too)."""
    try:
        return not vm.alive or vm.query_migrate().get("status") in ("failed", "cancelled")
    except QemuError:  # exited between the two looks
        return not vm.alive
