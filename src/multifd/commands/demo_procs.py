"""The child processes of `multifd demo`: their migration settings, how they are started
and the JSON-lines events they print.

Shared by the plain demo (`multifd.commands.demo`) and its fault cells
(`multifd.testing.demo_faults`), so that neither has to import the other for them. Only
the standard library is imported at module level: `multifd serve` imports the demo
command for `parse_size` and must stay quick to start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

__all__ = ["demo_params", "emit", "read_events", "source_state", "start_child"]


def demo_params(args: argparse.Namespace) -> Any:
    """The (MigrationParameters, MigrationCapabilities) a demo child migrates with."""
    from multifd.commands.policy_options import policy_settings
    from multifd.migration.params import MigrationCapabilities, MigrationParameters
    from multifd.transport.tls import tls_params

    params = MigrationParameters()
    params.set({
        "multifd-channels": args.channels,
        "multifd-compression": args.compression,
        "downtime-limit": args.downtime_limit,
        "max-bandwidth": args.max_bandwidth,
        "mode": getattr(args, "mode", "normal"),
        **tls_params(args),
        **policy_settings(args),
    })
    caps = MigrationCapabilities()
    caps.set([{"capability": "multifd", "state": True}, {"capability": "events", "state": True}])
    return params, caps


def source_state(machine: Any, step: int) -> dict[str, Any]:
    """A failed source's state, its workload stopped at `step`: still running? its
    checksum (the parent compares it with the computation run straight to `step`)."""
    return {"running": machine.is_running, "step": step, "checksum": machine.checksum()}


def emit(obj: dict[str, Any]) -> None:
    """Print one event line for the parent (a child's stdout is the parent's pipe)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def start_child(args: argparse.Namespace, role: str, uri: str | None = None,
                extra: list[str] | None = None, stdin: Any = None) -> subprocess.Popen[str]:
    """Start `multifd.commands.demo --role ROLE` with the parent's demo arguments."""
    cmd = [sys.executable, "-m", "multifd.commands.demo", "--role", role,
           "--ram", str(args.ram), "--channels", str(args.channels),
           "--compression", args.compression, "--profile", args.profile,
           "--dirty-rate", str(args.dirty_rate), "--downtime-limit", str(args.downtime_limit),
           "--max-bandwidth", str(args.max_bandwidth), "--steps", str(args.steps),
           "--seed", str(args.seed), "--device-state-via", args.device_state_via,
           "--mode", getattr(args, "mode", "normal")]
    if args.device_state:  # parse_size refuses 0 (the default: no device)
        cmd += ["--device-state", str(args.device_state)]
    if uri:
        cmd += ["--uri", uri]
    from multifd.commands.policy_options import policy_argv
    from multifd.transport.tls import tls_argv

    cmd += tls_argv(args)
    cmd += policy_argv(args)
    cmd += extra or []
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=stdin, text=True,
                            env=os.environ.copy())


def read_events(proc: subprocess.Popen[str], sink: list[dict[str, Any]],
                on_line: Any = None) -> None:
    """Append each JSON event `proc` prints to `sink` until it closes stdout (other lines
    are skipped); `on_line(event)` is called after each."""
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        sink.append(obj)
        if on_line is not None:
            on_line(obj)
