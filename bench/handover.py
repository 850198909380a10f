"""Same-host handover: mode cpr-transfer (the RAM's memfds passed over a unix socket) vs
precopy (the RAM copied over the same unix socket, multifd), side by side.

The state is one RAM block of `--size` (4 GiB), filled with non-zero data, plus a small
device (64 KiB of application state). The source runs in this process (a running machine
with nothing writing); each run starts a fresh destination process on the same host that
declares the same block and device. Runs alternate between the two modes (`--runs` of
each, interleaved); figures are medians with min-max:

- total: source `start()` to the destination running (its resume), wall clock;
- downtime: source pause to destination resume;
- speedup: precopy total / handover total, per interleaved pair.

Precopy runs with multifd (`--channels`), no bandwidth limit and QEMU's default
downtime-limit (300 ms): it switches over once what is left fits 300 ms at the measured
bandwidth, so its downtime is about that much, by design.

Every run is verified: the destination's sampled checksum (every 64th page and the
device) must equal the source's.

    python bench/handover.py [--size 4G] [--runs 5] [--channels 2] [--json]

Goal (issue 15): handover total <= 1/20 of precopy's, handover downtime <= 50 ms.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import spread, warm_memory
from multifd.commands.demo import parse_size
from multifd.machine.device import BytesDevice
from multifd.machine.machine import Machine
from multifd.machine.ramblock import RamBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.source import MigrationSource

MODES = ("precopy", "cpr-transfer")
DEVICE_BYTES = 64 << 10
SAMPLE_STRIDE = 64  # pages


def _settings(mode: str, channels: int) -> tuple[MigrationParameters, MigrationCapabilities]:
    params = MigrationParameters(**{
        "mode": "cpr-transfer" if mode == "cpr-transfer" else "normal",
        "multifd-channels": channels, "max-bandwidth": 0})
    caps = MigrationCapabilities()
    caps.set([{"capability": "multifd", "state": True}])
    return params, caps


def _machine(size: int, backing: str, populate: bool) -> Machine:
    block = RamBlock("state", size, backing=backing)
    device = BytesDevice("app", os.urandom(DEVICE_BYTES) if populate else b"")
    if populate:  # non-zero everywhere: no zero page to skip
        words = block.array.view(np.uint64)
        words[:] = np.arange(1, words.size + 1, dtype=np.uint64)
    return Machine([block], [device], incoming=not populate)


def _sample(machine: Machine) -> str:
    """Checksum of every SAMPLE_STRIDE-th page and the device (cheap on GiBs)."""
    block = machine.block("state")
    h = hashlib.sha256(block.pages[::SAMPLE_STRIDE].tobytes())
    h.update(machine.device("app").save_state())
    return h.hexdigest()


def _destination(args: argparse.Namespace) -> int:
    """Child: declare the machine, receive, report resume time and the sampled checksum."""
    machine = _machine(args.size, "anon", populate=False)
    params, caps = _settings(args.mode, args.channels)
    dst = MigrationDestination(machine, params=params, caps=caps)
    print(json.dumps({"listening": dst.listen(args.uri)}), flush=True)
    status = str(dst.wait())
    print(json.dumps({"status": status, "error": dst.error, "resume_wall": dst.resume_wall,
                      "sample": _sample(machine) if status == "completed" else None}),
          flush=True)
    return 0 if status == "completed" else 1


def _run_once(args: argparse.Namespace, mode: str, tmp: str) -> dict[str, Any]:
    src_m = _machine(args.size, "memfd" if mode == "cpr-transfer" else "anon", populate=True)
    expected = _sample(src_m)
    src_m.start()
    warm_memory(args.size if mode == "precopy" else 0)  # the destination's fresh RAM
    uri = f"unix:{tmp}/{mode}.sock"
    child = subprocess.Popen(
        [sys.executable, __file__, "--role", "destination", "--mode", mode, "--size",
         str(args.size), "--channels", str(args.channels), "--uri", uri],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        json.loads(child.stdout.readline())  # listening
        params, caps = _settings(mode, args.channels)
        src = MigrationSource(src_m, params=params, caps=caps)
        start_wall = time.time()
        src.start(uri)
        status = str(src.wait())
        line = child.stdout.readline()
        child.wait(60)
    finally:
        if child.poll() is None:
            child.kill()
    res = json.loads(line) if line else {"status": "died", "error": "no result"}
    src_m.close()
    if status != "completed" or res["status"] != "completed":
        raise SystemExit(f"{mode} run failed: source {status} ({src.error}); "
                         f"destination {res['status']} ({res.get('error')})")
    if res["sample"] != expected:
        raise SystemExit(f"{mode} run: the destination's state differs from the source's")
    return {"total_ms": (res["resume_wall"] - start_wall) * 1000,
            "downtime_ms": (res["resume_wall"] - src.pause_wall) * 1000}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=4 << 30)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--channels", type=int, default=2, help="multifd channels for precopy")
    p.add_argument("--json", action="store_true")
    p.add_argument("--role", choices=("destination",), help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--uri", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "destination":
        return _destination(args)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="handover-") as tmp:
        for i in range(args.runs):
            for mode in (MODES if i % 2 == 0 else MODES[::-1]):  # interleaved
                runs[mode].append(_run_once(args, mode, tmp))
    pre, cpr = runs["precopy"], runs["cpr-transfer"]
    speedups = [a["total_ms"] / b["total_ms"] for a, b in zip(pre, cpr, strict=True)]
    result = {
        "size": args.size,
        "runs": args.runs,
        "channels": args.channels,
        "handover_downtime_ms": spread([r["downtime_ms"] for r in cpr], 2),
        "handover_total_ms": spread([r["total_ms"] for r in cpr], 2),
        "precopy_downtime_ms": spread([r["downtime_ms"] for r in pre], 2),
        "precopy_total_ms": spread([r["total_ms"] for r in pre], 2),
        "speedup": spread(speedups, 1),
        "goals": {"speedup >= 20": statistics.median(speedups) >= 20,
                  "handover downtime <= 50 ms":
                      statistics.median(r["downtime_ms"] for r in cpr) <= 50},
        "verified": True,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key in ("handover_total_ms", "handover_downtime_ms", "precopy_total_ms",
                    "precopy_downtime_ms", "speedup"):
            s = result[key]
            print(f"{key:22} {s['median']:>10} ({s['min']} - {s['max']})")
        print("goals:", ", ".join(f"{k}: {'met' if v else 'MISSED'}"
                                  for k, v in result["goals"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
