"""`multifd serve`: hold the demo machine and expose it on a QMP control socket.

As a source, the machine starts running the `multifd demo` workload (unless ``-S``). With
``--incoming defer`` it is an empty machine waiting for ``migrate-incoming``; once the
migration completes it resumes (unless ``-S`` or ``stop`` turned autostart off, as in QEMU)
and the workload carries on from the step it had reached on the source. So a client can
compare checksums exactly: with autostart off the destination stays paused after the
migration, holding the same state as the (postmigrate) source.

Prints one JSON line ``{"qmp": [addresses], "pid": N}`` on stdout once listening; exits
on ``quit`` (or SIGTERM/SIGINT). Serve-only command: ``x-query-workload`` →
``{"step", "total-steps", "running"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

from multifd.commands.demo import parse_size
from multifd.machine.machine import Machine

FOREVER_STEPS = 1 << 62


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qmp", action="append", required=True, metavar="unix:PATH|tcp:HOST:PORT",
                   help="QMP listening address (repeatable)")
    p.add_argument("--machine", choices=("demo",), default="demo", help="machine to hold")
    p.add_argument("--ram", type=parse_size, default=1 << 30, help="guest RAM size (1G)")
    p.add_argument("--incoming", metavar="defer",
                   help="be a migration destination; only 'defer' (use migrate-incoming)")
    p.add_argument("--profile", choices=("qemu-10", "qemu-7.2"), default="qemu-10")
    p.add_argument("--dirty-rate", type=float, default=64.0,
                   help="workload dirty rate in MiB/s (0 = flat out)")
    p.add_argument("--steps", type=int, default=FOREVER_STEPS,
                   help="workload steps in total (default: run until quit)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("-S", dest="paused", action="store_true",
                   help="do not start the machine; a destination stays paused after "
                        "migrating (QEMU's -S)")
    from multifd.transport.tls import add_tls_arguments

    add_tls_arguments(p)  # initial tls-* migration parameters (QMP can change them)


def _initial_params(args: argparse.Namespace) -> Any:
    """Migration parameters with the command line's tls-* values (None: QMP defaults)."""
    from multifd.migration.params import MigrationParameters
    from multifd.transport.tls import tls_params

    tls = tls_params(args)
    if not tls["tls-creds"]:
        return None
    params = MigrationParameters()
    params.set(tls)
    return params


class _Workload:
    """Runs the demo workload whenever the machine runs (started on RESUME)."""

    def __init__(self, machine: Machine, dirty_rate: float, total_steps: int | None) -> None:
        from multifd.machine.demo import DemoWorkload

        self.machine = machine
        self.dirty_rate = dirty_rate
        self._lock = threading.Lock()
        self.workload: DemoWorkload | None = None
        if total_steps is not None:  # a destination gets its parameters by migration
            self.workload = DemoWorkload(machine, dirty_rate_mib_s=dirty_rate,
                                         total_steps=total_steps)

    def on_state_change(self, event: str, _state: Any) -> None:
        from multifd.machine.demo import DemoWorkload

        if event != "RESUME":
            return
        with self._lock:
            if self.workload is None:
                self.workload = DemoWorkload(self.machine, dirty_rate_mib_s=self.dirty_rate)
            if not self.workload.running and not self.workload.done:
                self.workload.run_in_thread()

    def info(self, _args: dict[str, Any]) -> dict[str, Any]:
        cpu: Any = self.machine.device("cpu")
        w = self.workload
        return {"step": int(cpu.step), "total-steps": int(cpu.total_steps),
                "running": bool(w is not None and w.running and self.machine.is_running)}

    def stop(self) -> None:
        with self._lock:
            w = self.workload
        if w is not None:
            try:
                w.stop(timeout=10)
            except Exception as exc:
                print(f"warning: workload: {exc}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from multifd.machine.demo import build_demo_machine
    from multifd.qmp.commands import serve_qmp

    incoming = args.incoming is not None
    if incoming and args.incoming != "defer":
        print("error: only --incoming defer is supported (then use migrate-incoming)",
              file=sys.stderr)
        return 1
    if args.steps < 0:
        print("error: --steps must be >= 0", file=sys.stderr)
        return 1
    machine = build_demo_machine(args.ram, seed=args.seed, total_steps=args.steps,
                                 populate=not incoming)
    if incoming:
        machine.set_incoming()
    workload = _Workload(machine, args.dirty_rate, None if incoming else args.steps)
    machine.on_state_change.append(workload.on_state_change)
    server = None
    try:
        server = serve_qmp(machine, args.qmp, incoming_defer=incoming,
                           autostart=not args.paused, profile=args.profile,
                           fresh_ram=incoming, params=_initial_params(args))
        server.register("x-query-workload", workload.info)
        quit_event = server.quit_requested

        def on_signal(_sig: int, _frame: FrameType | None) -> None:
            quit_event.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        if not incoming and not args.paused:
            machine.start()
        sys.stdout.write(json.dumps({"qmp": server.addresses, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        while not quit_event.wait(0.5):
            pass
    finally:
        if server is not None:
            server.close()
        workload.stop()
        machine.close()
    return 0
