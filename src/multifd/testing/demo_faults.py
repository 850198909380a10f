"""`multifd demo --inject-fault SPEC`: one fault cell with real processes, then a retry.

Parent: starts the destination process, a `FaultProxy` in front of it and the source
process (with ``--fault-phase``). The source process prints ``{"event": "phase"}`` when
its migration thread reaches the fault's phase and waits (at most 10 s) for a line on
stdin; the parent injects the fault (proxy command, or SIGKILL of a process) and only then
answers, so the fault lands at that exact point.

Source state check: after the failure the source process stops its workload at step S
and reports its checksum (``source_checksum_after``); ``source_checksum_before`` is the
checksum the demo computation reaches at step S run straight, without any migration
(`straight_checksum`). Equal means the failed migration changed nothing. Then the same
source process migrates the same machine, workload running again, to a fresh destination
(no proxy), which runs to the last step and must match `expected_checksum`
(``retry_verified``). After ``kill-source`` the source machine is gone: the retry uses a
fresh source process, and the two source checksums are null.
"""

from __future__ import annotations

import argparse
import json
import select
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
from multifd.testing.faults import (
    FaultProxy,
    kill_process,
    parse_fault,
    straight_checksum,
)

ACK_TIMEOUT_S = 10.0


def _read_line(timeout: float) -> str:
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return sys.stdin.readline().strip() if ready else ""


# -- source child ------------------------------------------------------------------------
def faulted_source(args: argparse.Namespace) -> int:
    """The demo source, with a pause at the fault phase and a retry on command."""
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
    time.sleep(0.2)
    src = MigrationSource(machine, params=params, caps=caps, profile=get_profile(args.profile))
    t_fault: list[float] = []

    def on_phase(phase: str) -> None:
        if phase == args.fault_phase and not t_fault:
            emit({"event": "phase", "phase": phase})
            _read_line(ACK_TIMEOUT_S)  # the parent has injected the fault
            t_fault.append(time.monotonic())

    src.on_phase = on_phase
    src.start(args.uri)
    st = src.wait()
    t_end = time.monotonic()
    workload.stop(timeout=10)
    emit({"event": "result", "status": str(st), "error": src.error,
          "phase_reached": bool(t_fault),
          "time_to_fail_ms": round((t_end - t_fault[0]) * 1000, 1) if t_fault else None,
          **source_state(machine, workload.cpu.step)})
    if str(st) == "completed":
        machine.close()
        return 1
    line = _read_line(120)
    if not line.startswith("retry "):
        machine.close()
        return 1
    params.set({"max-bandwidth": 0})
    workload.run_in_thread()
    retry = MigrationSource(machine, params=params, caps=caps,
                            profile=get_profile(args.profile))
    retry.start(line.split(" ", 1)[1])
    st2 = retry.wait()
    workload.stop(timeout=10)
    emit({"event": "retry", "status": str(st2), "error": retry.error})
    machine.close()
    return 0 if str(st2) == "completed" else 1


# -- parent ------------------------------------------------------------------------------
def source_state_fields(args: argparse.Namespace, s_res: dict[str, Any] | None
                        ) -> dict[str, Any]:
    """A failed source's report fields (see the module docstring): still running, the
    step it stopped at, its checksum then and the straight run's to that step."""
    return {
        "source_running": bool(s_res and s_res.get("running")),
        "source_step": (s_res or {}).get("step"),
        "source_checksum_after": (s_res or {}).get("checksum"),
        "source_checksum_before": straight_checksum(
            args.ram, args.seed, args.steps, int(s_res["step"]),
            device_state_size=args.device_state) if s_res else None,
    }


class _Proc:
    """A child process and its JSON events, read on a thread."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.cv = threading.Condition()
        self.t_exit = 0.0

        def on_line(obj: dict[str, Any]) -> None:
            with self.cv:
                self.cv.notify_all()

        def reader() -> None:
            read_events(proc, self.events, on_line)
            self.t_exit = time.monotonic()
            with self.cv:
                self.cv.notify_all()

        self.thread = threading.Thread(target=reader, daemon=True)
        self.thread.start()

    def wait_event(self, name: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                ev = next((e for e in self.events if e.get("event") == name), None)
                if ev is not None or not self.thread.is_alive():
                    return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cv.wait(min(left, 0.5))

    def send(self, line: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass  # it died (kill-source)

    def finish(self, timeout: float = 60) -> None:
        try:
            self.proc.wait(timeout)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(10)


def _start_destination(args: argparse.Namespace) -> tuple[_Proc, str]:
    import subprocess

    dst = _Proc(start_child(args, "destination", stdin=subprocess.DEVNULL))
    ev = dst.wait_event("listening", 60)
    if ev is None:
        dst.proc.kill()
        raise RuntimeError("the destination process did not start listening")
    return dst, str(ev["uri"])


def run_fault_cell(args: argparse.Namespace) -> int:
    """Parent of ``multifd demo --inject-fault SPEC``: prints the cell's report."""
    import subprocess

    from multifd.machine.demo import expected_checksum

    try:
        fault = parse_fault(args.inject_fault)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if fault.phase == "device-state" and not (args.device_state and
                                              args.device_state_via == "multifd"):
        print("error: the device-state phase needs --device-state SIZE (via multifd)",
              file=sys.stderr)
        return 2
    dst, uri = _start_destination(args)
    proxy = FaultProxy.for_uri(uri)
    src = _Proc(start_child(args, "source", proxy.uri, extra=["--fault-phase", fault.phase],
                            stdin=subprocess.PIPE))
    report: dict[str, Any] = {"fault": fault.spec}
    t_fault = 0.0
    try:
        if src.wait_event("phase", 120) is not None:
            t_fault = time.monotonic()
            if fault.kind == "kill-destination":
                kill_process(dst.proc.pid)
                dst.finish(10)
                time.sleep(0.2)  # let the proxy pass the dead peer's close on
            elif fault.kind == "kill-source":
                kill_process(src.proc.pid)
            else:
                proxy.inject(fault)
            src.send("go")
        s_res = src.wait_event("result", 60)
        dst.finish(60)
        d_res = next((e for e in dst.events if e.get("event") == "result"), None)
        report.update({
            "phase_reached": bool(t_fault),
            "status": (s_res or {}).get("status") or (d_res or {}).get("status") or "failed",
            "error": (s_res or {}).get("error") or (d_res or {}).get("error"),
            "destination_status": (d_res or {}).get("status", "killed"),
            "destination_error": (d_res or {}).get("error"),
            "time_to_fail_ms": (s_res or {}).get("time_to_fail_ms"),
            "destination_time_to_fail_ms":
                round((dst.t_exit - t_fault) * 1000, 1) if t_fault and d_res else None,
            **source_state_fields(args, s_res),
        })
        if fault.kind == "kill-source":
            report["status"] = "failed" if d_res and d_res["status"] == "failed" else \
                report["status"]
            report["error"] = f"source process killed; destination: {report['destination_error']}"
            report["time_to_fail_ms"] = report["destination_time_to_fail_ms"]
        proxy.close()
        # the retry: a fresh destination, no proxy
        dst2, uri2 = _start_destination(args)
        if fault.kind == "kill-source" or s_res is None:
            src2 = _Proc(start_child(args, "source", uri2, stdin=subprocess.DEVNULL))
            r_ev = src2.wait_event("result", 300)
            src2.finish(60)
        else:
            src.send(f"retry {uri2}")
            r_ev = src.wait_event("retry", 300)
        dst2.finish(300)
        d2 = next((e for e in dst2.events if e.get("event") == "result"), None)
        expected = expected_checksum(args.ram, args.seed, args.steps,
                                     device_state_size=args.device_state)
        report["retry_status"] = (r_ev or {}).get("status", "failed")
        report["retry_verified"] = bool(d2 and d2.get("checksum") == expected)
    finally:
        proxy.close()
        for p in (src, dst):
            if p.proc.poll() is None:
                p.proc.kill()
            p.finish(10)
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:>28}: {v}")
    ok = (report["status"] == "failed" and report["retry_verified"]
          and (report["time_to_fail_ms"] or 1e9) < 10_000)
    return 0 if ok else 1
