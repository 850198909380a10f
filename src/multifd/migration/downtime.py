"""Expected downtime, the switchover threshold and the ETA, from measured figures.

QEMU switches over when the pending bytes fit ``bandwidth x downtime-limit``; its
expected-downtime is ``pending / bandwidth``. That leaves out what the switchover costs
whatever is pending, which at several GiB is a large part of the limit:

* the final bitmap sync (and the walk over the whole todo bitmap). It finds next to
  nothing written (the pause follows an exact check at once), and a sync costs more the
  more pages it finds: estimated as the intercept of cost over pages across the recent
  live syncs, at most the cheapest one's cost;
* the pipeline: what is already in the kernel's buffers when the source pauses still
  has to reach the destination and be applied before it can resume (measured: 70 ms of
  a 330 ms downtime at 1 GiB). Measured per socket: our unsent bytes (SIOCOUTQ) plus
  what the peer holds unread, the largest receive window it advertised minus the one it
  advertises now (TCP_INFO tcpi_snd_wnd, Linux >= 6.2; 0 where the kernel lacks it).

Two rates, both measured between exact checks (one pass, typically; not the last 100 ms
window, which swings by 2x on a loaded host), the sync's time left out:

* ``bandwidth``, the last interval's average: the decision's (and the ETA's) rate;
* ``burst_bandwidth``, the rate of one long send as the switchover's: each interval
  also pays a fixed part (multifd sync, checks) that weighs more as passes shrink; the
  inverse slope of time over bytes across the recent intervals (`_burst_bandwidth`).

``expected = sync + (pipeline + pending) / burst_bandwidth``. The switchover waits
until ``pending <= HEADROOM x bandwidth x (limit - sync - pipeline / bandwidth)``: the
switchover's own rate is not measured before it happens, and was seen at 0.6x to 1.7x
the pass before it (the destination, idle while live, becomes the bottleneck; the
paused guest hands back its CPU); at HEADROOM a send at half the rate still fits the
limit. Pending that fits the whole limit but stops shrinking switches over after
NEAR_MISSES checks, so every migration that converges by QEMU's rule still converges.

ETA: sending ``remaining`` at ``bandwidth`` while the guest dirties ``dirty_rate`` brings
the pending bytes down to the threshold after ``(remaining - threshold) / (bandwidth -
dirty_rate)``, then the switchover takes the expected downtime; None when the dirty rate
is not below the bandwidth (it cannot converge).
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["HEADROOM", "NEAR_MISSES", "DowntimeModel", "PipelineGauge"]

# The share of what the limit leaves after the fixed costs that pending data may take,
# and the checks in a row that fit the whole limit without shrinking (module docstring).
HEADROOM = 0.5
NEAR_MISSES = 3

_TCPI_SND_WND = 228  # offset of tcpi_snd_wnd (u32) in struct tcp_info (linux/tcp.h)


class PipelineGauge:
    """Bytes between our sockets and the destination's reads (module docstring): the
    largest reading of the last `WINDOW_S`, as a single reading swings with every burst
    the channels write and the switchover may come at the top of one. A few rounds, not
    more: a pass that ended with nothing left to send drains the pipeline, and a 1 s
    window still counted the full buffers of the pass before (4 GiB, workload done:
    5.9 MiB, 9 ms of a 12 ms expected downtime, against a real 6 ms)."""

    WINDOW_S = 0.25

    def __init__(self) -> None:
        self._max_wnd: dict[int, int] = {}
        self._recent: deque[tuple[float, int]] = deque()

    def measure(self, socks: Iterable[Any]) -> int:
        now = time.monotonic()
        self._recent.append((now, self._read(socks)))
        while self._recent[0][0] < now - self.WINDOW_S:
            self._recent.popleft()
        return max(n for _, n in self._recent)

    def _read(self, socks: Iterable[Any]) -> int:
        total = 0
        for s in socks:
            try:
                total += struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ,
                                                        b"\0" * 4))[0]
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_SND_WND + 4)
            except (OSError, ValueError, AttributeError):  # closed, or not a TCP socket
                continue
            if len(info) < _TCPI_SND_WND + 4:
                continue
            wnd = struct.unpack_from("I", info, _TCPI_SND_WND)[0]
            top = self._max_wnd[id(s)] = max(self._max_wnd.get(id(s), 0), wnd)
            total += top - wnd
        return total


class DowntimeModel:
    """Fixed switchover costs and bandwidth: the sync's cost and the bandwidth at every
    exact check, the pipeline every round."""

    def __init__(self) -> None:
        self.bandwidth = 0.0  # bytes/ms
        self.fixed_ms = 0.0
        self.sync_ms = 0.0
        self.pipeline_bytes = 0
        self._last: tuple[float, int] | None = None  # (monotonic, transferred)
        self._syncs: list[tuple[int, float]] = []  # recent live syncs: (pages, ms)
        self._passes: list[tuple[int, float]] = []  # recent checks' intervals: (bytes, ms)
        self.burst_bandwidth = 0.0  # bytes/ms: `_burst_bandwidth`
        self.near_misses = 0  # checks in a row fitting the limit, not the headroom
        self._prev_pending = 0  # at the previous exact check

    def update(self, now: float, transferred: int, window_bw: float, sync_s: float,
               sync_pages: int = 0) -> None:
        """An exact check (after a bitmap sync that took `sync_s` and found `sync_pages`
        written): the pass's real throughput (its bytes over its time but the sync's; the
        window's before there is one) and the final sync's cost (`_final_sync_ms`)."""
        bw = window_bw
        if self._last is not None:
            sent, ms = transferred - self._last[1], (now - self._last[0] - sync_s) * 1000
            if sent > 0 and ms > 0:
                self._passes.append((sent, ms))
                del self._passes[:-6]
            if ms >= 100:
                bw = sent / ms
        self._last = (now, transferred)
        if bw > 0:
            self.bandwidth = bw
        self.burst_bandwidth = self._burst_bandwidth()
        self._syncs.append((sync_pages, sync_s * 1000))
        del self._syncs[:-8]
        self.sync_ms = self._final_sync_ms()
        self._refresh()

    def _final_sync_ms(self) -> float:
        """The final sync finds next to nothing written (the pause follows an exact check
        at once), and a sync's cost grows with the pages it finds written (uffd-wp
        protects each again: 1 GiB flat out, live syncs of 8-22 ms, the final one 1-2 ms):
        the intercept of cost over pages across the recent live syncs, at most the
        cheapest one's cost (all of them where the pages hardly vary)."""
        pages = np.array([p for p, _ in self._syncs], dtype=float)
        cost = np.array([c for _, c in self._syncs])
        if pages.size < 2 or np.ptp(pages) <= 0.1 * pages.max():
            return float(cost.min())
        _slope, intercept = np.polyfit(pages, cost, 1)
        return float(min(max(intercept, 0.0), cost.min()))

    def _burst_bandwidth(self) -> float:
        """The rate of one long send, as the switchover's: each interval between checks
        also pays a fixed part (the pass's multifd sync, the checks), which weighs more
        the shorter the passes get (1 GiB flat out: pass averages falling 785 -> 294 MiB/s
        as passes shrank from 400 to 90 ms, the switchover then sending at 488). The
        inverse slope of time over bytes across the recent intervals, kept between the
        last pass's average and twice that; the average itself where they hardly vary."""
        bw = self.bandwidth
        sent = np.array([b for b, _ in self._passes], dtype=float)
        if bw <= 0 or sent.size < 3 or np.ptp(sent) <= 0.3 * sent.max():
            return bw
        slope, _ = np.polyfit(sent, np.array([ms for _, ms in self._passes]), 1)
        return float(min(max(1 / slope, bw), 2 * bw)) if slope > 0 else 2 * bw

    def note_pipeline(self, pipeline_bytes: int) -> None:
        """The bytes in the pipeline now (`PipelineGauge`), measured every round."""
        self.pipeline_bytes = pipeline_bytes
        self._refresh()

    def _refresh(self) -> None:
        self.fixed_ms = self.sync_ms + (self.pipeline_bytes / self.bandwidth
                                        if self.bandwidth > 0 else 0.0)

    def figures(self) -> dict[str, float]:
        """What the estimate is made of (the timeline's pause event)."""
        return {"bandwidth_mib_s": round(self.bandwidth * 1000 / (1 << 20), 1),
                "fixed_ms": round(self.fixed_ms, 1), "sync_ms": round(self.sync_ms, 1),
                "pipeline_bytes": self.pipeline_bytes,
                "burst_mib_s": round(self.burst_bandwidth * 1000 / (1 << 20), 1)}

    def bandwidth_now(self, window_bw: float) -> float:
        """The bandwidth for the estimate: the measured pass average once there is one."""
        return self.bandwidth or window_bw

    def threshold(self, window_bw: float, limit_ms: float, factor: float = 1.0,
                  headroom: float = HEADROOM) -> float:
        """Pending bytes whose sending fits `headroom` of what the limit leaves once the
        fixed costs are paid."""
        return (self.bandwidth_now(window_bw) * factor * headroom
                * max(0.0, limit_ms - self.fixed_ms))

    def fits(self, pending: int, window_bw: float, limit_ms: float,
             factor: float = 1.0) -> bool:
        """The switchover decision at an exact check: `pending` fits the threshold, or it
        fits the whole limit and has not shrunk by a tenth since the previous check, at
        the `NEAR_MISSES`-th such check in a row (the headroom would otherwise keep a
        migration that converges by QEMU's rule from ever completing)."""
        stuck = pending > 0.9 * self._prev_pending
        self._prev_pending = pending
        if pending <= self.threshold(window_bw, limit_ms, factor):
            return True
        if stuck and pending <= self.threshold(window_bw, limit_ms, factor, headroom=1.0):
            self.near_misses += 1
            return self.near_misses >= NEAR_MISSES
        self.near_misses = 0
        return False

    def expected_ms(self, pending: int, window_bw: float) -> float | None:
        """The final sync, then the pipeline and `pending` at the burst rate (the
        threshold takes the pass average: the lower one, where the decision errs)."""
        bw = self.burst_bandwidth or self.bandwidth_now(window_bw)
        return self.sync_ms + (self.pipeline_bytes + pending) / bw if bw > 0 else None

    def eta_ms(self, remaining: int, window_bw: float, dirty_bytes_per_ms: float,
               limit_ms: float) -> float | None:
        bw = self.bandwidth_now(window_bw)
        if bw <= 0 or dirty_bytes_per_ms >= bw:
            return None
        t = self.threshold(window_bw, limit_ms)
        expected = self.expected_ms(min(remaining, int(t)), window_bw) or 0.0
        return max(0.0, remaining - t) / (bw - dirty_bytes_per_ms) + expected
