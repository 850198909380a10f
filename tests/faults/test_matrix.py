"""The fault matrix: every fault at every phase ends as `failed` within 10 s, cleanly.

In-process cells (source -> FaultProxy -> destination in this process): reset-channel:N,
stall-channel:N, close-main and a simulated dead peer (kill-destination: every connection
reset) at setup, iterate, switchover, device-state and completion. Process-level cells
(real SIGKILL of the destination or source process) run through `multifd demo`.
For each cell: source and destination failed within 10 s of the fault, the errors name
the cause, the source machine is running again (it was running) with its state equal to the
straight computation to the step it stopped at, no thread or fd left behind, and a retry
to a fresh destination succeeds and verifies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from multifd.testing.faults import PHASES, open_fds, parse_fault
from tests.faults._cell import run_cell

# What the error text (source's or destination's) must mention for each fault kind.
CAUSE = {
    # A reset channel makes the destination tear everything down; which broken connection
    # each side notices first is a race, so a broken pipe on another channel also counts.
    "reset-channel": ["channel {n}", "reset by peer", "broken pipe"],
    "stall-channel": ["stall", "channel {n}"],
    "close-main": ["main channel", "QEMU_VM_EOF", "closed"],
    "kill-destination": ["reset", "Broken pipe", "closed"],
}
CELLS = [f"{kind}@{phase}" for phase in PHASES for kind in (
    "reset-channel:1", "stall-channel:0", "close-main", "kill-destination")]
CELLS += [f"reset-channel:0@{p}" for p in ("iterate", "switchover")]
CELLS += [f"stall-channel:1@{p}" for p in ("switchover", "completion")]


def _names_cause(spec: str, text: str) -> bool:
    fault = parse_fault(spec)
    words = [w.format(n=fault.channel) for w in CAUSE[fault.kind]]
    return any(w.lower() in text.lower() for w in words)


@pytest.mark.parametrize("spec", CELLS)
def test_cell(spec: str) -> None:
    before_threads = set(threading.enumerate())
    before_fds = open_fds()
    r = run_cell(spec)
    assert r.fired, f"{spec}: phase never reached"
    assert r.status == "failed", (r.status, r.error)
    assert r.dest_status == "failed", (r.dest_status, r.dest_error)
    assert r.time_to_fail_ms < 10_000, r
    assert 0 < r.dest_time_to_fail_ms < 10_000, r
    assert _names_cause(spec, r.error + " | " + r.dest_error), (r.error, r.dest_error)
    assert r.source_running, "the source machine must run again after a failure"
    assert r.checksum_after == r.checksum_straight, "source state changed"
    assert r.retry_status == "completed" and r.retry_verified, r.notes
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [t for t in threading.enumerate() if t not in before_threads and t.is_alive()]
        if not left and open_fds() <= before_fds:
            break
        time.sleep(0.05)
    assert not left, [t.name for t in left]
    assert open_fds() <= before_fds, "fd leak"


def _demo(spec: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "multifd.cli", "demo", "--ram", "32M", "--steps", "4000",
         "--dirty-rate", "8", "--max-bandwidth", str(64 << 20), "--downtime-limit", "2000",
         "--inject-fault", spec, "--json"],
        capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout.strip(), out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spec", ["kill-destination@iterate", "kill-destination@completion",
                                  "kill-source@setup", "kill-source@iterate",
                                  "kill-source@switchover", "kill-source@completion",
                                  "stall-channel:0@iterate"])
def test_demo_cell(spec: str) -> None:
    r = _demo(spec)
    assert r["status"] == "failed", r
    assert r["error"], r
    assert r["time_to_fail_ms"] is not None and r["time_to_fail_ms"] < 10_000, r
    if spec.startswith("kill-source"):
        assert r["source_running"] is False  # the source process is gone
    else:
        assert r["source_running"] is True, r
        assert r["source_checksum_before"] == r["source_checksum_after"], r
    assert r["retry_status"] == "completed" and r["retry_verified"] is True, r
