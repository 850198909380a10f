"""Migration counters, bandwidth measurement, rate limiting and the query-migrate dict.

* `MigrationStats`: thread-safe counters updated by the migration and channel threads.
  ``transferred`` is main-stream + multifd bytes as QEMU counts them (the engine decides
  what it passes in); ``wire_bytes`` is ours: bytes on the wire after compression.
  ``start_downtime`` marks the pause: the total splits there into precopy-bytes and
  downtime-bytes (QEMU's "sent while the guest is stopped").
* `BandwidthMeter`: QEMU's migration_update_counters rule — nothing happens until at least
  BUFFER_DELAY = 100 ms passed since the window began; then bandwidth = bytes in the window
  / window length in ms, and the window restarts.
* `RateLimiter`: a budget of max-bandwidth/10 bytes per 100 ms window covering main and
  multifd bytes; a budget of 0 means no limit (QEMU's RATE_LIMIT_DISABLED); ``disable()``
  at switchover wakes every waiter. Excess spills into the following windows, so large
  packets still average out at the configured rate.
* `query_migrate`: QEMU's MigrationInfo shape with its rules for which members appear in
  which status (``fill_source_migration_info`` / ``fill_destination_migration_info``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from multifd.migration.status import MigrationStatus

__all__ = [
    "BUFFER_DELAY_MS",
    "BandwidthMeter",
    "MigrationStats",
    "RateLimiter",
    "query_migrate",
    "sum_channel_stats",
]

BUFFER_DELAY_MS = 100
XFER_LIMIT_RATIO = 1000 // BUFFER_DELAY_MS  # 10 windows per second

_COUNTERS = (
    "transferred",
    "main_bytes",
    "wire_bytes",
    "remaining",
    "total",
    "duplicate",
    "normal",
    "normal_bytes",
    "dirty_sync_count",
    "dirty_pages_rate",
    "multifd_bytes",
    "precopy_bytes",
    "downtime_bytes",
    "postcopy_bytes",
    "postcopy_requests",
    "pages_per_second",
    "mbps",
    "dirty_sync_missed_zero_copy",
)


class MigrationStats:
    """Counters for one migration; every update and snapshot is atomic under one lock."""

    def __init__(self, page_size: int = 4096) -> None:
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_c", dict.fromkeys(_COUNTERS, 0))
        object.__setattr__(self, "_in_downtime", False)
        object.__setattr__(self, "_pause_transferred", 0)
        self.page_size = page_size

    def __getattr__(self, name: str) -> Any:
        if name in _COUNTERS:
            with self._lock:
                return self._c[name]
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _COUNTERS:
            with self._lock:
                self._c[name] = value
        else:
            object.__setattr__(self, name, value)

    def add(self, **deltas: int) -> None:
        """Atomically add to counters by name, e.g. ``add(duplicate=3, normal=5)``."""
        with self._lock:
            for name, delta in deltas.items():
                self._c[_check(name)] += delta

    def set(self, **values: float) -> None:
        """Atomically set gauges such as remaining, total, mbps, dirty_pages_rate."""
        with self._lock:
            for name, value in values.items():
                self._c[_check(name)] = value

    def start_downtime(self, transferred: int | None = None) -> None:
        """From now on bytes count as downtime-bytes instead of precopy-bytes (switchover).

        ``transferred``: the running total at the pause (default: the counter as it is), so
        `set_transferred` can split later totals into precopy and downtime bytes.
        """
        with self._lock:
            at = self._c["transferred"] if transferred is None else transferred
            object.__setattr__(self, "_pause_transferred", at)
            object.__setattr__(self, "_in_downtime", True)

    def set_transferred(self, n: int) -> None:
        """Set the running total and split it at the pause: what was sent before it is
        precopy-bytes, the rest downtime-bytes (QEMU's mig_stats, no postcopy here)."""
        with self._lock:
            c = self._c
            c["transferred"] = n
            if self._in_downtime:
                c["precopy_bytes"] = self._pause_transferred
                c["downtime_bytes"] = n - self._pause_transferred
            else:
                c["precopy_bytes"] = n
                c["downtime_bytes"] = 0

    def add_main_bytes(self, n: int, wire: int | None = None) -> None:
        """Account ``n`` logical bytes on the main stream (``wire``: bytes actually sent)."""
        self._add_bytes(n, wire, multifd=False)

    def add_multifd_bytes(self, n: int, wire: int | None = None) -> None:
        """Account ``n`` bytes of one multifd packet (``wire``: bytes after compression)."""
        self._add_bytes(n, wire, multifd=True)

    def _add_bytes(self, n: int, wire: int | None, multifd: bool) -> None:
        with self._lock:
            c = self._c
            c["transferred"] += n
            c["wire_bytes"] += n if wire is None else wire
            c["multifd_bytes" if multifd else "main_bytes"] += n
            c["downtime_bytes" if self._in_downtime else "precopy_bytes"] += n

    def add_pages(self, normal: int = 0, zero: int = 0) -> None:
        """Account pages sent: ``normal`` with data, ``zero`` as zero pages (duplicate)."""
        with self._lock:
            self._c["normal"] += normal
            self._c["normal_bytes"] += normal * self.page_size
            self._c["duplicate"] += zero

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._c)

    def ram_info(self, status: MigrationStatus | str) -> dict[str, Any]:
        """The query-migrate ``ram`` member for ``status`` (QEMU's populate_ram_info)."""
        c = self.snapshot()
        ram: dict[str, Any] = {
            "transferred": int(c["transferred"]),
            "total": int(c["total"]),
            "duplicate": int(c["duplicate"]),
            "normal": int(c["normal"]),
            "normal-bytes": int(c["normal_bytes"]),
            "dirty-sync-count": int(c["dirty_sync_count"]),
            "postcopy-requests": int(c["postcopy_requests"]),
            "page-size": self.page_size,
            "multifd-bytes": int(c["multifd_bytes"]),
            "pages-per-second": int(c["pages_per_second"]),
            "precopy-bytes": int(c["precopy_bytes"]),
            "downtime-bytes": int(c["downtime_bytes"]),
            "postcopy-bytes": int(c["postcopy_bytes"]),
            "dirty-sync-missed-zero-copy": int(c["dirty_sync_missed_zero_copy"]),
            "mbps": float(c["mbps"]),
            "wire-bytes": int(c["wire_bytes"]),
        }
        if MigrationStatus(status) is not MigrationStatus.COMPLETED:
            ram["remaining"] = int(c["remaining"])
            ram["dirty-pages-rate"] = int(c["dirty_pages_rate"])
        return ram


def _check(name: str) -> str:
    if name not in _COUNTERS:
        raise AttributeError(f"unknown migration counter {name!r}")
    return name


class BandwidthMeter:
    """Bytes/ms over the last window of at least 100 ms (QEMU's BUFFER_DELAY rule)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self._start_bytes = 0
        self._start_pages = 0
        self._bandwidth = 0.0  # bytes per ms, last full window
        self._mbps = 0.0
        self._pps = 0.0
        self._window_bytes = 0  # bytes moved in the last full window
        self._noted_pages: int | None = None  # latest page total from note_pages

    def bytes_per_ms(self) -> float:
        """Bandwidth of the last full window in bytes/ms (0 before the first window)."""
        with self._lock:
            return self._bandwidth

    def mbps(self) -> float:
        """The same bandwidth in Mbit/s (query-migrate ``mbps``)."""
        with self._lock:
            return self._mbps

    def pages_per_second(self) -> float:
        """Pages sent per second over the last full window (query-migrate pages-per-second)."""
        with self._lock:
            return self._pps

    def note_pages(self, total_pages: int) -> None:
        """Record the running page total for the next `update` that is given none, so the
        byte feed and the page feed can come from different places."""
        with self._lock:
            self._noted_pages = total_pages

    def window_bytes(self) -> int:
        """Bytes moved during the last full window."""
        with self._lock:
            return self._window_bytes

    def reset(self, total_bytes: int = 0, total_pages: int = 0) -> None:
        with self._lock:
            self._start = self._clock()
            self._start_bytes = total_bytes
            self._start_pages = total_pages

    def update(self, total_bytes: int, total_pages: int | None = None) -> float | None:
        """Feed the running byte total; returns the new bandwidth when a window closed."""
        with self._lock:
            now = self._clock()
            elapsed_ms = (now - self._start) * 1000.0
            if elapsed_ms < BUFFER_DELAY_MS:
                return None
            moved = total_bytes - self._start_bytes
            if total_pages is None:
                total_pages = self._noted_pages
            self._window_bytes = moved
            self._bandwidth = moved / elapsed_ms
            self._mbps = moved * 8 / (elapsed_ms / 1000.0) / 1e6
            if total_pages is not None:
                self._pps = (total_pages - self._start_pages) * 1000.0 / elapsed_ms
                self._start_pages = total_pages
            self._start = now
            self._start_bytes = total_bytes
            return self._bandwidth

    add = update  # the name the migration loop uses: feed the running total


class RateLimiter:
    """max-bandwidth/10 bytes per 100 ms window, shared by the migration and channel threads."""

    def __init__(
        self,
        max_bandwidth: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._window_start = clock()
        self._used = 0
        self._budget = 0
        self._disabled = False
        self.set_max_bandwidth(max_bandwidth)

    @property
    def budget(self) -> int:
        """Bytes allowed per 100 ms window; 0 means unlimited."""
        return self._budget

    @property
    def enabled(self) -> bool:
        return not self._disabled and self._budget > 0

    def set_max_bandwidth(self, max_bandwidth: int) -> None:
        """Change the limit at once (migrate-set-parameters during a migration)."""
        if max_bandwidth < 0:
            raise ValueError(f"max_bandwidth must be >= 0, got {max_bandwidth}")
        with self._cond:
            self._budget = max_bandwidth // XFER_LIMIT_RATIO
            self._cond.notify_all()

    def disable(self) -> None:
        """Switch the limit off for good (switchover) and release every waiting thread."""
        with self._cond:
            self._disabled = True
            self._cond.notify_all()

    def _roll(self, now: float) -> None:
        elapsed = now - self._window_start
        if elapsed >= BUFFER_DELAY_MS / 1000:
            windows = int(elapsed / (BUFFER_DELAY_MS / 1000))
            self._window_start += windows * BUFFER_DELAY_MS / 1000
            self._used = max(0, self._used - windows * self._budget)

    def exceeded(self) -> bool:
        """True when this window's budget is used up (QEMU's migration_rate_exceeded)."""
        with self._cond:
            if not self.enabled:
                return False
            self._roll(self._clock())
            return self._used > self._budget

    def _wait_needed(self) -> float:
        if not self.enabled or self._used <= self._budget:
            return 0.0
        windows = math.ceil((self._used - self._budget) / self._budget)
        due = self._window_start + windows * BUFFER_DELAY_MS / 1000
        return max(0.0, due - self._clock())

    def consume(self, n: int, block: bool = True) -> float:
        """Charge ``n`` bytes; wait (if ``block``) until they fit. Returns the wait in seconds.

        With ``block=False`` nothing sleeps and the return value is the wait still needed.
        """
        with self._cond:
            if not self.enabled:
                return 0.0
            now = self._clock()
            self._roll(now)
            self._used += n
            wait = self._wait_needed()
            if not block or wait <= 0:
                return wait
            start = now
            while True:
                self._cond.wait(wait)
                if not self.enabled:
                    break
                self._roll(self._clock())
                wait = self._wait_needed()
                if wait <= 0:
                    break
            return self._clock() - start


def query_migrate(
    status: MigrationStatus | str,
    stats: MigrationStats | None = None,
    *,
    total_time_ms: float | None = None,
    setup_time_ms: float | None = None,
    downtime_ms: float | None = None,
    expected_downtime_ms: float | None = None,
    eta_ms: float | None = None,
    error_desc: str | None = None,
    error: str | None = None,
    role: str = "source",
    socket_address: list[dict[str, Any]] | None = None,
    cpu_throttle_percentage: int | None = None,
) -> dict[str, Any]:
    """Build QEMU's MigrationInfo for ``status`` (times in ms; ``error`` = ``error_desc``).

    Source: ``setup``/``failed``/``cancelled``/``wait-unplug`` report only the status;
    running statuses add total-time, setup-time, expected-downtime, x-eta-ms and ram
    (with remaining); ``completed`` adds total-time, setup-time, downtime and ram without
    remaining. Destination: status only. ``none``: an empty object. ``error-desc``
    appears whenever an error is given (QEMU reports ``s->error`` in any status).
    """
    st = MigrationStatus(status)
    error_desc = error_desc or error
    info: dict[str, Any] = {}
    if st is MigrationStatus.NONE:
        return info
    info["status"] = str(st)
    S = MigrationStatus
    if role == "source" and st not in (S.SETUP, S.FAILED, S.CANCELLED, S.WAIT_UNPLUG):
        if setup_time_ms is not None:
            info["setup-time"] = int(setup_time_ms)
        if total_time_ms is not None:
            info["total-time"] = int(total_time_ms)
        if st in (S.COMPLETED, S.POSTCOPY_ACTIVE):
            if downtime_ms is not None:
                info["downtime"] = int(downtime_ms)
        elif expected_downtime_ms is not None:
            info["expected-downtime"] = int(expected_downtime_ms)
            # ours: time left to completion; null while it cannot converge (or unknown)
            info["x-eta-ms"] = None if eta_ms is None else int(eta_ms)
        if stats is not None:
            info["ram"] = stats.ram_info(st)
        if cpu_throttle_percentage:
            info["cpu-throttle-percentage"] = int(cpu_throttle_percentage)
    elif role not in ("source", "destination"):
        raise ValueError(f"role must be 'source' or 'destination', got {role!r}")
    if role == "destination" and socket_address:
        info["socket-address"] = socket_address
    if error_desc:
        info["error-desc"] = error_desc
    return info


def sum_channel_stats(per_channel: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Add up per-channel counters (Sender/Receiver `channel_stats()`)."""
    out: dict[str, int] = {}
    for ch in per_channel:
        for k, v in ch.items():
            out[k] = out.get(k, 0) + v
    return out
