"""Vectorised encoders for runs of RAM records (QEMU migration/ram.c, save_page_header).

A 1 GiB zero area is 262,144 ZERO records; encoding them one Python call at a time would
cost more than the rest of a migration. These build whole runs with numpy:

    ZERO record:  be64 (offset | 0x02 [| 0x20 CONTINUE]) [counted block name] u8 fill
    PAGE record:  be64 (offset | 0x08 [| 0x20 CONTINUE]) [counted block name] page bytes

Only the first record of a run may carry the block name (when the block differs from the
stream's last sent block); every later one has CONTINUE set.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from multifd.wire.constants import RamFlag

_ZERO_REC = np.dtype([("word", ">u8"), ("fill", "u1")])
_RUN_TEMPLATE_LEN = 8192


@lru_cache(maxsize=8)
def _run_template(step: int) -> bytes:
    return (np.arange(_RUN_TEMPLATE_LEN, dtype=np.uint64) * np.uint64(step)).tobytes()


def is_run(values: np.ndarray, step: int) -> bool:
    """True if the 64-bit integers `values` are values[0], values[0]+step, ... in order.

    The common packet (consecutive pages) is then validated by its first and last value
    alone. One subtraction and a bytes compare: numpy reductions cost ~3 us each on a
    128-entry array, which is most of a packet's Python budget.
    """
    n = values.shape[0]
    if n == 0:
        return False
    if n > _RUN_TEMPLATE_LEN:
        return bool(np.all(values - values[0] == np.arange(n, dtype=values.dtype) * step))
    return (values - values[0]).tobytes() == _run_template(step)[: n * 8]


def is_page_run(offsets: np.ndarray, page_size: int, limit: int | None) -> bool:
    """True if `offsets` are consecutive page-aligned offsets in order, the last one at
    most `limit` (None: no bound): such a batch is valid by its first and last entry."""
    return (
        offsets.shape[0] > 0
        and int(offsets[0]) % page_size == 0
        and (limit is None or int(offsets[-1]) <= limit)
        and is_run(offsets, page_size)
    )


@lru_cache(maxsize=64)
def _be64_run_keys(n: int, step: int) -> tuple[int, int]:
    """(K1, K2): n big-endian u64 slots a, a+step, ..., read as one integer, are a*K1+K2."""
    k1 = k2 = 0
    for i in range(n):
        k1 = (k1 << 64) | 1
        k2 = (k2 << 64) | (i * step)
    return k1, k2


def be64_run_start(buf: bytes | bytearray | memoryview, offset: int, n: int,
                   step: int) -> int | None:
    """The first of the `n` big-endian u64 at `buf[offset:]` if they are consecutive
    (first, first+step, ...), else None: a packet's offset array checked without numpy.

    Read as one integer, such an array equals first*K1 + K2 exactly when no slot
    overflows 64 bits, so one big-int compare replaces a per-entry check (~2 us for a
    128-page packet; numpy needs ~3 us per call and several calls)."""
    if n <= 0:
        return None
    raw = bytes(buf[offset : offset + 8 * n])  # from_bytes is 2x slower on a memoryview
    first = int.from_bytes(raw[:8], "big")
    last = first + (n - 1) * step
    if last >= 1 << 64 or int.from_bytes(raw[-8:], "big") != last:
        return None  # the cheap rejection (e.g. QEMU 10's zero pages, swapped to the end)
    k1, k2 = _be64_run_keys(n, step)
    return first if int.from_bytes(raw, "big") == first * k1 + k2 else None


def _name_prefix(block: str, offset: int, flag: int) -> bytes:
    name = block.encode()
    if not 0 < len(name) < 256:
        raise ValueError(f"RAM block name must be 1..255 bytes, got {len(name)}")
    return (offset | flag).to_bytes(8, "big") + bytes([len(name)]) + name


def encode_zero_run(block: str, offsets: np.ndarray, *, first_continues: bool) -> bytes:
    """ZERO records (fill 0) for `offsets`, all in `block`."""
    n = len(offsets)
    if n == 0:
        return b""
    recs = np.empty(n, dtype=_ZERO_REC)
    recs["word"] = offsets.astype(np.uint64) | np.uint64(RamFlag.ZERO | RamFlag.CONTINUE)
    recs["fill"] = 0
    if first_continues:
        return recs.tobytes()
    head = _name_prefix(block, int(offsets[0]), RamFlag.ZERO) + b"\x00"
    return head + recs[1:].tobytes()


def encode_page_run(
    block: str, offsets: np.ndarray, pages: np.ndarray, *, first_continues: bool
) -> bytes:
    """PAGE records for `offsets` with their contents `pages` (shape (n, page_size))."""
    n = len(offsets)
    if n == 0:
        return b""
    page_size = pages.shape[1]
    rec = np.dtype([("word", ">u8"), ("data", "u1", (page_size,))])
    recs = np.empty(n, dtype=rec)
    recs["word"] = offsets.astype(np.uint64) | np.uint64(RamFlag.PAGE | RamFlag.CONTINUE)
    recs["data"] = pages
    if first_continues:
        return recs.tobytes()
    head = _name_prefix(block, int(offsets[0]), RamFlag.PAGE)
    raw = recs.tobytes()
    return head + raw[8:]
