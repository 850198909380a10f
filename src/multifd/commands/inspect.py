"""`multifd inspect MAIN_STREAM [CHANNEL_FILE ...] [--json] [--dump-ram BLOCK:OUTFILE ...]`.

Exit codes: 0 ok; 2 malformed or truncated input (one stderr line
`error: <what>, at byte <offset> of <file>`); 1 usage or I/O errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TextIO

from multifd.qemu.inspect import InspectError, InspectResult, inspect_files, resolve_dump_spec
from multifd.wire.errors import WireError
from multifd.wire.ram import RamBlockInfo

HELP = "decode a recorded migration (main stream + multifd channels), dump guest RAM"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("main", metavar="MAIN_STREAM",
                        help="main-channel stream, or a mapped-ram file (.gz is unpacked)")
    parser.add_argument("channels", metavar="CHANNEL_FILE", nargs="*",
                        help="recorded multifd connections, in any order")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--dump-ram", metavar="BLOCK:OUTFILE", action="append", default=[],
                        help="write a RAM block's final content to OUTFILE (repeatable)")


def _err(line: str) -> None:
    print(f"error: {line}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        result = inspect_files(args.main, args.channels)
    except InspectError as e:
        _err(e.line())
        return 2
    except WireError as e:  # should not escape inspect_files, but never a traceback
        _err(f"{e.describe()}, at byte {e.offset or 0} of {args.main}")
        return 2
    except (OSError, ValueError) as e:
        _err(str(e))
        return 1
    names = [b.name for b in result.ram_blocks]
    dumps: list[tuple[str, str]] = []
    for spec in args.dump_ram:
        try:
            dumps.append(resolve_dump_spec(spec, names))
        except WireError:
            _err(f"--dump-ram {spec!r}: expected BLOCK:OUTFILE with BLOCK one of "
                 f"{', '.join(names) or '(no RAM blocks)'}")
            return 1
    for block, out in dumps:
        try:
            with open(out, "wb") as f:
                f.write(memoryview(result.block_content(block)))
        except OSError as e:
            _err(f"cannot write {out}: {e.strerror or e}")
            return 1
    try:
        if args.json:
            doc = result.to_json()
            if result.mapped_ram_present:
                doc["file_bytes"] = file_sizes(result.main_file)
            json.dump(doc, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print_text(result, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head
        return 0
    return 0


def print_text(r: InspectResult, out: TextIO) -> None:
    w = out.write
    cfg = r.configuration
    w(f"main stream: {r.main_file} (QEVM version {r.stream_version})\n")
    w(f"machine: {r.machine}\n")
    if cfg and cfg.capabilities:
        w(f"capabilities: {', '.join(cfg.capabilities)}\n")
    w(f"RAM blocks ({len(r.ram_blocks)}, total {r.ram_total:,} bytes):\n")
    for b in r.ram_blocks:
        extra = f"  mapped-ram pages at {b.mapped_ram.pages_offset:#x}" if b.mapped_ram else ""
        w(f"  {b.name:<28} {b.used_length:>14,}{extra}\n")
        if b.mapped_ram is not None:
            print_mapped_ram_block(b, r.mapped_ram_present.get(b.name, 0), w)
    if any(b.mapped_ram is not None for b in r.ram_blocks):
        print_file_size(r.main_file, w)
    w(f"pages: {r.normal_pages:,} normal, {r.zero_pages:,} zero "
      f"(main stream {r.main_normal_pages:,} normal / {r.main_zero_pages:,} zero"
      f"{f', mapped-ram {r.mapped_ram_pages:,}' if r.mapped_ram_pages else ''})\n")
    w(f"multifd sync: {r.sync_mode}, {r.sync_markers} marker(s)\n")
    for c in r.channels:
        w(f"  channel {c.id}: {c.file}: {c.packets} packets ({c.sync_packets} SYNC), "
          f"{c.normal_pages:,} normal / {c.zero_pages:,} zero pages, "
          f"compression {c.compression}, layout {c.layout}\n")
    if r.commands:
        w(f"commands: {', '.join(r.commands)}\n")
    w(f"sections ({len(r.sections)}):\n")
    for s in r.sections:
        w(f"  {s.kind:<5} {s.idstr:<28} instance {s.instance_id:<3} version {s.version_id:<3} "
          f"id {s.section_id:<4} at {s.offset:>10,} size {s.size:>10,}\n")
    if r.tail_offset is not None and not r.tail_split:
        w(f"  (opaque device tail at {r.tail_offset:,}, {r.tail_size:,} bytes, no vmdesc)\n")
    if r.devices:
        w(f"devices (vmdesc, {len(r.devices)}): "
          + ", ".join(f"{d['name']}/{d['instance_id']}" for d in r.devices) + "\n")


def print_mapped_ram_block(b: RamBlockInfo, present: int, w: Callable[[str], object]) -> None:
    """A mapped-ram block's header and how many of its pages the bitmap holds."""
    h = b.mapped_ram
    assert h is not None
    total = b.used_length // h.page_size if h.page_size else 0
    w(f"    header: version {h.version}, page_size {h.page_size:#x}, bitmap_offset "
      f"{h.bitmap_offset:#x}, pages_offset {h.pages_offset:#x}; pages present {present:,}, "
      f"absent {total - present:,}\n")


def file_sizes(path: str) -> dict[str, int] | None:
    """A sparse file's apparent size and what the file system allocated (None for a .gz
    or an unreadable file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if path.endswith(".gz"):
        return None
    return {"apparent": st.st_size, "allocated": st.st_blocks * 512}


def print_file_size(path: str, w: Callable[[str], object]) -> None:
    sizes = file_sizes(path)
    if sizes is not None:
        w(f"file: apparent {sizes['apparent']:,} bytes, allocated {sizes['allocated']:,} "
          "bytes\n")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="multifd inspect", description=HELP)
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
