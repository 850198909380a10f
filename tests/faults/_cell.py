"""One in-process fault cell: source -> FaultProxy -> destination, fault at a phase, retry.

Source state check: the workload keeps running during the migration; after the failure it
is stopped at step S and the source's checksum must equal the straight computation to S
(`straight_checksum`), i.e. the failed migration changed nothing. The retry migrates the
same source machine to a fresh destination (no proxy) and compares checksums.

With ``paused=True`` the source machine runs a few workload steps and is then paused
(QEMU's ``stop``) before the migration starts; it must stay paused through the failure.
The source's run-state events (STOP / RESUME) during the migration are recorded in
`CellResult.state_events` either way.

The fault is injected only once the proxy has forwarded every connection the source made
(main + each multifd channel): the phases start after the source's connections are up, and
so the cell never races the proxy's own accept loop (a connection still queued at the
proxy when a kill-destination resets "everything" would never reach the destination).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from multifd.machine.demo import DemoWorkload, build_demo_machine
from multifd.machine.machine import RunState
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.profile import get_profile
from multifd.migration.source import MigrationSource
from multifd.testing.faults import FaultProxy, parse_fault, phase_hook, straight_checksum

RAM = 32 << 20
DEVICE_STATE = 2 << 20  # a multifd device-state device, so the device-state phase exists
STEPS = 1_000_000  # never reached: the workload is stopped after the failure
SEED = 7
CHANNELS = 2
FORWARD_TIMEOUT_S = 5.0


def params(**extra: object) -> tuple[MigrationParameters, MigrationCapabilities]:
    p = MigrationParameters()
    # 64 MiB/s: the first pass takes ~0.5 s; a generous downtime limit converges at once
    # after it, so every phase is reached quickly even with the workload running.
    p.set({"multifd-channels": CHANNELS, "max-bandwidth": 64 << 20, "downtime-limit": 2000,
           **extra})
    c = MigrationCapabilities()
    c.set([{"capability": "multifd", "state": True}, {"capability": "events", "state": True}])
    return p, c


@dataclass
class CellResult:
    spec: str
    profile: str = ""
    status: str = ""
    error: str = ""
    dest_status: str = ""
    dest_error: str = ""
    dest_statuses: list[str] = field(default_factory=list)  # its MIGRATION events
    time_to_fail_ms: float = 0.0
    dest_time_to_fail_ms: float = 0.0
    fired: bool = False
    forwarded: bool = False  # every connection reached the destination before the fault
    source_running: bool = False
    source_state: str = ""  # the source machine's run state right after the failure
    state_events: list[str] = field(default_factory=list)  # STOP/RESUME during migration
    was_paused: bool = False
    step_before: int = 0  # workload step when the migration started
    checksum_after: str = ""
    checksum_straight: str = ""
    step: int = 0
    retry_status: str = ""
    retry_verified: bool = False
    notes: list[str] = field(default_factory=list)


def _wait_forwarded(proxy: FaultProxy, n: int, timeout: float) -> bool:
    """True once the proxy has connected `n` connections through to the destination."""
    deadline = time.monotonic() + timeout
    while len(proxy.conns) < n:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
    return True


def _wait_step(work: DemoWorkload, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while work.cpu.step < step:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the workload did not reach step {step} in {timeout:g} s")
        time.sleep(0.002)


def run_cell(spec: str, profile: str = "qemu-10", dirty_rate: float = 8.0, *,
             paused: bool = False) -> CellResult:
    fault = parse_fault(spec)
    res = CellResult(spec, profile)
    p, c = params()
    prof = get_profile(profile)
    dst_m = build_demo_machine(RAM, seed=SEED, populate=False, device_state_size=DEVICE_STATE)
    dst_m.set_incoming()
    dst = MigrationDestination(
        dst_m, params=p, caps=c, profile=prof,
        on_event=lambda _name, data: res.dest_statuses.append(str(data.get("status"))))
    proxy = FaultProxy.for_uri(dst.listen("tcp:127.0.0.1:0"))
    src_m = build_demo_machine(RAM, seed=SEED, total_steps=STEPS,
                               device_state_size=DEVICE_STATE)
    src_m.start()
    work = DemoWorkload(src_m, dirty_rate_mib_s=dirty_rate)
    work.run_in_thread()
    if paused:  # a machine that ran, then was stopped (QEMU's `stop`) before migrating
        _wait_step(work, 1, 10)
        src_m.pause(timeout=10)
    res.step_before = work.cpu.step
    src_m.on_state_change.append(lambda event, _state: res.state_events.append(event))
    src = MigrationSource(src_m, params=p, caps=c, profile=prof)
    t_fault: list[float] = []

    def act(f: object) -> None:
        res.forwarded = _wait_forwarded(proxy, 1 + CHANNELS, FORWARD_TIMEOUT_S)
        t_fault.append(time.monotonic())
        proxy.inject(fault)

    hook = phase_hook(fault, act)
    src.on_phase = hook
    dst_end: list[float] = []
    dst_done = threading.Thread(target=lambda: (dst.wait(30), dst_end.append(time.monotonic())),
                                daemon=True)
    dst_done.start()
    try:
        src.start(proxy.uri)
        res.status = str(src.wait(30))
        t_src_end = time.monotonic()
        dst_done.join(30)
        res.fired = bool(t_fault)
        res.error = src.error or ""
        res.dest_status = str(dst.status.status)
        res.dest_error = dst.error or ""
        if t_fault:
            res.time_to_fail_ms = round((t_src_end - t_fault[0]) * 1000, 1)
            if dst_end:
                res.dest_time_to_fail_ms = round((dst_end[0] - t_fault[0]) * 1000, 1)
        res.was_paused = src.t_pause > 0
        res.source_running = src_m.is_running
        res.source_state = src_m.state.value
        src_m.on_state_change.clear()
        work.stop(10)
        res.step = work.cpu.step
        res.checksum_after = src_m.checksum()
        res.checksum_straight = straight_checksum(RAM, SEED, STEPS, res.step,
                                                  device_state_size=DEVICE_STATE)
    finally:
        work.stop(10)
        proxy.close()
        dst.cancel()
        dst.wait(10)
        dst_m.close()
    # retry: the same source machine to a fresh destination, no proxy
    try:
        p2, c2 = params(**{"max-bandwidth": 0})
        dst2_m = build_demo_machine(RAM, seed=SEED, populate=False,
                                    device_state_size=DEVICE_STATE)
        dst2_m.set_incoming()
        dst2 = MigrationDestination(dst2_m, params=p2, caps=c2, profile=prof)
        src2 = MigrationSource(src_m, params=p2, caps=c2, profile=prof)
        src2.start(dst2.listen("tcp:127.0.0.1:0"))
        res.retry_status = str(src2.wait(30))
        dst2.wait(30)
        res.retry_verified = (str(dst2.status.status) == "completed"
                              and dst2_m.checksum() == src_m.checksum())
        if not res.retry_verified:
            res.notes.append(f"retry: {src2.error} / {dst2.error}")
        # a paused source's machine arrives paused: the destination must not run it
        if paused and dst2_m.state is RunState.RUNNING:
            res.notes.append("retry: the destination runs a machine that was paused")
            res.retry_verified = False
        dst2_m.close()
    finally:
        src_m.close()
    return res
