"""A migration's timeline: progress samples, the events that cut it into passes and
phases, and how busy each multifd channel was over time, on each side.

Recorded in memory and written as JSON (``--timeline-json``) or drawn as a picture
(``--timeline``, commands/timeline_plot.py). Nothing here runs on the hot path: the
channels only keep cumulative counters (``busy_ns`` per channel, see multifd/sender.py
and receiver.py); a `Sampler` thread reads them, and the migration's figures, a few times
a second, and the busy time between two samples becomes that interval's busy fraction.
The migration thread adds its events (pass boundaries, phases, the pause) as they happen.

The JSON document (times in ms from the recording's start; ``t0_wall`` is its
``time.time()``, so the two processes of a demo can be put on one axis)::

    {"t0_wall": float,
     "samples": [{"t_ms", "remaining", "transferred", "throughput", "dirty_rate", "pass",
                  "phase", "expected_downtime_ms", "eta_ms"}, ...],   # t_ms ascending
     "events": [{"t_ms", "event", ...}, ...],      # pass / phase / pause / end / resume
     "downtime": [pause_ms, resume_ms] | null,
     "channels": {"source": [{"channel", "busy": [[t0_ms, t1_ms, fraction], ...],
                              "busy_ms", "busy_pct"}, ...],
                  "destination": [...]}}

``throughput`` and ``dirty_rate`` are in MiB/s, ``remaining`` and ``transferred`` in
bytes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["Sampler", "Timeline", "channel_figures", "merge_timelines", "multifd_channels_info",
           "sample_source"]

MiB = 1 << 20
SAMPLE_INTERVAL_S = 0.1
_MIN_FRACTION = 0.005  # busy fractions below this are drawn as idle


class Timeline:
    """Thread-safe recorder of samples, events and channel busy counters."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.t0 = clock()
        self.t0_wall = time.time()
        self.samples: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._busy: dict[str, list[tuple[float, list[int]]]] = {}
        self._last_ms = 0.0

    def now_ms(self) -> float:
        """Milliseconds since the start, never less than any time already recorded."""
        t = (self._clock() - self.t0) * 1000
        self._last_ms = max(self._last_ms, t)
        return round(self._last_ms, 1)

    def sample(self, **fields: Any) -> None:
        with self._lock:
            self.samples.append({"t_ms": self.now_ms(), **fields})

    def event(self, kind: str, /, **fields: Any) -> None:
        with self._lock:
            self.events.append({"t_ms": self.now_ms(), "event": kind, **fields})

    def channels(self, side: str, stats: Sequence[Mapping[str, int]]) -> None:
        """Note each channel's cumulative busy_ns now (Sender/Receiver channel stats)."""
        busy = [int(s.get("busy_ns", 0)) for s in stats]
        with self._lock:
            self._busy.setdefault(side, []).append((self.now_ms(), busy))

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (module docstring); the downtime is set by `merge_timelines`,
        which knows when the destination resumed."""
        with self._lock:
            return {
                "t0_wall": self.t0_wall,
                "samples": list(self.samples),
                "events": list(self.events),
                "downtime": None,
                "channels": {side: _lanes(recs) for side, recs in self._busy.items()},
            }


def _lanes(records: list[tuple[float, list[int]]]) -> list[dict[str, Any]]:
    """Cumulative busy counters sampled over time -> per channel busy intervals."""
    n = max((len(b) for _, b in records), default=0)
    lanes: list[dict[str, Any]] = [{"channel": i, "busy": []} for i in range(n)]
    prev_t, prev = records[0] if records else (0.0, [])  # busy before it: not placed
    for t, busy in records[1:]:
        dt = t - prev_t
        for i, b in enumerate(busy):
            lane = lanes[i]["busy"]
            frac = (b - (prev[i] if i < len(prev) else 0)) / 1e6 / dt if dt > 0 else 0.0
            if frac >= _MIN_FRACTION:
                frac = round(min(frac, 1.0), 3)
                if lane and lane[-1][1] == prev_t and lane[-1][2] == frac:
                    lane[-1][1] = t  # the same load goes on: one interval
                else:
                    lane.append([prev_t, t, frac])
        if dt > 0:
            prev_t, prev = t, busy
    # totals over the recorded span: from the first record to the last
    wall = records[-1][0] - records[0][0] if records else 0.0
    first, last = (records[0][1], records[-1][1]) if records else ([], [])
    for i, lane in enumerate(lanes):
        busy_ms = (last[i] - (first[i] if i < len(first) else 0)) / 1e6 if i < len(last) else 0
        lane["busy_ms"] = round(busy_ms, 1)
        lane["busy_pct"] = round(min(100.0, 100 * busy_ms / wall), 1) if wall else 0.0
    return lanes


class Sampler:
    """Calls ``fn()`` every ``interval`` seconds on a daemon thread until `stop()`, which
    takes one last sample so the end of the migration is on the timeline."""

    def __init__(self, fn: Callable[[], None], interval: float = SAMPLE_INTERVAL_S) -> None:
        self._fn = fn
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="timeline", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._call()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._call()

    def _call(self) -> None:
        try:
            self._fn()
        except Exception:  # a sample is never worth failing a migration for
            pass


def sample_source(timeline: Timeline, source: Any, q: Mapping[str, Any] | None = None) -> None:
    """One sample of a `MigrationSource`: its query-migrate figures (``q``, when the
    caller has just asked for them) and its channels."""
    q = source.query() if q is None else q
    ram = q.get("ram", {})
    page = ram.get("page-size", 4096)
    timeline.sample(
        remaining=ram.get("remaining", 0),
        transferred=ram.get("transferred", 0),
        throughput=round(ram.get("mbps", 0.0) * 1e6 / 8 / MiB, 1),
        dirty_rate=round(ram.get("dirty-pages-rate", 0) * page / MiB, 1),
        # pass: bitmap syncs after the first (which only starts the first pass)
        **{"pass": max(0, ram.get("dirty-sync-count", 1) - 1)},
        phase=getattr(source, "phase", q.get("status")),
        expected_downtime_ms=q.get("expected-downtime"),
        eta_ms=q.get("x-eta-ms"),
    )
    timeline.channels("source", source.channel_stats())


def channel_figures(stats: Sequence[Mapping[str, int]], wall_s: float,
                    side: str = "source") -> list[dict[str, Any]]:
    """Per channel: bytes, packets, busy time (ms and % of ``wall_s``) and waits: on the
    source for a slot (a producer found every channel's slots full: the channels were
    the bottleneck), on the destination at the SYNC barrier (held for the other channels
    and the main stream)."""
    wait = "slot" if side == "source" else "sync"
    out = []
    for i, s in enumerate(stats):
        busy_ms = s.get("busy_ns", 0) / 1e6
        wire = s.get("wire_bytes", s.get("wire_bytes_ram", 0)
                     + s.get("wire_bytes_device_state", 0))
        out.append({
            "channel": i, "bytes": int(wire), "packets": int(s.get("packets", 0)),
            "busy_ms": round(busy_ms, 1),
            "busy_pct": (round(min(100.0, 100 * busy_ms / (wall_s * 1000)), 1)
                         if wall_s > 0 else 0.0),
            f"{wait}_waits": int(s.get(f"{wait}_waits", 0)),
            f"{wait}_wait_ms": round(s.get(f"{wait}_wait_ns", 0) / 1e6, 1),
        })
    return out


def merge_timelines(source: Mapping[str, Any], destination: Mapping[str, Any] | None,
                    pause_wall: float | None = None,
                    resume_wall: float | None = None) -> dict[str, Any]:
    """One document from the source's timeline and the destination's (two processes on
    one host: the destination's times are moved onto the source's axis by wall clock),
    with the downtime from the source's pause to the destination's resume."""
    out = dict(source)
    t0 = float(source["t0_wall"])
    channels = dict(source.get("channels") or {})
    events = list(source.get("events") or [])
    if destination:
        shift = (float(destination["t0_wall"]) - t0) * 1000
        for side, lanes in (destination.get("channels") or {}).items():
            channels[side] = [{**lane, "busy": [[a + shift, b + shift, f]
                                                for a, b, f in lane["busy"]]}
                              for lane in lanes]
        events += [{**e, "t_ms": round(e["t_ms"] + shift, 1), "side": "destination"}
                   for e in destination.get("events") or []]
    if resume_wall:
        events.append({"t_ms": round((resume_wall - t0) * 1000, 1), "event": "resume"})
    events.sort(key=lambda e: e["t_ms"])
    out["events"] = events
    out["channels"] = channels
    if pause_wall and resume_wall:
        out["downtime"] = [round((pause_wall - t0) * 1000, 1),
                           round((resume_wall - t0) * 1000, 1)]
    return out


_QMP_NAMES = {"bytes": "bytes", "packets": "packets", "busy_ms": "busy-time",
              "busy_pct": "busy-percent", "slot_waits": "slot-waits",
              "slot_wait_ms": "slot-wait-time", "sync_waits": "sync-waits",
              "sync_wait_ms": "sync-wait-time"}


def multifd_channels_info(migration: Any, role: str) -> list[dict[str, Any]]:
    """x-query-multifd-channels for one side: a list of MultifdChannelInfo-like objects
    (QEMU's naming: hyphens, times in ms), busy-percent of the migration's time so far."""
    if role == "source":
        stats = migration.channel_stats()
    else:
        rcv = migration.receiver
        stats = list(rcv.channel_stats().values()) if rcv is not None else []
    wall = ((migration.t_end or time.monotonic()) - migration.t_start
            if migration.t_start else 0.0)
    return [{"role": role, "id": f["channel"],
             **{_QMP_NAMES[k]: v for k, v in f.items() if k in _QMP_NAMES}}
            for f in channel_figures(stats, wall, role)]
