"""Hypothesis fuzzing of every wire decoder with mutated real QEMU captures.

The only exception a decoder may raise on hostile bytes is WireError (a one-line reason
with an offset); every input finishes within the time bound and allocates at most a small
multiple of its own size. Runs are deterministic in CI (see `_harness.fuzz_settings`);
MULTIFD_FUZZ_SCALE=20 MULTIFD_FUZZ_RANDOM=1 makes a longer, random run.
"""

from __future__ import annotations

import struct
from functools import cache

from hypothesis import given
from hypothesis import strategies as st

from multifd.wire import NEED_DATA
from multifd.wire.buffer import NeedData, ReceiveBuffer
from multifd.wire.constants import PacketLayout
from multifd.wire.devstate import DeviceStateBufferHeader
from multifd.wire.errors import WireError
from multifd.wire.mapped_ram import MappedRamHeader, bitmap_to_pages
from multifd.wire.packet import (
    ChannelDecoder,
    EndOfChannel,
    InitPacket,
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
    RamRecordReader,
    RamSettings,
    RamZero,
)
from multifd.wire.stream import MainStreamDecoder
from multifd.wire.vmdesc import find_vmdesc, parse_vmdesc_json, split_device_tail
from tests.fuzz._harness import (
    RAM_RECORDS,
    _ram_marks,
    channel_seeds,
    chunked,
    fuzz_settings,
    main_seeds,
    mapped_ram_seed,
    mutated,
    ram_seeds,
    run_target,
)

MiB = 1 << 20
# The RAM blocks of every capture's guest (MEM_SIZE list), so a decoder that checks names
# and offsets gets past the block list of a real stream.
CAPTURE_BLOCKS = {
    "pc.ram": 64 * MiB,
    "/rom@etc/acpi/tables": 0x20000,
    "pc.bios": 0x40000,
    "pc.rom": 0x20000,
    "/rom@etc/table-loader": 0x1000,
    "/rom@etc/acpi/rsdp": 0x1000,
}


def _mem_limit(data: bytes) -> int:
    return 8 * MiB + 6 * len(data)


def _drain_main(data: bytes, chunk: int, **kw: object) -> None:
    dec = MainStreamDecoder(**kw)  # type: ignore[arg-type]
    for part in chunked(data, chunk):
        dec.receive_data(part)
        while dec.next_record() is not NEED_DATA:
            if dec.finished:
                return
    dec.receive_eof()
    while dec.next_record() is not NEED_DATA:
        if dec.finished:
            return


@fuzz_settings(800)
@given(mutated(main_seeds()), st.sampled_from((1 << 20, 4096, 977, 64)),
       st.booleans())
def test_main_stream_decoder(case: tuple[str, bytes], chunk: int, with_blocks: bool) -> None:
    _, data = case
    kw: dict[str, object] = {"ram": RamSettings(batch_zero_runs=True)}
    if with_blocks:  # a destination that knows its blocks checks offsets against them
        kw["blocks"] = {"pc.ram": 64 * MiB, "pc.bios": 256 * 1024}
        kw["max_vmdesc"] = 1 * MiB
    run_target("MainStreamDecoder", lambda: _drain_main(data, chunk, **kw), (WireError,),
               _mem_limit(data))


def _drain_channel(data: bytes, chunk: int, layout: PacketLayout | None,
                   blocks: dict[str, int] | None) -> None:
    dec = ChannelDecoder(layout, blocks=blocks)
    for part in chunked(data, chunk):
        dec.receive_data(part)
        while (ev := dec.next_event()) is not NEED_DATA:
            if isinstance(ev, EndOfChannel):
                return
    dec.receive_eof()
    while (ev := dec.next_event()) is not NEED_DATA:
        if isinstance(ev, EndOfChannel):
            return


@fuzz_settings(800)
@given(mutated(channel_seeds()), st.sampled_from((1 << 20, 65536, 1000)),
       st.sampled_from((None, PacketLayout.V7_2, PacketLayout.HEAD)), st.booleans())
def test_channel_decoder(case: tuple[str, bytes], chunk: int, layout: PacketLayout | None,
                         with_blocks: bool) -> None:
    _, data = case
    blocks = {"pc.ram": 64 * MiB} if with_blocks else None
    run_target("ChannelDecoder", lambda: _drain_channel(data, chunk, layout, blocks),
               (WireError,), _mem_limit(data))


def _packets(data: bytes) -> list[bytes]:
    return [data[i : i + 4096] for i in range(0, min(len(data), 8192), 64)]


@fuzz_settings(400)
@given(mutated(channel_seeds()), st.integers(0, 1 << 16))
def test_packet_decoders(case: tuple[str, bytes], start: int) -> None:
    """The one-shot decoders on any window: init, common header, RAM and device-state
    packet headers (a window at a real packet start is the interesting case)."""
    name, data = case
    head = data[start % max(1, len(data)) :] if start > 64 else data[64:]

    def run() -> None:
        errors = 0
        for fn in (
            lambda: validate_init(InitPacket.decode(data[:64]), uuid=bytes(16), channels=2,
                                  seen=set()),
            lambda: decode_common_header(head[:12]),
            lambda: decode_ram_packet(head[:4096 + 1088],
                                      layout=PacketLayout.V7_2 if "7.2" in name
                                      else PacketLayout.HEAD,
                                      blocks={"pc.ram": 64 * MiB}),
            lambda: decode_ram_packet(head[:1088], layout=PacketLayout.HEAD),
            lambda: decode_device_state_packet(head[:276]),
        ):
            try:
                fn()
            except WireError:
                errors += 1
        if errors == 5:
            raise WireError("all rejected")

    run_target("packet decoders", run, (WireError,), _mem_limit(data[:8192]))


def _drain_ram_records(data: bytes) -> int:
    """Read RAM records until the bytes run out (NeedData); returns the number of reads.

    Every read must consume input (a read that does not is a reader that can spin forever
    on a stream), so the bytes run out within len(data) reads; each read yields a RAM
    record or None (one MEM_SIZE entry / part of a skip).
    """
    reader = RamRecordReader(RamSettings(), CAPTURE_BLOCKS)
    buf = ReceiveBuffer()
    buf.feed(data)
    buf.close()
    for reads in range(len(data) + 1):
        before = buf.offset
        try:
            rec = reader.read(buf)
        except NeedData:
            return reads
        buf.commit()
        assert buf.offset > before, f"read {reads} consumed no input and returned {rec!r}"
        assert rec is None or isinstance(rec, RAM_RECORDS), rec
    raise AssertionError(f"{len(data) + 1} reads of {len(data)} bytes did not use them up")


def test_ram_seeds_are_whole_ram_record_streams() -> None:
    """Each clean RAM seed reads to its end without an error (NeedData, all bytes used),
    through the block list and into ZERO/PAGE records: the mutations start from real
    records, not from a block list that the reader rejects."""
    kinds: set[type] = set()
    for seed in ram_seeds():
        reads = _drain_ram_records(seed.data)
        recs = [rec for _, _, rec in _ram_marks(seed.data)]
        assert reads >= len(recs) == len(seed.marks) > 5, seed.name
        assert isinstance(recs[0], RamMemSize) and isinstance(recs[-1], RamEos), seed.name
        kinds |= {type(rec) for rec in recs}
    assert {RamMemSize, RamZero, RamPage, RamEos, RamMultifdFlush} <= kinds, kinds


@fuzz_settings(500)
@given(mutated(ram_seeds()), st.integers(0, 400))
def test_ram_record_reader(case: tuple[str, bytes], skip: int) -> None:
    """RAM records straight from a ReceiveBuffer: the records of a real stream's ram
    sections (block list, ZERO/PAGE, EOS, FLUSH), sometimes entered mid-record."""
    _, data = case
    body = data[skip % 64 :] if skip > 200 else data
    run_target("RamRecordReader", lambda: _drain_ram_records(body), (WireError,),
               _mem_limit(body))


def _decode_headers_at(data: bytes, pos: int) -> None:
    """The mapped-ram block header and device-state buffer header decoders at ``pos``,
    then a bitmap of a page count read there (also the atheris target's driver)."""
    for fn in (lambda: MappedRamHeader.decode(data, offset=pos, page_size=4096),
               lambda: MappedRamHeader.decode(data, offset=pos),
               lambda: DeviceStateBufferHeader.decode(data, offset=pos)):
        try:
            fn()
        except WireError:
            pass
    n = struct.unpack_from(">I", data.ljust(pos + 4, b"\0"), pos)[0] % (1 << 20)
    bitmap_to_pages(data[pos : pos + 4096], n)


@fuzz_settings(200)
@given(mutated((mapped_ram_seed(),)), st.integers(0, 1 << 17))
def test_mapped_ram_and_devstate_headers(case: tuple[str, bytes], at: int) -> None:
    _, data = case

    def run() -> None:
        _decode_headers_at(data, at % max(1, len(data)))

    run_target("mapped-ram/devstate headers", run, (WireError,), _mem_limit(data) + 64 * n_max)


n_max = 1 << 17  # bitmap_to_pages may return one bool/index per claimed page (bounded above)


@cache
def _tail_offsets() -> dict[str, int]:
    """Where the device tail starts in each clean main seed."""
    out = {}
    for seed in main_seeds():
        dec = MainStreamDecoder()
        dec.receive_data(seed.data)
        dec.receive_eof()
        list(dec)
        out[seed.name] = dec.tail_offset or 0
    return out


@fuzz_settings(150)
@given(mutated(main_seeds()), st.integers(-64, 64))
def test_vmdesc_parsing(case: tuple[str, bytes], shift: int) -> None:
    """find_vmdesc / split_device_tail / parse_vmdesc_json on a mutated device tail."""
    name, data = case
    tail = data[max(0, _tail_offsets()[name] + shift) :]

    def run() -> None:
        j = tail.rfind(b'{"page_size"')
        try:
            parse_vmdesc_json(tail[j:] if j >= 0 else tail[-100:], limit=1 * MiB)
        except WireError:
            pass
        found = find_vmdesc(tail, limit=1 * MiB)
        split_device_tail(tail, found[1] if found else None, base_offset=7)

    run_target("vmdesc parsing", run, (WireError,), _mem_limit(tail) + 2 * MiB)


@fuzz_settings(300)
@given(st.binary(max_size=2048))
def test_random_bytes_everywhere(data: bytes) -> None:
    """Unstructured bytes, with a valid QEVM header in front half of the time."""
    for payload in (data, b"QEVM\x00\x00\x00\x03" + data):
        run_target("MainStreamDecoder", lambda p=payload: _drain_main(p, 97), (WireError,),
                   _mem_limit(payload))
        run_target("ChannelDecoder", lambda p=payload: _drain_channel(p, 97, None, None),
                   (WireError,), _mem_limit(payload))
