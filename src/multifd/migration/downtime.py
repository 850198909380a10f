"""Expected downtime, the switchover threshold and the ETA, from measured figures.

QEMU switches over when the pending bytes fit ``bandwidth x downtime-limit``; its
expected-downtime is ``pending / bandwidth``. That leaves out what the switchover costs
whatever is pending, which at several GiB is a large part of the limit:

* the final bitmap sync (and the walk over the whole todo bitmap): measured as the
  duration of the latest live bitmap sync, which does the same work;
* the pipeline: what is already in the kernel's buffers when the source pauses still
  has to reach the destination and be applied before it can resume (measured: 70 ms of
  a 330 ms downtime at 1 GiB). Measured per socket: our unsent bytes (SIOCOUTQ) plus
  what the peer holds unread, the largest receive window it advertised minus the one it
  advertises now (TCP_INFO tcpi_snd_wnd, Linux >= 6.2; 0 where the kernel lacks it).

``expected = fixed + pending / bandwidth`` and the switchover waits until ``pending <=
bandwidth x (limit - fixed)``, so the real downtime stays under the limit.

The bandwidth used is the average over the time since the previous exact check (one
pass, typically), not the last 100 ms window: on a loaded host the window swings by 2x.

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

__all__ = ["DowntimeModel", "PipelineGauge"]

_TCPI_SND_WND = 228  # offset of tcpi_snd_wnd (u32) in struct tcp_info (linux/tcp.h)


class PipelineGauge:
    """Bytes between our sockets and the destination's reads (module docstring): the
    largest reading of the last `WINDOW_S`, as a single reading swings with every burst
    the channels write and the switchover may come at the top of one."""

    WINDOW_S = 1.0

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

    def update(self, now: float, transferred: int, window_bw: float, sync_s: float) -> None:
        """An exact check (after a bitmap sync): the pass's average bandwidth (the window's
        before there is one) and the sync's measured cost."""
        bw = window_bw
        if self._last is not None and now - self._last[0] >= 0.1:
            bw = (transferred - self._last[1]) / ((now - self._last[0]) * 1000)
        self._last = (now, transferred)
        if bw > 0:
            self.bandwidth = bw
        self.sync_ms = sync_s * 1000
        self._refresh()

    def note_pipeline(self, pipeline_bytes: int) -> None:
        """The bytes in the pipeline now (`PipelineGauge`), measured every round."""
        self.pipeline_bytes = pipeline_bytes
        self._refresh()

    def _refresh(self) -> None:
        self.fixed_ms = self.sync_ms + (self.pipeline_bytes / self.bandwidth
                                        if self.bandwidth > 0 else 0.0)

    def bandwidth_now(self, window_bw: float) -> float:
        """The bandwidth for the estimate: the measured pass average once there is one."""
        return self.bandwidth or window_bw

    def threshold(self, window_bw: float, limit_ms: float, factor: float = 1.0) -> float:
        """Pending bytes that fit the limit once the fixed costs are paid."""
        return self.bandwidth_now(window_bw) * factor * max(0.0, limit_ms - self.fixed_ms)

    def expected_ms(self, pending: int, window_bw: float) -> float | None:
        bw = self.bandwidth_now(window_bw)
        return self.fixed_ms + pending / bw if bw > 0 else None

    def eta_ms(self, remaining: int, window_bw: float, dirty_bytes_per_ms: float,
               limit_ms: float) -> float | None:
        bw = self.bandwidth_now(window_bw)
        if bw <= 0 or dirty_bytes_per_ms >= bw:
            return None
        t = self.threshold(window_bw, limit_ms)
        expected = self.expected_ms(min(remaining, int(t)), window_bw) or 0.0
        return max(0.0, remaining - t) / (bw - dirty_bytes_per_ms) + expected
