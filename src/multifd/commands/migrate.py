"""`multifd migrate IMAGE URI --profile P [--channels N] [--compression C] [--uuid U]`.

Be the source of a migration into a real QEMU destination (`-incoming defer` +
`migrate-incoming URI`), sending a recorded IMAGE. Exit codes: 0 ok, 1 error (one stderr
line `error: ...`).
"""

from __future__ import annotations

import argparse
import json
import sys

from multifd.commands.incoming import add_common
from multifd.commands.policy_options import completion_deadline, peer_timeouts
from multifd.migration.policy import PolicyError
from multifd.migration.profile import get_profile
from multifd.qemu.image import ImageError
from multifd.qemu.mapped_ram import read_any_image
from multifd.qemu.peer import DEFAULT_TIMEOUT_S, PeerError, migrate_to_qemu, parse_uuid
from multifd.transport.tls import TlsConfig


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Migrate a recorded IMAGE into a QEMU destination started with "
                          "-incoming defer and migrate-incoming URI.")
    parser.add_argument("image", metavar="IMAGE", help="image written by `multifd incoming` "
                        "(or any single-stream QEMU migration file), or a mapped-ram file "
                        "(QEMU's `migrate file:` with mapped-ram, or ours; read with "
                        "parallel preadv)")
    parser.add_argument("uri", metavar="URI", help="the destination: tcp:HOST:PORT or "
                        "unix:PATH (also exec:/file: with multifd off)")
    add_common(parser)


def run(args: argparse.Namespace) -> int:
    from multifd.commands.timeline_options import PeerRecorder, check_timeline_options

    if (why := check_timeline_options(args)) is not None:
        print(f"error: {why}", file=sys.stderr)
        return 1
    recorder = PeerRecorder(args, "source")
    try:
        uuid = parse_uuid(args.uuid) if args.uuid else None
        profile = get_profile(args.profile)
        with read_any_image(args.image) as image:
            wait, deadline = peer_timeouts(args, DEFAULT_TIMEOUT_S,
                                           sum(image.block_lengths.values()))
            with completion_deadline(deadline, "migration"):
                stats = migrate_to_qemu(image, args.uri, profile=profile,
                                        channels=args.channels, compression=args.compression,
                                        uuid=uuid, timeout=wait, tls=TlsConfig.from_args(args),
                                        observe=recorder.observe)
    except (PeerError, ImageError, PolicyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot read {args.image}: {e.strerror or e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stats.to_json()))
    else:
        print(f"migrated {stats.machine}: {stats.normal_pages} pages + {stats.zero_pages} zero "
              f"pages in {stats.time_ms:.0f} ms")
    return recorder.finish()
