"""examples/checkpoint.py: live checkpoints in mapped-ram files, a crash, a restore in a
new process; the result equals an uninterrupted run's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "checkpoint.py"
ARGS = ["--grid", "256", "--steps", "3000"]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *argv, *ARGS], capture_output=True,
                          text=True, timeout=120, check=False)


def test_checkpoint_crash_restore(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "sim.img")
    crashed = _run("run", "--checkpoint", ckpt, "--every", "500", "--stop-at", "2000")
    assert crashed.returncode == 3, crashed.stderr[-2000:]  # the simulated crash
    restored = _run("restore", "--checkpoint", ckpt)
    assert restored.returncode == 0, restored.stderr[-2000:]
    after = json.loads(restored.stdout)
    assert 500 <= after["restored_from"] < 2000 and after["step"] == 3000
    plain = _run("run")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert after["checksum"] == json.loads(plain.stdout)["checksum"]
