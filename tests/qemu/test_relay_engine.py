"""The relay engine without QEMU: our QEMU-speaking source (`migrate_to_qemu`) -> `Relay`
-> our QEMU-speaking destination (`receive_from_qemu`), over unix sockets.

This reaches what real QEMU pairs cannot (their machine type fixes the profile): qemu-10
<-> qemu-7.2 transcoding (zero pages in packets <-> on the main stream, MULTIFD_FLUSH <->
a sync per RAM section), multifd off on either side, and the recorded image."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest

from multifd.migration.profile import QEMU_7_2, QEMU_10, Profile
from multifd.qemu.image import read_image
from multifd.qemu.peer import PeerError, migrate_to_qemu, receive_from_qemu
from multifd.qemu.relay import Relay, RelayError, RelaySide, _Barrier, parse_relay_fault
from tests.conftest import Q10

pytestmark = [pytest.mark.timeout(60)]

SOURCE_IMAGE = Q10 / "nomultifd" / "main.bin"

CELLS = [
    pytest.param(QEMU_10, 2, "none", QEMU_7_2, 3, "zstd", id="10-2none-to-72-3zstd"),
    pytest.param(QEMU_7_2, 2, "zlib", QEMU_10, 1, "none", id="72-2zlib-to-10-1none"),
    pytest.param(QEMU_10, 0, "none", QEMU_10, 2, "zstd", id="10-off-to-10-2zstd"),
    pytest.param(QEMU_10, 3, "zstd", QEMU_10, 0, "none", id="10-3zstd-to-10-off"),
    pytest.param(QEMU_7_2, 2, "none", QEMU_7_2, 0, "none", id="72-2none-to-72-off"),
    pytest.param(QEMU_10, 2, "zstd", QEMU_10, 2, "zstd", id="10-passthrough"),
]


def _relay_chain(tmp: Path, inp: RelaySide, out_profile: Profile, out_channels: int,
                 out_compression: str, **relay_kw: Any) -> tuple[Any, Any, Relay]:
    """destination listens -> relay listens -> source sends; returns (image, stats, relay)."""
    box: dict[str, Any] = {}
    relay = Relay(inp, RelaySide(f"unix:{tmp}/dst.sock", out_profile, out_channels,
                                 out_compression), timeout=10,
                  on_listen=lambda _a: _start(box, "src", _send, inp), **relay_kw)

    def run_relay() -> None:
        try:
            box["result"] = relay.run()
        except RelayError as e:
            box["error"] = e

    img, st = receive_from_qemu(f"unix:{tmp}/dst.sock", profile=out_profile,
                                channels=out_channels, compression=out_compression,
                                timeout=10, on_listen=lambda _a: _start(box, "relay",
                                                                         run_relay))
    for name in ("relay", "src"):
        box[name].join(10)
    assert "error" not in box, box.get("error")
    return img, st, relay


def _start(box: dict[str, Any], name: str, fn: Any, *args: Any) -> None:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    box[name] = t


def _send(inp: RelaySide) -> None:
    with read_image(SOURCE_IMAGE) as src:
        src.switchover_start &= inp.profile.switchover_start  # a 7.2 source has none
        migrate_to_qemu(src, inp.uri, profile=inp.profile, channels=inp.channels,
                        compression=inp.compression, timeout=10)


@pytest.mark.parametrize(("in_profile", "channels", "compression", "out_profile",
                          "out_channels", "out_compression"), CELLS)
def test_relay_transcodes(tmp_path: Path, in_profile: Profile, channels: int,
                          compression: str, out_profile: Profile, out_channels: int,
                          out_compression: str) -> None:
    inp = RelaySide(f"unix:{tmp_path}/relay.sock", in_profile, channels, compression)
    record = tmp_path / "rec.img"
    img, _st, relay = _relay_chain(tmp_path, inp, out_profile, out_channels, out_compression,
                                  record=str(record))
    with read_image(SOURCE_IMAGE) as want, img, read_image(record) as rec:
        for name, blk in want.blocks.items():
            assert bytes(img.blocks[name].view) == bytes(blk.view), name
            assert bytes(rec.blocks[name].view) == bytes(blk.view), name
        assert img.tail == want.tail == rec.tail
        # SWITCHOVER_START only towards qemu-10; the record keeps the source's
        assert img.switchover_start is (out_profile is QEMU_10 and in_profile is QEMU_10)
        assert rec.switchover_start is (in_profile is QEMU_10)
    assert relay.passthrough is (in_profile is out_profile and channels == out_channels
                                 and compression == out_compression)
    ins, outs = relay.in_stats, relay.out_stats
    assert ins.normal_pages == outs.normal_pages > 0
    if out_channels and channels:
        assert outs.syncs >= 2 and sum(outs.chan_bytes) > 0
    if out_channels and not (in_profile.zero_pages_in_multifd and channels
                             and not out_profile.zero_pages_in_multifd):
        assert ins.zero_pages == outs.zero_pages


def test_relay_refuses_a_mismatched_destination(tmp_path: Path) -> None:
    """The destination expects 2 channels, the relay sends 3: one error naming the side,
    with what to check."""
    inp = RelaySide(f"unix:{tmp_path}/relay.sock", QEMU_7_2, 2, "none")
    def send() -> None:
        with contextlib.suppress(PeerError):  # shut out, unless all was sent already
            _send(inp)

    relay = Relay(inp, RelaySide(f"unix:{tmp_path}/dst.sock", QEMU_7_2, 3, "none"),
                  timeout=3, on_listen=lambda _a: threading.Thread(
                      target=send, daemon=True).start())
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            relay.run()
        except RelayError as e:
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    with pytest.raises(Exception):  # noqa: B017 - the destination fails too
        receive_from_qemu(f"unix:{tmp_path}/dst.sock", profile=QEMU_7_2, channels=2,
                          timeout=3, on_listen=lambda _a: t.start())
    t.join(10)
    err = box["error"]
    assert err.side == "out", err
    assert str(err).startswith("downstream (destination QEMU): ")


def test_parse_relay_fault() -> None:
    f = parse_relay_fault("out:reset-channel:2@iterate")
    assert (f.side, f.fault.kind, f.fault.channel, f.fault.phase) == (
        "out", "reset-channel", 2, "iterate")
    assert parse_relay_fault("in:close-main@setup").spec == "in:close-main@setup"
    for bad, why in (("reset-channel:1@iterate", "SIDE"), ("up:close-main@setup", "SIDE"),
                     ("in:kill-source@setup", "kill"), ("in:close-main@nowhere", "PHASE")):
        with pytest.raises(ValueError, match=why):
            parse_relay_fault(bad)


def test_unheld_barrier_counts_sync_packets_per_channel() -> None:
    """Pure passthrough: channels pass their SYNC packets without stopping; the marker
    waits until each has passed as many as there were passes, and names a channel that
    ended short of that (one that ended after its last SYNC is fine)."""
    barrier = _Barrier(2, threading.Event())
    barrier.passed(0)
    barrier.passed(0)  # channel 0 is a pass ahead: it does not wait for the marker
    with pytest.raises(RelayError, match="1 of 2 multifd channels sent no SYNC"):
        barrier.wait_all(0.05, passes=1)
    barrier.passed(1)
    barrier.wait_all(1.0, passes=1)
    barrier.channel_ended(0)
    with pytest.raises(RelayError, match="1 of 2 multifd channels sent no SYNC"):
        barrier.wait_all(0.05, passes=2)  # channel 0 ended after its 2nd: waits for 1
    barrier.channel_ended(1)
    with pytest.raises(RelayError, match="ended before its SYNC packet"):
        barrier.wait_all(1.0, passes=2)


def test_cli_refuses_bad_options_in_one_line(tmp_path: Path) -> None:
    from tests.qemu.conftest import run_cli

    for args, want in ((["--inject-fault", "in:kill-source@setup"], "the relay injects"),
                       (["--out-channels", "2"], "multifd needs a tcp: or unix: DEST_URI"),
                       (["--channels", "0", "--compression", "zstd"], "compression needs")):
        res = run_cli("relay", f"unix:{tmp_path}/r.sock", "exec:cat > /dev/null",
                      "--profile", "qemu-7.2", "--idle-timeout", "1", *args)
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], lines


@pytest.mark.parametrize("out_channels", [3, 2], ids=["transcode", "passthrough"])
def test_relay_forwards_device_state_packets(tmp_path: Path, out_channels: int) -> None:
    """Our qemu-10 engine with multifd device state (0x40 packets) through the relay: the
    destination machine computes on to the same checksum as a run without migration."""
    from multifd.machine.demo import DemoWorkload, build_demo_machine, expected_checksum
    from multifd.migration.destination import MigrationDestination
    from multifd.migration.params import MigrationCapabilities, MigrationParameters
    from multifd.migration.sections import GLOBALSTATE_BODY, GLOBALSTATE_IDSTR
    from multifd.migration.source import MigrationSource
    from multifd.wire.stream import LENGTH_PREFIXED

    ram, state, steps = 32 << 20, 2 << 20, 20

    def params(channels: int) -> dict[str, Any]:
        p = MigrationParameters()
        p.set({"multifd-channels": channels})
        c = MigrationCapabilities()
        c.set([{"capability": "multifd", "state": True}])
        return {"params": p, "caps": c, "profile": QEMU_10}

    dst_machine = build_demo_machine(ram, seed=3, populate=False, device_state_size=state)
    dst_machine.set_incoming()
    dest = MigrationDestination(dst_machine, **params(out_channels))
    dest_uri = dest.listen(f"unix:{tmp_path}/dst.sock")
    src_machine = build_demo_machine(ram, seed=3, total_steps=steps, device_state_size=state)
    src_machine.start()
    src = MigrationSource(src_machine, **params(2))
    # the demo machine's live device sections are length-prefixed (QEMU's cannot be
    # delimited: with QEMU only RAM may be live)
    framings: dict[str, Any] = {d.idstr: LENGTH_PREFIXED for d in src_machine.devices}
    framings[GLOBALSTATE_IDSTR] = GLOBALSTATE_BODY
    relay = Relay(RelaySide(f"unix:{tmp_path}/relay.sock", QEMU_10, 2),
                  RelaySide(dest_uri, QEMU_10, out_channels), timeout=10, framings=framings,
                  on_listen=lambda _a: src.start(f"unix:{tmp_path}/relay.sock"))
    try:
        relay.run()
        assert str(src.wait(10)) == "completed", src.error
        assert str(dest.wait(10)) == "completed", dest.error
        assert relay.passthrough is (out_channels == 2)
        assert relay.in_stats.device_state_packets == relay.out_stats.device_state_packets > 0
        DemoWorkload(dst_machine).run_to_completion()
        assert dst_machine.checksum() == expected_checksum(ram, 3, steps,
                                                           device_state_size=state)
    finally:
        src_machine.close()
        dst_machine.close()
