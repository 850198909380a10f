"""The fault matrix: every fault at every phase ends as `failed` within 10 s, cleanly.

In-process cells (source -> FaultProxy -> destination in this process): reset-channel:N,
stall-channel:N, close-main and a simulated dead peer (kill-destination: every connection
reset) at setup, iterate, switchover, device-state and completion, on both profiles:
``qemu-10`` (multifd sync per scan round, peeked channels, device-state packets) and
``qemu-7.2`` (a SYNC on every channel before every RAM EOS, channels taken in connection
order; no multifd device state, so no device-state cells). Process-level cells (real
SIGKILL of the destination or source process) run through `multifd demo`.
For each cell: source and destination failed within 10 s of the fault, the errors name
the cause (`CAUSE`: the channel number for a channel fault, the main channel for
close-main, a reset by the peer for a dead destination), the source machine is running
again (it was running; STOP + RESUME when the fault came after the switchover paused it,
neither before) with its state equal to the straight computation to the step it stopped
at, no thread or fd left behind, and a retry to a fresh destination succeeds and verifies.
A source paused before the migration stays paused through the failure (never resumed,
not even for a moment) and its retry delivers a paused machine.
The fault is injected once the proxy has forwarded every connection (tests/faults/_cell.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import pytest

from multifd.migration.profile import get_profile
from multifd.testing.faults import PHASES, open_fds, parse_fault
from tests.faults._cell import CellResult, run_cell

PROFILES = ("qemu-10", "qemu-7.2")
SWITCHED_OVER = ("switchover", "device-state", "completion")  # the source paused itself

# What the errors must say for each fault kind, as (regex, where): "source" is the
# source's error (what query-migrate reports), "either" is "source | destination" (which
# side notices a broken connection first is a race for some faults, but one of them
# must name the cause). Every pattern was read off real runs of the cells.
CAUSE: dict[str, list[tuple[str, str]]] = {
    # "multifd channel 1 failed: ConnectionResetError: [Errno 104] Connection reset by
    # peer", or on the source after its sends are done "... (multifd channel 1: Connection
    # reset by peer)"; the other side may only see the fallout (a broken pipe on another
    # channel, the main channel reset). At setup the destination may not know the channel's
    # id yet: it names the connection by accept order (the source connects main, then
    # channel 0, 1, ...; the proxy keeps the order): {conn} = N + 1 among the multifd
    # connections, "multifd connection 2: reset by the source while reading its init
    # packet (Connection reset by peer)" (7.2), "multifd connection 2 was reset by the
    # source during channel set-up (Connection reset by peer), while waiting for the main
    # channel" (10, peeked), or, on 10 when the reset beat its first bytes (the proxy
    # resets it as soon as its init packet names it), {acc} = N + 2 among all of them,
    # "incoming connection 3 (accept order) was reset by the source during channel
    # set-up, before its first 4 bytes arrived (Connection reset by peer)".
    "reset-channel": [(r"multifd channel {n}\b[^|]*Connection reset by peer"
                       r"|(multifd connection {conn}(: reset by the source while reading its "
                       r"init packet| was reset by the source during channel set-up)"
                       r"|incoming connection {acc} \(accept order\) was reset by the source "
                       r"during channel set-up, before its first 4 bytes arrived)"
                       r" \(Connection reset by peer\)", "either")],
    # The source finds the stall itself while it still has pages for that channel
    # ("multifd channel 0 failed: SendStalled: peer stalled: no byte accepted for 5 s").
    # After the switchover, when everything fits in the socket buffers, its close of the
    # channel reaches the destination as a reset of that channel ("multifd channel 1
    # failed: ConnectionResetError"), or, when the close is stuck behind unread data, the
    # destination waits at the SYNC until the source gives up ("main channel reset by
    # the source while waiting for every multifd channel's SYNC (multifd channel 1 had
    # not reached its SYNC)").
    "stall-channel": [(r"multifd channel {n} failed: (SendStalled: peer stalled"
                       r"|ConnectionResetError)"
                       r"|multifd channel (\d+, )*{n}(, \d+)* had not reached its SYNC",
                       "either")],
    # "the destination closed the main channel", "main channel to the destination failed:
    # Connection reset by peer" (source), "the main channel closed early: stream ended
    # ..." (destination). At setup on qemu-10 the destination may see main close before
    # it could peek its magic: it names it by accept order, and main is the first
    # connection the source makes ("an incoming channel closed before sending its first
    # 4 bytes (connection 1 by accept order, qemu-10)"), while the source only sees the
    # reset that follows.
    "close-main": [(r"closed the main channel|main channel closed early"
                    r"|main channel to the destination failed"
                    r"|closed before sending its first 4 bytes \(connection 1 by accept order",
                    "either")],
    # The dead peer reset every connection: the source's error is that reset ("multifd
    # channel 1 failed: ConnectionResetError: [Errno 104] Connection reset by peer",
    # "main channel to the destination failed: Connection reset by peer"), or the broken
    # pipe a send after it gets ("multifd channel 1 failed: BrokenPipeError: [Errno 32]
    # Broken pipe") - never a stall, a timeout or a stream error.
    "kill-destination": [(r"Connection reset by peer|Broken pipe", "source")],
}
# Before the switchover the source still has pages for a stalled channel: it must be the
# one that names the stall.
STALL_EARLY = (r"^multifd channel {n} failed: SendStalled: peer stalled", "source")


def _cells(profile: str) -> list[str]:
    phases = [p for p in PHASES if p != "device-state" or
              get_profile(profile).device_state_packets]
    cells = [f"{kind}@{phase}" for phase in phases for kind in (
        "reset-channel:1", "stall-channel:0", "close-main", "kill-destination")]
    if profile == "qemu-7.2":
        # 5.5 s each: a stall before RAM START takes the same source path (the 5 s send
        # stall of one channel) as the stall at iterate, which 7.2 keeps.
        cells.remove("stall-channel:0@setup")
    cells += [f"reset-channel:0@{p}" for p in ("iterate", "switchover")]
    cells += [f"stall-channel:1@{p}" for p in ("switchover", "completion")]
    return cells


CELLS = [pytest.param(profile, spec, id=f"{profile}-{spec}")
         for profile in PROFILES for spec in _cells(profile)]


def cause_problems(spec: str, source_error: str, dest_error: str) -> list[str]:
    """The `CAUSE` rules `spec`'s errors break (empty: the cause is named)."""
    fault = parse_fault(spec)
    rules = list(CAUSE[fault.kind])
    if fault.kind == "stall-channel" and fault.phase in ("setup", "iterate"):
        rules.append(STALL_EARLY)
    texts = {"source": source_error, "either": f"{source_error} | {dest_error}"}
    out = []
    for pattern, where in rules:
        n = fault.channel
        rx = pattern.format(n=n, conn=None if n is None else n + 1,
                            acc=None if n is None else n + 2)
        if not re.search(rx, texts[where]):
            out.append(f"{where} error does not match {rx!r}")
    return out


def _check_failed(r: CellResult) -> None:
    assert r.fired, f"{r.spec}: phase never reached"
    assert r.forwarded, "the proxy did not forward every connection before the fault"
    assert r.status == "failed", (r.status, r.error)
    assert r.dest_status == "failed", (r.dest_status, r.dest_error)
    assert r.time_to_fail_ms < 10_000, r
    assert 0 < r.dest_time_to_fail_ms < 10_000, r
    assert r.checksum_after == r.checksum_straight, "source state changed"


def _check_cause(r: CellResult) -> None:
    """Last, after every other check of the cell passed: the errors name the cause."""
    problems = cause_problems(r.spec, r.error, r.dest_error)
    assert not problems, (problems, r.error, r.dest_error)


def _no_leftovers(before_threads: set[threading.Thread], before_fds: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [t for t in threading.enumerate() if t not in before_threads and t.is_alive()]
        if not left and open_fds() <= before_fds:
            break
        time.sleep(0.05)
    assert not left, [t.name for t in left]
    assert open_fds() <= before_fds, "fd leak"


@pytest.mark.parametrize(("profile", "spec"), CELLS)
def test_cell(profile: str, spec: str) -> None:
    before_threads = set(threading.enumerate())
    before_fds = open_fds()
    r = run_cell(spec, profile)
    _check_failed(r)
    assert r.source_running and r.source_state == "running", \
        "the source machine must run again after a failure"
    phase = parse_fault(spec).phase
    assert r.state_events == (["STOP", "RESUME"] if phase in SWITCHED_OVER else []), r
    assert r.retry_status == "completed" and r.retry_verified, r.notes
    _no_leftovers(before_threads, before_fds)
    _check_cause(r)


@pytest.mark.parametrize(("profile", "spec"), [
    pytest.param(profile, spec, id=f"{profile}-{spec}") for profile in PROFILES
    for spec in ("reset-channel:1@iterate", "close-main@switchover",
                 "kill-destination@completion")])
def test_paused_source_stays_paused(profile: str, spec: str) -> None:
    """A source stopped before the migration is never resumed by its failure."""
    before_threads = set(threading.enumerate())
    before_fds = open_fds()
    r = run_cell(spec, profile, paused=True)
    _check_failed(r)
    assert not r.source_running and r.source_state == "paused", r.source_state
    assert r.state_events == [], f"run-state changes during the migration: {r.state_events}"
    assert r.step == r.step_before, "the paused workload advanced"
    assert r.retry_status == "completed" and r.retry_verified, r.notes
    _no_leftovers(before_threads, before_fds)
    _check_cause(r)


def _demo(spec: str, profile: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "multifd.cli", "demo", "--ram", "32M", "--steps", "4000",
         "--dirty-rate", "8", "--max-bandwidth", str(64 << 20), "--downtime-limit", "2000",
         "--profile", profile, "--inject-fault", spec, "--json"],
        capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout.strip(), out.stderr
    assert out.returncode == 0, out.stdout
    return json.loads(out.stdout.strip().splitlines()[-1])


# What the process-level cells' errors must say. A real SIGKILL closes the dead process's
# sockets with a FIN or a reset (unread data), so the source sees either.
DEMO_CAUSE = {
    "kill-destination": r"Connection reset by peer|Broken pipe"
                        r"|the destination closed the main channel",
    # the destination saw the source's connections end mid-stream
    "kill-source": r"^source process killed; destination: (the main channel closed early"
                   r"|an incoming channel closed before sending its first 4 bytes"
                   r"|(the main channel|multifd connection \d+) was (reset|closed) by the "
                   r"source during channel set-up)",
    "stall-channel": r"^multifd channel {n} failed: SendStalled: peer stalled",
}


@pytest.mark.parametrize(("profile", "spec"), [
    pytest.param("qemu-10", spec, id=f"qemu-10-{spec}") for spec in (
        "kill-destination@iterate", "kill-destination@completion", "kill-source@setup",
        "kill-source@iterate", "kill-source@switchover", "kill-source@completion",
        "stall-channel:0@iterate")] + [
    # 7.2: a dead destination mid-iteration, and a destination waiting at a SYNC barrier
    # (one per RAM EOS) when its source dies
    pytest.param("qemu-7.2", spec, id=f"qemu-7.2-{spec}") for spec in (
        "kill-destination@iterate", "kill-source@iterate")])
def test_demo_cell(profile: str, spec: str) -> None:
    r = _demo(spec, profile)
    fault = parse_fault(spec)
    assert r["status"] == "failed", r
    assert re.search(DEMO_CAUSE[fault.kind].format(n=fault.channel), str(r["error"])), r
    assert r["time_to_fail_ms"] is not None and r["time_to_fail_ms"] < 10_000, r
    if fault.kind == "kill-source":
        assert r["source_running"] is False  # the source process is gone
        assert r["destination_status"] == "failed", r
    else:
        assert r["source_running"] is True, r
        assert r["source_checksum_before"] == r["source_checksum_after"], r
        if fault.kind == "kill-destination":
            assert r["destination_status"] == "killed", r
    assert r["retry_status"] == "completed" and r["retry_verified"] is True, r
