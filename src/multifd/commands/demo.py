"""`multifd demo`: a real live migration between two local processes, with a report.

The parent starts a destination process (an empty demo machine listening on 127.0.0.1)
and a source process (the demo machine with its workload running and dirtying memory),
migrates live, lets the destination run the workload to its final step, and compares the
destination's checksum with the same computation run without migration.

Child processes talk to the parent in JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from multifd.commands.demo_procs import demo_params, emit, read_events, start_child

MiB = 1 << 20


def parse_size(text: str) -> int:
    """'1G', '512M', '4096' -> bytes (binary units, like QEMU's -m)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram", type=parse_size, default=1 << 30, help="guest RAM size (1G)")
    p.add_argument("--channels", type=int, default=2, help="multifd-channels (2)")
    p.add_argument("--compression", choices=("none", "zlib", "zstd"), default="none")
    p.add_argument("--profile", choices=("qemu-10", "qemu-7.2"), default="qemu-10")
    p.add_argument("--dirty-rate", type=float, default=64.0,
                   help="workload dirty rate in MiB/s while migrating (0 = flat out)")
    p.add_argument("--downtime-limit", type=int, default=300, help="downtime-limit, ms")
    p.add_argument("--max-bandwidth", type=int, default=0,
                   help="max-bandwidth in bytes/s, covering multifd too (0 = unlimited)")
    p.add_argument("--steps", type=int, default=20000,
                   help="workload steps in total (the destination runs the rest)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device-state", type=parse_size, default=0, metavar="SIZE",
                   help="add a device with SIZE of state, part of it changing (0 = none)")
    p.add_argument("--device-state-via", choices=("multifd", "main"), default="multifd",
                   help="device state over the multifd channels or the main stream")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    from multifd.transport.tls import add_tls_arguments

    add_tls_arguments(p)
    p.add_argument("--inject-fault", metavar="SPEC",
                   help="run one fault cell through a fault proxy, e.g. kill-destination@iterate,"
                        " reset-channel:1@switchover, stall-channel:0@iterate, close-main@setup;"
                        " then retry to a fresh destination (see multifd.testing.faults)")
    p.add_argument("--fault-phase", help=argparse.SUPPRESS)
    p.add_argument("--role", choices=("source", "destination"), help=argparse.SUPPRESS)
    p.add_argument("--uri", help=argparse.SUPPRESS)


# -- child: destination ------------------------------------------------------------------
def _destination(args: argparse.Namespace) -> int:
    from multifd.machine.demo import DemoWorkload, build_demo_machine
    from multifd.migration.destination import MigrationDestination
    from multifd.migration.profile import get_profile

    params, caps = demo_params(args)
    machine = build_demo_machine(args.ram, seed=args.seed, populate=False,
                                 device_state_size=args.device_state,
                                 device_state_via_multifd=args.device_state_via == "multifd")
    machine.set_incoming()
    dest = MigrationDestination(machine, params=params, caps=caps,
                                profile=get_profile(args.profile))
    uri = dest.listen("tcp:127.0.0.1:0")
    emit({"event": "listening", "uri": uri})
    status = dest.wait()
    result: dict[str, Any] = {"event": "result", "status": str(status), "error": dest.error,
                              "resume_wall": dest.resume_wall, "query": dest.query(),
                              **dest.device_state_stats()}
    if str(status) == "completed":
        DemoWorkload(machine).run_to_completion()
        result["checksum"] = machine.checksum()
        result["step"] = machine.device("cpu").step  # type: ignore[attr-defined]
    emit(result)
    machine.close()
    return 0 if str(status) == "completed" else 1


# -- child: source -------------------------------------------------------------------------
def _source(args: argparse.Namespace) -> int:
    from multifd.machine.demo import DemoWorkload, build_demo_machine
    from multifd.migration.profile import get_profile
    from multifd.migration.source import MigrationSource

    params, caps = demo_params(args)
    machine = build_demo_machine(args.ram, seed=args.seed, total_steps=args.steps,
                                 device_state_size=args.device_state,
                                 device_state_via_multifd=args.device_state_via == "multifd")
    machine.start()
    workload = DemoWorkload(machine, dirty_rate_mib_s=args.dirty_rate)
    workload.run_in_thread()
    time.sleep(0.2)  # let the workload get going: this is a live migration
    src = MigrationSource(machine, params=params, caps=caps, profile=get_profile(args.profile))
    src.start(args.uri)
    while True:
        st = src.wait(0.1)
        q = src.query()
        emit({"event": "progress", "query": q,
              "dirty_rate_mib_s": args.dirty_rate, "step": machine.device("cpu").step})  # type: ignore[attr-defined]
        if src.status.is_final():
            break
    workload.stop(timeout=10)
    emit({"event": "result", "status": str(st), "error": src.error, "query": src.query(),
          "pause_wall": src.pause_wall, "downtime_ms": src.downtime_ms,
          "channels": src.channel_stats(), **src.device_state_stats()})
    machine.close()
    return 0 if str(st) == "completed" else 1


# -- parent --------------------------------------------------------------------------------
def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def run(args: argparse.Namespace) -> int:
    if args.role == "destination":
        return _destination(args)
    if args.role == "source":
        if getattr(args, "fault_phase", None):
            from multifd.testing.demo_faults import faulted_source

            return faulted_source(args)
        return _source(args)
    if getattr(args, "inject_fault", None):
        from multifd.testing.demo_faults import run_fault_cell

        return run_fault_cell(args)
    return _parent(args)


def _parent(args: argparse.Namespace) -> int:
    from multifd.machine.demo import expected_checksum

    if not 1 <= args.channels <= 255:
        print("error: --channels must be 1..255", file=sys.stderr)
        return 1
    dst = start_child(args, "destination")
    dst_events: list[dict[str, Any]] = []
    listening = threading.Event()
    t_dst = threading.Thread(target=read_events, args=(
        dst, dst_events, lambda o: listening.set() if o.get("event") == "listening" else None),
        daemon=True)
    t_dst.start()
    if not listening.wait(60):
        dst.kill()
        print("error: the destination process did not start listening", file=sys.stderr)
        return 1
    uri = next(e["uri"] for e in dst_events if e.get("event") == "listening")
    t0 = time.monotonic()
    src = start_child(args, "source", uri)
    src_events: list[dict[str, Any]] = []
    progress = None if args.json else _Progress()
    read_events(src, src_events, progress.update if progress else None)
    src.wait()
    if progress:
        progress.stop()
    t_dst.join(300)
    dst.wait(60)
    wall_ms = (time.monotonic() - t0) * 1000
    s_res = next((e for e in src_events if e.get("event") == "result"), None)
    d_res = next((e for e in dst_events if e.get("event") == "result"), None)
    if s_res is None or d_res is None:
        print("error: a demo process died without a result", file=sys.stderr)
        return 1
    expected = expected_checksum(args.ram, args.seed, args.steps,
                                 device_state_size=args.device_state) \
        if d_res.get("checksum") else None
    report = _report(args, s_res, d_res, expected, wall_ms)
    if args.json:
        print(json.dumps(report, indent=None))
    else:
        _print_report(report)
    return 0 if report["status"] == "completed" and report["verified"] else 1


def _report(args: argparse.Namespace, s: dict[str, Any], d: dict[str, Any],
            expected: str | None, wall_ms: float) -> dict[str, Any]:
    q = s["query"]
    ram = q.get("ram", {})
    status = s["status"] if s["status"] != "completed" else d["status"]
    downtime_ms = None
    if s.get("pause_wall") and d.get("resume_wall"):
        downtime_ms = round((d["resume_wall"] - s["pause_wall"]) * 1000, 1)
    total_ms = q.get("total-time")
    return {
        "status": status,
        "error": _both_errors(s.get("error"), d.get("error")),
        "profile": args.profile,
        "channels": args.channels,
        "compression": args.compression,
        "ram_size": args.ram,
        "total_time_ms": total_ms,
        "downtime_ms": downtime_ms,
        "source_downtime_ms": round(s.get("downtime_ms") or 0, 1),
        "setup_time_ms": q.get("setup-time"),
        "throughput_mib_s": round(ram.get("transferred", 0) / MiB / (total_ms / 1000), 1)
        if total_ms else None,
        "ram": ram,
        "wire_bytes": q.get("wire-bytes", ram.get("transferred")),
        "channel_stats": s.get("channels", []),
        "device_state_size": args.device_state,
        "device_state_via": args.device_state_via,
        **_device_state_path(args),
        "device_state_bytes": s.get("device_state_bytes", 0),
        "device_state_multifd_bytes": s.get("device_state_multifd_bytes", 0),
        "device_state_main_bytes": s.get("device_state_main_bytes", 0),
        "device_state_buffers": s.get("device_state_buffers", 0),
        "switchover_ms": downtime_ms,  # source pause -> destination resume
        "channel_bytes": [
            {"channel": i, "ram": c.get("wire_bytes_ram", 0),
             "device_state": c.get("wire_bytes_device_state", 0)}
            for i, c in enumerate(s.get("channels", []))],
        "verified": expected is not None and d.get("checksum") == expected,
        "checksum_expected": expected,
        "checksum_destination": d.get("checksum"),
        "wall_ms": round(wall_ms, 1),
    }


def _device_state_path(args: argparse.Namespace) -> dict[str, Any]:
    """The path device state took: the one asked for, unless the profile or compression
    forces the main stream (then the reason is reported)."""
    from multifd.migration.device_state import multifd_device_state_refusal
    from multifd.migration.profile import get_profile

    why = None
    if args.device_state_via == "multifd":
        why = multifd_device_state_refusal(get_profile(args.profile), True, args.compression)
    return {"device_state_path": "main" if why or args.device_state_via == "main" else "multifd",
            "device_state_path_forced_by": why}


def _both_errors(src: str | None, dst: str | None) -> str | None:
    """The source's error, and the destination's when it says something else (each side
    sees the failure its own way: a TLS refusal is precise only on the destination)."""
    if src and dst and dst not in src:
        return f"{src}; destination: {dst}"
    return src or dst


def _print_report(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title="multifd demo: live migration report", show_header=False)
    ram = r["ram"]
    rows = [
        ("status", r["status"] + (f" ({r['error']})" if r.get("error") else "")),
        ("profile / channels / compression",
         f"{r['profile']} / {r['channels']} / {r['compression']}"),
        ("RAM", _human(r["ram_size"])),
        ("total time", f"{r['total_time_ms']} ms"),
        ("downtime (workload pause to resume)", f"{r['downtime_ms']} ms"),
        ("setup time", f"{r['setup_time_ms']} ms"),
        ("throughput", f"{r['throughput_mib_s']} MiB/s"),
        ("normal / zero pages", f"{ram.get('normal', 0)} / {ram.get('duplicate', 0)}"),
        ("dirty syncs", str(ram.get("dirty-sync-count", 0))),
        ("transferred / wire bytes", f"{_human(ram.get('transferred', 0))} / "
                                     f"{_human(r['wire_bytes'] or 0)}"),
        ("verified", "yes" if r["verified"] else "no"),
    ]
    if r.get("device_state_size"):
        rows[-1:-1] = [
            ("device state (path)", f"{_human(r['device_state_size'])} "
                                    f"({r['device_state_path']}"
                                    + (f": {r['device_state_path_forced_by']})"
                                       if r.get("device_state_path_forced_by") else ")")),
            ("device state sent: multifd / main stream",
             f"{_human(r['device_state_multifd_bytes'])} in {r['device_state_buffers']} "
             f"buffers / {_human(r['device_state_main_bytes'])}"),
            ("switchover (pause to resume)", f"{r['switchover_ms']} ms"),
        ]
    for c in r.get("channel_bytes", []):
        rows.insert(-1, (f"channel {c['channel']}: RAM / device state",
                         f"{_human(c['ram'])} / {_human(c['device_state'])}"))
    for k, v in rows:
        t.add_row(k, v)
    con.print(t)


class _Progress:
    """A live status line: phase, pass, remaining, throughput, dirty rate, expected downtime."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self._console = Console(stderr=True)
        self._live = Live(console=self._console, refresh_per_second=10, transient=False)
        self._live.start()

    def update(self, ev: dict[str, Any]) -> None:
        from rich.text import Text

        if ev.get("event") != "progress":
            return
        q = ev["query"]
        ram = q.get("ram", {})
        line = (
            f"[{q.get('status', '?'):>9}] pass {ram.get('dirty-sync-count', 0):>3}  "
            f"sent {_human(ram.get('transferred', 0)):>10}  "
            f"remaining {_human(ram.get('remaining', 0)):>10}  "
            f"{ram.get('mbps', 0):>8.0f} Mbit/s  "
            f"dirty {ev.get('dirty_rate_mib_s', 0):.0f} MiB/s  "
            f"expected downtime {q.get('expected-downtime', '-')} ms"
        )
        self._live.update(Text(line))

    def stop(self) -> None:
        self._live.stop()


def main() -> int:
    p = argparse.ArgumentParser(prog="multifd demo")
    configure(p)
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
