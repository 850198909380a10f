"""Migration parameters and capabilities with QEMU's names, defaults and validation.

Names, defaults and ranges follow qemu-reference.md §7.4/§7.5 (QEMU ``migration/options.c``
``migrate_params_check``). ``set`` is all-or-nothing like ``migrate-set-parameters``: the
update is merged into a copy, the copy is checked (including cross-member rules such as
max-cpu-throttle ≥ cpu-throttle-initial), and only then applied. Errors carry a ``kind``
("unknown", "type", "range") and QEMU-like text that the QMP layer returns as GenericError.

``max-bandwidth`` keeps QEMU's meaning: the budget is max-bandwidth/10 bytes per 100 ms
window, and a budget of 0 (max-bandwidth < 10, e.g. 0) switches the limit off
(``RATE_LIMIT_DISABLED`` in QEMU's migration-stats.h).

``zero-page-detection`` depends on the wire profile: QEMU 7.2 has no such parameter and
always finds zero pages on the migration thread, and its packets have no zero-page list.
Parameters bound to a profile (``profile=``, as the QMP layer does) default to ``legacy``
for qemu-7.2 and refuse ``multifd`` there; unbound ones keep QEMU 10's default ``multifd``
and ``effective_zero_page_detection`` resolves it per migration (an untouched default
becomes ``legacy`` for qemu-7.2, an explicit ``multifd`` is refused).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from multifd.migration.profile import Profile, get_profile

__all__ = [
    "CAPABILITIES",
    "PARAMETERS",
    "SUPPORTED_CAPABILITIES",
    "ZERO_PAGE_DETECTION",
    "MigrationCapabilities",
    "MigrationParameters",
    "ParameterError",
    "effective_zero_page_detection",
    "zero_page_default",
]

UINT64_MAX = (1 << 64) - 1
MAX_MIGRATE_DOWNTIME_MS = 2_000_000
TARGET_PAGE_SIZE = 4096


class ParameterError(ValueError):
    """A rejected parameter or capability; ``kind`` is "unknown", "type" or "range"."""

    def __init__(self, kind: str, desc: str) -> None:
        super().__init__(desc)
        self.kind = kind
        self.desc = desc


@dataclass(frozen=True)
class _Spec:
    name: str
    default: Any
    type: str  # "int", "bool", "str", "enum", "str-or-null"
    lo: int = 0
    hi: int = UINT64_MAX
    choices: tuple[str, ...] = ()
    range_text: str = ""  # QEMU's "expects ..." wording

    def check(self, value: Any) -> Any:
        """Return the normalised value or raise ParameterError."""
        if self.type == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise _type_error(self.name, "integer")
            if not self.lo <= value <= self.hi:
                text = self.range_text or f"a value between {self.lo} and {self.hi}"
                raise ParameterError("range", f"Parameter '{self.name}' expects {text}")
            return value
        if self.type == "bool":
            if not isinstance(value, bool):
                raise _type_error(self.name, "boolean")
            return value
        if self.type == "enum":
            if not isinstance(value, str):
                raise _type_error(self.name, "string")
            if value not in self.choices:
                raise ParameterError(
                    "range",
                    f"Parameter '{self.name}' does not accept value '{value}' "
                    f"(expected one of: {', '.join(self.choices)})",
                )
            return value
        if self.type in ("str", "str-or-null"):
            if value is None:  # StrOrNull: null resets to the default
                return self.default
            if not isinstance(value, str):
                raise _type_error(self.name, "string")
            return value
        raise AssertionError(self.type)


def _type_error(name: str, expected: str) -> ParameterError:
    return ParameterError("type", f"Invalid parameter type for '{name}', expected: {expected}")


def _int(name: str, default: int, lo: int, hi: int, text: str = "") -> _Spec:
    return _Spec(name, default, "int", lo, hi, range_text=text)


PARAMETERS: dict[str, _Spec] = {
    s.name: s
    for s in (
        _int("announce-initial", 50, 0, 100_000),
        _int("announce-max", 550, 0, 100_000),
        _int("announce-rounds", 5, 0, 1000),
        _int("announce-step", 100, 1, 10_000),
        _int("throttle-trigger-threshold", 50, 1, 100, "an integer in the range of 1 to 100"),
        _int("cpu-throttle-initial", 20, 1, 99, "an integer in the range of 1 to 99"),
        _int("cpu-throttle-increment", 10, 1, 99, "an integer in the range of 1 to 99"),
        _Spec("cpu-throttle-tailslow", False, "bool"),
        _int("max-cpu-throttle", 99, 1, 99,
             "an integer in the range of cpu-throttle-initial to 99"),
        _Spec("tls-creds", "", "str-or-null"),
        _Spec("tls-hostname", "", "str-or-null"),
        _Spec("tls-authz", "", "str-or-null"),
        _int("max-bandwidth", 134_217_728, 0, UINT64_MAX,
             f"an integer in the range of 0 to {UINT64_MAX} bytes/second"),
        _int("avail-switchover-bandwidth", 0, 0, UINT64_MAX,
             f"an integer in the range of 0 to {UINT64_MAX} bytes/second"),
        _int("downtime-limit", 300, 0, MAX_MIGRATE_DOWNTIME_MS,
             f"an integer in the range of 0 to {MAX_MIGRATE_DOWNTIME_MS} ms"),
        _int("x-checkpoint-delay", 20_000, 0, (1 << 32) - 1),
        _int("multifd-channels", 2, 1, 255),
        _Spec("multifd-compression", "none", "enum", choices=("none", "zlib", "zstd")),
        _int("multifd-zlib-level", 1, 0, 9),
        _int("multifd-zstd-level", 1, 0, 20),
        _int("xbzrle-cache-size", 64 << 20, TARGET_PAGE_SIZE, UINT64_MAX,
             "a power of two no less than the target page size"),
        _int("max-postcopy-bandwidth", 0, 0, UINT64_MAX),
        _Spec("zero-page-detection", "multifd", "enum", choices=("none", "legacy", "multifd")),
        _Spec("mode", "normal", "enum", choices=("normal", "cpr-transfer")),  # migration/cpr.py
        _Spec("direct-io", False, "bool"),  # QEMU 9.1+: O_DIRECT channels, mapped-ram only
        # Timeout policies (no QEMU equivalent, hence x-; seconds; migration/policy.py)
        _int("x-progress-timeout", 0, 0, 1 << 32),
        _int("x-completion-timeout", 0, 0, 1 << 32),
        _int("x-completion-timeout-per-gib", 0, 0, 1 << 32),
        _Spec("x-timeout-strategy", "cancel", "enum",
              choices=("cancel", "switchover", "throttle")),
        _int("x-idle-timeout", 30, 0, 1 << 32),
        _int("x-accept-timeout", 30, 0, 1 << 32),
        _int("x-confirm-timeout", 5, 1, 1 << 32),
    )
}


ZERO_PAGE_DETECTION = "zero-page-detection"


def _canonical(name: str) -> str:
    return name.replace("_", "-")


def zero_page_default(profile: Profile | None) -> str:
    """QEMU 10 finds zero pages in the channels; QEMU 7.2 only on the migration thread."""
    return "multifd" if profile is None or profile.zero_pages_in_multifd else "legacy"


def _multifd_zero_pages_refused(profile: Profile) -> ParameterError:
    return ParameterError(
        "range",
        f"Parameter '{ZERO_PAGE_DETECTION}' does not accept value 'multifd' with profile "
        f"{profile.name} (QEMU 7.2 finds zero pages on the migration thread and its "
        "multifd packets carry no zero pages; expected one of: none, legacy)",
    )


class MigrationParameters:
    """QEMU's MigrationParameters: ``get``/``set``/``as_dict``, attributes with underscores.

    ``profile`` (a Profile or its name) binds the profile-dependent default and check of
    zero-page-detection; see the module docstring.
    """

    def __init__(self, *, profile: Profile | str | None = None, **overrides: Any) -> None:
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_values", {n: s.default for n, s in PARAMETERS.items()})
        object.__setattr__(self, "_explicit", frozenset())
        object.__setattr__(self, "_profile", None)
        if profile is not None:
            self.bind_profile(profile)
        if overrides:
            self.set(overrides)

    @property
    def profile(self) -> Profile | None:
        """The profile the defaults and checks follow (None: QEMU 10's, unchecked)."""
        return self._profile

    def bind_profile(self, profile: Profile | str) -> None:
        """Follow `profile` from now on: an untouched zero-page-detection takes its
        default; a value the profile cannot speak raises ParameterError (nothing changes)."""
        prof = get_profile(profile) if isinstance(profile, str) else profile
        with self._lock:
            values = dict(self._values)
            if ZERO_PAGE_DETECTION not in self._explicit:
                values[ZERO_PAGE_DETECTION] = zero_page_default(prof)
            _check_profile(values, prof)
            object.__setattr__(self, "_values", values)
            object.__setattr__(self, "_profile", prof)

    def effective_zero_page_detection(self, profile: Profile) -> str:
        """The zero-page-detection mode a migration speaking `profile` uses (see the
        module function of that name); raises ParameterError for one it cannot."""
        return effective_zero_page_detection(self, profile)

    def explicit(self, name: str) -> bool:
        """True once `name` was set (constructor or ``set``), even to its default."""
        key = _canonical(name)
        if key not in PARAMETERS:
            raise ParameterError("unknown", f"Parameter '{name}' is unexpected")
        with self._lock:
            return key in self._explicit

    def get(self, name: str) -> Any:
        key = _canonical(name)
        if key not in PARAMETERS:
            raise ParameterError("unknown", f"Parameter '{name}' is unexpected")
        with self._lock:
            return self._values[key]

    def __getattr__(self, attr: str) -> Any:
        key = _canonical(attr)
        if key in PARAMETERS:
            with self._lock:
                return self._values[key]
        raise AttributeError(attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr.startswith("_"):
            object.__setattr__(self, attr, value)
        else:
            self.set({attr: value})

    def set(self, changes: Mapping[str, Any]) -> None:
        """Validate every member, then apply all of them; on any error change nothing."""
        if not isinstance(changes, Mapping):
            raise ParameterError("type", "migrate-set-parameters expects an object")
        with self._lock:
            merged = dict(self._values)
            for name, value in changes.items():
                key = _canonical(name)
                spec = PARAMETERS.get(key)
                if spec is None:
                    raise ParameterError("unknown", f"Parameter '{name}' is unexpected")
                merged[key] = spec.check(value)
            _check_merged(merged)
            if self._profile is not None:
                _check_profile(merged, self._profile)
            object.__setattr__(self, "_values", merged)
            object.__setattr__(self, "_explicit",
                               self._explicit | {_canonical(n) for n in changes})

    def as_dict(self) -> dict[str, Any]:
        """The ``query-migrate-parameters`` shape (dashed names)."""
        with self._lock:
            return dict(self._values)

    def copy(self) -> MigrationParameters:
        new = MigrationParameters()
        with self._lock:
            object.__setattr__(new, "_values", dict(self._values))
            object.__setattr__(new, "_explicit", self._explicit)
            object.__setattr__(new, "_profile", self._profile)
        return new

    def __repr__(self) -> str:
        return f"MigrationParameters({self.as_dict()!r})"


def _check_merged(values: dict[str, Any]) -> None:
    """Rules across members, checked on the merged result as QEMU does."""
    if values["max-cpu-throttle"] < values["cpu-throttle-initial"]:
        raise ParameterError(
            "range",
            "Parameter 'max-cpu-throttle' expects an integer in the range of "
            "cpu-throttle-initial to 99",
        )
    size = values["xbzrle-cache-size"]
    if size & (size - 1):
        raise ParameterError(
            "range",
            "Parameter 'xbzrle-cache-size' expects a power of two no less than the target "
            "page size",
        )


def _check_profile(values: dict[str, Any], profile: Profile) -> None:
    """What the wire profile cannot speak: in-channel zero pages without their list."""
    if values[ZERO_PAGE_DETECTION] == "multifd" and not profile.zero_pages_in_multifd:
        raise _multifd_zero_pages_refused(profile)


def effective_zero_page_detection(params: MigrationParameters, profile: Profile) -> str:
    """The zero-page-detection mode a migration speaking `profile` uses.

    QEMU 10's default ``multifd`` left untouched becomes ``legacy`` for a profile without
    in-channel zero pages (QEMU 7.2 always detects on the migration thread); an explicit
    ``multifd`` there raises ParameterError rather than silently doing something else.
    """
    mode = str(params.get(ZERO_PAGE_DETECTION))
    if mode == "multifd" and not profile.zero_pages_in_multifd:
        if params.explicit(ZERO_PAGE_DETECTION):
            raise _multifd_zero_pages_refused(profile)
        return "legacy"
    return mode


# QEMU 10 capability list (qemu-reference.md §7.4), in QAPI order.
CAPABILITIES: tuple[str, ...] = (
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
)

SUPPORTED_CAPABILITIES: frozenset[str] = frozenset(
    {"multifd", "auto-converge", "events", "mapped-ram"})


class MigrationCapabilities:
    """QEMU's migration capabilities; all off by default; only some can be turned on."""

    def __init__(self, supported: Iterable[str] = SUPPORTED_CAPABILITIES) -> None:
        self._supported = frozenset(supported)
        self._lock = threading.Lock()
        self._state = dict.fromkeys(CAPABILITIES, False)

    def get(self, name: str) -> bool:
        if name not in self._state:
            raise ParameterError(
                "unknown", f"Parameter 'capability' does not accept value '{name}'"
            )
        with self._lock:
            return self._state[name]

    def __getitem__(self, name: str) -> bool:
        return self.get(name)

    def __getattr__(self, attr: str) -> bool:
        key = _canonical(attr)
        if not attr.startswith("_") and key in CAPABILITIES:
            return self.get(key)
        raise AttributeError(attr)

    def set(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Apply ``[{capability, state}]`` all-or-nothing, rejecting what we cannot do."""
        if isinstance(entries, Mapping | str | bytes):
            raise _type_error("capabilities", "array")
        updates: dict[str, bool] = {}
        for entry in entries:
            if not isinstance(entry, Mapping):
                raise ParameterError(
                    "type", "Invalid parameter type for 'capabilities[]', expected: object"
                )
            extra = set(entry) - {"capability", "state"}
            if extra:
                raise ParameterError("unknown", f"Parameter '{sorted(extra)[0]}' is unexpected")
            if "capability" not in entry:
                raise ParameterError("type", "Parameter 'capability' is missing")
            if "state" not in entry:
                raise ParameterError("type", "Parameter 'state' is missing")
            name, state = entry["capability"], entry["state"]
            if not isinstance(name, str):
                raise _type_error("capability", "string")
            if not isinstance(state, bool):
                raise _type_error("state", "boolean")
            if name not in self._state:
                raise ParameterError(
                    "unknown", f"Parameter 'capability' does not accept value '{name}'"
                )
            if state and name not in self._supported:
                raise ParameterError("range", f"capability {name} is not supported by multifd")
            updates[name] = state
        with self._lock:
            self._state.update(updates)

    def enabled(self) -> frozenset[str]:
        with self._lock:
            return frozenset(n for n, on in self._state.items() if on)

    def as_list(self) -> list[dict[str, Any]]:
        """The ``query-migrate-capabilities`` shape."""
        with self._lock:
            return [{"capability": n, "state": on} for n, on in self._state.items()]

    def __repr__(self) -> str:
        return f"MigrationCapabilities(enabled={sorted(self.enabled())})"
