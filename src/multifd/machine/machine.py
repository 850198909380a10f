"""Machine: RAM blocks + devices + run state, and the workload's safe points.

A workload thread registers with ``with machine.workload():`` and calls
``machine.safe_point()`` between steps. ``pause()`` flips the run state and waits until every
registered workload thread sits in a safe point (so memory and device state are quiescent,
like QEMU's vm_stop waiting for vCPUs); ``resume()`` lets them go. Throttling (QEMU's
cpu-throttle, used by auto-converge) is applied inside ``safe_point``: after each 10 ms of
running, the thread sleeps so that it runs ``(100 - p)%`` of the time. A thread sleeping
for throttle or pacing counts as parked, so a pause never waits for it.

``machine.array(name, shape, dtype)`` is the short way to migrate numpy state: the array's
memory is a RAM block with kernel write tracking (``tracking="auto"``), so writers need no
marking; the destination declares the same arrays and receives their contents.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from .device import Device, join_buffer
from .ramblock import RamBlock

__all__ = ["Machine", "RunState", "copy_state"]

# QEMU's cpu throttle timeslice: sleep decisions are made per 10 ms of running.
THROTTLE_TIMESLICE = 0.010


class RunState(enum.Enum):
    """Run states, with QEMU's ``query-status`` names."""

    PRELAUNCH = "prelaunch"
    INMIGRATE = "inmigrate"
    RUNNING = "running"
    PAUSED = "paused"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"


StateCallback = Callable[[str, RunState], None]


class Machine:
    """What migrates: ordered RAM blocks, devices keyed by (idstr, instance_id), run state."""

    def __init__(
        self,
        blocks: Iterable[RamBlock] = (),
        devices: Iterable[Device] = (),
        *,
        incoming: bool = False,
    ) -> None:
        self._blocks: dict[str, RamBlock] = {}
        self._devices: dict[tuple[str, int], Device] = {}
        for block in blocks:
            self.add_block(block)
        for device in devices:
            self.add_device(device)
        self._cond = threading.Condition()
        self._hold = 0  # quiesced() sections in progress: safe points block meanwhile
        self._state = RunState.INMIGRATE if incoming else RunState.PRELAUNCH
        self._active = 0  # registered workload threads currently between safe points
        self._registered = 0
        self._throttle = 0
        self.on_state_change: list[StateCallback] = []
        self.paused_at: float | None = None  # time.time() of the last completed pause
        self.resumed_at: float | None = None  # time.time() of the last resume/start

    # -- contents --------------------------------------------------------------------------

    def add_block(self, block: RamBlock) -> RamBlock:
        if block.name in self._blocks:
            raise ValueError(f"duplicate RAM block name {block.name!r}")
        self._blocks[block.name] = block
        block.set_quiesce(self.quiesced)
        return block

    def array(self, name: str, shape: int | tuple[int, ...], dtype: Any = np.uint8, *,
              tracking: str = "auto", backing: str = "anon") -> np.ndarray:
        """A zeroed numpy array whose memory is a new RAM block ``name`` of this machine.

        Writes need no marking: the block's kernel write tracking (``tracking``, default
        "auto": see machine/tracking.py) sees them. A destination declares the same arrays
        (same names, shapes and dtypes) and receives their contents. The array is a view of
        the block: it stays valid while the machine is open.
        """
        dt = np.dtype(dtype)
        shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
        if dt.hasobject:
            raise TypeError(f"array {name!r}: dtype {dt} holds Python objects, not bytes")
        if any(not isinstance(n, int | np.integer) or n < 0 for n in shape_t):
            raise ValueError(f"array {name!r}: bad shape {shape!r}")
        count = int(np.prod(shape_t, dtype=np.int64))
        block = RamBlock(name, max(count * dt.itemsize, 1), tracking=tracking,
                         backing=backing)
        self.add_block(block)
        return block.array[: count * dt.itemsize].view(dt).reshape(shape_t)

    def add_device(self, device: Device) -> Device:
        key = (device.idstr, device.instance_id)
        if key in self._devices:
            raise ValueError(f"duplicate device {device.idstr!r} instance {device.instance_id}")
        self._devices[key] = device
        return device

    def block(self, name: str) -> RamBlock:
        try:
            return self._blocks[name]
        except KeyError:
            raise KeyError(f"no RAM block named {name!r}") from None

    def device(self, idstr: str, instance_id: int = 0) -> Device:
        try:
            return self._devices[(idstr, instance_id)]
        except KeyError:
            raise KeyError(f"no device {idstr!r} instance {instance_id}") from None

    @property
    def blocks(self) -> Mapping[str, RamBlock]:
        """Blocks by name, in the order they were added (the migration's block order)."""
        return types.MappingProxyType(self._blocks)

    @property
    def devices(self) -> list[Device]:
        """Devices in the order they were added."""
        return list(self._devices.values())

    def total_ram(self) -> int:
        return sum(b.used_length for b in self._blocks.values())

    def checksum(self) -> str:
        """SHA-256 over every block (added order) and device (sorted by idstr, instance)."""
        h = hashlib.sha256()
        for block in self._blocks.values():
            h.update(f"block:{block.name}:{block.used_length}:{block.checksum()}\n".encode())
        for key in sorted(self._devices):
            dev = self._devices[key]
            h.update(f"device:{key[0]}:{key[1]}:{dev.checksum()}\n".encode())
        return h.hexdigest()

    def close(self) -> None:
        for block in self._blocks.values():
            block.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- run state -------------------------------------------------------------------------

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def is_running(self) -> bool:
        return self._state is RunState.RUNNING

    def set_incoming(self) -> None:
        """Mark a (not running) machine as the destination of an incoming migration."""
        with self._cond:
            if self._state is RunState.RUNNING:
                raise RuntimeError("a running machine cannot become a migration destination")
            self._state = RunState.INMIGRATE
            self._cond.notify_all()

    def finish_incoming(self) -> None:
        """End of an incoming migration: every device's ``finish_load()`` (raises if its
        state is incomplete), then INMIGRATE becomes PAUSED until ``resume()``."""
        for device in self._devices.values():
            device.finish_load()
        with self._cond:
            if self._state is RunState.INMIGRATE:
                self._state = RunState.PAUSED
            self._cond.notify_all()

    def set_state(self, state: RunState) -> None:
        """Set a non-running state label (e.g. FINISH_MIGRATE -> POSTMIGRATE) on a paused
        machine; use pause()/resume() to move between running and stopped."""
        with self._cond:
            if state is RunState.RUNNING or self._state is RunState.RUNNING:
                raise RuntimeError("use pause()/resume() to enter or leave RUNNING")
            self._state = state
            self._cond.notify_all()

    def start(self) -> None:
        """Start (or resume) the machine; emits RESUME if it was not running."""
        self.resume()

    def resume(self) -> None:
        """Let workload threads run again; emits RESUME. No-op if already running."""
        with self._cond:
            if self._state is RunState.RUNNING:
                return
            self._state = RunState.RUNNING
            self.resumed_at = time.time()
            self._cond.notify_all()
        self._emit("RESUME", RunState.RUNNING)

    def pause(self, timeout: float | None = None, *, state: RunState = RunState.PAUSED) -> float:
        """Stop the workload at a safe point; return the seconds that took.

        Returns at once if no workload thread is between safe points. On timeout the
        previous state is restored and TimeoutError is raised. Emits STOP when it stops a
        running machine. Pausing a stopped machine only relabels it.
        """
        if state is RunState.RUNNING:
            raise ValueError("pause() needs a stopped state")
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        with self._cond:
            previous = self._state
            self._state = state
            if previous is not RunState.RUNNING:
                return 0.0
            self._cond.notify_all()
            while self._active:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self._state = previous
                    self._cond.notify_all()
                    raise TimeoutError(
                        f"workload did not reach a safe point within {timeout:.3f} s"
                    )
                self._cond.wait(left)
            self.paused_at = time.time()
        self._emit("STOP", state)
        return time.monotonic() - t0

    def _emit(self, event: str, state: RunState) -> None:
        for callback in list(self.on_state_change):
            callback(event, state)

    # -- throttle --------------------------------------------------------------------------

    @property
    def throttle(self) -> int:
        return self._throttle

    def set_throttle(self, percent: int) -> None:
        """Throttle workloads to run ``(100 - percent)%`` of the time (0 = off, max 99)."""
        percent = int(percent)
        if not 0 <= percent <= 99:
            raise ValueError(f"throttle percentage must be 0..99, got {percent}")
        if percent != self._throttle:
            for block in self._blocks.values():
                block.set_throttled(percent > 0)
        self._throttle = percent

    # -- workload cooperation ------------------------------------------------------------

    @contextlib.contextmanager
    def workload(self) -> Iterator[None]:
        """Register the calling thread as a workload thread for the duration of the block.

        The thread counts as running (a pause waits for it) until it calls ``safe_point``.
        """
        state = _ThreadSlot(self)
        _slots.current = state
        with self._cond:
            self._active += 1
            self._registered += 1
        state.run_start = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._registered -= 1
                self._cond.notify_all()
            _slots.current = None

    @property
    def workload_threads(self) -> int:
        return self._registered

    @contextlib.contextmanager
    def quiesced(self, timeout: float | None = None) -> Iterator[None]:
        """Hold every workload thread at a safe point for the duration of the block, without
        a run-state change or STOP/RESUME events (a soft-dirty sync reads and clears the
        kernel's bits inside it, tracking.py). Reentrant; the calling thread, if it is a
        workload thread of this machine, counts as parked. TimeoutError if the workload
        does not park within ``timeout``."""
        slot: _ThreadSlot | None = getattr(_slots, "current", None)
        own = 1 if slot is not None and slot.machine is self else 0
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._hold += 1
            self._cond.notify_all()
            try:
                while self._active > own:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(
                            f"workload did not reach a safe point within {timeout:.3f} s")
                    self._cond.wait(left)
            except BaseException:
                self._hold -= 1
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            with self._cond:
                self._hold -= 1
                self._cond.notify_all()

    def kick(self) -> None:
        """Wake threads blocked in ``safe_point`` so they re-check their cancel events."""
        with self._cond:
            self._cond.notify_all()

    def safe_point(
        self, cancel: threading.Event | None = None, *, idle: float = 0.0
    ) -> bool:
        """A point where the workload holds no half-done state.

        Blocks while the machine is not running, applies the throttle, and optionally
        idles ``idle`` seconds (pacing) while counting as parked. Returns False at once when
        ``cancel`` is set (call :meth:`kick` after setting it), True otherwise. Threads
        that did not enter ``workload()`` just wait for the running state.
        """
        slot: _ThreadSlot | None = getattr(_slots, "current", None)
        if slot is not None and slot.machine is not self:
            slot = None
        now = time.monotonic()
        sleep = max(0.0, idle)
        percent = self._throttle
        if slot is not None and percent:
            slot.ran += now - slot.run_start
            if slot.ran >= THROTTLE_TIMESLICE:
                sleep += slot.ran * percent / (100 - percent)
                slot.ran = 0.0
        elif slot is not None:
            slot.ran = 0.0
        with self._cond:
            if slot is not None:
                self._active -= 1
                self._cond.notify_all()
            try:
                if sleep > 0:
                    end = now + sleep
                    while not (cancel is not None and cancel.is_set()):
                        left = end - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                while self._state is not RunState.RUNNING or self._hold:
                    if cancel is not None and cancel.is_set():
                        break
                    self._cond.wait()
            finally:
                if slot is not None:
                    self._active += 1
        if slot is not None:
            slot.run_start = time.monotonic()
        return not (cancel is not None and cancel.is_set())

    def __repr__(self) -> str:
        return (
            f"<Machine {self._state.value} blocks={list(self._blocks)} "
            f"devices={[d.idstr for d in self._devices.values()]}>"
        )


class _ThreadSlot:
    """Per workload thread bookkeeping for the throttle."""

    __slots__ = ("machine", "ran", "run_start")

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.ran = 0.0
        self.run_start = 0.0


_slots = threading.local()


def copy_state(src: Machine, dst: Machine) -> None:
    """In-process reference migration of a stopped ``src`` into ``dst`` (tests, tools).

    Blocks are copied by name (sizes must match). Devices go through the same hooks a
    migration uses: multifd-state devices via numbered buffers (last one CONFIG_STATE) and
    their load job, live devices via setup/iterate(final=True), then every device's
    main-stream state.
    """
    if src.is_running:
        raise RuntimeError("copy_state needs a stopped source machine")
    for name, block in src.blocks.items():
        target = dst.block(name)
        if target.used_length != block.used_length:
            raise ValueError(
                f"RAM block {name!r}: size {block.used_length} != {target.used_length}"
            )
        target.array[:] = block.array
    never = threading.Event()
    for dev in src.devices:
        peer = dst.device(dev.idstr, dev.instance_id)
        peer.check_incoming(secure=True)  # in-process: the state never left this process
        if dev.is_live() or dev.uses_multifd_state():
            peer.load_setup(dev.save_setup())
        if dev.uses_multifd_state():
            buffers = [join_buffer(b) for b in dev.save_state_buffers(True)]
            for idx, data in enumerate(buffers):
                peer.load_state_buffer(idx, data, idx == len(buffers) - 1)
            peer.load_state_job(never)
        elif dev.is_live():
            done = False
            while not done:
                data, done = dev.save_iterate(True)
                peer.load_iterate(data)
        peer.load_state(dev.save_state(), dev.version_id)
        peer.finish_load()
