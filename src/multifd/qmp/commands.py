"""QMP commands bound to one `Machine` and its migrations, and `serve_qmp` to embed them.

Command names, argument shapes and error texts follow QEMU 7.2 (qemu-reference.md §7):
``migrate`` accepts ``blk``/``inc``/``detach``/``resume``; a migration is refused while one
runs ("There's a migration process in progress"), as is changing capabilities; parameters
that only take effect at setup (multifd channels and compression, TLS, ...) cannot change
during a migration; ``max-bandwidth`` and ``downtime-limit`` apply live as in QEMU. The
parameters follow the machine's profile: ``zero-page-detection`` defaults to ``legacy``
with qemu-7.2, which refuses ``multifd`` (GenericError naming the profile).

Run state follows QEMU too: a completed source is ``postmigrate``; on a destination,
``stop``/``cont`` before the migration ends only change *autostart* (QEMU's ``-S``), and
after a completed incoming migration the machine resumes only if autostart is on, else
it stays ``paused`` with exactly the migrated state. Events: ``MIGRATION`` and
``MIGRATION_PASS`` with the ``events`` capability (the 7.2 profile's destination sends its
first ``setup`` regardless, as QEMU 7.2 does), ``STOP``/``RESUME`` from the machine.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

from multifd.machine.machine import Machine, RunState
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.profile import Profile, get_profile
from multifd.migration.source import MigrationSource
from multifd.qmp.server import ArgSpec, QmpError, QmpServer
from multifd.transport.uri import BadUri, TcpAddress, UnixAddress, parse_uri

__all__ = ["SETUP_ONLY_PARAMETERS", "MachineCommands", "serve_qmp"]

log = logging.getLogger(__name__)

# Read once at migration setup: changing them mid-migration is refused.
SETUP_ONLY_PARAMETERS = frozenset({
    "multifd-channels", "multifd-compression", "multifd-zlib-level", "multifd-zstd-level",
    "zero-page-detection", "mode", "tls-creds", "tls-hostname", "tls-authz",
})
IN_PROGRESS = "There's a migration process in progress"


def _socket_address(uri: str) -> dict[str, Any] | None:
    try:
        addr = parse_uri(uri)
    except BadUri:
        return None
    if isinstance(addr, TcpAddress):
        return {"type": "inet", "host": addr.host, "port": str(addr.port)}
    if isinstance(addr, UnixAddress):
        return {"type": "unix", "path": addr.path}
    return None


class MachineCommands:
    """The migration and run-state commands for one machine, registered on a QmpServer."""

    def __init__(
        self,
        machine: Machine,
        server: QmpServer,
        *,
        profile: Profile | str = "qemu-10",
        incoming_defer: bool = False,
        autostart: bool = True,
        params: MigrationParameters | None = None,
        caps: MigrationCapabilities | None = None,
        uuid: bytes = bytes(16),
        machine_type: str = "multifd-python",
        fresh_ram: bool = True,
    ) -> None:
        self.machine = machine
        self.server = server
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.incoming_defer = incoming_defer
        self.autostart = autostart
        # Bound to the profile: zero-page-detection's default and the values refused
        # (multifd with qemu-7.2) follow what this machine speaks, so
        # migrate-set-parameters fails at once rather than the migration later.
        self.params = params if params is not None else MigrationParameters()
        self.params.bind_profile(self.profile)
        self.caps = caps if caps is not None else MigrationCapabilities()
        self.uuid = uuid
        self.machine_type = machine_type
        self.fresh_ram = fresh_ram
        self.source: MigrationSource | None = None
        self.destination: MigrationDestination | None = None
        self._last: MigrationSource | MigrationDestination | None = None
        self._incoming_uri: str | None = None
        self._incoming_started = False
        machine.on_state_change.append(self._on_state_change)

    def register(self) -> None:
        s = self.server
        s.register("query-status", self.query_status)
        s.register("stop", self.stop)
        s.register("cont", self.cont)
        s.register("migrate", self.migrate, args={
            "uri": ArgSpec("str", required=True), "blk": ArgSpec("bool"),
            "inc": ArgSpec("bool"), "detach": ArgSpec("bool"), "resume": ArgSpec("bool")})
        s.register("migrate-incoming", self.migrate_incoming, args={
            "uri": ArgSpec("str", required=True), "exit-on-error": ArgSpec("bool")})
        s.register("migrate_cancel", self.migrate_cancel)
        s.register("query-migrate", self.query_migrate)
        s.register("migrate-set-capabilities", self.set_capabilities,
                   args={"capabilities": ArgSpec("list", required=True)})
        s.register("query-migrate-capabilities", lambda _a: self.caps.as_list())
        s.register("migrate-set-parameters", self.set_parameters, boxed=True)
        s.register("query-migrate-parameters", lambda _a: self.params.as_dict())
        s.register("x-query-checksum", lambda _a: {"checksum": self.machine.checksum()})
        s.register("x-query-multifd-channels", self.query_multifd_channels)

    # -- state ------------------------------------------------------------------------------
    def migration_running(self) -> bool:
        return any(m is not None and m.status.is_running()
                   for m in (self.source, self.destination))

    def close(self) -> None:
        """Detach from the machine; cancel a migration still running and wait for it."""
        with contextlib.suppress(ValueError):
            self.machine.on_state_change.remove(self._on_state_change)
        for m in (self.source, self.destination):
            if m is not None and m.status.is_running():
                m.cancel()
                m.wait(10)

    # -- run state --------------------------------------------------------------------------
    def query_status(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.machine.state.value, "running": self.machine.is_running,
                "singlestep": False}

    def stop(self, _args: dict[str, Any]) -> dict[str, Any]:
        if self.machine.state is RunState.INMIGRATE:
            self.autostart = False
        elif self.machine.is_running:
            self.machine.pause()
        return {}

    def cont(self, _args: dict[str, Any]) -> dict[str, Any]:
        if self.machine.state is RunState.INMIGRATE:
            self.autostart = True
        else:
            self.machine.resume()
        return {}

    # -- migration --------------------------------------------------------------------------
    def migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("resume"):
            raise QmpError("Cannot resume if there is no paused migration "
                           "(postcopy recovery is not supported)")
        if args.get("blk") or args.get("inc"):
            raise QmpError("Block migration (blk/inc) is not supported")
        if self.migration_running():
            raise QmpError(IN_PROGRESS)
        if self.machine.state is RunState.INMIGRATE:
            raise QmpError("Guest is waiting for an incoming migration")
        uri = args["uri"]
        try:
            parse_uri(uri)
        except BadUri as exc:
            raise QmpError(str(exc)) from None
        src = MigrationSource(
            self.machine, params=self.params, caps=self.caps, profile=self.profile,
            uuid=self.uuid, machine_type=self.machine_type,
            on_event=lambda n, d: self._on_migration_event("source", n, d))
        self.source = self._last = src
        try:
            src.start(uri)
        except (ValueError, OSError, RuntimeError) as exc:
            raise QmpError(str(exc)) from None
        return {}

    def migrate_incoming(self, args: dict[str, Any]) -> dict[str, Any]:
        if not self.incoming_defer:
            raise QmpError("For use with '-incoming defer'")
        if self._incoming_started:
            raise QmpError("The incoming migration has already been started")
        dest = MigrationDestination(
            self.machine, autostart=lambda: self.autostart, params=self.params,
            caps=self.caps, profile=self.profile, uuid=self.uuid,
            machine_type=self.machine_type, fresh_ram=self.fresh_ram,
            on_event=lambda n, d: self._on_migration_event("destination", n, d))
        try:
            bound = dest.listen(args["uri"])  # bound before we reply
        except (ValueError, OSError) as exc:
            raise QmpError(str(exc)) from None
        self._incoming_started = True
        self._incoming_uri = bound
        self.destination = self._last = dest
        return {}

    def migrate_cancel(self, _args: dict[str, Any]) -> dict[str, Any]:
        """QEMU's migrate_cancel: cancels the outgoing migration; a no-op otherwise."""
        if self.source is not None and self.source.status.is_running():
            self.source.cancel()
        return {}

    def query_migrate(self, _args: dict[str, Any]) -> dict[str, Any]:
        m = self._last
        if m is None:
            return {}
        info = m.query()
        if m is self.destination and self._incoming_uri and not m.status.is_final():
            sa = _socket_address(self._incoming_uri)
            if sa is not None:
                info["socket-address"] = [sa]
        return info

    def query_multifd_channels(self, _args: dict[str, Any]) -> list[dict[str, Any]]:
        """Ours (QEMU has none): per multifd channel of this machine's migrations, bytes,
        packets, busy time and waits (migration/timeline.py multifd_channels_info)."""
        from multifd.migration.timeline import multifd_channels_info

        return [info for role, m in (("source", self.source),
                                     ("destination", self.destination)) if m is not None
                for info in multifd_channels_info(m, role)]

    def set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.migration_running():
            raise QmpError(IN_PROGRESS)
        self.caps.set(args["capabilities"])  # ParameterError -> GenericError, all or nothing
        return {}

    def set_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.migration_running():
            for name, value in args.items():
                key = name.replace("_", "-")
                if key in SETUP_ONLY_PARAMETERS and value != self.params.get(key):
                    raise QmpError(
                        f"Parameter '{name}' cannot be changed while a migration is in "
                        "progress")
        self.params.set(args)
        src = self.source
        if "max-bandwidth" in args and src is not None and src.status.is_running():
            src.set_max_bandwidth(self.params.max_bandwidth)  # applies live, like QEMU
        return {}

    # -- events -----------------------------------------------------------------------------
    def _on_migration_event(self, role: str, name: str, data: dict[str, Any]) -> None:
        events = self.caps.get("events")
        if name == "MIGRATION":
            status = data.get("status")
            if role == "source" and status == "completed":
                with contextlib.suppress(RuntimeError):
                    self.machine.set_state(RunState.POSTMIGRATE)
            first_setup_72 = (role == "destination" and status == "setup"
                              and self.profile.name == "qemu-7.2")
            if events or first_setup_72:
                self.server.emit("MIGRATION", {"status": status})
        elif name == "MIGRATION_PASS" and events:
            self.server.emit("MIGRATION_PASS", {"pass": data.get("pass")})

    def _on_state_change(self, event: str, _state: RunState) -> None:
        if event in ("STOP", "RESUME"):
            self.server.emit(event)


def serve_qmp(
    machine: Machine,
    address: str | Iterable[str],
    *,
    incoming_defer: bool = False,
    autostart: bool = True,
    profile: Profile | str = "qemu-10",
    params: MigrationParameters | None = None,
    caps: MigrationCapabilities | None = None,
    uuid: bytes = bytes(16),
    machine_type: str = "multifd-python",
    fresh_ram: bool = True,
    version: tuple[int, int, int] = (7, 2, 0),
) -> QmpServer:
    """Serve QMP for ``machine`` on one or more ``unix:PATH``/``tcp:HOST:PORT`` addresses.

    Returns the running server (``addresses`` has the bound ones); ``close()`` stops it,
    cancels a migration it started and detaches from the machine.
    """
    server = QmpServer(version=version)
    cmds = MachineCommands(
        machine, server, profile=profile, incoming_defer=incoming_defer, autostart=autostart,
        params=params, caps=caps, uuid=uuid, machine_type=machine_type, fresh_ram=fresh_ram)
    cmds.register()
    server.on_close.append(cmds.close)
    addresses = [address] if isinstance(address, str) else list(address)
    if not addresses:
        raise ValueError("serve_qmp needs at least one address")
    try:
        for a in addresses:
            server.listen(a)
    except BaseException:
        server.close()
        raise
    return server
