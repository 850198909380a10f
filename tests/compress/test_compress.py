"""Compression methods: registry, per-channel streams, QEMU captures, interop, bombs."""

from __future__ import annotations

import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import CAPTURES_ROOT

from multifd.compress import METHODS, get_method, payload_size
from multifd.wire.constants import MultifdFlag, PacketLayout
from multifd.wire.errors import BadLength, WireError
from multifd.wire.packet import ChannelDecoder, EndOfChannel, InitPacket, RamPacket

try:
    from compression.zstd import ZstdCompressor, ZstdDecompressor  # type: ignore[import-not-found]
except ImportError:
    from backports.zstd import ZstdCompressor, ZstdDecompressor

PAGE = 4096
BLOCKS = {
    "pc.ram": 0x4000000,
    "/rom@etc/acpi/tables": 0x20000,
    "pc.bios": 0x40000,
    "pc.rom": 0x20000,
    "/rom@etc/table-loader": 0x1000,
    "/rom@etc/acpi/rsdp": 0x1000,
}
PATTERN = (CAPTURES_ROOT / "qemu-captures" / "pattern-4MiB.bin").read_bytes()
Q72 = CAPTURES_ROOT / "qemu-captures"
Q10 = CAPTURES_ROOT / "qemu10-captures"


def pages_of(kind: str, n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return [rng.bytes(PAGE) for _ in range(n)]
    if kind == "text":
        return [(f"page-{seed}-{i}-".encode() * 1000)[:PAGE] for i in range(n)]
    return [bytes(PAGE) for _ in range(n)]


# --------------------------------------------------------------------------- registry


def test_registry() -> None:
    assert set(METHODS) == {"none", "zlib", "zstd"}
    for name, flag in (("none", 0), ("zlib", 2), ("zstd", 4)):
        m = get_method(name)
        assert m is get_method(flag) is get_method(MultifdFlag(flag))
        assert m.name == name and int(m.flag) == flag
    with pytest.raises(ValueError):
        get_method("qpl")
    with pytest.raises(ValueError):
        get_method(0x08)


@pytest.mark.parametrize(("name", "lo", "hi"), [("zlib", 0, 9), ("zstd", 0, 20)])
def test_level_ranges(name: str, lo: int, hi: int) -> None:
    m = get_method(name)
    assert m.default_level == 1
    for lv in (lo, hi, None):
        c = m.new_compressor(lv)
        d = m.new_decompressor()
        pages = pages_of("text", 3)
        out = bytearray(3 * PAGE)
        d.decompress_packet(b"".join(c.compress_packet(pages)), memoryview(out))
        assert bytes(out) == b"".join(pages)
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ValueError):
            m.new_compressor(bad)


def test_none_gathers_the_page_views_without_copying() -> None:
    m = get_method("none")
    ram = bytearray(4 * PAGE)
    views = [memoryview(ram)[i * PAGE : (i + 1) * PAGE] for i in (0, 2)]
    bufs = m.new_compressor().compress_packet(views)
    assert all(a is b for a, b in zip(bufs, views, strict=True))
    assert payload_size(bufs) == 2 * PAGE
    out = bytearray(2 * PAGE)
    m.new_decompressor().decompress_packet(b"x" * 2 * PAGE, memoryview(out))
    assert out == b"x" * 2 * PAGE
    with pytest.raises(BadLength):
        m.new_decompressor().decompress_packet(b"x" * PAGE, memoryview(out))


# --------------------------------------------------------------------------- streams


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from(["none", "zlib", "zstd"]),
    st.lists(st.tuples(st.integers(0, 128), st.sampled_from(["random", "text", "zero"])),
             min_size=1, max_size=5),
)
def test_one_stream_per_channel_round_trip(name: str, packets: list[tuple[int, str]]) -> None:
    m = get_method(name)
    c, d = m.new_compressor(), m.new_decompressor()
    for i, (n, kind) in enumerate(packets):
        pages = pages_of(kind, n, seed=i)
        bufs = c.compress_packet(pages)
        if n == 0:
            assert bufs == []  # page-less packets never touch the stream
            continue
        payload = b"".join(bufs)
        assert len(payload) == payload_size(bufs) <= 2 * 512 * 1024
        out = np.empty(n * PAGE, dtype=np.uint8)
        d.decompress_packet(payload, memoryview(out))
        assert out.tobytes() == b"".join(pages)


def test_accepts_numpy_and_memoryview_pages() -> None:
    ram = np.arange(8 * PAGE, dtype=np.uint8).reshape(8, PAGE)
    for name in METHODS:
        m = get_method(name)
        bufs = m.new_compressor().compress_packet([ram[1], memoryview(ram[5])])
        out = np.empty((2, PAGE), dtype=np.uint8)
        m.new_decompressor().decompress_packet(b"".join(bufs), memoryview(out))
        assert np.array_equal(out, ram[[1, 5]])


@pytest.mark.parametrize("name", ["zlib", "zstd"])
def test_stream_is_persistent_across_packets(name: str) -> None:
    """The second packet only decodes with the same decompressor (one stream per channel),
    and QEMU's framing holds: zlib header once + sync-flush marker, zstd frame magic once."""
    m = get_method(name)
    c = m.new_compressor()
    p1 = b"".join(c.compress_packet(pages_of("text", 4, 1)))
    p2 = b"".join(c.compress_packet(pages_of("text", 4, 1)))
    if name == "zlib":
        assert p1[:2] == b"\x78\x01" and p1.endswith(b"\x00\x00\xff\xff")
        assert p2.endswith(b"\x00\x00\xff\xff") and p2[:2] != b"\x78\x01"
    else:
        assert p1[:4] == b"\x28\xb5\x2f\xfd" and p2[:4] != b"\x28\xb5\x2f\xfd"
    assert len(p2) < len(p1)  # the window remembers packet 1
    out = memoryview(bytearray(4 * PAGE))
    with pytest.raises(WireError):
        m.new_decompressor().decompress_packet(p2, out)
    d = m.new_decompressor()
    d.decompress_packet(p1, out)
    d.decompress_packet(p2, out)
    assert bytes(out) == b"".join(pages_of("text", 4, 1))


@pytest.mark.parametrize("name", ["zlib", "zstd"])
def test_wrong_lengths_are_rejected(name: str) -> None:
    m = get_method(name)
    c = m.new_compressor()
    payload = b"".join(c.compress_packet(pages_of("text", 3)))
    with pytest.raises(BadLength, match="more than"):
        m.new_decompressor().decompress_packet(payload, memoryview(bytearray(2 * PAGE)))
    with pytest.raises(BadLength, match="expected"):
        m.new_decompressor().decompress_packet(payload, memoryview(bytearray(4 * PAGE)))
    with pytest.raises(WireError):
        m.new_decompressor().decompress_packet(b"\xff" * 64, memoryview(bytearray(PAGE)))


def test_zlib_finished_stream_is_an_error() -> None:
    """QEMU never ends its deflate stream; a Z_STREAM_END means a foreign encoder."""
    payload = zlib.compress(bytes(PAGE))
    with pytest.raises(WireError, match="ended"):
        get_method("zlib").new_decompressor().decompress_packet(payload,
                                                                memoryview(bytearray(PAGE)))


# --------------------------------------------------------------------------- interop


@pytest.mark.parametrize("name", ["zlib", "zstd"])
def test_our_stream_inflates_with_plain_streaming_decoders(name: str) -> None:
    """What QEMU does: inflate/ZSTD_decompressStream of each payload as it arrives."""
    c = get_method(name).new_compressor()
    packets = [pages_of(k, n, i) for i, (k, n) in
               enumerate([("text", 128), ("random", 17), ("zero", 128), ("text", 1)])]
    payloads = [b"".join(c.compress_packet(p)) for p in packets]
    plain: list[object] = [zlib.decompressobj()] if name == "zlib" else [ZstdDecompressor()]
    if name == "zstd":
        try:
            import zstandard  # libzstd through another binding, when installed

            plain.append(zstandard.ZstdDecompressor().decompressobj())
        except ImportError:
            pass
    for dec in plain:
        for pages, payload in zip(packets, payloads, strict=True):
            assert dec.decompress(payload) == b"".join(pages)  # type: ignore[attr-defined]


def _rebuild(files: list[Path], method: str, layout: PacketLayout | None) -> dict[str, bytes]:
    """Decode channels, decompress with one decompressor per channel, place pages in RAM."""
    m = get_method(method)
    ram = {name: np.full((size // PAGE, PAGE), 0xEE, dtype=np.uint8)
           for name, size in BLOCKS.items()}
    for path in files:
        dec = ChannelDecoder(layout, blocks=BLOCKS, compression_flag=int(m.flag))
        dec.receive_data(path.read_bytes())
        dec.receive_eof()
        d = m.new_decompressor()
        ids = set()
        while not isinstance(ev := dec.next_event(), EndOfChannel):
            if isinstance(ev, InitPacket):
                ids.add(ev.channel_id)
                continue
            assert isinstance(ev, RamPacket)
            h = ev.header
            if not h.has_pages:
                continue
            block = ram[h.ramblock]
            if h.normal_pages:
                out = np.empty((h.normal_pages, PAGE), dtype=np.uint8)
                d.decompress_packet(ev.payload, memoryview(out))
                block[h.normal_offsets // PAGE] = out
            block[h.zero_offsets // PAGE] = 0
        assert len(ids) == 1
    return {k: v.tobytes() for k, v in ram.items()}


@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
def test_qemu72_captures_inflate_to_the_pattern(method: str) -> None:
    files = sorted((Q72 / f"multifd2-{method}").glob("conn[12]-src2dst.bin"))
    ram = _rebuild(files, method, PacketLayout.V7_2)["pc.ram"]
    pat = np.frombuffer(PATTERN, np.uint8).reshape(-1, PAGE)
    got = np.frombuffer(ram, np.uint8).reshape(-1, PAGE)[256 : 256 + 1024]
    nonzero = pat.any(axis=1)  # 7.2 sends zero pages on the main channel
    assert nonzero.sum() == 768
    assert np.array_equal(got[nonzero], pat[nonzero])
    assert (got[~nonzero] == 0xEE).all()


@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
def test_qemu10_captures_inflate_to_the_whole_ram(method: str) -> None:
    """10.0 sends every page (normal or zero) through the channels: all of RAM rebuilds."""
    files = sorted((Q10 / f"multifd2-{method}").glob("chan-*.bin"))
    ram = _rebuild(files, method, None)
    pc = ram["pc.ram"]
    assert pc[0x100000 : 0x100000 + len(PATTERN)] == PATTERN
    assert pc[:0x100000] == bytes(0x100000)
    assert pc[0x100000 + len(PATTERN) :] == bytes(len(pc) - 0x100000 - len(PATTERN))
    for name, v in ram.items():  # no page was left unwritten
        pages = np.frombuffer(v, np.uint8).reshape(-1, PAGE)
        assert not (pages == 0xEE).all(axis=1).any(), name


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_qemu_payloads_inflate_with_plain_streaming_decoders(method: str) -> None:
    path = sorted((Q10 / f"multifd2-{method}").glob("chan-*.bin"))[1]
    dec = ChannelDecoder(blocks=BLOCKS)
    dec.receive_data(path.read_bytes())
    dec.receive_eof()
    plain = zlib.decompressobj() if method == "zlib" else ZstdDecompressor()
    n = 0
    while not isinstance(ev := dec.next_event(), EndOfChannel):
        if isinstance(ev, RamPacket) and ev.header.normal_pages:
            assert len(plain.decompress(ev.payload)) == ev.header.normal_pages * PAGE
            n += 1
    assert n > 3


# --------------------------------------------------------------------------- bombs

EXPECTED = 512 * 1024
GIB = 1 << 30


def _zlib_bomb() -> bytes:
    """A zlib stream that inflates to 1 GiB of zeros, built from a repeating full-flush
    block (each 1 MiB of zeros deflates to the same bytes after Z_FULL_FLUSH)."""
    c = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    first = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    assert again == c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    return first + again * 1023


def _zstd_bomb() -> bytes:
    c = ZstdCompressor(level=1)
    zeros = bytes(64 << 20)
    parts = [c.compress(zeros) for _ in range(16)]
    parts.append(c.compress(b"", mode=ZstdCompressor.FLUSH_BLOCK))
    return b"".join(parts)


@pytest.mark.parametrize("name", ["zlib", "zstd"])
def test_decompression_bomb_is_rejected_without_inflating_it(name: str) -> None:
    bomb = _zlib_bomb() if name == "zlib" else _zstd_bomb()
    assert len(bomb) < 2 << 20
    # the bomb is genuine: far more than EXPECTED comes out of a plain decoder
    probe = zlib.decompressobj() if name == "zlib" else ZstdDecompressor()
    assert len(probe.decompress(bomb, 64 << 20)) == 64 << 20
    del probe
    d = get_method(name).new_decompressor()
    out = memoryview(bytearray(EXPECTED))
    tracemalloc.start()
    try:
        with pytest.raises(BadLength, match="more than"):
            d.decompress_packet(bomb, out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak} bytes while rejecting a 1 GiB bomb"


def test_random_payloads_only_raise_wire_errors() -> None:
    rng = np.random.default_rng(3)
    for name in ("zlib", "zstd"):
        m = get_method(name)
        good = b"".join(m.new_compressor().compress_packet(pages_of("text", 8)))
        for _ in range(100):
            bad = bytearray(good)
            for i in rng.integers(0, len(bad), rng.integers(1, 4)):
                bad[i] = int(rng.integers(0, 256))
            try:
                m.new_decompressor().decompress_packet(bytes(bad),
                                                       memoryview(bytearray(8 * PAGE)))
            except WireError:
                pass
        for _ in range(20):
            try:
                m.new_decompressor().decompress_packet(rng.bytes(200),
                                                       memoryview(bytearray(PAGE)))
            except WireError:
                pass


# --------------------------------------------------------------------------- into RAM


def _into_and_bytes_paths(method: str) -> tuple[Any, Any, type]:
    """(module, a new into-RAM decompressor factory, the decompress + copy class), or a
    skip when this host's libz / libzstd cannot be loaded through ctypes."""
    from multifd.compress import zlib as zlmod
    from multifd.compress import zstd as zsmod

    mod: Any = zsmod if method == "zstd" else zlmod
    if mod._LIB is None:
        pytest.skip(f"environment: this host has no {'libzstd' if method == 'zstd' else 'libz'}"
                    " that ctypes can load (the into-RAM receiver needs its streaming API)")
    if method == "zstd":
        return mod, lambda: zsmod.ZstdIntoDecompressor(zsmod._LIB), zsmod.ZstdStreamDecompressor
    return mod, lambda: zlmod.ZlibIntoDecompressor(zlmod._LIB), zlmod.ZlibDecompressor


@pytest.mark.parametrize("qemu", ["7.2", "10"])
@pytest.mark.parametrize("method", ["zstd", "zlib"])
def test_into_ram_matches_the_bytes_path_on_a_qemu_channel(method: str, qemu: str) -> None:
    """The into-the-buffer receiver (libzstd / libz through ctypes) decodes a real
    multi-packet channel exactly as the binding's decompress + copy does (one stream per
    channel, packet after packet), touching nothing outside the view."""
    _, into, old_cls = _into_and_bytes_paths(method)
    path = (sorted((Q72 / f"multifd2-{method}").glob("conn[12]-src2dst.bin"))[0]
            if qemu == "7.2" else sorted((Q10 / f"multifd2-{method}").glob("chan-*.bin"))[1])
    flag = MultifdFlag.ZSTD if method == "zstd" else MultifdFlag.ZLIB
    dec = ChannelDecoder(PacketLayout.V7_2 if qemu == "7.2" else None, blocks=BLOCKS,
                         compression_flag=int(flag))
    dec.receive_data(path.read_bytes())
    dec.receive_eof()
    new, old = into(), old_cls()
    assert type(get_method(method).new_decompressor()) is type(new)
    packets = 0
    while not isinstance(ev := dec.next_event(), EndOfChannel):
        if isinstance(ev, RamPacket) and ev.header.normal_pages:
            size = ev.header.normal_pages * PAGE
            ram = bytearray(b"\xee" * (size + PAGE))  # a RAM view inside a larger block
            ref = bytearray(size)
            new.decompress_packet(ev.payload, memoryview(ram)[PAGE // 2 : PAGE // 2 + size])
            old.decompress_packet(ev.payload, memoryview(ref))
            assert ram[PAGE // 2 : PAGE // 2 + size] == ref
            assert ram[: PAGE // 2] == ram[PAGE // 2 + size :] == b"\xee" * (PAGE // 2)
            packets += 1
    assert packets > 3


@pytest.mark.parametrize("method", ["zstd", "zlib"])
def test_into_ram_rejects_short_long_and_ended_payloads(method: str) -> None:
    _, into, _ = _into_and_bytes_paths(method)
    pages = pages_of("text", 4)
    payload = b"".join(get_method(method).new_compressor().compress_packet(pages))
    with pytest.raises(BadLength, match="more than"):
        into().decompress_packet(payload, memoryview(bytearray(3 * PAGE)))
    with pytest.raises(BadLength, match="expected"):
        into().decompress_packet(payload, memoryview(bytearray(5 * PAGE)))
    ended = (ZstdCompressor().compress(b"".join(pages), mode=ZstdCompressor.FLUSH_FRAME)
             if method == "zstd" else zlib.compress(b"".join(pages)))
    with pytest.raises(WireError, match="ended"):
        into().decompress_packet(ended, memoryview(bytearray(4 * PAGE)))


def test_zstd_into_ram_window_buffers_are_page_aligned() -> None:
    """libzstd's buffers come from the page-aligned allocator (why: zstd.py
    _PageAlignedMem), and everything it allocated is handed back when the context goes."""
    _, into, _ = _into_and_bytes_paths("zstd")
    d = into()
    if d._mem is None:
        pytest.skip("environment: this libzstd does not export ZSTD_createDCtx_advanced")
    pages = pages_of("random", 130)
    payload = b"".join(get_method("zstd").new_compressor().compress_packet(pages))
    out = bytearray(130 * PAGE)
    d.decompress_packet(payload, memoryview(out))
    assert bytes(out) == b"".join(pages)
    blocks = dict(d._mem._blocks)
    assert len(blocks) >= 2  # the context and its window/input buffers
    assert all(addr % PAGE == 0 for addr in blocks)
    mem = d._mem
    del d
    assert not mem._blocks
