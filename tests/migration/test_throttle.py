"""AutoConverge gives QEMU's numbers (migration/ram.c migration_trigger_throttle and
mig_throttle_guest_down): the 1 s period, the 2-periods rule, initial/increment, tailslow's
proportional step, the max-cpu-throttle cap."""

from __future__ import annotations

import pytest

from multifd.migration.params import MigrationParameters
from multifd.migration.throttle import AutoConverge

pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20


def _ac(**params: object) -> AutoConverge:
    return AutoConverge(MigrationParameters(**params), now=0.0)


def _periods(ac: AutoConverge, dirty: int, xfer: int, n: int, t0: float = 0.0
             ) -> list[int | None]:
    """`n` periods of 1.5 s, each dirtying `dirty` and transferring `xfer` bytes."""
    out = []
    sent = ac._xfer_prev
    for k in range(1, n + 1):
        sent += xfer
        out.append(ac.after_bitmap_sync(dirty, sent, t0 + 1.5 * k))
    return out


def test_two_high_periods_start_at_initial_then_add_increment() -> None:
    ac = _ac()
    # dirtied 60 MiB against 50% of 100 MiB sent: over the threshold every period
    got = _periods(ac, 60 * MiB, 100 * MiB, 8)
    assert got == [None, 20, None, 30, None, 40, None, 50]
    assert ac.throttle == 50


def test_below_threshold_does_not_count_and_does_not_reset() -> None:
    ac = _ac()
    assert ac.after_bitmap_sync(60 * MiB, 100 * MiB, 1.5) is None  # high: count 1
    assert ac.after_bitmap_sync(10 * MiB, 200 * MiB, 3.0) is None  # low: count stays 1
    assert ac.dirty_rate_high_cnt == 1
    assert ac.after_bitmap_sync(60 * MiB, 300 * MiB, 4.5) == 20  # second high one
    # exactly the threshold is not above it (QEMU: dirty > xfer * threshold / 100)
    assert _periods(ac, 50 * MiB, 100 * MiB, 4, t0=4.5) == [None, None, None, None]
    assert ac.dirty_rate_high_cnt == 0


def test_period_needs_more_than_one_second_and_sums_its_syncs() -> None:
    ac = _ac()
    # three syncs within the first second: nothing decided, their dirt adds up
    assert ac.after_bitmap_sync(20 * MiB, 40 * MiB, 0.3) is None
    assert ac.after_bitmap_sync(20 * MiB, 70 * MiB, 0.6) is None
    assert ac.after_bitmap_sync(20 * MiB, 100 * MiB, 1.0) is None  # not *more* than 1 s
    assert ac.dirty_rate_high_cnt == 0
    # 1.01 s: the period ends with 70 MiB dirtied vs 50% of 110 MiB sent -> high
    assert ac.after_bitmap_sync(10 * MiB, 110 * MiB, 1.01) is None
    assert ac.dirty_rate_high_cnt == 1
    # the next period starts at 1.01 s and counts from 110 MiB transferred
    assert ac.after_bitmap_sync(60 * MiB, 210 * MiB, 2.02) == 20


def test_threshold_parameter_and_nothing_sent() -> None:
    ac = _ac(**{"throttle-trigger-threshold": 80})
    assert _periods(ac, 70 * MiB, 100 * MiB, 2) == [None, None]  # 70 < 80% of 100
    assert _periods(ac, 90 * MiB, 100 * MiB, 2, t0=3.0) == [None, 20]
    # nothing transferred in a period: any dirt is above the (zero) threshold
    ac2 = _ac()
    assert _periods(ac2, 4096, 0, 2) == [None, 20]


def test_first_period_starts_at_first_sync_without_now() -> None:
    ac = AutoConverge(MigrationParameters())
    assert ac.after_bitmap_sync(60 * MiB, 0, 100.0) is None  # starts the period
    assert ac.after_bitmap_sync(60 * MiB, 100 * MiB, 101.5) is None
    assert ac.dirty_rate_high_cnt == 1


@pytest.mark.parametrize(
    ("dirty_mib", "off", "on"),
    [
        # throttle 50 %, increment 10, threshold 50 % of 100 MiB = 50 MiB:
        # cpu_now = 50, cpu_ideal = int(50 * 50 / dirty)
        (55, 60, 55),    # ideal int(45.45) = 45: step 5
        (51, 60, 51),    # ideal int(49.02) = 49: step 1
        (60, 60, 59),    # ideal int(41.67) = 41: step 9
        (200, 60, 60),   # ideal 12: step 38, capped by the increment 10
        (50 * 1024 + 1, 60, 60),  # far above: capped
    ],
)
def test_tailslow_step_is_proportional_to_the_excess(dirty_mib: int, off: int, on: int
                                                     ) -> None:
    for tailslow, want in ((False, off), (True, on)):
        ac = _ac(**{"cpu-throttle-initial": 50, "cpu-throttle-tailslow": tailslow})
        ac.throttle = 50
        got = _periods(ac, dirty_mib * MiB, 100 * MiB, 2)
        assert got == [None, want], (tailslow, dirty_mib)


def test_tailslow_exact_qemu_arithmetic() -> None:
    """Truncations as QEMU's: dirty threshold with integer division, cpu_ideal cut to an
    integer after the double product."""
    ac = _ac(**{"cpu-throttle-tailslow": True, "cpu-throttle-increment": 30,
                "throttle-trigger-threshold": 33})
    xfer, dirty = 1_000_003, 700_001
    dirty_threshold = xfer * 33 // 100  # 330000
    cpu_now = 100 - 37
    cpu_ideal = int(cpu_now * (dirty_threshold / dirty))  # int(29.699...) = 29
    assert ac.guest_down(dirty, dirty_threshold, throttle_now=37) == 37 + min(
        cpu_now - cpu_ideal, 30) == 67


def test_first_step_is_initial_even_with_tailslow() -> None:
    ac = _ac(**{"cpu-throttle-tailslow": True, "cpu-throttle-initial": 35})
    assert _periods(ac, 60 * MiB, 100 * MiB, 2) == [None, 35]


@pytest.mark.parametrize("tailslow", [False, True])
def test_max_cpu_throttle_caps(tailslow: bool) -> None:
    ac = _ac(**{"cpu-throttle-initial": 80, "cpu-throttle-increment": 15,
                "max-cpu-throttle": 90, "cpu-throttle-tailslow": tailslow})
    got = _periods(ac, 1000 * MiB, 100 * MiB, 6)
    assert got == [None, 80, None, 90, None, 90]


def test_parameters_are_read_at_each_decision_and_current_throttle_wins() -> None:
    params = MigrationParameters()
    ac = AutoConverge(params, now=0.0)
    assert _periods(ac, 60 * MiB, 100 * MiB, 2) == [None, 20]
    params.set({"cpu-throttle-increment": 25})  # migrate-set-parameters mid-migration
    assert _periods(ac, 60 * MiB, 100 * MiB, 2, t0=3.0) == [None, 45]
    # the workload's throttle was switched off meanwhile: start again at initial
    assert ac.after_bitmap_sync(60 * MiB, 500 * MiB, 10.0) is None
    assert ac.after_bitmap_sync(60 * MiB, 600 * MiB, 11.5, throttle_now=0) == 20


def test_reset_starts_a_new_period() -> None:
    ac = _ac()
    ac.after_bitmap_sync(60 * MiB, 100 * MiB, 0.5)  # 60 MiB pending in the period
    ac.reset(0.9, transferred=100 * MiB)
    assert ac.after_bitmap_sync(0, 200 * MiB, 1.5) is None  # only 0.6 s
    assert ac.after_bitmap_sync(0, 200 * MiB, 2.0) is None  # the 60 MiB were dropped
    assert ac.dirty_rate_high_cnt == 0
