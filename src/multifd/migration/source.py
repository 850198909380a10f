"""Migration source: one migration thread drives setup, iterations, switchover, completion.

    source                                   destination
    ------                                   -----------
    connect main, then N multifd channels    accept (7.2: first is main; 10: peek magic)
    each channel: MultiFDInit_t              validate magic/version/uuid/id
    main: QEVM, configuration
    ram START: block list [SYNC x N] EOS     (7.2: sync at EOS; 10: at 0x200)
    live devices START
    loop: ram PART: pages -> channels,       channels: recv straight into RAM,
          zeros -> main (7.2) or packets;    stop at SYNC until the main stream
          [SYNC x N + 0x200 at a wrap (10)]   reaches the matching marker
          [SYNC x N] EOS (7.2)
          until pending < bandwidth x downtime-limit (exact, after a bitmap sync)
    pause machine
    [SWITCHOVER_START (10)]                  start device load jobs
    ram END, live devices END, FULL devices  load sections
    EOF, VMDESCRIPTION                       wait for load jobs, resume

Everything that migrates is a save handler (migration/handlers.py): each live round is
`SaveHandlers.iterate()` (device-state producers on the engine's workers share the
channels with RAM), and switchover is `SaveHandlers.switchover()`, "pause, then iterate
with final=True until every handler is done"; there is no separate completion hook.
A failed or cancelled migration resumes the machine if it was running before, and its
state is untouched (the source only ever reads it).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from multifd.machine.machine import Machine
from multifd.machine.workers import WorkerPool
from multifd.migration import cpr
from multifd.migration.device_state import (
    DeviceStateSaveHandler,
    device_state_totals,
    multifd_device_state_supported,
)
from multifd.migration.downtime import DowntimeModel, PipelineGauge
from multifd.migration.handlers import SaveHandler, SaveHandlers
from multifd.migration.mainstream import MainStreamWriter
from multifd.migration.mapped_ram import (
    MappedRamOutput,
    MappedRamSaveHandler,
    mapped_ram_output,
)
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.policy import PolicyError, SourcePolicy, Watchdog
from multifd.migration.profile import QEMU_10, Profile
from multifd.migration.ram import RamSaveHandler
from multifd.migration.sections import DeviceSaveHandler, GlobalStateSaveHandler
from multifd.migration.stats import (
    BandwidthMeter,
    MigrationStats,
    RateLimiter,
    query_migrate,
    sum_channel_stats,
)
from multifd.migration.status import IllegalTransition, MigrationStatus, StatusMachine
from multifd.migration.throttle import AutoConverge
from multifd.migration.timeline import Timeline
from multifd.multifd.sender import Sender
from multifd.transport.channels import connect_channels
from multifd.transport.exec import open_stream
from multifd.transport.sockets import connect, sendmsg_all
from multifd.transport.tls import TlsConfig, TlsError, connect_tls, connect_tls_channels
from multifd.transport.uri import FdAddress, parse_uri, supports_multifd
from multifd.wire.constants import Command, ram_packet_len
from multifd.wire.stream import (
    CommandRecord,
    Configuration,
    EndOfStream,
    FileHeader,
    VmDescription,
    encode_record,
)

CONNECT_TIMEOUT_S = 10.0


class MigrationCancelled(Exception):
    """migrate_cancel was called."""


class MigrationSource:
    """Migrates a `Machine` out; `start(uri)` returns at once, `wait()` for the outcome."""

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
    ) -> None:
        self.machine = machine
        self.params = params if params is not None else MigrationParameters()
        self.caps = caps if caps is not None else MigrationCapabilities()
        self.profile = profile
        self.uuid = uuid
        self.machine_type = machine_type
        self.on_event = on_event
        self.status = StatusMachine()
        self.stats = MigrationStats()
        self.error: str | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._sender: Sender | None = None
        self._closers: list[Callable[[], None]] = []
        self._ram: RamSaveHandler | None = None  # for RAM's figures in query-migrate
        self._handlers: SaveHandlers | None = None
        self._pool: WorkerPool | None = None  # the engine's workers (device-state producers)
        self._meter = BandwidthMeter()
        self._limiter = RateLimiter(self.params.max_bandwidth)
        self.t_start = 0.0
        self.t_setup_done = 0.0
        self.t_pause = 0.0  # monotonic
        self.pause_wall = 0.0  # time.time() at pause, for a destination on the same host
        self.t_end = 0.0
        self.expected_downtime_ms = self.params.downtime_limit
        self.passes = 0
        self._downtime = DowntimeModel()  # expected downtime with the fixed costs
        self._pipeline = PipelineGauge()
        self.eta_ms: float | None = None  # x-eta-ms; None: cannot converge (yet)
        self.phase = "setup"  # the phase on_phase last reported (timeline, progress)
        self.timeline: Timeline | None = None  # events go here when a caller records one
        self._auto_converge = AutoConverge(self.params)
        self.policy = SourcePolicy(self.params)  # x-progress/completion-timeout
        self._policy_error: str | None = None
        self._watchdog: Watchdog | None = None
        # Test/demo hook (fault injection): called on the migration thread at each phase.
        self.on_phase: Callable[[str], None] | None = None

    # -- public ---------------------------------------------------------------------------
    def start(self, uri: str) -> None:
        if self._thread is not None:
            raise RuntimeError("a migration is already running from this source")
        addr = parse_uri(uri)  # bad URIs fail here, in the caller
        self._cpr = cpr.is_cpr_transfer(self.params)
        if self._cpr:  # a handover this source cannot do fails before anything runs
            cpr.check_source(self.machine, addr,
                             tls=TlsConfig.from_params(self.params) is not None)
        self.params.effective_zero_page_detection(self.profile)  # and modes the profile lacks
        self.t_start = time.monotonic()
        self._auto_converge.reset(self.t_start)
        self.policy.reset(self.t_start, self.machine.total_ram())
        self._thread = threading.Thread(
            target=self._run, args=(addr,), name="live_migration", daemon=True
        )
        self._set_status(MigrationStatus.SETUP)
        self._thread.start()

    def cancel(self) -> None:
        """migrate_cancel: stop at once; the machine keeps (or goes back to) running."""
        if self.status.is_final():
            return
        self._cancel.set()
        self._set_status(MigrationStatus.CANCELLING)
        self._abort_io("migration cancelled")

    def wait(self, timeout: float | None = None) -> MigrationStatus:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status.status

    def query(self) -> dict[str, Any]:
        """query-migrate's MigrationInfo for this migration."""
        now = time.monotonic()
        end = self.t_end or now
        total_ms = int((end - self.t_start) * 1000) if self.t_start else 0
        setup_ms = int((self.t_setup_done - self.t_start) * 1000) if self.t_setup_done else None
        downtime_ms = int(self.downtime_ms) if self.t_end and self.t_pause else None
        self._fill_ram_stats()
        return self.policy.annotate(query_migrate(
            self.status.status,
            self.stats,
            total_time_ms=total_ms,
            setup_time_ms=setup_ms,
            downtime_ms=downtime_ms,
            expected_downtime_ms=int(self.expected_downtime_ms),
            eta_ms=self.eta_ms,
            error=self.error,
            cpu_throttle_percentage=self.machine.throttle if not self._stats_frozen else None,
        ))

    @property
    def downtime_ms(self) -> float:
        return (self.t_end - self.t_pause) * 1000 if self.t_end and self.t_pause else 0.0

    def channel_stats(self) -> list[dict[str, int]]:
        return self._sender.channel_stats() if self._sender is not None else []

    def dirty_measurement(self) -> tuple[int, list[float]] | None:
        """(bytes the live bitmap syncs found dirty, the instants of the first sync and of
        every live sync: monotonic); None before two syncs. Unlike dirty-pages-rate it
        counts pages that were dirty again while still waiting to be sent: what the guest
        wrote, a page once per sync interval."""
        if self._ram is None:
            return None
        c = self._ram.counters
        instants = list(c.sync_instants)
        return (c.dirtied_pages * self._ram.page_size, instants) if len(instants) > 1 else None

    def device_state_stats(self) -> dict[str, int]:
        """Device state sent (see `device_state_totals`)."""
        return device_state_totals(self._handlers.stats() if self._handlers is not None else {})

    # -- the migration thread -------------------------------------------------------------
    def set_max_bandwidth(self, max_bandwidth: int) -> None:
        """migrate-set-parameters max-bandwidth during a migration: applies at once."""
        if self.status.status is not MigrationStatus.DEVICE:
            self._limiter.set_max_bandwidth(max_bandwidth)

    def _run(self, addr: Any) -> None:
        was_running = self.machine.is_running
        old_state = self.machine.state  # a failure restores it (e.g. prelaunch under -S)
        # globalstate: the destination runs the machine only if it was running here.
        self._runstate = "running" if was_running else "paused"
        paused_by_us = False
        try:
            self._check_cancel()
            main = self._open(addr)
            self._phase("setup")
            self._check_cancel()
            self._setup(main)
            self.t_setup_done = time.monotonic()
            self._set_status(MigrationStatus.ACTIVE)
            self._start_watchdog()
            self._phase("iterate")
            self._iterate_until_converged(main)
            paused_by_us = was_running
            self._check_cancel()
            self.machine.pause()
            self.t_pause = time.monotonic()
            self._mark("pause", expected_downtime_ms=round(self.expected_downtime_ms, 1),
                       **self._downtime.figures(),
                       pending=self._ram.pending_bytes() if self._ram is not None else 0)
            self.pause_wall = time.time()
            self.stats.start_downtime(self._transferred())  # later bytes: downtime-bytes
            self._set_status(MigrationStatus.DEVICE)
            self._phase("switchover")
            self._limiter.disable()
            self._complete(main)
            self._stop_watchdog()
            self.t_end = time.monotonic()
            if self._handlers is not None:  # stop dirty tracking (45 ms for 4 GiB under
                self._handlers.cleanup()    # uffd-wp) after the last byte, off the downtime
            self._await_destination()
            if self._cpr:
                cpr.finish_source(self.machine)  # postmigrate, pages detached
            self._close_io(clean=True)
            self._set_status(MigrationStatus.COMPLETED)
        except BaseException as exc:
            self.t_end = time.monotonic()
            self._stop_watchdog()
            cause = self._root_cause(exc)
            self._abort_io(str(exc))
            if self._handlers is not None:
                self._handlers.cleanup()
            self.machine.set_throttle(0)  # auto-converge ends with the migration
            if paused_by_us:
                self.machine.resume()
            elif not self.machine.is_running and self.machine.state is not old_state:
                self.machine.set_state(old_state)  # QEMU: runstate_set(vm_old_state)
            if self._cancel.is_set() or isinstance(exc, MigrationCancelled):
                self._set_status(MigrationStatus.CANCELLED)
            else:
                self.error = self._policy_error or (
                    str(exc) if isinstance(exc, PolicyError) else cause)
                if self.status.fail(self.error):
                    self._emit("MIGRATION", {"status": "failed"})
        finally:
            self._fill_ram_stats()
            self._stats_frozen = True  # the machine may be closed after this

    def _open(self, addr: Any) -> MainStreamWriter:
        # mapped-ram: RAM at fixed offsets of a file:, its channels are fds, not sockets
        mapped = self._mapped = mapped_ram_output(addr, self.params, self.caps)
        multifd = self.caps.get("multifd") and not self._cpr and mapped is None  # cpr: no RAM
        if multifd and not supports_multifd(addr):
            raise ValueError(f"multifd needs a socket URI, not {addr}")
        tls = TlsConfig.from_params(self.params)  # every channel its own session
        if tls is not None and not supports_multifd(addr):
            raise TlsError(f"TLS needs a tcp: or unix: URI, not {addr}")
        if mapped is not None:
            self._closers.append(mapped.close)
            send: Callable[[Sequence[Any]], None] = mapped.send
            self._shutdown_main = lambda: None
        elif multifd:
            if tls is not None:
                sock, chans = connect_tls_channels(
                    addr, self.params.multifd_channels, tls, CONNECT_TIMEOUT_S)
            else:
                sock, chans = connect_channels(
                    addr, self.params.multifd_channels, self.profile.name, CONNECT_TIMEOUT_S
                )
            self._closers.append(sock.close)
            for c in chans:
                self._closers.append(c.close)
            self._sender = Sender(
                chans,
                uuid=self.uuid,
                layout=self.profile.layout,
                compression=self.params.multifd_compression,
                level=self._compression_level(),
                zero_page_detection=(
                    self.params.effective_zero_page_detection(self.profile) == "multifd"),
                page_size=self._page_size(),
                rate_limiter=self._limiter,
            )
            self._sender.start()
            self._closers.insert(0, lambda: self._sender.abort("closing") if self._sender else None)
            send = _main_sender(sock)
            self._main_sock = sock
            self._shutdown_main = lambda: _shutdown(sock)
        elif isinstance(addr, FdAddress) or not supports_multifd(addr):
            stream = open_stream(addr, "w")
            self._closers.append(stream.close)
            send = lambda bufs: sendmsg_all(stream, bufs)  # noqa: E731
            self._shutdown_main = stream.close
        else:
            sock = (connect_tls(addr, tls, CONNECT_TIMEOUT_S) if tls is not None
                    else connect(addr, CONNECT_TIMEOUT_S))
            self._closers.append(sock.close)
            if self._cpr:
                cpr.send_state(sock, self.machine)  # the memfds, before the main stream
            send = _main_sender(sock)
            self._main_sock = sock
            self._shutdown_main = lambda: _shutdown(sock)

        def counted(n: int) -> None:
            self.stats.add_main_bytes(n)
            self._limiter.consume(n)

        return MainStreamWriter(send, on_bytes=counted)

    def _compression_level(self) -> int | None:
        method = self.params.multifd_compression
        if method == "zlib":
            return int(self.params.multifd_zlib_level)
        if method == "zstd":
            return int(self.params.multifd_zstd_level)
        return None

    def _page_size(self) -> int:
        blocks = list(self.machine.blocks.values())
        return blocks[0].page_size if blocks else 4096

    def _setup(self, main: MainStreamWriter) -> None:
        """Register every handler (RAM, then the devices, then globalstate: section ids in
        that order) and let each write its setup (START sections)."""
        main.write(encode_record(FileHeader()))
        caps = ("mapped-ram",) if self._mapped is not None else None  # validated caps
        main.write(encode_record(Configuration(machine=self.machine_type, capabilities=caps)))
        handlers = self._handlers = SaveHandlers(main)
        if self._mapped is not None:
            self._ram = MappedRamSaveHandler(self.machine, main, self.profile, self._mapped,
                                             on_bytes=self.stats.add_main_bytes)
            handlers.register(self._ram)
        elif not self._cpr:  # cpr-transfer: the RAM is handed over, not sent
            self._ram = RamSaveHandler(
                self.machine, main, self.profile, self._sender,
                zero_page_detection=self.params.effective_zero_page_detection(self.profile))
            handlers.register(self._ram)
        via_multifd = self._sender is not None and multifd_device_state_supported(
            self.profile, True, self.params.multifd_compression)
        mfd_devs = [d for d in self.machine.devices if via_multifd and d.uses_multifd_state()]
        if mfd_devs:
            self._pool = WorkerPool("devsave", max_workers=len(mfd_devs))
            self._closers.append(self._close_pool)
        for dev in self.machine.devices:
            if dev in mfd_devs:
                assert self._sender is not None and self._pool is not None
                handlers.register(DeviceStateSaveHandler(dev, self._sender, self._pool))
            else:
                handlers.register(DeviceSaveHandler(dev))
        handlers.register(GlobalStateSaveHandler(self._runstate))
        for h in handlers:
            h.setup()
        main.flush()
        if self._ram is not None:
            self._emit("MIGRATION_PASS", {"pass": self._ram.counters.dirty_sync_count})

    def _close_pool(self) -> None:
        if self._pool is not None:
            if self._pool.outstanding:
                self._pool.abort()
            self._pool.close(timeout=30)

    def _iterate_until_converged(self, main: MainStreamWriter) -> None:
        """Live rounds until the pending bytes fit the downtime limit at the measured
        bandwidth; the exact figure (RAM's bitmap sync) is asked only when the estimate
        says so (QEMU's migration_iteration_run)."""
        if self._cpr:  # nothing iterates: the RAM is handed over, not copied
            return
        assert self._handlers is not None and self._ram is not None
        handlers, ram = self._handlers, self._ram
        while True:
            self._check_cancel()
            handlers.iterate()
            main.flush()
            self._meter.update(self._transferred())
            action = self.policy.take()  # x-timeout-strategy, decided by the watchdog
            if action == "switchover":
                return  # forced: the downtime may exceed the limit (x-timeout-action)
            if action == "throttle":
                self._throttle_down()
            if self._switchover_due(handlers, ram, self._meter.bytes_per_ms()):
                return

    def _switchover_due(self, handlers: SaveHandlers, ram: RamSaveHandler, bw: float) -> bool:
        """Does what is pending fit the downtime limit at bandwidth ``bw`` (bytes/ms over
        the last window)? The threshold leaves room for the switchover's fixed costs,
        measured at every exact check (migration/downtime.py); the exact figure (RAM's
        bitmap sync) is asked only when the estimate says so."""
        model, limit = self._downtime, self.params.downtime_limit
        factor = self._switchover_bandwidth_factor()
        # The pipeline, every round (its gauge learns the peer's largest window): it drains
        # at the link's speed, so under max-bandwidth (lifted at the switchover) a burst
        # just written is no backlog and it is left out.
        socks = [ch.sock for ch in self._sender.channels] if self._sender is not None else []
        if self._main_sock is not None:
            socks.append(self._main_sock)
        model.note_pipeline(0 if self._limiter.enabled else self._pipeline.measure(socks))
        threshold = model.threshold(bw, limit, factor)
        pending = handlers.pending()
        if not (pending <= threshold or (pending == 0 and threshold == 0)):
            self._estimate(pending, bw, ram)
            return False
        pending = handlers.pending(exact=True)
        self.passes += 1
        self._emit("MIGRATION_PASS", {"pass": ram.counters.dirty_sync_count})
        self._throttle_check()
        model.update(time.monotonic(), self._transferred(), bw, ram.counters.sync_s,
                     ram.counters.sync_dirtied)
        self._mark("pass", **{"pass": ram.counters.dirty_sync_count - 1}, pending=pending,
                   dirtied=ram.counters.sync_dirtied, **model.figures())
        self._estimate(pending, bw, ram)
        return model.fits(pending, bw, limit, factor)

    def _estimate(self, pending: int, bw: float, ram: RamSaveHandler) -> None:
        """expected-downtime and x-eta-ms for query-migrate, from the downtime model."""
        model = self._downtime
        expected = model.expected_ms(pending, bw)
        if expected is not None:
            self.expected_downtime_ms = expected
        dirty = ram.counters.dirty_pages_rate * ram.page_size / 1000  # bytes/ms
        self.eta_ms = model.eta_ms(pending + ram.dirty_estimate_bytes(), bw, dirty,
                                   self.params.downtime_limit)

    def _switchover_bandwidth_factor(self) -> float:
        avail = int(self.params.get("avail-switchover-bandwidth") or 0)
        if avail:
            bw = self._meter.bytes_per_ms()
            return (avail / 1000.0) / bw if bw > 0 else 0.0
        return 1.0

    def _throttle_check(self) -> None:
        """auto-converge, after a bitmap sync: throttle the workload when dirtying keeps
        outrunning sending (migration/throttle.py)."""
        auto = self.caps.get("auto-converge") or self.policy.action == "throttle"
        if not auto or self._ram is None:
            return
        ram = self._ram
        pct = self._auto_converge.after_bitmap_sync(
            ram.counters.dirty_pages_last_sync * ram.page_size, self._transferred(),
            time.monotonic(), throttle_now=self.machine.throttle)
        if pct is not None:
            self.machine.set_throttle(pct)

    def _throttle_down(self) -> None:
        """x-timeout-strategy throttle: throttle the workload down now (the next
        auto-converge step), and auto-converge goes on from here (`_throttle_check`)."""
        pct = self._auto_converge.guest_down(0, 0, throttle_now=self.machine.throttle)
        self.machine.set_throttle(pct)
        self._auto_converge.reset(time.monotonic(), self._transferred())

    def _start_watchdog(self) -> None:
        """The timeout policies (migration/policy.py): x-idle-timeout (the destination
        takes nothing on any channel), and in the live phase x-progress-timeout and
        x-completion-timeout."""

        def counters() -> dict[str, int]:
            out = {"main channel": int(self.stats.main_bytes)}
            for i, ch in enumerate(self.channel_stats()):
                out[f"multifd channel {i}"] = int(ch.get("wire_bytes", 0))
            return out

        def check(now: float) -> None:
            if self.status.status is MigrationStatus.ACTIVE:
                self._fill_ram_stats()
                self.policy.check(now, self.stats)

        def idle_timeout() -> float:  # a peer on a socket; a file or pipe is no peer
            return float(self.params.get("x-idle-timeout")) if self._main_sock else 0.0

        self._watchdog = Watchdog(counters, idle_timeout, self._fail_by_policy,
                                  peer="destination", verb="accepted", check=check)
        self._watchdog.start()

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()

    def _fail_by_policy(self, why: str) -> None:
        """A policy failed the migration from another thread: unblock the migration
        thread (as migrate_cancel does); `why` is the error it reports."""
        self._policy_error = why
        self._abort_io(why)

    def _complete(self, main: MainStreamWriter) -> None:
        """Switchover, machine paused: every handler iterates with final=True until done
        (SaveHandlers.switchover), then EOF and the VMDESCRIPTION."""
        assert self._handlers is not None
        if self.profile.switchover_start:
            main.write(encode_record(CommandRecord(Command.SWITCHOVER_START, b"")))
        rounds = itertools.count()

        def before_round(left: list[SaveHandler]) -> None:
            self._check_cancel()
            if next(rounds) == 1 and left[0].is_live():
                # RAM's END is out and a live handler still works (device-state jobs)
                self._phase("device-state")

        self._handlers.switchover(check=before_round)
        if self._ram is not None:  # the final sync's figures (the switchover's phases)
            c = self._ram.counters
            self._mark("sent", final_sync_ms=round(c.final_sync_s * 1000, 1),
                       final_dirtied=c.final_dirtied, final_pages=c.final_pages)
        self._phase("completion")
        self._check_destination_alive()
        main.write(encode_record(EndOfStream()))
        doc = {"page_size": self._page_size(), "devices": self._handlers.vmdesc()}
        main.write(encode_record(VmDescription(json.dumps(doc, separators=(",", ":")).encode())))
        main.flush()
        if self._sender is not None:
            self._sender.close()
            self._mark("drained")  # every channel's data is in the kernel or beyond
        self.machine.set_throttle(0)

    # -- helpers --------------------------------------------------------------------------
    def _transferred(self) -> int:
        self._fill_ram_stats()
        return int(self.stats.transferred)

    _stats_frozen = False
    _cpr = False  # mode cpr-transfer (set by start)

    def _fill_ram_stats(self) -> None:
        if self._stats_frozen:
            return
        s = self.stats
        if self._sender is not None:
            ch = sum_channel_stats(self._sender.channel_stats())
            if self.params.multifd_compression == "none":
                s.multifd_bytes = ch.get("wire_bytes", 0)
            else:  # QEMU counts logical bytes plus packet headers
                s.multifd_bytes = ch.get("logical_bytes", 0) + ch.get("packets", 0) * (
                    ram_packet_len(self._page_size()))
            s.wire_bytes = s.main_bytes + ch.get("wire_bytes", 0)
            normal_mfd = ch.get("normal_pages", 0)
            zero_mfd = ch.get("zero_pages", 0)
        else:
            s.multifd_bytes = 0
            s.wire_bytes = s.main_bytes
            normal_mfd = zero_mfd = 0
        s.set_transferred(s.main_bytes + s.multifd_bytes)  # and precopy/downtime bytes
        if self._ram is not None:
            c = self._ram.counters
            # duplicate: zero pages found here (main-stream ZERO records, or never-sent
            # zero pages skipped for a fresh destination) plus those the channels found.
            s.duplicate = c.duplicate + zero_mfd
            if self._sender is not None and self.profile.zero_pages_in_multifd:
                s.normal = normal_mfd
            else:
                s.normal = c.normal
            s.normal_bytes = s.normal * self._ram.page_size
            s.dirty_sync_count = c.dirty_sync_count
            s.dirty_pages_rate = c.dirty_pages_rate
            s.remaining = (0 if self.status.is_final() else
                           self._ram.pending_bytes() + self._ram.dirty_estimate_bytes())
        s.total = self.machine.total_ram()
        s.mbps = self._meter.mbps()
        # pages-per-second: the meter's next window closes on the page total noted here
        self._meter.note_pages(int(s.normal + s.duplicate))
        s.pages_per_second = self._meter.pages_per_second()

    def _root_cause(self, exc: BaseException) -> str:
        """The error to report: a failed multifd channel is the cause, a main-stream error
        it provoked at the destination only the fallout; a channel reset that no thread
        has read yet is named too."""
        text = _describe(exc)
        if isinstance(exc, MigrationCancelled):
            return text
        main = self._main_sock
        if main is not None and "main channel" not in text:
            # a failing destination resets main; only a clean close (FIN) is a cause
            import socket

            try:
                if main.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    return f"the destination closed the main channel (then: {text})"
            except OSError:
                pass
        sender = self._sender
        if sender is None:
            return text
        if sender.error is not None and str(sender.error) not in text:
            return f"{sender.error} (then: {text})"
        if sender.error is None:
            import socket

            for ch in sender.channels:
                try:
                    ch.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except (ConnectionResetError, BrokenPipeError) as err:
                    return f"{text} (multifd channel {ch.id}: {err.strerror or err})"
                except OSError:
                    continue
        return text

    def _phase(self, name: str) -> None:
        self.phase = name
        self._mark("phase", name=name)
        if self.on_phase is not None:
            self.on_phase(name)

    def _mark(self, event: str, /, **fields: Any) -> None:
        """An event on the timeline, when one is recorded."""
        if self.timeline is not None:
            self.timeline.event(event, **fields)

    _main_sock: Any = None
    _mapped: MappedRamOutput | None = None  # the file, with the mapped-ram capability

    def _check_destination_alive(self) -> None:
        """Before the last records: a main channel already closed or reset by the peer
        means the destination is gone; fail now rather than "complete" into nothing."""
        sock = self._main_sock
        if sock is None:
            return
        import socket

        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise ConnectionError(f"main channel to the destination failed: "
                                  f"{exc.strerror or exc}") from exc
        if not data:
            raise ConnectionError("the destination closed the main channel before completion")

    def _await_destination(self) -> None:
        """Wait for the destination to close the main channel after loading.

        Without a return path its clean close (FIN) is the only "loaded and running"
        signal: a reset means it failed, silence for x-confirm-timeout means it is stuck
        (e.g. a channel stalled). Either way the source fails and keeps the machine.
        """
        sock = self._main_sock
        if sock is None:
            return
        import select

        confirm = float(self.params.get("x-confirm-timeout"))
        deadline = time.monotonic() + confirm
        buf = bytearray(4096)
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        while True:
            self._check_cancel()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the destination did not confirm the end of the migration "
                                   f"(close its main channel) within {confirm:g} s, "
                                   "x-confirm-timeout")
            if not poller.poll(min(left, 0.1) * 1000):
                continue
            try:
                n = sock.recv_into(buf)
            except OSError as exc:
                raise ConnectionError(f"the destination failed at the end of the migration: "
                                      f"main channel {exc.strerror or exc}") from exc
            if n == 0:
                self._check_cancel()  # our own shutdown (migrate_cancel) reads as EOF too
                _check_fin_after_data(sock)
                return

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise MigrationCancelled("migration cancelled")

    def _set_status(self, st: MigrationStatus) -> None:
        try:
            self.status.set(st)
        except IllegalTransition:
            return
        self._emit("MIGRATION", {"status": st.value})

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(name, data)
            except Exception:
                pass

    def _abort_io(self, why: str) -> None:
        if self._sender is not None:
            self._sender.abort(why)
        shut = getattr(self, "_shutdown_main", None)
        if shut is not None:
            try:
                shut()
            except OSError:
                pass
        if self._main_sock is not None:  # reset, not FIN: see Sender.abort
            import socket
            import struct

            try:
                self._main_sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
            except OSError:
                pass
        self._close_io(clean=False)

    def _close_io(self, clean: bool) -> None:
        closers, self._closers = self._closers, []
        if clean and self._sender is not None:
            self._sender.close()
        for c in closers:
            try:
                c()
            except Exception:
                pass


def _check_fin_after_data(sock: Any) -> None:
    """The destination's FIN confirms only if it came after all our data: a peer that
    closed (died) first answers our last bytes with a reset (SO_ERROR) or leaves them
    unacknowledged (SIOCOUTQ > 0)."""
    import fcntl
    import socket
    import struct
    import termios

    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise ConnectionError(f"the destination closed the main channel before reading the "
                              f"end of the stream ({os.strerror(err)})")
    try:
        unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                 b"\0" * 4))[0]
    except OSError:
        return
    if unacked:
        raise ConnectionError(f"the destination closed the main channel with {unacked} bytes "
                              "of the stream not received")


def _main_sender(sock: Any) -> Callable[[Sequence[Any]], None]:
    """Main-stream send that names the main channel in its errors."""

    def send(bufs: Sequence[Any]) -> None:
        try:
            sendmsg_all(sock, bufs)
        except OSError as exc:
            what = exc.strerror or str(exc) or type(exc).__name__
            if "main channel" in what:  # the transport named it already (TLS errors)
                raise
            raise ConnectionError(f"main channel: {what}") from exc

    return send


def _shutdown(sock: Any) -> None:
    import socket

    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text

