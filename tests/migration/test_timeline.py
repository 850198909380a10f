"""The timeline recorder, the downtime model, the demo's progress line, and writing the
timeline as JSON and PNG (with and without matplotlib)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from multifd.commands.demo_figures import ProgressLine
from multifd.commands.timeline_options import (
    NO_MATPLOTLIB,
    check_timeline_options,
    write_timeline,
)
from multifd.migration.downtime import HEADROOM, NEAR_MISSES, DowntimeModel, PipelineGauge
from multifd.migration.timeline import Timeline, channel_figures, merge_timelines

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _recorded() -> dict:
    """Two channels over 1 s: channel 0 busy half the time, channel 1 idle then busy."""
    clock = Clock()
    tl = Timeline(clock=clock)
    busy = [0, 0]
    for step in range(11):
        clock.t = 100.0 + step * 0.1
        tl.sample(remaining=(10 - step) << 20, transferred=step << 20, throughput=10.0,
                  dirty_rate=1.0, phase="iterate", **{"pass": step // 4})
        tl.channels("source", [{"busy_ns": busy[0]}, {"busy_ns": busy[1]}])
        busy[0] += 50_000_000  # 50 ms of each 100 ms
        busy[1] += 100_000_000 if step >= 5 else 0
        if step == 4:
            tl.event("pass", **{"pass": 1})
        if step == 8:
            tl.event("pause")
    return tl.to_dict()


def test_samples_events_and_lanes() -> None:
    doc = _recorded()
    times = [s["t_ms"] for s in doc["samples"]]
    assert times == sorted(times) and times[0] == 0.0 and times[-1] == 1000.0
    assert [e["event"] for e in doc["events"]] == ["pass", "pause"]
    lane0, lane1 = doc["channels"]["source"]
    assert lane0["busy"] == [[0.0, 1000.0, 0.5]]  # one interval: the load never changed
    assert lane1["busy"] == [[500.0, 1000.0, 1.0]]  # idle, then busy
    assert lane0["busy_pct"] == 50.0 and lane1["busy_pct"] == 50.0


def test_times_never_run_backwards() -> None:
    clock = Clock()
    tl = Timeline(clock=clock)
    clock.t = 101.0
    tl.sample(remaining=1)
    clock.t = 100.5  # a clock read out of order (another thread): kept monotonic
    tl.event("pause")
    tl.sample(remaining=0)
    assert [s["t_ms"] for s in tl.samples] == [1000.0, 1000.0]
    assert tl.events[0]["t_ms"] == 1000.0


def test_merge_puts_the_destination_on_the_source_axis() -> None:
    src = _recorded()
    dst = {**_recorded(), "t0_wall": src["t0_wall"] + 0.25}
    dst["channels"] = {"destination": dst["channels"]["source"]}
    doc = merge_timelines(src, dst, pause_wall=src["t0_wall"] + 0.9,
                          resume_wall=src["t0_wall"] + 1.0)
    assert doc["downtime"] == [900.0, 1000.0]
    assert doc["channels"]["destination"][0]["busy"] == [[250.0, 1250.0, 0.5]]
    assert [e["t_ms"] for e in doc["events"]] == sorted(e["t_ms"] for e in doc["events"])
    assert doc["events"][-1]["event"] in ("resume", "pause")


def test_channel_figures() -> None:
    src = channel_figures([{"wire_bytes": 10, "packets": 2, "busy_ns": 250_000_000,
                            "slot_waits": 3, "slot_wait_ns": 4_000_000}], 1.0, "source")
    assert src == [{"channel": 0, "bytes": 10, "packets": 2, "busy_ms": 250.0,
                    "busy_pct": 25.0, "slot_waits": 3, "slot_wait_ms": 4.0}]
    dst = channel_figures([{"wire_bytes_ram": 7, "wire_bytes_device_state": 3,
                            "packets": 2, "sync_waits": 1}], 0.0, "destination")
    assert dst[0]["bytes"] == 10 and dst[0]["sync_waits"] == 1 and dst[0]["busy_pct"] == 0.0


def test_downtime_model_counts_the_fixed_costs() -> None:
    m = DowntimeModel()
    assert m.expected_ms(1000, 0.0) is None  # no bandwidth measured yet
    m.note_pipeline(30_000)
    m.update(10.0, 0, 1000.0, sync_s=0.02)
    assert m.fixed_ms == pytest.approx(20 + 30)  # the sync, the pipeline at 1000 B/ms
    assert m.expected_ms(100_000, 1000.0) == pytest.approx(50 + 100)
    # the threshold leaves room for them, and headroom: 300 ms limit -> 250 ms of data,
    # half of it for the pending data
    assert m.threshold(1000.0, 300) == pytest.approx(250_000 * HEADROOM)
    # the next check uses the pass's throughput since this one (its 50 ms sync left out),
    # not the window (which swings), and the cheapest sync (the final one finds next to
    # nothing written)
    m.note_pipeline(0)
    m.update(11.05, 2_000_000, 5000.0, sync_s=0.05)
    assert m.bandwidth == pytest.approx(2000.0)
    assert m.sync_ms == pytest.approx(20)
    assert m.threshold(5000.0, 300) == pytest.approx(2000.0 * 280 * HEADROOM)
    # ETA: (remaining - threshold) / (bw - dirty) + the switchover
    threshold = 2000.0 * 280 * HEADROOM
    eta = m.eta_ms(1_000_000 + int(threshold), 5000.0, 1000.0, 300)
    assert eta == pytest.approx(1_000_000 / 1000 + 20 + 280 * HEADROOM, abs=0.01)
    assert m.eta_ms(10**9, 5000.0, 2000.0, 300) is None  # dirtying as fast as we send
    # the decision: within the headroom at once; within the limit only when pending stays
    # there NEAR_MISSES checks in a row
    assert m.fits(int(threshold) - 10, 5000.0, 300)
    assert [m.fits(int(threshold) + 10, 5000.0, 300) for _ in range(NEAR_MISSES)] == [
        False] * (NEAR_MISSES - 1) + [True]
    assert not m.fits(2000 * 281, 5000.0, 300)  # over the limit: never
    slow = DowntimeModel()
    slow.update(12.0, 0, 5000.0, sync_s=0.5)  # fixed costs over the limit
    assert slow.threshold(5000.0, 300) == 0


def test_pipeline_gauge_on_a_connected_pair() -> None:
    import socket

    a, b = socket.socketpair()
    try:
        a.sendall(b"x" * 1000)
        assert PipelineGauge().measure([a]) >= 0  # unix: only our queue, no TCP_INFO
        a.close()
        assert PipelineGauge().measure([a]) == 0  # a closed socket counts nothing
    finally:
        b.close()


def test_progress_line_never_runs_backwards() -> None:
    line = ProgressLine(lambda n: f"{int(n)} B")

    def ev(phase: str, sent: int, left: int, syncs: int, status: str = "active") -> str:
        return line.text({"phase": phase, "query": {
            "status": status, "x-eta-ms": 1500, "expected-downtime": 120,
            "ram": {"transferred": sent, "remaining": left, "dirty-sync-count": syncs,
                    "mbps": 800.0, "dirty-pages-rate": 256, "page-size": 4096}}})

    first = ev("iterate", 50, 50, 3)
    assert "iterate" in first and "pass   2" in first and " 50.0%" in first
    assert "ETA   1.5 s" in first and "dirty     1 MiB/s" in first
    later = ev("setup", 60, 140, 2)  # stale phase and pass, remaining grew
    assert "iterate" in later and "pass   2" in later and " 50.0%" in later
    assert "100.0%" in ev("completion", 200, 0, 4, "completed")


def _args(tmp_path: Path, png: bool = True) -> argparse.Namespace:
    return argparse.Namespace(timeline=str(tmp_path / "t.png") if png else None,
                              timeline_json=str(tmp_path / "t.json"))


def test_png_and_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib",
                        reason="environment: matplotlib (multifd[plot]) is not installed")
    doc = merge_timelines(_recorded(), None, None, None)
    doc["channels"]["destination"] = doc["channels"]["source"]
    assert write_timeline(_args(tmp_path), doc) == []
    data = (tmp_path / "t.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    from PIL import Image  # matplotlib's own dependency

    with Image.open(tmp_path / "t.png") as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 500
    assert json.loads((tmp_path / "t.json").read_text())["samples"] == doc["samples"]


def test_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    monkeypatch.delitem(sys.modules, "multifd.commands.timeline_plot", raising=False)
    args = _args(tmp_path)
    assert check_timeline_options(args) == NO_MATPLOTLIB
    assert check_timeline_options(_args(tmp_path, png=False)) is None
    assert write_timeline(args, _recorded()) == [NO_MATPLOTLIB]
    assert json.loads((tmp_path / "t.json").read_text())["samples"]  # JSON still written
    assert not (tmp_path / "t.png").exists()


def test_cli_without_matplotlib_says_so(tmp_path: Path) -> None:
    import subprocess

    code = ("import sys; sys.modules['matplotlib'] = None; from multifd.cli import main; "
            f"sys.exit(main(['demo', '--ram', '32M', '--timeline', {str(tmp_path / 'x.png')!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 1
    assert "needs matplotlib" in out.stderr and "multifd[plot]" in out.stderr
    assert "Traceback" not in out.stderr


def test_final_sync_cost_is_the_live_syncs_intercept() -> None:
    """A sync's cost grows with the pages it finds written; the final one finds next to
    none: its estimate is the intercept over the live syncs, never above the cheapest."""
    m = DowntimeModel()
    for i, (pages, ms) in enumerate([(30_000, 22.0), (10_000, 8.0), (5_000, 4.5)]):
        m.update(10.0 + i, 0, 1000.0, sync_s=ms / 1000, sync_pages=pages)
    assert m.sync_ms == pytest.approx(1.0, abs=0.1)
    flat = DowntimeModel()  # the same pages every time: the cheapest sync
    for i, ms in enumerate([9.0, 7.0, 8.0]):
        flat.update(10.0 + i, 0, 1000.0, sync_s=ms / 1000, sync_pages=1000)
    assert flat.sync_ms == pytest.approx(7.0)


def test_switchover_waits_while_pending_shrinks() -> None:
    """Pending that fits the limit but not the headroom: no switchover while it keeps
    shrinking; once it stops, at the NEAR_MISSES-th check."""
    m = DowntimeModel()
    m.update(10.0, 0, 1000.0, sync_s=0.0)  # 1000 B/ms, no fixed costs: limit 300 ms
    assert not m.fits(290_000, 1000.0, 300)
    assert not m.fits(250_000, 1000.0, 300)  # shrinking: no near miss
    assert not m.fits(200_000, 1000.0, 300)
    assert [m.fits(195_000, 1000.0, 300) for _ in range(NEAR_MISSES)] == [
        False] * (NEAR_MISSES - 1) + [True]


def test_expected_downtime_takes_the_burst_rate() -> None:
    """Intervals between checks pay a fixed part each: the expected downtime sends at
    the inverse slope of time over bytes, the threshold keeps the (lower) average."""
    m = DowntimeModel()
    t, sent = 10.0, 0
    m.update(t, sent, 1000.0, sync_s=0.0)
    for nbytes in (600_000, 400_000, 200_000):  # 40 ms each + 1 ms per 2000 bytes
        t += (40 + nbytes / 2000) / 1000
        sent += nbytes
        m.update(t, sent, 1000.0, sync_s=0.0)
    assert m.bandwidth == pytest.approx(200_000 / 140)  # the last interval's average
    assert m.burst_bandwidth == pytest.approx(2000)  # the slope: 1 ms per 2000 bytes
    assert m.expected_ms(200_000, 1000.0) == pytest.approx(200_000 / m.burst_bandwidth)
