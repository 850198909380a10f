"""Migration counters, the 100 ms bandwidth window, the rate limiter, query-migrate shape."""

from __future__ import annotations

import threading
import time

import pytest

from multifd.migration.stats import BandwidthMeter, MigrationStats, RateLimiter, query_migrate
from multifd.migration.status import MigrationStatus as S

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_counters_threaded() -> None:
    st = MigrationStats()

    def work() -> None:
        for _ in range(1000):
            st.add_multifd_bytes(4096 + 64, wire=100)
            st.add_pages(normal=1, zero=2)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    st.add_main_bytes(10)
    assert st.multifd_bytes == 4000 * 4160
    assert st.main_bytes == 10
    assert st.transferred == 4000 * 4160 + 10
    assert st.wire_bytes == 4000 * 100 + 10
    assert st.normal == 4000 and st.normal_bytes == 4000 * 4096 and st.duplicate == 8000
    assert st.precopy_bytes == st.transferred and st.downtime_bytes == 0
    st.start_downtime()
    st.add_main_bytes(5)
    assert st.downtime_bytes == 5
    st.add(dirty_sync_count=1)
    st.set(remaining=123, total=1 << 30)
    st.mbps = 9.5
    assert st.snapshot()["remaining"] == 123 and st.mbps == 9.5
    with pytest.raises(AttributeError):
        st.add(bogus=1)


def test_bandwidth_meter_waits_for_100ms_window() -> None:
    clk = FakeClock()
    m = BandwidthMeter(clock=clk)
    clk.t += 0.05
    assert m.update(1_000_000) is None  # under BUFFER_DELAY: nothing happens
    assert m.bytes_per_ms() == 0
    clk.t += 0.075  # 125 ms window
    assert m.update(2_500_000, total_pages=500) == pytest.approx(20_000.0)
    assert m.bytes_per_ms() == pytest.approx(20_000.0)
    assert m.mbps() == pytest.approx(2_500_000 * 8 / 0.125 / 1e6)
    assert m.window_bytes() == 2_500_000
    assert m.pages_per_second() == pytest.approx(4000)
    clk.t += 0.1
    assert m.add(3_500_000) == pytest.approx(10_000.0)  # new window starts after the last one


def test_rate_limiter_budget_and_disable() -> None:
    rl = RateLimiter(10 * 1000 * 100)  # 1 MB/s -> 100 kB per 100 ms window
    assert rl.budget == 100_000 and rl.enabled
    assert rl.consume(60_000) == 0
    assert not rl.exceeded()
    assert rl.consume(60_000, block=False) > 0  # over budget: a wait is needed
    assert rl.exceeded()
    rl.disable()
    assert not rl.exceeded() and rl.consume(10**9) == 0


def test_rate_limiter_zero_means_unlimited_like_qemu() -> None:
    for bw in (0, 9):  # max-bandwidth / 10 == 0 -> RATE_LIMIT_DISABLED
        rl = RateLimiter(bw)
        assert not rl.enabled
        assert rl.consume(10**12) == 0 and not rl.exceeded()
    with pytest.raises(ValueError):
        RateLimiter(-1)


def test_rate_limiter_paces_several_threads() -> None:
    rl = RateLimiter(20_000_000)  # 2 MB per window
    sent = [0]
    lock = threading.Lock()

    def chan() -> None:
        for _ in range(10):
            rl.consume(100_000)
            with lock:
                sent[0] += 100_000

    t0 = time.monotonic()
    threads = [threading.Thread(target=chan) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    # 6 MB at 20 MB/s: the first 2 MB are free, the rest needs two more windows.
    assert sent[0] == 6_000_000
    assert 0.15 <= elapsed < 1.5


def test_rate_limiter_disable_wakes_waiters() -> None:
    rl = RateLimiter(1000)  # 100 bytes per window
    rl.consume(100)
    done = threading.Event()
    waited: list[float] = []

    def blocked() -> None:
        waited.append(rl.consume(1_000_000))  # would take ~100 s
        done.set()

    threading.Thread(target=blocked).start()
    time.sleep(0.05)
    rl.disable()
    assert done.wait(2)
    assert waited[0] < 2


def test_rate_limiter_change_at_runtime() -> None:
    rl = RateLimiter(1000)
    rl.consume(10_000, block=False)
    rl.set_max_bandwidth(0)
    assert rl.consume(1, block=False) == 0


def _stats() -> MigrationStats:
    st = MigrationStats()
    st.add_multifd_bytes(8192)
    st.add_pages(normal=2, zero=5)
    st.set(total=1 << 20, remaining=4096, dirty_pages_rate=7, mbps=1.5)
    return st


def test_query_migrate_none_is_empty() -> None:
    assert query_migrate(S.NONE, _stats()) == {}


@pytest.mark.parametrize("status", [S.SETUP, S.CANCELLED, S.WAIT_UNPLUG])
def test_query_migrate_status_only(status: S) -> None:
    info = query_migrate(status, _stats(), total_time_ms=5, setup_time_ms=1,
                         expected_downtime_ms=300)
    assert info == {"status": str(status)}


def test_query_migrate_active() -> None:
    info = query_migrate(S.ACTIVE, _stats(), total_time_ms=1234, setup_time_ms=12,
                         expected_downtime_ms=300, downtime_ms=9)
    assert info["status"] == "active"
    assert info["total-time"] == 1234 and info["setup-time"] == 12
    assert info["expected-downtime"] == 300
    assert "downtime" not in info
    ram = info["ram"]
    for key in ("transferred", "remaining", "total", "duplicate", "normal", "normal-bytes",
                "mbps", "dirty-sync-count", "dirty-pages-rate", "pages-per-second",
                "multifd-bytes", "precopy-bytes", "downtime-bytes", "page-size", "wire-bytes"):
        assert key in ram, key
    assert ram["transferred"] == 8192 and ram["multifd-bytes"] == 8192
    assert ram["duplicate"] == 5 and ram["normal"] == 2 and ram["normal-bytes"] == 8192
    assert ram["remaining"] == 4096 and ram["page-size"] == 4096
    assert ram["mbps"] == 1.5


@pytest.mark.parametrize("status", [S.DEVICE, S.CANCELLING, S.PRE_SWITCHOVER])
def test_query_migrate_other_running_statuses(status: S) -> None:
    info = query_migrate(status, _stats(), total_time_ms=1, setup_time_ms=1,
                         expected_downtime_ms=3)
    assert "ram" in info and "expected-downtime" in info


def test_query_migrate_completed() -> None:
    info = query_migrate(S.COMPLETED, _stats(), total_time_ms=2000, setup_time_ms=10,
                         downtime_ms=42, expected_downtime_ms=300)
    assert info["downtime"] == 42
    assert "expected-downtime" not in info
    assert "remaining" not in info["ram"] and "dirty-pages-rate" not in info["ram"]
    assert info["ram"]["transferred"] == 8192


def test_query_migrate_failed_has_error_desc() -> None:
    info = query_migrate("failed", _stats(), total_time_ms=1, error="multifd channel 1: EOF")
    assert info == {"status": "failed", "error-desc": "multifd channel 1: EOF"}
    info = query_migrate(S.FAILED, None, error_desc="x")
    assert info["error-desc"] == "x"


def test_query_migrate_destination() -> None:
    addr = [{"type": "inet", "host": "127.0.0.1", "port": "4444"}]
    info = query_migrate(S.ACTIVE, _stats(), role="destination", socket_address=addr)
    assert info == {"status": "active", "socket-address": addr}
    with pytest.raises(ValueError):
        query_migrate(S.ACTIVE, role="sideways")


def test_transferred_splits_at_the_pause() -> None:
    st = MigrationStats()
    st.set_transferred(1000)
    assert (st.precopy_bytes, st.downtime_bytes) == (1000, 0)
    st.start_downtime(1200)  # the total at the pause, fresher than the counter
    st.set_transferred(1500)
    assert (st.transferred, st.precopy_bytes, st.downtime_bytes) == (1500, 1200, 300)
    info = query_migrate(S.COMPLETED, st, total_time_ms=10, downtime_ms=1)
    assert info["ram"]["precopy-bytes"] == 1200 and info["ram"]["downtime-bytes"] == 300


def test_bandwidth_meter_pages_from_note_pages() -> None:
    clk = FakeClock()
    m = BandwidthMeter(clock=clk)
    m.note_pages(300)
    clk.t += 0.2
    m.update(1_000_000)  # pages come from the last note: 300 in 200 ms
    assert m.pages_per_second() == pytest.approx(1500)
    m.note_pages(400)
    clk.t += 0.1
    m.update(2_000_000)
    assert m.pages_per_second() == pytest.approx(1000)
