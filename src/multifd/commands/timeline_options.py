"""`--timeline FILE.png` and `--timeline-json FILE`: one definition for every command
that migrates (demo, migrate, incoming, relay).

`add_timeline_options(parser)` adds the flags; `check_timeline_options(args)` says before
anything runs when the picture cannot be drawn (matplotlib missing: the optional extra
``multifd[plot]``); `write_timeline(args, doc)` writes what was asked for from a timeline
document (migration/timeline.py). The plotting module is imported only to draw, so the
CLI never imports matplotlib for a command that does not draw.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Any

__all__ = ["PeerRecorder", "add_timeline_options", "check_timeline_options", "wants_timeline",
           "write_timeline"]

NO_MATPLOTLIB = ("--timeline needs matplotlib, which is not installed: install the plot "
                 "extra (pip install 'multifd[plot]'); --timeline-json FILE writes the same "
                 "samples without it")


def add_timeline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeline", metavar="FILE.png",
                        help="draw the migration's timeline: remaining bytes, throughput "
                             "and dirty rate, passes, switchover and downtime, and each "
                             "multifd channel's busy time on each side (needs matplotlib: "
                             "multifd[plot])")
    parser.add_argument("--timeline-json", metavar="FILE",
                        help="write the timeline's samples as JSON (no matplotlib needed)")


def wants_timeline(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "timeline", None) or getattr(args, "timeline_json", None))


def check_timeline_options(args: argparse.Namespace) -> str | None:
    """The reason the picture cannot be drawn, or None; ask before migrating."""
    if getattr(args, "timeline", None) and not _have_matplotlib():
        return NO_MATPLOTLIB
    return None


def _have_matplotlib() -> bool:
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


def write_timeline(args: argparse.Namespace, doc: dict[str, Any]) -> list[str]:
    """Write the JSON and/or the picture asked for; returns error lines (empty: done)."""
    errors: list[str] = []
    path = getattr(args, "timeline_json", None)
    if path:
        try:
            with open(path, "w") as f:
                json.dump(doc, f)
        except OSError as exc:
            errors.append(f"cannot write {path}: {exc.strerror or exc}")
    png = getattr(args, "timeline", None)
    if png:
        try:
            from multifd.commands.timeline_plot import draw
        except ImportError:
            errors.append(NO_MATPLOTLIB)
            return errors
        try:
            draw(doc, png)
        except OSError as exc:
            errors.append(f"cannot write {png}: {exc.strerror or exc}")
    return errors


class PeerRecorder:
    """The timeline of `multifd incoming` / `migrate` (qemu/peer.py): pass `observe` to
    receive_from_qemu / migrate_to_qemu; a `Sampler` then reads the transfer's byte count
    and its channels' busy time until `write(args)` writes what was asked for.

    ``side`` is ours: "destination" for incoming, "source" for migrate. Records only
    when a timeline was asked for, so the plain commands run no sampler thread.
    """

    def __init__(self, args: argparse.Namespace, side: str) -> None:
        self.args = args
        self.side = side
        self._transfer: Any = None
        self._sampler: Any = None
        self._last: tuple[float, int] | None = None
        self.timeline: Any = None
        if wants_timeline(args):
            from multifd.migration.timeline import Sampler, Timeline

            self.timeline = Timeline()
            self._sampler = Sampler(self._sample).start()

    def observe(self, transfer: Any) -> None:
        """The peer module's _Incoming / _Outgoing, once it exists."""
        self._transfer = transfer

    def _sample(self) -> None:
        t = self._transfer
        if t is None:
            return
        core = getattr(t, "sender", None) or getattr(t, "receiver", None)
        stats = core.channel_stats() if core is not None else []
        stats = list(stats.values()) if isinstance(stats, dict) else stats
        wire = sum(s.get("wire_bytes", s.get("wire_bytes_ram", 0)) for s in stats)
        main = getattr(getattr(t, "main", None), "bytes_written", None)
        if main is None:
            main = getattr(getattr(t, "rec", None), "bytes_in", 0)
        sent = int(main) + int(wire)
        now = self.timeline.now_ms()
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = (sent - self._last[1]) / (1 << 20) / ((now - self._last[0]) / 1000)
        self._last = (now, sent)
        image = getattr(t, "image", None)
        remaining = None
        if image is not None:  # migrate: every page of the image goes once
            pages = sum(b.num_pages for b in image.blocks.values())
            page = next(iter(image.blocks.values())).page_size if image.blocks else 4096
            remaining = max(0, pages - t.normal - t.zero) * page
        self.timeline.sample(remaining=remaining, transferred=sent,
                             throughput=round(rate, 1), dirty_rate=0.0,
                             **{"pass": 1}, phase="transfer")
        if stats:  # from the channels' connection on: busy % is of the transfer's time
            self.timeline.channels(self.side, stats)

    def finish(self) -> int:
        """Stop sampling, write --timeline / --timeline-json: the command's exit status
        (1 with an ``error:`` line per file that could not be written)."""
        if self._sampler is None:
            return 0
        self._sampler.stop()
        errors = write_timeline(self.args, self.timeline.to_dict())
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        return 1 if errors else 0
