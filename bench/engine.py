"""Benchmark: our engine ours->ours against QEMU 7.2 -> 7.2 and QEMU 10.0 -> 10.0, same data.

A paused machine with 2 GiB of RAM holding 1 GiB of random data at 0x100000 (the rest zero)
is migrated over 127.0.0.1 with multifd, max-bandwidth unlimited (ours: 0; QEMU: 1e12),
from a source process to a destination process, for each cell: a compression method of
`--compression` (comma list: none, zlib, zstd) at `--channels` channels, or with
`--scaling` at 1, 2, 4 and 8 channels each:

* ours: two child processes of this script (`--role src` / `--role dst`), a `Machine` with
  one 2 GiB block "pc.ram", `MigrationSource` -> `MigrationDestination` (profile qemu-7.2 by
  default: zero pages as ZERO records on the main stream, like QEMU 7.2).
* QEMU, each version of `--versions` (default 7.2, plus 10.0 when `.cache/qemu10` holds
  it): the command lines and QMP sequence of shared/qemu72-peer.md §2 (`-device loader`
  for the blob, `-S`, `-incoming defer` on the destination).

Runs are interleaved: round after round, every cell, each with its participants in a
rotating order (ours, 7.2, 10.0 / 7.2, 10.0, ours / ...), so noise on this 2-core machine
hits all. Every figure is the median of the rounds with its min-max; `ratio` is ours over
the FASTER QEMU's median (`ratio_qemu-<v>` against each). After each of our runs of a
`none` cell, the machine's floor: the same bytes over the same number of loopback
connections into fresh memory of another process, with no protocol at all (`floor_ms`;
`--no-floor` skips it). Right before every migration the parent touches and frees
--warm-mib of memory (benchlib.warm_memory).
Time = the source's query-migrate total-time; page-data GiB/s = ram.normal-bytes /
total-time. The destination's RAM is checked against the blob's sha256 on the first run of
each (our destination hashes its block; QEMU: pmemsave). Our destination's peak RSS (VmHWM)
must stay within RAM size + 64 MiB.

    python bench/engine.py [--runs 5] [--compression none,zlib,zstd] [--channels 2 |
                           --scaling] [--versions 7.2,10.0] [--profile qemu-7.2]
                           [--no-qemu] [--no-floor] [--warm-mib 2048] [--verify-all]
                           [--json | --markdown] [--readme bench/README.md]

`--json` prints one object: `cells` {compression: cell} (with `--scaling`: `scaling`
{compression: {channels: cell}}); a cell has one key per figure, each figure
{"median", "min", "max"}: `ours_ms`, `qemu-7.2_ms`, `qemu-10.0_ms`, `floor_ms` (none),
`*_gib_s`, `*_cpu_s` {"src", "dst"}, plus `ratio`, `faster_qemu`, `command` and the runs.
`--markdown` prints the table and rewrites its section of `--readme` (`--json` with an
explicit `--readme` writes it too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import cpu_since, cpu_spread, make_blob, proc_cpu, spread, update_section, warm_memory

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

class Cell:
    """One table row: a compression method at a channel count, and its runs."""

    def __init__(self, compression: str, channels: int) -> None:
        self.compression = compression
        self.channels = channels
        self.runs: list[dict[str, Any]] = []


def _spawn(args: argparse.Namespace, cell: Cell, role: str,
           extra: list[str]) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", role,
           "--ram", str(args.ram), "--data", str(args.data), "--channels", str(cell.channels),
           "--compression", cell.compression, "--profile", args.profile, *extra]
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


def run_ours(args: argparse.Namespace, cell: Cell, blob: Path, blob_sha: str,
             verify: bool) -> dict[str, Any]:
    dst = _spawn(args, cell, "dst", ["--verify"] if verify else [])
    src: subprocess.Popen[str] | None = None
    try:
        uri = _read_result(dst, "listening", 60)["uri"]
        src = _spawn(args, cell, "src", ["--uri", uri, "--blob", str(blob)])
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


# -- parent: one run of QEMU -> QEMU -------------------------------------------------------

def run_qemu(args: argparse.Namespace, cell: Cell, version: str, blob: Path, blob_sha: str,
             verify: bool) -> dict[str, Any]:
    from multifd.qemu.qemuproc import QemuProcess

    mem_mib = args.ram // MiB
    src = QemuProcess(["-device", f"loader,file={blob},addr={BLOB_ADDR:#x}"],
                      version=version, name="src", memory_mib=mem_mib)
    dst = QemuProcess(version=version, name="dst", memory_mib=mem_mib, incoming="defer")
    try:
        src.start()
        dst.start()
        for vm in (dst, src):
            vm.set_migration(multifd=True, channels=cell.channels,
                             compression=cell.compression, max_bandwidth=QEMU_MAX_BANDWIDTH)
        uri = dst.migrate_incoming("tcp:127.0.0.1:0")
        warm_memory(args.warm_mib * MiB)
        cpu0 = proc_cpu(src.pid), proc_cpu(dst.pid)
        src.migrate(uri)
        q = src.wait_migration(MIGRATION_TIMEOUT_S)
        dst.wait_migration(MIGRATION_TIMEOUT_S)
        ram = q.get("ram", {})
        run: dict[str, Any] = {
            "who": f"qemu-{version}", "status": "completed", "total_ms": q.get("total-time"),
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


def run_floor(args: argparse.Namespace, cell: Cell, blob: Path) -> dict[str, Any]:
    """The machine's floor for this transfer: the blob's bytes over `channels` loopback TCP
    connections, 512 KiB sendmsg calls from Python threads, into a fresh THP mapping in
    another process: the copies and page faults any migration pays, without a protocol."""
    import socket

    dst = _spawn(args, cell, "floor-dst", [])
    try:
        port = int(_read_result(dst, "listening", 60)["uri"])
        with open(blob, "rb") as f:
            data = memoryview(f.read())
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(cell.channels)]
        share = args.data // cell.channels
        warm_memory(args.warm_mib * MiB)
        t0 = time.monotonic()

        def tx(k: int, s: socket.socket) -> None:
            for off in range(k * share, (k + 1) * share, FLOOR_CHUNK):
                s.sendall(data[off : min(off + FLOOR_CHUNK, (k + 1) * share)])

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


# -- parent: the interleaved rounds and the report -----------------------------------------

SCALING_CHANNELS = (1, 2, 4, 8)


def _one(args: argparse.Namespace, cell: Cell, who: str, blob: Path, sha: str,
         verify: bool) -> dict[str, Any]:
    """One run of `who` ("ours", "qemu-<version>" or "floor"), failures as a failed run."""
    try:
        if who == "ours":
            return run_ours(args, cell, blob, sha, verify)
        if who == "floor":
            return run_floor(args, cell, blob)
        return run_qemu(args, cell, who.removeprefix("qemu-"), blob, sha, verify)
    except Exception as exc:
        return {"who": who, "status": "failed", "error": str(exc)}


def _command(args: argparse.Namespace, cell: Cell, versions: list[str]) -> str:
    """The command line that reproduces `cell`'s row alone."""
    cmd = ["python bench/engine.py", f"--runs {args.runs}", f"--compression {cell.compression}",
           f"--channels {cell.channels}"]
    cmd.append(f"--versions {','.join(versions)}" if versions else "--no-qemu")
    if args.profile != "qemu-7.2":
        cmd.append(f"--profile {args.profile}")
    if args.ram != 2 * GiB or args.data != GiB:
        cmd.append(f"--ram {args.ram} --data {args.data}")
    if args.warm_mib != 2048:
        cmd.append(f"--warm-mib {args.warm_mib}")
    return " ".join(cmd)


def _gib_s(r: dict[str, Any]) -> float | None:
    if r.get("total_ms") and r.get("normal_bytes"):
        return float(r["normal_bytes"] / GiB / (r["total_ms"] / 1000))
    return None


def summarize(args: argparse.Namespace, cell: Cell, versions: list[str]) -> dict[str, Any]:
    """The cell's figures, one key each, every figure {median, min, max} over the rounds."""
    qemus = [f"qemu-{v}" for v in versions]
    done = {who: [r for r in cell.runs if r["who"] == who and r["status"] == "completed"]
            for who in ("ours", *qemus, "floor")}
    out: dict[str, Any] = {"compression": cell.compression, "channels": cell.channels,
                           "command": _command(args, cell, versions)}
    for who in ("ours", *qemus):
        rs = done[who]
        out[f"{who}_ms"] = spread([r["total_ms"] for r in rs if r.get("total_ms")])
        out[f"{who}_gib_s"] = spread([g for r in rs if (g := _gib_s(r)) is not None])
        out[f"{who}_cpu_s"] = cpu_spread(rs)
    ours = out["ours_ms"]["median"] if out["ours_ms"] else None
    timed = {q: out[f"{q}_ms"]["median"] for q in qemus if out[f"{q}_ms"]}
    faster = min(timed, key=timed.__getitem__) if timed else None
    out["faster_qemu"] = faster
    out["ratio"] = round(ours / timed[faster], 3) if ours and faster else None
    for q in qemus:
        out[f"ratio_{q}"] = round(ours / timed[q], 3) if ours and q in timed else None
    if cell.compression == "none" and not args.no_floor:
        floor = spread([r["total_ms"] for r in done["floor"]])
        out["floor_ms"] = floor
        out["ours_to_floor"] = round(ours / floor["median"], 3) if ours and floor else None
        out["faster_qemu_to_floor"] = (round(timed[faster] / floor["median"], 3)
                                       if faster and floor else None)
    rss = max((r["dest_rss_mib"] for r in done["ours"]), default=None)
    out["dest_rss_mib"] = rss
    out["dest_rss_ok"] = rss is not None and rss <= args.ram / MiB + 64
    migrations = [r for r in cell.runs if r["who"] != "floor"]
    out["verified"] = (all(r.get("verified", True) for r in migrations)
                       and any("verified" in r for r in done["ours"]))
    out["failures"] = sum(r["status"] != "completed" for r in cell.runs)
    out["runs"] = cell.runs
    return out


def _fig(f: dict[str, float] | None, nd: int = 0) -> str:
    if not f:
        return "-"
    return f"{f['median']:.{nd}f} ({f['min']:.{nd}f}-{f['max']:.{nd}f})"


def _cpu_fig(c: dict[str, Any] | None) -> str:
    return "-" if not c else f"{c['src']['median']:.2f} + {c['dst']['median']:.2f}"


def table(report: dict[str, Any]) -> str:
    """The markdown table: one row per cell, each figure median (min-max), and its command."""
    qemus = [f"qemu-{v}" for v in report["versions"]]
    head = ["compression", "channels", "ours ms", *[f"QEMU {q[5:]} ms" for q in qemus],
            "ratio vs faster QEMU", "floor ms", "CPU s ours src + dst",
            "CPU s faster QEMU src + dst", "command"]
    rows = []
    for c in report["cell_list"]:
        fq = c["faster_qemu"]
        rows.append([
            c["compression"], str(c["channels"]), _fig(c["ours_ms"]),
            *[_fig(c[f"{q}_ms"]) for q in qemus],
            f"{c['ratio']:.2f} ({fq})" if c["ratio"] else "-",
            _fig(c.get("floor_ms")), _cpu_fig(c["ours_cpu_s"]),
            _cpu_fig(c[f"{fq}_cpu_s"]) if fq else "-", f"`{c['command']}`",
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    foot = (f"Paused {report['ram_bytes'] / GiB:g} GiB machine, {report['data_bytes'] / GiB:g} "
            f"GiB random, loopback, ours with profile {report['profile']}; median (min-max) "
            f"of {report['n_runs']} interleaved runs; {report['cpus']} CPUs, QEMU accel "
            f"{report['qemu_accel']}; measured {report['date']}.")
    return "\n".join(lines) + f"\n\n{foot}"


def parent(args: argparse.Namespace) -> int:
    from multifd.qemu.qemuproc import QEMU10, QEMU72, available

    if args.no_qemu:
        versions: list[str] = []
    elif args.versions:
        versions = args.versions.split(",")
        missing = [v for v in versions if not available(v)]
        if missing:
            print(f"QEMU {', '.join(missing)} not available", file=sys.stderr)
            return 2
    else:
        versions = [v for v in (QEMU72, QEMU10) if available(v)]
    methods = args.compression.split(",")
    channels = SCALING_CHANNELS if args.scaling else (args.channels,)
    cells = [Cell(m, ch) for m in methods for ch in channels]
    whos = ["ours", *[f"qemu-{v}" for v in versions]]
    tmp = Path(tempfile.mkdtemp(prefix="multifd-bench-", dir=args.tmpdir))
    try:
        blob = tmp / "blob_random.bin"
        if not args.json:
            print(f"generating {args.data / GiB:g} GiB of random data in {blob} ...",
                  file=sys.stderr)
        blob_sha = make_blob(blob, args.data)
        for i in range(args.runs):
            order = whos[i % len(whos):] + whos[: i % len(whos)]
            for cell in cells:
                for who in order:
                    r = _one(args, cell, who, blob, blob_sha, args.verify_all or i == 0)
                    r["run"] = i
                    cell.runs.append(r)
                    _progress(args, cell, r)
                    if who == "ours" and cell.compression == "none" and not args.no_floor:
                        f = _one(args, cell, "floor", blob, blob_sha, False)
                        f["run"] = i
                        cell.runs.append(f)
                        _progress(args, cell, f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summaries = [summarize(args, c, versions) for c in cells]
    accel = next((r.get("accel") for c in cells for r in c.runs if r.get("accel")), None)
    report: dict[str, Any] = {
        "versions": versions, "profile": args.profile, "ram_bytes": args.ram,
        "data_bytes": args.data, "n_runs": args.runs, "warm_mib": args.warm_mib,
        "qemu_accel": accel, "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dest_rss_limit_mib": args.ram / MiB + 64,
    }
    if args.scaling:
        report["scaling"] = {m: {str(s["channels"]): s for s in summaries
                                 if s["compression"] == m} for m in methods}
    else:
        report["cells"] = {s["compression"]: s for s in summaries}
    ok = all(s["failures"] == 0 and s["verified"] and s["dest_rss_ok"] for s in summaries)
    report["ok"] = ok
    text = table({**report, "cell_list": summaries})
    if args.json:
        print(json.dumps(report))
    else:
        print(text)
        if not ok:
            print("FAILED: see the runs (--json) for failures, unverified RAM or RSS over "
                  f"{report['dest_rss_limit_mib']:g} MiB", file=sys.stderr)
    readme = args.readme or (Path(__file__).resolve().parent / "README.md"
                             if args.markdown else None)
    if readme:
        update_section(Path(readme), "engine-scaling" if args.scaling else "engine", text)
    return 0 if ok else 1


def _progress(args: argparse.Namespace, cell: Cell, r: dict[str, Any]) -> None:
    if args.json:
        return
    print(f"  run {r['run']} {cell.compression}/{cell.channels}ch {r['who']:9}: "
          f"{r.get('total_ms')} ms  {r['status']}"
          + (f"  verified={r['verified']}" if "verified" in r else "")
          + (f"  dest RSS {r['dest_rss_mib']} MiB" if "dest_rss_mib" in r else "")
          + (f"  ({r['error']})" if r.get("error") else ""), file=sys.stderr)


def _compressions(text: str) -> str:
    for m in text.split(","):
        if m not in ("none", "zlib", "zstd"):
            raise argparse.ArgumentTypeError(f"unknown compression {m!r} (none, zlib, zstd)")
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="interleaved rounds (median, min-max)")
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--scaling", action="store_true",
                   help=f"channels {', '.join(map(str, SCALING_CHANNELS))}: the scaling table")
    p.add_argument("--compression", type=_compressions, default="none",
                   help="comma list of none, zlib, zstd: one cell (table row) each")
    p.add_argument("--versions", default=None,
                   help="comma list of QEMU versions, 7.2,10.0 (default: 7.2, plus 10.0 "
                        "when unpacked)")
    p.add_argument("--profile", choices=("qemu-7.2", "qemu-10"), default="qemu-7.2")
    p.add_argument("--ram", type=int, default=2 * GiB, help=argparse.SUPPRESS)
    p.add_argument("--data", type=int, default=GiB, help=argparse.SUPPRESS)
    p.add_argument("--warm-mib", type=int, default=2048,
                   help="touch and free this much memory right before each migration, "
                        "ours and QEMU's alike (0: cold; see benchlib.warm_memory)")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the machine's floor (raw loopback copy) after each of our runs")
    p.add_argument("--no-qemu", action="store_true", help="skip the QEMU baselines")
    p.add_argument("--verify-all", action="store_true", help="sha256-check every run")
    p.add_argument("--tmpdir", default=None, help="where the blob goes (default: $TMPDIR)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--markdown", action="store_true",
                     help="print the markdown table and rewrite its section of --readme")
    p.add_argument("--readme", default=None,
                   help="markdown file whose engine section is rewritten (default with "
                        "--markdown: bench/README.md)")
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
    if args.runs < 1:
        p.error("--runs must be >= 1")
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
