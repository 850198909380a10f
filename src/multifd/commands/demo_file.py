"""`multifd demo --save-to FILE` / `--restore-from FILE`: the demo machine through a
mapped-ram file (QEMU's `migrate file:` with mapped-ram), with a checksum check.

--save-to: the demo machine runs its workload (dirtying memory) while a MigrationSource
saves it to FILE with the mapped-ram capability (multifd on, --channels fds writing
pages at their fixed offsets); the report gives the time and the file's apparent and
allocated size (zero pages are holes).

--restore-from: an empty demo machine loads FILE (MigrationDestination, file: + mapped-ram,
--channels readers), runs the workload to its last step and compares the checksum with
the computation run without interruption. --ram/--seed/--steps/--device-state must be
those of the save (the steps reached travel in the file).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from multifd.commands.demo_procs import demo_params


def _params(args: argparse.Namespace) -> Any:
    params, caps = demo_params(args)
    caps.set([{"capability": "mapped-ram", "state": True}])
    if getattr(args, "direct_io", False):
        params.set({"direct-io": True})
    return params, caps


def _machine(args: argparse.Namespace, **kw: Any) -> Any:
    from multifd.machine.demo import build_demo_machine

    return build_demo_machine(args.ram, seed=args.seed, device_state_size=args.device_state,
                              device_state_via_multifd=args.device_state_via == "multifd", **kw)


def save(args: argparse.Namespace) -> dict[str, Any]:
    """Save the running demo machine to args.save_to; the report as a dict."""
    from multifd.machine.demo import DemoWorkload
    from multifd.migration.profile import get_profile
    from multifd.migration.source import MigrationSource

    params, caps = _params(args)
    machine = _machine(args, total_steps=args.steps)
    try:
        machine.start()
        work = DemoWorkload(machine, dirty_rate_mib_s=args.dirty_rate)
        work.run_in_thread()
        time.sleep(0.1)
        src = MigrationSource(machine, params=params, caps=caps,
                              profile=get_profile(args.profile))
        t0 = time.monotonic()
        src.start(f"file:{args.save_to}")
        status = str(src.wait())
        ms = (time.monotonic() - t0) * 1000
        work.stop(timeout=10)
        st = os.stat(args.save_to) if status == "completed" else None
        return {"mode": "save-to", "file": args.save_to, "status": status,
                "error": src.error, "time_ms": round(ms, 1), "channels": args.channels,
                "step": machine.device("cpu").step, "ram_size": args.ram,
                "apparent_bytes": st.st_size if st else None,
                "allocated_bytes": st.st_blocks * 512 if st else None}
    finally:
        machine.close()


def restore(args: argparse.Namespace) -> dict[str, Any]:
    """Load args.restore_from into an empty demo machine, finish the workload, verify."""
    from multifd.machine.demo import DemoWorkload, expected_checksum
    from multifd.migration.destination import MigrationDestination
    from multifd.migration.profile import get_profile

    params, caps = _params(args)
    machine = _machine(args, populate=False)
    try:
        machine.set_incoming()
        dest = MigrationDestination(machine, params=params, caps=caps,
                                    profile=get_profile(args.profile))
        t0 = time.monotonic()
        dest.listen(f"file:{args.restore_from}")
        status = str(dest.wait())
        ms = (time.monotonic() - t0) * 1000
        out: dict[str, Any] = {"mode": "restore-from", "file": args.restore_from,
                               "status": status, "error": dest.error,
                               "time_ms": round(ms, 1), "channels": args.channels,
                               "verified": False}
        if status == "completed":
            out["step_restored"] = machine.device("cpu").step
            if not machine.is_running:
                machine.resume()
            DemoWorkload(machine).run_to_completion()
            got = machine.checksum()
            want = expected_checksum(args.ram, args.seed, args.steps,
                                     device_state_size=args.device_state)
            out.update(checksum=got, expected=want, verified=got == want)
        return out
    finally:
        machine.close()


def run(args: argparse.Namespace) -> int:
    """--save-to or --restore-from; prints the report (JSON with --json)."""
    report = save(args) if args.save_to else restore(args)
    ok = report["status"] == "completed" and report.get("verified", True)
    if args.json:
        print(json.dumps(report))
    elif report["mode"] == "save-to":
        print(f"saved to {report['file']}: {report['status']} in {report['time_ms']:.0f} ms "
              f"at step {report['step']}, {report['channels']} channel(s); file "
              f"{report['apparent_bytes'] or 0:,} bytes apparent, "
              f"{report['allocated_bytes'] or 0:,} allocated"
              + (f"; error: {report['error']}" if report["error"] else ""))
    else:
        print(f"restored from {report['file']}: {report['status']} in "
              f"{report['time_ms']:.0f} ms; checksum after the workload finished: "
              f"{'verified' if report['verified'] else 'MISMATCH'}"
              + (f"; error: {report['error']}" if report["error"] else ""))
    return 0 if ok else 1
