"""Benchmark: our engine ours->ours against QEMU 7.2 -> QEMU 7.2, same data, same run.

A paused machine with 2 GiB of RAM holding 1 GiB of random data at 0x100000 (the rest zero)
is migrated over 127.0.0.1 with multifd, 2 channels, compression none, max-bandwidth
unlimited (ours: 0; QEMU: 1e12), from a source process to a destination process:

* ours: two child processes of this script (`--role src` / `--role dst`), a `Machine` with
  one 2 GiB block "pc.ram", `MigrationSource` -> `MigrationDestination` (profile qemu-7.2 by
  default: zero pages as ZERO records on the main stream, like QEMU 7.2).
* QEMU: the command lines and QMP sequence of shared/qemu72-peer.md §2 (`-device loader`
  for the blob, `-S`, `-incoming defer` on the destination).

Runs are interleaved (ours, QEMU, QEMU, ours, ...) so noise on this 2-core machine hits
both; the report gives medians. After each of our runs, the machine's floor: the same bytes
over the same number of loopback connections into fresh memory of another process, with no
protocol at all (`floor_ms`; `--no-floor` skips it). Right before every migration the
parent touches and frees --warm-mib of memory (benchlib.warm_memory).
Time = the source's query-migrate total-time; page-data GiB/s = ram.normal-bytes /
total-time. The destination's RAM is checked against the blob's sha256 on the first run of
each (our destination hashes its block; QEMU: pmemsave). Our destination's peak RSS (VmHWM)
must stay within RAM size + 64 MiB.

    python bench/engine.py [--runs 5] [--channels 2] [--profile qemu-7.2] [--no-qemu]
                           [--no-floor] [--warm-mib 2048] [--verify-all] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import cpu_medians, cpu_since, make_blob, proc_cpu, warm_memory

MiB = 1 << 20
GiB = 1 << 30
BLOB_ADDR = 0x100000
QEMU_MAX_BANDWIDTH = 10**12
CHILD_TIMEOUT_S = 180.0
MIGRATION_TIMEOUT_S = 120.0


# -- helpers shared by parent and children -------------------------------------------------

def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def vm_hwm_mib() -> float:
    """Peak resident set size of this process (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu(t0: os.times_result, t1: os.times_result) -> dict[str, float]:
    """User and system CPU seconds this process spent between two os.times()."""
    return {"user": round(t1.user - t0.user, 3), "sys": round(t1.system - t0.system, 3)}


def _params(channels: int, compression: str) -> tuple[Any, Any]:
    from multifd.migration.params import MigrationCapabilities, MigrationParameters

    params = MigrationParameters()
    params.set({"multifd-channels": channels, "multifd-compression": compression,
                "max-bandwidth": 0})
    caps = MigrationCapabilities()
    caps.set([{"capability": "multifd", "state": True}])
    return params, caps


def _machine(ram: int) -> Any:
    from multifd.machine import Machine, RamBlock

    return Machine([RamBlock("pc.ram", ram)])


# -- child: destination --------------------------------------------------------------------

def _destination(args: argparse.Namespace) -> int:
    from multifd.migration.destination import MigrationDestination
    from multifd.migration.profile import get_profile

    params, caps = _params(args.channels, args.compression)
    machine = _machine(args.ram)
    machine.set_incoming()
    dest = MigrationDestination(machine, params=params, caps=caps,
                                profile=get_profile(args.profile), fresh_ram=True)
    _emit({"event": "listening", "uri": dest.listen("tcp:127.0.0.1:0")})
    cpu0 = os.times()
    status = str(dest.wait(MIGRATION_TIMEOUT_S))
    cpu1 = os.times()
    if status not in ("completed", "failed", "cancelled"):
        dest.cancel()
        dest.wait(10)
    res: dict[str, Any] = {"event": "result", "status": status, "error": dest.error,
                           "query": dest.query(), "rss_mib": vm_hwm_mib(),
                           "cpu_s": _cpu(cpu0, cpu1)}
    if status == "completed" and args.verify:
        view = machine.block("pc.ram").view
        res["sha256"] = hashlib.sha256(view[BLOB_ADDR:BLOB_ADDR + args.data]).hexdigest()
        rest = machine.block("pc.ram").array
        res["rest_zero"] = not (rest[:BLOB_ADDR].any() or rest[BLOB_ADDR + args.data:].any())
    res["rss_mib_after_verify"] = vm_hwm_mib()
    _emit(res)
    machine.close()
    return 0 if status == "completed" else 1


# -- child: source -------------------------------------------------------------------------

def _source(args: argparse.Namespace) -> int:
    from multifd.migration.profile import get_profile
    from multifd.migration.source import MigrationSource

    params, caps = _params(args.channels, args.compression)
    machine = _machine(args.ram)
    with open(args.blob, "rb") as f:
        got = f.readinto(machine.block("pc.ram").view[BLOB_ADDR:BLOB_ADDR + args.data])
    if got != args.data:
        _emit({"event": "result", "status": "failed", "error": f"short blob read {got}"})
        return 1
    src = MigrationSource(machine, params=params, caps=caps, profile=get_profile(args.profile))
    _emit({"event": "ready"})
    sys.stdin.readline()  # the parent warms memory, then says go
    cpu0 = os.times()
    src.start(args.uri)
    status = str(src.wait(MIGRATION_TIMEOUT_S))
    cpu1 = os.times()
    if status not in ("completed", "failed", "cancelled"):
        src.cancel()
        src.wait(10)
    _emit({"event": "result", "status": status, "error": src.error, "query": src.query(),
           "wall_ms": (src.t_end - src.t_start) * 1000 if src.t_end else None,
           "rss_mib": vm_hwm_mib(), "cpu_s": _cpu(cpu0, cpu1)})
    machine.close()
    return 0 if status == "completed" else 1


# -- parent: one run of ours ---------------------------------------------------------------

def _spawn(args: argparse.Namespace, role: str, extra: list[str]) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", role,
           "--ram", str(args.ram), "--data", str(args.data), "--channels", str(args.channels),
           "--compression", args.compression, "--profile", args.profile, *extra]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _read_result(proc: subprocess.Popen[str], want: str, timeout: float) -> dict[str, Any]:
    """First JSON line from `proc` whose event is `want`, within `timeout` seconds."""
    box: list[dict[str, Any]] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("event") == want:
                box.append(obj)
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        proc.kill()
        raise RuntimeError(f"child {proc.args[3:5]} gave no {want!r} within {timeout:.0f} s "
                           f"(exit {proc.poll()})")
    return box[0]


def run_ours(args: argparse.Namespace, blob: Path, blob_sha: str, verify: bool) -> dict[str, Any]:
    dst = _spawn(args, "dst", ["--verify"] if verify else [])
    src: subprocess.Popen[str] | None = None
    try:
        uri = _read_result(dst, "listening", 60)["uri"]
        src = _spawn(args, "src", ["--uri", uri, "--blob", str(blob)])
        _read_result(src, "ready", 60)
        warm_memory(args.warm_mib * MiB)
        assert src.stdin is not None
        src.stdin.write("go\n")
        src.stdin.flush()
        s = _read_result(src, "result", CHILD_TIMEOUT_S)
        d = _read_result(dst, "result", CHILD_TIMEOUT_S)
        src.wait(30)
        dst.wait(30)
    finally:
        for p in (src, dst):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    q = s["query"]
    ram = q.get("ram", {})
    ok = s["status"] == "completed" and d["status"] == "completed"
    run: dict[str, Any] = {
        "who": "ours", "status": "completed" if ok else f"src {s['status']} / dst {d['status']}",
        "error": s.get("error") or d.get("error"),
        "total_ms": q.get("total-time"), "wall_ms": s.get("wall_ms"),
        "normal_bytes": ram.get("normal-bytes"), "normal": ram.get("normal"),
        "duplicate": ram.get("duplicate"), "transferred": ram.get("transferred"),
        "dest_rss_mib": round(d["rss_mib"], 1),
        "dest_rss_mib_after_verify": round(d["rss_mib_after_verify"], 1),
        "src_rss_mib": round(s["rss_mib"], 1),
        "src_cpu_s": s.get("cpu_s"), "dst_cpu_s": d.get("cpu_s"),
    }
    if verify:
        run["verified"] = ok and d.get("sha256") == blob_sha and bool(d.get("rest_zero"))
    return run


# -- parent: one run of QEMU 7.2 -> QEMU 7.2 -----------------------------------------------

def run_qemu(args: argparse.Namespace, blob: Path, blob_sha: str, verify: bool) -> dict[str, Any]:
    from multifd.qemu.qemuproc import QemuProcess

    mem_mib = args.ram // MiB
    src = QemuProcess(["-device", f"loader,file={blob},addr={BLOB_ADDR:#x}"],
                      version="7.2", name="src", memory_mib=mem_mib)
    dst = QemuProcess(version="7.2", name="dst", memory_mib=mem_mib, incoming="defer")
    try:
        src.start()
        dst.start()
        for vm in (dst, src):
            vm.set_migration(multifd=True, channels=args.channels,
                             compression=args.compression, max_bandwidth=QEMU_MAX_BANDWIDTH)
        uri = dst.migrate_incoming("tcp:127.0.0.1:0")
        warm_memory(args.warm_mib * MiB)
        cpu0 = proc_cpu(src.pid), proc_cpu(dst.pid)
        src.migrate(uri)
        q = src.wait_migration(MIGRATION_TIMEOUT_S)
        dst.wait_migration(MIGRATION_TIMEOUT_S)
        ram = q.get("ram", {})
        run: dict[str, Any] = {
            "who": "qemu", "status": "completed", "total_ms": q.get("total-time"),
            "normal_bytes": ram.get("normal-bytes"), "normal": ram.get("normal"),
            "duplicate": ram.get("duplicate"), "transferred": ram.get("transferred"),
            "downtime_ms": q.get("downtime"), "setup_ms": q.get("setup-time"),
            "mbps": ram.get("mbps"), "accel": src.accel,
            "src_cpu_s": cpu_since(src.pid, cpu0[0]), "dst_cpu_s": cpu_since(dst.pid, cpu0[1]),
        }
        if verify:
            run["verified"] = dst.pmem_sha256(BLOB_ADDR, args.data) == blob_sha
        return run
    finally:
        src.close()
        dst.close()


# -- the machine's floor -------------------------------------------------------------------

FLOOR_CHUNK = 512 * 1024  # one multifd packet's page data


def _floor_dst(args: argparse.Namespace) -> int:
    """Receive args.data bytes on `channels` connections into fresh THP memory, no protocol."""
    import mmap
    import socket

    ls = socket.create_server(("127.0.0.1", 0))
    ls.listen(args.channels)
    mem = mmap.mmap(-1, args.ram, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem.madvise(mmap.MADV_HUGEPAGE)
    view = memoryview(mem)
    _emit({"event": "listening", "uri": f"{ls.getsockname()[1]}"})
    conns = [ls.accept()[0] for _ in range(args.channels)]
    share = args.data // args.channels

    def rx(k: int, c: Any) -> None:
        base = BLOB_ADDR + k * share
        for off in range(0, share, FLOOR_CHUNK):
            n = min(FLOOR_CHUNK, share - off)
            if c.recv_into(view[base + off : base + off + n], n, socket.MSG_WAITALL) != n:
                raise RuntimeError("short read")

    ts = [threading.Thread(target=rx, args=(k, c)) for k, c in enumerate(conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    _emit({"event": "result", "status": "completed"})
    return 0


def run_floor(args: argparse.Namespace, blob: Path) -> dict[str, Any]:
    """The machine's floor for this transfer: the blob's bytes over `channels` loopback TCP
    connections, 512 KiB sendmsg calls from Python threads, into a fresh THP mapping in
    another process: the copies and page faults any migration pays, without a protocol."""
    import socket

    dst = _spawn(args, "floor-dst", [])
    try:
        port = int(_read_result(dst, "listening", 60)["uri"])
        with open(blob, "rb") as f:
            data = memoryview(f.read())
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.channels)]
        share = args.data // args.channels
        warm_memory(args.warm_mib * MiB)
        t0 = time.monotonic()

        def tx(k: int, s: socket.socket) -> None:
            for off in range(k * share, (k + 1) * share, FLOOR_CHUNK):
                s.sendall(data[off : off + FLOOR_CHUNK])

        ts = [threading.Thread(target=tx, args=(k, s)) for k, s in enumerate(socks)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        _read_result(dst, "result", CHILD_TIMEOUT_S)
        ms = (time.monotonic() - t0) * 1000
        for s in socks:
            s.close()
        dst.wait(30)
        return {"who": "floor", "status": "completed", "total_ms": round(ms, 1)}
    finally:
        if dst.poll() is None:
            dst.kill()
            dst.wait(10)


# -- parent --------------------------------------------------------------------------------

def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _gib_s(runs: list[dict[str, Any]]) -> float | None:
    rates = [r["normal_bytes"] / GiB / (r["total_ms"] / 1000) for r in runs
             if r.get("total_ms") and r.get("normal_bytes")]
    return round(statistics.median(rates), 3) if rates else None


def parent(args: argparse.Namespace) -> int:
    from multifd.qemu.qemuproc import available

    with_qemu = available("7.2") and not args.no_qemu
    tmp = Path(tempfile.mkdtemp(prefix="multifd-bench-", dir=args.tmpdir))
    runs: list[dict[str, Any]] = []
    try:
        blob = tmp / "blob1g_random.bin"
        if not args.json:
            print(f"generating {args.data / GiB:g} GiB of random data in {blob} ...",
                  file=sys.stderr)
        blob_sha = make_blob(blob, args.data)
        for i in range(args.runs):
            order = ("ours", "qemu") if i % 2 == 0 else ("qemu", "ours")
            for who in order:
                if who == "qemu" and not with_qemu:
                    continue
                verify = args.verify_all or i == 0
                fn = run_ours if who == "ours" else run_qemu
                try:
                    r = fn(args, blob, blob_sha, verify)
                except Exception as exc:
                    r = {"who": who, "status": "failed", "error": str(exc)}
                r["run"] = i
                runs.append(r)
                if who == "ours" and not args.no_floor:
                    try:
                        floor = run_floor(args, blob)
                    except Exception as exc:
                        floor = {"who": "floor", "status": "failed", "error": str(exc)}
                    floor["run"] = i
                    runs.append(floor)
                if not args.json:
                    print(f"  run {i} {who:4}: {r.get('total_ms')} ms  {r['status']}"
                          + (f"  verified={r['verified']}" if "verified" in r else "")
                          + (f"  dest RSS {r['dest_rss_mib']} MiB" if "dest_rss_mib" in r
                             else "")
                          + (f"  ({r['error']})" if r.get("error") else ""), file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    floor = [r["total_ms"] for r in runs if r["who"] == "floor" and r["status"] == "completed"]
    floor_ms = _median(floor)
    ours = [r for r in runs if r["who"] == "ours" and r["status"] == "completed"]
    qemu = [r for r in runs if r["who"] == "qemu" and r["status"] == "completed"]
    ours_ms = _median([r["total_ms"] for r in ours])
    qemu_ms = _median([r["total_ms"] for r in qemu]) if with_qemu else None
    rss = max((r["dest_rss_mib"] for r in ours), default=None)
    rss_limit = args.ram / MiB + 64
    report: dict[str, Any] = {
        "ours_ms": ours_ms,
        "qemu_ms": qemu_ms,
        "ratio": round(ours_ms / qemu_ms, 3) if ours_ms and qemu_ms else None,
        "floor_ms": floor_ms,  # raw loopback copy of the data, no protocol (run_floor)
        "ours_to_floor": round(ours_ms / floor_ms, 3) if ours_ms and floor_ms else None,
        "qemu_to_floor": round(qemu_ms / floor_ms, 3) if qemu_ms and floor_ms else None,
        "ours_gib_s": _gib_s(ours),
        "qemu_gib_s": _gib_s(qemu),
        "dest_rss_mib": rss,
        "dest_rss_limit_mib": rss_limit,
        "dest_rss_ok": rss is not None and rss <= rss_limit,
        "verified": all(r.get("verified", True) for r in ours + qemu)
        and any("verified" in r for r in ours),
        "failures": sum(r["who"] != "floor" for r in runs) - len(ours) - len(qemu),
        "profile": args.profile, "channels": args.channels, "compression": args.compression,
        "ram_bytes": args.ram, "data_bytes": args.data, "n_runs": args.runs,
        "qemu_accel": qemu[0].get("accel") if qemu else None,
        "cpus": os.cpu_count(),
        # median CPU seconds (user + sys) of each process over the migration
        "ours_cpu_s": cpu_medians(ours),
        "qemu_cpu_s": cpu_medians(qemu),
        "runs": runs,
    }
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    ok = bool(ours) and (not with_qemu or bool(qemu)) and report["failures"] == 0
    return 0 if ok and report["verified"] and report["dest_rss_ok"] else 1


def _print(r: dict[str, Any]) -> None:
    print(f"paused {r['ram_bytes'] / GiB:g} GiB machine, {r['data_bytes'] / GiB:g} GiB random, "
          f"multifd {r['channels']} ch {r['compression']}, loopback, median of "
          f"{r['n_runs']} (cpus: {r['cpus']})")
    print(f"  ours ({r['profile']}) -> ours : {r['ours_ms']} ms, {r['ours_gib_s']} GiB/s "
          f"page data")
    if r["qemu_ms"] is not None:
        print(f"  QEMU 7.2 -> QEMU 7.2 ({r['qemu_accel']}): {r['qemu_ms']} ms, "
              f"{r['qemu_gib_s']} GiB/s page data")
        print(f"  ratio ours/QEMU: {r['ratio']}  ({'faster' if r['ratio'] < 1 else 'slower'})"
              if r["ratio"] else "  ratio: n/a")
    else:
        print("  QEMU 7.2 not installed (or --no-qemu): no baseline")
    for who in ("ours", "qemu"):
        if (c := r[f"{who}_cpu_s"]) is not None:
            print(f"  {who} CPU seconds (user+sys): source {c['src']}, destination {c['dst']}")
    if r["floor_ms"] is not None:
        print(f"  machine floor (raw 2-connection loopback copy, no protocol): {r['floor_ms']} ms"
              f"; ours/floor {r['ours_to_floor']}, QEMU/floor {r['qemu_to_floor']}")
    print(f"  destination peak RSS: {r['dest_rss_mib']} MiB (limit {r['dest_rss_limit_mib']:g}"
          f" MiB: {'ok' if r['dest_rss_ok'] else 'EXCEEDED'})")
    print(f"  verified (sha256 of the 1 GiB at the destination): "
          f"{'yes' if r['verified'] else 'NO'}; failed runs: {r['failures']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs of each side (median)")
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--compression", choices=("none", "zlib", "zstd"), default="none")
    p.add_argument("--profile", choices=("qemu-7.2", "qemu-10"), default="qemu-7.2")
    p.add_argument("--ram", type=int, default=2 * GiB, help=argparse.SUPPRESS)
    p.add_argument("--data", type=int, default=GiB, help=argparse.SUPPRESS)
    p.add_argument("--warm-mib", type=int, default=2048,
                   help="touch and free this much memory right before each migration, "
                        "ours and QEMU's alike (0: cold; see benchlib.warm_memory)")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the machine's floor (raw loopback copy) after each of our runs")
    p.add_argument("--no-qemu", action="store_true", help="skip the QEMU 7.2 baseline")
    p.add_argument("--verify-all", action="store_true", help="sha256-check every run")
    p.add_argument("--tmpdir", default=None, help="where the blob goes (default: $TMPDIR)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--role", choices=("src", "dst", "floor-dst"), help=argparse.SUPPRESS)
    p.add_argument("--uri", help=argparse.SUPPRESS)
    p.add_argument("--blob", help=argparse.SUPPRESS)
    p.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "dst":
        return _destination(args)
    if args.role == "src":
        return _source(args)
    if args.role == "floor-dst":
        return _floor_dst(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
