"""`multifd inspect` (commands/inspect.py): JSON output, --dump-ram, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from multifd.commands import inspect as cmd
from tests.conftest import CAPTURES, PATTERN_OFFSET, Q72


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
