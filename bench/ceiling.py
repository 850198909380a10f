"""The interpreter's ceiling: CPU time a multifd channel thread holds the GIL per 512 KiB
RAM packet (128 x 4 KiB pages), on each path, with sockets that cost nothing.

Every Python thread of a process shares one GIL, so however many cores a host has, the
channels together move at most 0.5 MiB per GIL-held time of one packet. This measures that
time on the real code paths and projects the ceiling (GiB/s) for hosts bigger than this one.

Paths (the real Sender / Receiver, their channel threads, payload-kind ops and codecs):

* send_none, send_zstd: `Sender._run` preparing and gather-sending RAM packets of 128
  consecutive random pages (qemu-10 profile: HEAD layout, in-channel zero-page detection),
  compression none / zstd level 1. The main thread is the producer (fill + send swap).
* recv_none, recv_zstd: `Receiver._run` reading such packets into a RAM block
  (HEAD layout, fresh_ram).
* qemu_to_ours: the same receive with the QEMU 7.2 packet layout (V7_2, compression
  none), as a 7.2 source sends them (zero pages go on the main stream, so a packet holds
  128 normal pages).

Method: fake sockets, no kernel. The send side's `sendmsg` counts bytes and returns at
once. The receive side's socket serves, from memory, a stream encoded once beforehand by
the real Sender (init packet, warm-up packets, SYNC, the measured packets, SYNC, EOF);
its `recv_into` has to copy the bytes (the kernel's copy on a real socket, done there
with the GIL released), so copies of 64 KiB or more are timed and subtracted. The figure
is the CPU clock of the channel thread itself (`pthread_getcpuclockid`), read while the
thread waits at a SYNC before and after the measured packets, divided by the packets:
`cpu_us_per_packet`, which includes the SYNC packet, the barrier and the thread wake-ups
the real loop pays. The RAM block is 16 packets long and the packets cycle over it, so
after the warm-up no page fault is counted.

zstd: the codec calls release the GIL (`backports.zstd`'s compress; the channel's
decompressor, which calls libzstd into the RAM view through ctypes when it can, see
multifd/compress/zstd.py). The time inside the channel's compress / decompress_packet is
measured separately (the same packets through a fresh codec in a plain loop), and a probe
(a counting loop in the main thread while a second thread runs the call back to back)
gives the share of that time the GIL is free. `gil_us_per_packet` = cpu - c_call x
gil_free_share; for the other paths it equals cpu. `projected_max_gib_s` = 0.5 MiB /
gil_us_per_packet.

Each path runs `--runs` times, paths interleaved; every figure is the median of the runs.

    python bench/ceiling.py [--packets 256] [--runs 5] [--json | --markdown]
                            [--profile PATH] [--readme bench/README.md]

`--markdown` prints the table and rewrites its section of `--readme` (bench/README.md).

`--profile PATH` instead runs PATH once under cProfile in its channel thread and prints
the top functions by own time (cProfile's overhead inflates them; read the shares).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import pathlib
import pstats
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from benchlib import update_section
from multifd.compress import get_method
from multifd.machine.ramblock import RamBlock
from multifd.multifd import RamPayload, Receiver, Sender
from multifd.wire.constants import PacketLayout, page_count

UUID = bytes(range(16))
PAGE = 4096
PAGES = page_count(PAGE)  # 128 pages per packet
PACKET_BYTES = PAGES * PAGE  # 512 KiB
BLOCK_PACKETS = 16  # the RAM block: packets cycle over it; the warm-up touches all of it
BULK = 64 * 1024  # fake-socket copies at least this large are timed and subtracted
LINE_RATE_100GBE_GIB_S = 11.6
PATHS = ("send_none", "send_zstd", "recv_none", "recv_zstd", "qemu_to_ours")
METHOD = ("fake sockets (no kernel): sendmsg counts bytes and returns; the receive "
          "socket replays a stream pre-encoded by the real Sender and its payload "
          "copies (>= 64 KiB) are timed and subtracted; CPU clock of the channel "
          "thread between two SYNC barriers / packets; zstd GIL-free time = codec "
          "call time (measured separately) x GIL-free share (probe)")


@dataclass(frozen=True)
class Path:
    name: str
    side: str  # "send" or "recv"
    layout: PacketLayout
    compression: str


PATH_DEFS = {
    "send_none": Path("send_none", "send", PacketLayout.HEAD, "none"),
    "send_zstd": Path("send_zstd", "send", PacketLayout.HEAD, "zstd"),
    "recv_none": Path("recv_none", "recv", PacketLayout.HEAD, "none"),
    "recv_zstd": Path("recv_zstd", "recv", PacketLayout.HEAD, "zstd"),
    "qemu_to_ours": Path("qemu_to_ours", "recv", PacketLayout.V7_2, "none"),
}


# -- fake sockets -----------------------------------------------------------------------


class NullSocket:
    """Send side: `sendmsg` takes every byte at once and only counts them (optionally
    keeps a copy, to record a stream for the receive side)."""

    def __init__(self, record: bool = False) -> None:
        self.sent = 0
        self.chunks: list[bytes] | None = [] if record else None

    def sendmsg(self, buffers: Iterable[Any], *_: Any) -> int:
        n = 0
        for b in buffers:
            n += len(b)
            if self.chunks is not None:
                self.chunks.append(bytes(b))
        self.sent += n
        return n

    def setsockopt(self, *_: Any) -> None:
        pass

    def shutdown(self, _how: int) -> None:
        pass

    def close(self) -> None:
        pass


class ReplaySocket:
    """Receive side: serves `data` from memory. Copies of BULK bytes or more (page
    payloads: on a real socket, the kernel's copy, GIL released) are timed in copy_ns."""

    def __init__(self, data: bytes) -> None:
        self._src = memoryview(data)
        self._pos = 0
        self.copy_ns = 0

    def _fill(self, view: memoryview, n: int) -> int:
        k = min(n, len(self._src) - self._pos)
        if k <= 0:
            return 0
        p = self._pos
        if k >= BULK:
            t = time.thread_time_ns()
            view[:k] = self._src[p : p + k]
            self.copy_ns += time.thread_time_ns() - t
        else:
            view[:k] = self._src[p : p + k]
        self._pos = p + k
        return k

    def recv_into(self, buf: Any, nbytes: int = 0, _flags: int = 0) -> int:
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        return self._fill(view, min(nbytes or len(view), len(view)))

    def recvmsg_into(self, buffers: Sequence[Any], *_: Any) -> tuple[int, list[Any], int, Any]:
        total = 0
        for b in buffers:
            view = b if isinstance(b, memoryview) else memoryview(b)
            got = self._fill(view, len(view))
            total += got
            if got < len(view):
                break
        return total, [], 0, None

    def gettimeout(self) -> float | None:
        return None

    def settimeout(self, _t: float | None) -> None:
        pass

    def shutdown(self, _how: int) -> None:
        pass

    def close(self) -> None:
        pass


def thread_cpu_ns(t: threading.Thread) -> int:
    """CPU time thread `t` has used so far (it must be alive)."""
    assert t.ident is not None
    return time.clock_gettime_ns(time.pthread_getcpuclockid(t.ident))


# -- the workload -----------------------------------------------------------------------


@dataclass
class Workload:
    src: RamBlock
    offsets: list[np.ndarray]  # per packet index within the block
    warm: int
    packets: int
    streams: dict[str, bytes] = field(default_factory=dict)
    dsts: dict[str, RamBlock] = field(default_factory=dict)

    def offs(self, i: int) -> np.ndarray:
        return self.offsets[i % BLOCK_PACKETS]


def make_workload(packets: int) -> Workload:
    src = RamBlock("pc.ram", BLOCK_PACKETS * PACKET_BYTES)
    rng = np.random.default_rng(42)
    src.words[:] = rng.integers(1, 2**63, size=src.words.shape, dtype=np.uint64)
    offsets = [(np.arange(PAGES, dtype=np.uint64) + np.uint64(k * PAGES)) * np.uint64(PAGE)
               for k in range(BLOCK_PACKETS)]
    return Workload(src, offsets, warm=BLOCK_PACKETS, packets=packets)


def _sender(w: Workload, path: Path, sock: NullSocket) -> Sender:
    return Sender(cast(Any, [sock]), uuid=UUID, layout=path.layout,
                  compression=path.compression,
                  zero_page_detection=path.layout is PacketLayout.HEAD)


def _send_packets(sender: Sender, w: Workload, start: int, count: int) -> None:
    slot = sender.new_slot()
    for i in range(start, start + count):
        slot.payload(RamPayload).fill(w.src, w.offs(i))
        slot = sender.send(slot)


def record_stream(w: Workload, path: Path) -> bytes:
    """The bytes a real Sender writes on one channel: init, warm-up, SYNC, packets, SYNC."""
    sock = NullSocket(record=True)
    sender = _sender(w, path, sock)
    sender.start()
    _send_packets(sender, w, 0, w.warm)
    sender.sync()
    _send_packets(sender, w, w.warm, w.packets)
    sender.sync()
    sender.close()
    assert sock.chunks is not None
    return b"".join(sock.chunks)


@dataclass
class Sample:
    cpu_ns: int  # channel thread, subtracted fake copies
    copy_ns: int
    producer_ns: int  # send side: the main thread (fill + send swap); 0 on receive


def run_send(w: Workload, path: Path, wrap: Callable[[Any], Any] | None = None) -> Sample:
    sock = NullSocket()
    sender = _sender(w, path, sock)
    if wrap is not None:
        sender._run = wrap(sender._run)  # type: ignore[method-assign]
    sender.start()
    _send_packets(sender, w, 0, w.warm)
    sender.sync()  # returns once the SYNC is out: the channel thread goes back to wait
    th = sender.channels[0].thread
    assert th is not None
    c0, p0 = thread_cpu_ns(th), time.thread_time_ns()
    _send_packets(sender, w, w.warm, w.packets)
    sender.sync()
    c1, p1 = thread_cpu_ns(th), time.thread_time_ns()
    sender.close()
    want = (w.warm + w.packets) * PACKET_BYTES
    if path.compression == "none" and sock.sent < want:
        raise RuntimeError(f"{path.name}: sent {sock.sent} bytes, expected >= {want}")
    return Sample(c1 - c0, 0, p1 - p0)


def _wait_at_sync(rx: Receiver, timeout: float = 120.0) -> None:
    # Private, on purpose: the channel thread is parked in the barrier, so its CPU clock
    # is read between packets.
    deadline = time.monotonic() + timeout
    while rx._n_at_sync < rx.channels:
        if rx.error is not None:
            raise rx.error
        if time.monotonic() > deadline:
            raise RuntimeError("receiver never reached its SYNC")
        time.sleep(0.0005)


def run_recv(w: Workload, path: Path, wrap: Callable[[Any], Any] | None = None) -> Sample:
    dst = w.dsts[path.name]
    sock = ReplaySocket(w.streams[path.name])
    rx = Receiver(channels=1, uuid=UUID, layout=path.layout, compression=path.compression,
                  page_size=PAGE, blocks={dst.name: dst}, fresh_ram=True)
    if wrap is not None:
        rx._run = wrap(rx._run)  # type: ignore[method-assign]
    rx.add_channel(cast(Any, sock))
    th = rx._chans[0].thread
    assert th is not None
    _wait_at_sync(rx)
    c0, k0 = thread_cpu_ns(th), sock.copy_ns
    rx.sync_main(timeout=60)
    _wait_at_sync(rx)
    c1, k1 = thread_cpu_ns(th), sock.copy_ns
    rx.sync_main(timeout=60)
    th.join(60)
    err = rx.error
    rx.close()
    if err is not None:
        raise err
    if not np.array_equal(dst.words, w.src.words):
        raise RuntimeError(f"{path.name}: destination RAM differs from the source")
    return Sample(c1 - c0 - (k1 - k0), k1 - k0, 0)


def run_path(w: Workload, name: str, wrap: Callable[[Any], Any] | None = None) -> Sample:
    path = PATH_DEFS[name]
    return (run_send if path.side == "send" else run_recv)(w, path, wrap)


# -- the codec calls, measured separately -------------------------------------------------


def _zstd_payloads(w: Workload, count: int) -> list[bytes]:
    comp = get_method("zstd").new_compressor(1)
    view = w.src.view
    out = []
    for i in range(count):
        k = i % BLOCK_PACKETS
        out.append(b"".join(bytes(b) for b in
                            comp.compress_packet([view[k * PACKET_BYTES:(k + 1) * PACKET_BYTES]])))
    return out


def codec_call_ns(w: Workload, name: str, count: int) -> int:
    """Thread CPU of `count` bare compress / decompress calls on the bench's packets,
    the way the channel calls them (one call per packet, one stream)."""
    from multifd.compress.zstd import ZstdCompressor

    view = w.src.view
    pkts = [view[k * PACKET_BYTES:(k + 1) * PACKET_BYTES] for k in range(BLOCK_PACKETS)]
    if name == "send_zstd":
        c = ZstdCompressor(level=1)
        for i in range(BLOCK_PACKETS):  # warm the context like the channel's warm-up
            c.compress(pkts[i], mode=ZstdCompressor.FLUSH_BLOCK)
        t = time.thread_time_ns()
        for i in range(count):
            c.compress(pkts[i % BLOCK_PACKETS], mode=ZstdCompressor.FLUSH_BLOCK)
        return time.thread_time_ns() - t
    payloads = _zstd_payloads(w, BLOCK_PACKETS + count)
    d = get_method("zstd").new_decompressor()  # the channel's: into RAM when it can
    out = memoryview(bytearray(PACKET_BYTES))
    for p in payloads[:BLOCK_PACKETS]:
        d.decompress_packet(p, out)
    t = time.thread_time_ns()
    for p in payloads[BLOCK_PACKETS:]:
        d.decompress_packet(p, out)
    return time.thread_time_ns() - t


def gil_free_share(call: Callable[[], object], seconds: float = 0.1, pairs: int = 3) -> float:
    """Share of a C call's time during which the GIL is free: a counting loop here,
    the call back to back in a second thread; the loop's rate against its rate alone
    (alone and shared windows alternate, the median ratio of `pairs` is returned)."""

    def count(dur: float) -> int:
        n = 0
        end = time.perf_counter() + dur
        while time.perf_counter() < end:
            n += 1
        return n

    ratios = []
    for _ in range(pairs):
        alone = count(seconds)
        stop = threading.Event()

        def worker(stop: threading.Event = stop) -> None:
            while not stop.is_set():
                call()

        t = threading.Thread(target=worker, daemon=True)
        t.start()
        time.sleep(0.005)
        shared = count(seconds)
        stop.set()
        t.join()
        ratios.append(shared / alone)
    return max(0.0, min(1.0, statistics.median(ratios)))


def probe_shares(w: Workload) -> dict[str, float]:
    from multifd.compress.zstd import ZstdCompressor

    view = w.src.view
    pkts = [view[k * PACKET_BYTES:(k + 1) * PACKET_BYTES] for k in range(BLOCK_PACKETS)]
    c = ZstdCompressor(level=1)
    ci = [0]

    def comp() -> None:
        c.compress(pkts[ci[0] % BLOCK_PACKETS], mode=ZstdCompressor.FLUSH_BLOCK)
        ci[0] += 1

    payloads = _zstd_payloads(w, 4096 // 4)  # ~1 s of decompress at most; then restart
    new = get_method("zstd").new_decompressor
    out = memoryview(bytearray(PACKET_BYTES))
    state: dict[str, Any] = {"d": new(), "i": 0}

    def decomp() -> None:
        if state["i"] == len(payloads):
            state["d"], state["i"] = new(), 0
        state["d"].decompress_packet(payloads[state["i"]], out)
        state["i"] += 1

    return {"send_zstd": gil_free_share(comp), "recv_zstd": gil_free_share(decomp)}


# -- driver -------------------------------------------------------------------------------


def prepare(packets: int) -> Workload:
    w = make_workload(packets)
    for name in PATHS:
        path = PATH_DEFS[name]
        if path.side == "recv":
            w.streams[name] = record_stream(w, path)
            w.dsts[name] = RamBlock("pc.ram", w.src.used_length)
    return w


def measure(packets: int, runs: int) -> dict[str, Any]:
    w = prepare(packets)
    samples: dict[str, list[Sample]] = {p: [] for p in PATHS}
    calls: dict[str, list[int]] = {"send_zstd": [], "recv_zstd": []}
    for _ in range(runs):  # interleaved: every path once per round
        for name in PATHS:
            samples[name].append(run_path(w, name))
            if name in calls:
                calls[name].append(codec_call_ns(w, name, packets))
    shares = probe_shares(w)

    def per_pkt(ns: float) -> float:
        return ns / 1000 / packets

    res: dict[str, Any] = {
        "gil_us_per_packet": {}, "projected_max_gib_s": {}, "cpu_us_per_packet": {},
        "c_call_us_per_packet": {}, "gil_free_share": {k: round(v, 3) for k, v in
                                                       shares.items()},
        "fake_copy_us_per_packet": {}, "producer_us_per_packet": {}, "spread": {},
        "line_rate_100gbe_gib_s": LINE_RATE_100GBE_GIB_S, "method": METHOD,
        "runs": runs, "packets": packets,
    }
    for name in PATHS:
        cpu = [per_pkt(s.cpu_ns) for s in samples[name]]
        call = [per_pkt(c) for c in calls.get(name, [])]
        share = shares.get(name, 0.0)
        # Noise can make the separately measured C call look longer than the thread's
        # whole CPU time: such a run has no meaningful GIL figure and is left out.
        gil = [c - (call[i] * share if call else 0.0) for i, c in enumerate(cpu)]
        gil = [g for g in gil if g > 0] or [math.nan]
        gib = [PACKET_BYTES / 2**30 / (g / 1e6) for g in gil]
        med = statistics.median
        res["cpu_us_per_packet"][name] = round(med(cpu), 2)
        res["gil_us_per_packet"][name] = round(med(gil), 2)
        res["projected_max_gib_s"][name] = round(med(gib), 2)
        res["spread"][name] = {"gil_us": [round(min(gil), 2), round(max(gil), 2)],
                               "gib_s": [round(min(gib), 2), round(max(gib), 2)]}
        if call:
            res["c_call_us_per_packet"][name] = round(med(call), 2)
        if PATH_DEFS[name].side == "recv":
            res["fake_copy_us_per_packet"][name] = round(
                med(per_pkt(s.copy_ns) for s in samples[name]), 2)
        else:
            res["producer_us_per_packet"][name] = round(
                med(per_pkt(s.producer_ns) for s in samples[name]), 2)
    return res


def table(res: dict[str, Any], markdown: bool) -> str:
    head = ["path", "cpu us/pkt", "zstd call us/pkt", "GIL us/pkt (min-max)",
            "ceiling GiB/s (min-max)"]
    rows = []
    for name in PATHS:
        lo, hi = res["spread"][name]["gil_us"]
        glo, ghi = res["spread"][name]["gib_s"]
        call = res["c_call_us_per_packet"].get(name)
        rows.append([
            name, f"{res['cpu_us_per_packet'][name]:.1f}",
            f"{call:.1f} (x{res['gil_free_share'][name]:.2f} free)" if call else "-",
            f"{res['gil_us_per_packet'][name]:.1f} ({lo:.1f}-{hi:.1f})",
            f"{res['projected_max_gib_s'][name]:.1f} ({glo:.1f}-{ghi:.1f})",
        ])
    foot = (f"medians of {res['runs']} runs x {res['packets']} packets of 512 KiB; "
            f"100GbE line rate {LINE_RATE_100GBE_GIB_S} GiB/s")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + f"\n\n{foot}"
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{wd}}}" for wd in widths)
    lines = [fmt.format(*head)] + [fmt.format(*r) for r in rows]
    return "\n".join(lines) + f"\n{foot}\nmethod: {res['method']}"


def profile(name: str, packets: int, top: int = 25) -> str:
    """One run of `name` with cProfile enabled inside its channel thread."""
    w = prepare(packets) if PATH_DEFS[name].side == "recv" else make_workload(packets)
    if PATH_DEFS[name].side == "recv":
        w.streams = {name: w.streams[name]}
    prof = cProfile.Profile()

    def wrap(run: Callable[..., None]) -> Callable[..., None]:
        def inner(*a: Any) -> None:
            prof.enable()
            try:
                run(*a)
            finally:
                prof.disable()
        return inner

    run_path(w, name, wrap)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--packets", type=int, default=256, help="measured packets per run")
    ap.add_argument("--runs", type=int, default=5)
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true")
    out.add_argument("--markdown", action="store_true",
                     help="print the markdown table and rewrite its section of --readme")
    ap.add_argument("--readme", default=None,
                    help="markdown file whose ceiling section is rewritten (default with "
                         "--markdown: bench/README.md)")
    out.add_argument("--profile", choices=PATHS, metavar="PATH",
                     help=f"cProfile one run of PATH ({', '.join(PATHS)})")
    args = ap.parse_args(argv)
    if args.packets < 1 or args.runs < 1:
        ap.error("--packets and --runs must be >= 1")
    if args.profile:
        print(profile(args.profile, args.packets))
        return 0
    res = measure(args.packets, args.runs)
    for k in ("gil_us_per_packet", "projected_max_gib_s"):
        if not all(math.isfinite(v) and v > 0 for v in res[k].values()):
            print(f"warning: non-positive {k}: {res[k]}", file=sys.stderr)
    if args.json:
        print(json.dumps(res))
    else:
        print(table(res, args.markdown))
    readme = args.readme or (pathlib.Path(__file__).resolve().parent / "README.md"
                             if args.markdown else None)
    if readme:
        update_section(pathlib.Path(readme), "ceiling", table(res, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
