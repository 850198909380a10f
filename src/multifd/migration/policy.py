"""Timeout policies of a migration: stall and completion timeouts, idle peers.

QEMU has no such policies; management layers grew their own (KubeVirt's progressTimeout
and completionTimeoutPerGiB, Cloud Hypervisor's timeout_s + timeout_strategy). Here they
are migration parameters with ``x-`` names (params.py), read live, so
``migrate-set-parameters`` during a migration applies at the next check:

* ``x-progress-timeout`` (s, 0 = off): the source fails when ``remaining`` has not reached
  a new low for that long; the error gives the last figures.
* ``x-completion-timeout`` (s) + ``x-completion-timeout-per-gib`` (s per GiB of RAM): the
  effective limit is their **sum** (a fixed part for setup and switchover plus a part that
  grows with the RAM to move), 0 when both are 0 (off). When the live phase runs past it,
  ``x-timeout-strategy`` decides: ``cancel`` fails (the machine keeps running, its state
  untouched), ``switchover`` switches over at once, accepting a downtime above
  ``downtime-limit`` (reported as ``x-timeout-action`` in query-migrate), ``throttle``
  throttles the workload down now and keeps auto-converge on for the rest of the
  migration. It acts once per migration.
* ``x-idle-timeout`` (s, 0 = off; default 30): a peer that stays connected but moves
  nothing on any channel for that long fails the migration, naming the channels and how
  long each was silent (longest first). On the destination "moves" means bytes received
  (main) or packets completed (multifd), and time its loader spends applying what came
  (not waiting for the source) does not count; on the source, bytes the kernel accepted.
  Checked once every connection is made until the end of the stream (EOF). 30 s is
  far above any legitimate pause (a bitmap sync or a switchover takes well under a
  second) yet bounds a silent peer (SIGSTOPped, a hung host, a black-holed link) that TCP
  alone would wait on for minutes or forever.
* ``x-accept-timeout`` (s, 0 = unbounded; default 30, the old fixed constant): how long a
  destination waits for the source's connections and their init packets. Kept apart from
  x-idle-timeout: before the first connection there is no peer to be idle, and a short
  idle timeout must not make the destination give up on a source that starts slowly.
* ``x-confirm-timeout`` (s, default 5): the end-of-stream handshake on both ends (the
  source waits this long for the destination's close of main, the destination as long
  for the source to close every multifd channel after EOF).

`SourcePolicy` decides the source's timeouts and `Watchdog` is the thread that applies
them: it samples per-channel progress counters (a blocked sender or receiver cannot
report its own silence) and runs the source's checks every 0.2 s, because the migration
thread can sit in one rate-limited send for seconds. Failing means what migrate_cancel
does (abort the channels, so every blocked thread wakes up), with the policy's error.
Switchover and throttle are applied by the migration thread between iterations.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "STRATEGIES",
    "UNBOUNDED_ACCEPT_S",
    "PolicyError",
    "SourcePolicy",
    "Watchdog",
    "accept_timeout_s",
    "completion_timeout_s",
]

GiB = 1 << 30
MiB = 1 << 20
STRATEGIES = ("cancel", "switchover", "throttle")
UNBOUNDED_ACCEPT_S = 1e6  # x-accept-timeout 0: the accept wait is, in effect, unbounded
_POLL_S = 0.2


class PolicyError(Exception):
    """A migration failed by a timeout policy; str() names the parameter."""


def completion_timeout_s(params: Any, ram_bytes: int) -> float:
    """The effective x-completion-timeout: fixed part + per-GiB part (0 = off)."""
    return float(params.get("x-completion-timeout")) + (
        float(params.get("x-completion-timeout-per-gib")) * ram_bytes / GiB)


def accept_timeout_s(params: Any) -> float:
    """How long a destination waits for the source's connections: x-accept-timeout."""
    return float(params.get("x-accept-timeout")) or UNBOUNDED_ACCEPT_S


def _figures(stats: Any) -> str:
    page = int(getattr(stats, "page_size", 4096) or 4096)
    return (f"remaining {int(stats.remaining) / MiB:.1f} MiB, pass {int(stats.dirty_sync_count)},"
            f" throughput {float(stats.mbps):.1f} Mbit/s, dirty rate "
            f"{int(stats.dirty_pages_rate) * page / MiB:.1f} MiB/s")


class SourcePolicy:
    """Progress and completion timeouts of one outgoing migration (see the module doc).

    `check` runs on the watchdog thread (the migration thread may sit in one rate-limited
    send for seconds): it raises PolicyError to fail, and records the strategy to apply,
    which the migration thread collects with `take` between iterations.
    """

    def __init__(self, params: Any) -> None:
        self.params = params
        self.action: str | None = None  # the completion strategy applied, once
        self._pending: str | None = None
        self._t0 = 0.0
        self._ram = 0
        self._best: int | None = None
        self._t_best = 0.0

    def reset(self, t_start: float, ram_bytes: int) -> None:
        self._t0 = self._t_best = t_start
        self._ram = ram_bytes
        self._best = None
        self.action = self._pending = None

    def check(self, now: float, stats: Any) -> None:
        remaining = int(stats.remaining)
        if self._best is None or remaining < self._best:
            self._best, self._t_best = remaining, now
        progress = float(self.params.get("x-progress-timeout"))
        if progress and now - self._t_best >= progress:
            raise PolicyError(
                f"x-progress-timeout: remaining has not gone down for {progress:g} s (lowest "
                f"{self._best / MiB:.1f} MiB, {now - self._t_best:.1f} s ago); the source "
                f"keeps running; last figures: {_figures(stats)}")
        limit = completion_timeout_s(self.params, self._ram)
        if limit and self.action is None and now - self._t0 >= limit:
            strategy = str(self.params.get("x-timeout-strategy"))
            self.action = strategy
            if strategy == "cancel":
                raise PolicyError(
                    f"x-completion-timeout: the migration did not complete within {limit:g} s "
                    f"(x-timeout-strategy cancel: the source keeps running); last figures: "
                    f"{_figures(stats)}")
            self._pending = strategy

    def take(self) -> str | None:
        """The strategy to apply now ("switchover", "throttle"), once."""
        action, self._pending = self._pending, None
        return action

    def annotate(self, info: dict[str, Any]) -> dict[str, Any]:
        """query-migrate: ``x-timeout-action`` once the completion strategy acted."""
        if self.action is not None:
            info["x-timeout-action"] = self.action
        return info


class Watchdog:
    """A thread that fails a migration whose peer moves nothing on any channel, and runs
    the source's other checks where a blocked migration thread cannot.

    `counters()` returns, per channel name, a number that grows while the channel moves
    (bytes, packets). When none has changed for `timeout()` seconds (0 = off, read at
    every poll) `on_fail(message)` is called, once. `hold(True)` marks the local side busy
    (not waiting for the peer): while held, silence does not count. `check(now)`, when
    given, runs at every poll; a PolicyError it raises fails the migration the same way.
    """

    def __init__(self, counters: Callable[[], Mapping[str, int]], timeout: Callable[[], float],
                 on_fail: Callable[[str], None], *, peer: str, verb: str,
                 check: Callable[[float], None] | None = None) -> None:
        self._counters = counters
        self._timeout = timeout
        self._on_fail = on_fail
        self._check = check
        self._peer = peer
        self._verb = verb
        self._stop = threading.Event()
        self._held = False
        self._seen: dict[str, tuple[int, float]] = {}  # name -> (counter, when it changed)
        self._thread: threading.Thread | None = None
        self.fired: str | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="migration-watchdog",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop watching (idempotent; does not wait for the thread)."""
        self._stop.set()

    def hold(self, busy: bool) -> None:
        self._held = busy

    def _run(self) -> None:
        while not self._stop.wait(_POLL_S):
            now = time.monotonic()
            try:
                if self._check is not None:
                    self._check(now)
                message = self.idle(now)
            except PolicyError as exc:
                message = str(exc)
            except Exception:  # a migration closing under us: its counters may be gone
                continue
            if message is not None and not self._stop.is_set():
                self.fired = message
                self._stop.set()
                self._on_fail(message)

    def idle(self, now: float) -> str | None:
        """One look at the counters; the failure message when the peer is idle."""
        counters = self._counters()
        for name, value in counters.items():
            old = self._seen.get(name)
            if old is None or old[0] != value or self._held:
                self._seen[name] = (value, now)
        limit = float(self._timeout())
        silent = {name: now - t for name, (_v, t) in self._seen.items() if name in counters}
        if not limit or not silent or min(silent.values()) < limit:
            return None
        detail = ", ".join(f"{name} silent {s:.1f} s"
                           for name, s in sorted(silent.items(), key=lambda kv: -kv[1]))
        return (f"x-idle-timeout: the {self._peer} {self._verb} nothing on any channel for "
                f"{limit:g} s while staying connected ({detail})")
