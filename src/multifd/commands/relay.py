"""`multifd relay LISTEN_URI DEST_URI --profile P ...`: relay a live QEMU migration.

A QEMU source migrates to LISTEN_URI; the relay migrates at the same time to a QEMU
destination at DEST_URI (started with `-incoming defer` + `migrate-incoming DEST_URI`),
decoding every packet, transcoding channel count, compression, TLS and profile where the
two sides differ (multifd/qemu/relay.py). The `--out-*` options default to the upstream
values. Exit codes: 0 ok, 1 error (one stderr line `error: <side>: <cause>`).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from multifd.cli import channels_arg
from multifd.commands.incoming import UUID_HELP
from multifd.commands.policy_options import (
    add_policy_options,
    completion_deadline,
    peer_timeouts,
)
from multifd.commands.timeline_options import (
    add_timeline_options,
    check_timeline_options,
    wants_timeline,
    write_timeline,
)
from multifd.migration.policy import PolicyError
from multifd.migration.profile import PROFILES, get_profile
from multifd.qemu.peer import DEFAULT_TIMEOUT_S, PeerError, parse_uuid
from multifd.qemu.relay import (
    Relay,
    RelayError,
    RelayResult,
    RelaySide,
    parse_relay_fault,
)
from multifd.transport.tls import TlsConfig, add_tls_arguments, parse_authz

COMPRESSIONS = ("none", "zlib", "zstd")
PROGRESS_S = 0.5


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Relay a live migration from a QEMU source (which migrates to "
                          "LISTEN_URI) to a QEMU destination (-incoming defer, "
                          "migrate-incoming DEST_URI), decoding and transcoding it.")
    parser.add_argument("listen", metavar="LISTEN_URI", help="where the source connects: "
                        "tcp:HOST:PORT or unix:PATH")
    parser.add_argument("dest", metavar="DEST_URI", help="the destination: tcp:HOST:PORT or "
                        "unix:PATH (also exec:/file: with --out-channels 0)")
    parser.add_argument("--profile", required=True, choices=sorted(PROFILES),
                        help="the source's wire profile (qemu-7.2: a 7.2 machine type, "
                             "also on QEMU 10; qemu-10: a 10.x machine type)")
    parser.add_argument("--channels", type=channels_arg(minimum=0), default=0, metavar="N",
                        help="the source's multifd-channels (0 = multifd off, the default)")
    parser.add_argument("--compression", default="none", choices=COMPRESSIONS,
                        help="the source's multifd-compression")
    parser.add_argument("--uuid", default=None, help=UUID_HELP)
    parser.add_argument("--out-profile", choices=sorted(PROFILES), default=None,
                        help="the destination's profile (default: --profile)")
    parser.add_argument("--out-channels", type=channels_arg(minimum=0), default=None,
                        metavar="M", help="the destination's multifd-channels (default: "
                        "--channels)")
    parser.add_argument("--out-compression", choices=COMPRESSIONS, default=None,
                        help="the destination's multifd-compression (default: --compression)")
    parser.add_argument("--out-uuid", default=None, help="the destination's -uuid (default: "
                        "as --uuid)")
    add_tls_arguments(parser)
    parser.add_argument("--out-tls-creds", metavar="DIR", default="",
                        help="TLS towards the destination (default: clear, whatever the "
                             "source side uses); DIR as --tls-creds")
    parser.add_argument("--out-tls-hostname", metavar="NAME", default="",
                        help="name the destination's certificate must carry (default: "
                             "the DEST_URI host)")
    parser.add_argument("--record", metavar="IMAGE", default=None,
                        help="also write the migration as IMAGE (a single-stream QEMU "
                             "migration file: `-incoming \"exec:cat IMAGE\"`, `multifd "
                             "inspect`)")
    parser.add_argument("--inject-fault", metavar="SPEC", default=None,
                        help="SIDE:KIND[:N]@PHASE, SIDE in|out, KIND reset-channel:N, "
                             "stall-channel:N or close-main, PHASE setup, iterate, "
                             "switchover, device-state or completion")
    parser.add_argument("--passthrough", choices=("auto", "off"), default="auto",
                        help="auto: forward packets byte for byte when both sides have the "
                             "same profile, channels and compression; off: always re-encode")
    add_policy_options(parser, peer_wait=DEFAULT_TIMEOUT_S)  # --idle-timeout: every wait
    add_timeline_options(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    parser.add_argument("--no-progress", action="store_true",
                        help="no live progress lines (they are shown only on a terminal)")


def _sides(args: argparse.Namespace) -> tuple[RelaySide, RelaySide]:
    uuid = parse_uuid(args.uuid) if args.uuid else None
    out_uuid = parse_uuid(args.out_uuid) if args.out_uuid else uuid
    inp = RelaySide(args.listen, get_profile(args.profile), args.channels, args.compression,
                    uuid, TlsConfig.from_args(args))
    out_tls = (TlsConfig(Path(args.out_tls_creds), args.out_tls_hostname, parse_authz(""))
               if args.out_tls_creds else None)
    out = RelaySide(
        args.dest, get_profile(args.out_profile or args.profile),
        args.channels if args.out_channels is None else args.out_channels,
        args.out_compression or args.compression, out_uuid, out_tls)
    return inp, out


def _listening(address: str) -> None:
    print(f"listening on {address}", file=sys.stderr, flush=True)


class _Progress:
    """One rich line per side while the relay runs (stderr, only on a terminal)."""

    def __init__(self) -> None:
        self.relay: Relay | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, relay: Relay) -> None:
        self.relay = relay
        self._thread = threading.Thread(target=self._run, name="relay-progress", daemon=True)
        self._thread.start()

    def _lines(self) -> Any:
        from rich.text import Text

        r = self.relay
        assert r is not None
        t = Text()
        for name, st, side in (("in ", r.in_stats, r.inp), ("out", r.out_stats, r.out)):
            mib = (st.main_bytes + sum(st.chan_bytes)) / (1 << 20)
            t.append(f"{name} {side.profile.name} {side.channels}ch {side.compression}: "
                     f"{mib:9.1f} MiB  pages {st.normal_pages} + {st.zero_pages} zero  "
                     f"syncs {st.syncs}  phase {r.phase or 'connecting'}\n")
        return t

    def _run(self) -> None:
        from rich.console import Console
        from rich.live import Live

        with Live(self._lines(), console=Console(stderr=True), transient=True,
                  refresh_per_second=4) as live:
            while not self._stop.wait(PROGRESS_S):
                live.update(self._lines())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)


def summary(relay: Relay, result: RelayResult | None, error: RelayError | None,
            elapsed_ms: float) -> dict[str, Any]:
    """The `--json` object (also for a failed relay: status failed, the counters so far)."""
    from multifd.qemu.relay import peak_rss_mib

    total_ms = result.total_time_ms if result else elapsed_ms
    return {
        "status": "completed" if error is None else "failed",
        "error": None if error is None else str(error),
        "in": relay.in_stats.to_json(relay.inp, total_ms / 1000),
        "out": relay.out_stats.to_json(relay.out, total_ms / 1000),
        "passes": relay.passes,
        "passthrough": relay.passthrough,
        "total_time_ms": round(total_ms, 1),
        "relay_added_ms": round(result.relay_added_ms, 1) if result else None,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "recorded": result.recorded if result else None,
    }


class _Timeline:
    """--timeline / --timeline-json: bytes from the source, passes, phase, and each side's
    channel busy time ("source": the relay's channels facing the source, "destination":
    those facing the destination)."""

    def __init__(self, relay: Relay) -> None:
        from multifd.migration.timeline import Sampler, Timeline

        self.relay = relay
        self.timeline = Timeline()
        self._last: tuple[float, int] | None = None
        self._sampler = Sampler(self._sample).start()

    def _sample(self) -> None:
        r = self.relay
        got = r.in_stats.main_bytes + sum(r.in_stats.chan_bytes)
        now = self.timeline.now_ms()
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = (got - self._last[1]) / (1 << 20) / ((now - self._last[0]) / 1000)
        self._last = (now, got)
        self.timeline.sample(remaining=None, transferred=got, throughput=round(rate, 1),
                             dirty_rate=0.0, **{"pass": r.passes}, phase=r.phase or "setup")
        for side, st in (("source", r.in_stats), ("destination", r.out_stats)):
            self.timeline.channels(side, [{"busy_ns": int(b * 1e9)} for b in st.chan_busy_s])

    def finish(self, args: argparse.Namespace) -> list[str]:
        self._sampler.stop()
        self._sample()  # the end state, however short the migration
        return write_timeline(args, self.timeline.to_dict())


def run(args: argparse.Namespace) -> int:
    if (why := check_timeline_options(args)) is not None:
        print(f"error: {why}", file=sys.stderr)
        return 1
    try:
        inp, out = _sides(args)
        fault = parse_relay_fault(args.inject_fault) if args.inject_fault else None
        wait, deadline = peer_timeouts(args, DEFAULT_TIMEOUT_S, None)
        relay = Relay(inp, out, timeout=wait, record=args.record, fault=fault,
                      passthrough=None if args.passthrough == "auto" else False,
                      on_listen=_listening)
    except (PeerError, RelayError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    progress = _Progress() if sys.stderr.isatty() and not args.no_progress else None
    if progress is not None:
        progress.start(relay)
    timeline = _Timeline(relay) if wants_timeline(args) else None
    t0 = time.monotonic()
    result: RelayResult | None = None
    error: RelayError | None = None
    try:
        with completion_deadline(deadline, "relayed migration"):
            result = relay.run()
    except RelayError as e:
        error = e
    except PolicyError as e:  # the sockets are closed: both sides fail
        error = RelayError("relay", str(e))
    finally:
        if progress is not None:
            progress.stop()
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary(relay, result, error, (time.monotonic() - t0) * 1000)))
    elif result is not None:
        st = result.out
        print(f"relayed {st.normal_pages} pages + {st.zero_pages} zero pages in "
              f"{result.passes} passes, {result.total_time_ms:.0f} ms (relay added "
              f"{result.relay_added_ms:.0f} ms, peak RSS {result.peak_rss_mib:.0f} MiB)")
    rc = 1 if error is not None else 0
    if timeline is not None:
        for line in timeline.finish(args):
            print(f"error: {line}", file=sys.stderr)
            rc = 1
    return rc
