"""Migration status with QEMU's names, and the state machine that guards its transitions.

Rules kept here (qemu-reference.md §7.3):
* source: none → setup → [wait-unplug →] active → [pre-switchover →] device → completed;
  a QEMU 7.2-style run may go active → completed directly.
* destination: none → setup → active → completed.
* cancel: any non-final status → cancelling → cancelled.
* error: any non-final status except cancelling → failed (a cancel in progress wins).
* completed, failed and cancelled are final; a new migration starts again at setup.
Listeners get every new status in order (the QMP layer turns them into MIGRATION events);
they are called outside the state lock, serialised so events never reorder.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable

__all__ = ["FINAL_STATUSES", "IllegalTransition", "MigrationStatus", "StatusMachine"]

log = logging.getLogger(__name__)


class MigrationStatus(enum.StrEnum):
    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"


S = MigrationStatus
FINAL_STATUSES = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})

_FORWARD: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    S.NONE: frozenset({S.SETUP}),
    S.SETUP: frozenset({S.ACTIVE, S.WAIT_UNPLUG}),
    S.WAIT_UNPLUG: frozenset({S.ACTIVE}),
    S.ACTIVE: frozenset({S.PRE_SWITCHOVER, S.DEVICE, S.COMPLETED, S.POSTCOPY_ACTIVE}),
    S.PRE_SWITCHOVER: frozenset({S.DEVICE}),
    S.DEVICE: frozenset({S.COMPLETED, S.POSTCOPY_ACTIVE}),
    S.POSTCOPY_ACTIVE: frozenset({S.COMPLETED, S.POSTCOPY_PAUSED}),
    S.POSTCOPY_PAUSED: frozenset({S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER}),
    S.POSTCOPY_RECOVER_SETUP: frozenset({S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED}),
    S.POSTCOPY_RECOVER: frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    S.COLO: frozenset({S.COMPLETED}),
    # A final status may only start a new migration.
    S.COMPLETED: frozenset({S.SETUP}),
    S.FAILED: frozenset({S.SETUP}),
    S.CANCELLED: frozenset({S.SETUP}),
}


def _allowed(old: MigrationStatus, new: MigrationStatus) -> bool:
    if new in _FORWARD[old]:
        return True
    if old in FINAL_STATUSES or old is S.NONE:
        return False
    if new is S.CANCELLING:
        return old is not S.CANCELLING
    if new is S.FAILED:
        return old is not S.CANCELLING
    return False


class IllegalTransition(ValueError):
    """A status change the migration state machine does not allow."""

    def __init__(self, old: MigrationStatus, new: MigrationStatus) -> None:
        super().__init__(f"illegal migration status change {old} -> {new}")
        self.old = old
        self.new = new


Listener = Callable[[MigrationStatus], None]


class StatusMachine:
    """Thread-safe migration status with listeners, waits and the error text."""

    def __init__(self, initial: MigrationStatus = S.NONE) -> None:
        self._status = MigrationStatus(initial)
        self._error: str | None = None
        self._cond = threading.Condition(threading.Lock())
        self._notify_lock = threading.RLock()
        self._listeners: list[Listener] = []

    @property
    def status(self) -> MigrationStatus:
        with self._cond:
            return self._status

    current = status

    @property
    def error(self) -> str | None:
        """The error-desc text of a failed migration (None when there is none)."""
        with self._cond:
            return self._error

    @error.setter
    def error(self, text: str | None) -> None:
        with self._cond:
            self._error = text

    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    def is_running(self) -> bool:
        """True between setup and a final status (QEMU's migration_is_running)."""
        st = self.status
        return st is not S.NONE and st not in FINAL_STATUSES

    def add_listener(self, fn: Listener) -> None:
        with self._notify_lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        with self._notify_lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def set(self, new: MigrationStatus | str, error: str | None = None) -> MigrationStatus:
        """Move to ``new`` (raising `IllegalTransition` if not allowed); return the old status.

        ``error`` records the error-desc (used with ``failed``). Starting a new migration
        (``setup``) clears the previous error.
        """
        new = MigrationStatus(new)
        with self._notify_lock:
            with self._cond:
                old = self._status
                if not _allowed(old, new):
                    raise IllegalTransition(old, new)
                self._apply(new, error)
            self._notify(new)
        return old

    def try_set(self, expected: MigrationStatus | str, new: MigrationStatus | str) -> bool:
        """Compare-and-set (QEMU's migrate_set_state): change only if still ``expected``."""
        expected, new = MigrationStatus(expected), MigrationStatus(new)
        with self._notify_lock:
            with self._cond:
                if self._status is not expected or not _allowed(expected, new):
                    return False
                self._apply(new, None)
            self._notify(new)
        return True

    def cancel(self) -> bool:
        """Move a running migration to cancelling; False when nothing can be cancelled."""
        with self._notify_lock:
            with self._cond:
                if not _allowed(self._status, S.CANCELLING):
                    return False
                self._apply(S.CANCELLING, None)
            self._notify(S.CANCELLING)
        return True

    def fail(self, error: str) -> bool:
        """Record ``error`` and move to failed where allowed (not while cancelling)."""
        with self._notify_lock:
            with self._cond:
                if self._error is None:
                    self._error = error
                if not _allowed(self._status, S.FAILED):
                    return False
                self._apply(S.FAILED, error)
            self._notify(S.FAILED)
        return True

    def wait_for(
        self, statuses: Iterable[MigrationStatus | str] | MigrationStatus | str, timeout: float
    ) -> MigrationStatus | None:
        """Wait until the status is one of ``statuses``; return it, or None after ``timeout``."""
        if isinstance(statuses, str):
            wanted = {MigrationStatus(statuses)}
        else:
            wanted = {MigrationStatus(s) for s in statuses}
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._status not in wanted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._status

    def _apply(self, new: MigrationStatus, error: str | None) -> None:
        if new is S.SETUP:
            self._error = None
        if error is not None:
            self._error = error
        self._status = new
        self._cond.notify_all()

    def _notify(self, new: MigrationStatus) -> None:
        for fn in list(self._listeners):
            try:
                fn(new)
            except Exception:
                log.exception("migration status listener %r failed", fn)

    def __repr__(self) -> str:
        return f"StatusMachine({self.status})"
