"""The boot-sector guest (multifd.qemu.guest) boots under QEMU 7.2 and keeps counting passes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from multifd.qemu import guest
from multifd.qemu.qemuproc import QemuProcess, available

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

WSS = 256  # pages: 1 MiB at 16 MiB


def test_boot_sector_layout() -> None:
    sector = guest.boot_sector(WSS, 1000)
    assert len(sector) == 512
    assert sector[510:] == b"\x55\xaa"
    assert sector[0] == 0xFA  # cli
    # the working-set size and the pacing are immediates in the code
    assert (WSS).to_bytes(4, "little") in sector
    assert (1000).to_bytes(4, "little") in sector
    with pytest.raises(ValueError):
        guest.boot_sector(0)


def test_image_is_1mib(tmp_path: Path) -> None:
    img = guest.image(tmp_path / "g.img", WSS)
    data = img.read_bytes()
    assert len(data) == guest.IMAGE_SIZE
    assert data[:512] == guest.boot_sector(WSS)
    assert not any(data[512:])


def test_check_working_set_shapes() -> None:
    import numpy as np

    def snap(passes: list[int], magic: bool = True) -> bytes:
        buf = np.zeros((len(passes), guest.PAGE_SIZE // 4), dtype="<u4")
        buf[:, 0] = passes
        buf[:, 1] = np.arange(len(passes))
        buf[:, 2] = guest.GUEST_MAGIC if magic else 0
        return buf.tobytes()

    assert guest.check_working_set(snap([5, 5, 4, 4]), 4).consistent
    assert guest.check_working_set(snap([5, 5, 5, 5]), 4).consistent
    assert not guest.check_working_set(snap([4, 5, 4, 4]), 4).consistent
    assert not guest.check_working_set(snap([6, 5, 4, 4]), 4).consistent
    assert not guest.check_working_set(snap([1, 1], magic=False), 2).started


@pytest.mark.skipif(not available("7.2"), reason="QEMU 7.2 is installed by .ci/run")
def test_guest_boots_and_pass_counter_advances(tmp_path: Path) -> None:
    img = guest.image(tmp_path / "g.img", WSS)
    with QemuProcess(guest.drive_args(img), name="guest", memory_mib=64) as vm:
        vm.cmd("cont")
        deadline = time.monotonic() + 60  # SeaBIOS hands over after ~4-10 s
        while True:
            ws = guest.check_working_set(vm.pmemsave(guest.WSS_BASE, WSS * guest.PAGE_SIZE),
                                         WSS)
            if ws.started:
                break
            assert time.monotonic() < deadline, "guest never wrote its working set"
            time.sleep(0.1)
        first = ws.max_pass
        time.sleep(0.5)
        vm.cmd("stop")
        assert vm.status() == "paused"
        ws = guest.check_working_set(vm.pmemsave(guest.WSS_BASE, WSS * guest.PAGE_SIZE), WSS)
        assert ws.consistent, ws.problem
        assert ws.max_pass > first, (first, ws)
        # paused: the counter stays put
        time.sleep(0.2)
        again = guest.check_working_set(vm.pmemsave(guest.WSS_BASE, WSS * guest.PAGE_SIZE),
                                        WSS)
        assert again == ws
        # running again: it advances again
        vm.cmd("cont")
        time.sleep(0.3)
        vm.cmd("stop")
        later = guest.check_working_set(vm.pmemsave(guest.WSS_BASE, WSS * guest.PAGE_SIZE),
                                        WSS)
        assert later.consistent and later.max_pass > ws.max_pass
