"""Fuzzing support: seeds from the real QEMU captures, mutations, and the per-input bounds.

Seeds are the recorded 7.2 and 10.0 streams (../shared). A 7.2 main stream is 15,700 RAM
records; the "thinned" seed keeps every structural record and only a few page records per
section, so one input decodes in about a millisecond and still reaches the device
sections, EOF and the VMDESCRIPTION. Mutations: bit flips, byte sets, truncation, chunk
deletion and duplication, and "lying" integers (0, 1, 2^31, 2^32-1, 2^63, ...) written at
the start of real records and packets (found by a clean decode), where lengths and counts
live. Every input runs under `bounded()`: a wall-clock alarm (a hang becomes a failure)
and a tracemalloc peak limit (a lying length must not allocate).
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
from multifd.wire.packet import ChannelDecoder, EndOfChannel
from multifd.wire.ram import RamPage, RamZero
from multifd.wire.stream import MainStreamDecoder, SectionFooter, SectionHeader
from tests.conftest import Q10, Q72

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
    """Drop all but ``keep`` page records per section (every other record is kept)."""
    parts: list[bytes] = []
    in_section = 0
    for start, end, rec in _main_marks(data):
        if isinstance(rec, SectionHeader):
            in_section = 0
        if isinstance(rec, RamZero | RamPage):
            in_section += 1
            if in_section > keep:
                continue
        if isinstance(rec, SectionFooter):
            in_section = 0
        parts.append(data[start:end])
    thinned = b"".join(parts)
    tail_at = _main_marks(data)[-1][1]
    return thinned + data[tail_at:]


@cache
def main_seeds() -> tuple[Seed, ...]:
    seeds = []
    for name, path in (("7.2-multifd", Q72 / "multifd2-none/conn0-src2dst.bin"),
                       ("7.2-nomultifd", Q72 / "nomultifd/conn0-src2dst.bin"),
                       ("10.0-multifd", Q10 / "multifd2-zstd/main.bin"),
                       ("10.0-nomultifd", Q10 / "nomultifd/main.bin")):
        raw = path.read_bytes()
        data = raw if len(raw) < 200_000 else _thin(raw)
        try:
            marks = tuple(s for s, _, _ in _main_marks(data))
        except Exception:  # thinning broke it: fall back to a prefix of the real stream
            data = raw[:32768]
            marks = ()
        seeds.append(Seed(name, data, marks))
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
    for name, path in (("7.2-none", Q72 / "multifd2-none/conn1-src2dst.bin"),
                       ("7.2-zlib", Q72 / "multifd2-zlib/conn1-src2dst.bin"),
                       ("7.2-zstd", Q72 / "multifd2-zstd/conn2-src2dst.bin"),
                       ("10.0-none", Q10 / "multifd2-none/chan-0.bin"),
                       ("10.0-zlib", Q10 / "multifd2-zlib/chan-1.bin"),
                       ("10.0-zstd", Q10 / "multifd2-zstd/chan-0.bin")):
        raw = path.read_bytes()
        marks = [m for m in _channel_marks(raw) if m <= max_len]
        data = raw[: marks[-1]] if len(raw) > max_len else raw
        seeds.append(Seed(name, data, tuple(marks)))
    return tuple(seeds)


@cache
def mapped_ram_seed() -> Seed:
    """The first 96 KiB of QEMU 10.0's mapped-ram file: header, block list, bitmaps start."""
    with gzip.open(Q10 / "mapped-ram/main.bin.gz", "rb") as f:
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
