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

from multifd.commands.demo_procs import (
    demo_params,
    emit,
    read_events,
    source_state,
    start_child,
)
from multifd.commands.policy_options import add_policy_options
from multifd.commands.timeline_options import add_timeline_options, check_timeline_options

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
    p.add_argument("--mode", choices=("normal", "cpr-transfer"), default="normal",
                   help="QEMU's migration mode: cpr-transfer hands the memfd-backed RAM to "
                        "the destination over a unix: socket instead of copying it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--save-to", metavar="FILE", help="save the running demo machine to a "
                   "mapped-ram FILE (no destination process; see demo_file.py)")
    p.add_argument("--restore-from", metavar="FILE", help="restore a --save-to FILE, finish "
                   "the workload and verify the checksum")
    p.add_argument("--direct-io", action="store_true",
                   help="with --save-to/--restore-from: O_DIRECT channel fds")
    from multifd.transport.tls import add_tls_arguments

    add_tls_arguments(p)
    add_policy_options(p)
    add_timeline_options(p)
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
                                 device_state_via_multifd=args.device_state_via == "multifd",
                                 backing=_backing(args))
    machine.set_incoming()
    # The source process builds and fills its RAM after we listen (about 4 s per GiB on
    # a small machine): x-accept-timeout counts from when it could have connected.
    accept = float(params.get("x-accept-timeout")) + 5.0 * args.ram / (1 << 30)
    dest = MigrationDestination(machine, params=params, caps=caps,
                                profile=get_profile(args.profile), accept_timeout=accept)
    uri = dest.listen(_listen_uri(args))
    emit({"event": "listening", "uri": uri})
    from multifd.commands.demo_figures import DestinationRecorder

    recorder = DestinationRecorder(dest)
    status = dest.wait()
    result: dict[str, Any] = {"event": "result", "status": str(status), "error": dest.error,
                              "resume_wall": dest.resume_wall, "query": dest.query(),
                              **dest.device_state_stats(), **recorder.result()}
    if str(status) == "completed":
        DemoWorkload(machine).run_to_completion()
        result["checksum"] = machine.checksum()
        result["step"] = machine.device("cpu").step  # type: ignore[attr-defined]
    emit(result)
    machine.close()
    return 0 if str(status) == "completed" else 1


# -- child: source -------------------------------------------------------------------------
def _source(args: argparse.Namespace) -> int:
    from multifd.machine.demo import RAM_BLOCK, DemoWorkload, build_demo_machine
    from multifd.migration.profile import get_profile
    from multifd.migration.source import MigrationSource

    params, caps = demo_params(args)
    machine = build_demo_machine(args.ram, seed=args.seed, total_steps=args.steps,
                                 device_state_size=args.device_state,
                                 device_state_via_multifd=args.device_state_via == "multifd",
                                 backing=_backing(args))
    machine.start()
    workload = DemoWorkload(machine, dirty_rate_mib_s=args.dirty_rate)
    workload.run_in_thread()
    time.sleep(0.2)  # let the workload get going: this is a live migration
    src = MigrationSource(machine, params=params, caps=caps, profile=get_profile(args.profile))
    from multifd.commands.demo_figures import SourceRecorder

    recorder = SourceRecorder(src, workload)
    src.start(args.uri)
    throttle_max = 0
    while True:
        st = src.wait(0.1)
        q = src.query()
        recorder.sample(q)
        throttle_max = max(throttle_max, q.get("cpu-throttle-percentage") or 0)
        emit({"event": "progress", "query": q, "phase": src.phase,
              "dirty_rate_mib_s": args.dirty_rate, "step": machine.device("cpu").step})  # type: ignore[attr-defined]
        if src.status.is_final():
            break
    st = src.wait()  # the final status (it may have changed since the last wait)
    workload.stop(timeout=10)
    failed = {} if str(st) == "completed" else {  # the fields of a fault cell
        "time_to_fail_ms": round((src.t_end - src.t_start) * 1000, 1),
        **source_state(machine, workload.cpu.step)}
    emit({"event": "result", "status": str(st), "error": src.error, "query": src.query(),
          "pause_wall": src.pause_wall, "downtime_ms": src.downtime_ms, **failed,
          "cpu_throttle_max": throttle_max, "tracking": machine.block(RAM_BLOCK).tracking,
          "channels": src.channel_stats(), **src.device_state_stats(), **recorder.result()})
    machine.close()
    return 0 if str(st) == "completed" else 1


def _backing(args: argparse.Namespace) -> str:
    """cpr-transfer hands memfds over: the demo RAM is memfd-backed for it."""
    return "memfd" if getattr(args, "mode", "normal") == "cpr-transfer" else "anon"


def _listen_uri(args: argparse.Namespace) -> str:
    """127.0.0.1, or for cpr-transfer a unix socket (fds pass only there)."""
    if _backing(args) == "anon":
        return "tcp:127.0.0.1:0"
    import atexit
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="multifd-cpr-")
    atexit.register(shutil.rmtree, tmp, True)
    return f"unix:{tmp}/cpr.sock"


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
    if getattr(args, "save_to", None) or getattr(args, "restore_from", None):
        from multifd.commands.demo_file import run as run_file

        return run_file(args)
    if getattr(args, "inject_fault", None):
        from multifd.testing.demo_faults import run_fault_cell

        return run_fault_cell(args)
    return _parent(args)


def _parent(args: argparse.Namespace) -> int:
    from multifd.machine.demo import expected_checksum

    if not 1 <= args.channels <= 255:
        print("error: --channels must be 1..255", file=sys.stderr)
        return 1
    if (why := check_timeline_options(args)) is not None:
        print(f"error: {why}", file=sys.stderr)
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
    from multifd.commands.demo_figures import report_fields, write_outputs

    report.update(report_fields(s_res, d_res))
    if args.json:
        print(json.dumps(report, indent=None))
    else:
        _print_report(report)
    errors = write_outputs(args, s_res, d_res)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    if errors:
        return 1
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
        "mode": getattr(args, "mode", "normal"),
        "channels": args.channels,
        "compression": args.compression,
        "ram_size": args.ram,
        "tracking": s.get("tracking"),  # the source RAM's write tracking in force
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
        **_policy_report(args, s, downtime_ms),
    }


def _policy_report(args: argparse.Namespace, s: dict[str, Any],
                   downtime_ms: float | None) -> dict[str, Any]:
    """What the timeout policies did (migration/policy.py): the completion strategy that
    acted, the downtime against its limit, the highest throttle; and for a source that
    failed, the fault-cell fields (source running and intact, time to fail)."""
    out: dict[str, Any] = {
        "timeout_action": s["query"].get("x-timeout-action"),
        "downtime_limit_ms": args.downtime_limit,
        "downtime_over_limit": downtime_ms is not None and downtime_ms > args.downtime_limit,
        "cpu_throttle_max": s.get("cpu_throttle_max", 0),
    }
    if "checksum" in s:
        from multifd.testing.demo_faults import source_state_fields

        out["time_to_fail_ms"] = s.get("time_to_fail_ms")
        out.update(source_state_fields(args, s))
    return out


def _device_state_path(args: argparse.Namespace) -> dict[str, Any]:
    """The path device state took: the one asked for, unless the profile or compression
    forces the main stream (then the reason is reported)."""
    from multifd.migration.device_state import multifd_device_state_refusal
    from multifd.migration.profile import get_profile

    why = None
    if getattr(args, "mode", "normal") == "cpr-transfer":
        why = "mode cpr-transfer opens no multifd channels"
    elif args.device_state_via == "multifd":
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
        ("mode", r.get("mode", "normal")),
        ("RAM (write tracking)", f"{_human(r['ram_size'])} ({r.get('tracking')})"),
        ("total time", f"{r['total_time_ms']} ms"),
        ("downtime (workload pause to resume)", f"{r['downtime_ms']} ms"),
        ("expected downtime (at the pause)", f"{r.get('expected_downtime_ms')} ms"),
        ("dirty rate: workload / measured", f"{r.get('workload_dirty_rate_mib_s')} / "
                                            f"{r.get('measured_dirty_rate_mib_s')} MiB/s"),
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
    for side, figs in (r.get("channel_figures") or {}).items():
        for f in figs:
            waits = (f"{f['slot_waits']} slot waits" if "slot_waits" in f
                     else f"{f.get('sync_waits', 0)} SYNC waits")
            rows.insert(-1, (f"{side} channel {f['channel']}: busy / waits",
                             f"{f['busy_pct']}% / {waits}"))
    for c in r.get("channel_bytes", []):
        rows.insert(-1, (f"channel {c['channel']}: RAM / device state",
                         f"{_human(c['ram'])} / {_human(c['device_state'])}"))
    if r.get("timeout_action"):  # a timeout policy acted (x-timeout-strategy)
        over = " (above the limit)" if r.get("downtime_over_limit") else ""
        rows.insert(-1, ("timeout action / downtime limit",
                         f"{r['timeout_action']} / {r['downtime_limit_ms']} ms{over}"))
    if "source_running" in r:  # failed: the fault-cell fields
        intact = r["source_checksum_before"] == r["source_checksum_after"]
        rows.insert(-1, ("source after the failure",
                         f"{'running' if r['source_running'] else 'stopped'}, "
                         f"{'intact' if intact else 'CHANGED'}, failed after "
                         f"{r['time_to_fail_ms']} ms"))
    for k, v in rows:
        t.add_row(k, v)
    con.print(t)


class _Progress:
    """A live status line: phase, pass, done %, remaining, rate, dirty rate, ETA, expected
    downtime (never running backwards: demo_figures.ProgressLine)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self._console = Console(stderr=True)
        self._live = Live(console=self._console, refresh_per_second=10, transient=False)
        self._live.start()
        from multifd.commands.demo_figures import ProgressLine

        self._line = ProgressLine(_human)

    def update(self, ev: dict[str, Any]) -> None:
        from rich.text import Text

        if ev.get("event") != "progress":
            return
        self._live.update(Text(self._line.text(ev)))  # demo_figures.ProgressLine

    def stop(self) -> None:
        self._live.stop()


def main() -> int:
    p = argparse.ArgumentParser(prog="multifd demo")
    configure(p)
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
