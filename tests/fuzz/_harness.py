"""Fuzzing support: seeds from the real QEMU captures, mutations, and the per-input bounds.

Seeds are the recorded 7.2 and 10.0 streams (vendored in tests/data). A 7.2 main stream
is 15,700 RAM records; the "thinned" seed keeps every structural record and only a few
ZERO and PAGE records per section, so one input decodes in about a millisecond and still
reaches the device sections, EOF and the VMDESCRIPTION; the RAM seeds are those streams'
RAM records alone. Mutations: bit flips, byte sets, truncation, chunk deletion and
duplication, and "lying" integers (0, 1, 2^31, 2^32-1, 2^63, ...) written at the start of
real records and packets (found by a clean decode), where lengths and counts live. Every
input runs under `bounded()`: a wall-clock alarm (a hang becomes a failure) and a
tracemalloc peak limit (a lying length must not allocate).
"""

from __future__ import annotations

import gzip
import os
import signal
import struct
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from multifd.wire import NEED_DATA
from multifd.wire.buffer import ReceiveBuffer
from multifd.wire.packet import ChannelDecoder, EndOfChannel
from multifd.wire.ram import (
    RamCompressedPage,
    RamEos,
    RamMemSize,
    RamMultifdFlush,
    RamPage,
    RamRecordReader,
    RamSettings,
    RamXbzrle,
    RamZero,
    RamZeroRun,
)
from multifd.wire.stream import MainStreamDecoder, SectionFooter, SectionHeader
from tests.conftest import DATA, capture_bytes

# Inputs tried / rejected per target, reported at the end of the session (conftest.py).
FIGURES: Counter[str] = Counter()

TIME_LIMIT_S = float(os.environ.get("MULTIFD_FUZZ_TIME_LIMIT", "5"))
SCALE = float(os.environ.get("MULTIFD_FUZZ_SCALE", "1"))

INTERESTING = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0x1001, 0x7FFF, 0xFFFF,
               0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, 1 << 63,
               (1 << 64) - 1)


def fuzz_settings(examples: int) -> settings:
    """Deterministic (CI) unless MULTIFD_FUZZ_RANDOM=1; MULTIFD_FUZZ_SCALE multiplies."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=os.environ.get("MULTIFD_FUZZ_RANDOM", "") in ("", "0"),
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.large_base_example],
        print_blob=True,
    )


class Hang(Exception):
    """An input took longer than TIME_LIMIT_S."""


@contextmanager
def bounded(limit_bytes: int, seconds: float = TIME_LIMIT_S) -> Iterator[None]:
    """Fail when the block runs longer than ``seconds`` or allocates more than
    ``limit_bytes`` at its peak (Python and numpy allocations, via tracemalloc)."""

    def alarm(signum: int, frame: object) -> None:
        raise Hang(f"input took more than {seconds:g} s")

    old = signal.signal(signal.SIGALRM, alarm)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        peak = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()
    assert peak <= limit_bytes, f"peak allocation {peak} B > limit {limit_bytes} B"


# -- seeds --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    marks: tuple[int, ...] = field(default=())  # offsets where records / packets start


def _main_marks(data: bytes) -> list[tuple[int, int, object]]:
    """(start, end, record) of every record of a clean main stream."""
    dec = MainStreamDecoder()
    dec.receive_data(data)
    dec.receive_eof()
    out = []
    start = 0
    while True:
        rec = dec.next_record()
        if rec is NEED_DATA:
            break
        out.append((start, dec.offset, rec))
        start = dec.offset
        if dec.finished:
            break
    return out


def _thin(data: bytes, keep: int = 6) -> bytes:
    """Keep ``keep`` ZERO and ``keep`` PAGE records per section, drop the other page
    records (every non-page record is kept), so the seed has both kinds yet stays small."""
    parts: list[bytes] = []
    seen: Counter[type] = Counter()
    for start, end, rec in _main_marks(data):
        if isinstance(rec, SectionHeader | SectionFooter):
            seen.clear()
        if isinstance(rec, RamZero | RamPage):
            seen[type(rec)] += 1
            if seen[type(rec)] > keep:
                continue
        parts.append(data[start:end])
    thinned = b"".join(parts)
    tail_at = _main_marks(data)[-1][1]
    return thinned + data[tail_at:]


@cache
def main_seeds() -> tuple[Seed, ...]:
    seeds = []
    for name, rel in (("7.2-multifd", "qemu-captures/multifd2-none/conn0-src2dst.bin"),
                      ("7.2-nomultifd", "qemu-captures/nomultifd/conn0-src2dst.bin"),
                      ("10.0-multifd", "qemu10-captures/multifd2-zstd/main.bin"),
                      ("10.0-nomultifd", "qemu10-captures/nomultifd/main.bin")):
        raw = capture_bytes(rel)
        data = raw if len(raw) < 200_000 else _thin(raw)
        try:
            marks = tuple(s for s, _, _ in _main_marks(data))
        except Exception:  # thinning broke it: fall back to a prefix of the real stream
            data = raw[:32768]
            marks = ()
        seeds.append(Seed(name, data, marks))
    return tuple(seeds)


RAM_RECORDS = (RamMemSize, RamZero, RamZeroRun, RamPage, RamXbzrle, RamCompressedPage, RamEos,
               RamMultifdFlush)


def _ram_marks(data: bytes) -> list[tuple[int, int, object]]:
    """(start, end, record) of every RAM record of a clean RAM-record stream."""
    reader = RamRecordReader(RamSettings())
    buf = ReceiveBuffer()
    buf.feed(data)
    buf.close()
    out = []
    start = 0
    while buf.available:
        rec = reader.read(buf)
        buf.commit()
        if rec is not None:
            out.append((start, buf.offset, rec))
            start = buf.offset
    return out


@cache
def ram_seeds() -> tuple[Seed, ...]:
    """The RAM records of each main seed's ram sections, back to back (section headers and
    footers left out): what RamRecordReader reads, from the block list to the last EOS."""
    seeds = []
    for seed in main_seeds():
        parts = [seed.data[s:e] for s, e, rec in _main_marks(seed.data)
                 if isinstance(rec, RAM_RECORDS)]
        data = b"".join(parts)
        seeds.append(Seed(seed.name, data, tuple(s for s, _, _ in _ram_marks(data))))
    return tuple(seeds)


def _channel_marks(data: bytes) -> list[int]:
    dec = ChannelDecoder()
    dec.receive_data(data)
    dec.receive_eof()
    marks = [0]
    while True:
        ev = dec.next_event()
        if ev is NEED_DATA or isinstance(ev, EndOfChannel):
            break
        marks.append(dec.offset)
    return marks


@cache
def channel_seeds(max_len: int = 600_000) -> tuple[Seed, ...]:
    seeds = []
    for name, rel in (("7.2-none", "qemu-captures/multifd2-none/conn1-src2dst.bin"),
                      ("7.2-zlib", "qemu-captures/multifd2-zlib/conn1-src2dst.bin"),
                      ("7.2-zstd", "qemu-captures/multifd2-zstd/conn2-src2dst.bin"),
                      ("10.0-none", "qemu10-captures/multifd2-none/chan-0.bin"),
                      ("10.0-zlib", "qemu10-captures/multifd2-zlib/chan-1.bin"),
                      ("10.0-zstd", "qemu10-captures/multifd2-zstd/chan-0.bin")):
        raw = capture_bytes(rel)
        marks = [m for m in _channel_marks(raw) if m <= max_len]
        data = raw[: marks[-1]] if len(raw) > max_len else raw
        seeds.append(Seed(name, data, tuple(marks)))
    return tuple(seeds)


@cache
def mapped_ram_seed() -> Seed:
    """The first 96 KiB of QEMU 10.0's mapped-ram file: header, block list, bitmaps start."""
    with gzip.open(DATA / "qemu10-captures/mapped-ram/main.bin.gz", "rb") as f:
        return Seed("10.0-mapped-ram", f.read(96 * 1024))


# -- mutations ----------------------------------------------------------------------------
def _put_int(buf: bytearray, pos: int, width: int, value: int) -> None:
    value &= (1 << (8 * width)) - 1
    fmt = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}[width]
    end = min(len(buf), pos + width)
    buf[pos:end] = struct.pack(fmt, value)[: end - pos]


@st.composite
def mutated(draw: st.DrawFn, seeds: tuple[Seed, ...]) -> tuple[str, bytes]:
    """(seed name, mutated bytes): 1-4 mutations of a seed."""
    seed = draw(st.sampled_from(seeds))
    buf = bytearray(seed.data)
    for _ in range(draw(st.integers(1, 4))):
        if not buf:
            break
        kind = draw(st.sampled_from(("field", "field", "field", "flip", "byte", "truncate",
                                     "delete", "dup")))
        n = len(buf)
        if kind == "field":
            base = draw(st.sampled_from(seed.marks)) if seed.marks else draw(
                st.integers(0, n - 1))
            pos = min(n - 1, base + draw(st.integers(0, 48)))
            _put_int(buf, pos, draw(st.sampled_from((1, 2, 4, 8))),
                     draw(st.sampled_from(INTERESTING)))
        elif kind == "flip":
            pos = draw(st.integers(0, n - 1))
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            buf[draw(st.integers(0, n - 1))] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del buf[draw(st.integers(0, n - 1)):]
        elif kind == "delete":
            pos = draw(st.integers(0, n - 1))
            del buf[pos : pos + draw(st.integers(1, 64))]
        else:
            pos = draw(st.integers(0, n - 1))
            chunk = buf[pos : pos + draw(st.integers(1, 512))]
            buf[pos:pos] = chunk
    return seed.name, bytes(buf)


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def run_target(name: str, fn: Callable[[], object], allowed: tuple[type[BaseException], ...],
               limit_bytes: int, seconds: float = TIME_LIMIT_S) -> BaseException | None:
    """Run one input; only ``allowed`` exceptions may escape (returned, counted)."""
    FIGURES[f"{name}: inputs"] += 1
    t0 = time.monotonic()
    err: BaseException | None = None
    with bounded(limit_bytes, seconds):
        try:
            fn()
        except allowed as exc:
            err = exc
    FIGURES[f"{name}: rejected"] += err is not None
    FIGURES[f"{name}: ms"] += int((time.monotonic() - t0) * 1000)
    return err
