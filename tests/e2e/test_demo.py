"""`multifd demo` end to end: three processes, a live migration, a verified checksum."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from multifd.machine.tracking import available_modes


@pytest.mark.parametrize(
    "extra",
    [
        ["--profile", "qemu-10", "--channels", "2"],
        ["--profile", "qemu-7.2", "--channels", "2", "--compression", "zstd"],
    ],
)
def test_demo_json_report(extra: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "multifd.cli", "demo", "--ram", "64M", "--steps", "3000",
         "--dirty-rate", "32", "--json", *extra],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["status"] == "completed"
    assert report["verified"] is True
    assert report["checksum_expected"] == report["checksum_destination"]
    for key in ("total_time_ms", "downtime_ms", "setup_time_ms", "ram", "wire_bytes"):
        assert report[key] is not None, key
    assert report["ram"]["normal"] > 0
    assert report["downtime_ms"] >= 0
    assert len(report["channel_stats"]) == 2
    # the source RAM's write tracking: "auto" picks the first kernel mode that works here
    modes = available_modes()
    assert report["tracking"] == next((m for m in modes if modes[m] is None), "manual")


def test_demo_human_report() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "multifd.cli", "demo", "--ram", "32M", "--steps", "2000"],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "verified" in out.stdout and "yes" in out.stdout
    assert "downtime" in out.stdout
