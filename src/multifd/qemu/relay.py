"""A live decoding relay between two real QEMUs (`multifd relay`).

    QEMU source --main + N--> Relay --main + M--> QEMU destination (-incoming defer)
                                  \\--> [--record IMAGE: the same stream, multifd off]

Threads: the caller's thread reads and decodes the upstream main stream and writes the
downstream one (records re-encoded one by one, the device tail verbatim); one thread per
upstream multifd channel reads a packet at a time into buffers it reuses (header, payload,
decompressed pages) and sends it on at once. Nothing is held beyond those buffers: memory
does not grow with the guest.

Two channel modes:
* passthrough (same profile, channel count and compression on both sides): upstream
  channel i goes to downstream channel i, packets byte for byte (header + payload in one
  sendmsg), SYNC packets included; a compression stream thus stays whole.
* transcode (anything else): pages are decompressed, sent on whichever downstream channel
  is free, recompressed with that channel's stream. Zero pages from packets stay in
  packets towards qemu-10 and become pages of zeros towards qemu-7.2 (whose packets carry
  none; a ZERO record on the main stream could not be placed in order from a channel).
  SYNC packets downstream are the relay's own. Pages on the main stream (multifd off
  upstream) are gathered into packets when the destination uses multifd.

Ordering (the barrier): at an upstream sync marker (RAM EOS for qemu-7.2, MULTIFD_FLUSH for
qemu-10, every EOS without multifd) the main thread waits until every upstream channel has
read its SYNC packet (a channel stops there until released), then syncs downstream, writes
the destination's marker(s) and releases the channels. So the pages of upstream pass k all
reach the destination before its k-th sync marker, and none of pass k+1 before it. A
qemu-10 FLUSH towards a qemu-7.2 destination (which syncs at every EOS) ends the ram
section there and opens a new PART: one downstream SYNC per channel per EOS, exactly.
Passthrough without `--record` does not hold the channels (the destination holds each at
its SYNC packet until the marker, as it does for a source; holding them here too stalled
the pipeline twice at every sync): the marker still waits until every channel has sent its
SYNC packet on, so a destination never waits at a marker for a SYNC that cannot come.

Main stream: ram sections are re-encoded record by record (CONTINUE recomputed for what
each output carried); the first device section starts the opaque device tail, forwarded
verbatim (QEMU's device sections cannot be delimited: only RAM may be live), unless the
caller names its framing (`framings`, our own machines' live devices). `--record` writes a
third output, the same migration with multifd off (a QEMU stream file).

The end: the source closes main (QEMU) -> the relay drains the channels, closes its own
and half-closes main downstream like the source did, then waits for the destination to
close main (loaded). A source that instead waits for that close as its confirmation (ours)
gets it passed back: the relay closes upstream main only after the destination did.

Failures: the first error (either side) is kept with its side; every socket on both sides
is then shut down, so the source QEMU sees a failed migration (its guest keeps running)
and the destination a failed incoming migration. Raises RelayError(side, cause).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import select
import socket
import struct
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from multifd.compress import get_method
from multifd.migration.profile import Profile
from multifd.multifd._io import recv_at_least_into, recv_exact_into, send_views
from multifd.qemu.image import SWITCHOVER_START
from multifd.qemu.peer import COMPRESSIONS, resolve_uuid
from multifd.testing.faults import Fault, parse_fault
from multifd.transport.channels import ChannelError, accept_channels, connect_channels
from multifd.transport.exec import open_stream
from multifd.transport.sockets import Listener, connect, sendmsg_all
from multifd.transport.tls import (
    TlsConfig,
    TlsError,
    accept_tls,
    accept_tls_channels,
    connect_tls,
    connect_tls_channels,
)
from multifd.transport.uri import TcpAddress, UnixAddress, parse_uri
from multifd.wire.constants import (
    MULTIFD_COMMON_HEADER_SIZE,
    MULTIFD_DEVICE_STATE_HEADER_SIZE,
    MULTIFD_INIT_PACKET_SIZE,
    MULTIFD_MAX_COMPRESSED_PAYLOAD,
    RAM_SECTION_IDSTR,
    Command,
    MultifdFlag,
    SectionType,
    page_count,
    ram_packet_len,
)
from multifd.wire.errors import Truncated, WireError
from multifd.wire.packet import (
    DEFAULT_MAX_DEVICE_STATE_PAYLOAD,
    InitPacket,
    RamPacketEncoder,
    decode_common_header,
    decode_device_state_packet,
    decode_ram_packet,
    validate_init,
)
from multifd.wire.ram import (
    RamEos,
    RamMemSize,
    RamMultifdFlush,
    RamPage,
    RamSettings,
    RamZero,
    RamZeroRun,
    encode_ram_record,
)
from multifd.wire.ram_batch import encode_page_run, encode_zero_run
from multifd.wire.stream import (
    BodyParser,
    CommandRecord,
    Configuration,
    DeviceTail,
    EndOfStream,
    FileHeader,
    MainStreamDecoder,
    SectionBody,
    SectionFooter,
    SectionHeader,
    VmDescription,
    encode_record,
)

__all__ = ["Relay", "RelayError", "RelayResult", "RelaySide", "parse_relay_fault"]

PAGE_SIZE = 4096
RECV_CHUNK = 1 << 20
FLUSH_AT = 1 << 20  # main-stream bytes buffered before a send
_WAIT_SLICE = 0.1
_EOS = encode_ram_record(RamEos())
_FLUSH = encode_ram_record(RamMultifdFlush())
_SYNC = int(MultifdFlag.SYNC)
_DEVICE_STATE = int(MultifdFlag.DEVICE_STATE)
_LINGER_RST = struct.pack("ii", 1, 0)
RELAY_FAULT_KINDS = ("reset-channel", "stall-channel", "close-main")


class RelayError(Exception):
    """The relay failed; `side` is "in" (the source QEMU's side), "out" or "relay"."""

    def __init__(self, side: str, cause: str) -> None:
        super().__init__(f"{_SIDE_NAMES.get(side, side)}: {cause}")
        self.side = side
        self.cause = cause


_SIDE_NAMES = {"in": "upstream (source QEMU)", "out": "downstream (destination QEMU)",
               "relay": "relay"}


@dataclass(frozen=True)
class RelaySide:
    """One side's migration parameters (as the QEMU on that side was configured)."""

    uri: str
    profile: Profile
    channels: int = 0
    compression: str = "none"
    uuid: bytes | None = None
    tls: TlsConfig | None = None

    def check(self, side: str) -> None:
        if not 0 <= self.channels <= 255:
            raise RelayError(side, f"channels must be 0 (multifd off) .. 255, not "
                             f"{self.channels}")
        if self.compression not in COMPRESSIONS:
            raise RelayError(side, f"compression must be one of {', '.join(COMPRESSIONS)}")
        if self.channels == 0 and self.compression != "none":
            raise RelayError(side, "compression needs multifd (channels >= 1)")


@dataclass(frozen=True)
class RelayFault:
    """`--inject-fault SIDE:KIND[:N]@PHASE` (the demo's grammar with a side in front)."""

    side: str
    fault: Fault

    @property
    def spec(self) -> str:
        return f"{self.side}:{self.fault.spec}"


def parse_relay_fault(spec: str) -> RelayFault:
    """``in:reset-channel:1@iterate`` -> RelayFault; ValueError naming what is wrong."""
    side, sep, rest = spec.partition(":")
    if not sep or side not in ("in", "out"):
        raise ValueError(f"fault {spec!r}: expected SIDE:KIND[:N]@PHASE with SIDE in or out")
    fault = parse_fault(rest)
    if fault.kind not in RELAY_FAULT_KINDS:
        raise ValueError(f"fault {spec!r}: the relay injects {', '.join(RELAY_FAULT_KINDS)} "
                         "(kill a QEMU from outside instead)")
    return RelayFault(side, fault)


# ----------------------------------------------------------------------------- statistics


@dataclass
class SideStats:
    """Counters of one side (written by one thread each, read by the progress line)."""

    main_bytes: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    syncs: int = 0
    device_state_packets: int = 0
    chan_bytes: list[int] = field(default_factory=list)
    chan_busy_s: list[float] = field(default_factory=list)

    def to_json(self, side: RelaySide, wall_s: float) -> dict[str, Any]:
        wall = max(wall_s, 1e-9)
        return {
            "profile": side.profile.name,
            "channels": side.channels,
            "compression": side.compression,
            "bytes": {"main": self.main_bytes, "channels": sum(self.chan_bytes),
                      "total": self.main_bytes + sum(self.chan_bytes)},
            "pages": {"normal": self.normal_pages, "zero": self.zero_pages},
            "per_channel": [{"id": i, "bytes": b, "busy_pct": round(100 * s / wall, 1)}
                            for i, (b, s) in enumerate(zip(self.chan_bytes, self.chan_busy_s,
                                                           strict=True))],
            "syncs": self.syncs,
            "device_state_packets": self.device_state_packets,
        }


@dataclass
class RelayResult:
    """The `--json` summary's numbers."""

    inp: SideStats
    out: SideStats
    passes: int
    total_time_ms: float
    relay_added_ms: float
    peak_rss_mib: float
    recorded: str | None
    passthrough: bool


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM (per address space; getrusage's ru_maxrss survives
    execve, so it would report a big parent's peak), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- main stream


_OUT, _BODY, _AFTER_EOS = "out", "body", "after-eos"


class _MainWriter:
    """A main stream being written (the destination's socket or the record file).

    Thread-safe: towards a destination without multifd (and into the record file) the
    channel threads add PAGE/ZERO records. Those may come right after a sync, before the
    main thread has seen the source's next ram PART header: the writer then opens a PART
    itself (and skips the source's header when it comes; QEMU loads PART and END alike),
    and closes that section with EOS + footer should anything else come first. It tracks
    the last block named, so CONTINUE is right for what this stream carried."""

    def __init__(self, send: Callable[[list[Any]], object]) -> None:
        self._send = send
        self._bufs: list[bytes] = []
        self._pending = 0
        self.bytes = 0
        self.lock = threading.Lock()
        self._last_block: str | None = None
        self.ram_sid = 0
        self._state = _OUT  # _BODY: records may follow; _AFTER_EOS: the footer is due
        self._self_opened = False  # the open section is one this writer opened

    def write(self, data: bytes) -> None:
        with self.lock:
            self._add(data)

    def eos(self) -> None:
        with self.lock:
            self._add(_EOS)
            self._state = _AFTER_EOS

    def ram_header(self, data: bytes) -> None:
        with self.lock:
            if self._state == _BODY:  # opened already for channel pages
                self._self_opened = False
                return
            self._add(data)
            self._state = _BODY

    def ram_footer(self, data: bytes) -> None:
        with self.lock:
            if self._state == _BODY and self._self_opened:  # written already
                return
            self._add(data)
            self._state = _OUT

    def other(self, data: bytes) -> None:
        """A record outside any section (command, device state)."""
        with self.lock:
            if self._state == _BODY and self._self_opened:
                self._add(_EOS + encode_record(SectionFooter(self.ram_sid)))
                self._state = _OUT
                self._self_opened = False
            self._add(data)

    def _ram(self) -> None:
        if self._state == _BODY:
            return
        if self._state == _AFTER_EOS:
            self._add(encode_record(SectionFooter(self.ram_sid)))
        self._add(encode_record(SectionHeader(SectionType.PART, self.ram_sid)))
        self._state = _BODY
        self._self_opened = True

    def _add(self, data: bytes) -> None:
        if data:
            self._bufs.append(data)
            self._pending += len(data)
            if self._pending >= FLUSH_AT:
                self._flush()

    def _flush(self) -> None:
        if self._bufs:
            bufs, self._bufs = self._bufs, []
            self._send(bufs)
            self.bytes += self._pending
            self._pending = 0

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def zero(self, block: str, offsets: np.ndarray) -> None:
        if len(offsets):
            with self.lock:
                self._ram()
                self._add(encode_zero_run(block, offsets, first_continues=(
                    block == self._last_block)))
                self._last_block = block

    def zero_fill(self, rec: RamZero) -> None:
        with self.lock:
            self._ram()
            self._add(encode_ram_record(RamZero(rec.offset, rec.block, rec.fill,
                                                cont=rec.block == self._last_block)))
            self._last_block = rec.block

    def pages(self, block: str, offsets: np.ndarray, data: memoryview) -> None:
        """PAGE records for `offsets` with `data` (len(offsets) pages, copied here)."""
        n = len(offsets)
        if n:
            arr = np.frombuffer(data, dtype=np.uint8, count=n * PAGE_SIZE).reshape(n, PAGE_SIZE)
            with self.lock:
                self._ram()
                self._add(encode_page_run(block, offsets, arr,
                                          first_continues=block == self._last_block))
                self._last_block = block


# ----------------------------------------------------------------------------- channels


class _OutChan:
    """One downstream channel: socket, its own packet encoder and compression stream."""

    def __init__(self, cid: int, sock: Any, side: RelaySide, stats: SideStats,
                 stall_timeout: float, abort: threading.Event) -> None:
        self.id = cid
        self.sock = sock
        self.encoder = RamPacketEncoder(side.profile.layout)
        method = get_method(side.compression)
        self.flag = int(method.flag)
        self.compressor = method.new_compressor() if self.flag else None
        self.stats = stats
        self.stall = stall_timeout
        self.abort = abort
        self.stalled = False  # fault injection: block instead of sending

    def send(self, views: list[memoryview]) -> None:
        if self.stalled:  # as a destination that stopped reading: the send stall fires
            if self.abort.wait(self.stall):
                raise _Aborted
            raise _OutFailure(f"multifd channel {self.id}: no byte accepted for "
                              f"{self.stall:g} s (stall-channel injected)")
        t = time.perf_counter()
        try:
            n = send_views(self.sock, [v for v in views if len(v)], self.stall)
        except OSError as e:
            raise _OutFailure(f"multifd channel {self.id}: {_out_text(e)}") from None
        self.stats.chan_busy_s[self.id] += time.perf_counter() - t
        self.stats.chan_bytes[self.id] += n


class _Downstream:
    """The channels towards the destination; a free-channel pool for the transcode mode."""

    def __init__(self, side: RelaySide, chans: list[_OutChan]) -> None:
        self.chans = chans
        self._free: list[_OutChan] = list(chans)
        self._cv = threading.Condition()
        self._num = 0
        self._num_lock = threading.Lock()
        self.zero_in_packets = side.profile.zero_pages_in_multifd

    def packet_num(self) -> int:
        with self._num_lock:
            self._num += 1
            return self._num - 1

    def take(self, abort: threading.Event) -> _OutChan:
        with self._cv:
            while not self._free:
                if abort.is_set():
                    raise _Aborted
                self._cv.wait(_WAIT_SLICE)
            return self._free.pop()

    def give(self, ch: _OutChan) -> None:
        with self._cv:
            self._free.append(ch)
            self._cv.notify()

    def send_pages(self, block: str, normal: np.ndarray, data: memoryview,
                   zero: np.ndarray | None, abort: threading.Event) -> None:
        """One packet of `normal` pages (`data`, uncompressed) and the `zero` pages (towards
        qemu-7.2 as pages of zeros), on the first free channel."""
        st = self.chans[0].stats
        if zero is not None and len(zero) and not self.zero_in_packets:
            # qemu-7.2 packets carry no zero pages: send them as pages of zeros (a ZERO
            # record on the main stream could not be placed in order from here)
            joined = bytearray((len(normal) + len(zero)) * PAGE_SIZE)
            joined[: len(data)] = data
            normal = np.concatenate([normal, zero])
            data = memoryview(joined)
            zero = None
        if not len(normal) and (zero is None or not len(zero)):
            return
        ch = self.take(abort)
        try:
            if len(normal):
                payload = (ch.compressor.compress_packet([data]) if ch.compressor is not None
                           else [data])
            else:
                payload = []
            size = sum(memoryview(b).nbytes for b in payload)
            hdr = ch.encoder.encode(flags=ch.flag, packet_num=self.packet_num(),
                                    ramblock=block, normal=normal, zero=zero,
                                    next_packet_size=size)
            ch.send([hdr, *(memoryview(b).cast("B") for b in payload)])
            st.normal_pages += len(normal)
            st.zero_pages += 0 if zero is None else len(zero)
        finally:
            self.give(ch)

    def sync(self, abort: threading.Event) -> None:
        """A SYNC packet on every channel (all taken first: no packet of the pass after
        can slip in before one of them)."""
        taken: list[_OutChan] = []
        try:
            while len(taken) < len(self.chans):
                taken.append(self.take(abort))
            for ch in sorted(taken, key=lambda c: c.id):
                ch.send([ch.encoder.encode_sync(self.packet_num())])
        finally:
            for ch in taken:
                self.give(ch)
        self.chans[0].stats.syncs += 1


class _Aborted(Exception):
    """The relay is being torn down (another thread recorded the cause)."""


class _Barrier:
    """Upstream channels stop at their SYNC packet until the main thread releases them."""

    def __init__(self, n: int, abort: threading.Event) -> None:
        self.n = n
        self.abort = abort
        self._cv = threading.Condition()
        self._reached = 0
        self._generation = 0
        self._passed = [0] * n  # SYNC packets each channel has sent on (without holding)
        self.ended: set[int] = set()  # channels that hit EOF

    def reach(self) -> None:
        with self._cv:
            self._reached += 1
            self._cv.notify_all()
            gen = self._generation
            while gen == self._generation:
                if self.abort.is_set():
                    raise _Aborted
                self._cv.wait(_WAIT_SLICE)

    def passed(self, cid: int) -> None:
        """Channel `cid` sent a SYNC packet on and goes on without waiting."""
        with self._cv:
            self._passed[cid] += 1
            self._cv.notify_all()

    def channel_ended(self, cid: int) -> None:
        with self._cv:
            self.ended.add(cid)
            self._cv.notify_all()

    def wait_all(self, timeout: float, passes: int | None = None) -> None:
        """Until every channel reached its SYNC packet (held there), or with `passes`,
        until every channel has sent on that many."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while missing := (self.n - self._reached if passes is None
                              else sum(p < passes for p in self._passed)):
                if self.abort.is_set():
                    raise _Aborted
                if any(passes is None or self._passed[c] < passes for c in self.ended):
                    raise RelayError("in", "a multifd channel ended before its SYNC packet")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RelayError("in", f"{missing} of {self.n} multifd "
                                     f"channels sent no SYNC packet within {timeout:g} s "
                                     "of the sync marker")
                self._cv.wait(min(left, _WAIT_SLICE))

    def release(self) -> None:
        with self._cv:
            self._reached = 0
            self._generation += 1
            self._cv.notify_all()


# ----------------------------------------------------------------------------- the relay


class Relay:
    """One relayed migration (see the module docstring); `run()` once."""

    def __init__(self, inp: RelaySide, out: RelaySide, *, timeout: float,
                 record: str | None = None, fault: RelayFault | None = None,
                 passthrough: bool | None = None,
                 on_listen: Callable[[str], None] | None = None,
                 framings: Mapping[str, BodyParser] | None = None) -> None:
        """`framings`: section idstr -> body framing, for live device sections that can
        be delimited (our own machines'); any other device section starts the opaque
        device tail (QEMU's devices: only RAM may be live then)."""
        inp.check("in")
        out.check("out")
        try:
            in_addr, out_addr = parse_uri(inp.uri), parse_uri(out.uri)
        except ValueError as e:
            raise RelayError("relay", str(e)) from None
        if not isinstance(in_addr, TcpAddress | UnixAddress):
            raise RelayError("in", f"LISTEN_URI must be tcp: or unix:, not {inp.uri}")
        if out.channels and not isinstance(out_addr, TcpAddress | UnixAddress):
            raise RelayError("out", f"multifd needs a tcp: or unix: DEST_URI, not {out.uri}")
        if fault is not None and fault.fault.channel is not None:
            n = (inp if fault.side == "in" else out).channels
            if fault.fault.channel >= n:
                raise RelayError("relay", f"fault {fault.spec}: the {fault.side} side has "
                                 f"{n} multifd channels")
        self.inp = inp
        self.out = out
        self.timeout = timeout
        self.record_path = record
        self.fault = fault
        self.on_listen = on_listen
        same = (inp.profile == out.profile and inp.channels == out.channels
                and inp.compression == out.compression and inp.channels > 0)
        self.passthrough = same if passthrough is None else (passthrough and same)
        # channels stop at their SYNC packet (see the module docstring) unless pure
        # passthrough, where the destination orders the next pass's packets itself
        self.hold = not self.passthrough or record is not None
        self.blocks_known = threading.Event()  # RAM MEM_SIZE decoded: packets can be checked
        self.abort = threading.Event()
        self.error: RelayError | None = None
        self._err_lock = threading.Lock()
        self.in_stats = SideStats(chan_bytes=[0] * inp.channels,
                                  chan_busy_s=[0.0] * inp.channels)
        self.out_stats = SideStats(chan_bytes=[0] * out.channels,
                                   chan_busy_s=[0.0] * out.channels)
        self.in_main: Any = None
        self.in_socks: list[Any] = []
        self.out_main_sock: Any = None
        self.out_stream: Any = None
        self.out_chans: list[_OutChan] = []
        self.down: _Downstream | None = None
        self.out_main: _MainWriter | None = None
        self.recorder: _MainWriter | None = None
        self._record_file: Any = None
        self.barrier = _Barrier(inp.channels, self.abort)
        self.threads: list[threading.Thread] = []
        self.blocks: dict[str, int] = {}
        self.passes = 0
        self.phase = ""
        self._prefix = bytearray()
        self._dec = MainStreamDecoder(
            ram=RamSettings(page_size=PAGE_SIZE,
                            allow_multifd_flush=inp.profile.allow_multifd_flush,
                            batch_zero_runs=True),
            body_parsers=framings, opaque_tail=True,
            allow_switchover_start=inp.profile.switchover_start)
        self._framings = {f.name: f for f in (framings or {}).values()}
        self._in_ram_section = False
        self._stream_done = False  # VMDESCRIPTION decoded: nothing may follow
        self._ram_sid = 0
        self._out_hint = ""
        self._stalled_in: set[int] = set()  # fault injection: channels not read any more
        self._batch: _PageBatch | None = None
        self.t_in_last = 0.0
        self.t_out_done = 0.0  # the destination has everything (closed its main channel)
        self.t0 = 0.0

    # -- errors ---------------------------------------------------------------------------
    def fail(self, side: str, cause: str) -> None:
        """Keep the first error and tear both sides down."""
        if side == "out" and "closed the connection" in cause and self._out_hint:
            cause += self._out_hint  # a refusal looks like this: say what must match
        with self._err_lock:
            if self.error is None:
                self.error = RelayError(side, cause)
        self.abort.set()
        for s in self._sockets():
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    # -- phases and faults ----------------------------------------------------------------
    def _phase(self, name: str) -> None:
        if name == self.phase:
            return
        self.phase = name
        f = self.fault
        if f is None or f.fault.phase != name:
            return
        kind, n = f.fault.kind, f.fault.channel
        if f.side == "in":
            if kind == "close-main":  # what was queued already is not read any more
                raise RelayError("in", "main channel closed (close-main injected)")
            elif kind == "reset-channel":
                _rst(self.in_socks[n])
            else:
                self._stalled_in.add(n)
        else:
            if kind == "close-main":
                if self.out_main_sock is not None:
                    with contextlib.suppress(OSError):
                        self.out_main_sock.shutdown(socket.SHUT_RDWR)
            elif kind == "reset-channel":
                _rst(self.out_chans[n].sock)
            else:
                self.out_chans[n].stalled = True

    # -- upstream set-up ------------------------------------------------------------------
    def _accept(self) -> None:
        inp = self.inp
        addr = parse_uri(inp.uri)
        assert isinstance(addr, TcpAddress | UnixAddress)  # checked in __init__
        with Listener(addr) as listener:
            if self.on_listen is not None:
                self.on_listen(str(listener.address))
            if inp.channels and inp.tls is not None:
                self.in_main, self.in_socks = accept_tls_channels(
                    listener, inp.channels, inp.tls, self.timeout)
            elif inp.channels:
                self.in_main, self.in_socks = accept_channels(
                    listener, inp.channels, inp.profile.name, self.timeout)
            elif inp.tls is not None:
                self.in_main = accept_tls(listener, inp.tls, self.timeout)
            else:
                self.in_main = listener.accept(self.timeout)
        self.in_main.settimeout(self.timeout)
        for s in self.in_socks:
            s.settimeout(self.timeout)

    def _read_inits(self, uuid: bytes) -> None:
        """Upstream init packets: checked like QEMU's receiver; channels sorted by id."""
        seen: set[int] = set()
        by_id: dict[int, Any] = {}
        for k, s in enumerate(self.in_socks):
            buf = bytearray(MULTIFD_INIT_PACKET_SIZE)
            try:
                recv_exact_into(s, memoryview(buf))
                pkt = InitPacket.decode(buf)
                validate_init(pkt, uuid=uuid, channels=self.inp.channels, seen=seen)
            except WireError as e:
                raise RelayError("in", f"multifd connection {k + 1}: {e.describe()}") from None
            by_id[pkt.channel_id] = s
        self.in_socks = [by_id[i] for i in range(self.inp.channels)]

    # -- downstream set-up ----------------------------------------------------------------
    def _connect(self, uuid: bytes) -> None:
        try:
            self._connect_socks(uuid)
        except _OutFailure:
            raise
        except (ChannelError, TlsError, TimeoutError) as e:
            raise _OutFailure(f"cannot connect to {self.out.uri}: {e}") from None
        except OSError as e:
            raise _OutFailure(f"cannot connect to {self.out.uri}: {e.strerror or e}") from None

    def _connect_socks(self, uuid: bytes) -> None:
        out = self.out
        addr = parse_uri(out.uri)
        stall = self.timeout
        if isinstance(addr, TcpAddress | UnixAddress):
            if out.channels and out.tls is not None:
                main, socks = connect_tls_channels(addr, out.channels, out.tls, self.timeout)
            elif out.channels:
                main, socks = connect_channels(addr, out.channels, out.profile.name,
                                               self.timeout)
            elif out.tls is not None:
                main, socks = connect_tls(addr, out.tls, self.timeout), []
            else:
                main, socks = connect(addr, self.timeout), []
            main.settimeout(self.timeout)
            self.out_main_sock = main
            self.out_main = _MainWriter(lambda bufs: _out_send(main, bufs, stall))
        else:  # multifd off (checked in __init__)
            stream = open_stream(addr, "w")
            self.out_stream = stream
            self.out_main = _MainWriter(lambda bufs: _out_send(stream, bufs, None))
            socks = []
        self.out_chans = [_OutChan(i, s, out, self.out_stats, stall, self.abort)
                          for i, s in enumerate(socks)]
        # The QEVM header first (a qemu-10 destination classifies main by it), then the
        # channels' init packets, one at a time (a TLS channel handshakes on that write).
        self.out_main.write(encode_record(FileHeader()))
        self.out_main.flush()
        for ch in self.out_chans:
            ch.send([memoryview(InitPacket(uuid, ch.id).encode())])
        if out.channels:
            self.down = _Downstream(out, self.out_chans)

    # -- run ------------------------------------------------------------------------------
    def run(self) -> RelayResult:
        self.t0 = time.monotonic()
        try:
            self._run()
        except _Aborted:
            pass
        except RelayError as e:
            self.fail(e.side, e.cause)
        except _OutFailure as e:
            self.fail("out", str(e))
        except (ChannelError, TlsError) as e:
            self.fail("in", str(e))
        except WireError as e:
            at = f" at byte {e.offset} of the main stream" if e.offset is not None else ""
            self.fail("in", f"{e.describe()}{at}")
        except TimeoutError as e:
            self.fail("in", str(e) or f"no progress for {self.timeout:g} s")
        except OSError as e:
            self.fail("in", e.strerror or str(e))
        finally:
            self._close()
        if self.error is not None:
            raise self.error
        return self._result()

    def _run(self) -> None:
        if self.record_path is not None:
            try:
                f = open(self.record_path + ".part", "wb")  # noqa: SIM115 - closed in _close
            except OSError as e:
                raise RelayError("relay", f"cannot write {self.record_path}: "
                                 f"{e.strerror or e}") from None
            self._record_file = f
            self.recorder = _MainWriter(lambda bufs: _record_write(f, bufs))
        self._accept()
        buf = bytearray(RECV_CHUNK)
        view = memoryview(buf)
        main = self.in_main
        while True:
            try:
                n = main.recv_into(view)
            except TimeoutError:
                raise RelayError("in", f"no data from the source for {self.timeout:g} s on "
                                 "the main channel") from None
            except OSError as e:
                if self.abort.is_set():
                    raise _Aborted from None
                raise RelayError("in", f"main channel: {e.strerror or e}") from None
            if self.abort.is_set():
                raise _Aborted
            if n == 0:
                break
            self.t_in_last = time.monotonic()
            self.in_stats.main_bytes += n
            if self._dec.configuration is None:
                self._prefix += view[:n]
            self._dec.receive_data(view[:n])
            self._drain()
            if self.out_main is not None:
                self.out_main.flush()
            if self._stream_done:  # a source that waits for the end to be confirmed
                break
        if not self._stream_done:
            self._dec.receive_eof()
            self._drain()
        if not (self._dec.finished or self._stream_done) or self.phase != "completion":
            raise RelayError("in", "the source closed the main channel before the end of "
                             "the migration (source failed or cancelled?)")
        self._finish()

    def _drain(self) -> None:
        for rec in self._dec:
            self._on_record(rec)

    # -- main-stream records --------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        for w in self._writers():
            w.write(data)

    def _on_record(self, rec: object) -> None:
        st = self.in_stats
        if isinstance(rec, RamPage):
            st.normal_pages += 1
            self._on_page(rec)
            return
        self._flush_batch()
        if isinstance(rec, RamZeroRun):
            st.zero_pages += len(rec.offsets)
            self.out_stats.zero_pages += len(rec.offsets)
            for w in self._writers():
                w.zero(rec.block, rec.offsets)
        elif isinstance(rec, RamZero):
            st.zero_pages += 1
            self.out_stats.zero_pages += 1
            for w in self._writers():
                w.zero_fill(rec)
        elif isinstance(rec, RamEos | RamMultifdFlush):
            self._marker(rec)
        elif isinstance(rec, RamMemSize):
            for b in rec.blocks:
                if b.page_size is not None or b.addr is not None or b.mapped_ram:
                    raise RelayError("in", "RAM block list with postcopy/x-ignore-shared/"
                                     "mapped-ram extras is not supported")
                self.blocks[b.name] = b.used_length
            self.blocks_known.set()
            self._write(encode_ram_record(rec))
        elif isinstance(rec, SectionHeader):
            self._on_section(rec)
        elif isinstance(rec, SectionFooter):
            for w in self._writers():
                if self._in_ram_section:
                    w.ram_footer(encode_record(rec))
                else:
                    w.other(encode_record(rec))
            self._in_ram_section = False
        elif isinstance(rec, SectionBody | EndOfStream | VmDescription):
            if isinstance(rec, EndOfStream):
                self._phase("completion")
            self._stream_done = isinstance(rec, VmDescription)
            for w in self._writers():
                w.other(encode_record(rec, framings=self._framings))
        elif isinstance(rec, CommandRecord):
            if rec.cmd != Command.SWITCHOVER_START:
                raise RelayError("in", f"unsupported command {rec.cmd} on the main stream "
                                 "(only precopy without a return path is relayed)")
            for w in self._writers():
                if w is self.recorder or self.out.profile.switchover_start:
                    w.other(SWITCHOVER_START)
        elif isinstance(rec, DeviceTail):
            self._phase("completion")
            for w in self._writers():
                w.other(rec.data)
        elif isinstance(rec, Configuration):
            self._on_configuration(rec)
        elif isinstance(rec, FileHeader):
            pass
        else:
            raise RelayError("in", f"unsupported record {type(rec).__name__} on the main "
                             "stream (compressed/XBZRLE pages are not relayed)")

    def _writers(self) -> list[_MainWriter]:
        assert self.out_main is not None
        return [self.out_main] if self.recorder is None else [self.out_main, self.recorder]

    def _on_configuration(self, cfg: Configuration) -> None:
        raw = bytes(self._prefix[8 : self._dec.offset])
        self._prefix = bytearray()
        in_uuid = resolve_uuid(self.inp.uuid, cfg.uuid)
        out_uuid = resolve_uuid(self.out.uuid if self.out.uuid is not None else self.inp.uuid,
                                cfg.uuid)
        self._out_hint = (f" (check the destination's multifd-channels = {self.out.channels}"
                          f", multifd-compression = {self.out.compression}, -uuid = "
                          f"{uuidlib.UUID(bytes=out_uuid)}, machine type = {cfg.machine})")
        self._read_inits(in_uuid)
        self._connect(out_uuid)
        if self.recorder is not None:
            self.recorder.write(encode_record(FileHeader()))
        self._write(raw)
        self._phase("setup")
        assert self.out_main is not None
        self.out_main.flush()
        for i, s in enumerate(self.in_socks):
            t = threading.Thread(target=self._channel_thread, args=(i, s),
                                 name=f"relay-in-{i}", daemon=True)
            self.threads.append(t)
            t.start()

    def _on_section(self, hdr: SectionHeader) -> None:
        if hdr.type in (SectionType.START, SectionType.FULL):
            self._in_ram_section = hdr.idstr == RAM_SECTION_IDSTR
            if self._in_ram_section:
                self._ram_sid = hdr.section_id
                for w in self._writers():
                    w.ram_sid = hdr.section_id
        else:
            self._in_ram_section = hdr.section_id == self._ram_sid
        if not self._in_ram_section:  # a device section with a known framing
            for w in self._writers():
                w.other(encode_record(hdr))
            return
        if hdr.type == SectionType.PART:
            self._phase("iterate")
        elif hdr.type == SectionType.END:
            self._phase("switchover")
        for w in self._writers():
            w.ram_header(encode_record(hdr))

    def _on_page(self, rec: RamPage) -> None:
        """A page on the upstream main stream (multifd off there)."""
        if self.recorder is not None:
            self.recorder.pages(rec.block, np.array([rec.offset], dtype=np.uint64),
                                memoryview(rec.data))
        if self.down is None:
            assert self.out_main is not None
            self.out_main.pages(rec.block, np.array([rec.offset], dtype=np.uint64),
                                memoryview(rec.data))
            self.out_stats.normal_pages += 1
            return
        if self._batch is None:
            self._batch = _PageBatch()
        b = self._batch
        if b.n and (b.block != rec.block or b.n == b.cap):
            self._flush_batch()
        b.add(rec.block, rec.offset, rec.data)

    def _flush_batch(self) -> None:
        b = self._batch
        if b is not None and b.n and self.down is not None:
            self.down.send_pages(b.block, b.offsets[: b.n], b.view[: b.n * PAGE_SIZE], None,
                                 self.abort)
            b.n = 0

    def _marker(self, rec: object) -> None:
        inp = self.inp
        flush = isinstance(rec, RamMultifdFlush)
        upstream_sync = flush or not inp.channels or inp.profile.sync_per_section
        if upstream_sync:
            self.passes += 1
            self.in_stats.syncs += 1 if inp.channels else 0
            if inp.channels:
                self.barrier.wait_all(self.timeout, None if self.hold else self.passes)
        self._downstream_marker(flush, upstream_sync)
        if self.recorder is not None and not flush:  # multifd off there: no FLUSH
            self.recorder.eos()
        if upstream_sync and inp.channels and self.hold:
            self.barrier.release()

    def _downstream_marker(self, flush: bool, upstream_sync: bool) -> None:
        out = self.out
        down = self.down
        assert self.out_main is not None
        if self.passthrough:
            # the upstream SYNC packets went out on the same channels: the marker as is
            self.out_stats.syncs += 1 if upstream_sync else 0
            if flush:
                self.out_main.write(_FLUSH)
            else:
                self.out_main.eos()
            self.out_main.flush()
            return
        if down is None:  # multifd off downstream: no FLUSH there
            if not flush:
                self.out_main.eos()
            return
        if out.profile.sync_per_section:  # qemu-7.2: one sync before every EOS
            self.out_main.flush()
            down.sync(self.abort)
            self.out_main.eos()
            if flush:  # end the ram section at this sync, go on in a new PART
                self.out_main.ram_footer(encode_record(SectionFooter(self._ram_sid)))
                self.out_main.ram_header(encode_record(SectionHeader(SectionType.PART,
                                                                     self._ram_sid)))
            self.out_main.flush()
            return
        if upstream_sync:
            self.out_main.flush()
            down.sync(self.abort)
            self.out_main.write(_FLUSH)
        if not flush:
            self.out_main.eos()
        self.out_main.flush()

    # -- upstream channels ----------------------------------------------------------------
    def _channel_thread(self, cid: int, sock: Any) -> None:
        try:
            self._channel_loop(cid, sock)
        except _Aborted:
            pass
        except RelayError as e:
            self.fail(e.side, e.cause)
        except WireError as e:
            if not self.abort.is_set():
                self.fail("in", f"multifd channel {cid}: {e.describe()}")
        except _OutFailure as e:
            self.fail("out", str(e))
        except TimeoutError:
            if not self.abort.is_set():
                self.fail("in", f"multifd channel {cid}: no data for {self.timeout:g} s")
        except OSError as e:
            if not self.abort.is_set():
                self.fail("in", f"multifd channel {cid}: {e.strerror or e}")
        finally:
            self.barrier.channel_ended(cid)

    def _channel_loop(self, cid: int, sock: Any) -> None:
        need_pages = not self.passthrough or self.recorder is not None
        out_ch = self.out_chans[cid] if self.passthrough else None
        splicer = None
        if (out_ch is not None and not need_pages and hasattr(os, "splice")
                and type(sock) is socket.socket and type(out_ch.sock) is socket.socket):
            splicer = _Splicer(sock, out_ch.sock, self.timeout, out_ch.stall)
        try:
            self._packets(cid, sock, out_ch, splicer)
        finally:
            if splicer is not None:
                splicer.close()

    def _packets(self, cid: int, sock: Any, out_ch: _OutChan | None,
                 splicer: _Splicer | None) -> None:
        """The upstream channel's packets until EOF (see the module docstring)."""
        inp = self.inp
        layout = inp.profile.layout
        plen = ram_packet_len(PAGE_SIZE)
        npages = page_count(PAGE_SIZE)
        hbuf = bytearray(max(plen, MULTIFD_DEVICE_STATE_HEADER_SIZE))
        hv = memoryview(hbuf)
        payload = bytearray(MULTIFD_MAX_COMPRESSED_PAYLOAD)
        pv = memoryview(payload)
        pages = bytearray(npages * PAGE_SIZE)
        pgv = memoryview(pages)
        method = get_method(inp.compression)
        in_flag = int(method.flag)
        decomp = method.new_decompressor() if in_flag else None
        need_pages = not self.passthrough or self.recorder is not None
        st = self.in_stats
        ost = self.out_stats
        down = self.down
        # Without device-state packets every packet starts with a whole RAM header: one
        # read takes it; otherwise the common header says which kind follows.
        first = MULTIFD_COMMON_HEADER_SIZE if inp.profile.device_state_packets else plen
        while True:
            if cid in self._stalled_in:
                _stall_until(self.abort)
            got = recv_at_least_into(sock, hv[:first], first)
            if got == 0:
                return
            t = time.perf_counter()
            flags = decode_common_header(hv[:MULTIFD_COMMON_HEADER_SIZE])
            if flags & _DEVICE_STATE and first < plen:  # 7.2: decode_ram_packet refuses it
                self._device_state(cid, sock, hv, pv, out_ch)
                st.chan_busy_s[cid] += time.perf_counter() - t
                continue
            if first < plen:
                recv_exact_into(sock, hv[first:plen])
            if not self.blocks_known.is_set():  # no barrier held us until setup's marker
                self._wait_blocks(cid)
            pkt = decode_ram_packet(hv[:plen], layout=layout, blocks=self.blocks,
                                    compression_flag=in_flag)
            psize = pkt.payload_size
            if psize > len(payload):
                raise RelayError("in", f"multifd channel {cid}: payload of {psize} bytes")
            if splicer is not None and out_ch is not None:  # header here, payload spliced
                out_ch.send([hv[:plen]])
                if psize:
                    splicer.move(psize)
                    out_ch.stats.chan_bytes[cid] += psize
                st.chan_bytes[cid] += plen + psize
                st.normal_pages += pkt.normal_pages
                st.zero_pages += pkt.zero_pages
                ost.normal_pages += pkt.normal_pages
                ost.zero_pages += pkt.zero_pages
                st.chan_busy_s[cid] += time.perf_counter() - t
                if pkt.is_sync:
                    self._synced(cid)
                continue
            if psize:
                recv_exact_into(sock, pv[:psize])
            st.chan_bytes[cid] += plen + psize
            st.normal_pages += pkt.normal_pages
            st.zero_pages += pkt.zero_pages
            n = pkt.normal_pages
            data = pv[:psize]
            if n and need_pages and decomp is not None:
                data = pgv[: n * PAGE_SIZE]
                decomp.decompress_packet(pv[:psize], data)
            zero = pkt.zero_offsets if pkt.zero_pages else None
            try:
                if out_ch is not None:
                    out_ch.send([hv[:plen], pv[:psize]])
                    ost.normal_pages += n
                    ost.zero_pages += pkt.zero_pages
                elif down is not None:
                    if n or zero is not None:
                        down.send_pages(pkt.ramblock, pkt.normal_offsets, data, zero,
                                        self.abort)
                else:
                    assert self.out_main is not None
                    self.out_main.pages(pkt.ramblock, pkt.normal_offsets, data)
                    ost.normal_pages += n
                    if zero is not None:
                        self.out_main.zero(pkt.ramblock, zero)
                        ost.zero_pages += len(zero)
            except (OSError, WireError) as e:
                if self.abort.is_set():
                    raise _Aborted from None
                raise _OutFailure(_out_text(e)) from None
            if self.recorder is not None:
                if n:
                    self.recorder.pages(pkt.ramblock, pkt.normal_offsets, data)
                if zero is not None:
                    self.recorder.zero(pkt.ramblock, zero)
            st.chan_busy_s[cid] += time.perf_counter() - t
            if pkt.is_sync:
                self._synced(cid)

    def _synced(self, cid: int) -> None:
        if self.hold:
            self.barrier.reach()
        else:
            self.barrier.passed(cid)

    def _wait_blocks(self, cid: int) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.blocks_known.wait(_WAIT_SLICE):
            if self.abort.is_set():
                raise _Aborted
            if time.monotonic() > deadline:
                raise RelayError("in", f"multifd channel {cid}: a packet came, but no RAM "
                                 f"block list on the main channel within {self.timeout:g} s")

    def _device_state(self, cid: int, sock: Any, hv: memoryview, pv: memoryview,
                      out_ch: _OutChan | None) -> None:
        """A device-state packet (0x40): forwarded whole, idstr/instance/idx untouched."""
        size = MULTIFD_DEVICE_STATE_HEADER_SIZE
        recv_exact_into(sock, hv[MULTIFD_COMMON_HEADER_SIZE:size])
        dsh = decode_device_state_packet(hv[:size],
                                         max_payload=DEFAULT_MAX_DEVICE_STATE_PAYLOAD)
        n = dsh.next_packet_size
        body = pv[:n] if n <= len(pv) else memoryview(bytearray(n))
        recv_exact_into(sock, body)
        self.in_stats.device_state_packets += 1
        self.in_stats.chan_bytes[cid] += size + n
        if self.down is None or not self.out.profile.device_state_packets:
            raise RelayError("out", f"device-state packet for {dsh.idstr!r} but the "
                             "destination side has no multifd device state (qemu-10 with "
                             "multifd needed)")
        ch = out_ch if out_ch is not None else self.down.take(self.abort)
        try:
            ch.send([hv[:size], body])
        except OSError as e:
            if self.abort.is_set():
                raise _Aborted from None
            raise _OutFailure(_out_text(e)) from None
        finally:
            if out_ch is None:
                self.down.give(ch)
        self.out_stats.device_state_packets += 1

    # -- the end --------------------------------------------------------------------------
    def _finish(self) -> None:
        """Upstream is done: channels drained, then wait for the destination to load."""
        deadline = time.monotonic() + self.timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise RelayError("in", f"a multifd channel stayed open {self.timeout:g} s "
                                 "after the main channel closed")
        if self.abort.is_set():
            raise _Aborted
        assert self.out_main is not None
        self.out_main.flush()
        if self.recorder is not None:
            self.recorder.flush()
        for ch in self.out_chans:
            with contextlib.suppress(OSError):
                ch.sock.shutdown(socket.SHUT_WR)
        if self.out_stream is not None:
            self.out_stream.close()
            self.out_stream = None
        else:
            # as the source did: QEMU closes main once all is sent; a source waiting for
            # the destination's close as its "loaded" keeps it open (a FIN first would
            # read as a source that gave up)
            sock = self.out_main_sock
            if not self._stream_done:
                sock.shutdown(socket.SHUT_WR)
            scratch = bytearray(4096)
            while True:
                try:
                    if sock.recv_into(scratch) == 0:
                        break
                except TimeoutError:
                    raise RelayError("out", f"the destination did not finish loading within "
                                     f"{self.timeout:g} s after everything was sent") from None
                except OSError as e:  # a reset: it failed to load
                    raise RelayError("out", f"the destination failed at the end of the "
                                     f"migration: main channel {e.strerror or e}") from None
        self.t_out_done = time.monotonic()

    def _sockets(self) -> list[Any]:
        return [s for s in (self.in_main, *self.in_socks, self.out_main_sock,
                            *(c.sock for c in self.out_chans)) if s is not None]

    def _close(self) -> None:
        """Stop the channel threads (their sockets shut down), then close everything; the
        record file becomes IMAGE only after a complete relay."""
        self.abort.set()
        for s in self._sockets():
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self.threads:
            t.join(1.0)
        for s in self._sockets():
            with contextlib.suppress(OSError):
                s.close()
        if self.out_stream is not None:
            with contextlib.suppress(OSError):
                self.out_stream.close()
        f = self._record_file
        if f is not None:
            part = f.name
            f.close()
            if self.t_out_done and self.error is None:
                os.replace(part, self.record_path)  # type: ignore[arg-type]
            else:
                with contextlib.suppress(OSError):
                    os.unlink(part)

    def _result(self) -> RelayResult:
        end = self.t_out_done or time.monotonic()
        self.out_stats.main_bytes = self.out_main.bytes if self.out_main is not None else 0
        return RelayResult(
            inp=self.in_stats, out=self.out_stats, passes=self.passes,
            total_time_ms=(end - self.t0) * 1000,
            relay_added_ms=max(0.0, (end - self.t_in_last) * 1000) if self.t_in_last else 0.0,
            peak_rss_mib=peak_rss_mib(), recorded=self.record_path, passthrough=self.passthrough)


class _OutFailure(Exception):
    """A send towards the destination failed (the message names what)."""


def _out_send(sock: Any, bufs: list[Any], stall: float | None) -> None:
    try:
        sendmsg_all(sock, bufs, stall)
    except OSError as e:
        raise _OutFailure(f"main channel: {_out_text(e)}") from None


def _record_write(f: Any, bufs: list[Any]) -> None:
    try:
        f.writelines(bufs)
    except OSError as e:
        raise RelayError("relay", f"cannot write {f.name}: {e.strerror or e}") from None


def _out_text(e: BaseException) -> str:
    if isinstance(e, WireError):
        return e.describe()
    if isinstance(e, BrokenPipeError | ConnectionResetError):
        return f"the destination closed the connection ({e.strerror or e})"
    if isinstance(e, TimeoutError):
        return f"the destination stopped reading ({e})"
    return (e.strerror if isinstance(e, OSError) else None) or str(e)


def _stall_until(abort: threading.Event) -> None:
    """An injected stall: the calling thread stops until the relay is torn down."""
    while not abort.wait(3600):
        pass
    raise _Aborted


def _rst(sock: Any) -> None:
    """RST the connection (SO_LINGER 0, close), as the fault proxy does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Splicer:
    """Moves a payload from one plain socket to another through a pipe (os.splice): the
    bytes never enter this process (passthrough without --record). Each wait is bounded:
    `timeout` for the source's bytes, `stall` for the destination's room. Each piece is
    sent on as soon as it lands: waiting for a whole payload (SO_RCVLOWAT) was slower."""

    PIPE_SIZE = 1 << 20

    def __init__(self, src: socket.socket, dst: socket.socket, timeout: float,
                 stall: float) -> None:
        self.src, self.dst = src.fileno(), dst.fileno()
        self.timeout, self.stall = timeout, stall
        self.r, self.w = os.pipe()
        with contextlib.suppress(OSError):  # the default 64 KiB works, only slower
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, self.PIPE_SIZE)
        self.cap = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)

    def move(self, n: int) -> None:
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK | getattr(os, "SPLICE_F_MORE", 4)
        while n:
            got = self._splice(self.src, self.w, min(n, self.cap), flags, select.POLLIN,
                               self.src, self.timeout, "in")
            if got == 0:
                raise Truncated("channel closed in the middle of a packet",
                                field="bytes_missing", value=n)
            n -= got
            while got:
                got -= self._splice(self.r, self.dst, got, flags, select.POLLOUT, self.dst,
                                    self.stall, "out")

    @staticmethod
    def _splice(fd_in: int, fd_out: int, n: int, flags: int, event: int, wait_fd: int,
                timeout: float, side: str) -> int:
        while True:
            try:
                return os.splice(fd_in, fd_out, n, flags=flags)
            except BlockingIOError:
                pass
            except OSError as e:
                if side == "out":
                    raise _OutFailure(_out_text(e)) from None
                raise
            poller = select.poll()
            poller.register(wait_fd, event)
            if not poller.poll(timeout * 1000):
                if side == "out":
                    raise _OutFailure(f"the destination accepted no byte for {timeout:g} s")
                raise TimeoutError(f"no data for {timeout:g} s")

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class _PageBatch:
    """Main-stream pages (multifd off upstream) gathered into one downstream packet."""

    def __init__(self) -> None:
        self.cap = page_count(PAGE_SIZE)
        self.offsets = np.zeros(self.cap, dtype=np.uint64)
        self.buf = bytearray(self.cap * PAGE_SIZE)
        self.view = memoryview(self.buf)
        self.block = ""
        self.n = 0

    def add(self, block: str, offset: int, data: bytes) -> None:
        self.block = block
        self.offsets[self.n] = offset
        self.view[self.n * PAGE_SIZE : (self.n + 1) * PAGE_SIZE] = data
        self.n += 1
