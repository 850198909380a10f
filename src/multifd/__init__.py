"""multifd: QEMU's multifd live migration, in Python, speaking QEMU's wire format.

Layers (dependencies point down): `wire` and `compress` (sans-IO codecs), `multifd` (the
storage-slots channel core), `machine` (what migrates), `migration` (control),
`transport`, `qemu` (QEMU-peer role), `qmp` and `cli` on top.

The public API is re-exported here (``from multifd import Machine, MigrationSource``).
The names are loaded on first use (module ``__getattr__``): every submodule import runs
this file first, so importing the engine here would make ``import multifd.wire`` (or
starting the CLI) pay for numpy and the whole engine, and would tie this file into the
import graph of the modules below it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "BytesDevice": "multifd.machine.device",
    "Device": "multifd.machine.device",
    "Machine": "multifd.machine.machine",
    "MigrationCapabilities": "multifd.migration.params",
    "MigrationDestination": "multifd.migration.destination",
    "MigrationParameters": "multifd.migration.params",
    "MigrationSource": "multifd.migration.source",
    "MigrationStatus": "multifd.migration.status",
    "PickleDevice": "multifd.machine.device",
    "Profile": "multifd.migration.profile",
    "QEMU_10": "multifd.migration.profile",
    "QEMU_7_2": "multifd.migration.profile",
    "RamBlock": "multifd.machine.ramblock",
    "get_profile": "multifd.migration.profile",
}

__all__ = [
    "QEMU_7_2",
    "QEMU_10",
    "BytesDevice",
    "Device",
    "Machine",
    "MigrationCapabilities",
    "MigrationDestination",
    "MigrationParameters",
    "MigrationSource",
    "MigrationStatus",
    "PickleDevice",
    "Profile",
    "RamBlock",
    "__version__",
    "get_profile",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ loads them
    from multifd.machine.device import BytesDevice, Device, PickleDevice
    from multifd.machine.machine import Machine
    from multifd.machine.ramblock import RamBlock
    from multifd.migration.destination import MigrationDestination
    from multifd.migration.params import MigrationCapabilities, MigrationParameters
    from multifd.migration.profile import QEMU_7_2, QEMU_10, Profile, get_profile
    from multifd.migration.source import MigrationSource
    from multifd.migration.status import MigrationStatus


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first access, then cache it here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
