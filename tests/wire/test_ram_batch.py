"""Vectorised RAM record runs: encoders agree with the one-record encoder, and batched
decoding of ZERO runs gives the same pages and re-encodes byte for byte."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from multifd.wire.buffer import NeedData, ReceiveBuffer
from multifd.wire.errors import BadOffset
from multifd.wire.ram import (
    RamPage,
    RamRecordReader,
    RamSettings,
    RamZero,
    RamZeroRun,
    encode_ram_record,
)
from multifd.wire.ram_batch import encode_page_run, encode_zero_run

PS = 4096


def _one_by_one_zero(block: str, offsets: list[int], first_cont: bool) -> bytes:
    out = b""
    for i, off in enumerate(offsets):
        out += encode_ram_record(RamZero(off, block, 0, first_cont if i == 0 else True))
    return out


@given(st.lists(st.integers(0, 1023), min_size=1, max_size=50), st.booleans())
def test_zero_run_matches_single_records(pages: list[int], first_cont: bool) -> None:
    offs = [p * PS for p in pages]
    got = encode_zero_run("pc.ram", np.array(offs, dtype=np.uint64), first_continues=first_cont)
    assert got == _one_by_one_zero("pc.ram", offs, first_cont)


def test_page_run_matches_single_records() -> None:
    rng = np.random.default_rng(1)
    pages = rng.integers(0, 256, size=(5, PS), dtype=np.uint8)
    offs = np.array([0, 4096, 8192 * 3, 40960, 81920], dtype=np.uint64)
    got = encode_page_run("blk", offs, pages, first_continues=False)
    want = b"".join(
        encode_ram_record(RamPage(int(o), "blk", pages[i].tobytes(), i > 0))
        for i, o in enumerate(offs)
    )
    assert got == want


def _decode_all(data: bytes, chunk: int, blocks: dict[str, int] | None = None) -> list[object]:
    reader = RamRecordReader(RamSettings(batch_zero_runs=True), blocks)
    buf = ReceiveBuffer()
    out: list[object] = []
    for i in range(0, len(data), chunk):
        buf.feed(data[i : i + chunk])
        while True:
            try:
                rec = reader.read(buf)
            except NeedData:
                buf.rollback()
                break
            buf.commit()
            if rec is not None:
                out.append(rec)
    assert buf.available == 0
    return out


@settings(max_examples=50)
@given(st.lists(st.integers(0, 4095), min_size=1, max_size=300),
       st.integers(1, 5000))
def test_batched_zero_decode_round_trips(pages: list[int], chunk: int) -> None:
    offs = np.array([p * PS for p in pages], dtype=np.uint64)
    data = encode_zero_run("pc.ram", offs, first_continues=False)
    recs = _decode_all(data, chunk)
    assert all(isinstance(r, RamZeroRun) for r in recs)
    got = np.concatenate([r.offsets for r in recs])  # type: ignore[attr-defined]
    assert np.array_equal(got, offs)
    assert b"".join(encode_ram_record(r) for r in recs) == data  # type: ignore[arg-type]


def test_batched_zero_run_stops_at_other_records() -> None:
    data = encode_zero_run("a", np.array([0, 4096, 8192], dtype=np.uint64),
                           first_continues=False)
    data += encode_ram_record(RamZero(12288, "a", 7, True))  # non-zero fill: not batched
    data += encode_zero_run("a", np.array([16384], dtype=np.uint64), first_continues=True)
    recs = _decode_all(data, len(data))
    assert [type(r).__name__ for r in recs] == ["RamZeroRun", "RamZero", "RamZeroRun"]
    assert recs[1] == RamZero(12288, "a", 7, True)


def test_batched_zero_run_checks_offsets_against_the_block() -> None:
    data = encode_zero_run("a", np.array([0, 4096, 1 << 20], dtype=np.uint64),
                           first_continues=False)
    try:
        _decode_all(data, len(data), {"a": 8192})
    except BadOffset as e:
        assert "used_length" in str(e)
    else:
        raise AssertionError("an offset past the block was accepted")


@given(st.integers(0, (1 << 64) - 1), st.integers(1, 300), st.sampled_from([1, 4096, 1 << 16]),
       st.integers(-1, 299), st.integers(1, 1 << 63))
def test_be64_run_start_is_exactly_the_consecutive_check(first: int, n: int, step: int,
                                                         poke: int, delta: int) -> None:
    """be64_run_start (one big-int compare) says the same as an entry-by-entry check,
    also when an entry is off by any amount or the run would pass 2**64."""
    from multifd.wire.ram_batch import be64_run_start

    values = [(first + i * step) % (1 << 64) for i in range(n)]
    if 0 <= poke < n:
        values[poke] = (values[poke] + delta) % (1 << 64)
    raw = b"\xee" * 3 + b"".join(v.to_bytes(8, "big") for v in values)
    consecutive = all(values[i] == values[0] + i * step for i in range(n))
    assert be64_run_start(memoryview(raw), 3, n, step) == (values[0] if consecutive else None)
