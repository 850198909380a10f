"""The storage-slots multifd core: send slots, payload kinds, channel threads, SYNC barrier.

Public surface: `Sender`, `Receiver`, `SendSlot`, the payload kinds `RamPayload` and
`DeviceStatePayload`, `MultifdError`. Importing this package registers the ops of both
payload kinds; a new kind is a module that registers its own `SendOps` / `RecvOps`.
"""

from multifd.multifd.device_state import DeviceStatePayload
from multifd.multifd.ram import RamPayload
from multifd.multifd.receiver import Receiver
from multifd.multifd.sender import Sender
from multifd.multifd.slots import (
    ChannelStats,
    MultifdError,
    Payload,
    RecvOps,
    SendOps,
    SendSlot,
    Stats,
    register_recv_ops,
    register_send_ops,
)

__all__ = [
    "ChannelStats",
    "DeviceStatePayload",
    "MultifdError",
    "Payload",
    "RamPayload",
    "Receiver",
    "RecvOps",
    "SendOps",
    "SendSlot",
    "Sender",
    "Stats",
    "register_recv_ops",
    "register_send_ops",
]
