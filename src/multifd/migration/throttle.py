"""Auto-converge: QEMU's ``migration_trigger_throttle`` and ``mig_throttle_guest_down``.

A pure decision object: the caller reports every dirty-bitmap sync (the bytes it found
dirty, the bytes transferred so far, the clock) and applies the percentage it returns to
the workload. Kept apart from the migration thread so QEMU's numbers can be checked
without a migration (tests/migration/test_throttle.py).

QEMU (migration/ram.c, ``migration_bitmap_sync``): a *period* ends at the first bitmap
sync more than 1 s after it began. At its end, if the bytes dirtied in it exceed
``throttle-trigger-threshold`` % of the bytes transferred in it, a counter goes up; when
it reaches 2 (periods in between that stay below do not reset it) it goes back to 0 and
the guest is throttled down:

* not throttled yet: ``cpu-throttle-initial``;
* else, ``cpu-throttle-tailslow`` off: the current percentage + ``cpu-throttle-increment``;
* else (tailslow on): ``cpu_now = 100 - current``, ``cpu_ideal = cpu_now * threshold_bytes
  / dirty_bytes`` (truncated, uint64), increment ``min(cpu_now - cpu_ideal,
  cpu-throttle-increment)``: near the end, where dirtying only just outruns sending, the
  steps get smaller;

capped at ``max-cpu-throttle`` and clamped to 1..99 (``cpu_throttle_set``). Parameters are
read at each decision, so ``migrate-set-parameters`` during a migration applies as in QEMU.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CPU_THROTTLE_PCT_MAX", "CPU_THROTTLE_PCT_MIN", "PERIOD_S", "AutoConverge"]

PERIOD_S = 1.0  # migration_bitmap_sync: "more than 1 second"
CPU_THROTTLE_PCT_MIN = 1  # system/cpu-throttle.c
CPU_THROTTLE_PCT_MAX = 99


class AutoConverge:
    """The auto-converge state of one migration (RAMState's period counters).

    `params` is anything with QEMU-named ``get`` (a MigrationParameters). The period
    starts at `now`, or at the first reported sync when None (QEMU starts it at the first
    bitmap sync, with nothing transferred yet).
    """

    def __init__(self, params: Any, *, now: float | None = None, transferred: int = 0) -> None:
        self.params = params
        self.throttle = 0  # the percentage last decided (cpu_throttle_get_percentage)
        self.dirty_rate_high_cnt = 0
        self._period_start = now
        self._xfer_prev = transferred
        self._dirty_period = 0

    def reset(self, now: float, transferred: int = 0) -> None:
        """Start a new period at `now` (QEMU's mig_throttle_counter_reset)."""
        self._period_start = now
        self._xfer_prev = transferred
        self._dirty_period = 0

    def after_bitmap_sync(self, dirty_bytes: int, transferred: int, now: float, *,
                          throttle_now: int | None = None) -> int | None:
        """Report one bitmap sync: `dirty_bytes` newly dirty in it, `transferred` bytes so
        far (main stream + multifd), `now` (monotonic seconds).

        Returns the new throttle percentage to apply, or None when this sync leaves it
        alone. `throttle_now` is the workload's current percentage (default: the last one
        returned).
        """
        if self._period_start is None:
            self._period_start = now
        self._dirty_period += dirty_bytes
        if not now - self._period_start > PERIOD_S:
            return None
        pct = self._trigger(self._dirty_period, transferred - self._xfer_prev, throttle_now)
        self.reset(now, transferred)
        return pct

    def _trigger(self, dirty: int, xfer: int, throttle_now: int | None) -> int | None:
        """migration_trigger_throttle: twice over the threshold, throttle down."""
        threshold = int(self.params.get("throttle-trigger-threshold"))
        dirty_threshold = max(xfer, 0) * threshold // 100
        if dirty > dirty_threshold:
            self.dirty_rate_high_cnt += 1
            if self.dirty_rate_high_cnt >= 2:
                self.dirty_rate_high_cnt = 0
                return self.guest_down(dirty, dirty_threshold, throttle_now)
        return None

    def guest_down(self, dirty: int, dirty_threshold: int,
                   throttle_now: int | None = None) -> int:
        """mig_throttle_guest_down: the next percentage (see the module docstring)."""
        p = self.params
        current = self.throttle if throttle_now is None else int(throttle_now)
        if current == 0:  # not throttling yet (cpu_throttle_active)
            new = int(p.get("cpu-throttle-initial"))
        else:
            increment = int(p.get("cpu-throttle-increment"))
            if p.get("cpu-throttle-tailslow"):
                cpu_now = 100 - current
                # uint64 = double: C truncates toward zero, as int() does. The trigger
                # calls with dirty > dirty_threshold >= 0; other callers get no negative step.
                ratio = dirty_threshold * 1.0 / dirty if dirty > 0 else 1.0
                cpu_ideal = int(cpu_now * ratio)
                inc = min(max(cpu_now - cpu_ideal, 0), increment)
            else:
                inc = increment
            new = min(current + inc, int(p.get("max-cpu-throttle")))
        new = max(CPU_THROTTLE_PCT_MIN, min(new, CPU_THROTTLE_PCT_MAX))
        self.throttle = new
        return new
