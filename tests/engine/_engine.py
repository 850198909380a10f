"""Engine-test helpers: Sender/Receiver pairs over socketpairs, RAM blocks, thread checks."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from multifd.machine.ramblock import RamBlock
from multifd.multifd import Receiver, Sender
from multifd.wire.constants import PacketLayout

UUID = bytes(range(1, 17))
PS = 4096


def multifd_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("multifd")]


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 5
    while multifd_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not multifd_threads(), f"threads left behind: {multifd_threads()}"


def random_block(name: str, size: int, seed: int, zero_every: int = 4) -> RamBlock:
    """Random pages, every `zero_every`-th page zero, plus a zero tail."""
    b = RamBlock(name, size)
    rng = np.random.default_rng(seed)
    b.words[:] = rng.integers(0, 2**63, size=b.words.shape, dtype=np.uint64)
    b.pages[::zero_every] = 0
    b.pages[-(b.num_pages // 8):] = 0
    return b


@dataclass
class Pair:
    sender: Sender
    receiver: Receiver
    src: dict[str, RamBlock]
    dst: dict[str, RamBlock]
    sink: list[tuple[str, int, bytes]] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)

    def close(self) -> None:
        self.sender.close(timeout=5)
        self.receiver.close()


def make_pair(
    src: dict[str, RamBlock],
    *,
    channels: int = 2,
    layout: PacketLayout = PacketLayout.HEAD,
    compression: str = "none",
    zero_page_detection: bool = False,
    dst_fill: int | None = None,
    connect: bool = True,
    **rkw: Any,
) -> tuple[Pair, list[tuple[socket.socket, socket.socket]]]:
    dst = {}
    for name, b in src.items():
        d = RamBlock(name, b.used_length)
        if dst_fill is not None:
            d.array[:] = dst_fill
        dst[name] = d
    socks = [socket.socketpair() for _ in range(channels)]
    sender = Sender([a for a, _ in socks], uuid=UUID, layout=layout, compression=compression,
                    zero_page_detection=zero_page_detection)
    pair_errors: list[Exception] = []
    sink: list[tuple[str, int, bytes]] = []
    lock = threading.Lock()

    def on_sink(idstr: str, inst: int, data: bytes) -> None:
        with lock:
            sink.append((idstr, inst, bytes(data)))

    receiver = Receiver(channels=channels, uuid=UUID, layout=layout, compression=compression,
                        blocks=dst, device_state_sink=on_sink, on_error=pair_errors.append,
                        **rkw)
    sender.start()
    if connect:
        for _, b in socks:
            receiver.add_channel(b, timeout=5)
        receiver.wait_all_channels(5)
    return Pair(sender, receiver, src, dst, sink, pair_errors), socks


def page_offsets(block: RamBlock, idx: np.ndarray | None = None) -> np.ndarray:
    if idx is None:
        idx = np.arange(block.num_pages)
    return np.asarray(idx, dtype=np.uint64) * np.uint64(block.page_size)
