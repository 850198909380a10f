"""Source side of the multifd core: the Sender and its channel threads.

Sequence (one channel shown; QEMU `multifd.c` multifd_send / multifd_send_thread /
multifd_send_sync_main, qemu-reference.md 3.5, 3.6, 5.1):

    producer(s)              Sender                  multifdsend_<id>        socket
        |                      |                          |-- init packet (64 B) -->|
        |-- send(filled) ----->| wait for a free slot,    |                          |
        |                      | swap slots, wake ------->| prepare (ops of kind)    |
        |<-- empty slot -------|                          |-- sendmsg [hdr, *data] ->|
        |-- sync() ----------->| pending_sync on all ---->| (after queued jobs)      |
        |                      |<-- all SYNCs written ----|-- SYNC packet ---------->|
        |-- main stream: EOS / MULTIFD_FLUSH (the caller, right away) ---------------->

Each channel owns QUEUE_DEPTH slots: `send` swaps the caller's filled slot for one of the
channel's empty ones (an idle channel first) while the channel may still be busy with an
earlier one, so a channel finishing a packet starts the next without waiting for the
producer to be scheduled: on a loaded 2-core machine a thread wake-up often costs more than
writing a 512 KiB packet (ours->ours 1 GiB: ~1.1 s with one slot, ~0.8 s with four).
Payload objects are reused, so the hot path allocates nothing per packet. The core never
looks at the payload kind: it asks the kind's registered `SendOps` for the packet buffers.
"""

from __future__ import annotations

import itertools
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence

from multifd.compress import get_method
from multifd.multifd._io import byte_views, send_views, sendmsg_all
from multifd.multifd.slots import (
    ChannelStats,
    MultifdError,
    RateLimiter,
    SendSlot,
    Stats,
    send_ops_for,
)
from multifd.wire.constants import PacketLayout
from multifd.wire.packet import InitPacket, RamPacketEncoder

_WAIT_SLICE = 0.1  # seconds between abort checks in bounded waits
QUEUE_DEPTH = 4  # filled slots a channel may hold: the one it writes and those queued


def _linger_zero(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class SendChannel:
    """One channel: its socket, slot, thread and per-channel codec state."""

    def __init__(self, sender: Sender, cid: int, sock: socket.socket) -> None:
        self.id = cid
        self.sock = sock
        self.layout = sender.layout
        self.page_size = sender.page_size
        self.zero_page_detection = sender.zero_page_detection
        self.queue: deque[SendSlot] = deque()  # filled slots, oldest first
        self.spare = [SendSlot(sender.page_size) for _ in range(QUEUE_DEPTH)]
        self.pending_sync = False
        self.cv = threading.Condition(sender._mu)
        self.encoder = RamPacketEncoder(sender.layout, sender.page_size)
        self.compressor = sender.method.new_compressor(sender.level)
        self.compression_flag = int(sender.method.flag)
        self.stats = ChannelStats(sender.stats)
        self.thread: threading.Thread | None = None
        self._counter = sender._packet_counter

    @property
    def pending_job(self) -> bool:
        return bool(self.queue)

    def next_packet_num(self) -> int:
        """Global packet number (shared by all channels; SYNCs consume numbers too)."""
        return next(self._counter)  # itertools.count: atomic under the GIL


class Sender:
    """Multifd source: N channel threads fed through slot swaps.

    `socks` are connected stream sockets, one per channel (index = channel id); the Sender
    owns them from now on and closes them in `close()` / `abort()`.
    """

    def __init__(
        self,
        socks: Sequence[socket.socket],
        *,
        uuid: bytes,
        layout: PacketLayout,
        compression: str = "none",
        level: int | None = None,
        zero_page_detection: bool = False,
        page_size: int = 4096,
        rate_limiter: RateLimiter | None = None,
        stats: Stats | None = None,
    ) -> None:
        if not 1 <= len(socks) <= 255:
            raise ValueError(f"multifd needs 1..255 channels, got {len(socks)}")
        if len(uuid) != 16:
            raise ValueError("uuid must be 16 bytes")
        if zero_page_detection and layout is not PacketLayout.HEAD:
            raise ValueError("in-channel zero-page detection needs the HEAD packet layout "
                             "(a 7.2 peer ignores zero_pages)")
        self.uuid = bytes(uuid)
        self.layout = layout
        self.method = get_method(compression)
        self.level = level
        self.zero_page_detection = zero_page_detection
        self.page_size = page_size
        self.rate_limiter = rate_limiter
        self.stats = stats
        self._mu = threading.Lock()
        self._idle_cv = threading.Condition(self._mu)  # a channel became idle
        self._sync_cv = threading.Condition(self._mu)  # a SYNC was written
        self._send_mutex = threading.Lock()  # like multifd_send_mutex: one producer picks
        self._sync_mutex = threading.Lock()
        self._packet_counter = itertools.count()
        self._next_channel = 0
        self._error: MultifdError | None = None
        self._quit = False
        self._started = False
        self._closed = False
        self.channels = [SendChannel(self, i, s) for i, s in enumerate(socks)]

    # -- public API -------------------------------------------------------------------

    @property
    def error(self) -> MultifdError | None:
        """The error that failed this Sender, if any."""
        return self._error

    def new_slot(self) -> SendSlot:
        """A client's own slot (one per producer; reuse the one `send` hands back)."""
        return SendSlot(self.page_size)

    def start(self) -> None:
        """Start one thread per channel; each writes its init packet first."""
        if self._started:
            raise RuntimeError("Sender already started")
        self._started = True
        for ch in self.channels:
            ch.thread = threading.Thread(target=self._run, args=(ch,),
                                         name=f"multifdsend_{ch.id}", daemon=True)
            ch.thread.start()

    def send(self, slot: SendSlot, timeout: float | None = None) -> SendSlot:
        """Queue `slot`'s payload on the next idle channel (round-robin).

        Blocks until a channel has an empty slot, swaps `slot` with it and returns the
        empty one for the caller to fill next. Thread-safe for several
        producers. Raises MultifdError if the Sender failed or (with `timeout`) no channel
        became idle in time.
        """
        got = self._send(slot, True, timeout)
        assert got is not None
        return got

    def try_send(self, slot: SendSlot) -> SendSlot | None:
        """Like `send`, but returns None at once when no channel has a free slot (the
        producer may do useful work meanwhile, e.g. scan pages ahead, and try again)."""
        return self._send(slot, False, None)

    def _send(self, slot: SendSlot, block: bool, timeout: float | None) -> SendSlot | None:
        payload = slot.active
        if payload is None or payload.is_empty():
            raise ValueError("send() of an empty slot")
        send_ops_for(payload).check(payload, self.layout)
        if not self._started:
            raise RuntimeError("Sender not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        n = len(self.channels)
        waited = 0  # perf_counter_ns when the producer began waiting for a slot
        with self._send_mutex, self._mu:
            while True:
                self._raise_if_failed()
                start = self._next_channel
                for k in range(n):  # an idle channel first, else one with a free slot
                    ch = self.channels[(start + k) % n]
                    if not ch.queue:
                        break
                else:
                    for k in range(n):
                        ch = self.channels[(start + k) % n]
                        if ch.spare:
                            break
                    else:
                        if not block:
                            return None
                        waited = waited or time.perf_counter_ns()
                        self._wait(self._idle_cv, deadline, "a free channel slot")
                        continue
                break
            if waited:  # the channels were the bottleneck: the slot it got counts the wait
                ch.stats.add("slot_waits", 1)
                ch.stats.add("slot_wait_ns", time.perf_counter_ns() - waited)
            self._next_channel = (ch.id + 1) % n
            ch.queue.append(slot)
            slot = ch.spare.pop()
            ch.cv.notify()
        return slot

    def sync(self, timeout: float | None = None) -> None:
        """Write exactly one SYNC packet on every channel, each after that channel's
        queued jobs; return once all of them are written.

        DEADLOCK HAZARD (qemu-reference.md 3.6): once channel k has sent its SYNC, the
        destination stops reading channel k until its main-stream loader reaches the
        matching marker. The caller must therefore write *and flush* the main-stream EOS
        (qemu-7.2) or MULTIFD_FLUSH (qemu-10) marker right after this returns, before it
        queues any more pages; otherwise later sends can block forever on a full socket.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        # The send lock is held until every SYNC is out: a payload queued meanwhile would
        # land before the SYNC on one channel and after it on another, so one producer's
        # sequence (device-state buffers) could straddle the barrier out of order.
        with self._sync_mutex, self._send_mutex, self._mu:
            self._raise_if_failed()
            if not self._started:
                raise RuntimeError("Sender not started")
            for ch in self.channels:
                ch.pending_sync = True
                ch.cv.notify()
            while any(ch.pending_sync for ch in self.channels):
                self._raise_if_failed()
                self._wait(self._sync_cv, deadline, "the SYNC packets to be written")

    def abort(self, reason: str = "aborted") -> None:
        """Fail the Sender now: shut the sockets down so blocked sends return, join every
        channel thread, close the sockets. Idempotent."""
        self._fail(MultifdError(f"multifd sender aborted: {reason}"))
        self._join(None)
        for ch in self.channels:  # close with RST: a FIN queued behind unsent data never
            _linger_zero(ch.sock)  # reaches a peer that stopped reading; a reset does
        self._close_sockets()

    def close(self, timeout: float = 30.0) -> None:
        """Finish: let pending jobs and SYNCs go out (up to `timeout`), stop and join the
        threads, close the sockets. Aborts if the channels do not drain in time."""
        if self._closed:
            return
        if self._started:
            deadline = time.monotonic() + timeout
            with self._mu:
                while self._error is None and any(
                    ch.pending_job or ch.pending_sync for ch in self.channels
                ):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._idle_cv.wait(min(left, _WAIT_SLICE))
                self._quit = True
                for ch in self.channels:
                    ch.cv.notify()
            if not self._join(max(0.0, deadline - time.monotonic())):
                self._fail(MultifdError("multifd sender: channels did not drain on close"))
                self._join(None)
        self._close_sockets()

    def channel_stats(self) -> list[dict[str, int]]:
        """Per-channel counters: packets, sync_packets, wire_bytes, wire_bytes_<kind>,
        logical_bytes, normal_pages, zero_pages, device_state_buffers, busy_ns (codec and
        send), slot_waits / slot_wait_ns (a producer waited for this channel's slot)."""
        return [dict(ch.stats) for ch in self.channels]

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.abort(f"{exc[0].__name__}: {exc[1]}")  # type: ignore[union-attr]

    # -- internals --------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed or self._quit:
            raise MultifdError("multifd sender is closed")

    def _wait(self, cv: threading.Condition, deadline: float | None, what: str) -> None:
        if deadline is None:
            cv.wait(_WAIT_SLICE)
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise MultifdError(f"multifd sender: timed out waiting for {what}")
        cv.wait(min(left, _WAIT_SLICE))

    def _fail(self, err: MultifdError) -> None:
        with self._mu:
            if self._error is None:
                self._error = err
            self._quit = True
            for ch in self.channels:
                ch.cv.notify_all()
            self._idle_cv.notify_all()
            self._sync_cv.notify_all()
        for ch in self.channels:
            try:
                ch.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _join(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.current_thread()
        for ch in self.channels:
            t = ch.thread
            if t is None or t is me:
                continue
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                return False
        return True

    def _close_sockets(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ch in self.channels:
            try:
                ch.sock.close()
            except OSError:
                pass

    def _run(self, ch: SendChannel) -> None:
        try:
            sendmsg_all(ch.sock, [InitPacket(self.uuid, ch.id).encode()])
            limiter = self.rate_limiter
            st = ch.stats
            while True:
                with self._mu:
                    while not (ch.pending_job or ch.pending_sync or self._quit):
                        ch.cv.wait()
                    if self._error is not None:
                        return
                    jobs = list(ch.queue)  # every queued packet goes out in one gather
                    if not jobs and not ch.pending_sync:
                        return  # quit with nothing pending
                if jobs:
                    t_busy = time.perf_counter_ns()  # busy: codec + send, not rate-limit waits
                    bufs: list[memoryview] = []
                    total = logical = 0
                    by_kind: dict[str, int] = {}
                    for job in jobs:
                        payload = job.active
                        ops = send_ops_for(payload)  # type: ignore[arg-type]
                        logical += ops.logical_bytes(payload)
                        views = byte_views(ops.prepare(payload, ch))
                        wire = sum(map(len, views))
                        bufs += views
                        total += wire
                        by_kind[ops.stat_name] = by_kind.get(ops.stat_name, 0) + wire
                    st.add("packets", len(jobs))
                    st.add("wire_bytes", total)
                    st.add("logical_bytes", logical)
                    for name, wire in by_kind.items():
                        st.add("wire_bytes_" + name, wire)
                    if limiter is not None:
                        t_lim = time.perf_counter_ns()
                        limiter.consume(total)
                        t_busy += time.perf_counter_ns() - t_lim
                    send_views(ch.sock, bufs)
                    st.add("busy_ns", time.perf_counter_ns() - t_busy)
                    for job in jobs:
                        job.clear()
                    with self._mu:
                        for _ in jobs:
                            ch.spare.append(ch.queue.popleft())
                        self._idle_cv.notify_all()
                else:
                    header = ch.encoder.encode_sync(ch.next_packet_num())
                    wire = memoryview(header).nbytes
                    if limiter is not None:
                        limiter.consume(wire)
                    sendmsg_all(ch.sock, [header])
                    st.add("packets", 1)
                    st.add("sync_packets", 1)
                    st.add("wire_bytes", wire)
                    st.add("wire_bytes_ram", wire)
                    with self._mu:
                        ch.pending_sync = False
                        self._sync_cv.notify_all()
        except BaseException as exc:  # any failure fails the whole Sender
            self._fail(MultifdError(f"multifd channel {ch.id} failed: "
                                    f"{type(exc).__name__}: {exc}"))
