"""A stateful line-protocol service that moves itself to a new process, live.

The state is a numpy table of int64 counters (default 1 GiB) plus, for exactly-once
updates, the last request number and answer of each client; all of it lives in a multifd
`Machine` (`Machine.array`: kernel write tracking, no marking), with a small
`PickleDevice` for the service's metadata. Clients talk to it over TCP, one line each way:

    ADD <client> <seq> <row> <delta>   -> OK <new value>   (applied once per client+seq)
    GET <row>                          -> VALUE <value>
    SUM                                -> SUM <total>
    INFO                               -> INFO pid=<pid> generation=<n> rows=<rows>
    UPGRADE [cpr-transfer|precopy]     -> OK pid=<new pid>
    MIGRATE <uri> <host>:<port>        -> OK moved to <host>:<port>

UPGRADE (same host): the service starts its successor, which inherits the listening
socket (so no connection is ever refused) and waits on a unix socket for the state; the
service migrates into it (`cpr-transfer`: the table's memfds are handed over, nothing is
copied; `precopy`: copied live) and exits. MIGRATE (another host): the service migrates
into a successor started there with ``--incoming URI`` (TCP, normally with TLS), then
answers every request with ``MOVED <host>:<port>`` for ``--moved-grace`` seconds.

Either way a client sees its connection close (or MOVED) and sends the same request again
to the successor (examples/table_client.py does this): requests that the old process
applied before it paused are answered from the stored answer, the others are applied
once by the successor. Requests run between safe points of the machine (`workload()` +
`safe_point()`), so a pause waits for a request in progress and holds the next ones.

    python examples/table_service.py [--port 7000] [--table-size 1G]
    python examples/table_service.py --incoming tcp:0.0.0.0:4444 --tls-creds DIR --port 7000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from multifd import Machine, MigrationDestination, MigrationSource, PickleDevice
from multifd.migration.params import MigrationCapabilities, MigrationParameters

MAX_CLIENTS = 4096


class TableService:
    """The table, its exactly-once bookkeeping and the migration plumbing."""

    def __init__(self, args: argparse.Namespace, *, incoming: bool) -> None:
        self.args = args
        rows = args.table_size // 8
        self.machine = Machine(incoming=incoming)
        m = self.machine
        self.table = m.array("table", (rows,), "int64", backing="memfd")
        self.last_seq = m.array("last_seq", (MAX_CLIENTS,), "int64", backing="memfd")
        self.last_answer = m.array("last_answer", (MAX_CLIENTS,), "int64", backing="memfd")
        self.meta: dict[str, Any] = {"generation": 0, "pids": []}
        # Pickled state is code: the destination accepts it only under TLS or with this
        # explicit opt-in, given here only for UPGRADE's unix socket (same host, in a 0700
        # directory of this user).
        same_host = (args.incoming or "").startswith("unix:")
        m.add_device(PickleDevice("service", lambda: self.meta, self.meta.update,
                                  allow_pickle=same_host))
        self.lock = threading.Lock()
        self.stop = threading.Event()  # set once the state has left this process
        self.answered = threading.Event()  # ... and UPGRADE / MIGRATE got its answer
        self.moved_to: str | None = None
        self.conns: set[socket.socket] = set()
        self.listener: socket.socket | None = None

    # -- migration ---------------------------------------------------------------------
    def _params(self, mode: str) -> tuple[MigrationParameters, MigrationCapabilities]:
        params = MigrationParameters(**{
            "mode": mode, "max-bandwidth": 0, "downtime-limit": self.args.downtime_limit,
            "tls-creds": self.args.tls_creds, "tls-hostname": self.args.tls_hostname})
        caps = MigrationCapabilities()
        caps.set([{"capability": "multifd", "state": True}])
        return params, caps

    def receive(self, uri: str, mode: str, ready_fd: int | None, service: str) -> None:
        """Successor: wait for the state on `uri`; the machine runs once it is loaded.
        `service` (host:port of our client listener) is printed for MIGRATE's caller."""
        params, caps = self._params(mode)
        dst = MigrationDestination(self.machine, params=params, caps=caps)
        bound = dst.listen(uri)
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
        else:
            print(f"INCOMING {bound} service={service}", flush=True)
        if str(dst.wait()) != "completed":
            raise SystemExit(f"incoming migration failed: {dst.error}")
        self.meta["generation"] += 1
        self.meta["pids"].append(os.getpid())

    def _migrate(self, uri: str, mode: str) -> str | None:
        """Send the state; None when it is gone (this process must stop), else the error
        (the machine runs on here, untouched)."""
        params, caps = self._params(mode)
        src = MigrationSource(self.machine, params=params, caps=caps)
        src.start(uri)
        if str(src.wait()) != "completed":
            return src.error or "migration failed"
        self.stop.set()
        self.machine.kick()  # requests held at a safe point give up: the successor has them
        return None

    def upgrade(self, mode: str) -> str:
        """Start a successor that inherits the listener, hand the state over to it."""
        assert self.listener is not None
        tmp = tempfile.mkdtemp(prefix="table-service-")  # 0700: only this user connects
        uri = f"unix:{tmp}/handover.sock"
        ready_r, ready_w = os.pipe()
        lfd = self.listener.fileno()
        argv = [sys.executable, os.path.abspath(__file__), "--listen-fd", str(lfd),
                "--incoming", uri, "--incoming-mode", mode, "--ready-fd", str(ready_w),
                "--table-size", str(self.args.table_size),
                "--downtime-limit", str(self.args.downtime_limit)]
        child = subprocess.Popen(argv, pass_fds=(lfd, ready_w))
        os.close(ready_w)
        try:
            with os.fdopen(ready_r, "rb") as ready:
                if ready.readline() != b"ready\n":
                    return "ERR the successor did not start"
            err = self._migrate(uri, mode)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if err is not None:
            child.kill()
            return f"ERR {err}"
        self._drop_connections()
        return f"OK pid={child.pid}"

    def migrate(self, uri: str, moved_to: str) -> str:
        err = self._migrate(uri, "normal")
        if err is not None:
            return f"ERR {err}"
        self.moved_to = moved_to
        return f"OK moved to {moved_to}"

    # -- requests ------------------------------------------------------------------------
    def handle(self, line: str) -> str | None:
        """The answer to one request line; None: close without answering (handed over)."""
        words = line.split()
        if not words:
            return "ERR empty request"
        cmd = words[0].upper()
        if cmd == "UPGRADE":
            mode = words[1] if len(words) > 1 else "cpr-transfer"
            if mode not in ("cpr-transfer", "precopy"):
                return "ERR mode must be cpr-transfer or precopy"
            return self.upgrade("normal" if mode == "precopy" else mode)
        if cmd == "MIGRATE" and len(words) == 3:
            return self.migrate(words[1], words[2])
        m = self.machine
        with m.workload():
            if self.stop.is_set() or not m.safe_point(self.stop):
                return f"MOVED {self.moved_to}" if self.moved_to else None
            with self.lock:
                return self._apply(cmd, words[1:])

    def _apply(self, cmd: str, a: list[str]) -> str:
        try:
            if cmd == "ADD" and len(a) == 4:
                client, seq, row, delta = (int(x) for x in a)
                if not 0 <= client < MAX_CLIENTS:
                    return "ERR bad client"
                if seq == self.last_seq[client]:
                    return f"OK {self.last_answer[client]}"  # a retry: answered before
                if seq < self.last_seq[client]:
                    return "ERR stale seq"
                self.table[row] += delta
                self.last_seq[client] = seq
                self.last_answer[client] = self.table[row]
                return f"OK {self.table[row]}"
            if cmd == "GET" and len(a) == 1:
                return f"VALUE {self.table[int(a[0])]}"
            if cmd == "SUM" and not a:
                return f"SUM {int(self.table.sum())}"
            if cmd == "INFO" and not a:
                return (f"INFO pid={os.getpid()} generation={self.meta['generation']} "
                        f"rows={self.table.size}")
        except (ValueError, IndexError) as exc:
            return f"ERR {exc}"
        return "ERR unknown request"

    # -- connections ---------------------------------------------------------------------
    def serve(self, listener: socket.socket) -> None:
        """Accept and serve until the state has left (then, after MIGRATE, the grace)."""
        self.listener = listener
        listener.settimeout(0.05)
        while not self.stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            with self.lock:
                self.conns.add(conn)
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()
        self.answered.wait(10)  # exiting sooner would cut the admin's answer off
        if self.moved_to is not None:  # tell late clients where the service went
            end = time.monotonic() + self.args.moved_grace
            while time.monotonic() < end:
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                conn.settimeout(None)
                threading.Thread(target=self._connection, args=(conn,), daemon=True).start()
        listener.close()
        self._drop_connections()

    def _connection(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f, contextlib.suppress(OSError):
            for raw in f:
                line = raw.decode("ascii", "replace")
                admin = line.split()[:1] in (["UPGRADE"], ["MIGRATE"])
                if admin:
                    with self.lock:  # the admin gets its answer: not dropped with the rest
                        self.conns.discard(conn)
                try:
                    answer = self.handle(line)
                except Exception as exc:  # a bug here must not look like a handover
                    answer = f"ERR {type(exc).__name__}: {exc}"
                if answer is None:
                    break
                try:
                    conn.sendall(answer.encode() + b"\n")
                except OSError:
                    break
                finally:
                    if admin and self.stop.is_set():
                        self.answered.set()
        with self.lock:
            self.conns.discard(conn)

    def _drop_connections(self) -> None:
        """The successor serves from now on: clients reconnect (the listener is shared)."""
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    from multifd.commands.demo import parse_size

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7000, help="client port (0: any)")
    p.add_argument("--table-size", type=parse_size, default=1 << 30)
    p.add_argument("--downtime-limit", type=int, default=50, help="ms (precopy)")
    p.add_argument("--incoming", metavar="URI",
                   help="be a successor: receive the state on URI first")
    p.add_argument("--incoming-mode", default="normal", choices=("normal", "cpr-transfer"),
                   help=argparse.SUPPRESS)
    p.add_argument("--tls-creds", default="", metavar="DIR",
                   help="TLS for MIGRATE / --incoming (QEMU's tls-creds-x509 layout)")
    p.add_argument("--tls-hostname", default="")
    p.add_argument("--moved-grace", type=float, default=10.0,
                   help="seconds to answer MOVED after MIGRATE")
    p.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.incoming_mode == "precopy":
        args.incoming_mode = "normal"
    if args.tls_creds:
        args.tls_creds = os.path.abspath(args.tls_creds)
    svc = TableService(args, incoming=args.incoming is not None)
    if args.listen_fd is not None:  # inherited from the predecessor: never closed
        listener = socket.socket(fileno=args.listen_fd)
    else:
        listener = socket.create_server((args.host, args.port))
    host, port = listener.getsockname()[:2]
    if args.incoming:
        svc.receive(args.incoming, args.incoming_mode, args.ready_fd, f"{host}:{port}")
    else:
        svc.machine.start()
    print(f"SERVING {host}:{port} pid={os.getpid()} "
          f"generation={svc.meta['generation']}", flush=True)
    svc.serve(listener)
    svc.machine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
