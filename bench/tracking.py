"""Kernel write tracking (machine/tracking.py): fault cost, sync cost, writer slowdown, and a
migration of a numpy array under a writer that never marks.

On an array of ``--size`` (2 GiB) synced every ``--interval`` (100 ms) as during a migration:

* ``fault_us_per_page``: the first write to a page after a sync (the kernel's write-protect
  fault), minus the same write again; by kernel mode;
* ``sync_ms_per_gib``: one sync after 0.1 % and after 100 % of the pages were written
  (scattered), per GiB of array; by kernel mode;
* ``writer_slowdown``: 1 - (tracked rate / untracked rate) for a writer storing random
  64 KiB chunks in a 256 MiB hot set as fast as it can, in the steady state (after a
  ``--warmup``), by mode (``manual`` marks each chunk, as a cooperative writer would); the
  modes run interleaved, each run against the untracked rate of the same round;
* ``migration``: the array migrates over TCP loopback (multifd, auto-converge) while that
  writer runs without marking, verified byte for byte at switchover.

Every figure is the median of ``--runs`` interleaved runs with min and max.

    python bench/tracking.py [--size 2G] [--hot 256M] [--runs 5] [--seconds 2] [--json]

Goals (issue 15): fault_us_per_page <= 2, sync_ms_per_gib <= 5 (0.1 %) and <= 15 (100 %),
writer_slowdown["uffd-wp"] <= 0.10.
"""

from __future__ import annotations

import argparse
import gc
import json
import threading
import time
from typing import Any

import numpy as np

from benchlib import spread
from multifd.commands.demo import parse_size
from multifd.machine.machine import Machine
from multifd.machine.ramblock import RamBlock
from multifd.machine.tracking import available_modes
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.source import MigrationSource

PS = 4096
GiB = 1 << 30
CHUNK = 64 << 10


def kernel_modes() -> list[str]:
    return [m for m, why in available_modes().items() if why is None]


def _block(mode: str, size: int) -> RamBlock:
    block = RamBlock(f"bench-{mode}", size, tracking=mode)
    block.array[::PS] = 1  # populated, like an array in use
    return block


def fault_and_sync(block: RamBlock, rng: np.random.Generator) -> dict[str, float]:
    """One round of the fault and sync figures on a kernel-tracked block."""
    n = block.num_pages
    gib = block.used_length / GiB
    words = block.words
    block.start_dirty_log()  # arms, forgets hot ranges
    block.sync_dirty_bitmap()
    few = rng.choice(n, max(1, n // 1000), replace=False)
    t0 = time.perf_counter()
    words[few, 0] += np.uint64(1)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    words[few, 0] += np.uint64(1)
    t_again = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = block.sync_dirty_bitmap()
    t_few = time.perf_counter() - t0
    assert got[few].all() and int(got.sum()) == few.size, "sync lost or invented pages"
    words[rng.permutation(n), 0] += np.uint64(1)  # every page, scattered order
    t0 = time.perf_counter()
    got = block.sync_dirty_bitmap()
    t_all = time.perf_counter() - t0
    assert got.all(), "sync lost pages"
    return {"fault_us": (t_first - t_again) / few.size * 1e6,
            "sync_few_ms": t_few * 1e3 / gib, "sync_all_ms": t_all * 1e3 / gib}


class Writer:
    """Random 64 KiB chunks in the hot set, as fast as it can; ``mark``: mark_dirty each;
    ``machine``: a workload thread (safe point after each chunk)."""

    def __init__(self, block: RamBlock, hot: int, *, mark: bool = False,
                 machine: Machine | None = None) -> None:
        self.block, self.hot, self.mark, self.machine = block, hot, mark, machine
        self.chunks = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        view = self.block.array
        data = np.frombuffer(np.random.default_rng(1).bytes(CHUNK), dtype=np.uint8)
        rng = np.random.default_rng(2)
        slots = self.hot // CHUNK
        mark, machine = self.mark, self.machine
        with machine.workload() if machine is not None else _nothing():
            while not self.stop.is_set():
                for off in (rng.integers(0, slots, 256) * CHUNK).tolist():
                    view[off : off + CHUNK] = data
                    if mark:
                        self.block.mark_dirty(off, CHUNK)
                    if machine is not None:
                        machine.safe_point(self.stop)
                self.chunks += 256

    def start(self) -> Writer:
        self.thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        if self.machine is not None:
            self.machine.kick()
        self.thread.join(30)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def writer_rate(block: RamBlock, args: argparse.Namespace, *, tracked: bool,
                mark: bool) -> float:
    """Chunks per second of a Writer over ``args.seconds`` in the steady state (after
    ``args.warmup`` seconds), syncing every interval."""
    if tracked:
        block.start_dirty_log()
    else:
        block.stop_dirty_log()
    w = Writer(block, args.hot, mark=mark).start()

    def sync_for(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while (now := time.perf_counter()) < end:
            time.sleep(min(args.interval, end - now))
            if tracked:
                block.sync_dirty_bitmap()

    sync_for(args.warmup)
    c0, t0 = w.chunks, time.perf_counter()
    sync_for(args.seconds)
    rate = (w.chunks - c0) / (time.perf_counter() - t0)
    w.finish()
    return rate


def migrate(args: argparse.Namespace) -> dict[str, Any]:
    """The array migrates while a non-marking writer runs; verified at switchover."""
    n = args.size // 8
    src = Machine()
    a = src.array("state", (n,), "uint64")
    a[:] = np.arange(n, dtype=np.uint64)
    dst = Machine()
    b = dst.array("state", (n,), "uint64")
    p = MigrationParameters()
    p.set({"multifd-channels": 2, "max-bandwidth": 0})
    c = MigrationCapabilities()
    c.set([{"capability": "multifd", "state": True},
           {"capability": "auto-converge", "state": True}])
    dest = MigrationDestination(dst, params=p, caps=c, accept_timeout=30)
    uri = dest.listen("tcp:127.0.0.1:0")
    src.start()
    w = Writer(src.block("state"), args.hot, machine=src).start()
    time.sleep(0.1)
    source = MigrationSource(src, params=p, caps=c)
    try:
        source.start(uri)
        st = source.wait(600)
        dest.wait(600)
        q = source.query()
        ok = str(dest.status.status) == "completed" and bool(np.array_equal(a, b))
        return {"status": str(st), "error": source.error or dest.error,
                "tracking": src.block("state").tracking, "verified": ok,
                "total_time_ms": q.get("total-time"), "downtime_ms": round(source.downtime_ms, 1),
                "dirty_sync_count": q.get("ram", {}).get("dirty-sync-count"),
                "cpu_throttle_max": q.get("cpu-throttle-percentage"),
                "writer_chunks": w.chunks}
    finally:
        w.finish()
        src.close()
        dst.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=2 * GiB, help="array size (2G)")
    ap.add_argument("--hot", type=parse_size, default=256 << 20, help="hot set (256M)")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between syncs")
    ap.add_argument("--seconds", type=float, default=2.0, help="writer time measured per run")
    ap.add_argument("--warmup", type=float, default=0.5, help="writer time before measuring")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-migration", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.hot > args.size or args.hot < CHUNK:
        ap.error("--hot must be between 64K and --size")
    kmodes = kernel_modes()
    rng = np.random.default_rng(0)
    blocks = {m: _block(m, args.size) for m in [*kmodes, "manual"]}
    rounds: dict[str, list[dict[str, float]]] = {m: [] for m in kmodes}
    slow: dict[str, list[float]] = {m: [] for m in blocks}
    try:
        for m in kmodes:  # warm-up: split huge pages, fault page tables in
            fault_and_sync(blocks[m], rng)
        for i in range(args.runs):
            order = kmodes if i % 2 == 0 else kmodes[::-1]
            for m in order:
                rounds[m].append(fault_and_sync(blocks[m], rng))
            base = writer_rate(blocks["manual"], args, tracked=False, mark=False)
            for m in (list(blocks) if i % 2 == 0 else list(blocks)[::-1]):
                rate = writer_rate(blocks[m], args, tracked=True, mark=m == "manual")
                slow[m].append(1 - rate / base)
    finally:
        for blk in blocks.values():
            blk.close()
        del blocks
        gc.collect()
    out: dict[str, Any] = {
        "size": args.size, "hot": args.hot, "interval_s": args.interval, "runs": args.runs,
        "modes": {m: why or "available" for m, why in available_modes().items()},
        "fault_us_per_page": {m: spread([r["fault_us"] for r in rounds[m]]) for m in kmodes},
        "sync_ms_per_gib": {m: {"0.1%": spread([r["sync_few_ms"] for r in rounds[m]]),
                                "100%": spread([r["sync_all_ms"] for r in rounds[m]])}
                            for m in kmodes},
        "writer_slowdown": {m: spread(v) for m, v in slow.items()},
    }
    if not args.no_migration:
        out["migration"] = migrate(args)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>18}: {v}")
    mig = out.get("migration")
    return 0 if mig is None or mig["verified"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
