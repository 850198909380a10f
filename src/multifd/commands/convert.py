"""`multifd convert IN OUT --format stream|mapped-ram [--channels N] [--json]`.

Convert a VM image between our QEMU stream file (`multifd incoming --save`; QEMU loads it
with `-incoming "exec:cat IMAGE"`) and a mapped-ram file (QEMU's `migrate file:` with
mapped-ram; QEMU loads it with `migrate-incoming file:IMAGE` and mapped-ram on). The input
format is detected (its configuration lists mapped-ram or not); mapped-ram pages are
read and written on N parallel channels. Exit codes: 0 ok, 1 error (one stderr line
`error: ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from multifd.cli import channels_arg
from multifd.migration.mapped_ram import MappedRamError
from multifd.qemu.image import ImageError, VmImage, write_image
from multifd.qemu.mapped_ram import read_any_image, write_mapped_ram_image

FORMATS = ("stream", "mapped-ram")


def add_format_arguments(parser: argparse.ArgumentParser, flag: str = "--save-channels",
                         default: str = "stream") -> None:
    """--format and the channel count for writing a mapped-ram file (incoming, convert)."""
    parser.add_argument("--format", choices=FORMATS, default=default,
                        help=f"file format to write (default {default}): a QEMU stream "
                             "file, or a mapped-ram file (pages at fixed offsets, zero "
                             "pages as holes)")
    parser.add_argument(flag, dest="save_channels", type=channels_arg(), default=4,
                        metavar="N", help="parallel writers for a mapped-ram file (default 4)")


def save_image(image: VmImage, path: str, fmt: str, channels: int) -> int:
    """Write `image` in format `fmt`; returns the file's size in bytes."""
    if fmt == "mapped-ram":
        try:
            return write_mapped_ram_image(image, path, channels)
        except MappedRamError as e:
            raise ImageError(f"{path}: {e}") from None
    return write_image(image, path)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Convert a VM image between a QEMU stream file and a mapped-ram "
                          "file (either direction; the input format is detected).")
    parser.add_argument("input", metavar="IN", help="image to read (stream or mapped-ram)")
    parser.add_argument("output", metavar="OUT", help="file to write")
    add_format_arguments(parser, flag="--channels", default="mapped-ram")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    try:
        with read_any_image(args.input) as image:
            size = save_image(image, args.output, args.format, args.save_channels)
            pages = image.normal_pages, image.zero_pages
            machine = image.machine
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or args.input}: {e.strerror or e}", file=sys.stderr)
        return 1
    ms = (time.monotonic() - t0) * 1000
    st = os.stat(args.output)
    out = {"input": args.input, "output": args.output, "format": args.format,
           "machine": machine, "pages": {"normal": pages[0], "zero": pages[1]},
           "apparent_bytes": size, "allocated_bytes": st.st_blocks * 512,
           "time_ms": round(ms, 1)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"converted {args.input} -> {args.output} ({args.format}, {machine}): "
              f"{size:,} bytes, {st.st_blocks * 512:,} allocated, in {ms:.0f} ms")
    return 0
