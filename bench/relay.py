"""Benchmark: QEMU -> QEMU directly vs QEMU -> `multifd relay` -> QEMU.

The paused 2 GiB guest with 1 GiB of random data at 0x100000 (`-device loader`, `-S`),
multifd 2 channels, compression none on both sides (the relay then forwards packets as
they are; `--transcode` makes it re-encode them), max-bandwidth 1e12, over 127.0.0.1.
Runs alternate direct / relay (the order flips every run). Time, for both paths alike,
is the wall clock from the source's `migrate` command until the destination reports its
incoming migration completed (query-migrate polled every 10 ms). The first run of each
path checks the destination's blob (pmemsave sha256).

    relay_ratio = median relay_ms / median direct_ms      (goal <= 1.5)
    relay_peak_rss_mib = the relay's own peak RSS          (goal <= 256, any guest size)

Informational (no goal): `relay_cpu_s`, the CPU seconds the relay process used from the
`migrate` command until it exited (getrusage of the reaped child, less what it had used
before), and with `--floor` a third interleaved path through bench/blind_proxy.py, a
blind splice TCP proxy: `floor_ms`, `floor_ratio` = median floor_ms / median direct_ms and
`floor_cpu_s` (its CPU until the destination loaded): what the extra loopback TCP hop
alone costs, the least any relay can add on this host.

    python bench/relay.py [--runs 5] [--version 7.2|10.0] [--channels 2] [--transcode]
                          [--floor] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import make_blob, proc_cpu, spread, warm_memory
from multifd.qemu.qemuproc import QEMU10, QEMU72, QemuProcess, available

MiB = 1 << 20
GiB = 1 << 30
BLOB_ADDR = 0x100000
TIMEOUT_S = 180.0
PROFILE = {QEMU72: "qemu-7.2", QEMU10: "qemu-10"}
PATHS = ("direct", "relay", "floor")
BLIND_PROXY = Path(__file__).with_name("blind_proxy.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _qemu(args: argparse.Namespace, blob: Path | None, name: str) -> QemuProcess:
    extra = ["-device", f"loader,file={blob},addr={BLOB_ADDR:#x}"] if blob else []
    vm = QemuProcess(extra, version=args.version, name=name, memory_mib=args.ram // MiB,
                     incoming=None if blob else "defer")
    vm.start()
    vm.set_migration(multifd=args.channels > 0, channels=max(1, args.channels),
                     compression="none", max_bandwidth=10**12)
    return vm


def _wait_loaded(dst: QemuProcess) -> float:
    dst.wait_migration(TIMEOUT_S, interval=0.01)
    return time.monotonic()


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def one_run(args: argparse.Namespace, blob: Path, sha: str, path: str,
            verify: bool) -> dict[str, Any]:
    """One migration: `path` is direct, relay (multifd relay) or floor (blind_proxy.py)."""
    src = dst = None
    relay: subprocess.Popen[str] | None = None
    try:
        dst = _qemu(args, None, "dst")
        src = _qemu(args, blob, "src")
        dst_uri = dst.migrate_incoming("tcp:127.0.0.1:0")
        uri = dst_uri
        if path != "direct":
            port = _free_port()
            uri = f"tcp:127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "multifd.cli", "relay", uri, dst_uri, "--profile",
                   PROFILE[args.version], "--channels", str(args.channels), "--json",
                   "--idle-timeout", str(int(TIMEOUT_S)), "--no-progress",
                   *(["--passthrough", "off"] if args.transcode else [])]
            if path == "floor":
                cmd = [sys.executable, str(BLIND_PROXY), str(port), dst_uri.rsplit(":", 1)[1]]
            relay = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
            assert relay.stderr is not None
            line = relay.stderr.readline()
            if not line.startswith("listening on"):
                raise RuntimeError(f"{path} did not start: {line}")
        warm_memory(args.warm_mib * MiB)
        cpu0 = sum(proc_cpu(relay.pid).values()) if relay is not None else 0.0
        t0 = time.monotonic()
        src.migrate(uri)
        q = src.wait_migration(TIMEOUT_S, interval=0.01)
        t1 = _wait_loaded(dst)
        r: dict[str, Any] = {"ms": round((t1 - t0) * 1000, 1),
                             "source_total_ms": q.get("total-time")}
        if relay is not None and path == "floor":
            r["cpu_s"] = sum(proc_cpu(relay.pid).values()) - cpu0
        elif relay is not None:
            reaped = _children_cpu()  # only the relay is reaped in between: QEMUs still run
            out, err = relay.communicate(timeout=TIMEOUT_S)
            r["cpu_s"] = _children_cpu() - reaped - cpu0
            if relay.returncode != 0:
                raise RuntimeError(f"relay failed: {err.strip()}")
            summary = json.loads(out)
            r.update(peak_rss_mib=summary["peak_rss_mib"],
                     relay_added_ms=summary["relay_added_ms"],
                     passthrough=summary["passthrough"])
        if verify:
            r["verified"] = dst.pmem_sha256(BLOB_ADDR, args.data) == sha
        return r
    finally:
        if relay is not None and relay.poll() is None:
            relay.kill()
            relay.communicate()
        for vm in (src, dst):
            if vm is not None:
                vm.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--version", choices=(QEMU72, QEMU10), default=QEMU72)
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--transcode", action="store_true",
                   help="make the relay re-encode every packet (--passthrough off)")
    p.add_argument("--floor", action="store_true",
                   help="also migrate through a blind splice TCP proxy (informational)")
    p.add_argument("--warm-mib", type=int, default=2048,
                   help="touch and free this much memory before each migration (benchlib)")
    p.add_argument("--ram", type=int, default=2 * GiB, help="guest RAM bytes")
    p.add_argument("--data", type=int, default=GiB, help="random bytes in the guest")
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    if not available(args.version):
        print(f"error: QEMU {args.version} is not available", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="multifd-relaybench-", dir=args.tmpdir))
    paths = PATHS if args.floor else PATHS[:2]
    runs: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
    try:
        blob = tmp / "blob.bin"
        sha = make_blob(blob, args.data)
        for i in range(args.runs):
            for path in paths if i % 2 == 0 else paths[::-1]:
                runs[path].append(one_run(args, blob, sha, path, verify=i == 0))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    direct, relayed = runs["direct"], runs["relay"]
    d_ms = [r["ms"] for r in direct]
    r_ms = [r["ms"] for r in relayed]
    report: dict[str, Any] = {
        "version": args.version, "profile": PROFILE[args.version], "channels": args.channels,
        "passthrough": relayed[0]["passthrough"], "ram_bytes": args.ram,
        "data_bytes": args.data, "n_runs": args.runs, "cpus": os.cpu_count(),
        "direct_ms": spread(d_ms, 1), "relay_ms": spread(r_ms, 1),
        "relay_ratio": round(statistics.median(r_ms) / statistics.median(d_ms), 3),
        "relay_peak_rss_mib": spread([r["peak_rss_mib"] for r in relayed], 1),
        "relay_added_ms": spread([r["relay_added_ms"] for r in relayed], 1),
        "relay_cpu_s": spread([r["cpu_s"] for r in relayed], 2),
        "verified": all(r[0].get("verified") for r in runs.values()),
    }
    if args.floor:
        f_ms = [r["ms"] for r in runs["floor"]]
        report.update(floor_ms=spread(f_ms, 1),
                      floor_ratio=round(statistics.median(f_ms) / statistics.median(d_ms), 3),
                      floor_cpu_s=spread([r["cpu_s"] for r in runs["floor"]], 2))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"QEMU {args.version}, paused {args.ram / GiB:g} GiB guest, "
              f"{args.data / GiB:g} GiB random, multifd {args.channels} ch none, "
              f"{args.runs} interleaved runs (median, min-max):")
        for name in paths:
            s = report[f"{name}_ms"]
            print(f"  {name:6}: {s['median']} ms ({s['min']}-{s['max']})")
        print(f"  relay_ratio {report['relay_ratio']}, relay peak RSS "
              f"{report['relay_peak_rss_mib']['median']} MiB, relay CPU "
              f"{report['relay_cpu_s']['median']} s, verified "
              f"{'yes' if report['verified'] else 'NO'}")
        if args.floor:
            print(f"  floor_ratio {report['floor_ratio']} (blind splice proxy, CPU "
                  f"{report['floor_cpu_s']['median']} s)")
    return 0 if report["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
