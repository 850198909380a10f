"""Client of examples/table_service.py that rides through a handover.

Every ADD carries (client id, sequence number); when the connection drops or the service
answers ``MOVED host:port``, the client reconnects (to the new address if it moved) and
sends the same request again: the service answers a request it already applied from its
stored answer, so each update is applied exactly once. `max_pause_s` is the longest a
request waited, handover included.

    python examples/table_client.py --port 7000 SUM
    python examples/table_client.py --port 7000 UPGRADE cpr-transfer
"""

from __future__ import annotations

import argparse
import socket
import sys
import time


class TableClient:
    def __init__(self, host: str, port: int, client: int = 0, *,
                 retry_for: float = 30.0) -> None:
        self.addr = (host, port)
        self.client = client
        self.seq = 0
        self.retry_for = retry_for
        self.max_pause_s = 0.0
        self.reconnects = 0
        self._sock: socket.socket | None = None
        self._file: object = None

    def _connect(self) -> None:
        self._sock = socket.create_connection(self.addr, timeout=self.retry_for)
        self._file = self._sock.makefile("rb")

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None

    def request(self, line: str, *, retry: bool = True) -> str:
        """Send one line, return the answer; reconnect and resend on a dropped
        connection or MOVED, for up to `retry_for` seconds (never with `retry=False`:
        for UPGRADE / MIGRATE, which must not run twice)."""
        t0 = time.monotonic()
        while True:
            try:
                if self._sock is None:
                    self._connect()
                    self.reconnects += 1
                assert self._sock is not None
                self._sock.sendall(line.encode() + b"\n")
                answer = self._file.readline().decode()  # type: ignore[attr-defined]
                if not answer:
                    raise ConnectionResetError("the service closed the connection")
                if answer.startswith("MOVED "):
                    host, port = answer.split()[1].rsplit(":", 1)
                    self.addr = (host, int(port))
                    raise ConnectionResetError("moved")
                break
            except OSError:
                self._drop()
                if not retry or time.monotonic() - t0 > self.retry_for:
                    raise
                time.sleep(0.002)
        self.max_pause_s = max(self.max_pause_s, time.monotonic() - t0)
        return answer.strip()

    def add(self, row: int, delta: int) -> int:
        self.seq += 1
        answer = self.request(f"ADD {self.client} {self.seq} {row} {delta}")
        if not answer.startswith("OK "):
            raise RuntimeError(answer)
        return int(answer.split()[1])

    def get(self, row: int) -> int:
        return int(self.request(f"GET {row}").split()[1])

    def total(self) -> int:
        return int(self.request("SUM").split()[1])

    def info(self) -> dict[str, str]:
        words = self.request("INFO").split()[1:]
        return dict(w.split("=", 1) for w in words)

    def close(self) -> None:
        self._drop()


def main() -> int:
    p = argparse.ArgumentParser(description="send one request line to a table service")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7000)
    p.add_argument("request", nargs="+")
    args = p.parse_args()
    client = TableClient(args.host, args.port)
    print(client.request(" ".join(args.request), retry=False))
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
