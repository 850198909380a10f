"""Golden tests on real QEMU 7.2 and 10.0 streams (tests/data/qemu-captures, qemu10-captures).

Rebuild pc.ram from every capture (main stream + multifd channels, zlib/zstd inflated, or
mapped-ram pages), compare the pattern region, check the README's page counts, the 7.2
quirks of qemu72-peer.md §4.2, byte-exact re-encoding and truncation behaviour.
"""

from __future__ import annotations

import pytest
from tests.conftest import CAPTURE_IDS, CAPTURES, PATTERN_OFFSET, Q72, Capture

from multifd.qemu.inspect import InspectError, inspect_files, inspect_streams
from multifd.wire import NEED_DATA
from multifd.wire.errors import WireError
from multifd.wire.ram import RamPage, RamZero
from multifd.wire.stream import MainStreamDecoder, encode_record

PATTERN_SIZE = 4 << 20


def decode_all(data: bytes, chunk: int = 0):
    d = MainStreamDecoder()
    out = []
    if chunk:
        for i in range(0, len(data), chunk):
            d.receive_data(data[i : i + chunk])
            out += list(d)
    else:
        d.receive_data(data)
    d.receive_eof()
    out += list(d)
    assert d.finished
    return out, d


@pytest.fixture(scope="module")
def results():
    return {c.name: inspect_files(c.main, c.channels) for c in CAPTURES}


@pytest.mark.parametrize("cap", CAPTURES, ids=CAPTURE_IDS)
def test_rebuild_and_counts(cap: Capture, results, pattern):
    r = results[cap.name]
    ram = r.block_content("pc.ram")
    assert len(ram) == 64 << 20
    assert bytes(ram[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_SIZE]) == pattern
    assert r.machine == cap.machine
    assert (r.normal_pages, r.zero_pages) == (cap.normal_pages, cap.zero_pages)
    assert (r.main_normal_pages, r.main_zero_pages) == (cap.main_page_records,
                                                        cap.main_zero_records)
    got = {c.id: (c.normal_pages, c.zero_pages, c.compression) for c in r.channels}
    assert got == cap.channel_pages
    assert [b.name for b in r.ram_blocks] == ["pc.ram", "/rom@etc/acpi/tables", "pc.bios",
                                              "pc.rom", "/rom@etc/table-loader",
                                              "/rom@etc/acpi/rsdp"]
    assert r.ram_total == 0x4082000
    if cap.channels:
        assert r.sync_markers == 3 and all(c.sync_packets == 3 for c in r.channels)
        assert r.sync_mode == ("per-section" if "7.2" in cap.name else "per-round")
    if "10.0" in cap.name:
        assert "SWITCHOVER_START" in r.commands


def test_all_captures_agree_on_every_block(results):
    """Every 7.2 capture rebuilds identical RAM (pc.bios, ROMs, ...), and so does every 10.0."""
    for prefix in ("7.2", "10.0"):
        group = [r for name, r in results.items() if name.startswith(prefix)]
        for b in group[0].ram_blocks:
            ref = bytes(group[0].block_content(b.name))
            for r in group[1:]:
                assert bytes(r.block_content(b.name)) == ref, (prefix, b.name)


def test_mapped_ram(mapped_ram_file, pattern, results):
    r = inspect_files(mapped_ram_file)
    assert r.configuration.capabilities == ("mapped-ram",)
    assert r.mapped_ram_pages == 818 and r.normal_pages == 818 and r.zero_pages == 0
    assert r.ram_blocks[1].mapped_ram.pages_offset == 0x4200000
    ram = r.block_content("pc.ram")
    assert bytes(ram[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_SIZE]) == pattern
    for b in r.ram_blocks:  # same guest RAM as the 10.0 TCP captures
        assert bytes(r.block_content(b.name)) == bytes(
            results["10.0-none"].block_content(b.name)), b.name
    # byte-exact re-encoding, with the mapped-ram regions the decoder skipped left out
    data = mapped_ram_file.read_bytes()
    recs, d = decode_all(data, chunk=1 << 20)
    kept, pos = [], 0
    for off, n in d.ram_reader.skipped:
        kept.append(data[pos:off])
        pos = off + n
    kept.append(data[pos:])
    assert b"".join(encode_record(x, ram=d.ram_settings) for x in recs) == b"".join(kept)
    assert d.ram_reader.skipped[0][1] == 0x100000 + (64 << 20) - 142


def test_72_quirks(results):
    """qemu72-peer.md §4.2, as seen in multifd2-none."""
    r = results["7.2-none"]
    ch = {c.id: c for c in r.channels}
    log0 = [(p.packet_num, p.is_sync, p.normal_pages, p.next_packet_size, p.ramblock)
            for p in ch[0].packet_log]
    assert log0 == [
        (0, True, 0, 0, ""),
        (2, False, 128, 524288, "pc.ram"), (4, False, 128, 524288, "pc.ram"),
        (6, False, 128, 524288, "pc.ram"),
        (12, True, 1, 4096, "/rom@etc/acpi/tables"),  # SYNC that carries a page
        (12, False, 0, 4096, "/rom@etc/acpi/tables"),  # empty non-SYNC, same packet_num
        (14, True, 0, 4096, "/rom@etc/acpi/tables"),  # stale next_packet_size / ramblock
    ]
    # the page carried by the SYNC packet was applied: 3 x 128 + 1
    assert ch[0].normal_pages == 385
    nums = [p.packet_num for c in r.channels for p in c.packet_log]
    assert 8 not in nums and nums.count(12) == 2  # gap and duplicate
    assert all(p.pages_alloc == 128 for c in r.channels for p in c.packet_log)  # 7.2 style
    assert all(c.layout == "7.2" for c in r.channels)
    # zlib: page-less SYNC packets carry compression bits 0 and stale sizes / names
    z = results["7.2-zlib"]
    stale = [p for c in z.channels for p in c.packet_log if p.is_sync and not p.normal_pages
             and p.next_packet_size]
    assert stale and all(p.flags == 1 and p.payload_len == 0 for p in stale)
    # zstd: connections are not in channel-id order
    zs = results["7.2-zstd"]
    assert {c.id: c.file.split("/")[-1] for c in zs.channels} == {
        0: "conn2-src2dst.bin", 1: "conn1-src2dst.bin"}


def test_10_channels_unsorted_offsets_and_sync_only(results):
    r = results["10.0-none"]
    assert all(c.layout == "head" for c in r.channels)
    syncs = [p for c in r.channels for p in c.packet_log if p.is_sync]
    assert len(syncs) == 6 and all(p.pages_alloc == 0 and p.normal_pages == 0 for p in syncs)


def test_channel_order_is_by_id_not_by_argument(pattern):
    cap = CAPTURES[2]  # 7.2-zstd
    a = inspect_files(cap.main, cap.channels)
    b = inspect_files(cap.main, cap.channels[::-1])
    assert [c.id for c in a.channels] == [c.id for c in b.channels] == [0, 1]
    assert bytes(a.block_content("pc.ram")) == bytes(b.block_content("pc.ram"))


@pytest.mark.parametrize("cap", CAPTURES, ids=CAPTURE_IDS)
def test_main_stream_round_trip(cap: Capture):
    data = cap.main.read_bytes()
    recs, d = decode_all(data, chunk=65536 if "multifd" in cap.name else 0)
    assert b"".join(encode_record(r, ram=d.ram_settings) for r in recs) == data
    zero = sum(isinstance(r, RamZero) for r in recs)
    page = sum(isinstance(r, RamPage) for r in recs)
    assert (zero, page) == (cap.main_zero_records, cap.main_page_records)


def _truncation_ok(data: bytes, cut: int) -> None:
    d = MainStreamDecoder()
    d.receive_data(data[:cut])
    try:
        while d.next_record() is not NEED_DATA:
            pass
        d.receive_eof()
        while d.next_record() is not NEED_DATA:
            pass
    except WireError as e:
        assert e.offset is not None and 0 <= e.offset <= cut
    else:
        assert d.finished


@pytest.mark.parametrize("cap", [CAPTURES[0], CAPTURES[5]], ids=["7.2", "10.0"])
def test_truncation_everywhere(cap: Capture):
    data = cap.main.read_bytes()
    d = MainStreamDecoder()
    d.receive_data(data)
    d.receive_eof()
    list(d)
    boundary = d.tail_offset
    # dense over the first 2 KB and around the RAM/device boundary, strided elsewhere
    cuts = set(range(0, 2048)) | set(range(boundary - 24, boundary + 24))
    cuts |= set(range(0, len(data) + 1, len(data) // 60)) | {len(data) - 1, len(data)}
    for cut in sorted(cuts):
        _truncation_ok(data, cut)


def test_corrupt_channel_reports_file_and_offset(tmp_path):
    cap = CAPTURES[0]
    bad = bytearray(cap.channels[0].read_bytes())
    bad[64 + 1344] ^= 0xFF  # magic of the second packet
    p = tmp_path / "chan.bin"
    p.write_bytes(bytes(bad))
    with pytest.raises(InspectError) as ei:
        inspect_files(cap.main, [p, cap.channels[1]])
    assert ei.value.file == str(p) and ei.value.error.offset == 64 + 1344


def test_missing_sync_is_an_error(tmp_path):
    cap = CAPTURES[0]
    data = cap.channels[0].read_bytes()
    with pytest.raises(InspectError) as ei:
        inspect_streams((str(cap.main), cap.main.read_bytes()),
                        [("c0", data[: 64 + 1344]), ("c1", cap.channels[1].read_bytes())])
    assert "ended before the SYNC" in ei.value.line()
    assert Q72.exists()
