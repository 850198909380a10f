"""Fault injection for migration tests and `multifd demo --inject-fault`.

A loopback TCP proxy sits between a source and a destination and breaks one connection on
command, so every failure path (a reset channel, a stalled channel, a closed main channel,
a dead peer) can be reproduced at a chosen phase of a real migration.

    source --conn i--> FaultProxy --conn i--> destination
           (accept i, connect i to the destination, only then accept i+1: the order the
            source connected in is the order the destination sees, as a 7.2 peer needs)

Each connection has one relay thread (non-blocking sockets, poll, 1 MiB per direction at
most). Its first bytes from the source name it: ``QEVM`` is the main channel, the multifd
magic 0x11223344 plus the init packet's id byte (offset 24) is multifd channel N.

Faults (``KIND[:N]@PHASE``):

* ``reset-channel:N`` - RST on both legs of multifd channel N (SO_LINGER 0, close);
* ``stall-channel:N`` - stop reading channel N from the source and stop forwarding what was
  read: the source's sends fill the socket buffers and block. The source closing or
  resetting that channel still gets through, as a reset of the destination's leg (so a
  source that gives up on a stalled channel also fails the destination at once);
* ``close-main`` - close both legs of the main channel cleanly (FIN);
* ``kill-destination`` / ``kill-source`` - SIGKILL of that process, done by the
  orchestrator (`FaultProxy.inject` only simulates them in-process: RST on every leg).

Phases are the source's `MigrationSource.on_phase` points, called on the migration thread,
so an injection made inside the callback lands before the source's next byte:

* ``setup`` - connections made, before RAM START (a fault on a connection not identified
  yet is armed and fires as soon as its first bytes name it);
* ``iterate`` - status active, before the first RAM pass;
* ``switchover`` - machine paused, before RAM END (the final dirty pages);
* ``device-state`` - after RAM END, before device state goes out as multifd buffers (only
  with a device using multifd device state; never reached otherwise);
* ``completion`` - everything sent but the final sections, EOF and VMDESC.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PHASES = ("setup", "iterate", "switchover", "device-state", "completion")
NETWORK_FAULTS = ("reset-channel", "stall-channel", "close-main")
KILL_FAULTS = ("kill-destination", "kill-source")
FAULT_KINDS = NETWORK_FAULTS + KILL_FAULTS

_QEVM = b"QEVM"
_MULTIFD_MAGIC = struct.pack(">I", 0x11223344)
_CHANNEL_ID_OFFSET = 24  # magic u32, version u32, uuid[16], id u8
_CHUNK = 256 << 10
_BUFFER_LIMIT = 1 << 20  # bytes held per direction before we stop reading
_LINGER_RST = struct.pack("ii", 1, 0)
_RDHUP = getattr(select, "POLLRDHUP", 0x2000)


@dataclass(frozen=True)
class Fault:
    """One fault: what breaks (`kind`, `channel` for channel faults) and when (`phase`)."""

    kind: str
    phase: str
    channel: int | None = None

    @property
    def spec(self) -> str:
        ch = f":{self.channel}" if self.channel is not None else ""
        return f"{self.kind}{ch}@{self.phase}"


def parse_fault(spec: str) -> Fault:
    """``reset-channel:1@switchover`` -> Fault; raises ValueError naming what is wrong."""
    what, sep, phase = spec.strip().partition("@")
    if not sep or phase not in PHASES:
        raise ValueError(f"fault {spec!r}: expected KIND[:N]@PHASE, PHASE one of "
                         f"{', '.join(PHASES)}")
    kind, _, num = what.partition(":")
    if kind not in FAULT_KINDS:
        raise ValueError(f"fault {spec!r}: unknown kind {kind!r} (one of "
                         f"{', '.join(FAULT_KINDS)})")
    needs_channel = kind in ("reset-channel", "stall-channel")
    if needs_channel != bool(num):
        raise ValueError(f"fault {spec!r}: {kind} " +
                         ("needs a channel number (KIND:N)" if needs_channel else
                          "takes no channel number"))
    channel = None
    if num:
        if not num.isdigit() or int(num) > 254:
            raise ValueError(f"fault {spec!r}: channel must be 0..254")
        channel = int(num)
    return Fault(kind, phase, channel)


def _rst(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer's next call fails with ECONNRESET."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


class _Conn:
    """One proxied connection and its relay thread."""

    def __init__(self, proxy: FaultProxy, index: int, a: socket.socket,
                 b: socket.socket) -> None:
        self.proxy = proxy
        self.index = index
        self.a = a  # source side
        self.b = b  # destination side
        self.name: str | None = None  # "main" or "multifd:N" once identified
        self.bytes_up = 0  # source -> destination, forwarded
        self.bytes_down = 0
        # every byte the source sent, when the proxy records (a migration capture)
        self.recorded: bytearray | None = bytearray() if proxy.record else None
        self.outcome = ""
        self._prefix = bytearray()
        self._commands: list[str] = []
        self._applied = threading.Event()  # set once the last command took effect
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.thread = threading.Thread(target=self._run, name=f"faultproxy-{index}",
                                       daemon=True)

    def command(self, what: str, wait: float = 0.0) -> None:
        """Queue `what` for the relay thread; wait up to `wait` s until it took effect."""
        with self._lock:
            self._commands.append(what)
            done = self._applied = threading.Event()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if wait and self.thread.is_alive():
            done.wait(wait)

    def _identify(self, data: bytes) -> None:
        if self.name is not None:
            return
        self._prefix += data[: 64]
        p = bytes(self._prefix)
        if len(p) >= 4 and p[:4] == _QEVM:
            self.name = "main"
        elif len(p) >= 4 and p[:4] == _MULTIFD_MAGIC:
            if len(p) > _CHANNEL_ID_OFFSET:
                self.name = f"multifd:{p[_CHANNEL_ID_OFFSET]}"
        elif len(p) >= 4:
            self.name = "unknown"
        if self.name is not None:
            self.proxy._identified(self)

    def _run(self) -> None:
        a, b = self.a, self.b
        for s in (a, b):
            s.setblocking(False)
        up = bytearray()  # read from a, not yet written to b
        down = bytearray()
        a_eof = b_eof = False
        a_shut = b_shut = False  # FIN forwarded
        stalled = False
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                with self._lock:
                    cmds, self._commands = self._commands, []
                    applied = self._applied if cmds else None
                if applied is not None and "stall" in cmds:
                    applied.set()
                for cmd in cmds:
                    if cmd in ("reset", "kill"):
                        self.outcome = cmd
                        _rst(a)
                        _rst(b)
                        return
                    if cmd == "close":
                        self.outcome = "closed"
                        a.close()
                        b.close()
                        return
                    if cmd == "stall":
                        self.outcome = "stalled"
                        stalled = True
                if a_eof and b_eof and not up and not down:
                    self.outcome = self.outcome or "done"
                    a.close()
                    b.close()
                    return
                ev_a = 0 if (a_eof or len(up) >= _BUFFER_LIMIT) else select.POLLIN
                if stalled:
                    ev_a = _RDHUP  # the source's close still gets through, as a reset
                if down:
                    ev_a |= select.POLLOUT
                ev_b = 0 if (b_eof or len(down) >= _BUFFER_LIMIT) else select.POLLIN
                if up and not stalled:
                    ev_b |= select.POLLOUT
                poller.register(a, ev_a)  # 0: still told about POLLERR/POLLHUP (a reset)
                poller.register(b, ev_b)
                events = dict(poller.poll(1000))
                if events.get(self._wake_r.fileno()):
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                fa = events.get(a.fileno(), 0)
                fb = events.get(b.fileno(), 0)
                if (fa | fb) & select.POLLERR:  # a reset on one leg resets the other
                    self.outcome = "reset by " + ("source" if fa & select.POLLERR
                                                  else "destination")
                    _rst(a)
                    _rst(b)
                    return
                if stalled and fa & (select.POLLERR | select.POLLHUP | _RDHUP):
                    self.outcome = "reset"  # the source gave up on the stalled channel
                    _rst(a)
                    _rst(b)
                    return
                if fa & (select.POLLIN | select.POLLERR | select.POLLHUP) and ev_a & select.POLLIN:
                    try:
                        data = a.recv(_CHUNK)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except OSError:
                        self.outcome = "reset by source"
                        _rst(a)
                        _rst(b)
                        return
                    if data is not None:
                        if data:
                            self._identify(data)
                            up += data
                            if self.recorded is not None:
                                self.recorded += data
                            if self.name is not None:
                                self.proxy._check_armed(self)
                        else:
                            a_eof = True
                if fb & (select.POLLIN | select.POLLERR | select.POLLHUP) and ev_b & select.POLLIN:
                    try:
                        data = b.recv(_CHUNK)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except OSError:
                        self.outcome = "reset by destination"
                        _rst(a)
                        _rst(b)
                        return
                    if data is not None:
                        if data:
                            down += data
                        else:
                            b_eof = True
                try:
                    if up and not stalled and fb & (select.POLLOUT | select.POLLERR):
                        n = b.send(up)
                        del up[:n]
                        self.bytes_up += n
                    if down and fa & (select.POLLOUT | select.POLLERR):
                        n = a.send(down)
                        del down[:n]
                        self.bytes_down += n
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:  # one end is gone: the other gets a reset, like TCP would
                    self.outcome = "peer gone"
                    _rst(a)
                    _rst(b)
                    return
                if a_eof and not up and not b_shut and not stalled:
                    b_shut = True
                    with contextlib.suppress(OSError):
                        b.shutdown(socket.SHUT_WR)
                if b_eof and not down and not a_shut:
                    a_shut = True
                    with contextlib.suppress(OSError):
                        a.shutdown(socket.SHUT_WR)
        except BaseException:  # never leave a half-open relay behind
            _rst(a)
            _rst(b)
            raise
        finally:
            self._applied.set()
            self._wake_r.close()
            self._wake_w.close()


class FaultProxy:
    """Loopback TCP proxy that relays a migration and breaks it on command.

    `uri` is where the source connects; `target` is the destination's (host, port).
    At most `max_connections` connections are relayed (more are refused with RST).
    """

    def __init__(self, target: tuple[str, int], *, max_connections: int = 32,
                 connect_timeout: float = 5.0, record: bool = False) -> None:
        self.target = target
        self.record = record
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.conns: list[_Conn] = []
        self.injected: list[str] = []
        self._armed: list[tuple[str, str]] = []  # (connection name, command)
        self._cv = threading.Condition()
        self._closing = False
        self._refuse = False
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy-accept",
                                        daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    @classmethod
    def for_uri(cls, uri: str, **kw: Any) -> FaultProxy:
        """A proxy to a ``tcp:HOST:PORT`` destination URI."""
        _, host, port = uri.rsplit(":", 2)
        return cls((host.strip("[]") or "127.0.0.1", int(port)), **kw)

    # -- accepting, in order ------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                a, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._refuse or len(self.conns) >= self.max_connections:
                _rst(a)
                continue
            try:  # connect i before accepting i+1: the destination sees the same order
                b = socket.create_connection(self.target, timeout=self.connect_timeout)
            except OSError:
                _rst(a)
                continue
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(self, len(self.conns), a, b)
            with self._cv:
                self.conns.append(conn)
                self._cv.notify_all()
            conn.thread.start()

    def _identified(self, conn: _Conn) -> None:
        with self._cv:
            self._cv.notify_all()

    def _check_armed(self, conn: _Conn) -> None:
        with self._cv:
            hits = [c for c in self._armed if c[0] == conn.name]
            self._armed = [c for c in self._armed if c[0] != conn.name]
        for _, cmd in hits:
            conn.command(cmd)

    # -- faults ---------------------------------------------------------------------------
    def find(self, name: str) -> _Conn | None:
        with self._cv:
            return next((c for c in self.conns if c.name == name), None)

    def wait_identified(self, name: str, timeout: float) -> _Conn:
        """The connection called `name` ("main", "multifd:N"), waiting for it."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                conn = next((c for c in self.conns if c.name == name), None)
                if conn is not None:
                    return conn
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fault proxy: no {name} connection in {timeout:g} s")
                self._cv.wait(left)

    def _command(self, name: str, cmd: str) -> None:
        """Send `cmd` to connection `name` now, or arm it for when it is identified."""
        with self._cv:
            conn = next((c for c in self.conns if c.name == name), None)
            if conn is None:
                self._armed.append((name, cmd))
        if conn is not None:  # synchronous: the fault is in place when we return
            conn.command(cmd, wait=2.0)

    def reset_channel(self, n: int) -> None:
        self._command(f"multifd:{n}", "reset")

    def stall_channel(self, n: int) -> None:
        self._command(f"multifd:{n}", "stall")

    def close_main(self) -> None:
        self._command("main", "close")

    def reset_all(self) -> None:
        """What a killed peer looks like from the other end: every connection reset and
        nothing new gets through."""
        with self._cv:
            self._refuse = True
            conns = list(self.conns)
        for c in conns:
            c.command("kill", wait=2.0)

    def inject(self, fault: Fault) -> None:
        """Apply `fault` now (kill-* are simulated with `reset_all`)."""
        self.injected.append(fault.spec)
        if fault.kind == "reset-channel":
            assert fault.channel is not None
            self.reset_channel(fault.channel)
        elif fault.kind == "stall-channel":
            assert fault.channel is not None
            self.stall_channel(fault.channel)
        elif fault.kind == "close-main":
            self.close_main()
        else:
            self.reset_all()

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, reset what is still open, join every thread."""
        self._closing = True
        self._thread.join(timeout)
        self._listener.close()
        with self._cv:
            conns = list(self.conns)
        deadline = time.monotonic() + timeout
        for c in conns:
            if c.thread.is_alive():
                c.command("reset")
            c.thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- orchestration helpers ------------------------------------------------------------------

def phase_hook(fault: Fault, act: Callable[[Fault], None]) -> Callable[[str], None]:
    """An `on_phase` callback that calls `act(fault)` once, when the fault's phase starts."""
    fired = threading.Event()

    def on_phase(phase: str) -> None:
        if phase == fault.phase and not fired.is_set():
            fired.set()
            act(fault)

    on_phase.fired = fired  # type: ignore[attr-defined]
    return on_phase


def kill_process(pid: int) -> None:
    """SIGKILL: the peer dies with no chance to close anything itself."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def straight_checksum(ram_size: int, seed: int, total_steps: int, stop_at: int, *,
                      device_state_size: int = 0) -> str:
    """Checksum of the demo machine run straight (no migration) from step 0 to `stop_at`.

    Unlike `expected_checksum(total_steps=S)` the cpu keeps `total_steps` (part of its
    state), so it compares with a source stopped at step S of a longer run.
    """
    from multifd.machine.demo import DemoWorkload, build_demo_machine

    machine = build_demo_machine(ram_size, seed=seed, total_steps=total_steps,
                                 device_state_size=device_state_size)
    try:
        work = DemoWorkload(machine)
        while work.cpu.step < stop_at:
            work.step()
        return machine.checksum()
    finally:
        machine.close()


def open_fds() -> int:
    """Open file descriptors of this process (leak checks)."""
    return len(os.listdir("/proc/self/fd"))
