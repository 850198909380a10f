"""Benchmark of the multifd core alone: Sender -> Receiver over TCP loopback, one process.

A 512 MiB block (first half random, second half zero), 2 channels, no compression, one
producer thread queueing 128-page batches, one sync at the end. Prints the page data rate
(block size / time from first send to the end of the destination's sync_main). The full
QEMU comparison lives in bench/engine.py.

    python bench/engine_core.py [--size-mib 512] [--channels 2] [--compression none]
                                [--zero channel|main] [--repeat 3] [--json]

--zero channel: qemu-10 profile, zero pages detected in the channel threads and sent as
offsets (HEAD layout). --zero main: qemu-7.2 profile, the producer skips zero pages (they
would be ZERO records on the main stream), 7.2 layout.
"""

from __future__ import annotations

import argparse
import json
import mmap
import socket
import statistics
import threading
import time

import numpy as np

from multifd.machine.ramblock import RamBlock
from multifd.multifd import RamPayload, Receiver, Sender
from multifd.wire.constants import PacketLayout, page_count

UUID = bytes(range(16))


def _tcp_pairs(n: int) -> list[tuple[socket.socket, socket.socket]]:
    lst = socket.create_server(("127.0.0.1", 0))
    addr = lst.getsockname()
    pairs = []
    for _ in range(n):
        c = socket.create_connection(addr)
        s, _ = lst.accept()
        for sk in (c, s):
            sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pairs.append((c, s))
    lst.close()
    return pairs


def run_once(src: RamBlock, *, channels: int, compression: str, zero: str,
             thp: bool = False) -> tuple[float, bool]:
    dst = RamBlock(src.name, src.used_length)
    if thp:  # experiment: transparent huge pages cut the destination's page-fault cost
        dst._mm.madvise(mmap.MADV_HUGEPAGE)  # type: ignore[union-attr]
    layout = PacketLayout.HEAD if zero == "channel" else PacketLayout.V7_2
    pairs = _tcp_pairs(channels)
    sender = Sender([c for c, _ in pairs], uuid=UUID, layout=layout, compression=compression,
                    zero_page_detection=zero == "channel")
    receiver = Receiver(channels=channels, uuid=UUID, layout=layout, compression=compression,
                        blocks={dst.name: dst}, fresh_ram=True)
    sender.start()
    for _, s in pairs:
        receiver.add_channel(s, timeout=10)
    receiver.wait_all_channels(10)
    if zero == "main":  # the migration thread's zero scan (7.2): only normal pages queued
        pages = np.flatnonzero(np.bitwise_or.reduce(src.words, axis=1))
    else:
        pages = np.arange(src.num_pages)
    offsets = pages.astype(np.uint64) * np.uint64(src.page_size)
    batch = page_count(src.page_size)
    done = threading.Event()

    def destination() -> None:
        receiver.sync_main(timeout=60)
        done.set()

    t_dst = threading.Thread(target=destination)
    t_dst.start()
    t0 = time.perf_counter()
    slot = sender.new_slot()
    for i in range(0, offsets.shape[0], batch):
        slot.payload(RamPayload).fill(src, offsets[i : i + batch])
        slot = sender.send(slot)
    sender.sync()
    t_dst.join()
    dt = time.perf_counter() - t0
    sender.close()
    receiver.close()
    ok = done.is_set() and bool(np.array_equal(src.words, dst.words))
    dst.close()
    return dt, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--compression", default="none")
    ap.add_argument("--zero", choices=("channel", "main"), default="channel")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--thp", action="store_true",
                    help="madvise(MADV_HUGEPAGE) the destination block (experiment)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size = args.size_mib << 20
    src = RamBlock("pc.ram", size)
    half = src.num_pages // 2
    rng = np.random.default_rng(42)
    src.words[:half] = rng.integers(0, 2**63, size=src.words[:half].shape, dtype=np.uint64)
    times = []
    ok = True
    for _ in range(args.repeat):
        dt, good = run_once(src, channels=args.channels, compression=args.compression,
                            zero=args.zero, thp=args.thp)
        times.append(dt)
        ok &= good
    best, med = min(times), statistics.median(times)
    gib = size / 2**30
    result = {
        "size_mib": args.size_mib, "channels": args.channels, "compression": args.compression,
        "zero": args.zero, "thp": args.thp, "times_ms": [round(t * 1000, 1) for t in times],
        "median_ms": round(med * 1000, 1), "gib_s_median": round(gib / med, 2),
        "gib_s_best": round(gib / best, 2), "verified": ok,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.size_mib} MiB ({args.zero} zero detection, {args.compression}, "
              f"{args.channels} channels): median {result['median_ms']} ms = "
              f"{result['gib_s_median']} GiB/s of page data (best {result['gib_s_best']}), "
              f"verified: {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
