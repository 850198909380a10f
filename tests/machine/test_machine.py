"""Machine: contents, checksum, run state, pause at safe points, throttle, devices."""

from __future__ import annotations

import threading
import time

import pytest

from multifd.machine import (
    BytesDevice,
    DeviceStateError,
    Machine,
    RamBlock,
    RunState,
    StateBufferQueue,
    copy_state,
)


def _machine() -> Machine:
    return Machine(
        [RamBlock("pc.ram", 64 * 4096), RamBlock("pc.bios", 4096)],
        [BytesDevice("serial", b"abc"), BytesDevice("cpu", b"\x01", instance_id=1)],
    )


def test_contents_lookup_and_checksum() -> None:
    with _machine() as m:
        assert list(m.blocks) == ["pc.ram", "pc.bios"]
        assert m.block("pc.bios").used_length == 4096
        assert m.total_ram() == 65 * 4096
        assert [d.idstr for d in m.devices] == ["serial", "cpu"]
        assert m.device("cpu", 1).save_state() == b"\x01"
        with pytest.raises(KeyError):
            m.block("nope")
        with pytest.raises(KeyError):
            m.device("cpu")
        with pytest.raises(ValueError):
            m.add_block(RamBlock("pc.ram", 4096))
        with pytest.raises(ValueError):
            m.add_device(BytesDevice("serial"))
        first = m.checksum()
        assert first == m.checksum()
        m.block("pc.ram").write(100, b"x")
        second = m.checksum()
        assert second != first
        m.device("serial").load_state(b"abd", 1)
        assert m.checksum() != second
        # device order does not matter, block contents and device state do
        with Machine(
            [RamBlock("pc.ram", 64 * 4096), RamBlock("pc.bios", 4096)],
            [BytesDevice("cpu", b"\x01", instance_id=1), BytesDevice("serial", b"abd")],
        ) as other:
            other.block("pc.ram").write(100, b"x")
            assert other.checksum() == m.checksum()


def test_bytes_device_rejects_newer_version() -> None:
    dev = BytesDevice("d", b"1", version_id=2)
    dev.load_state(b"2", 1)
    assert dev.save_state() == b"2"
    with pytest.raises(DeviceStateError):
        dev.load_state(b"3", 3)
    with pytest.raises(DeviceStateError):
        dev.load_state_buffer(0, b"x", True)
    assert not dev.is_live() and not dev.uses_multifd_state()


def test_run_state_without_workload_and_events() -> None:
    m = _machine()
    events: list[tuple[str, RunState]] = []
    m.on_state_change.append(lambda ev, st: events.append((ev, st)))
    assert m.state is RunState.PRELAUNCH and not m.is_running
    m.start()
    assert m.is_running and m.resumed_at is not None
    assert m.workload_threads == 0
    m.pause(timeout=0)  # no workload thread: nothing to wait for, even with no time at all
    assert m.state is RunState.PAUSED and m.paused_at is not None
    assert m.pause() == 0.0  # already stopped: no second STOP
    m.set_state(RunState.POSTMIGRATE)
    assert m.state is RunState.POSTMIGRATE
    m.resume()
    m.resume()  # already running: no second RESUME
    assert events == [
        ("RESUME", RunState.RUNNING),
        ("STOP", RunState.PAUSED),
        ("RESUME", RunState.RUNNING),
    ]
    with pytest.raises(RuntimeError):
        m.set_incoming()
    m.pause()
    m.set_incoming()
    assert m.state is RunState.INMIGRATE
    incoming = Machine(devices=[BytesDevice("x")], incoming=True)
    assert incoming.state is RunState.INMIGRATE
    incoming.finish_incoming()
    assert incoming.state is RunState.PAUSED
    incoming.resume()
    assert incoming.is_running
    m.close()


class _Worker:
    """A workload thread: each step is a short critical section between safe points."""

    def __init__(self, m: Machine, step_s: float = 0.001) -> None:
        self.m = m
        self.step_s = step_s
        self.steps = 0
        self.in_step = False
        self.violations = 0
        self.cancel = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.sleep = time.sleep  # the step's work (a test may hold a step with it)

    def _run(self) -> None:
        with self.m.workload():
            while self.m.safe_point(self.cancel):
                self.in_step = True
                if not self.m.is_running:
                    self.violations += 1
                self.sleep(self.step_s)
                self.steps += 1
                self.in_step = False

    def stop(self) -> None:
        self.cancel.set()
        self.m.kick()
        self.thread.join(5)
        assert not self.thread.is_alive()


def test_pause_waits_for_safe_point_and_resume_continues() -> None:
    m = Machine()
    w = _Worker(m, step_s=0.005)
    m.start()
    w.thread.start()
    try:
        deadline = time.monotonic() + 5
        while w.steps == 0:
            assert time.monotonic() < deadline, "the workload never ran"
            time.sleep(0.005)
        # Hold the workload inside a step: pause() must wait for it to leave.
        inside, release = threading.Event(), threading.Event()
        step_s = w.step_s

        def held_sleep(_s: float) -> None:
            inside.set()
            release.wait(10)

        w.sleep = held_sleep
        assert inside.wait(5)
        took: list[float] = []
        pauser = threading.Thread(target=lambda: took.append(m.pause(timeout=10)))
        pauser.start()
        pauser.join(0.1)
        assert pauser.is_alive() and w.in_step  # waiting for the step in progress
        assert m.state is RunState.PAUSED  # no new step may start meanwhile
        w.sleep = lambda _s: time.sleep(step_s)
        release.set()
        pauser.join(10)
        assert not pauser.is_alive() and len(took) == 1
        assert not w.in_step and w.violations == 0
        frozen = w.steps
        time.sleep(0.05)
        assert w.steps == frozen and not w.in_step
        m.resume()
        deadline = time.monotonic() + 5
        while w.steps == frozen and time.monotonic() < deadline:
            time.sleep(0.005)
        assert w.steps > frozen
    finally:
        w.stop()
    assert m.workload_threads == 0


def test_pause_timeout_restores_running() -> None:
    m = Machine()
    m.start()
    inside = threading.Event()
    release = threading.Event()

    def long_step() -> None:
        with m.workload():
            inside.set()
            release.wait(5)  # no safe point for a long time

    t = threading.Thread(target=long_step)
    t.start()
    assert inside.wait(5)
    with pytest.raises(TimeoutError):
        m.pause(timeout=0.05)
    assert m.is_running
    release.set()
    t.join(5)
    assert m.workload_threads == 0
    m.pause(timeout=0)  # the thread left: nothing to wait for, not even for a moment
    assert m.state is RunState.PAUSED


def test_stop_a_paused_workload_via_cancel() -> None:
    m = Machine()
    w = _Worker(m)
    w.thread.start()  # never started: the workload waits at its first safe point
    time.sleep(0.02)
    assert w.steps == 0
    assert m.pause(timeout=1) == 0.0
    w.stop()
    assert w.steps == 0 and w.violations == 0


def _steps_in(m: Machine, seconds: float) -> int:
    w = _Worker(m, step_s=0.002)
    w.thread.start()
    time.sleep(seconds)
    w.stop()
    return w.steps


def test_throttle_slows_the_workload() -> None:
    m = Machine()
    m.start()
    free = _steps_in(m, 0.3)
    m.set_throttle(75)  # run 25% of the time
    assert m.throttle == 75
    throttled = _steps_in(m, 0.3)
    m.set_throttle(0)
    assert free > 20
    assert throttled < 0.5 * free, (free, throttled)
    with pytest.raises(ValueError):
        m.set_throttle(100)


def test_throttled_workload_still_pauses_promptly() -> None:
    """The throttle's sleep counts as parked: at 99 % a 50 ms step is followed by ~5 s of
    throttle sleep, and pause() does not wait for that sleep to end."""
    m = Machine()
    m.start()
    m.set_throttle(99)
    w = _Worker(m, step_s=0.05)
    w.thread.start()
    try:
        deadline = time.monotonic() + 30  # (a late first safe point is throttled too)
        while w.steps == 0:  # one step done: the worker is in (or entering) its sleep
            assert time.monotonic() < deadline, "the workload never ran"
            time.sleep(0.005)
        m.pause(timeout=2)  # TimeoutError if it waited for the ~5 s throttle sleep
        assert w.steps == 1 and not w.in_step
    finally:
        w.stop()


def test_state_buffer_queue_order_errors_and_backpressure() -> None:
    q = StateBufferQueue("dev", max_pending_bytes=10)
    q.put(2, b"cc", False)
    q.put(0, b"aa", False)
    with pytest.raises(DeviceStateError, match="duplicate"):
        q.put(2, b"cc", False)
    q.put(3, b"dd", True)
    with pytest.raises(DeviceStateError, match="past the final"):
        q.put(4, b"ee", False)
    with pytest.raises(DeviceStateError, match="second CONFIG"):
        q.put(1, b"bb", True)
    got = list(q.drain(block=False))
    assert [i for i, _, _ in got] == [0]
    with pytest.raises(DeviceStateError, match="duplicate"):
        q.put(0, b"aa", False)
    with pytest.raises(DeviceStateError, match="missing state buffer idx=1"):
        q.check_complete()
    q.put(1, b"bb", False)
    rest = list(q.drain())
    assert rest == [(1, b"bb", False), (2, b"cc", False), (3, b"dd", True)]
    q.check_complete()

    # back-pressure: out-of-order bytes over the cap block until the next index arrives
    q = StateBufferQueue("bp", max_pending_bytes=8)
    q.put(1, b"x" * 6, False)
    blocked = threading.Thread(target=q.put, args=(2, b"y" * 6, False))
    blocked.start()
    time.sleep(0.05)
    assert blocked.is_alive() and q.pending_bytes == 6
    q.put(0, b"z", False)  # the next index always gets in
    out = []
    stop = threading.Event()

    def drain() -> None:
        for idx, _d, _c in q.drain(stop):
            out.append(idx)
            if idx == 2:
                return

    d = threading.Thread(target=drain)
    d.start()
    blocked.join(5)
    d.join(5)
    assert out == [0, 1, 2] and q.peak_pending_bytes <= 13

    q = StateBufferQueue("ab")
    with pytest.raises(DeviceStateError, match="CONFIG_STATE buffer never arrived"):
        q.check_complete()
    abort = threading.Event()
    abort.set()
    with pytest.raises(DeviceStateError, match="aborted"):
        list(q.drain(abort))
    q.abort()
    with pytest.raises(DeviceStateError, match="aborted"):
        q.put(0, b"x", False)


def test_copy_state_requires_stopped_source_and_matching_blocks() -> None:
    with _machine() as src, _machine() as dst:
        src.block("pc.ram").write(0, b"hello")
        src.device("serial").load_state(b"xyz", 1)
        src.start()
        with pytest.raises(RuntimeError):
            copy_state(src, dst)
        src.pause()
        copy_state(src, dst)
        assert dst.checksum() == src.checksum()
        small = Machine([RamBlock("pc.ram", 4096), RamBlock("pc.bios", 4096)])
        with small, pytest.raises(ValueError):
            copy_state(src, small)
