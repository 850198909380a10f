"""The main-stream loaders keep a "received" map (QEMU's receivedmap): ZERO records for
pages never written are skipped without reading the page, and pages written by an earlier
round are zeroed. No QEMU binary needed: the stream is built from a QEMU 7.2 capture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from multifd.machine.ramblock import RamBlock
from multifd.qemu.image import (
    page_records,
    read_image,
    section_close,
    section_open,
    section_start,
)
from multifd.wire.constants import SectionType
from multifd.wire.stream import FileHeader, encode_record
from tests.conftest import Q72


def test_zero_records_after_data_zero_it_and_skip_pages_never_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with read_image(Q72 / "nomultifd" / "conn0-src2dst.bin") as img:
        assert sum(int(np.count_nonzero(b.array)) for b in img.blocks.values())
        # Round 1: every block as it is (PAGE + ZERO records); round 2: every page ZERO.
        head = encode_record(FileHeader()) + img.configuration
        body = [section_start(img) + section_close(img), section_open(img, SectionType.PART)]
        for name, blk in img.blocks.items():
            body += page_records(blk, img.block_lengths[name])
        body += [section_close(img), section_open(img, SectionType.PART)]
        for name, blk in img.blocks.items():
            body += page_records(blk, img.block_lengths[name],
                                 zero=np.ones(blk.num_pages, dtype=bool))
        body += [section_close(img), section_open(img, SectionType.END),
                 section_close(img), img.tail]
        stream = tmp_path / "two-rounds.bin"
        stream.write_bytes(head + b"".join(body))

    def no_scan(self: RamBlock, idx: np.ndarray) -> np.ndarray:
        raise AssertionError("a ZERO record made the loader scan pages")

    monkeypatch.setattr(RamBlock, "zero_pages", no_scan)
    with read_image(stream) as again:
        for name, blk in again.blocks.items():
            assert not blk.array.any(), name
        assert again.zero_pages >= sum(b.num_pages for b in again.blocks.values())
