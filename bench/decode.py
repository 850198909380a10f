"""Receive-side decode throughput on real QEMU captures (no sockets): the CPU cost of
turning recorded multifd connections into guest RAM.

Per run: the main channel goes through wire.stream.MainStreamDecoder (ZERO/PAGE records
applied to RAM), every multifd channel through wire.packet.ChannelDecoder fed in
`--chunk`-sized pieces (like socket reads), its payloads through the channel's
decompressor, and the pages are scattered into preallocated numpy RAM blocks with one
fancy-index assignment per packet. MiB/s = capture bytes (all connections) / wall time,
median of --runs. The result is checked against pattern-4MiB.bin after the first run.

    python bench/decode.py [--set qemu10-captures/multifd2-none] [--runs 20] [--json]

The captures are read from tests/data (vendored, gzip-compressed ``*.bin.gz``; plain
``*.bin`` files in a ``--data`` folder work too).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from multifd.compress import get_method
from multifd.wire.packet import ChannelDecoder, EndOfChannel, InitPacket, RamPacket

PAGE = 4096
BLOCKS = {
    "pc.ram": 0x4000000,
    "/rom@etc/acpi/tables": 0x20000,
    "pc.bios": 0x40000,
    "pc.rom": 0x20000,
    "/rom@etc/table-loader": 0x1000,
    "/rom@etc/acpi/rsdp": 0x1000,
}
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
CANDIDATES = ["qemu-captures/multifd2-none", "qemu10-captures/multifd2-none"]


def _file(d: Path, name: str) -> Path:
    """``name`` in ``d``, or its gzip-compressed ``name.gz`` (how tests/data stores it)."""
    return d / name if (d / name).exists() else d / f"{name}.gz"


def read_capture(p: Path) -> bytes:
    return gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()


def capture_files(d: Path) -> tuple[Path, list[Path]]:
    if _file(d, "main.bin").exists():
        return _file(d, "main.bin"), sorted({_file(d, p.name.removesuffix(".gz"))
                                            for p in d.glob("chan-*.bin*")})
    return _file(d, "conn0-src2dst.bin"), sorted({_file(d, p.name.removesuffix(".gz"))
                                                 for p in d.glob("conn[1-9]-src2dst.bin*")})


def method_of(d: Path) -> str:
    return d.name.removeprefix("multifd2-")


def decode_main(data: bytes, ram: dict[str, np.ndarray], chunk: int) -> bool:
    """Apply the main channel's RAM records; False if the stream decoder is unavailable."""
    try:
        from multifd.wire.ram import RamPage, RamSettings, RamZero
        from multifd.wire.stream import MainStreamDecoder
    except ImportError:
        return False
    dec = MainStreamDecoder(ram=RamSettings(), blocks=BLOCKS)
    for pos in range(0, len(data), chunk):
        dec.receive_data(data[pos : pos + chunk])
        for rec in dec:
            if isinstance(rec, RamZero):
                ram[rec.block][rec.offset // PAGE].fill(rec.fill)
            elif isinstance(rec, RamPage):
                ram[rec.block][rec.offset // PAGE] = np.frombuffer(rec.data, np.uint8)
    dec.receive_eof()
    for _ in dec:
        pass
    return True


def decode_channel(
    data: bytes, ram: dict[str, np.ndarray], method: str, chunk: int
) -> tuple[int, int]:
    """Decode one multifd connection into RAM; returns (normal pages, zero pages)."""
    m = get_method(method)
    dec = ChannelDecoder(blocks=BLOCKS, compression_flag=int(m.flag))
    decomp = m.new_decompressor()
    scratch = np.empty((128, PAGE), dtype=np.uint8)
    zeros = np.zeros((128, PAGE), dtype=np.uint8)  # numpy copies rows far faster than it
    # broadcasts a scalar into fancy-indexed rows (6 vs 0.8 GiB/s here)
    pages = zpages = 0
    view = memoryview(data)
    pos = 0
    while True:
        ev = dec.next_event()
        if isinstance(ev, RamPacket):
            h = ev.header
            if not h.has_pages:
                continue
            block = ram[h.ramblock]
            n = h.normal_pages
            if n:
                if method == "none":  # the payload is the pages: place them directly
                    block[h.normal_offsets // PAGE] = np.frombuffer(
                        ev.payload, np.uint8).reshape(n, PAGE)
                else:
                    out = scratch[:n]
                    decomp.decompress_packet(ev.payload, memoryview(out).cast("B"))
                    block[h.normal_offsets // PAGE] = out
                pages += n
            if h.zero_pages:
                block[h.zero_offsets // PAGE] = zeros[: h.zero_pages]
                zpages += h.zero_pages
        elif isinstance(ev, InitPacket):
            continue
        elif isinstance(ev, EndOfChannel):
            return pages, zpages
        elif pos < len(data):  # NEED_DATA
            dec.receive_data(view[pos : pos + chunk])
            pos += chunk
            if pos >= len(data):
                dec.receive_eof()
        else:  # device-state packets do not occur in these captures
            raise RuntimeError(f"unexpected event {ev!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="folder holding qemu-captures/ and qemu10-captures/ (default: "
                         "tests/data)")
    ap.add_argument("--set", default=None,
                    help="capture folder relative to --data (default: the largest of "
                         + ", ".join(CANDIDATES) + ")")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=256 * 1024, help="bytes per feed")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    if args.set:
        d = args.data / args.set
    else:
        d = max((args.data / c for c in CANDIDATES),
                key=lambda p: sum(len(read_capture(f)) for f in (capture_files(p)[0],
                                                                *capture_files(p)[1])))
    main_file, chans = capture_files(d)
    main_data = read_capture(main_file)
    chan_data = [read_capture(c) for c in chans]
    total = len(main_data) + sum(map(len, chan_data))
    method = method_of(d)
    ram = {name: np.zeros((size // PAGE, PAGE), dtype=np.uint8)
           for name, size in BLOCKS.items()}  # preallocated guest RAM, as a destination has

    times: list[float] = []
    main_ok = False
    pages = zpages = 0
    for run in range(args.runs):
        for a in ram.values():
            a.fill(0xEE)
        t0 = time.perf_counter()
        main_ok = decode_main(main_data, ram, args.chunk)
        counts = [decode_channel(c, ram, method, args.chunk) for c in chan_data]
        times.append(time.perf_counter() - t0)
        pages, zpages = sum(c[0] for c in counts), sum(c[1] for c in counts)
        if run == 0:
            pattern = read_capture(_file(args.data / "qemu-captures", "pattern-4MiB.bin"))
            got = ram["pc.ram"].reshape(-1)[0x100000 : 0x100000 + len(pattern)].tobytes()
            if got != pattern:
                print("decoded RAM does not match pattern-4MiB.bin", file=sys.stderr)
                return 1

    med = statistics.median(times)
    result = {
        "mib_per_s": round(total / med / 2**20, 1),
        "runs": args.runs,
        "median_s": round(med, 5),
        "capture": str(d.relative_to(args.data)),
        "capture_bytes": total,
        "normal_pages": pages,
        "multifd_zero_pages": zpages,
        "page_mib_per_s": round(pages * PAGE / med / 2**20, 1),
        "ram_mib_per_s": round((pages + zpages) * PAGE / med / 2**20, 1),
        "main_channel_decoded": main_ok,
        "chunk": args.chunk,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['capture']}: {total / 2**20:.2f} MiB in {med * 1e3:.2f} ms "
              f"(median of {args.runs}) = {result['mib_per_s']} MiB/s; "
              f"{pages} normal pages = {result['page_mib_per_s']} MiB/s of page data; "
              f"+{zpages} multifd zero pages = {result['ram_mib_per_s']} MiB/s of guest RAM"
              + ("" if main_ok else " [main channel NOT decoded: wire.stream missing]"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
