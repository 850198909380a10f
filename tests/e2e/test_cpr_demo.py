"""`multifd demo --mode cpr-transfer`: the same report as a precopy demo, the RAM handed
over (memfds over a unix socket) instead of sent, and the computation verified."""

from __future__ import annotations

import json
import subprocess
import sys


def test_cpr_transfer_demo_sends_no_ram() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "multifd.cli", "demo", "--mode", "cpr-transfer", "--ram", "32M",
         "--steps", "1000", "--json"],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["status"] == "completed" and report["mode"] == "cpr-transfer"
    assert report["verified"] is True
    for key in ("total_time_ms", "downtime_ms", "setup_time_ms", "ram", "wire_bytes"):
        assert report[key] is not None, key
    assert report["ram"]["normal"] == 0 and report["ram"]["transferred"] < 64 << 10
    assert report["channel_stats"] == []
    assert report["device_state_path"] == "main"
