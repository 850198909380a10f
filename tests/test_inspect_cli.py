"""`multifd inspect` (commands/inspect.py): JSON output, --dump-ram, exit codes."""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
import sys

import pytest

from multifd.commands import inspect as cmd
from multifd.qemu.inspect import InspectError, inspect_streams
from multifd.wire.constants import SectionType
from multifd.wire.errors import BadName, BadOffset, UnknownName
from multifd.wire.ram import RamBlockInfo, RamRecordWriter
from multifd.wire.stream import (
    Configuration,
    EndOfStream,
    FileHeader,
    SectionFooter,
    SectionHeader,
    encode_record,
)
from tests.conftest import CAPTURES, PATTERN_OFFSET, Q72, capture_bytes


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cmd.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("cap", [CAPTURES[2], CAPTURES[3], CAPTURES[5]],
                         ids=["7.2-zstd", "7.2-nomultifd", "10.0-none"])
def test_json_fields(capsys, cap):
    rc, out, err = run_cli(capsys, str(cap.main), *map(str, cap.channels), "--json")
    assert rc == 0 and err == ""
    j = json.loads(out)
    assert j["machine"] == cap.machine
    assert j["normal_pages"] == cap.normal_pages and j["zero_pages"] == cap.zero_pages
    assert j["ram_blocks"][0] == {"name": "pc.ram", "used_length": 64 << 20}
    assert {c["id"]: c["compression"] for c in j["channels"]} == {
        k: v[2] for k, v in cap.channel_pages.items()}
    for c in j["channels"]:
        assert c["sync_packets"] == 3 and c["packets"] > 3
    assert j["sections"][0] == {"idstr": "ram", "instance_id": 0, "version_id": 4,
                                "kind": "start", "section_id": j["sections"][0]["section_id"],
                                "offset": j["sections"][0]["offset"],
                                "size": j["sections"][0]["size"]}
    assert {"idstr", "instance_id", "version_id"} <= set(j["sections"][-1])
    assert len(j["devices"]) in (30, 31)


def test_text_output(capsys):
    cap = CAPTURES[0]
    rc, out, _ = run_cli(capsys, str(cap.main), *map(str, cap.channels))
    assert rc == 0
    assert "machine: pc-i440fx-7.2" in out and "channel 1:" in out and "timer" in out


def test_dump_ram(capsys, tmp_path, pattern):
    cap = CAPTURES[1]  # 7.2 zlib
    out = tmp_path / "pc.bin"
    rsdp = tmp_path / "rsdp.bin"
    rc, _, err = run_cli(capsys, str(cap.main), *map(str, cap.channels),
                         "--dump-ram", f"pc.ram:{out}", "--dump-ram", f"/rom@etc/acpi/rsdp:{rsdp}")
    assert rc == 0, err
    data = out.read_bytes()
    assert len(data) == 64 << 20
    assert data[PATTERN_OFFSET : PATTERN_OFFSET + len(pattern)] == pattern
    assert data[:PATTERN_OFFSET] == bytes(PATTERN_OFFSET)  # never-sent pages are zero
    assert rsdp.stat().st_size == 4096


def test_truncated_main_stream(capsys, tmp_path):
    cap = CAPTURES[0]
    p = tmp_path / "main.bin"
    p.write_bytes(cap.main.read_bytes()[:1000])
    rc, out, err = run_cli(capsys, str(p))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("error: ") and err.rstrip().endswith(f"at byte 1000 of {p}")


def test_corrupted_channel(capsys, tmp_path):
    cap = CAPTURES[0]
    bad = bytearray(cap.channels[1].read_bytes())
    bad[64 + 1344 + 4] = 9  # version of the second packet
    p = tmp_path / "c.bin"
    p.write_bytes(bytes(bad))
    rc, _, err = run_cli(capsys, str(cap.main), str(cap.channels[0]), str(p))
    assert rc == 2 and err.count("\n") == 1 and f"of {p}" in err and "Traceback" not in err


def test_usage_and_io_errors(capsys, tmp_path):
    cap = CAPTURES[3]
    rc, _, err = run_cli(capsys, str(tmp_path / "missing.bin"))
    assert rc == 1 and err.startswith("error:")
    rc, _, err = run_cli(capsys, str(cap.main), "--dump-ram", "nope:x.bin")
    assert rc == 1 and "pc.ram" in err
    with pytest.raises(SystemExit) as ei:
        cmd.main([])
    assert ei.value.code == 1


def test_module_entry_point(tmp_path):
    p = tmp_path / "garbage.bin"
    p.write_bytes(b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x02pc\x09")
    r = subprocess.run([sys.executable, "-m", "multifd.commands.inspect", str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr == f"error: unknown section type (type=9), at byte 15 of {p}\n"


def test_stream_cut_inside_the_device_sections(capsys, tmp_path):
    src = Q72 / "file-stream" / "file-stream.bin"
    data = src.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[: len(data) - 7000])  # inside the vmdesc JSON
    assert cmd.main([str(cut)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "device sections" in err[0] and str(cut) in err[0]


def test_stream_from_a_pipe(tmp_path):
    src = Q72 / "file-stream" / "file-stream.bin"
    out = subprocess.run(
        f"cat {src} | {sys.executable} -m multifd.commands.inspect /dev/stdin --json",
        shell=True, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["machine"] == "pc-i440fx-7.2"


# -- streams that name what they never declared (fuzzing finding, issue #12) ----------------

# A 226-byte QEMU 10.0 main stream: the ram START section has no MEM_SIZE block list, the
# PART section then sends ZERO records for "pc.ram". `inspect` died with KeyError 'pc.ram'
# (exit 1, "error: 'pc.ram'"). Also fuzz/seeds/inspect-undeclared-ram-block.
UNDECLARED_BLOCK = base64.b64decode(
    "UUVWTQAAAAMHAAAADnBjLWk0NDBmeC0xMC4wAQAAAAEDcmFtAAAAAAAAEAAAAAAAAAAAEH4AAAABAgAAAAEAAAAA"
    "AAAAAgZwYy5yYW0AAAAAAAAAECIAAAAAAAAAICIAAAAAAAAAMCIAAAAAAAAAQCIAAAAAAPAAUCIAAAAAAAAAABB+"
    "AAAAAQgACwAAAwAAAAEAAAAAAAAAEH4AAAABBAAAAAAFdGltZXIAAF0AAG1iX2NtZCIsIAAAAAAAAAABAAB+AAAA"
    "FwQidHlwZSI6IAAAABgDWQAAAAAAAABmZGMiAA==")


def test_undeclared_ram_block_is_exit_2_naming_record_and_block(tmp_path):
    p = tmp_path / "main.bin"
    p.write_bytes(UNDECLARED_BLOCK)
    r = subprocess.run([sys.executable, "-m", "multifd.cli", "inspect", str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    # the first ZERO record of the PART section starts at byte 62
    assert r.stderr == ("error: ZERO record names an unknown RAM block (block=pc.ram), "
                        f"at byte 62 of {p}\n")
    assert r.stdout == ""


def _ram_stream(*bodies: bytes) -> bytes:
    """QEVM header, configuration, one ram section per body (START, PART..., END), EOF."""
    out = [encode_record(FileHeader()), encode_record(Configuration("pc-i440fx-7.2"))]
    for i, body in enumerate(bodies):
        t = (SectionType.START if i == 0 else
             SectionType.END if i == len(bodies) - 1 else SectionType.PART)
        hdr = SectionHeader(t, 1, "ram", 0, 4) if i == 0 else SectionHeader(t, 1)
        out += [encode_record(hdr), body, encode_record(SectionFooter(1))]
    return b"".join(out) + encode_record(EndOfStream())


def test_page_checked_against_the_final_block_list():
    """A PAGE record valid for the first MEM_SIZE list lies outside the block once a second
    list shrinks it: a BadOffset naming the record, not an IndexError."""
    w = RamRecordWriter()
    first = w.mem_size([RamBlockInfo("pc.ram", 4 * 4096)]) + w.eos()
    page = w.page("pc.ram", 2 * 4096, bytes(4096))
    second = RamRecordWriter().mem_size([RamBlockInfo("pc.ram", 4096)]) + w.eos()
    data = _ram_stream(first, page + second, RamRecordWriter().eos())
    at = data.index(page)
    with pytest.raises(InspectError) as ei:
        inspect_streams(("m.bin", data))
    assert isinstance(ei.value.error, BadOffset) and ei.value.error.offset == at
    assert ei.value.line() == ("PAGE record page offset outside RAM block 'pc.ram' "
                               f"(offset=0x2000), at byte {at} of m.bin")
    ok = inspect_streams(("m.bin", _ram_stream(first, RamRecordWriter().page(
        "pc.ram", 3 * 4096, b"\x01" * 4096) + w.eos(), RamRecordWriter().eos())))
    assert bytes(ok.block_content("pc.ram")[3 * 4096 :]) == b"\x01" * 4096


def test_undeclared_block_in_process_is_unknown_name():
    with pytest.raises(InspectError) as ei:
        inspect_streams(("m.bin", UNDECLARED_BLOCK))
    err = ei.value.error
    assert isinstance(err, UnknownName) and isinstance(err, BadName)
    assert (err.field, err.value, err.offset) == ("block", "pc.ram", 62)


@pytest.mark.parametrize(("value", "shown"), [(b"{}", "{}"), (b'""', "''"), (b"-1", "-1")])
def test_vmdesc_device_without_instance_id_is_exit_2(capsys, tmp_path, value, shown):
    """The vmdesc names the devices the tail is split by: a device whose instance_id is not
    a u32 is a one-line error naming the device, not a TypeError/ValueError (exit 1)."""
    data = capture_bytes("qemu10-captures/multifd2-none/main.bin")
    i = data.index(b'"instance_id": 0')
    new = b'"instance_id":' + value.rjust(2)
    assert len(new) == 16
    p = tmp_path / "m.bin"
    p.write_bytes(data[:i] + new + data[i + 16 :])
    rc, out, err = run_cli(capsys, str(p))
    assert rc == 2 and out == ""
    vmdesc_at = data.rindex(b"\x00\x06") + 1  # the 0x06 record after QEMU_VM_EOF
    assert err == ("error: VMDESCRIPTION device 0 (timer) has no u32 instance_id "
                   f"(instance_id={shown}), at byte {vmdesc_at} of {p}\n")


def test_broken_gzip_main_stream_is_exit_2(capsys, tmp_path):
    """A .gz main stream that is cut or corrupt is malformed input (2), not an I/O error:
    before, EOFError / zlib.error escaped (exit 1, or a traceback via the module)."""
    whole = gzip.compress(UNDECLARED_BLOCK)
    cut = tmp_path / "cut.bin.gz"
    cut.write_bytes(whole[:60])
    rc, out, err = run_cli(capsys, str(cut))
    assert (rc, out) == (2, "")
    assert err == f"error: gzip stream ends before its end-of-stream marker, at byte 60 of {cut}\n"
    bad = tmp_path / "bad.bin.gz"
    bad.write_bytes(whole[:10] + bytes(range(200, 256)) + whole[66:])
    rc, _, err = run_cli(capsys, str(bad))
    assert rc == 2 and err.startswith("error: not a valid gzip stream (") and str(bad) in err


def test_vmdesc_without_device_tail_checks_its_devices_too():
    """A stream whose vmdesc follows EOF directly (no device sections): the same check,
    at the offset of the 0x06 record."""
    js = b'{"devices": [{"name": "timer", "instance_id": null}]}'
    data = (encode_record(FileHeader()) + encode_record(Configuration("pc-i440fx-10.0"))
            + encode_record(EndOfStream()) + b"\x06" + len(js).to_bytes(4, "big") + js)
    with pytest.raises(InspectError) as ei:
        inspect_streams(("m.bin", data))
    assert ei.value.line() == ("VMDESCRIPTION device 0 (timer) has no u32 instance_id "
                               f"(instance_id=None), at byte {data.index(js) - 5} of m.bin")
