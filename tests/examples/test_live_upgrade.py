"""examples/live_upgrade.py: the table service hands itself over to a new process under
client load (cpr-transfer and precopy); every acknowledged update survives, exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("mode", ["cpr-transfer", "precopy"])
def test_live_upgrade(mode: str) -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "live_upgrade.py"), "--mode", mode,
         "--table-size", "16M", "--clients", "3", "--seconds", "0.3", "--json"],
        capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["verified"] is True
    assert report["new_pid"] != report["old_pid"] and report["generation"] == 1
    assert report["old_exit_code"] == 0
    assert report["rows_wrong"] == 0 and report["lost_or_doubled"] == 0
    assert report["updates"] > 0 and report["client_errors"] == []
