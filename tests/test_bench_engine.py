"""Smoke test of bench/engine.py: tiny RAM, one round. It migrates end to end (ours and each
installed QEMU), verifies the RAM, and prints the JSON shape and the README section the
issue asks for (one key per figure, each {median, min, max}; no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from multifd.qemu.qemuproc import QEMU10, QEMU72, available

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "engine.py"
TINY = ["--runs", "1", "--ram", str(64 << 20), "--data", str(8 << 20), "--warm-mib", "0"]


def _run(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    readme = tmp_path / "README.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--json", "--readme",
                           str(readme), *extra],
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(proc.stdout), readme.read_text()


def _check_figure(fig: object, *, positive: bool = True) -> None:
    """A {median, min, max} figure (CPU seconds of a tiny run may be 0 clock ticks)."""
    assert isinstance(fig, dict) and set(fig) == {"median", "min", "max"}, fig
    assert 0 <= fig["min"] <= fig["median"] <= fig["max"], fig
    assert fig["min"] > 0 or not positive, fig


def test_engine_cells_against_every_qemu(tmp_path: Path) -> None:
    versions = [v for v in (QEMU72, QEMU10) if available(v)]
    res, readme = _run(tmp_path, "--compression", "none,zstd")
    assert res["ok"] and res["versions"] == versions
    assert set(res["cells"]) == {"none", "zstd"}
    qemus = [f"qemu-{v}" for v in versions]
    for name, cell in res["cells"].items():
        assert cell["compression"] == name and cell["channels"] == 2
        assert cell["verified"] and cell["failures"] == 0
        for who in ("ours", *qemus):
            _check_figure(cell[f"{who}_ms"])
            _check_figure(cell[f"{who}_cpu_s"]["dst"], positive=False)
        if qemus:
            assert cell["faster_qemu"] in qemus
            fastest = min(cell[f"{q}_ms"]["median"] for q in qemus)
            assert cell["ratio"] == round(cell["ours_ms"]["median"] / fastest, 3)
        assert f"--compression {name} --channels 2" in cell["command"]
        assert f"`{cell['command']}`" in readme
    _check_figure(res["cells"]["none"]["floor_ms"])
    assert "floor_ms" not in res["cells"]["zstd"]
    assert readme.startswith("<!-- engine:begin -->")


def test_engine_scaling_table(tmp_path: Path) -> None:
    res, readme = _run(tmp_path, "--scaling", "--compression", "zstd", "--no-qemu",
                       "--no-floor")
    assert "cells" not in res and set(res["scaling"]) == {"zstd"}
    assert list(res["scaling"]["zstd"]) == ["1", "2", "4", "8"]
    for ch, cell in res["scaling"]["zstd"].items():
        assert cell["channels"] == int(ch) and cell["ratio"] is None
        _check_figure(cell["ours_ms"])
    assert "<!-- engine-scaling:begin -->" in readme
