"""Large device state over the multifd channels: save jobs (source), ordered load (destination).

QEMU's design (qemu-reference.md 5.2-5.4, `multifd-device-state.c`, VFIO's
`migration-multifd.c`) in Python form, plus the live phase QEMU deferred::

    migration thread (handlers)      engine pool "devsave-N"      channels / destination
    ---------------------------      -----------------------      ----------------------
    START section (setup)                                          load_setup; load job
    each pass: RAM PART + sync,                                      starts (live device)
      device iterate(False) -submit->  save_state_buffers(False)
      (returns at once: RAM goes on)   hdr(idx,0)+buf -> Sender -->  sink -> load_state_buffer
    pause; SWITCHOVER_START  ---------------------------------->   start remaining load jobs
    RAM END (its last SYNC)
    device iterate(True): live job
      over -> final job -immediate->  save_state_buffers(True)       (any channel, any order)
      END (dummy) / FULL section       last buf: CONFIG_STATE ----->  load job: idx order
      ... done once the job is over
    globalstate, EOF, VMDESC ---------------------------------->   finish(): wait load jobs
                                                                   machine resumes after

Each buffer is prefixed with the 12-byte `DeviceStateBufferHeader` (version 0, idx 0,1,2...
continuing from the live phase into the switchover, CONFIG_STATE on the very last).

Live-phase jobs run while RAM issues its multifd SYNCs. `Sender.sync` holds the send lock
until every channel has written its SYNC, so a producer's buffers never straddle a SYNC
out of order (idx n after the SYNC on one channel, n+1 before it on another): such a gap
could hold the destination's reorder back-pressure against its SYNC barrier.

Destination: the sink (channel threads) decodes the header and hands the buffer to the
device (unknown / non-multifd device, bad header = error that fails the migration). A live
device's load job starts once its setup section is loaded (so live-phase buffers are applied
as they come and the reorder queue's memory cap holds); every other one at SWITCHOVER_START.
After EOF, `finish` waits for load jobs that have all their buffers (a slow device is not a
failure, up to a timeout), and fails at once when a buffer is really missing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from multifd.machine.device import Device, DeviceStateError
from multifd.machine.workers import Aborted, Job, WorkerError, WorkerPool
from multifd.migration.sections import DeviceLoadHandler, DeviceSaveHandler
from multifd.multifd.device_state import DeviceStatePayload, DeviceStateSendOps
from multifd.multifd.slots import SendChannelContext, register_send_ops
from multifd.wire.constants import DEVICE_STATE_FLAG_CONFIG_STATE, SectionType
from multifd.wire.devstate import DeviceStateBufferHeader
from multifd.wire.errors import WireError
from multifd.wire.packet import encode_device_state_header

if TYPE_CHECKING:
    from multifd.multifd.sender import Sender
    from multifd.multifd.slots import SendSlot

__all__ = [
    "DeviceStateLoadHandler",
    "DeviceStateLoader",
    "DeviceStateProducer",
    "DeviceStateSaveHandler",
    "DeviceStateSaver",
    "DeviceTransferStats",
    "device_state_totals",
    "multifd_device_state_refusal",
    "multifd_device_state_supported",
]

_HDR = DeviceStateBufferHeader.SIZE
_POLL_S = 0.05
_LIVE_POLL_S = 0.005  # per live round while a device's job runs (RAM's rounds are 50 ms)
DEVICE_LOAD_TIMEOUT_S = 120.0  # after the last buffer arrived, for the load jobs to end


def multifd_device_state_refusal(profile: Any, multifd: bool, compression: str) -> str | None:
    """Why device state cannot travel over multifd here (None: it can). QEMU's
    `multifd_device_state_supported()`: multifd on, compression none, and a profile that
    has device-state packets (a 7.2 peer would misread flag 0x40)."""
    if not multifd:
        return "multifd is off"
    if not profile.device_state_packets:
        return f"the {profile.name} profile has no device-state packets"
    if compression != "none":
        return f"multifd compression is {compression} (device state needs none)"
    return None


def multifd_device_state_supported(profile: Any, multifd: bool, compression: str) -> bool:
    return multifd_device_state_refusal(profile, multifd, compression) is None


def device_state_totals(stats: dict[str, int]) -> dict[str, int]:
    """The report's device-state figures from merged handler stats: device data bytes (no
    section or buffer headers) in all, over multifd, on the main stream; multifd buffers."""
    mfd = stats.get("device_state_multifd_bytes", 0)
    main = stats.get("device_state_main_bytes", 0)
    return {"device_state_bytes": mfd + main, "device_state_multifd_bytes": mfd,
            "device_state_main_bytes": main,
            "device_state_buffers": stats.get("device_state_buffers", 0)}


@dataclass
class DeviceTransferStats:
    """Counters of one device's multifd state (either side)."""

    buffers: int = 0
    bytes: int = 0  # device data, without the 12-byte buffer headers
    live_buffers: int = 0
    next_idx: int = 0
    config_sent: bool = False

    def report(self) -> dict[str, int]:
        """This device's share of the report's figures (see device_state_totals)."""
        return {"device_state_multifd_bytes": self.bytes, "device_state_buffers": self.buffers}


class _Parts:
    """A device buffer given as several parts (e.g. a record header and a view of the
    device's memory): exposes the total length to the payload checks, sent by gather."""

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: tuple[Any, ...]) -> None:
        self.parts = parts
        self.nbytes = sum(memoryview(p).nbytes for p in parts)

    def __len__(self) -> int:
        return self.nbytes


def buffer_nbytes(buf: Any) -> int:
    """Length of a device buffer: one bytes-like, or a tuple/list of parts."""
    if isinstance(buf, _Parts):
        return buf.nbytes
    if isinstance(buf, tuple | list):
        return sum(memoryview(p).nbytes for p in buf)
    return memoryview(buf).nbytes


class IndexedStatePayload(DeviceStatePayload):
    """A device-state packet whose payload is [12-byte buffer header, device buffer], sent
    by one gather `sendmsg` so the (large) device buffer is never copied to prepend 12 bytes.
    Same wire packet as `DeviceStatePayload` (flag 0x40); only the send side differs."""

    __slots__ = ("prefix",)

    def __init__(self) -> None:
        super().__init__()
        self.prefix = b""

    @classmethod
    def new_for_slot(cls, page_size: int) -> IndexedStatePayload:
        return cls()

    def fill_indexed(self, idstr: str, instance_id: int, prefix: bytes, data: Any) -> None:
        """`data` is one buffer or a tuple/list of parts (gathered, never joined)."""
        parts = tuple(data) if isinstance(data, tuple | list) else (data,)
        self.fill(idstr, instance_id, parts[0] if len(parts) == 1 else _Parts(parts))
        self.prefix = prefix


class _IndexedStateSendOps(DeviceStateSendOps):
    payload_type = IndexedStatePayload

    def logical_bytes(self, payload: IndexedStatePayload) -> int:  # type: ignore[override]
        return len(payload.prefix) + buffer_nbytes(payload.buffer)

    def prepare(  # type: ignore[override]
        self, payload: IndexedStatePayload, ch: SendChannelContext
    ) -> list[Any]:
        n = len(payload.prefix) + buffer_nbytes(payload.buffer)
        header = encode_device_state_header(payload.idstr, payload.instance_id, n)
        ch.stats.add("device_state_buffers", 1)
        buf = payload.buffer
        return [header, payload.prefix, *(buf.parts if isinstance(buf, _Parts) else (buf,))]


register_send_ops(_IndexedStateSendOps())


class DeviceStateProducer:
    """One device's save jobs: its buffers, numbered 0, 1, 2... across the migration, go
    into its own send slot and through `Sender.send` (several producers share the
    channels with RAM). A job runs on a WorkerPool the engine owns; `send` blocking
    while every channel slot is full is the back-pressure that bounds queued bytes."""

    def __init__(self, device: Device, sender: Sender, pool: WorkerPool) -> None:
        self.device = device
        self.sender = sender
        self.pool = pool
        self.stats = DeviceTransferStats()
        self._job: Job | None = None
        self._job_left = 0  # what the running job took on and has not queued yet (estimate)

    def pending(self) -> int:
        """The device's pending state plus what a running job still has to queue: the
        device stops counting a chunk when the job takes it, not when it is sent, and
        convergence must not switch over with the job's work still ahead of it."""
        if self.stats.config_sent:
            return 0
        return self.device.pending() + (self._job_left if self.running() else 0)

    def running(self) -> bool:
        return self._job is not None and not self._job.done()

    def start(self, final: bool) -> None:
        """Live (``final=False``): a queued job; final (machine paused): its own thread now."""
        if self.running():
            raise DeviceStateError(f"device {self.device.idstr!r}: a save job is running")
        kind = "save" if final else "save-live"
        self._job_left = self.device.pending()
        submit = self.pool.submit_immediate if final else self.pool.submit
        self._job = submit(self._save, final, name=f"{kind}:{self.device.idstr}")

    def wait(self, timeout: float | None = None) -> bool:
        """True once the last job finished; False on timeout; its failure raises."""
        job = self._job
        if job is None:
            return True
        try:
            job.result(timeout)
        except TimeoutError:
            return False
        except WorkerError as exc:
            raise DeviceStateError(f"device state save failed: {exc}") from exc.cause
        except Aborted:
            raise DeviceStateError(
                f"device state save of {self.device.idstr!r} aborted") from None
        return True

    def _save(self, final: bool) -> None:
        dev, stats = self.device, self.stats
        if stats.config_sent:
            raise DeviceStateError(f"device {dev.idstr!r}: state saved after its final buffer")
        slot = self.sender.new_slot()
        prev: bytes | bytearray | memoryview | None = None
        for buf in dev.save_state_buffers(final):
            self.pool.check_abort()
            if buffer_nbytes(buf) == 0:
                raise DeviceStateError(f"device {dev.idstr!r} produced an empty state buffer")
            if prev is not None:
                slot = self._queue(slot, prev, config=False, live=not final)
            prev = buf
        if prev is None:
            if final:
                raise DeviceStateError(
                    f"device {dev.idstr!r}: final save produced no buffer (the last one "
                    "must carry CONFIG_STATE)")
            return
        self._queue(slot, prev, config=final, live=not final)
        if final:
            stats.config_sent = True

    def _queue(
        self, slot: SendSlot, buf: bytes | bytearray | memoryview, *, config: bool, live: bool,
    ) -> SendSlot:
        dev, stats = self.device, self.stats
        n = buffer_nbytes(buf)
        flags = DEVICE_STATE_FLAG_CONFIG_STATE if config else 0
        hdr = DeviceStateBufferHeader(stats.next_idx, flags).encode()
        slot.payload(IndexedStatePayload).fill_indexed(dev.idstr, dev.instance_id, hdr, buf)
        slot = self.sender.send(slot)
        stats.next_idx += 1
        stats.buffers += 1
        stats.bytes += n
        self._job_left = max(0, self._job_left - n)
        if live:
            stats.live_buffers += 1
        return slot


class DeviceStateSaveHandler(DeviceSaveHandler):
    """A device whose bulk state travels as multifd device-state packets.

    Live phase: ``iterate(False)`` starts a save job when the device has pending state and
    none runs, and returns at once: device buffers and RAM batches share the channels
    during a pass. Switchover: once a live job is over, the final job starts and the main
    stream gets the device's END section (empty, like VFIO's) or, for a device that is not
    live, its FULL section; ``iterate(True)`` is done when the final job has queued its
    last (CONFIG_STATE) buffer.
    """

    def __init__(self, device: Device, sender: Sender, pool: WorkerPool) -> None:
        super().__init__(device)
        self.producer = DeviceStateProducer(device, sender, pool)
        self._final_started = False

    def pending(self, exact: bool = False) -> tuple[int, int]:
        """The exact figure (asked when the estimate says the migration could switch
        over) first lets a running live job finish: its rest is producer-bound, and left
        for the downtime it would cost more than its bytes at the measured bandwidth."""
        if exact:
            self.producer.wait()
        return self.producer.pending(), 0

    def iterate(self, final: bool) -> bool:
        p = self.producer
        if not final:
            # A running job gets a short wait, not a spin (with RAM idle the live loop
            # would take the GIL from it and the channel threads); a failed one raises.
            if not p.wait(_LIVE_POLL_S if p.running() else 0):
                return False
            if p.pending() == 0:
                return True
            p.start(final=False)
            return False
        if not self._final_started:
            if not p.wait(_POLL_S):  # the live job must end first: indices stay in order
                return False
            p.start(final=True)
            self._final_started = True
            if self.live:
                self._section(SectionType.END, b"")
            else:
                self._write_full()
            return False  # the job runs meanwhile; the next rounds wait for it
        self.done = p.wait(_POLL_S)
        return self.done

    def stats(self) -> dict[str, int]:
        return {**super().stats(), **self.producer.stats.report()}


class DeviceStateSaver:
    """Several devices' producers on a pool of their own, joined per round: the save side
    without a migration around it (tests, benchmarks)."""

    def __init__(self, devices: Iterable[Device], sender: Sender, *, name: str = "devsave") -> None:
        devices = list(devices)
        self.pool = WorkerPool(name, max_workers=max(1, len(devices)))
        self.producers = [DeviceStateProducer(d, sender, self.pool) for d in devices]

    @property
    def devices(self) -> list[Device]:
        return [p.device for p in self.producers]

    def stats(self) -> dict[str, DeviceTransferStats]:
        """Per device ``idstr/instance_id``."""
        return {f"{p.device.idstr}/{p.device.instance_id}": p.stats for p in self.producers}

    @property
    def total_buffers(self) -> int:
        return sum(p.stats.buffers for p in self.producers)

    @property
    def total_bytes(self) -> int:
        return sum(p.stats.bytes for p in self.producers)

    def pending(self) -> int:
        return sum(p.pending() for p in self.producers)

    def iterate_live(self) -> int:
        """One live round: a job for every device with pending state, joined. Returns the
        buffers sent."""
        before = self.total_buffers
        for p in self.producers:
            if p.pending() > 0:
                p.start(final=False)
        self.wait()
        return self.total_buffers - before

    def start_final(self) -> None:
        for p in self.producers:
            p.start(final=True)

    def wait(self) -> None:
        """Join the jobs; the first failure is raised as DeviceStateError (pool aborted)."""
        try:
            self.pool.wait()
        except WorkerError as exc:
            raise DeviceStateError(f"device state save failed: {exc}") from exc.cause
        if self.pool.aborted:
            raise DeviceStateError("device state save aborted")

    def abort(self) -> None:
        self.pool.abort()

    def close(self) -> None:
        """Stop (abort if jobs are still running) and join the pool's threads."""
        if self.pool.outstanding:
            self.pool.abort()
        self.pool.close(timeout=30)


class DeviceStateLoader:
    """Destination side: routes buffers to devices and runs their load jobs.

    ``expected`` devices (those that take multifd state under this migration's settings)
    get a load job on the ``devload`` pool; ``finish`` waits for all of them.
    """

    def __init__(
        self,
        devices: Iterable[Device],
        *,
        enabled: bool,
        name: str = "devload",
        on_error: Callable[[str], None] | None = None,
        load_timeout: float = DEVICE_LOAD_TIMEOUT_S,
    ) -> None:
        self.on_error = on_error  # called once on the first failure (stop the channels)
        self.load_timeout = load_timeout
        self._devices = {(d.idstr, d.instance_id): d for d in devices}
        self._expected = {
            k: d for k, d in self._devices.items() if enabled and d.uses_multifd_state()
        }
        self.pool = WorkerPool(name, max_workers=max(1, len(self._expected)))
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, int], Job] = {}
        self.stats: dict[str, DeviceTransferStats] = {
            f"{k[0]}/{k[1]}": DeviceTransferStats() for k in self._expected}
        self.error: str | None = None

    @property
    def expected(self) -> list[Device]:
        return list(self._expected.values())

    # -- channel threads --------------------------------------------------------------------
    def sink(self, idstr: str, instance_id: int, data: bytearray) -> None:
        """`Receiver.device_state_sink`: decode the buffer header and store the buffer."""
        try:
            key = (idstr, instance_id)
            dev = self._expected.get(key)
            if dev is None:
                why = "unknown device" if key not in self._devices else (
                    "device does not take multifd state here")
                raise DeviceStateError(
                    f"device-state buffer for {idstr!r} instance {instance_id}: {why}")
            try:
                hdr = DeviceStateBufferHeader.decode(data)
            except WireError as exc:
                raise DeviceStateError(f"device {idstr!r}: bad state buffer header: {exc}") from exc
            body = memoryview(data)[_HDR:]
            st = self.stats[f"{idstr}/{instance_id}"]
            with self._lock:
                st.buffers += 1
                st.bytes += len(body)
                st.next_idx = max(st.next_idx, hdr.idx + 1)
                st.config_sent |= hdr.is_config_state
            dev.load_state_buffer(hdr.idx, body, hdr.is_config_state)
        except BaseException as exc:
            self._fail(str(exc))
            raise

    # -- main loader ------------------------------------------------------------------------
    def start_load(self, device: Device) -> None:
        """Start ``device``'s load job if it takes multifd state and none runs yet: once its
        setup section is in (a live device applies live buffers as they come), or at
        SWITCHOVER_START."""
        key = (device.idstr, device.instance_id)
        if key in self._expected:
            self._start(key)

    def switchover_start(self) -> None:
        """MIG_CMD_SWITCHOVER_START: start every load job not running yet."""
        for key in self._expected:
            self._start(key)

    def finish(self, channels_done: Callable[[], bool] | None = None) -> None:
        """After EOF: every expected device's load (`finish_device`), then join the pool."""
        for dev in self.expected:
            self.finish_device(dev, channels_done)
        self.pool.close(timeout=30)

    def finish_device(self, dev: Device, channels_done: Callable[[], bool] | None = None,
                      ) -> None:
        """Wait for ``dev``'s load job. Once ``channels_done()`` (no more buffers can
        arrive), a buffer still missing fails at once; a job that holds all its buffers
        gets ``load_timeout`` seconds to apply them."""
        key = (dev.idstr, dev.instance_id)
        self._start(key)  # a stream without SWITCHOVER_START still loads
        deadline: float | None = None
        try:
            while True:
                self._raise_if_failed()
                job = self._jobs.get(key)
                if job is None:  # the pool was aborted before the job could start
                    raise DeviceStateError(f"device {dev.idstr!r}: load aborted")
                try:
                    job.result(_POLL_S)
                    return
                except TimeoutError:
                    pass
                except (WorkerError, Aborted) as exc:
                    self._raise_if_failed()
                    raise DeviceStateError(str(exc)) from None
                if channels_done is None or not channels_done():
                    continue
                missing = dev.load_progress()
                if missing:
                    self._fail(f"device state incomplete: {dev.idstr}: {missing}")
                elif deadline is None:
                    deadline = time.monotonic() + self.load_timeout
                elif time.monotonic() > deadline:
                    self._fail(f"device state load did not finish within "
                               f"{self.load_timeout:g} s after its last buffer arrived "
                               f"(still loading: {dev.idstr}/{dev.instance_id})")
        except BaseException:
            self.close()  # abort and join the workers before reporting
            raise

    def abort(self, reason: str = "aborted") -> None:
        """Stop the load jobs and wake channel threads blocked on back-pressure."""
        self.pool.abort()
        for dev in self._expected.values():
            dev.abort_load()

    def close(self) -> None:
        """Abort what still runs and join the workers (a stuck device job is left behind
        as a daemon thread rather than hanging the migration's own thread)."""
        if self.pool.outstanding:
            self.abort("closing")
        try:
            self.pool.close(timeout=30)
        except TimeoutError:
            pass

    # -- internals --------------------------------------------------------------------------
    def _start(self, key: tuple[str, int]) -> None:
        with self._lock:
            if key in self._jobs or self.pool.aborted:
                return
            dev = self._expected[key]
            self._jobs[key] = self.pool.submit_immediate(
                self._load, dev, name=f"load:{dev.idstr}/{dev.instance_id}")

    def _load(self, dev: Device) -> None:
        try:
            dev.load_state_job(self.pool.abort_event)
        except BaseException as exc:
            if self.pool.aborted and isinstance(exc, DeviceStateError | Aborted):
                raise Aborted(f"load of {dev.idstr!r} aborted") from None
            self._fail(f"device state load failed: {dev.idstr!r}: {type(exc).__name__}: {exc}")
            raise

    def _fail(self, msg: str) -> None:
        """Record the first error, stop every job and queue, tell the destination once."""
        with self._lock:
            first = self.error is None
            if first:
                self.error = msg
        self.abort(msg)
        if first and self.on_error is not None:
            self.on_error(msg)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise DeviceStateError(self.error)


class DeviceStateLoadHandler(DeviceLoadHandler):
    """A device whose bulk state arrives as multifd buffers (`DeviceStateLoader`): its
    load job starts once its setup section is in (live) or at SWITCHOVER_START, and the
    machine runs only after `load_finish` saw the job through."""

    def __init__(self, device: Device, loader: DeviceStateLoader,
                 channels_done: Callable[[], bool]) -> None:
        super().__init__(device, on_setup=loader.start_load)
        self.loader = loader
        self.channels_done = channels_done

    def switchover_start(self) -> None:
        self.loader.start_load(self.device)

    def load_finish(self) -> None:
        self.loader.finish_device(self.device, self.channels_done)

    def stats(self) -> dict[str, int]:
        return {**super().stats(), **self.loader.stats[f"{self.idstr}/{self.instance_id}"].report()}
