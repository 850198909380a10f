"""Large device state over the multifd channels: save jobs (source), ordered load (destination).

QEMU's design (qemu-reference.md 5.2-5.4, `multifd-device-state.c`, VFIO's
`migration-multifd.c`) in Python form, plus the live phase QEMU deferred::

    source (migration thread)        save pool "devsave-N"        channels / destination
    -------------------------        ---------------------        ----------------------
    START section (save_setup)                                    load_setup; load job
    live loop: RAM PART + sync                                      starts (live device)
      iterate_live() -- submit ---->  save_state_buffers(False)
                     <-- wait ------  hdr(idx,0)+buf -> Sender --> sink -> load_state_buffer
    pause; SWITCHOVER_START  ---------------------------------->   start remaining load jobs
    RAM END (its last SYNC)
    start_final() -- immediate --->  save_state_buffers(True)       (any channel, any order)
    device END (dummy) / FULL         last buf: CONFIG_STATE ----->  load job: idx order
    wait() <------------------------ jobs joined
    globalstate, EOF, VMDESC ---------------------------------->   finish(): wait load jobs
                                                                   machine resumes after

Each buffer is prefixed with the 12-byte `DeviceStateBufferHeader` (version 0, idx 0,1,2...
continuing from the live phase into the switchover, CONFIG_STATE on the very last). Device
jobs never run while RAM issues a multifd SYNC (live jobs are joined before the next RAM
pass, final jobs start after RAM's END section): a buffer sent after a SYNC on one channel
while a later index sits before the SYNC on another could otherwise stall the destination's
back-pressure against its SYNC barrier.

Destination: the sink (channel threads) decodes the header and hands the buffer to the
device (unknown / non-multifd device, bad header = error that fails the migration). A live
device's load job starts once its setup section is loaded (so live-phase buffers are applied
as they come and the reorder queue's memory cap holds); every other one at SWITCHOVER_START.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from multifd.machine.device import Device, DeviceStateError
from multifd.machine.workers import Aborted, WorkerError, WorkerPool
from multifd.multifd.device_state import DeviceStatePayload, DeviceStateSendOps
from multifd.multifd.slots import SendChannelContext, register_send_ops
from multifd.wire.constants import DEVICE_STATE_FLAG_CONFIG_STATE
from multifd.wire.devstate import DeviceStateBufferHeader
from multifd.wire.errors import WireError
from multifd.wire.packet import encode_device_state_header

if TYPE_CHECKING:
    from multifd.multifd.sender import Sender
    from multifd.multifd.slots import SendSlot

__all__ = [
    "DeviceStateLoader",
    "DeviceStateSaver",
    "DeviceTransferStats",
    "multifd_device_state_supported",
]

_HDR = DeviceStateBufferHeader.SIZE
_POLL_S = 0.05


def multifd_device_state_supported(profile: Any, multifd: bool, compression: str) -> bool:
    """QEMU's `multifd_device_state_supported()`: multifd on, compression none, and a
    profile that has device-state packets (a 7.2 peer would misread flag 0x40)."""
    return bool(multifd and compression == "none" and profile.device_state_packets)


@dataclass
class DeviceTransferStats:
    """Counters of one device's multifd state (either side)."""

    buffers: int = 0
    bytes: int = 0  # device data, without the 12-byte buffer headers
    live_buffers: int = 0
    next_idx: int = 0
    config_sent: bool = False


@dataclass
class _SaveState:
    device: Device
    stats: DeviceTransferStats = field(default_factory=DeviceTransferStats)


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


class DeviceStateSaver:
    """Source side: per-device save jobs on a WorkerPool feeding `Sender.send`.

    Every job owns its own send slot, so several devices (and RAM, from the migration
    thread) queue packets at once; `Sender.send` is safe for several producers.
    """

    def __init__(self, devices: Iterable[Device], sender: Sender, *, name: str = "devsave") -> None:
        self._states = [_SaveState(d) for d in devices]
        self.sender = sender
        self.pool = WorkerPool(name, max_workers=max(1, len(self._states)))
        self._lock = threading.Lock()
        self._finished = False

    @property
    def devices(self) -> list[Device]:
        return [s.device for s in self._states]

    def stats(self) -> dict[str, DeviceTransferStats]:
        """Per device ``idstr/instance_id``."""
        return {f"{s.device.idstr}/{s.device.instance_id}": s.stats for s in self._states}

    @property
    def total_buffers(self) -> int:
        return sum(s.stats.buffers for s in self._states)

    @property
    def total_bytes(self) -> int:
        return sum(s.stats.bytes for s in self._states)

    def pending(self) -> int:
        """What the devices still report to send (convergence input)."""
        return sum(s.device.pending() for s in self._states if not s.stats.config_sent)

    def iterate_live(self) -> int:
        """One live-phase round: a save job for every device with pending state; joined
        before returning (see module docstring). Returns the buffers sent."""
        before = self.total_buffers
        for st in self._states:
            if not st.stats.config_sent and st.device.pending() > 0:
                self.pool.submit(self._save, st, False, name=f"save-live:{st.device.idstr}")
        self.wait()
        return self.total_buffers - before

    def start_final(self) -> None:
        """Switchover (machine paused): every device's final job runs at once."""
        for st in self._states:
            self.pool.submit_immediate(self._save, st, True, name=f"save:{st.device.idstr}")

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

    # -- the job ----------------------------------------------------------------------------
    def _save(self, st: _SaveState, final: bool) -> None:
        dev, stats = st.device, st.stats
        if stats.config_sent:
            raise DeviceStateError(f"device {dev.idstr!r}: state saved after its final buffer")
        slot = self.sender.new_slot()
        prev: bytes | bytearray | memoryview | None = None
        for buf in dev.save_state_buffers(final):
            self.pool.check_abort()
            if buffer_nbytes(buf) == 0:
                raise DeviceStateError(f"device {dev.idstr!r} produced an empty state buffer")
            if prev is not None:
                slot = self._queue(slot, st, prev, config=False, live=not final)
            prev = buf
        if prev is None:
            if final:
                raise DeviceStateError(
                    f"device {dev.idstr!r}: final save produced no buffer (the last one "
                    "must carry CONFIG_STATE)")
            return
        self._queue(slot, st, prev, config=final, live=not final)
        if final:
            stats.config_sent = True

    def _queue(
        self, slot: SendSlot, st: _SaveState, buf: bytes | bytearray | memoryview, *,
        config: bool, live: bool,
    ) -> SendSlot:
        dev, stats = st.device, st.stats
        n = buffer_nbytes(buf)
        flags = DEVICE_STATE_FLAG_CONFIG_STATE if config else 0
        hdr = DeviceStateBufferHeader(stats.next_idx, flags).encode()
        slot.payload(IndexedStatePayload).fill_indexed(dev.idstr, dev.instance_id, hdr, buf)
        slot = self.sender.send(slot)
        stats.next_idx += 1
        stats.buffers += 1
        stats.bytes += n
        if live:
            stats.live_buffers += 1
        return slot


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
    ) -> None:
        self.on_error = on_error  # called once on the first failure (stop the channels)
        self._devices = {(d.idstr, d.instance_id): d for d in devices}
        self._expected = {
            k: d for k, d in self._devices.items() if enabled and d.uses_multifd_state()
        }
        self.pool = WorkerPool(name, max_workers=max(1, len(self._expected)))
        self._lock = threading.Lock()
        self._started: set[tuple[str, int]] = set()
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
    def setup_loaded(self, device: Device) -> None:
        """A live device's setup section is in: its load job may apply live buffers now."""
        key = (device.idstr, device.instance_id)
        if key in self._expected:
            self._start(key)

    def switchover_start(self) -> None:
        """MIG_CMD_SWITCHOVER_START: start every load job not running yet."""
        for key in self._expected:
            self._start(key)

    def finish(self, channels_done: Callable[[], bool] | None = None) -> None:
        """After EOF: wait for every load job. ``channels_done()`` True means no more
        buffers can arrive, so a job still waiting has a missing buffer (clear error)."""
        self.switchover_start()  # a stream without SWITCHOVER_START still loads
        try:
            while True:
                self._raise_if_failed()
                try:
                    self.pool.wait(timeout=_POLL_S)
                    break
                except TimeoutError:
                    pass
                if channels_done is not None and channels_done():
                    try:  # the last buffers may just have been stored: one more grace poll
                        self.pool.wait(timeout=_POLL_S * 4)
                        break
                    except TimeoutError:
                        self._fail("device state incomplete: " + self._missing())
        except WorkerError as exc:
            self._fail(f"device state load failed: {exc.job}: {exc.cause}")
        except BaseException:
            self.close()
            raise
        if self.error is not None:
            self.close()  # abort and join the workers before reporting
            raise DeviceStateError(self.error)
        self.pool.close(timeout=30)

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
            if key in self._started or self.pool.aborted:
                return
            self._started.add(key)
        dev = self._expected[key]
        self.pool.submit_immediate(self._load, dev, name=f"load:{dev.idstr}/{dev.instance_id}")

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

    def _missing(self) -> str:
        parts = []
        for key, dev in self._expected.items():
            missing = dev.load_progress()
            if missing:
                parts.append(f"{key[0]}: {missing}")
        return "; ".join(parts) or "a load job did not finish"
