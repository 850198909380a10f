"""The ``multifd`` console script: a thin argparse frame over ``multifd.commands.<name>``.

Each command lives in its own module providing ``configure(parser)`` and
``run(args) -> int``. Only the chosen command's module is imported, so a missing or broken
command never takes the others down. Errors from a command print ``error: <message>``
and exit 1; ``MULTIFD_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from types import ModuleType

from multifd import __version__

__all__ = ["COMMANDS", "MAX_CHANNELS", "channels_arg", "main"]

MAX_CHANNELS = 255  # QEMU's multifd-channels: 1..255

# name -> one-line help (shown without importing the command modules)
COMMANDS: dict[str, str] = {
    "demo": "migrate a live Python workload between two local processes and verify it",
    "migrate": "send a recorded image to a QEMU destination (multifd on or off)",
    "incoming": "be a real QEMU's migration destination and save an image",
    "serve": "run a machine with a QMP control socket",
    "inspect": "describe a recorded QEMU migration stream or image",
    "relay": "relay a live migration between two real QEMUs, decoding and transcoding it",
    "convert": "convert a VM image between a QEMU stream file and a mapped-ram file",
}


class CommandUnavailable(Exception):
    pass


def channels_arg(minimum: int = 1) -> Callable[[str], int]:
    """An argparse ``type`` for a channel count, so a bad one is a usage error (exit 2)
    naming the range, not a failure deep in the command. ``minimum`` 0 means a command
    where 0 switches multifd off."""

    def parse(text: str) -> int:
        try:
            n = int(text, 10)
        except ValueError:
            n = None
        if n is None or not minimum <= n <= MAX_CHANNELS:
            off = " (0 = multifd off)" if minimum == 0 else ""
            raise argparse.ArgumentTypeError(
                f"expected an integer from {minimum} to {MAX_CHANNELS}{off}, as QEMU's "
                f"multifd-channels (1..{MAX_CHANNELS}); got {text!r}")
        return n

    parse.__name__ = "channels"  # argparse names the type in some messages
    return parse


def _debug() -> bool:
    return os.environ.get("MULTIFD_DEBUG", "") not in ("", "0")


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="multifd",
        description="QEMU-compatible multifd live migration in Python.",
    )
    parser.add_argument("--version", action="version", version=f"multifd {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {
        name: sub.add_parser(name, help=text, description=text) for name, text in COMMANDS.items()
    }
    return parser, subparsers


def _find_command(argv: Sequence[str]) -> str | None:
    """The first positional token: top-level options take no values, so this is the command."""
    for tok in argv:
        if tok == "--":
            return None
        if not tok.startswith("-"):
            return tok
    return None


def _load(name: str) -> ModuleType:
    modname = f"multifd.commands.{name}"
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name in (modname, "multifd.commands"):
            raise CommandUnavailable(f"command {name} is not available in this build") from exc
        raise CommandUnavailable(f"command {name} cannot be loaded: {exc}") from exc
    except Exception as exc:
        raise CommandUnavailable(f"command {name} cannot be loaded: {exc}") from exc
    if not callable(getattr(module, "configure", None)) or not callable(
        getattr(module, "run", None)
    ):
        raise CommandUnavailable(f"command {name} is not available in this build")
    return module


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (never raises for command errors)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = _build_parser()
    name = _find_command(args_list)
    module: ModuleType | None = None
    if name in COMMANDS:
        try:
            module = _load(name)
            module.configure(subparsers[name])
        except CommandUnavailable as exc:
            if _debug():
                traceback.print_exc()
            return _error(str(exc))
        except Exception as exc:
            if _debug():
                traceback.print_exc()
            return _error(f"command {name} cannot be loaded: {exc}")
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if module is None:
        parser.print_usage(sys.stderr)
        return _error("a command is required (one of: " + ", ".join(COMMANDS) + ")")
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        rc = module.run(args)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        if _debug():
            traceback.print_exc()
        message = str(exc) or type(exc).__name__
        return _error(message)
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
