"""RamSaveHandler scans zero pages ahead while every channel slot is full: a page written
after its scan must still reach the destination (in this pass or the next one)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from multifd.machine import Machine, RamBlock
from multifd.migration.mainstream import MainStreamWriter
from multifd.migration.profile import QEMU_7_2, QEMU_10, Profile
from multifd.migration.ram import _WINDOW, RamSaveHandler
from multifd.multifd.ram import RamPayload
from multifd.multifd.slots import SendSlot

PS = 4096
LATE = _WINDOW + 100  # a page of the second window, inside the first scan-ahead chunk


class FullSender:
    """A Sender whose slots are full on the first try of each packet (so the producer
    scans ahead), recording the pages of every packet. `on_retry` runs once, on the
    first retry, i.e. right after the first scan-ahead."""

    def __init__(self, on_retry: Callable[[], None]) -> None:
        self.pages: list[int] = []
        self.on_retry: Callable[[], None] | None = on_retry
        self._spare = SendSlot(PS)
        self._busy = True

    def _take(self, slot: SendSlot) -> SendSlot:
        p = slot.payload(RamPayload)
        self.pages += (p.offsets[: p.num] // PS).astype(int).tolist()
        slot.clear()
        self._spare, slot = slot, self._spare
        self._busy = True
        return slot

    def try_send(self, slot: SendSlot) -> SendSlot | None:
        if self._busy:
            self._busy = False
            return None
        if self.on_retry is not None:
            self.on_retry()
            self.on_retry = None
        return self._take(slot)

    def send(self, slot: SendSlot, timeout: float | None = None) -> SendSlot:
        return self._take(slot)

    def sync(self, timeout: float | None = None) -> None:
        pass


def _handler(profile: Profile, on_retry: Callable[[RamBlock], None]
             ) -> tuple[RamSaveHandler, RamBlock, FullSender]:
    block = RamBlock("pc.ram", 2 * _WINDOW * PS)
    block.write(0, b"\x01" * PS)  # one data page in the first window: one packet there
    sender = FullSender(lambda: on_retry(block))
    main = MainStreamWriter(lambda bufs: None)
    h = RamSaveHandler(Machine([block]), main, profile, sender)  # type: ignore[arg-type]
    h.save_setup()
    return h, block, sender


def _run_pass(h: RamSaveHandler) -> None:
    while not h.walk(final=True):
        pass


@pytest.mark.parametrize("profile", [QEMU_7_2, QEMU_10], ids=lambda p: p.name)
def test_page_written_after_its_scan_goes_in_the_next_pass(profile: Profile) -> None:
    h, _, sender = _handler(profile, lambda b: b.write(LATE * PS, b"\x02" * PS))
    _run_pass(h)
    # Scanned ahead as zero (a scan at send time would have seen the data), never sent
    # before: skipped in this pass ...
    assert LATE not in sender.pages
    h.bitmap_sync()
    _run_pass(h)
    assert LATE in sender.pages  # ... and its dirty bit sends it in the next one


@pytest.mark.parametrize("profile", [QEMU_7_2, QEMU_10], ids=lambda p: p.name)
def test_bitmap_sync_drops_the_scan(profile: Profile) -> None:
    """A sync consumes the dirty bit of a page written after its scan: the old scan must
    not be used, or the write would be lost."""
    def write_then_sync(b: RamBlock) -> None:
        b.write(LATE * PS, b"\x03" * PS)
        h.bitmap_sync()

    h, block, sender = _handler(profile, write_then_sync)
    _run_pass(h)
    assert LATE in sender.pages
    assert block.dirty_count() == 0
    assert np.count_nonzero(block.pages[LATE]) == PS
