"""Multifd compression methods behind a small ops table (QEMU's multifd-nocomp.c,
multifd-zlib.c, multifd-zstd.c; qemu-reference.md §4).

Each method makes one `Compressor` per sending channel and one `Decompressor` per receiving
channel. Both keep one codec stream for the whole migration (never reset or re-created):
QEMU's zlib/zstd streams span every packet of a channel, with a sync/block flush at each
packet end. Only normal pages are compressed; page-less packets never touch the stream.

    method = get_method("zstd")            # or get_method(MultifdFlag.ZSTD)
    c = method.new_compressor(level=1)     # sender thread of channel k
    bufs = c.compress_packet(page_views)   # gather-send after the header
    d = method.new_decompressor()          # receiver thread of channel k
    d.decompress_packet(payload, out)      # out: exactly normal_pages * page_size bytes
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, TypeAlias

from multifd.wire.constants import MultifdFlag

Buffer: TypeAlias = bytes | bytearray | memoryview

__all__ = [
    "METHODS",
    "Buffer",
    "CompressionMethod",
    "Compressor",
    "Decompressor",
    "get_method",
    "payload_size",
]


class Compressor(ABC):
    """One channel's compression stream."""

    @abstractmethod
    def compress_packet(self, pages: Sequence[Buffer]) -> list[Buffer]:
        """The payload buffers for one packet's normal pages (empty list for no pages)."""


class Decompressor(ABC):
    """One channel's decompression stream."""

    @abstractmethod
    def decompress_packet(self, payload: Buffer, out: memoryview) -> None:
        """Fill `out` exactly from one packet's payload; BadLength if short or long.

        After any error the stream is unusable: the channel (the migration) must fail.
        """


class CompressionMethod(ABC):
    """An entry of the ops table: a name, its flags value and stream factories."""

    name: ClassVar[str]
    flag: ClassVar[MultifdFlag]
    default_level: ClassVar[int | None] = None
    min_level: ClassVar[int] = 0
    max_level: ClassVar[int] = 0

    def check_level(self, level: int | None) -> int | None:
        """The level to use: the default for None; ValueError outside QEMU's range."""
        if level is None:
            return self.default_level
        if self.default_level is None:
            return None
        if not self.min_level <= level <= self.max_level:
            raise ValueError(
                f"{self.name} level {level} outside {self.min_level}..{self.max_level}"
            )
        return level

    @abstractmethod
    def new_compressor(self, level: int | None = None) -> Compressor: ...

    @abstractmethod
    def new_decompressor(self) -> Decompressor: ...

    def __repr__(self) -> str:
        return f"<CompressionMethod {self.name} flag={int(self.flag):#x}>"


def payload_size(bufs: Sequence[Buffer]) -> int:
    """next_packet_size for a list of payload buffers."""
    return sum(memoryview(b).nbytes for b in bufs)


METHODS: dict[str, CompressionMethod] = {}


def _register(method: CompressionMethod) -> None:
    METHODS[method.name] = method


def get_method(name_or_flag: str | int) -> CompressionMethod:
    """Look a method up by QEMU name ("none", "zlib", "zstd") or flags value (0, 2, 4)."""
    if isinstance(name_or_flag, str):
        try:
            return METHODS[name_or_flag]
        except KeyError:
            raise ValueError(f"unknown multifd compression {name_or_flag!r}") from None
    for m in METHODS.values():
        if int(m.flag) == int(name_or_flag):
            return m
    raise ValueError(f"unsupported multifd compression flag {int(name_or_flag):#x}")


from multifd.compress import none as _none  # noqa: E402
from multifd.compress import zlib as _zlib  # noqa: E402
from multifd.compress import zstd as _zstd  # noqa: E402

for _m in (_none.METHOD, _zlib.METHOD, _zstd.METHOD):
    _register(_m)
