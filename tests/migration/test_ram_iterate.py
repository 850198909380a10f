"""RamSaveHandler walks todo a stretch at a time: a pass over a block larger than one
stretch, cut by the iteration deadline anywhere, sends every todo page exactly once."""

from __future__ import annotations

import numpy as np
import pytest

from multifd.machine import Machine, RamBlock
from multifd.migration import ram as ram_mod
from multifd.migration.mainstream import MainStreamWriter
from multifd.migration.profile import QEMU_7_2
from multifd.migration.ram import _TODO_STRETCH, _WINDOW, RamSaveHandler
from multifd.multifd.ram import RamPayload
from multifd.multifd.slots import SendSlot

PS = 4096
PAGES = 2 * _TODO_STRETCH + 3 * _WINDOW + 77  # three stretches, the last one partial


class RecordingSender:
    """Takes every packet at once and records its pages, in order."""

    def __init__(self) -> None:
        self.pages: list[int] = []
        self._spare = SendSlot(PS)

    def try_send(self, slot: SendSlot) -> SendSlot:
        return self.send(slot)

    def send(self, slot: SendSlot, timeout: float | None = None) -> SendSlot:
        p = slot.payload(RamPayload)
        self.pages += (p.offsets[: p.num] // PS).astype(int).tolist()
        slot.clear()
        self._spare, slot = slot, self._spare
        return slot

    def sync(self, timeout: float | None = None) -> None:
        pass


def _data_pages(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.sort(rng.choice(PAGES, size=n, replace=False))


@pytest.mark.parametrize("deadline_s", [0.0, ram_mod.MAX_WAIT_S], ids=["every-window", "50ms"])
def test_pass_over_several_stretches_sends_each_page_once(
    monkeypatch: pytest.MonkeyPatch, deadline_s: float
) -> None:
    monkeypatch.setattr(ram_mod, "MAX_WAIT_S", deadline_s)  # 0: stop after each window
    rng = np.random.default_rng(7)
    block = RamBlock("pc.ram", PAGES * PS)
    first = _data_pages(rng, 3000)
    for p in first.tolist():
        block.write(p * PS, b"\x01" * PS)
    sender = RecordingSender()
    h = RamSaveHandler(Machine([block]), MainStreamWriter(lambda bufs: None), QEMU_7_2,
                       sender)  # type: ignore[arg-type]
    h.save_setup()
    calls = 1
    while not h.walk():
        calls += 1
    # Fresh destination: only the data pages travel, once each, in address order.
    assert sender.pages == first.tolist()
    assert h.todo_count == 0
    if deadline_s == 0.0:
        assert calls > PAGES // _WINDOW  # the deadline cut the walk inside stretches

    # Second pass: a sparse dirty set spread over every stretch (partial windows).
    again = _data_pages(rng, 500)
    for p in again.tolist():
        block.write(p * PS, b"\x02" * PS)
    sender.pages.clear()
    h.bitmap_sync()
    while not h.walk():
        pass
    assert sorted(sender.pages) == again.tolist()
    assert len(sender.pages) == len(set(sender.pages))
    block.close()
