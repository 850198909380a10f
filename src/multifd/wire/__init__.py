"""Sans-IO codecs for QEMU's migration formats: bytes in, typed records out, and back.

Nothing in this package opens sockets or files or starts threads.
"""

from multifd.wire.buffer import NEED_DATA, ReceiveBuffer
from multifd.wire.errors import (
    BadCount,
    BadLength,
    BadMagic,
    BadName,
    BadOffset,
    BadRecordType,
    Mismatch,
    Truncated,
    UnsupportedVersion,
    WireError,
)

__all__ = [
    "NEED_DATA",
    "BadCount",
    "BadLength",
    "BadMagic",
    "BadName",
    "BadOffset",
    "BadRecordType",
    "Mismatch",
    "ReceiveBuffer",
    "Truncated",
    "UnsupportedVersion",
    "WireError",
]
