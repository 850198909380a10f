"""`multifd demo`'s measured figures and timeline: what each child records and how the
parent puts the two sides together.

Each child keeps a `Timeline` (migration/timeline.py): the source feeds it from its
progress loop and its migration thread's events, the destination from a `Sampler` over
its channels. Their results carry the timeline, per-channel figures (bytes, packets,
busy %, waits) and, on the source, the expected downtime at the pause and the dirty rate
twice: measured by the bitmap syncs and counted by the workload itself over the same span.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from multifd.migration.timeline import (
    SAMPLE_INTERVAL_S,
    Sampler,
    Timeline,
    channel_figures,
    merge_timelines,
    sample_source,
)

__all__ = ["DestinationRecorder", "ProgressLine", "SourceRecorder", "report_fields",
           "write_outputs"]

MiB = 1 << 20


class SourceRecorder:
    """The source child's timeline and figures; `sample(query)` from its progress loop."""

    def __init__(self, src: Any, workload: Any) -> None:
        self.src = src
        self.workload = workload
        self.timeline = src.timeline = Timeline()

    def sample(self, query: dict[str, Any]) -> None:
        sample_source(self.timeline, self.src, query)

    def result(self) -> dict[str, Any]:
        src = self.src
        wall = (src.t_end or src.t_start) - src.t_start
        out: dict[str, Any] = {
            "timeline": self.timeline.to_dict(),
            "expected_downtime_ms": round(src.expected_downtime_ms, 1),
            "channel_figures": channel_figures(src.channel_stats(), wall, "source"),
            "measured_dirty_rate_mib_s": None, "workload_dirty_rate_mib_s": None,
        }
        meas = src.dirty_measurement()
        if meas is not None:  # both over the live syncs' span; a page once per interval
            dirtied, instants = meas
            t0, t1 = instants[0], instants[-1]
            page = src.machine.blocks[next(iter(src.machine.blocks))].page_size
            out["measured_dirty_rate_mib_s"] = round(dirtied / MiB / (t1 - t0), 1)
            out["workload_dirty_rate_mib_s"] = round(
                self.workload.distinct_pages_dirtied(instants) * page / MiB / (t1 - t0), 1)
            out["workload_write_rate_mib_s"] = round(  # every write, rewrites too
                self.workload.pages_dirtied_between(t0, t1) * page / MiB / (t1 - t0), 1)
        return out


class DestinationRecorder:
    """The destination child's timeline: its channels' busy time, sampled."""

    def __init__(self, dest: Any) -> None:
        self.dest = dest
        self.timeline = Timeline()
        self._t_connected = 0.0  # busy % is of the time since the channels connected
        self._sampler = Sampler(self._sample).start()

    def _stats(self) -> list[dict[str, int]]:
        rcv = self.dest.receiver
        return list(rcv.channel_stats().values()) if rcv is not None else []

    def _sample(self) -> None:
        stats = self._stats()
        if stats:
            # connected at most one sampling interval ago
            self._t_connected = self._t_connected or time.monotonic() - SAMPLE_INTERVAL_S
            self.timeline.channels("destination", stats)

    def result(self) -> dict[str, Any]:
        self._sampler.stop()
        dest = self.dest
        wall = (dest.t_end - self._t_connected) if dest.t_end and self._t_connected else 0.0
        return {"timeline": self.timeline.to_dict(),
                "channel_figures": channel_figures(self._stats(), wall, "destination")}


def report_fields(s: dict[str, Any], d: dict[str, Any]) -> dict[str, Any]:
    """The figures the parent's report adds from both children's results."""
    return {
        "expected_downtime_ms": s.get("expected_downtime_ms"),
        "workload_dirty_rate_mib_s": s.get("workload_dirty_rate_mib_s"),
        "measured_dirty_rate_mib_s": s.get("measured_dirty_rate_mib_s"),
        "workload_write_rate_mib_s": s.get("workload_write_rate_mib_s"),
        "channel_figures": {"source": s.get("channel_figures", []),
                            "destination": d.get("channel_figures", [])},
    }


def write_outputs(args: argparse.Namespace, s: dict[str, Any], d: dict[str, Any]) -> list[str]:
    """--timeline / --timeline-json from both children's timelines; error lines."""
    from multifd.commands.timeline_options import wants_timeline, write_timeline

    if not wants_timeline(args) or "timeline" not in s:
        return []
    doc = merge_timelines(s["timeline"], d.get("timeline"), s.get("pause_wall"),
                          d.get("resume_wall"))
    return write_timeline(args, doc)


_PHASES = ("setup", "iterate", "switchover", "device-state", "completion")


class ProgressLine:
    """The demo's live status line from the source's progress events: phase, pass,
    done %, remaining, rate, measured dirty rate, ETA and expected downtime. It never runs
    backwards: the phase, the pass and the done fraction only move forward (remaining
    may grow when the guest dirties faster than we send; the fraction holds then)."""

    def __init__(self, size: Callable[[float], str]) -> None:
        self._size = size  # bytes as text (the demo's report format)
        self._phase = 0
        self._pass = 0
        self._done = 0.0

    def text(self, ev: dict[str, Any]) -> str:
        q = ev.get("query", {})
        ram = q.get("ram", {})
        phase = ev.get("phase")
        if phase in _PHASES:
            self._phase = max(self._phase, _PHASES.index(phase))
        self._pass = max(self._pass, ram.get("dirty-sync-count", 1) - 1)
        sent, left = ram.get("transferred", 0), ram.get("remaining", 0)
        if q.get("status") == "completed":
            self._done, left = 1.0, 0
        elif sent + left:
            self._done = max(self._done, sent / (sent + left))
        dirty = ram.get("dirty-pages-rate", 0) * ram.get("page-size", 4096) / MiB
        eta = q.get("x-eta-ms")
        eta_text = "-" if eta is None else f"{eta / 1000:.1f} s"
        return (f"[{_PHASES[self._phase]:>12}] pass {self._pass:>3}  {100 * self._done:5.1f}%  "
                f"remaining {self._size(left):>10}  {ram.get('mbps', 0) / 8:>7.0f} MB/s  "
                f"dirty {dirty:5.0f} MiB/s  ETA {eta_text:>7}  "
                f"expected downtime {q.get('expected-downtime', '-')} ms")
