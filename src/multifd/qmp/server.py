"""QMP protocol server: greeting, capabilities negotiation, dispatch, events, listeners.

Speaks QEMU's QMP (docs/interop/qmp-spec) so unmodified clients (``qemu.qmp``) work:

* on connect the server sends ``{"QMP": {"version": ..., "capabilities": []}}``; until the
  client runs ``qmp_capabilities`` every other command fails with CommandNotFound
  ("Expecting capabilities negotiation with 'qmp_capabilities'") and no events are sent;
* a stream of JSON objects (we end each with ``\\r\\n`` like QEMU); ``id`` is
  echoed; success is ``{"return": ...}``, failure ``{"error": {"class", "desc"}}``;
* events ``{"event", "data", "timestamp": {"seconds", "microseconds"}}`` go to every
  negotiated client.

Threads: one acceptor for all listeners, and per client a reader (parses and dispatches)
and a writer (drains the client's queue). `emit` only appends to queues, so a slow client
never blocks the caller (the migration thread); a client that lets more than
`MAX_QUEUED` messages pile up is disconnected. Commands from all clients run one at a
time under one lock, as QEMU's monitor commands run under the BQL.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from multifd import __version__
from multifd.migration.params import ParameterError
from multifd.transport.sockets import accept_nowait
from multifd.transport.uri import TcpAddress, UnixAddress, parse_uri

__all__ = [
    "MAX_LINE",
    "MAX_QUEUED",
    "ArgSpec",
    "JsonSplitter",
    "QmpCommand",
    "QmpError",
    "QmpServer",
    "check_args",
]

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # longest accepted input line; longer input drops the client
MAX_QUEUED = 4096  # unsent messages per client before it is disconnected
CLOSE_FLUSH_S = 1.0  # how long close() lets writers flush queued replies
JOIN_S = 5.0

_TYPE_NAMES = {"str": "string", "bool": "boolean", "int": "integer", "list": "array",
               "object": "object", "any": "value"}


class QmpError(Exception):
    """A QMP error reply: ``{"error": {"class": cls, "desc": desc}}``."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


@dataclass(frozen=True)
class ArgSpec:
    """One command argument: its QAPI-ish type and whether it is required."""

    type: str  # "str", "bool", "int", "list", "object", "any"
    required: bool = False


Handler = Callable[[dict[str, Any]], Any]


@dataclass
class QmpCommand:
    """A registered command. ``args=None`` means boxed: the handler validates everything.

    ``after`` runs once the reply is queued (``quit`` uses it so the reply goes out first).
    """

    name: str
    handler: Handler
    args: dict[str, ArgSpec] | None = field(default_factory=dict)
    after: Callable[[], None] | None = None


def check_args(args: Mapping[str, Any], spec: Mapping[str, ArgSpec]) -> None:
    """Validate ``args`` against ``spec`` with QEMU's error texts (raises QmpError)."""
    for name in args:
        if name not in spec:
            raise QmpError(f"Parameter '{name}' is unexpected")
    for name, sp in spec.items():
        if name not in args:
            if sp.required:
                raise QmpError(f"Parameter '{name}' is missing")
            continue
        value = args[name]
        ok = {
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "list": isinstance(value, list),
            "object": isinstance(value, dict),
            "any": True,
        }[sp.type]
        if not ok:
            raise QmpError(
                f"Invalid parameter type for '{name}', expected: {_TYPE_NAMES[sp.type]}"
            )


def _timestamp() -> dict[str, int]:
    now = time.time()
    sec = int(now)
    return {"seconds": sec, "microseconds": int((now - sec) * 1_000_000)}


def _encode(msg: Mapping[str, Any]) -> bytes:
    return json.dumps(msg).encode() + b"\r\n"


# -- listeners ------------------------------------------------------------------------------
def _format_address(addr: TcpAddress | UnixAddress) -> str:
    if isinstance(addr, UnixAddress):
        return f"unix:{addr.path}"
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    return f"tcp:{host}:{addr.port}"


class _Listening:
    """A listening socket for QMP; a unix socket file is created owner-only (0600)."""

    def __init__(self, address: str) -> None:
        addr = parse_uri(address)
        self.path: str | None = None
        self._ino: tuple[int, int] | None = None
        if isinstance(addr, UnixAddress):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                _remove_stale_socket(addr.path)
                # Linux takes a socket file's mode from the socket inode: set it before
                # bind so the file never exists with wider permissions; chmod after, too.
                os.fchmod(sock.fileno(), 0o600)
                sock.bind(addr.path)
                os.chmod(addr.path, 0o600)
                st = os.stat(addr.path)
                self.path, self._ino = addr.path, (st.st_dev, st.st_ino)
                sock.listen(16)
            except OSError as exc:
                sock.close()
                raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror or exc}"
                              ) from exc
            self.address = _format_address(addr)
        elif isinstance(addr, TcpAddress):
            host = addr.host or "0.0.0.0"
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                sock = socket.create_server((host, addr.port), family=family, backlog=16)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror or exc}"
                              ) from exc
            self.address = _format_address(TcpAddress(host, sock.getsockname()[1]))
        else:
            raise ValueError(f"QMP listens on unix:PATH or tcp:HOST:PORT, not {address!r}")
        sock.setblocking(False)
        self.sock = sock

    def accept(self) -> socket.socket | None:
        return accept_nowait(self.sock)

    def close(self) -> None:
        self.sock.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._ino:
                    os.unlink(self.path)
            self.path = None


def _remove_stale_socket(path: str) -> None:
    """Replace an old socket file (as QEMU does); refuse to replace anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    os.unlink(path)


class JsonSplitter:
    """Cuts a byte stream into top-level JSON texts, as QEMU's streaming parser does.

    Clients need not end a message with a newline (``qemu.qmp`` sends none): an object or
    array ends where its brackets balance outside strings; anything else ends at a
    newline. Scanning resumes where it stopped, so a long message is scanned once.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # next byte to scan
        self._start = -1  # start of the current text, -1 between texts
        self._depth = 0
        self._in_str = False
        self._esc = False

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        buf, i, n = self._buf, self._pos, len(self._buf)
        while i < n:
            c = buf[i]
            if self._start < 0:
                if c in b" \t\r\n":
                    i += 1
                    continue
                self._start = i
                self._depth = 0
            if self._depth == 0 and buf[self._start] not in b"{[":
                nl = buf.find(b"\n", i)
                if nl < 0:
                    i = n
                    break
                out.append(bytes(buf[self._start:nl]))
                self._start, i = -1, nl + 1
                continue
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == 0x5C:  # backslash
                    self._esc = True
                elif c == 0x22:
                    self._in_str = False
            elif c == 0x22:
                self._in_str = True
            elif c in b"{[":
                self._depth += 1
            elif c in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    out.append(bytes(buf[self._start:i + 1]))
                    self._start = -1
            i += 1
        if self._start < 0:
            del buf[:i]
            self._pos = 0
        else:
            del buf[:self._start]
            self._pos, self._start = i - self._start, 0
        return out


# -- one client -----------------------------------------------------------------------------
class _Client:
    """One connection: a reader thread that dispatches and a writer thread that sends."""

    def __init__(self, server: QmpServer, sock: socket.socket, name: str) -> None:
        self.server = server
        self.sock = sock
        self.name = name
        self.negotiated = False
        self._out: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self.reader = threading.Thread(target=self._read_loop, name=f"{name}-rx", daemon=True)
        self.writer = threading.Thread(target=self._write_loop, name=f"{name}-tx", daemon=True)

    def start(self) -> None:
        self.writer.start()
        self.reader.start()

    # output
    def send(self, msg: Mapping[str, Any]) -> None:
        data = _encode(msg)
        with self._cond:
            if self._closing:
                return
            if len(self._out) >= MAX_QUEUED:
                log.warning("QMP client %s is not reading; disconnecting it", self.name)
                self._closing = True
                self._out.clear()
                self._cond.notify_all()
                self._shutdown()
                return
            self._out.append(data)
            self._cond.notify_all()

    def _write_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._out and not self._closing:
                        self._cond.wait()
                    if not self._out:
                        return
                    batch = b"".join(self._out)
                    self._out.clear()
                self.sock.sendall(batch)
        except OSError:
            pass
        finally:
            with self._cond:
                self._closing = True
                self._out.clear()
            self._shutdown()  # wakes the reader

    def close(self) -> None:
        """Stop taking messages; the writer flushes what is queued, then shuts down."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # input
    def _read_loop(self) -> None:
        try:
            self.send(self.server.greeting())
            splitter = JsonSplitter()
            while True:
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                for msg in splitter.feed(data):
                    self.server._handle_line(self, msg)
                if splitter.pending > MAX_LINE:
                    self.send({"error": {"class": "GenericError",
                                         "desc": "JSON parse error, input too long"}})
                    break
        except Exception:
            log.exception("QMP client %s failed", self.name)
        finally:
            self.close()
            self.writer.join(JOIN_S)
            self._shutdown()
            self.sock.close()
            self.server._forget(self)


# -- the server -----------------------------------------------------------------------------
class QmpServer:
    """A QMP server: `register` commands, `listen` on addresses, `emit` events, `close`."""

    def __init__(
        self,
        *,
        version: tuple[int, int, int] = (7, 2, 0),
        package: str = f"multifd {__version__}",
    ) -> None:
        self.version = version
        self.package = package
        self._commands: dict[str, QmpCommand] = {}
        self._lock = threading.RLock()  # commands run one at a time (QEMU's BQL)
        self._clients_lock = threading.Lock()
        self._clients: set[_Client] = set()
        self._listeners: list[_Listening] = []
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._acceptor: threading.Thread | None = None
        self._closed = False
        self._seq = 0
        self.quit_requested = threading.Event()
        self.on_quit: list[Callable[[], None]] = []
        self.on_close: list[Callable[[], None]] = []
        self.register("qmp_capabilities", self._qmp_capabilities,
                      args={"enable": ArgSpec("list")})
        self.register("query-version", lambda _a: self.version_info())
        self.register("query-commands",
                      lambda _a: [{"name": n} for n in sorted(self._commands)])
        self.register("quit", lambda _a: {}, after=self._after_quit)

    # -- configuration ----------------------------------------------------------------------
    def register(
        self,
        name: str,
        handler: Handler,
        *,
        args: dict[str, ArgSpec] | None = None,
        boxed: bool = False,
        after: Callable[[], None] | None = None,
    ) -> None:
        """Add (or replace) a command; ``boxed=True`` passes arguments unchecked."""
        self._commands[name] = QmpCommand(name, handler, None if boxed else dict(args or {}),
                                          after)

    @property
    def commands(self) -> list[str]:
        return sorted(self._commands)

    def version_info(self) -> dict[str, Any]:
        major, minor, micro = self.version
        return {"qemu": {"micro": micro, "minor": minor, "major": major},
                "package": self.package}

    def greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": self.version_info(), "capabilities": []}}

    def listen(self, address: str) -> str:
        """Listen on ``unix:PATH`` or ``tcp:HOST:PORT``; return the bound address."""
        if self._closed:
            raise RuntimeError("the QMP server is closed")
        lst = _Listening(address)
        self._listeners.append(lst)
        self._sel.register(lst.sock, selectors.EVENT_READ, lst)
        if self._acceptor is None:
            self._acceptor = threading.Thread(target=self._accept_loop, name="qmp-accept",
                                              daemon=True)
            self._acceptor.start()
        return lst.address

    @property
    def addresses(self) -> list[str]:
        return [lst.address for lst in self._listeners]

    @property
    def client_count(self) -> int:
        with self._clients_lock:
            return len(self._clients)

    # -- events -----------------------------------------------------------------------------
    def emit(self, event: str, data: Mapping[str, Any] | None = None) -> None:
        """Send an event to every negotiated client; never blocks on a client."""
        msg: dict[str, Any] = {"event": event}
        if data is not None:
            msg["data"] = dict(data)
        msg["timestamp"] = _timestamp()
        with self._clients_lock:
            clients = [c for c in self._clients if c.negotiated]
        for c in clients:
            c.send(msg)

    # -- lifecycle --------------------------------------------------------------------------
    def wait_quit(self, timeout: float | None = None) -> bool:
        return self.quit_requested.wait(timeout)

    def close(self) -> None:
        """Stop listening, flush and disconnect clients, join every server thread."""
        if self._closed:
            return
        self._closed = True
        for fn in list(self.on_close):
            try:
                fn()
            except Exception:
                log.exception("QMP on_close hook failed")
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._acceptor is not None and self._acceptor is not threading.current_thread():
            self._acceptor.join(JOIN_S)
        for lst in self._listeners:
            lst.close()
        with self._clients_lock:
            clients = list(self._clients)
        for c in clients:
            c.close()
        # Each writer flushes what it holds (the reply to ``quit`` included: it may be
        # mid-sendall with an empty queue) and exits; one that a client stopped reading
        # from is cut off by the shutdown below.
        me = threading.current_thread()
        deadline = time.monotonic() + CLOSE_FLUSH_S
        for c in clients:
            if c.writer is not me and c.writer.ident is not None:
                c.writer.join(max(0.0, deadline - time.monotonic()))
        for c in clients:
            c._shutdown()
        for c in clients:
            for t in (c.writer, c.reader):
                if t is not me and t.ident is not None:
                    t.join(JOIN_S)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> QmpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                ready = self._sel.select()
            except (OSError, ValueError):
                return
            for key, _ in ready:
                lst = key.data
                if lst is None:
                    return  # woken by close()
                try:
                    conn = lst.accept()
                except OSError:
                    continue
                if conn is None:
                    continue
                if self._closed:
                    conn.close()
                    return
                self._seq += 1
                client = _Client(self, conn, f"qmp-client-{self._seq}")
                with self._clients_lock:
                    self._clients.add(client)
                client.start()

    def _forget(self, client: _Client) -> None:
        with self._clients_lock:
            self._clients.discard(client)

    def _handle_line(self, client: _Client, line: bytes) -> None:
        reply, after = self._dispatch(client, line)
        client.send(reply)
        if after is not None:
            after()

    def _dispatch(self, client: _Client, line: bytes
                  ) -> tuple[dict[str, Any], Callable[[], None] | None]:
        try:
            req = json.loads(line)
        except ValueError as exc:
            return _error(QmpError(f"JSON parse error, {exc}")), None
        if not isinstance(req, dict):
            return _error(QmpError("QMP input must be a JSON object")), None
        ident = req.get("id")
        has_id = "id" in req

        def reply(body: dict[str, Any]) -> dict[str, Any]:
            if has_id:
                body["id"] = ident
            return body

        try:
            cmd = self._lookup(client, req)
            args = req.get("arguments", {})
            if cmd.args is not None:
                check_args(args, cmd.args)
            with self._lock:
                ret = cmd.handler(dict(args))
        except QmpError as exc:
            return reply(_error(exc)), None
        except ParameterError as exc:
            return reply(_error(QmpError(exc.desc))), None
        except Exception as exc:  # a handler bug must not kill the connection
            log.exception("QMP command failed")
            return reply(_error(QmpError(str(exc) or type(exc).__name__))), None
        after = cmd.after
        if cmd.name == "qmp_capabilities":  # events only after the reply went out

            def after() -> None:
                client.negotiated = True

        return reply({"return": {} if ret is None else ret}), after

    def _lookup(self, client: _Client, req: dict[str, Any]) -> QmpCommand:
        for key in req:
            if key not in ("execute", "arguments", "id", "control"):
                raise QmpError(f"QMP input member '{key}' is unexpected")
        if "execute" not in req:
            raise QmpError("QMP input lacks member 'execute'")
        name = req["execute"]
        if not isinstance(name, str):
            raise QmpError("QMP input member 'execute' must be a string")
        if "arguments" in req and not isinstance(req["arguments"], dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        if not client.negotiated and name != "qmp_capabilities":
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                           "CommandNotFound")
        if client.negotiated and name == "qmp_capabilities":
            raise QmpError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
        cmd = self._commands.get(name)
        if cmd is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        return cmd

    def _qmp_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        for cap in args.get("enable", []):
            raise QmpError(f"Capability '{cap}' not available")
        return {}

    def _after_quit(self) -> None:
        self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        self.quit_requested.set()
        for fn in list(self.on_quit):
            try:
                fn()
            except Exception:
                log.exception("QMP on_quit hook failed")


def _error(exc: QmpError) -> dict[str, Any]:
    return {"error": {"class": exc.cls, "desc": exc.desc}}
