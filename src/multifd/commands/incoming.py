"""`multifd incoming URI --profile P [--channels N] [--compression C] [--uuid U] --save IMAGE
[--format stream|mapped-ram] [--save-channels N]`.

Be the destination of a real QEMU migration and save what arrived as IMAGE, a QEMU stream
file (`qemu -incoming "exec:cat IMAGE"` loads it; `multifd migrate` replays it) or a
mapped-ram file (QEMU loads it with `migrate-incoming file:IMAGE` and mapped-ram on).
Exit codes: 0 ok, 1 error (one stderr line `error: ...`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from multifd.cli import channels_arg
from multifd.commands.convert import add_format_arguments, save_image
from multifd.commands.policy_options import (
    add_policy_options,
    completion_deadline,
    peer_timeouts,
)
from multifd.commands.timeline_options import (
    PeerRecorder,
    add_timeline_options,
    check_timeline_options,
)
from multifd.migration.policy import PolicyError
from multifd.migration.profile import PROFILES, get_profile
from multifd.qemu.peer import DEFAULT_TIMEOUT_S, PeerError, parse_uuid, receive_from_qemu
from multifd.transport.tls import TlsConfig, add_tls_arguments

UUID_HELP = ("UUID of the multifd init packets; it must equal the peer QEMU's -uuid (QEMU "
             "compares them; all zeros without -uuid). Default: the uuid subsection of the "
             "stream's configuration (the recorded/image configuration) when present, else "
             "all zeros")


def add_common(parser: argparse.ArgumentParser) -> None:
    """Options shared by `incoming` and `migrate`."""
    parser.add_argument("--profile", required=True, choices=sorted(PROFILES),
                        help="the QEMU peer's wire profile (qemu-7.2, or qemu-10 with a 10.x "
                             "machine type)")
    parser.add_argument("--channels", type=channels_arg(minimum=0), default=0, metavar="N",
                        help="multifd channels, as QEMU's multifd-channels: 1..255, or 0 = "
                             "multifd off (the default)")
    parser.add_argument("--compression", default="none", choices=("none", "zlib", "zstd"),
                        help="multifd compression, as QEMU's multifd-compression")
    parser.add_argument("--uuid", default=None, help=UUID_HELP)
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    add_tls_arguments(parser)
    add_policy_options(parser, peer_wait=DEFAULT_TIMEOUT_S)  # --idle-timeout: every wait
    add_timeline_options(parser)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Receive a migration from a real QEMU and save it as IMAGE (a QEMU "
                          "migration stream file).")
    parser.add_argument("uri", metavar="URI", help="where to listen: tcp:HOST:PORT or "
                        "unix:PATH (also exec:/file: with multifd off)")
    parser.add_argument("--save", required=True, metavar="IMAGE", help="image file to write")
    add_format_arguments(parser)
    add_common(parser)


def _listening(address: str) -> None:
    print(f"listening on {address}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if (why := check_timeline_options(args)) is not None:
        print(f"error: {why}", file=sys.stderr)
        return 1
    recorder = PeerRecorder(args, "destination")
    try:
        uuid = parse_uuid(args.uuid) if args.uuid else None
        wait, deadline = peer_timeouts(args, DEFAULT_TIMEOUT_S, None)
        t0 = time.monotonic()
        with completion_deadline(deadline, "incoming migration"):
            image, stats = receive_from_qemu(
                args.uri, profile=get_profile(args.profile), channels=args.channels,
                compression=args.compression, uuid=uuid, timeout=wait,
                on_listen=_listening, tls=TlsConfig.from_args(args),
                observe=recorder.observe)
        with image:
            size = save_image(image, args.save, args.format, args.save_channels)
        total_ms = (time.monotonic() - t0) * 1000
    except (PeerError, PolicyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        out = stats.to_json()
        out.update(image=args.save, image_bytes=size, total_ms=round(total_ms, 1))
        print(json.dumps(out))
    else:
        print(f"received {stats.machine}: {stats.normal_pages} pages + {stats.zero_pages} zero "
              f"pages in {stats.time_ms:.0f} ms; saved {args.save} ({size} bytes)")
    return recorder.finish()
