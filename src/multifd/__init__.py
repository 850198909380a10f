"""multifd: QEMU's multifd live migration, in Python, speaking QEMU's wire format.

Layers (dependencies point down): `wire` and `compress` (sans-IO codecs), `multifd` (the
storage-slots channel core), `machine` (what migrates), `migration` (control),
`transport`, `qemu` (QEMU-peer role), `qmp` and `cli` on top.
"""

__version__ = "0.1.0"
