"""zero-page-detection is honoured (QEMU 9.0+ semantics, qemu-reference.md §2.7).

A small paused machine with data pages and zero pages migrates locally; at switchover
(the MIGRATION "device" event, machine paused, before the last bitmap sync) some pages
that were sent with data become zero and some zero pages get data, so the last pass
has zero pages the destination must see:

* ``none``: no page is looked at; every page goes as a normal page, none is skipped;
* ``legacy``: the migration thread finds them: ZERO records on the main stream, with or
  without multifd, for both profiles;
* ``multifd`` (qemu-10): the channels find them: zero offsets in the packets.

Zero pages never sent are skipped with ``legacy``/``multifd`` (the destination's RAM
starts zeroed). The connections are recorded on the wire (FaultProxy) and decoded with
`multifd inspect`'s decoder, which says where the zero pages went and must rebuild the
source's memory; the destination's memory equals the source's in every case.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol
from tests.conftest import Q10, Q72

from multifd.machine.demo import build_demo_machine
from multifd.machine.machine import Machine
from multifd.machine.ramblock import RamBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import (
    MigrationCapabilities,
    MigrationParameters,
    ParameterError,
    effective_zero_page_detection,
)
from multifd.migration.profile import QEMU_7_2, QEMU_10, get_profile
from multifd.migration.source import MigrationSource
from multifd.qemu.image import VmImage, read_image, zero_mask
from multifd.qemu.inspect import InspectResult, inspect_streams
from multifd.qemu.peer import PeerError, TransferStats, migrate_to_qemu, receive_from_qemu
from multifd.qmp import serve_qmp
from multifd.testing.faults import FaultProxy

pytestmark = pytest.mark.timeout(60)

PS = 4096
BLOCKS = (("pc.ram", 512), ("pc.bios", 64))  # name, pages
DATA = {name: np.arange(n) % 4 == 0 for name, n in BLOCKS}  # pages with data at first
ZEROED = {name: np.arange(n) % 8 == 0 for name, n in BLOCKS}  # data pages that become 0
FILLED = {name: np.arange(n) % 8 == 2 for name, n in BLOCKS}  # zero pages that get data
TOTAL = sum(n for _, n in BLOCKS)
N_DATA = sum(int(m.sum()) for m in DATA.values())
N_ZEROED = sum(int(m.sum()) for m in ZEROED.values())
N_FILLED = sum(int(m.sum()) for m in FILLED.values())


def _source_machine() -> Machine:
    rng = np.random.default_rng(12)
    m = Machine([RamBlock(name, n * PS) for name, n in BLOCKS])
    for name, _ in BLOCKS:
        b = m.block(name)
        for p in np.flatnonzero(DATA[name]).tolist():
            b.write(p * PS, rng.integers(1, 256, PS, dtype=np.uint8))
    return m


def _switchover_writes(m: Machine) -> None:
    rng = np.random.default_rng(34)
    for name, _ in BLOCKS:
        b = m.block(name)
        for p in np.flatnonzero(ZEROED[name]).tolist():
            b.write(p * PS, bytes(PS))
        for p in np.flatnonzero(FILLED[name]).tolist():
            b.write(p * PS, rng.integers(1, 256, PS, dtype=np.uint8))


def _migrate(profile: str, mode: str | None, multifd: bool
             ) -> tuple[MigrationSource, InspectResult, Machine, Machine]:
    """One migration through a recording proxy: the source, the decoded wire, both
    machines."""
    p = MigrationParameters()
    p.set({"max-bandwidth": 0, "multifd-channels": 2})
    if mode is not None:
        p.set({"zero-page-detection": mode})
    c = MigrationCapabilities()
    c.set([{"capability": "multifd", "state": multifd}])
    prof = get_profile(profile)
    dst_machine = Machine([RamBlock(name, n * PS) for name, n in BLOCKS], incoming=True)
    dst = MigrationDestination(dst_machine, params=p, caps=c, profile=prof)
    uri = dst.listen("tcp:127.0.0.1:0")
    src_machine = _source_machine()
    hit: list[str] = []

    def on_event(name: str, data: dict[str, Any]) -> None:
        if name == "MIGRATION" and data.get("status") == "device" and not hit:
            hit.append("device")
            _switchover_writes(src_machine)

    with FaultProxy.for_uri(uri, record=True) as proxy:
        src = MigrationSource(src_machine, params=p, caps=c, profile=prof,
                              on_event=on_event)
        src.start(proxy.uri)
        assert str(src.wait(30)) == "completed", src.error
        assert str(dst.wait(30)) == "completed", dst.error
        conns = {cn.name: bytes(cn.recorded or b"") for cn in proxy.conns}
    assert hit == ["device"]
    chans = sorted(n for n in conns if n != "main")
    assert len(chans) == (2 if multifd else 0)
    wire = inspect_streams(("main", conns["main"]), [(n, conns[n]) for n in chans])
    return src, wire, src_machine, dst_machine


def _same_memory(src: Machine, dst: Machine, wire: InspectResult) -> None:
    for name, _ in BLOCKS:
        assert np.array_equal(src.block(name).pages, dst.block(name).pages), name
        assert np.array_equal(np.frombuffer(wire.block_content(name), dtype=np.uint8),
                              src.block(name).array), name
    assert src.checksum() == dst.checksum()


def _channel_zero(wire: InspectResult) -> int:
    return sum(c.zero_pages for c in wire.channels)


@pytest.mark.parametrize(
    ("profile", "multifd"),
    [("qemu-10", True), ("qemu-7.2", True), ("qemu-10", False), ("qemu-7.2", False)],
)
def test_none_sends_every_page_as_data(profile: str, multifd: bool) -> None:
    src, wire, sm, dm = _migrate(profile, "none", multifd)
    try:
        ram = src.query()["ram"]
        # every page once in the first pass, the pages written at switchover again
        assert ram["normal"] == TOTAL + N_ZEROED + N_FILLED
        assert ram["duplicate"] == 0
        assert wire.zero_pages == 0
        assert wire.normal_pages == ram["normal"]
        if multifd:
            assert wire.main_normal_pages == 0
        _same_memory(sm, dm, wire)
    finally:
        sm.close()
        dm.close()


@pytest.mark.parametrize(
    ("profile", "multifd"),
    [("qemu-10", True), ("qemu-7.2", True), ("qemu-10", False), ("qemu-7.2", False)],
)
def test_legacy_sends_zero_pages_on_the_main_stream(profile: str, multifd: bool) -> None:
    src, wire, sm, dm = _migrate(profile, "legacy", multifd)
    try:
        ram = src.query()["ram"]
        assert ram["normal"] == N_DATA + N_FILLED
        # never-sent zero pages skipped (fresh destination) + the re-zeroed ones
        assert ram["duplicate"] == (TOTAL - N_DATA) + N_ZEROED
        assert wire.main_zero_pages == N_ZEROED  # ZERO records
        assert _channel_zero(wire) == 0
        assert wire.normal_pages == N_DATA + N_FILLED
        _same_memory(sm, dm, wire)
    finally:
        sm.close()
        dm.close()


def test_multifd_sends_zero_pages_in_the_packets() -> None:
    src, wire, sm, dm = _migrate("qemu-10", "multifd", True)
    try:
        ram = src.query()["ram"]
        assert ram["normal"] == N_DATA + N_FILLED
        assert ram["duplicate"] == (TOTAL - N_DATA) + N_ZEROED
        assert wire.main_zero_pages == 0
        assert _channel_zero(wire) == N_ZEROED  # zero offsets in the packets
        assert sum(s.get("zero_pages", 0) for s in src.channel_stats()) == N_ZEROED
        assert wire.normal_pages == N_DATA + N_FILLED
        _same_memory(sm, dm, wire)
    finally:
        sm.close()
        dm.close()


@pytest.mark.parametrize(("profile", "main_zero"), [("qemu-10", 0), ("qemu-7.2", N_ZEROED)])
def test_default_follows_the_profile(profile: str, main_zero: int) -> None:
    """Untouched parameters: qemu-10 finds zero pages in the channels, qemu-7.2 on the
    migration thread (QEMU 7.2 has no such parameter)."""
    _src, wire, sm, dm = _migrate(profile, None, True)
    try:
        assert wire.main_zero_pages == main_zero
        assert _channel_zero(wire) == N_ZEROED - main_zero
        _same_memory(sm, dm, wire)
    finally:
        sm.close()
        dm.close()


def test_multifd_without_channels_detects_on_the_migration_thread() -> None:
    """QEMU: without the multifd capability every mode but none uses save_zero_page."""
    src, wire, sm, dm = _migrate("qemu-10", "multifd", False)
    try:
        assert wire.main_zero_pages == N_ZEROED
        assert src.query()["ram"]["normal"] == wire.normal_pages == N_DATA + N_FILLED
        _same_memory(sm, dm, wire)
    finally:
        sm.close()
        dm.close()


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("multifd", [True, False])
def test_explicit_multifd_with_qemu72_is_refused_by_start(multifd: bool) -> None:
    """Refused in the caller before anything connects or pauses; the machine is intact."""
    p = MigrationParameters(**{"zero-page-detection": "multifd", "max-bandwidth": 0})
    c = MigrationCapabilities()
    c.set([{"capability": "multifd", "state": multifd}])
    sm = _source_machine()
    before = sm.checksum()
    try:
        src = MigrationSource(sm, params=p, caps=c, profile=QEMU_7_2)
        with pytest.raises(ParameterError) as e:
            src.start("tcp:127.0.0.1:1")
        msg = str(e.value)
        assert "zero-page-detection" in msg and "qemu-7.2" in msg and "'multifd'" in msg
        assert src.status.status.value == "none"
        assert sm.checksum() == before
    finally:
        sm.close()


def test_effective_mode_per_profile() -> None:
    p = MigrationParameters()
    assert effective_zero_page_detection(p, QEMU_10) == "multifd"
    assert effective_zero_page_detection(p, QEMU_7_2) == "legacy"  # untouched default
    for mode in ("none", "legacy"):
        p.set({"zero-page-detection": mode})
        assert effective_zero_page_detection(p, QEMU_7_2) == mode
        assert effective_zero_page_detection(p, QEMU_10) == mode
    p.set({"zero-page-detection": "multifd"})
    assert effective_zero_page_detection(p, QEMU_10) == "multifd"
    with pytest.raises(ParameterError, match=r"with profile qemu-7\.2"):
        effective_zero_page_detection(p, QEMU_7_2)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="zpd") as d:
        yield Path(d)


@pytest.mark.parametrize(("profile", "default"), [("qemu-10", "multifd"),
                                                  ("qemu-7.2", "legacy")])
def test_qmp_migrate_set_parameters(sockdir: Path, profile: str, default: str) -> None:
    machine = build_demo_machine(1 << 20, seed=1)
    srv = serve_qmp(machine, f"unix:{sockdir / 'q.sock'}", profile=profile)
    qmp = QEMUMonitorProtocol(str(sockdir / "q.sock"))
    try:
        qmp.connect()
        qmp.settimeout(10)
        assert qmp.cmd("query-migrate-parameters")["zero-page-detection"] == default  # type: ignore[index]
        bad = [({"zero-page-detection": "fast"}, "does not accept value 'fast'"),
               ({"zero-page-detection": 1}, "expected: string")]
        if profile == "qemu-7.2":
            bad.append(({"zero-page-detection": "multifd"}, "with profile qemu-7.2"))
        for args, text in bad:
            reply = qmp.cmd_raw("migrate-set-parameters", args)
            err = reply.get("error")
            assert err is not None and err["class"] == "GenericError", reply
            assert text in err["desc"] and "zero-page-detection" in err["desc"], err
            assert qmp.cmd("query-migrate-parameters")["zero-page-detection"] == default  # type: ignore[index]
        modes = ["none", "legacy"] + (["multifd"] if profile == "qemu-10" else [])
        for mode in modes:
            qmp.cmd("migrate-set-parameters", **{"zero-page-detection": mode})
            assert qmp.cmd("query-migrate-parameters")["zero-page-detection"] == mode  # type: ignore[index]
    finally:
        qmp.close()
        srv.close()
        machine.close()


# -- multifd migrate (an image to a QEMU destination; ours receives here) -------------------


def _image_path(profile: str) -> Path:
    return Q10 / "nomultifd" / "main.bin" if profile == "qemu-10" else (
        Q72 / "nomultifd" / "conn0-src2dst.bin")


def _replay(tmp: Path, profile: str, mode: str | None
            ) -> tuple[VmImage, VmImage, TransferStats]:
    """migrate_to_qemu -> receive_from_qemu over 2 channels: (source image, received
    image, the receiver's TransferStats)."""
    prof = get_profile(profile)
    src = read_image(_image_path(profile))
    uri = f"unix:{tmp / 'in.sock'}"
    errors: list[BaseException] = []

    def send(_addr: str) -> None:
        def run() -> None:
            try:
                migrate_to_qemu(src, uri, profile=prof, channels=2, timeout=10,
                                zero_page_detection=mode)
            except BaseException as exc:
                errors.append(exc)

        threading.Thread(target=run, daemon=True).start()

    img, st = receive_from_qemu(uri, profile=prof, channels=2, timeout=10, on_listen=send)
    assert not errors, errors
    return src, img, st


@pytest.mark.parametrize(("profile", "mode"), [
    ("qemu-10", "none"), ("qemu-10", "legacy"), ("qemu-10", "multifd"), ("qemu-10", None),
    ("qemu-7.2", "none"), ("qemu-7.2", "legacy"), ("qemu-7.2", None),
])
def test_migrate_to_qemu_honours_the_mode(tmp_path: Path, profile: str, mode: str | None
                                          ) -> None:
    src, img, st = _replay(tmp_path, profile, mode)
    with src, img:
        total = sum(b.num_pages for b in src.blocks.values())
        zeros = sum(int(zero_mask(b).sum()) for b in src.blocks.values())
        assert zeros > 0
        effective = mode or ("multifd" if profile == "qemu-10" else "legacy")
        if effective == "none":  # every page with its data
            assert (st.normal_pages, st.zero_pages) == (total, 0)
        elif effective == "legacy":  # ZERO records on the main stream
            assert (st.normal_pages, st.zero_pages) == (total - zeros, zeros)
            assert img.zero_pages == zeros
        else:  # multifd: one pass to a fresh QEMU >= 9 destination sends no zero page
            assert (st.normal_pages, st.zero_pages) == (total - zeros, 0)
        for name, blk in src.blocks.items():
            assert bytes(img.blocks[name].view) == bytes(blk.view), name


def test_migrate_to_qemu_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    uri = f"unix:{tmp_path / 'nobody.sock'}"
    cases = [
        ("qemu-7.2", 2, "multifd", "profile qemu-7.2"),
        ("qemu-10", 2, "fast", "not 'fast'"),
        ("qemu-10", 0, "none", "needs multifd"),
    ]
    for profile, channels, mode, text in cases:
        with read_image(_image_path(profile)) as img, pytest.raises(PeerError) as info:
            migrate_to_qemu(img, uri, profile=get_profile(profile), channels=channels,
                            timeout=2, zero_page_detection=mode)
        assert "zero-page-detection" in str(info.value) and text in str(info.value)
