"""`multifd demo --timeline FILE.png --timeline-json FILE`: the picture and its samples
from a real run, and the report's measured figures (issue #16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib",
                    reason="environment: matplotlib (multifd[plot]) is not installed")


def test_demo_timeline_and_figures(tmp_path: Path) -> None:
    png, js = tmp_path / "t.png", tmp_path / "t.json"
    out = subprocess.run(
        [sys.executable, "-m", "multifd.cli", "demo", "--ram", "64M", "--steps", "3000",
         "--dirty-rate", "32", "--max-bandwidth", str(64 << 20),  # >= 1 s: a few samples
         "--json", "--timeline", str(png), "--timeline-json", str(js)],
        capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["verified"] is True
    # the report: expected beside real downtime, both dirty rates, channels on each side
    assert report["expected_downtime_ms"] > 0 and report["downtime_ms"] > 0
    assert "workload_dirty_rate_mib_s" in report and "measured_dirty_rate_mib_s" in report
    figs = report["channel_figures"]
    assert len(figs["source"]) == len(figs["destination"]) == 2
    for s, d in zip(figs["source"], figs["destination"], strict=True):
        assert s["bytes"] == d["bytes"] > 0 and s["packets"] == d["packets"] > 0
        assert 0 < s["busy_pct"] <= 100 and 0 < d["busy_pct"] <= 100
        assert "slot_waits" in s and d["sync_waits"] > 0
    # the picture
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image

    with Image.open(png) as img:
        img.verify()
    # the samples it was drawn from
    doc = json.loads(js.read_text())
    times = [s["t_ms"] for s in doc["samples"]]
    assert len(times) >= 3 and times == sorted(times)
    for key in ("remaining", "throughput", "dirty_rate", "pass", "phase"):
        assert key in doc["samples"][0], key
    assert {"source", "destination"} <= set(doc["channels"])
    for side in ("source", "destination"):
        lanes = doc["channels"][side]
        assert len(lanes) == 2 and any(lane["busy"] for lane in lanes), side
        for lane in lanes:
            starts = [a for a, _b, _f in lane["busy"]]
            assert starts == sorted(starts)
            assert all(a < b and 0 < f <= 1 for a, b, f in lane["busy"])
    events = [e["event"] for e in doc["events"]]
    assert "pause" in events and "resume" in events and "pass" in events
    pause, resume = doc["downtime"]
    assert 0 < pause < resume
