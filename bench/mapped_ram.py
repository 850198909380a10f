"""Benchmark: mapped-ram save and restore, ours against QEMU 10.0, same guest, same directory.

The guest of bench/engine.py: 2 GiB of RAM holding 1 GiB of random data at 0x100000, the
rest zero (`--mem-mib`, `--data-mib` to shrink it for a check). Per round, interleaved
(the side that goes first alternates), each side:

* save: QEMU 10.0 (`-S`, `-device loader` for the blob; mapped-ram + multifd
  `--channels`, max-bandwidth 1e12, `migrate file:DIR/qemu.mr`); time = the source's
  query-migrate total-time. Ours: a `Machine` with one "pc.ram" block holding the same
  blob (loaded once, in this process), `MigrationSource` to `file:DIR/ours.mr` with
  mapped-ram + multifd `--channels`; time = our query-migrate total-time.
* restore: QEMU 10.0 (`-incoming defer`, same capabilities) `migrate-incoming
  file:DIR/qemu.mr`; time = wall clock from the command to "completed" (polled every
  2 ms; QEMU's destination reports no total-time). Ours: a fresh zeroed 2 GiB `Machine`,
  `MigrationDestination` on `file:DIR/ours.mr`; time = wall clock from listen to done.

Page-cache policy (printed as `page_cache`): every save writes a fresh file (the old one is
deleted and `sync` run first, so no save is throttled by an earlier run's writeback); by
default each restore reads the file its own side has just written, so both restores read
from the page cache (`warm`). `--drop-caches` (root) writes 3 to
/proc/sys/vm/drop_caches before every restore (`cold`: reads come from the device).
`--direct-io` sets QEMU's and our `direct-io` parameter (O_DIRECT channel fds).
Figures: medians of the rounds with min-max; ratios ours/QEMU (goal <= 1.0); GiB/s =
blob bytes / time. The first round checks both restored guests against the blob's sha256.

    python bench/mapped_ram.py [--runs 5] [--dir D] [--channels 4] [--mem-mib 2048]
                               [--data-mib 1024] [--direct-io] [--drop-caches] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import make_blob, spread, warm_memory
from multifd.machine.machine import Machine
from multifd.machine.ramblock import RamBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.source import MigrationSource
from multifd.qemu.qemuproc import QEMU10, QemuProcess, available

MiB = 1 << 20
GiB = 1 << 30
BLOB_ADDR = 0x100000
QEMU_MAX_BANDWIDTH = 10**12
TIMEOUT_S = 300.0


def _caps(args: argparse.Namespace) -> tuple[MigrationParameters, MigrationCapabilities]:
    p = MigrationParameters()
    p.set({"max-bandwidth": 0, "multifd-channels": args.channels,
           "direct-io": bool(args.direct_io)})
    c = MigrationCapabilities()
    c.set([{"capability": "multifd", "state": True},
           {"capability": "mapped-ram", "state": True}])
    return p, c


def _qemu(args: argparse.Namespace, blob: Path | None, name: str) -> QemuProcess:
    extra = ["-device", f"loader,file={blob},addr={BLOB_ADDR:#x}"] if blob else []
    vm = QemuProcess(extra, version=QEMU10, name=name, memory_mib=args.mem_mib,
                     incoming=None if blob else "defer")
    vm.start()
    vm.set_migration(multifd=True, channels=args.channels, max_bandwidth=QEMU_MAX_BANDWIDTH,
                     caps={"mapped-ram": True},
                     params={"direct-io": True} if args.direct_io else None)
    return vm


def _drop_caches(args: argparse.Namespace) -> None:
    if args.drop_caches:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def _fresh(path: Path) -> None:
    """Delete the old file and flush every dirty page: no save starts throttled by the
    writeback of the one before it."""
    path.unlink(missing_ok=True)
    os.sync()


def qemu_save(args: argparse.Namespace, blob: Path, path: Path) -> float:
    vm = _qemu(args, blob, "src")
    try:
        warm_memory(args.warm_mib * MiB)
        _fresh(path)
        vm.migrate(f"file:{path}")
        return float(vm.wait_migration(TIMEOUT_S, interval=0.002)["total-time"])
    finally:
        vm.close()


def qemu_restore(args: argparse.Namespace, path: Path, sha: str | None) -> tuple[float, bool]:
    vm = _qemu(args, None, "dst")
    try:
        warm_memory(args.warm_mib * MiB)
        _drop_caches(args)
        t0 = time.monotonic()
        vm.migrate_incoming(f"file:{path}")
        vm.wait_migration(TIMEOUT_S, interval=0.002)
        ms = (time.monotonic() - t0) * 1000
        ok = sha is None or vm.pmem_sha256(BLOB_ADDR, args.data_mib * MiB) == sha
        return ms, ok
    finally:
        vm.close()


def ours_save(args: argparse.Namespace, machine: Machine, path: Path) -> float:
    warm_memory(args.warm_mib * MiB)
    _fresh(path)
    p, c = _caps(args)
    src = MigrationSource(machine, params=p, caps=c)
    src.start(f"file:{path}")
    if str(src.wait(TIMEOUT_S)) != "completed":
        raise RuntimeError(f"our save failed: {src.error}")
    return float(src.query()["total-time"])


def ours_restore(args: argparse.Namespace, path: Path, sha: str | None) -> tuple[float, bool]:
    machine = Machine([RamBlock("pc.ram", args.mem_mib * MiB)], incoming=True)
    try:
        warm_memory(args.warm_mib * MiB)
        _drop_caches(args)
        p, c = _caps(args)
        dst = MigrationDestination(machine, params=p, caps=c)
        t0 = time.monotonic()
        dst.listen(f"file:{path}")
        if str(dst.wait(TIMEOUT_S)) != "completed":
            raise RuntimeError(f"our restore failed: {dst.error}")
        ms = (time.monotonic() - t0) * 1000
        ok = True
        if sha is not None:
            view = machine.block("pc.ram").view[BLOB_ADDR : BLOB_ADDR + args.data_mib * MiB]
            ok = hashlib.sha256(view).hexdigest() == sha
        return ms, ok
    finally:
        machine.close()


def _source_machine(args: argparse.Namespace, blob: Path) -> Machine:
    block = RamBlock("pc.ram", args.mem_mib * MiB)
    with open(blob, "rb") as f:
        f.readinto(block.view[BLOB_ADDR : BLOB_ADDR + args.data_mib * MiB])
    return Machine([block])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=tempfile.gettempdir(),
                    help="where both sides write their files (default $TMPDIR)")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--mem-mib", type=int, default=2048)
    ap.add_argument("--data-mib", type=int, default=1024)
    ap.add_argument("--warm-mib", type=int, default=2048,
                    help="touch and free this much memory before each run (benchlib)")
    ap.add_argument("--direct-io", action="store_true")
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not available(QEMU10):
        print("error: QEMU 10.0 is not unpacked (run .ci/qemu10)", file=sys.stderr)
        return 1
    if args.data_mib * MiB + BLOB_ADDR > args.mem_mib * MiB:
        print("error: --data-mib does not fit in --mem-mib", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="mapped-ram-bench-", dir=args.dir))
    blob = work / "blob.bin"
    sha = make_blob(blob, args.data_mib * MiB)
    machine = _source_machine(args, blob)
    q_file, o_file = work / "qemu.mr", work / "ours.mr"
    runs: list[dict[str, Any]] = []
    try:
        for i in range(args.runs):
            check = sha if i == 0 else None
            r: dict[str, Any] = {}
            sides = ("qemu", "ours") if i % 2 == 0 else ("ours", "qemu")
            for side in sides:
                if side == "qemu":
                    r["qemu_save_ms"] = qemu_save(args, blob, q_file)
                    r["qemu_restore_ms"], okq = qemu_restore(args, q_file, check)
                    r["qemu_allocated"] = os.stat(q_file).st_blocks * 512
                else:
                    r["ours_save_ms"] = ours_save(args, machine, o_file)
                    r["ours_restore_ms"], oko = ours_restore(args, o_file, check)
                    r["ours_allocated"] = os.stat(o_file).st_blocks * 512
            if i == 0:
                r["verified"] = okq and oko
            runs.append(r)
            if not args.json:
                print(f"run {i + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in r.items()
                                                   if k.endswith("_ms")), file=sys.stderr)
    finally:
        machine.close()
        for f in (q_file, o_file, blob):
            f.unlink(missing_ok=True)
        work.rmdir()
    out = report(args, runs)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0 if out["verified"] else 1


def report(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    gib = args.data_mib * MiB / GiB
    out: dict[str, Any] = {
        "guest_mib": args.mem_mib, "data_mib": args.data_mib, "channels": args.channels,
        "direct_io": args.direct_io, "runs": len(runs), "dir": args.dir,
        "page_cache": "fresh file per save, after sync (no writeback of an earlier run "
                      "pending); restore " + (
                          "cold: drop_caches before it" if args.drop_caches else
                          "warm: reads the file just written, from the page cache"),
        "verified": bool(runs and runs[0].get("verified")),
    }
    for key in ("qemu_save_ms", "ours_save_ms", "qemu_restore_ms", "ours_restore_ms"):
        vals = [r[key] for r in runs]
        out[key] = spread(vals, 1)
        out[key.replace("_ms", "_gib_s")] = spread([gib / (v / 1000) for v in vals], 2)
    for what in ("save", "restore"):
        q, o = out[f"qemu_{what}_ms"], out[f"ours_{what}_ms"]
        out[f"{what}_ratio"] = round(o["median"] / q["median"], 3) if q and o else None
    out["allocated_bytes"] = {"qemu": runs[-1]["qemu_allocated"] if runs else None,
                              "ours": runs[-1]["ours_allocated"] if runs else None}
    out["runs_ms"] = [{k: round(v, 1) for k, v in r.items() if k.endswith("_ms")}
                      for r in runs]
    return out


if __name__ == "__main__":
    sys.exit(main())
