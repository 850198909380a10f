"""Save handlers: one interface for everything that migrates (QEMU's SaveVMHandlers).

RAM, main-stream devices, live-iterating devices, multifd device state and QEMU's
`globalstate` are all handlers in one registry; the source and destination drive them
without knowing what they carry (migration/savevm.c in QEMU):

    source                                        destination
    setup()            every handler, in order    load_setup()   every handler
    iterate(False)     live handlers, each pass   load_state()   per section body or record
    pending()          summed for convergence     switchover_start()  (MIG_CMD_SWITCHOVER_START)
    pause; iterate(True) until done (live first,  load_finish()  after EOF, before running
      then the rest: QEMU's iterable, then
      non-iterable sections)
    cleanup()          always                     load_cleanup() always

There is no completion hook: the call to `iterate(final=True)` that returns True is the
handler's completion. A handler that waits for asynchronous work (a device-state producer
on the engine's worker pool) returns False until it is finished, so one slow handler never
blocks the others' final sections.

Order: QEMU sorts handlers by priority (higher first), then registration; section ids are
given in registration order. A new kind of state is a new handler module registered here.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from multifd.wire.constants import SectionType
from multifd.wire.errors import BadName, Mismatch
from multifd.wire.stream import SectionFooter, SectionHeader, encode_record

if TYPE_CHECKING:
    from multifd.migration.mainstream import MainStreamWriter

__all__ = [
    "MIG_PRI_DEFAULT",
    "LoadHandler",
    "LoadHandlers",
    "SaveHandler",
    "SaveHandlers",
]

MIG_PRI_DEFAULT = 0  # QEMU's MigrationPriority: higher values go first


class SaveHandler(abc.ABC):
    """Source side of one section (RAM, a device, device state over multifd, ...)."""

    idstr: str
    instance_id: int = 0
    version_id: int = 1
    priority: int = MIG_PRI_DEFAULT
    section_id: int = -1  # given by SaveHandlers.register
    main: MainStreamWriter

    def is_live(self) -> bool:
        """Takes part in the live phase (START/PART/END sections); else one FULL section
        at switchover (QEMU's non-iterable vmstate)."""
        return False

    def setup(self) -> None:
        """Before the first iteration: a live handler writes its START section here."""
        return None

    def pending(self, exact: bool = False) -> tuple[int, int]:
        """(must_precopy, can_postcopy) bytes still to send. ``exact`` may cost work (RAM
        syncs its dirty bitmap); it is asked only when the estimate says we could stop."""
        return 0, 0

    @abc.abstractmethod
    def iterate(self, final: bool) -> bool:
        """Send some state; True when done. ``final`` (machine paused): called until it
        returns True, which is this handler's completion."""

    def cleanup(self) -> None:
        """After the migration, completed or failed: stop tracking, drop resources."""
        return None

    def vmdesc(self) -> dict[str, Any] | None:
        """This section's VMDESCRIPTION entry, if it wrote a FULL section."""
        return None

    def stats(self) -> dict[str, int]:
        """Counters for reports (e.g. device_state_bytes); merged over handlers."""
        return {}

    # -- framing ---------------------------------------------------------------------------
    def section_header(self, kind: SectionType) -> None:
        """START/FULL headers name the section; PART/END carry only its id."""
        if kind in (SectionType.START, SectionType.FULL):
            hdr = SectionHeader(kind, self.section_id, self.idstr, self.instance_id,
                                self.version_id)
        else:
            hdr = SectionHeader(kind, self.section_id)
        self.main.write(encode_record(hdr))

    def section_footer(self) -> None:
        self.main.write(encode_record(SectionFooter(self.section_id)))

    def write_section(self, kind: SectionType, parts: Iterable[Any]) -> None:
        self.section_header(kind)
        for part in parts:
            self.main.write(part)
        self.section_footer()


class SaveHandlers:
    """The source's registry: registration gives section ids, priority gives the order."""

    def __init__(self, main: MainStreamWriter) -> None:
        self.main = main
        self._handlers: list[SaveHandler] = []

    def register(self, handler: SaveHandler) -> SaveHandler:
        handler.section_id = len(self._handlers)
        handler.main = self.main
        self._handlers.append(handler)
        return handler

    def __iter__(self) -> Iterator[SaveHandler]:
        """In QEMU's order: priority (higher first), then registration (a stable sort)."""
        return iter(sorted(self._handlers, key=lambda h: -h.priority))

    def __len__(self) -> int:
        return len(self._handlers)

    def live(self) -> list[SaveHandler]:
        return [h for h in self if h.is_live()]

    def pending(self, exact: bool = False) -> int:
        """Bytes every live handler still has to send (no postcopy: both kinds count)."""
        return sum(sum(h.pending(exact)) for h in self.live())

    def iterate(self) -> None:
        """One live-phase round: every live handler sends some of what it has."""
        for h in self.live():
            h.iterate(final=False)

    def switchover(self, check: Callable[[list[SaveHandler]], None] | None = None) -> None:
        """The machine is paused: iterate(final=True) until every handler is done, the
        iterable (live) handlers first, then the rest (QEMU's complete_precopy order).
        ``check(left)`` runs before every round with the handlers still to iterate
        (cancellation, fault-injection points)."""
        for group in (self.live(), [h for h in self if not h.is_live()]):
            left = group
            while left:
                if check is not None:
                    check(left)
                left = [h for h in left if not h.iterate(final=True)]

    def cleanup(self) -> None:
        for h in self._handlers:
            h.cleanup()

    def vmdesc(self) -> list[dict[str, Any]]:
        return [d for h in self._handlers if (d := h.vmdesc()) is not None]

    def stats(self) -> dict[str, int]:
        return _merge(h.stats() for h in self._handlers)


def _merge(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return out


class LoadHandler(abc.ABC):
    """Destination side of one section kind."""

    idstr: str
    instance_id: int = 0
    version_id: int = 1

    def load_setup(self) -> None:
        """Before the first section arrives."""
        return None

    @abc.abstractmethod
    def load_state(self, kind: SectionType, version_id: int, data: Any) -> None:
        """One section body (or, for RAM, one decoded record of its body)."""

    def switchover_start(self) -> None:
        """MIG_CMD_SWITCHOVER_START: the source has paused."""
        return None

    def load_finish(self) -> None:
        """After EOF, before the machine may run: wait for asynchronous loads."""
        return None

    def load_cleanup(self) -> None:
        """Always, at the end (completed or failed)."""
        return None

    def stats(self) -> dict[str, int]:
        """Counters for reports, merged over handlers (as on the save side)."""
        return {}


class LoadHandlers:
    """The destination's registry: sections are routed by (idstr, instance_id) at START or
    FULL, then by section id; every lookup is checked and names what was not found."""

    def __init__(self) -> None:
        self._by_name: dict[tuple[str, int], LoadHandler] = {}
        self._by_section: dict[int, tuple[LoadHandler, int]] = {}

    def register(self, handler: LoadHandler) -> LoadHandler:
        key = (handler.idstr, handler.instance_id)
        if key in self._by_name:
            raise ValueError(f"two load handlers for {key[0]}/{key[1]}")
        self._by_name[key] = handler
        return handler

    def __iter__(self) -> Iterator[LoadHandler]:
        return iter(list(self._by_name.values()))

    def stats(self) -> dict[str, int]:
        return _merge(h.stats() for h in self)

    def open_section(self, section_id: int, idstr: str, instance_id: int,
                     version_id: int) -> LoadHandler:
        """A START or FULL header: find the handler (version checked), remember the id."""
        h = self._by_name.get((idstr, instance_id))
        if h is None:
            raise BadName("unknown section", field="idstr", value=f"{idstr}/{instance_id}")
        if version_id > h.version_id:
            raise Mismatch(f"section {idstr} version {version_id} is newer than ours "
                           f"({h.version_id})")
        self._by_section[section_id] = (h, version_id)
        return h

    def section(self, section_id: int) -> tuple[LoadHandler, int]:
        """A PART or END header (or a body): the handler its START named."""
        try:
            return self._by_section[section_id]
        except KeyError:
            raise Mismatch("section body for an unknown section", field="section_id",
                           value=section_id) from None
