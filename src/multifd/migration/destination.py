"""Migration destination: accept, load the main stream, run the multifd barrier, resume.

    destination (thread "incoming")                      channel threads (multifdrecv_N)
    -------------------------------                      -------------------------------
    listen; accept main + N channels per profile
    validate every MultiFDInit_t  ------------------->   start: header -> validate ->
    main loop: decode records                            recv straight into RAM
      ram MEM_SIZE: check the block list                 SYNC: stop and wait
      ZERO / PAGE records: apply                              |
      EOS (7.2) / 0x200 (10): Receiver.sync_main()  <--------+ release all
      device sections: Device.load_*
      SWITCHOVER_START: start device load jobs
      EOF (+ VMDESCRIPTION)
    wait for load jobs, close channels
    resume the machine (unless the source was paused)

A failure at any point marks the migration failed and leaves the machine paused: a
half-loaded destination never runs.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from multifd.machine.machine import Machine
from multifd.machine.ramblock import received_maps
from multifd.migration import cpr
from multifd.migration.device_state import (
    DEVICE_LOAD_TIMEOUT_S,
    DeviceStateLoader,
    DeviceStateLoadHandler,
    device_state_totals,
    multifd_device_state_supported,
)
from multifd.migration.handlers import LoadHandler, LoadHandlers
from multifd.migration.mapped_ram import MappedRamInput, MappedRamLoadHandler, mapped_ram_input
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.policy import Watchdog, accept_timeout_s
from multifd.migration.profile import QEMU_10, Profile
from multifd.migration.ram import RamLoadHandler
from multifd.migration.sections import (
    GLOBALSTATE_BODY,
    GLOBALSTATE_IDSTR,
    DeviceLoadHandler,
    GlobalStateLoadHandler,
)
from multifd.migration.stats import MigrationStats, query_migrate, sum_channel_stats
from multifd.migration.status import MigrationStatus, StatusMachine
from multifd.multifd.receiver import Receiver
from multifd.transport.channels import accept_channels
from multifd.transport.exec import open_stream
from multifd.transport.sockets import Listener
from multifd.transport.tls import TlsConfig, TlsError, accept_tls, accept_tls_channels
from multifd.transport.uri import TcpAddress, UnixAddress, parse_uri, supports_multifd
from multifd.wire.buffer import NEED_DATA
from multifd.wire.constants import Command, SectionType
from multifd.wire.errors import Mismatch, Truncated, WireError
from multifd.wire.ram import RamRecord, RamSettings
from multifd.wire.stream import (
    LENGTH_PREFIXED,
    CommandRecord,
    Configuration,
    EndOfStream,
    MainStreamDecoder,
    SectionBody,
    SectionHeader,
    VmDescription,
)

RECV_CHUNK = 1 << 20


class MigrationDestination:
    """Receives a migration into `machine`: `listen(uri)`, then `wait()`.

    The machine's RAM must start zeroed (a fresh machine), as QEMU's destination assumes:
    the source does not send zero pages it never sent before, and with `fresh_ram` the
    channels and the main stream skip zero pages never received instead of touching
    the memory.
    """

    def __init__(
        self,
        machine: Machine,
        *,
        params: MigrationParameters | None = None,
        caps: MigrationCapabilities | None = None,
        profile: Profile = QEMU_10,
        uuid: bytes = bytes(16),
        machine_type: str = "multifd-python",
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        accept_timeout: float | None = None,  # None: x-accept-timeout
        fresh_ram: bool = True,
        autostart: Callable[[], bool] | bool = True,
        device_load_timeout: float = DEVICE_LOAD_TIMEOUT_S,
    ) -> None:
        self.fresh_ram = fresh_ram
        # Pages written by this migration (fresh RAM only), main stream and channels alike.
        self._received = received_maps(machine.blocks) if fresh_ram else {}
        # QEMU's -S: with autostart off the machine stays paused after the migration.
        self._autostart = autostart if callable(autostart) else (lambda: bool(autostart))
        self.machine = machine
        self.params = params if params is not None else MigrationParameters()
        self.caps = caps if caps is not None else MigrationCapabilities()
        self.profile = profile
        self.uuid = uuid
        self.machine_type = machine_type
        self.on_event = on_event
        self.accept_timeout = accept_timeout
        self.status = StatusMachine()
        self.stats = MigrationStats()
        self.error: str | None = None
        self.t_start = 0.0
        self.t_end = 0.0
        self.resume_wall = 0.0  # time.time() when the machine resumed
        self.receiver: Receiver | None = None
        self._listener: Listener | None = None
        self._thread: threading.Thread | None = None
        self._main: Any = None
        self._cancelled = threading.Event()
        self._cpr = cpr.is_cpr_transfer(self.params)  # no multifd channels then
        self._devstate = DeviceStateLoader(
            machine.devices,
            enabled=multifd_device_state_supported(
                profile, bool(self.caps.get("multifd")) and not self._cpr
                and not self.caps.get("mapped-ram"), self.params.multifd_compression),
            on_error=self._shutdown,
            load_timeout=device_load_timeout,
        )
        # Every section kind is a load handler (RAM, devices, device state, globalstate).
        self._handlers = LoadHandlers()
        ram_cls = MappedRamLoadHandler if self.caps.get("mapped-ram") else RamLoadHandler
        self._ram = ram_cls(machine, profile, self._received, self._multifd_sync)
        self._handlers.register(self._ram)
        for dev in machine.devices:
            if dev in self._devstate.expected:
                self._handlers.register(
                    DeviceStateLoadHandler(dev, self._devstate, self._channels_done))
            else:
                self._handlers.register(DeviceLoadHandler(dev))
        self._globalstate = GlobalStateLoadHandler()
        self._handlers.register(self._globalstate)
        self._current: tuple[LoadHandler, SectionType, int] | None = None
        self._mapped: MappedRamInput | None = None  # the file, with mapped-ram
        self._channel_error: str | None = None  # the first multifd channel failure
        self._idle: Watchdog | None = None

    # -- public ---------------------------------------------------------------------------
    def listen(self, uri: str) -> str:
        """Bind now (so a port 0 gets its real number) and start the incoming thread."""
        addr = parse_uri(uri)
        tls = TlsConfig.from_params(self.params)
        if tls is not None:  # bad credentials fail here, in the caller
            if not isinstance(addr, TcpAddress | UnixAddress):
                raise TlsError(f"TLS needs a tcp: or unix: URI, not {addr}")
            tls.server()
        for dev in self.machine.devices:  # a device may refuse an unauthenticated source
            dev.check_incoming(secure=tls is not None)
        if self._cpr:
            cpr.check_destination(addr, tls=tls is not None)
        self.t_start = time.monotonic()
        self.status.set(MigrationStatus.SETUP)
        self._emit("MIGRATION", {"status": "setup"})
        if isinstance(addr, TcpAddress | UnixAddress):
            self._listener = Listener(addr)
            bound = str(self._listener.address)
        else:
            bound = str(addr)
        self._thread = threading.Thread(
            target=self._run, args=(addr,), name="incoming", daemon=True
        )
        self._thread.start()
        return bound

    def wait(self, timeout: float | None = None) -> MigrationStatus:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status.status

    def cancel(self) -> None:
        self._cancelled.set()
        self._shutdown("migration cancelled on the destination")

    def query(self) -> dict[str, Any]:
        end = self.t_end or time.monotonic()
        if self.receiver is not None:
            tot = sum_channel_stats(self.receiver.channel_stats().values())
            self.stats.set(
                normal=tot.get("normal_pages", 0) + self._ram.normal,
                duplicate=tot.get("zero_pages", 0) + self._ram.zero,
            )
        return query_migrate(
            self.status.status,
            self.stats,
            total_time_ms=int((end - self.t_start) * 1000) if self.t_start else 0,
            error=self.error,
            role="destination",
        )

    @property
    def source_runstate(self) -> str | None:
        """The source's run state from its globalstate section (None before it arrives)."""
        return self._globalstate.runstate

    # -- the incoming thread --------------------------------------------------------------
    def _run(self, addr: Any) -> None:
        try:
            self._accept(addr)
            self._set_status(MigrationStatus.ACTIVE)
            if isinstance(addr, TcpAddress | UnixAddress):  # a file or pipe is no peer
                self._start_idle_watch()
            self._load()
            if self.receiver is not None:
                self._await_channels_closed()
                self.receiver.close()
            self.machine.finish_incoming()
            if isinstance(self._main, socket.socket) and _peer_gone(self._main):
                # The source gave up waiting for our close (it resumes its machine): running
                # here too would leave two copies running.
                raise ConnectionError("the source abandoned the migration before the "
                                      "destination finished loading")
            self.t_end = time.monotonic()
            self._set_status(MigrationStatus.COMPLETED)
            if self.source_runstate in (None, "running") and self._autostart():
                self.resume_wall = time.time()
                self.machine.resume()
        except BaseException as exc:
            self.t_end = time.monotonic()
            if self._cancelled.is_set():
                self.error = "migration cancelled on the destination"
            else:  # a failed channel or device load stops the rest: report it, not the fallout
                # a channel's failure is public (receiver.error) just before its
                # on_error callback runs: main's fallout may be seen in between
                rcv_error = self.receiver.error if self.receiver is not None else None
                self.error = (self._devstate.error or self._channel_error
                              or (str(rcv_error) if rcv_error is not None else None)
                              or str(exc) or type(exc).__name__)
            self._shutdown(self.error)
            self.status.fail(self.error)
            self._emit("MIGRATION", {"status": "failed"})
        finally:
            self._stop_idle_watch()
            self._devstate.close()  # joins the load workers on every path
            for h in self._handlers:
                h.load_cleanup()
            if self._listener is not None:
                self._listener.close()
            if self._main is not None:
                try:
                    self._main.close()
                except OSError:
                    pass

    def _accept(self, addr: Any) -> None:
        mapped = self._mapped = mapped_ram_input(addr, self.params, self.caps)
        if mapped is not None:  # file: + mapped-ram: channels are fds on the file
            assert isinstance(self._ram, MappedRamLoadHandler)
            self._main = self._ram.input = mapped
            return
        multifd = self.caps.get("multifd") and not self._cpr
        if self._listener is None:
            if multifd:
                raise ValueError(f"multifd needs a socket URI, not {addr}")
            self._main = open_stream(addr, "r")
            return
        tls = TlsConfig.from_params(self.params)  # under TLS: channels by order, not peek
        timeout = (self.accept_timeout if self.accept_timeout is not None
                   else accept_timeout_s(self.params))
        if multifd:
            if not supports_multifd(addr):
                raise ValueError(f"multifd needs a socket URI, not {addr}")
            n = self.params.multifd_channels
            if tls is not None:
                main, chans = accept_tls_channels(self._listener, n, tls, timeout)
            else:
                main, chans = accept_channels(self._listener, n, self.profile.name,
                                              timeout)
            self._main = main
            self.receiver = Receiver(
                channels=n,
                uuid=self.uuid,
                layout=self.profile.layout,
                compression=self.params.multifd_compression,
                page_size=self._page_size(),
                blocks=dict(self.machine.blocks),
                device_state_sink=self._devstate.sink,
                on_error=self._channel_failed,
                fresh_ram=self.fresh_ram,
                received=self._received,
            )
            for i, c in enumerate(chans):
                try:
                    self.receiver.add_channel(c, timeout=timeout)
                except BaseException:
                    for rest in chans[i:]:  # not owned by the receiver yet
                        rest.close()
                    raise
        elif tls is not None:
            self._main = accept_tls(self._listener, tls, timeout)
        else:
            self._main = self._listener.accept(timeout)
            if self._cpr:  # the source's memfds, mapped over our blocks
                cpr.receive_state(self._main, self.machine)
        self._listener.close()
        self._listener = None

    def _page_size(self) -> int:
        blocks = list(self.machine.blocks.values())
        return blocks[0].page_size if blocks else 4096

    # -- x-idle-timeout (migration/policy.py) ---------------------------------------------
    def _start_idle_watch(self) -> None:
        """Fail when the source, still connected, sends nothing on any channel."""

        def counters() -> dict[str, int]:
            out = {"main channel": int(self.stats.main_bytes)}
            if self.receiver is not None:
                for cid, st in self.receiver.channel_stats().items():
                    out[f"multifd channel {cid}"] = int(st.get("packets", 0))
            return out

        self._idle = Watchdog(counters, lambda: float(self.params.get("x-idle-timeout")),
                              self._idle_failed, peer="source", verb="sent")
        self._idle.start()

    def _stop_idle_watch(self) -> None:
        if self._idle is not None:
            self._idle.stop()

    def _hold_idle(self, busy: bool) -> None:
        if self._idle is not None:
            self._idle.hold(busy)

    def _idle_failed(self, why: str) -> None:
        self._channel_error = why  # the cause to report (see _run)
        self._shutdown(why)

    def _decoder(self) -> MainStreamDecoder:
        parsers: dict[str, Any] = {d.idstr: LENGTH_PREFIXED for d in self.machine.devices}
        parsers[GLOBALSTATE_IDSTR] = GLOBALSTATE_BODY
        ram = RamSettings(
            page_size=self._page_size(),
            allow_multifd_flush=self.profile.allow_multifd_flush,
            batch_zero_runs=True,
        )
        return MainStreamDecoder(
            ram=ram,
            blocks={b.name: b.used_length for b in self.machine.blocks.values()},
            body_parsers=parsers,
            opaque_tail=False,
            allow_switchover_start=self.profile.switchover_start,
        )

    def _load(self) -> None:
        for h in self._handlers:
            h.load_setup()
        dec = self._decoder()
        if self._mapped is not None:
            self._mapped.run_main(dec, self._apply, self._page_size())
            return
        buf = bytearray(RECV_CHUNK)
        view = memoryview(buf)
        main = self._main
        done = False
        while not done:
            self._hold_idle(False)  # waiting for the source
            try:
                n = main.recv_into(view)
            except OSError as exc:  # a reset by the source, mostly: say which channel
                raise ConnectionError(f"main channel: {exc.strerror or exc}") from exc
            self.stats.add_main_bytes(n)
            self._hold_idle(True)  # busy applying: silence is ours
            if n == 0:
                dec.receive_eof()
            else:
                dec.receive_data(view[:n])
            while True:
                try:
                    rec = dec.next_record()
                except Truncated as e:  # the source went away mid-stream: say so first
                    raise Truncated(f"the main channel closed early: {e.describe()}",
                                    offset=e.offset) from None
                if rec is NEED_DATA:
                    break
                if self._apply(rec):
                    done = True
            if n == 0:
                if not dec.finished:
                    raise WireError("the main channel closed early", offset=dec.offset)
                break
            if done and dec.finished:
                break

    def _apply(self, rec: Any) -> bool:
        """Apply one record; True once the stream is complete (EOF seen, vmdesc optional).
        Section bodies and RAM records go to the handler their section header named."""
        if isinstance(rec, SectionHeader):
            if rec.type in (SectionType.START, SectionType.FULL):
                h = self._handlers.open_section(rec.section_id, rec.idstr, rec.instance_id,
                                                rec.version_id)
                version = rec.version_id
            else:
                h, version = self._handlers.section(rec.section_id)
            self._current = (h, rec.type, version)
        elif isinstance(rec, SectionBody | RamRecord):
            if self._current is None:
                raise Mismatch(f"{type(rec).__name__} outside a section")
            h, kind, version = self._current
            h.load_state(kind, version, rec.data if isinstance(rec, SectionBody) else rec)
        elif isinstance(rec, Configuration):
            if rec.machine != self.machine_type:
                raise Mismatch(
                    f"machine type received is '{rec.machine}' and local is "
                    f"'{self.machine_type}'"
                )
        elif isinstance(rec, CommandRecord):
            if rec.cmd == Command.SWITCHOVER_START:
                for h in self._handlers:
                    h.switchover_start()
        elif isinstance(rec, EndOfStream):
            self._stop_idle_watch()  # the source has sent everything
            for h in self._handlers:  # every load is over before the machine may run
                h.load_finish()
            return True
        elif isinstance(rec, VmDescription):
            return True
        return False

    def _multifd_sync(self, required: bool) -> None:
        """The RAM handler's marker: wait until every channel reached its SYNC."""
        if self.receiver is None:
            if required:
                raise Mismatch("MULTIFD_FLUSH on a stream without multifd channels")
            return
        self._hold_idle(False)  # waiting for the channels, so for the source
        self.receiver.sync_main(check=self._check_main_alive)
        self._hold_idle(True)

    def _channels_done(self) -> bool:
        """The source closed every channel: no more device-state buffers can come."""
        rcv = self.receiver
        if rcv is None:
            return True
        if rcv.error is not None:
            raise rcv.error
        return rcv.channels_ended()

    def device_state_stats(self) -> dict[str, int]:
        """Device state received (see `device_state_totals`)."""
        return device_state_totals(self._handlers.stats())

    # -- helpers --------------------------------------------------------------------------
    def _set_status(self, st: MigrationStatus) -> None:
        self.status.set(st)
        self._emit("MIGRATION", {"status": st.value})

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(name, data)
            except Exception:
                pass

    def _channel_failed(self, err: Exception) -> None:
        """A multifd channel thread failed: that is the cause; wake the loader (it may be
        blocked reading main) by shutting main's read side."""
        self._channel_error = str(err)
        self._stop_main()

    def _shutdown(self, why: str) -> None:
        self._devstate.abort(why)
        if self._mapped is not None:
            self._mapped.abort()
        if self.receiver is not None:
            self.receiver.abort(why)
        self._stop_main()
        if self._listener is not None:
            self._listener.close()

    def _stop_main(self) -> None:
        main = self._main
        if isinstance(main, socket.socket):
            try:  # a failed destination resets main (never a clean FIN: the source takes
                # our FIN as "loaded"); SHUT_RD wakes the incoming thread's recv
                main.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                main.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def _check_main_alive(self) -> None:
        """While waiting at a multifd sync: fail if the source reset the main channel (it
        gave up, e.g. on a stalled channel whose SYNC will then never come)."""
        if isinstance(self._main, socket.socket) and _peer_reset(self._main):
            raise ConnectionError("main channel reset by the source while waiting for "
                                  "every multifd channel's SYNC")

    def _await_channels_closed(self) -> None:
        """After EOF: every channel must end with the source's clean close before we run.

        A channel reset, the source dropping main first, or no close within
        x-confirm-timeout means the source failed at the very end: do not run.
        """
        rcv = self.receiver
        assert rcv is not None
        confirm = float(self.params.get("x-confirm-timeout"))
        deadline = time.monotonic() + confirm
        poller = select.poll()
        if isinstance(self._main, socket.socket):
            poller.register(self._main, select.POLLIN | select.POLLERR | select.POLLHUP)
        while True:
            if rcv.error is not None:
                raise rcv.error
            if len(rcv.channel_stats()) == rcv.channels and rcv.channels_ended():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the source did not close every multifd channel within "
                                   f"{confirm:g} s of the end of the stream (x-confirm-timeout)")
            # 2 ms: this wait is part of the downtime (20 ms here cost 10 ms on average)
            if poller.poll(2) and _peer_gone(self._main):
                raise ConnectionError("the source closed the main channel before closing "
                                      "every multifd channel (it failed at the end)")


def _peer_reset(sock: socket.socket) -> bool:
    """True when the main channel was reset (a FIN is not enough: a source may close its
    side once everything is sent, with our reads still behind)."""
    poller = select.poll()
    poller.register(sock, select.POLLERR | select.POLLHUP)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def _peer_gone(sock: socket.socket) -> bool:
    """True when a readable main channel is at EOF or reset (no data may follow EOF)."""
    try:
        return not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
