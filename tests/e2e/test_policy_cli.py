"""Timeout policies through `multifd demo` with real processes: a workload dirtying faster
than --max-bandwidth never converges; a SIGSTOPped source goes silent but stays connected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(120)

# 8 MiB at 2 MB/s: the first pass takes ~4 s; the workload then dirties 16 MiB/s
NEVER_CONVERGES = ["--ram", "8M", "--dirty-rate", "16", "--max-bandwidth", "2000000",
                   "--steps", "3000"]


def _demo(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "multifd.cli", "demo", "--json", *args],
                         capture_output=True, text=True, timeout=100, check=False)
    assert out.stdout, out.stderr[-2000:]
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_timeout_cancel_fails_like_a_fault_cell() -> None:
    r = _demo(*NEVER_CONVERGES, "--timeout", "5", "--timeout-strategy", "cancel")
    assert r["status"] == "failed"
    assert r["error"].startswith("x-completion-timeout: the migration did not complete "
                                 "within 5 s"), r["error"]
    assert 5000 <= r["time_to_fail_ms"] <= 7000, r["time_to_fail_ms"]
    assert r["timeout_action"] == "cancel"
    assert r["source_running"] is True
    assert r["source_checksum_before"] == r["source_checksum_after"] is not None
    assert r["verified"] is False


def test_timeout_switchover_completes_above_the_limit() -> None:
    # 1 ms: no switchover fits it (a forced one of 8 MiB took 8 ms here, under 10 ms)
    r = _demo(*NEVER_CONVERGES, "--downtime-limit", "1", "--timeout", "3",
              "--timeout-strategy", "switchover")
    assert r["status"] == "completed", r["error"]
    assert r["verified"] is True
    assert r["timeout_action"] == "switchover"
    assert r["downtime_limit_ms"] == 1
    assert r["downtime_ms"] > 1 and r["downtime_over_limit"] is True


def test_bad_policy_option_is_a_usage_error() -> None:
    out = subprocess.run([sys.executable, "-m", "multifd.cli", "demo", "--timeout", "-1"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2 and "whole seconds" in out.stderr


def _child(role: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "multifd.commands.demo", "--role", role, "--ram", "16M",
         "--dirty-rate", "8", "--max-bandwidth", "2000000", "--steps", "3000",
         "--idle-timeout", "2", *extra],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def _events(proc: subprocess.Popen[str], sink: list[dict[str, Any]],
            t_last: list[float]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sink.append(json.loads(line))
        t_last.append(time.monotonic())


def test_sigstopped_source_fails_the_destination() -> None:
    dst = _child("destination")
    src: subprocess.Popen[str] | None = None
    try:
        assert dst.stdout is not None
        uri = json.loads(dst.stdout.readline())["uri"]
        d_events: list[dict[str, Any]] = []
        d_times: list[float] = []
        reader = threading.Thread(target=_events, args=(dst, d_events, d_times), daemon=True)
        reader.start()
        src = _child("source", "--uri", uri)
        assert src.stdout is not None
        while True:  # live and sending
            ev = json.loads(src.stdout.readline())
            if ev["query"].get("ram", {}).get("transferred", 0) > 1 << 20:
                break
        os.kill(src.pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        reader.join(2 + 2 + 5)
        assert d_events and d_events[-1]["event"] == "result", d_events
        took = d_times[-1] - t_stop
        res = d_events[-1]
        assert res["status"] == "failed"
        assert res["error"].startswith("x-idle-timeout: the source sent nothing on any "
                                       "channel for 2 s"), res["error"]
        assert "main channel silent" in res["error"]
        assert "multifd channel 0 silent" in res["error"]
        assert took < 2 + 2, took
        assert dst.wait(10) == 1
        os.kill(src.pid, signal.SIGCONT)  # too late: nothing revives the destination
        s_out, _ = src.communicate(timeout=30)
        s_res = json.loads(s_out.strip().splitlines()[-1])
        assert s_res["event"] == "result" and s_res["status"] == "failed", s_res
        assert s_res["running"] is True
    finally:
        for p in (src, dst):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait(10)


def test_incoming_timeout_is_a_deadline_and_idle_timeout_bounds_waits(tmp_path: Path) -> None:
    """The one-pass QEMU-peer command: --timeout bounds the whole transfer,
    --idle-timeout (the old --timeout) every wait; nothing connects here."""

    def incoming(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "multifd.cli", "incoming",
                              f"unix:{tmp_path}/in.sock", "--profile", "qemu-10", "--save",
                              str(tmp_path / "x.img"), *args],
                             capture_output=True, text=True, timeout=60, check=False)
        return out, time.monotonic() - t0

    out, took = incoming("--timeout", "2")
    assert out.returncode == 1 and took < 10
    assert ("error: x-completion-timeout: the incoming migration did not complete within 2 s"
            in out.stderr), out.stderr
    out, _ = incoming("--idle-timeout", "1", "--timeout", "30")
    assert out.returncode == 1 and "no connection" in out.stderr and "within 1 s" in out.stderr
    out, _ = incoming("--timeout-per-gib", "5")
    assert out.returncode == 1 and "--timeout-per-gib needs the RAM size" in out.stderr
    assert not (tmp_path / "x.img").exists()
