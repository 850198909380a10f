"""Typed decoding errors for the sans-IO wire layer.

Every error names what was wrong, the field, the value seen and the byte offset in the
stream where the record holding it starts, so a CLI can print one clear line and a
receiver can fail a migration with a reason an operator understands.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TypeVar

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class WireError(Exception):
    """A stream violates QEMU's migration format (or a caller-imposed limit)."""

    def __init__(
        self,
        what: str,
        *,
        field: str | None = None,
        value: object = None,
        offset: int | None = None,
    ) -> None:
        self.what = what
        self.field = field
        self.value = value
        self.offset = offset
        super().__init__(self.describe())

    def describe(self) -> str:
        """One line: what, then field=value when known (the offset is added by callers)."""
        text = self.what
        if self.field is not None:
            v = self.value
            shown = hex(v) if isinstance(v, int) and not isinstance(v, bool) and v > 9 else v
            text += f" ({self.field}={shown!r})" if isinstance(shown, bytes) else (
                f" ({self.field}={shown})"
            )
        return text

    def __str__(self) -> str:
        text = self.describe()
        if self.offset is not None:
            text += f", at byte {self.offset}"
        return text

    def at(self, offset: int) -> WireError:
        """Attach a stream offset if none is set yet; returns self for `raise e.at(n)`."""
        if self.offset is None:
            self.offset = offset
        return self


class BadMagic(WireError):
    """A magic number (QEVM, multifd 0x11223344) is wrong."""


class UnsupportedVersion(WireError):
    """A version field has a value this implementation does not speak."""


class BadRecordType(WireError):
    """An unknown section type byte, command id or RAM flag combination."""


class BadLength(WireError):
    """A length field is impossible, inconsistent, or above the caller's limit."""


class BadCount(WireError):
    """A page count is above page_count or inconsistent with other counts."""


class BadOffset(WireError):
    """A page offset is unaligned or outside its RAM block."""


class BadName(WireError):
    """A block, section or device name is malformed or unknown."""


class UnknownName(BadName):
    """The stream refers to a RAM block, section or device it never declared."""


def lookup(
    table: Mapping[_K, _V],
    key: _K,
    *,
    kind: str,
    record: str,
    field: str = "name",
    offset: int | None = None,
) -> _V:
    """``table[key]`` for a name (or id) taken from the stream, failing as a WireError.

    A decoder that indexes its tables with names the peer sent turns a hostile stream into
    a KeyError (a crash: exit 1, no offset, no file); this raises UnknownName instead,
    saying which ``record`` named which missing ``kind`` ("RAM block", "section", ...).
    """
    try:
        return table[key]
    except KeyError:
        raise UnknownName(f"{record} names an unknown {kind}", field=field, value=key,
                          offset=offset) from None


class Truncated(WireError):
    """The stream ended in the middle of a record."""


class Mismatch(WireError):
    """A value disagrees with what the peer or configuration established earlier."""
