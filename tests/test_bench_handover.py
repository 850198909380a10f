"""Smoke test of bench/handover.py: it runs end to end on a small state and prints the
JSON shape the issue asks for (verified runs, figures positive; no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "handover.py"


def test_handover_json_shape() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "16M", "--runs", "1", "--json"],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout)
    assert res["verified"] is True and res["runs"] == 1 and res["size"] == 16 << 20
    for key in ("handover_downtime_ms", "handover_total_ms", "precopy_total_ms",
                "precopy_downtime_ms", "speedup"):
        spread = res[key]
        assert set(spread) == {"median", "min", "max"}, key
        assert 0 < spread["min"] <= spread["median"] <= spread["max"], key
    assert set(res["goals"]) == {"speedup >= 20", "handover downtime <= 50 ms"}
