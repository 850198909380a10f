"""The qemu-10 profile: QEMU 10.0 round trips (when `.ci/qemu10` unpacked it), and, with
no QEMU at all, the recorded QEMU 10.0 / 7.2 streams replayed into `receive_from_qemu`
plus our own qemu-10 source into our own incoming engine."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from multifd.migration.profile import QEMU_7_2, QEMU_10, Profile
from multifd.qemu.image import VmImage, read_image, write_image, zero_mask
from multifd.qemu.peer import TransferStats, migrate_to_qemu, receive_from_qemu
from tests.conftest import PATTERN_OFFSET, Q10, Q72
from tests.qemu.conftest import Vms, assert_pattern, load_exec, record, replay

MATRIX = [
    pytest.param(0, "none", id="off"),
    pytest.param(2, "none", id="2ch-none"),
    pytest.param(1, "zlib", id="1ch-zlib"),
    pytest.param(4, "zstd", id="4ch-zstd"),
]


@pytest.mark.qemu
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("channels", "compression"), MATRIX)
def test_roundtrip_qemu10(vms: Vms, tmp_path: Path, pattern_bytes: bytes, channels: int,
                          compression: str) -> None:
    """QEMU 10.0 (-M pc = pc-i440fx-10.0) -> incoming -> IMAGE -> migrate -> QEMU 10.0."""
    image, rx = record(vms, "10.0", tmp_path, channels=channels, compression=compression)
    assert rx["machine"] == "pc-i440fx-10.0"
    with read_image(image) as img:
        assert img.switchover_start  # kept between PART and END in the single stream
    dst, _ = replay(vms, "10.0", image, tmp_path, channels=channels, compression=compression)
    assert dst.status() == "prelaunch"
    assert_pattern(dst, pattern_bytes)
    dst.close()
    load_exec(vms, "10.0", image, "pc", pattern_bytes)


# ---------------------------------------------------------------- without a QEMU binary


def _feed(uri_path: Path, main: Path, chans: list[Path]) -> None:
    """A fake source: connect main first, then the channels, then stream everything."""
    socks = []
    for _ in range(1 + len(chans)):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(uri_path))
        socks.append(s)
        time.sleep(0.02)  # keep the accept order (7.2 takes the first as main)
    threads = [threading.Thread(target=s.sendall, args=(p.read_bytes(),))
               for s, p in zip(socks, [main, *chans], strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for s in socks:
        s.close()


def _receive(tmp: Path, profile: Profile, channels: int, compression: str,
             feed: object) -> tuple[VmImage, TransferStats]:
    sock = tmp / "in.sock"
    box: dict[str, object] = {}

    def listening(_addr: str) -> None:
        t = threading.Thread(target=feed, daemon=True)  # type: ignore[arg-type]
        t.start()
        box["t"] = t

    img, st = receive_from_qemu(f"unix:{sock}", profile=profile, channels=channels,
                                compression=compression, timeout=10, on_listen=listening)
    box["t"].join(10)  # type: ignore[attr-defined]
    return img, st


CAPTURES = [
    pytest.param(QEMU_10, Q10 / "multifd2-none", 2, "none", id="10-none"),
    pytest.param(QEMU_10, Q10 / "multifd2-zstd", 2, "zstd", id="10-zstd"),
    pytest.param(QEMU_10, Q10 / "multifd2-zlib", 2, "zlib", id="10-zlib"),
    pytest.param(QEMU_10, Q10 / "nomultifd", 0, "none", id="10-off"),
    pytest.param(QEMU_7_2, Q72 / "multifd2-zstd", 2, "zstd", id="72-zstd"),
    pytest.param(QEMU_7_2, Q72 / "nomultifd", 0, "none", id="72-off"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("profile", "folder", "channels", "compression"), CAPTURES)
def test_recorded_streams_into_incoming(tmp_path: Path, pattern_bytes: bytes,
                                        profile: Profile, folder: Path, channels: int,
                                        compression: str) -> None:
    if (folder / "main.bin").exists():
        main, chans = folder / "main.bin", sorted(folder.glob("chan-*.bin"))
    else:
        main, chans = folder / "conn0-src2dst.bin", sorted(folder.glob("conn[1-9]-src2dst.bin"))
    img, st = _receive(tmp_path, profile, channels, compression,
                       lambda: _feed(tmp_path / "in.sock", main, chans))
    with img:
        assert bytes(img.blocks["pc.ram"].view[PATTERN_OFFSET : PATTERN_OFFSET + (4 << 20)]) \
            == pattern_bytes
        assert img.switchover_start is (profile is QEMU_10)
        assert st.normal_pages >= 817
        out = tmp_path / "x.img"
        write_image(img, out)
    with read_image(out) as again:
        assert bytes(again.blocks["pc.ram"].view[PATTERN_OFFSET : PATTERN_OFFSET + (4 << 20)]) \
            == pattern_bytes


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("channels", "compression"), MATRIX)
def test_qemu10_profile_ours_to_ours(tmp_path: Path, pattern_bytes: bytes, channels: int,
                                     compression: str) -> None:
    """migrate_to_qemu (qemu-10: zero pages in packets, per-round FLUSH, SWITCHOVER_START)
    decodes with the same incoming engine that records QEMU 10.0."""
    with read_image(Q10 / "nomultifd" / "main.bin") as src:
        def send() -> None:
            migrate_to_qemu(src, f"unix:{tmp_path / 'in.sock'}", profile=QEMU_10,
                            channels=channels, compression=compression, timeout=10)

        img, st = _receive(tmp_path, QEMU_10, channels, compression, send)
        with img:
            assert img.tail == src.tail and img.configuration == src.configuration
            assert img.switchover_start
            for name, blk in src.blocks.items():
                assert bytes(img.blocks[name].view) == bytes(blk.view), name
            if channels:
                # One pass towards a QEMU >= 9 destination: zero pages it never received
                # carry nothing (multifd_recv_zero_page_process), so none is sent.
                assert st.zero_pages == 0
                assert st.normal_pages == sum(b.num_pages for b in src.blocks.values()) - sum(
                    int(zero_mask(b).sum()) for b in src.blocks.values())
