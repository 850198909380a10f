"""WorkerPool: cap, immediate jobs, wait/error propagation, abort, no leaked threads."""

from __future__ import annotations

import threading
import time

import pytest

from multifd.machine import Aborted, WorkerError, WorkerPool


def _pool_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"{name}-")]


def test_submit_results_and_cap() -> None:
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}

    def job(x: int) -> int:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.01)
        with lock:
            state["now"] -= 1
        return x * x

    with WorkerPool("cap", max_workers=2) as pool:
        jobs = [pool.submit(job, i) for i in range(8)]
        pool.wait(timeout=10)
        assert [j.result() for j in jobs] == [i * i for i in range(8)]
        assert all(j.done() for j in jobs)
        assert state["peak"] <= 2
        assert len(pool.threads) <= 2
        assert all(t.name.startswith("cap-") for t in pool.threads)
    assert not _pool_threads("cap")


def test_submit_immediate_runs_while_cap_is_full() -> None:
    release = threading.Event()
    ran = threading.Event()
    with WorkerPool("imm", max_workers=1) as pool:
        blocker = pool.submit(release.wait, 10)
        queued = pool.submit(lambda: None)
        pool.submit_immediate(ran.set)
        assert ran.wait(5), "immediate job did not start while the only worker was busy"
        assert not blocker.done()
        release.set()
        pool.wait(timeout=10)
        assert queued.done()
    assert not _pool_threads("imm")


def test_wait_reraises_first_error_naming_the_job() -> None:
    def boom() -> None:
        raise KeyError("missing")

    with WorkerPool("err", max_workers=2, abort_on_error=False) as pool:
        ok = pool.submit(lambda: 5)
        bad = pool.submit(boom, name="save bigstate")
        with pytest.raises(WorkerError, match="save bigstate") as info:
            pool.wait(timeout=10)
        assert isinstance(info.value.cause, KeyError)
        assert info.value.job == "save bigstate"
        assert ok.result() == 5
        with pytest.raises(WorkerError):
            bad.result()
        pool.wait(timeout=10)  # reported once
        assert not pool.aborted


def test_error_aborts_siblings_by_default() -> None:
    started = threading.Event()
    seen = {}

    def poller() -> None:
        started.set()
        while True:
            pool.check_abort()
            time.sleep(0.001)

    def fail() -> None:
        started.wait(5)
        raise RuntimeError("load failed")

    pool = WorkerPool("sib", max_workers=2)
    try:
        p = pool.submit(poller)
        pool.submit(fail)
        with pytest.raises(WorkerError, match="load failed"):
            pool.wait(timeout=10)
        assert pool.aborted
        with pytest.raises(Aborted):
            p.result()
        seen["ok"] = True
    finally:
        pool.close(timeout=10)
    assert seen and not _pool_threads("sib")


def test_abort_stops_pollers_and_drops_queued_jobs() -> None:
    started = threading.Event()
    ran_late = threading.Event()

    def poller() -> None:
        started.set()
        while True:
            pool.check_abort()
            time.sleep(0.001)

    pool = WorkerPool("abort", max_workers=1)
    try:
        running = pool.submit(poller)
        late = pool.submit(ran_late.set)
        assert started.wait(5)
        pool.abort()
        assert pool.aborted and pool.abort_event.is_set()
        pool.wait(timeout=10)  # Aborted is not an error
        assert not ran_late.is_set() and late.aborted
        with pytest.raises(Aborted):
            late.result()
        with pytest.raises(Aborted):
            running.result()
        after = pool.submit(ran_late.set)  # submitted after abort: never runs
        assert after.done() and after.aborted
        with pytest.raises(Aborted):
            pool.check_abort()
    finally:
        pool.close(timeout=10)
    assert not _pool_threads("abort")


def test_wait_timeout_and_close_semantics() -> None:
    release = threading.Event()
    pool = WorkerPool("close", max_workers=3)
    pool.submit(release.wait, 10)
    with pytest.raises(TimeoutError):
        pool.wait(timeout=0.05)
    assert pool.outstanding == 1
    release.set()
    pool.close(timeout=10)
    pool.close()  # idempotent
    assert not _pool_threads("close")
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)


def test_close_finishes_queued_jobs_and_many_pools_leak_nothing() -> None:
    before = threading.active_count()
    for i in range(5):
        done = []
        pool = WorkerPool(f"many{i}", max_workers=2)
        for j in range(6):
            pool.submit(done.append, j)
        pool.submit_immediate(done.append, 99)
        pool.close(timeout=10)
        assert sorted(done) == [0, 1, 2, 3, 4, 5, 99]
    assert threading.active_count() == before
