"""Send slots, payload kinds and their ops tables: the "storage slots" core contract.

QEMU 10 (`MultiFDSendData`, multifd.h / multifd.c, qemu-reference.md 5.1) moves data
between clients and channel threads in *slots*: each channel owns one empty slot, each
client owns one more; `multifd_send()` swaps a client's filled slot with an idle
channel's empty one, so nothing is allocated per packet. A slot here holds one reusable
payload object per kind (allocated the first time the slot is asked for that kind) and at
most one of them is active.

Every payload kind brings its own ops, registered in two tables:

* send side, keyed by payload class: `SendOps.prepare(payload, ch)` returns the buffers of
  one packet (header, then data) for the channel thread's single gather `sendmsg`;
* receive side, keyed by the packet's kind bits (`flags & kind_mask`, e.g. 0x40 for
  device state, 0 for RAM): `RecvOps.receive(ch, flags)` reads the rest of the packet.

The sender and receiver never look at the kind themselves; adding a kind is a new module
that registers its ops, not an `if` in the core.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Protocol, TypeVar

from multifd.wire.constants import PacketLayout


class MultifdError(Exception):
    """A multifd channel or the whole sender/receiver failed; the message names the cause."""


class Stats(Protocol):
    """Where the core reports counters: anything with `add(name, n)` (e.g. a Counter)."""

    def add(self, name: str, n: int) -> None: ...


class RateLimiter(Protocol):
    """Throttle shared with the main stream: `consume(n)` blocks until n bytes may go."""

    def consume(self, n: int) -> None: ...


class ChannelStats(dict[str, int]):
    """Per-channel counters (a dict so callers can print or merge them), written only by
    the channel's own thread, optionally mirrored into a shared `Stats` sink."""

    __slots__ = ("_sink",)

    def __init__(self, sink: Stats | None = None) -> None:
        super().__init__()
        self._sink = sink

    def add(self, name: str, n: int = 1) -> None:
        self[name] = self.get(name, 0) + n
        if self._sink is not None:
            self._sink.add(name, n)


class Payload(abc.ABC):
    """One kind of slot content. Reused for the whole migration: `clear()` empties it."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Forget the content (keep the buffers)."""

    @abc.abstractmethod
    def is_empty(self) -> bool:
        """True when there is nothing to send."""


P = TypeVar("P", bound=Payload)


class SendSlot:
    """Holds at most one active payload; one reusable payload object per kind."""

    __slots__ = ("_active", "_page_size", "_payloads")

    def __init__(self, page_size: int = 4096) -> None:
        self._payloads: dict[type[Payload], Payload] = {}
        self._active: Payload | None = None
        self._page_size = page_size

    def payload(self, kind: type[P]) -> P:
        """This slot's payload object of `kind`, made active (the previous one is cleared)."""
        p = self._payloads.get(kind)
        if p is None:
            p = kind.new_for_slot(self._page_size)  # type: ignore[attr-defined]
            self._payloads[kind] = p
        if self._active is not p:
            if self._active is not None:
                self._active.clear()
            self._active = p
        return p  # type: ignore[return-value]

    @property
    def active(self) -> Payload | None:
        """The active payload, or None for an empty slot."""
        return self._active

    def is_empty(self) -> bool:
        return self._active is None or self._active.is_empty()

    def clear(self) -> None:
        if self._active is not None:
            self._active.clear()
            self._active = None


class SendChannelContext(Protocol):
    """What a send op may use on its channel (see sender.SendChannel)."""

    id: int
    layout: PacketLayout
    page_size: int
    zero_page_detection: bool
    compressor: Any  # compress method's per-channel compressor
    compression_flag: int
    stats: ChannelStats

    def next_packet_num(self) -> int: ...


class RecvChannelContext(Protocol):
    """What a receive op may use on its channel (see receiver.RecvChannel)."""

    id: int
    layout: PacketLayout
    page_size: int
    header: memoryview  # per-channel header buffer; [:have] holds the packet's start
    have: int  # header bytes already read: >= 12, <= this kind's header_size
    stats: ChannelStats
    compression_flag: int
    decompressor: Any
    config: Any  # the Receiver: blocks, device_state_sink, limits

    def read_exact(self, view: memoryview) -> None: ...
    def read_scatter(self, views: list[memoryview]) -> None: ...
    def state(self, ops: object, factory: Callable[[], Any]) -> Any: ...


class SendOps(abc.ABC):
    """Send-side ops of one payload kind."""

    payload_type: ClassVar[type[Payload]]
    stat_name: ClassVar[str]  # wire bytes are counted as f"wire_bytes_{stat_name}"

    @abc.abstractmethod
    def prepare(self, payload: Any, ch: SendChannelContext) -> list[Any]:
        """Buffers of one packet (header first), built with the channel's resources.

        They must stay valid until the payload is cleared: the channel may prepare every
        queued packet first and write them all in one gather call. Scratch memory that a
        buffer points into belongs to the payload, not to the channel.
        """

    @abc.abstractmethod
    def logical_bytes(self, payload: Any) -> int:
        """Payload bytes before compression/zero elision (for stats and rate accounting)."""

    def check(self, payload: Any, layout: PacketLayout) -> None:  # noqa: B027
        """Raise ValueError if this payload cannot travel with `layout` (default: fine)."""


class RecvOps(abc.ABC):
    """Receive-side ops of one packet kind, selected by `flags & kind_mask == kind_bits`."""

    kind_bits: ClassVar[int]
    layouts: ClassVar[frozenset[PacketLayout]]  # layouts in which this kind may appear

    @abc.abstractmethod
    def header_size(self, page_size: int) -> int:
        """Full header length of this kind's packets (common header included)."""

    @abc.abstractmethod
    def receive(self, ch: RecvChannelContext, flags: int) -> bool:
        """Read the rest of the packet (its first `ch.have` bytes, the common header
        included, are in `ch.header`), validate it, apply it. Returns True if the packet
        was a SYNC."""


_SEND_OPS: dict[type[Payload], SendOps] = {}
_RECV_OPS: dict[int, RecvOps] = {}


def register_send_ops(ops: SendOps) -> None:
    """Register the send ops of a payload kind (done by the kind's module at import)."""
    _SEND_OPS[ops.payload_type] = ops


def register_recv_ops(ops: RecvOps) -> None:
    """Register the receive ops of a packet kind (done by the kind's module at import)."""
    _RECV_OPS[ops.kind_bits] = ops


def send_ops_for(payload: Payload) -> SendOps:
    try:
        return _SEND_OPS[type(payload)]
    except KeyError:
        raise TypeError(f"no send ops registered for payload kind {type(payload).__name__}")\
            from None


def recv_ops_table(layout: PacketLayout) -> tuple[int, dict[int, RecvOps]]:
    """(kind_mask, table): the kind bits of every registered kind, and the ops usable
    with `layout` (a packet whose kind is missing from the table is refused)."""
    table = {bits: ops for bits, ops in _RECV_OPS.items() if layout in ops.layouts}
    mask = 0
    for bits in _RECV_OPS:
        mask |= bits
    return mask, table


def registered_kinds() -> Iterable[type[Payload]]:
    return tuple(_SEND_OPS)
