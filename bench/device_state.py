"""Switchover time with large device state: over the multifd channels vs the main stream.

A paused demo machine (64 MiB RAM) with a stop-copy device holding 1 GiB of state (it
reports nothing pending in the live phase, like a VFIO device without pre-copy, so the whole
state moves after the pause), migrated in-process over TCP loopback. Switchover time = source
pause -> destination resume (the destination has applied every buffer). Both modes run in
the same process, alternating, and the median of ``--runs`` is reported.

    python bench/device_state.py [--size 1G] [--ram 64M] [--channels 2] [--runs 3] [--json]

Goal (issue 4): multifd at least 1.5x faster (QEMU/VFIO: downtime 2100 -> 1100 ms).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from typing import Any

from multifd.commands.demo import parse_size
from multifd.machine.demo import BigStateDevice, build_demo_machine
from multifd.machine.machine import Machine
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.source import MigrationSource


class StopCopyDevice(BigStateDevice):
    """All state moves at switchover: ``pending()`` is 0 during the live phase."""

    def pending(self) -> int:
        return 0

    def save_iterate(self, final: bool) -> tuple[bytes, bool]:
        per_call = max(1, self.iterate_bytes // self.chunk_size)
        parts = [self._encode(int(c)) for c in self._take_dirty(per_call)]
        return b"".join(parts), BigStateDevice.pending(self) == 0


def _machine(ram: int, size: int, *, populate: bool, via: bool) -> Machine:
    m = build_demo_machine(ram, populate=populate)
    m.add_device(StopCopyDevice(size, populate=populate, via_multifd=via))
    return m


def _pc(channels: int) -> tuple[MigrationParameters, MigrationCapabilities]:
    p = MigrationParameters()
    p.set({"multifd-channels": channels, "downtime-limit": 300})
    c = MigrationCapabilities()
    c.set([{"capability": "multifd", "state": True}])
    return p, c


def run_once(src: Machine, args: argparse.Namespace, via: bool) -> dict[str, Any]:
    dev = src.device("bigstate")
    assert isinstance(dev, StopCopyDevice)
    dev.via_multifd = via
    dst = _machine(args.ram, args.size, populate=False, via=via)
    dst.set_incoming()
    p, c = _pc(args.channels)
    dest = MigrationDestination(dst, params=p, caps=c, accept_timeout=30)
    uri = dest.listen("tcp:127.0.0.1:0")
    p, c = _pc(args.channels)
    source = MigrationSource(src, params=p, caps=c)
    src.start()  # running (no workload): switchover = pause here -> resume there
    source.start(uri)
    source.wait(600)
    dest.wait(600)
    try:
        if str(dest.status.status) != "completed":
            raise SystemExit(f"migration failed: {source.error or dest.error}")
        ok = dst.device("bigstate").checksum() == dev.checksum()
        if not ok:
            raise SystemExit("device state checksum mismatch")
        return {
            "switchover_ms": (dest.resume_wall - source.pause_wall) * 1000,
            "source_ms": source.downtime_ms,
            "device_state_buffers": source.device_state_stats()["device_state_buffers"],
            "channels": [{"ram": ch.get("wire_bytes_ram", 0),
                          "device_state": ch.get("wire_bytes_device_state", 0)}
                         for ch in source.channel_stats()],
        }
    finally:
        dst.close()
        del dst
        gc.collect()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="device state (1G)")
    ap.add_argument("--ram", type=parse_size, default=64 << 20, help="RAM (64M)")
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    src = _machine(args.ram, args.size, populate=True, via=True)
    runs: dict[str, list[dict[str, Any]]] = {"multifd": [], "main": []}
    try:
        for i in range(args.runs):
            order = ("multifd", "main") if i % 2 == 0 else ("main", "multifd")
            for mode in order:
                runs[mode].append(run_once(src, args, mode == "multifd"))
    finally:
        src.close()
    mfd = statistics.median(r["switchover_ms"] for r in runs["multifd"])
    main_ms = statistics.median(r["switchover_ms"] for r in runs["main"])
    out = {
        "device_state_bytes": args.size,
        "ram_bytes": args.ram,
        "channels": args.channels,
        "runs": args.runs,
        "multifd_ms": round(mfd, 1),
        "main_ms": round(main_ms, 1),
        "speedup": round(main_ms / mfd, 2) if mfd else None,
        "multifd_runs_ms": [round(r["switchover_ms"], 1) for r in runs["multifd"]],
        "main_runs_ms": [round(r["switchover_ms"], 1) for r in runs["main"]],
        "multifd_buffers": runs["multifd"][-1]["device_state_buffers"],
        "multifd_channels": runs["multifd"][-1]["channels"],
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>20}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
