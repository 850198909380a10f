"""Benchmark: real QEMU as a peer. QEMU->QEMU vs QEMU->ours (incoming) vs ours->QEMU (migrate).

The paused 2 GiB guest of shared/qemu72-peer.md §2 with 1 GiB of random data at 0x100000
(`-device loader`, `-S`), multifd 2 channels, compression none, max-bandwidth 1e12, over
127.0.0.1, for QEMU 7.2 (profile qemu-7.2) and, when `.cache/qemu10` holds it, QEMU 10.0
with its default machine type (profile qemu-10). Per version and run, interleaved:

* qemu_to_qemu: source QEMU -> destination QEMU (`-incoming defer`); time = the source's
  query-migrate total-time.
* qemu_to_ours: source QEMU -> `multifd incoming tcp:127.0.0.1:PORT --save IMAGE --json`;
  time = the source's total-time (same clock as above). The first run's IMAGE is kept.
* ours_to_qemu: `multifd migrate`'s engine (`migrate_to_qemu`, in this process, the image
  read once) -> destination QEMU; time = our `sent_ms` (connect to the last byte sent and
  the channels closed: where a QEMU source's total-time ends too). `loaded_ms` runs on
  until the destination closed the main channel (fully loaded).

* qemu_to_sink: source QEMU -> a child of this script that only reads every connection
  (MSG_WAITALL, 512 KiB at a time, into one reused buffer; no parsing, no guest memory):
  the fastest any destination could take the stream on this machine, for scale
  (`--no-sink` skips it).

The first run of each path checks the destination's RAM (pmemsave sha256 for QEMU; for
ours the replayed QEMU's RAM proves the image). Ratios: incoming_ratio = qemu_to_ours /
qemu_to_qemu, migrate_ratio = ours_to_qemu / qemu_to_qemu (goal: both <= 1.0).

    python bench/vs_qemu.py [--runs 3] [--channels 2] [--versions 7.2,10.0] [--no-sink] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import cpu_medians, cpu_since, make_blob, proc_cpu, warm_memory
from multifd.migration.profile import get_profile
from multifd.qemu.image import VmImage, read_image
from multifd.qemu.peer import migrate_to_qemu
from multifd.qemu.qemuproc import QEMU10, QEMU72, QemuProcess, available

MiB = 1 << 20
GiB = 1 << 30
BLOB_ADDR = 0x100000
QEMU_MAX_BANDWIDTH = 10**12
TIMEOUT_S = 120.0
PROFILE = {QEMU72: "qemu-7.2", QEMU10: "qemu-10"}


def _multifd_cli() -> list[str]:
    exe = shutil.which("multifd")
    return [exe] if exe else [sys.executable, "-m", "multifd.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    """A LISTEN socket on 127.0.0.1/0.0.0.0:port, from /proc/net/tcp (no probe connection:
    a 7.2-profile destination would take it as the main channel)."""
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[1].endswith(want) and cols[3] == "0A":
                        return True
        except OSError:
            continue
    return False


def _qemu(version: str, blob: Path | None, mem_mib: int, name: str) -> QemuProcess:
    extra = ["-device", f"loader,file={blob},addr={BLOB_ADDR:#x}"] if blob else []
    vm = QemuProcess(extra, version=version, name=name, memory_mib=mem_mib,
                     incoming=None if blob else "defer")
    return vm.start()


def _config(vm: QemuProcess, channels: int) -> None:
    vm.set_migration(multifd=True, channels=channels, compression="none",
                     max_bandwidth=QEMU_MAX_BANDWIDTH)


def qemu_to_qemu(version: str, args: argparse.Namespace, blob: Path, sha: str,
                 verify: bool) -> dict[str, Any]:
    src = dst = None
    try:
        src = _qemu(version, blob, args.mem_mib, "src")
        dst = _qemu(version, None, args.mem_mib, "dst")
        for vm in (dst, src):
            _config(vm, args.channels)
        uri = dst.migrate_incoming("tcp:127.0.0.1:0")
        warm_memory(args.warm_mib * MiB)
        cpu0 = proc_cpu(src.pid), proc_cpu(dst.pid)
        src.migrate(uri)
        q = src.wait_migration(TIMEOUT_S)
        dst.wait_migration(TIMEOUT_S)
        r: dict[str, Any] = {"ms": q.get("total-time"), "accel": src.accel,
                             "src_cpu_s": cpu_since(src.pid, cpu0[0]),
                             "dst_cpu_s": cpu_since(dst.pid, cpu0[1])}
        if verify:
            r["verified"] = dst.pmem_sha256(BLOB_ADDR, args.data) == sha
        return r
    finally:
        for vm in (src, dst):
            if vm is not None:
                vm.close()


def _qemu_source_into(version: str, args: argparse.Namespace, blob: Path, port: int,
                      dest: subprocess.Popen[Any], what: str) -> dict[str, Any]:
    """Once `dest` listens on `port`: a warmed-up QEMU source migrates into it; returns
    the source's final query-migrate (the source is closed) with the CPU seconds both
    processes used meanwhile (`src_cpu_s`, `dst_cpu_s`)."""
    deadline = time.monotonic() + 30
    while not _listening(port):
        if dest.poll() is not None or time.monotonic() > deadline:
            err = dest.stderr.read() if dest.stderr and dest.poll() is not None else ""
            raise RuntimeError(f"{what} did not listen {err}".strip())
        time.sleep(0.02)
    src = _qemu(version, blob, args.mem_mib, "src")
    try:
        _config(src, args.channels)
        warm_memory(args.warm_mib * MiB)
        cpu0 = proc_cpu(src.pid), proc_cpu(dest.pid)
        src.migrate(f"tcp:127.0.0.1:{port}")
        q = dict(src.wait_migration(TIMEOUT_S))
        q["src_cpu_s"] = cpu_since(src.pid, cpu0[0])
        q["dst_cpu_s"] = cpu_since(dest.pid, cpu0[1])
        return q
    finally:
        src.close()


def qemu_to_ours(version: str, args: argparse.Namespace, blob: Path, image: Path
                 ) -> dict[str, Any]:
    port = _free_port()
    cmd = [*_multifd_cli(), "incoming", f"tcp:127.0.0.1:{port}", "--profile", PROFILE[version],
           "--channels", str(args.channels), "--save", str(image), "--json",
           "--idle-timeout", str(int(TIMEOUT_S))]
    inc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        q = _qemu_source_into(version, args, blob, port, inc, "multifd incoming")
        out, err = inc.communicate(timeout=TIMEOUT_S)
        if inc.returncode != 0:
            raise RuntimeError(f"multifd incoming failed ({inc.returncode}): {err.strip()}")
        ours = json.loads(out.strip().splitlines()[-1])
        return {"ms": q.get("total-time"), "src_cpu_s": q["src_cpu_s"],
                "dst_cpu_s": q["dst_cpu_s"], "ours_time_ms": ours.get("time_ms"),
                "ours_total_ms_with_save": ours.get("total_ms"),
                "image_bytes": ours.get("image_bytes"), "pages": ours.get("pages")}
    finally:
        if inc.poll() is None:
            inc.kill()
            inc.wait(10)


def _sink(port: int) -> int:
    """Child: accept on 127.0.0.1:port and read every connection to EOF, discarding."""
    ls = socket.create_server(("127.0.0.1", port))

    def drain(c: socket.socket) -> None:
        buf = bytearray(512 * 1024)
        with c:
            while c.recv_into(buf, len(buf), socket.MSG_WAITALL):
                pass

    while True:  # the parent kills us once the source is done
        c, _ = ls.accept()
        threading.Thread(target=drain, args=(c,), daemon=True).start()


def qemu_to_sink(version: str, args: argparse.Namespace, blob: Path) -> dict[str, Any]:
    port = _free_port()
    sink = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--role", "sink",
                             "--port", str(port)])
    try:
        q = _qemu_source_into(version, args, blob, port, sink, "the sink")
        return {"ms": q.get("total-time"), "src_cpu_s": q["src_cpu_s"],
                "dst_cpu_s": q["dst_cpu_s"]}
    finally:
        sink.kill()
        sink.wait(10)


_IMAGES: dict[Path, VmImage] = {}


def ours_to_qemu(version: str, args: argparse.Namespace, image: Path, sha: str,
                 verify: bool) -> dict[str, Any]:
    """`multifd migrate`'s engine (migrate_to_qemu) in this process: the image is read
    once (reading 1 GiB of PAGE records takes seconds, long enough for the host to take
    the warmed memory back before a subprocess would start sending)."""
    img = _IMAGES.get(image)
    if img is None:
        img = _IMAGES[image] = read_image(image)
    dst = None
    try:
        dst = _qemu(version, None, args.mem_mib, "dst")
        _config(dst, args.channels)
        uri = dst.migrate_incoming("tcp:127.0.0.1:0")
        warm_memory(args.warm_mib * MiB)
        cpu0, dst_cpu0 = proc_cpu(os.getpid()), proc_cpu(dst.pid)
        st = migrate_to_qemu(img, uri, profile=get_profile(PROFILE[version]),
                             channels=args.channels, timeout=TIMEOUT_S)
        src_cpu = cpu_since(os.getpid(), cpu0)
        dst.wait_migration(TIMEOUT_S)
        r: dict[str, Any] = {"ms": round(st.sent_ms, 1) if st.sent_ms else None,
                             "loaded_ms": round(st.time_ms, 1), "dst_status": dst.status(),
                             "src_cpu_s": src_cpu, "dst_cpu_s": cpu_since(dst.pid, dst_cpu0)}
        if verify:
            r["verified"] = dst.pmem_sha256(BLOB_ADDR, args.data) == sha
        return r
    finally:
        if dst is not None:
            dst.close()


def _med(rs: list[dict[str, Any]]) -> float | None:
    xs = [r["ms"] for r in rs if r.get("ms") is not None and "error" not in r]
    return statistics.median(xs) if xs else None


def bench_version(version: str, args: argparse.Namespace, blob: Path, sha: str, tmp: Path
                  ) -> dict[str, Any]:
    image = tmp / f"image-{version}.bin"
    runs: dict[str, list[dict[str, Any]]] = {"qemu_to_qemu": [], "qemu_to_ours": [],
                                             "ours_to_qemu": [], "qemu_to_sink": []}
    for i in range(args.runs):
        order = ["qemu_to_qemu", "qemu_to_ours", "ours_to_qemu"]
        if i % 2:
            order = ["qemu_to_ours", "qemu_to_qemu", "ours_to_qemu"]
        if not args.no_sink:
            order.append("qemu_to_sink")
        for path in order:
            verify = i == 0
            try:
                if path == "qemu_to_sink":
                    r = qemu_to_sink(version, args, blob)
                elif path == "qemu_to_qemu":
                    r = qemu_to_qemu(version, args, blob, sha, verify)
                elif path == "qemu_to_ours":
                    tgt = image if i == 0 else tmp / f"image-{version}-scratch.bin"
                    r = qemu_to_ours(version, args, blob, tgt)
                    if i:
                        tgt.unlink(missing_ok=True)
                else:
                    if not image.exists():
                        raise RuntimeError("no image recorded (qemu_to_ours failed)")
                    r = ours_to_qemu(version, args, image, sha, verify)
            except Exception as exc:
                r = {"ms": None, "error": str(exc)[:2000]}
            r["run"] = i
            runs[path].append(r)
            if not args.json:
                print(f"  QEMU {version} run {i} {path:13}: {r.get('ms')} ms"
                      + (f"  verified={r['verified']}" if "verified" in r else "")
                      + (f"  ERROR {r['error'][:300]}" if "error" in r else ""),
                      file=sys.stderr)
    q2q, q2o, o2q, q2s = (_med(runs[k]) for k in ("qemu_to_qemu", "qemu_to_ours",
                                                  "ours_to_qemu", "qemu_to_sink"))
    cached = _IMAGES.pop(image, None)
    if cached is not None:
        cached.close()
    image.unlink(missing_ok=True)
    verified = [r["verified"] for rs in runs.values() for r in rs if "verified" in r]
    return {
        "version": version, "profile": PROFILE[version],
        "qemu_to_qemu_ms": q2q, "qemu_to_ours_ms": q2o, "ours_to_qemu_ms": o2q,
        "qemu_to_sink_ms": q2s,
        # median CPU seconds of each side while the source ran (the sink's too)
        "cpu_s": {k: cpu_medians(v) for k, v in runs.items()},
        "incoming_ratio": round(q2o / q2q, 3) if q2o and q2q else None,
        "migrate_ratio": round(o2q / q2q, 3) if o2q and q2q else None,
        "verified": bool(verified) and all(verified),
        "errors": sum("error" in r for rs in runs.values() for r in rs),
        "runs": runs,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--versions", default=None,
                   help="comma list of 7.2,10.0 (default: 7.2, plus 10.0 when unpacked)")
    p.add_argument("--warm-mib", type=int, default=2048,
                   help="touch and free this much memory right before each migration, "
                        "every path alike (0: cold; see benchlib.warm_memory)")
    p.add_argument("--ram", type=int, default=2 * GiB, help=argparse.SUPPRESS)
    p.add_argument("--data", type=int, default=GiB, help=argparse.SUPPRESS)
    p.add_argument("--tmpdir", default=None, help="blob and images (default: $TMPDIR)")
    p.add_argument("--no-sink", action="store_true", help="skip QEMU -> read-only sink")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--role", choices=("sink",), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "sink":
        return _sink(args.port)
    args.mem_mib = args.ram // MiB
    versions = args.versions.split(",") if args.versions else \
        [v for v in (QEMU72, QEMU10) if available(v)]
    versions = [v for v in versions if available(v)]
    if not versions:
        print("error: no QEMU installed (QEMU 7.2: apt-get install qemu-system-x86)",
              file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="multifd-vsqemu-", dir=args.tmpdir))
    try:
        blob = tmp / "blob1g_random.bin"
        sha = make_blob(blob, args.data)
        results = [bench_version(v, args, blob, sha, tmp) for v in versions]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    first = results[0]
    report: dict[str, Any] = {
        k: first[k] for k in ("qemu_to_qemu_ms", "qemu_to_ours_ms", "ours_to_qemu_ms",
                              "qemu_to_sink_ms", "incoming_ratio", "migrate_ratio",
                              "verified")}
    report.update(version=first["version"], channels=args.channels, compression="none",
                  ram_bytes=args.ram, data_bytes=args.data, n_runs=args.runs,
                  cpus=os.cpu_count(), by_version={r["version"]: r for r in results})
    if args.json:
        print(json.dumps(report))
    else:
        for r in results:
            print(f"QEMU {r['version']} ({r['profile']}), paused {args.ram / GiB:g} GiB guest, "
                  f"{args.data / GiB:g} GiB random, multifd {args.channels} ch none, median of "
                  f"{args.runs}:")
            print(f"  QEMU -> QEMU : {r['qemu_to_qemu_ms']} ms")
            print(f"  QEMU -> ours : {r['qemu_to_ours_ms']} ms   incoming_ratio "
                  f"{r['incoming_ratio']}")
            print(f"  ours -> QEMU : {r['ours_to_qemu_ms']} ms   migrate_ratio "
                  f"{r['migrate_ratio']}")
            if r["qemu_to_sink_ms"] is not None:
                print(f"  QEMU -> sink : {r['qemu_to_sink_ms']} ms   (a destination that "
                      "only reads)")
            for path, c in r["cpu_s"].items():
                if c is not None:
                    print(f"  CPU seconds {path:13}: source {c['src']}, destination {c['dst']}")
            print(f"  verified: {'yes' if r['verified'] else 'NO'}; errors: {r['errors']}")
    ok = all(r["errors"] == 0 and r["verified"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
