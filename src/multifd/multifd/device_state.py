"""The device-state payload kind: one opaque device buffer per packet (QEMU 10.0+).

Wire form (qemu-reference.md 3.4, QEMU `multifd-device-state.c`): a 276-byte header —
common header with flags 0x40, idstr[256] NUL-terminated, be32 instance_id, be32
next_packet_size (> 0) — then the buffer. Never compressed, never SYNC, no packet_num.
Only the HEAD layout has it (a 7.2 peer would read it as a RAM packet).

Receive: the buffer is read into a fresh bytearray (the consumer keeps it) and handed to
the receiver's `device_state_sink(idstr, instance_id, data)` on the channel thread; the
sink should only store it (reordering and loading belong to the device's load job).
"""

from __future__ import annotations

from typing import Any

from multifd.multifd.slots import (
    MultifdError,
    Payload,
    RecvChannelContext,
    RecvOps,
    SendChannelContext,
    SendOps,
    register_recv_ops,
    register_send_ops,
)
from multifd.wire.constants import (
    MULTIFD_DEVICE_STATE_HEADER_SIZE,
    MULTIFD_IDSTR_SIZE,
    MultifdFlag,
    PacketLayout,
)
from multifd.wire.packet import decode_device_state_packet, encode_device_state_header


class DeviceStatePayload(Payload):
    """(idstr, instance_id, buffer) of one device-state packet. The buffer is referenced,
    not copied: keep it unchanged until the slot comes back from `Sender.send`."""

    __slots__ = ("buffer", "idstr", "instance_id")

    def __init__(self) -> None:
        self.idstr = ""
        self.instance_id = 0
        self.buffer: Any = None

    @classmethod
    def new_for_slot(cls, page_size: int) -> DeviceStatePayload:
        return cls()

    def fill(self, idstr: str, instance_id: int, buffer: Any) -> None:
        raw = idstr.encode()
        if not raw or len(raw) >= MULTIFD_IDSTR_SIZE or b"\0" in raw:
            raise ValueError(f"bad device idstr {idstr!r}")
        if not 0 <= instance_id <= 0xFFFFFFFF:
            raise ValueError(f"instance_id {instance_id} is not a u32")
        # a buffer, or an object that knows its length (e.g. gathered parts)
        n = buffer.nbytes if hasattr(buffer, "nbytes") else memoryview(buffer).nbytes
        if n == 0 or n > 0xFFFFFFFF:
            raise ValueError(f"device-state buffer length {n} must be in 1..2^32-1")
        self.idstr = idstr
        self.instance_id = instance_id
        self.buffer = buffer

    def clear(self) -> None:
        self.buffer = None

    def is_empty(self) -> bool:
        return self.buffer is None


class DeviceStateSendOps(SendOps):
    payload_type = DeviceStatePayload
    stat_name = "device_state"

    def logical_bytes(self, payload: DeviceStatePayload) -> int:
        return memoryview(payload.buffer).nbytes

    def check(self, payload: DeviceStatePayload, layout: PacketLayout) -> None:
        if layout is not PacketLayout.HEAD:
            raise ValueError("device-state packets need the HEAD (qemu-10) packet layout")

    def prepare(self, payload: DeviceStatePayload, ch: SendChannelContext) -> list[Any]:
        n = memoryview(payload.buffer).nbytes
        header = encode_device_state_header(payload.idstr, payload.instance_id, n)
        ch.stats.add("device_state_buffers", 1)
        return [header, payload.buffer]


class DeviceStateRecvOps(RecvOps):
    kind_bits = int(MultifdFlag.DEVICE_STATE)
    layouts = frozenset({PacketLayout.HEAD})

    def header_size(self, page_size: int) -> int:
        return MULTIFD_DEVICE_STATE_HEADER_SIZE

    def receive(self, ch: RecvChannelContext, flags: int) -> bool:
        header = ch.header[:MULTIFD_DEVICE_STATE_HEADER_SIZE]
        ch.read_exact(header[ch.have :])
        cfg = ch.config
        hdr = decode_device_state_packet(header, max_payload=cfg.max_payload)
        sink = cfg.device_state_sink
        if sink is None:
            raise MultifdError(
                f"device-state packet for {hdr.idstr!r} instance {hdr.instance_id} "
                "but this receiver has no device-state sink")
        data = bytearray(hdr.next_packet_size)
        ch.read_exact(memoryview(data))
        st = ch.stats
        st.add("wire_bytes_device_state", MULTIFD_DEVICE_STATE_HEADER_SIZE + len(data))
        st.add("device_state_buffers", 1)
        sink(hdr.idstr, hdr.instance_id, data)
        return False


register_send_ops(DeviceStateSendOps())
register_recv_ops(DeviceStateRecvOps())
