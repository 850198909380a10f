"""Destination side of the multifd core: the Receiver and its channel threads.

Sequence (QEMU `multifd.c` multifd_recv_new_channel / multifd_recv_thread /
multifd_recv_sync_main, qemu-reference.md 3.1, 3.5, 3.6):

    socket                 multifdrecv_<id>                Receiver           main loader
      |-- init (64 B) --> add_channel: validate, bind id, start thread           |
      |-- hdr (1 recv) -->| kind = flags & kind_mask -> RecvOps                   |
      |-- rest + data --->| validate vs blocks, recv_into RAM / sink             |
      |-- SYNC ---------->| (pages first) reached SYNC; BLOCK                    |
      |                   |                                 |<-- sync_main() at EOS (7.2)
      |                   |                                 |    or MULTIFD_FLUSH (10)
      |                   |<-- released when all N reached -|                    |
      |-- EOF ----------->| thread ends                                          |

Guarantee of the barrier: when `sync_main` returns, every packet sent before the matching
SYNC on every channel is in memory, and no channel has read past its SYNC before then, so
an older copy of a page can never land after a newer one.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from multifd.compress import get_method
from multifd.multifd._io import recv_at_least_into, recv_exact_into, recvmsg_exact_into
from multifd.multifd.slots import ChannelStats, MultifdError, Stats, recv_ops_table
from multifd.wire.constants import (
    MULTIFD_COMMON_HEADER_SIZE,
    MULTIFD_INIT_PACKET_SIZE,
    PacketLayout,
)
from multifd.wire.errors import BadRecordType, Truncated
from multifd.wire.packet import InitPacket, decode_common_header, validate_init

_WAIT_SLICE = 0.1
DEFAULT_MAX_DEVICE_STATE_PAYLOAD = 64 * 1024 * 1024

DeviceStateSink = Callable[[str, int, bytearray], None]


class RecvChannel:
    """One receiving channel: socket, thread, header/scratch buffers, decompressor.

    A packet's first read asks for up to the longest header of the allowed kinds, so one
    recv usually brings a whole header whatever its kind. Bytes that turn out to lie past
    a shorter header (a device-state packet's payload, even the next packets) wait in
    the carry buffer; every later read of the channel takes them first.
    """

    def __init__(self, receiver: Receiver, cid: int, sock: socket.socket) -> None:
        self.id = cid
        self.sock = sock
        self.layout = receiver.layout
        self.page_size = receiver.page_size
        self.config = receiver
        self.header = memoryview(bytearray(receiver._header_size))
        self.have = 0  # bytes of the current packet's header in self.header
        self._carry = memoryview(bytearray(receiver._header_size))
        self._pending = self._carry[:0]  # read past the current header, not yet used
        self.compression_flag = int(receiver.method.flag)
        self.decompressor = (receiver.method.new_decompressor()
                             if receiver.method.flag else None)
        self.stats = ChannelStats(receiver.stats)
        self.at_sync = False
        self.ended = False
        self.thread: threading.Thread | None = None
        self._state: dict[int, Any] = {}

    def read_exact(self, view: memoryview) -> None:
        if self._pending:
            view = self._take_pending(view)
            if not view:
                return
        recv_exact_into(self.sock, view)

    def read_scatter(self, views: list[memoryview]) -> None:
        while self._pending and views:
            rest = self._take_pending(views[0])
            views = [rest, *views[1:]] if rest else views[1:]
        if views:
            recvmsg_exact_into(self.sock, views)

    def _take_pending(self, view: memoryview) -> memoryview:
        """Fill the start of `view` from the carried bytes; returns what is left to read."""
        p = self._pending
        k = min(len(p), len(view))
        view[:k] = p[:k]
        self._pending = p[k:]
        return view[k:]

    def begin_packet(self) -> int:
        """Bring the next packet's first bytes into `header`, at least its common header
        and up to len(header); returns how many (0: EOF between packets)."""
        head = self.header
        n = len(self._pending)
        if not n:
            return recv_at_least_into(self.sock, head, MULTIFD_COMMON_HEADER_SIZE)
        head[:n] = self._pending
        self._pending = self._carry[:0]
        if n < MULTIFD_COMMON_HEADER_SIZE:
            got = recv_at_least_into(self.sock, head[n:], MULTIFD_COMMON_HEADER_SIZE - n)
            if not got:
                raise Truncated("channel closed in the middle of a packet",
                                field="bytes_missing", value=MULTIFD_COMMON_HEADER_SIZE - n)
            n += got
        return n

    def end_header(self, got: int, header_size: int) -> None:
        """The packet's kind says its header is `header_size` bytes: keep what was read
        past it for the reads that follow."""
        if got > header_size:
            extra = got - header_size
            self._carry[:extra] = self.header[header_size:got]
            self._pending = self._carry[:extra]
            got = header_size
        self.have = got

    def state(self, ops: object, factory: Callable[[], Any]) -> Any:
        key = id(ops)
        st = self._state.get(key)
        if st is None:
            st = self._state[key] = factory()
        return st


class Receiver:
    """Multifd destination: validates channels, runs their threads, provides the barrier.

    `blocks` maps RAM block names to RamBlock-like objects (name, used_length, page_size,
    view, pages). `device_state_sink(idstr, instance_id, data)` receives device-state
    buffers on the channel thread (it should only store them). `max_payload` bounds a
    device-state buffer. `on_error(err)` is called once, from the failing thread.
    `fresh_ram=True` promises the blocks are all zero now (a new machine): zero pages
    never received are then skipped without touching memory. `received` (with fresh_ram)
    shares that map (bool per page, by block name) with the main-stream loader, which
    writes pages too and skips ZERO records the same way.
    Sockets passed to `add_channel` are owned by the Receiver afterwards.
    """

    def __init__(
        self,
        *,
        channels: int,
        uuid: bytes,
        layout: PacketLayout,
        compression: str = "none",
        page_size: int = 4096,
        blocks: Mapping[str, Any],
        device_state_sink: DeviceStateSink | None = None,
        max_payload: int = DEFAULT_MAX_DEVICE_STATE_PAYLOAD,
        on_error: Callable[[MultifdError], None] | None = None,
        stats: Stats | None = None,
        fresh_ram: bool = False,
        received: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        if not 1 <= channels <= 255:
            raise ValueError(f"multifd needs 1..255 channels, got {channels}")
        self.channels = channels
        self.uuid = bytes(uuid)
        self.layout = layout
        self.method = get_method(compression)
        self.page_size = page_size
        self.blocks = dict(blocks)
        for name, b in self.blocks.items():
            if b.page_size != page_size:
                raise ValueError(f"block {name!r} page size {b.page_size} != {page_size}")
        self.block_sizes = {name: int(b.used_length) for name, b in self.blocks.items()}
        # fresh_ram: the blocks are all zero before the migration (a new machine), so a
        # zero page never received needs no write and no read (QEMU's recv bitmap).
        # The caller normally passes the maps it shares with its loader; without them the
        # core makes its own (all False, one bool per page).
        self.received: dict[str, np.ndarray] = (
            {} if not fresh_ram else dict(received) if received is not None
            else {name: np.zeros(size // page_size, dtype=bool)
                  for name, size in self.block_sizes.items()})
        self.device_state_sink = device_state_sink
        self.max_payload = max_payload
        self.on_error = on_error
        self.stats = stats
        self._kind_mask, self._ops = recv_ops_table(layout)
        self._header_sizes = {bits: ops.header_size(page_size)
                              for bits, ops in self._ops.items()}
        self._header_size = max(self._header_sizes.values())
        self._mu = threading.Lock()
        self._cv = threading.Condition(self._mu)
        self._chans: dict[int, RecvChannel] = {}
        self._n_at_sync = 0
        self._handed = 0  # sockets passed to add_channel: numbers them in its errors
        self._error: MultifdError | None = None
        self._stopping = False
        self._closed = False
        self.syncs = 0

    # -- public API -------------------------------------------------------------------

    @property
    def error(self) -> MultifdError | None:
        """The error that failed this Receiver, if any."""
        return self._error

    def add_channel(self, sock: socket.socket, timeout: float | None = None) -> int:
        """Read and validate `sock`'s 64-byte init packet (magic, version, uuid, id <
        channels, id not yet used), then start its receive thread. Returns the id.

        On a validation error the WireError/MultifdError propagates and the socket is left
        to the caller (QEMU fails the migration then). Until its init packet is read a
        connection has no channel id, so read errors name it "multifd connection N": N
        counts the sockets handed to this Receiver from 1 (the destination hands them
        over in accept order), so the operator can tell which one the source broke."""
        with self._mu:
            self._handed += 1
            conn = self._handed
        buf = bytearray(MULTIFD_INIT_PACKET_SIZE)
        old = sock.gettimeout()
        sock.settimeout(timeout)
        try:
            recv_exact_into(sock, memoryview(buf))
        except TimeoutError:
            after = f" after {timeout:g} s" if timeout is not None else ""
            raise MultifdError(f"multifd connection {conn}: timed out reading its init "
                               f"packet{after}") from None
        except Truncated as exc:
            raise Truncated(f"multifd connection {conn}: closed by the source while reading "
                            "its init packet", field=exc.field, value=exc.value) from None
        except OSError as exc:
            cause = "reset by the source" if exc.errno == errno.ECONNRESET else "failed"
            raise MultifdError(f"multifd connection {conn}: {cause} while reading its init "
                               f"packet ({exc.strerror or exc})") from exc
        finally:
            sock.settimeout(old)
        pkt = InitPacket.decode(bytes(buf))
        with self._mu:
            if self._stopping:
                raise MultifdError("multifd receiver is closed")
            validate_init(pkt, uuid=self.uuid, channels=self.channels,
                          seen=set(self._chans))
            cid = int(pkt.channel_id)
            if cid in self._chans:  # validate_init checks too; keep it under our lock
                raise MultifdError(f"multifd channel id {cid} connected twice")
            ch = RecvChannel(self, cid, sock)
            self._chans[cid] = ch
            ch.thread = threading.Thread(target=self._run, args=(ch,),
                                         name=f"multifdrecv_{cid}", daemon=True)
            ch.thread.start()
            self._cv.notify_all()
        return cid

    def wait_all_channels(self, timeout: float | None = None) -> None:
        """Block until all `channels` channels are connected (or fail/timeout)."""
        self._wait_for(lambda: len(self._chans) == self.channels, timeout,
                       "all multifd channels to connect")

    def channels_ended(self) -> bool:
        """Every channel saw a clean EOF from the source: nothing more will arrive."""
        with self._mu:
            return bool(self._chans) and all(ch.ended for ch in self._chans.values())

    def sync_main(self, timeout: float | None = None,
                  check: Callable[[], None] | None = None) -> None:
        """The main-stream loader's barrier at EOS (7.2) / MULTIFD_FLUSH (10): wait until
        every channel has reached its SYNC packet (and applied everything before it), then
        release them all. Raises MultifdError if a channel failed, closed, or on timeout.
        `check()` runs at every wake-up (at least every 0.1 s) and may raise to give up:
        the loader is not reading the main channel meanwhile, so this is how it learns
        that the source is gone while a stalled channel keeps its SYNC from arriving."""

        def all_reached() -> bool:
            if self._n_at_sync == self.channels:
                return True
            if check is not None:
                try:
                    check()
                except Exception as exc:
                    late = sorted(ch.id for ch in self._chans.values() if not ch.at_sync)
                    raise MultifdError(f"{exc} (multifd channel {', '.join(map(str, late))} "
                                       "had not reached its SYNC)") from exc
            for ch in self._chans.values():
                if ch.ended and not ch.at_sync:
                    raise MultifdError(f"multifd channel {ch.id} closed before its SYNC")
            return False

        with self._mu:
            self._wait_locked(all_reached, timeout, "every channel's SYNC")
            for ch in self._chans.values():
                ch.at_sync = False
            self._n_at_sync = 0
            self.syncs += 1
            self._cv.notify_all()

    def abort(self, reason: str = "aborted") -> None:
        """Fail the Receiver and stop every thread (promptly, also those at a SYNC)."""
        self._fail(MultifdError(f"multifd receiver aborted: {reason}"), notify=False)
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        """Stop: shut the sockets down, release the barrier, join every thread, close the
        sockets. Safe to call after EOF or after an error; idempotent."""
        with self._mu:
            self._stopping = True
            chans = list(self._chans.values())
            self._cv.notify_all()
        for ch in chans:
            try:
                ch.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        for ch in chans:
            if ch.thread is not None and ch.thread is not me:
                ch.thread.join(max(0.0, deadline - time.monotonic()))
        if self._closed:
            return
        self._closed = True
        for ch in chans:
            try:
                ch.sock.close()
            except OSError:
                pass

    def channel_stats(self) -> dict[int, dict[str, int]]:
        """Per-channel counters: packets, sync_packets, normal_pages, zero_pages,
        wire_bytes_ram, wire_bytes_device_state, device_state_buffers, busy_ns (reads and
        decode of packets), sync_waits / sync_wait_ns (held at a SYNC by the barrier)."""
        with self._mu:
            return {cid: dict(ch.stats) for cid, ch in sorted(self._chans.items())}

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    def _wait_for(self, pred: Callable[[], bool], timeout: float | None, what: str) -> None:
        with self._mu:
            self._wait_locked(pred, timeout, what)

    def _wait_locked(self, pred: Callable[[], bool], timeout: float | None, what: str) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._error is not None:
                raise self._error
            if self._stopping:
                raise MultifdError("multifd receiver is closed")
            if pred():
                return
            wait = _WAIT_SLICE
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MultifdError(f"multifd receiver: timed out waiting for {what}")
                wait = min(wait, left)
            self._cv.wait(wait)

    def _fail(self, err: MultifdError, *, notify: bool = True) -> None:
        with self._mu:
            if self._error is not None:
                return
            self._error = err
            chans = list(self._chans.values())
            self._cv.notify_all()
        for ch in chans:  # like multifd_recv_terminate_threads: stop every channel
            try:
                ch.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if notify and self.on_error is not None:
            self.on_error(err)

    def _reach_sync(self, ch: RecvChannel) -> bool:
        """Post "reached SYNC", then block until sync_main releases us. False: stopping."""
        t_wait = time.perf_counter_ns()
        with self._mu:
            ch.at_sync = True
            self._n_at_sync += 1
            self._cv.notify_all()
            while ch.at_sync:
                if self._stopping or self._error is not None:
                    return False
                self._cv.wait(_WAIT_SLICE)
        ch.stats.add("sync_waits", 1)
        ch.stats.add("sync_wait_ns", time.perf_counter_ns() - t_wait)
        return True

    def _run(self, ch: RecvChannel) -> None:
        common = ch.header[:MULTIFD_COMMON_HEADER_SIZE]
        mask = self._kind_mask
        table = self._ops
        sizes = self._header_sizes
        st = ch.stats
        try:
            while True:
                got = ch.begin_packet()
                if not got:
                    break  # EOF between packets: the source is done with this channel
                flags = decode_common_header(common)
                kind = flags & mask
                ops = table.get(kind)
                if ops is None:
                    raise BadRecordType(f"packet kind not allowed with layout "
                                        f"{self.layout.value}", field="flags", value=flags)
                t_busy = time.perf_counter_ns()  # busy: the packet's reads and decode
                ch.end_header(got, sizes[kind])
                done = ops.receive(ch, flags)
                st.add("busy_ns", time.perf_counter_ns() - t_busy)
                if done:
                    st.add("packets", 1)
                    st.add("sync_packets", 1)
                    if not self._reach_sync(ch):
                        break
                else:
                    st.add("packets", 1)
        except BaseException as exc:
            if not self._stopping:
                self._fail(MultifdError(f"multifd channel {ch.id} failed: "
                                        f"{type(exc).__name__}: {exc}"))
        finally:
            with self._mu:
                ch.ended = True
                self._cv.notify_all()
