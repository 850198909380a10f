"""The timeout-policy options every migrating command takes, as migration parameters.

``add_policy_options(parser)`` adds ``--progress-timeout``, ``--timeout``,
``--timeout-per-gib``, ``--timeout-strategy`` and ``--idle-timeout``;
``policy_settings(args)`` maps what was given to ``migrate-set-parameters`` names
(x-progress-timeout, x-completion-timeout, x-completion-timeout-per-gib,
x-timeout-strategy, x-idle-timeout; see ``multifd.migration.policy``), leaving the
parameters' defaults alone for options not given; ``policy_argv(args)`` gives them back as
arguments for a child process.

The QEMU-peer commands (`incoming`, `migrate`: one pass over a recorded image, nothing to
converge) take the same options with the same meaning where it exists: `peer_timeouts`
turns them into the peer's bound on every wait (--idle-timeout, default 60 s, the old
``--timeout``; a --progress-timeout shortens it, since in one pass "remaining goes down"
is "data moves") and a deadline for the whole transfer (--timeout + --timeout-per-gib),
which `completion_deadline` enforces; --timeout-strategy can only be cancel there.
Module-level imports stay light (the policy module only needs the standard library):
commands import this module while building their parser.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from multifd.migration.policy import STRATEGIES, PolicyError

__all__ = ["POLICY_OPTIONS", "add_policy_options", "completion_deadline", "peer_timeouts",
           "policy_argv", "policy_settings"]

# option dest -> (flag, parameter, help)
POLICY_OPTIONS: dict[str, tuple[str, str, str]] = {
    "progress_timeout": ("--progress-timeout", "x-progress-timeout",
                         "fail when the remaining bytes have not gone down for S seconds "
                         "(0 = off, the default)"),
    "timeout": ("--timeout", "x-completion-timeout",
                "completion timeout, seconds: past it --timeout-strategy acts "
                "(0 = off, the default); added to --timeout-per-gib"),
    "timeout_per_gib": ("--timeout-per-gib", "x-completion-timeout-per-gib",
                        "completion timeout per GiB of RAM, seconds, added to --timeout "
                        "(0 = off, the default)"),
    "timeout_strategy": ("--timeout-strategy", "x-timeout-strategy",
                         "at the completion timeout: cancel (fail, the source keeps running; "
                         "default), switchover (now, above the downtime limit) or throttle "
                         "(auto-converge from then on)"),
    "idle_timeout": ("--idle-timeout", "x-idle-timeout",
                     "fail when the peer stays connected but moves nothing on any channel "
                     "for S seconds (default 30, 0 = off)"),
}


def _seconds(text: str) -> int:
    """A whole number of seconds >= 0 (the parameters are integers, as QEMU's are)."""
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected whole seconds >= 0, got {text!r}")
    return value


def add_policy_options(parser: argparse.ArgumentParser, *,
                       peer_wait: float | None = None) -> None:
    """Add the timeout-policy options (all default to None: the parameter's default).

    `peer_wait`: a one-pass QEMU-peer command (see the module docstring) whose waits are
    bounded by that many seconds unless --idle-timeout says otherwise; its
    --timeout-strategy offers only cancel."""
    group = parser.add_argument_group("timeout policies")
    for dest, (flag, _param, text) in POLICY_OPTIONS.items():
        if dest == "timeout_strategy":
            group.add_argument(flag, dest=dest, default=None,
                               choices=STRATEGIES if peer_wait is None else ("cancel",),
                               help=text if peer_wait is None else
                               "cancel: an image transfer has nothing to switch over or "
                               "throttle")
            continue
        if dest == "idle_timeout" and peer_wait is not None:
            text = (f"bound on every wait for the peer, seconds (default {peer_wait:g}, "
                    "0 = none)")
        group.add_argument(flag, dest=dest, type=_seconds, default=None, metavar="S",
                           help=text)


def policy_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The parameters the given options set (a ``migrate-set-parameters`` argument)."""
    return {param: getattr(args, dest) for dest, (_flag, param, _text) in POLICY_OPTIONS.items()
            if getattr(args, dest, None) is not None}


def policy_argv(args: argparse.Namespace) -> list[str]:
    """The given options as command-line arguments again (for a child process)."""
    argv: list[str] = []
    for dest, (flag, _param, _text) in POLICY_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is not None:
            argv += [flag, str(value)]
    return argv


def peer_timeouts(args: argparse.Namespace, default_wait: float,
                  ram_bytes: int | None) -> tuple[float, float]:
    """(bound on every wait, deadline for the whole transfer, 0 = none) for a QEMU-peer
    command (see the module docstring); `ram_bytes` None: not known before the transfer
    (then --timeout-per-gib raises ValueError)."""
    wait = float(args.idle_timeout if args.idle_timeout is not None else default_wait)
    if args.progress_timeout:
        wait = min(wait, args.progress_timeout) if wait else args.progress_timeout
    wait = wait or 1e6  # 0 = off: in effect unbounded
    deadline = float(args.timeout or 0)
    if args.timeout_per_gib:
        if ram_bytes is None:
            raise ValueError("--timeout-per-gib needs the RAM size, unknown before the "
                             "source sends it: use --timeout")
        deadline += args.timeout_per_gib * ram_bytes / (1 << 30)
    return wait, deadline


@contextlib.contextmanager
def completion_deadline(seconds: float, what: str) -> Iterator[None]:
    """Fail the body with PolicyError (x-completion-timeout) after `seconds` (0: never).

    A timer signal interrupts whatever wait the main thread is in (socket, lock), so the
    transfer unwinds through its own cleanup; only the main thread can take it.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    def expired(_sig: int, _frame: object) -> None:
        raise PolicyError(f"x-completion-timeout: the {what} did not complete within "
                          f"{seconds:g} s (--timeout)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
