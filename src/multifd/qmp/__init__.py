"""QMP control socket: QEMU's monitor protocol over unix/tcp, so QMP clients drive us.

`serve_qmp(machine, "unix:/run/m.sock")` is the one call for a program that owns a
`Machine`; `QmpServer` is the protocol layer on its own (register commands, emit events).
"""

from multifd.qmp.commands import MachineCommands, serve_qmp
from multifd.qmp.server import ArgSpec, QmpError, QmpServer

__all__ = ["ArgSpec", "MachineCommands", "QmpError", "QmpServer", "serve_qmp"]
