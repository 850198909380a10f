"""Live upgrade of examples/table_service.py on one host, under load, verified.

Starts the service, runs client threads that keep updating random rows (each remembers
what it added), asks the service to hand itself over to a new process (UPGRADE, with
mode cpr-transfer or precopy), keeps the clients going a little longer, then checks that
a new process answers and that every acknowledged update is in the table exactly once.
Prints what the clients saw: the longest a request waited (the pause) and how many
reconnects the handover cost them.

    python examples/live_upgrade.py [--mode cpr-transfer|precopy] [--table-size 1G] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table_client import TableClient

SERVICE = Path(__file__).resolve().parent / "table_service.py"


def start_service(argv: list[str], ready: str = "SERVING"
                  ) -> tuple[subprocess.Popen[str], list[str], threading.Event]:
    """The service process, once it printed a line starting with `ready`; its output
    lines (its successors print there too) are collected in the returned list, the event
    is set at each such line."""
    proc = subprocess.Popen([sys.executable, str(SERVICE), *argv], stdout=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    serving = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith(ready):
                serving.set()

    threading.Thread(target=pump, daemon=True).start()
    if not serving.wait(60):
        proc.kill()
        raise SystemExit("the service did not start")
    return proc, lines, serving


def address(line: str) -> tuple[str, int]:
    host, port = line.split()[1].rsplit(":", 1)
    return host, int(port)


class Load:
    """Client threads adding random deltas to random rows until stopped."""

    def __init__(self, host: str, port: int, clients: int, rows: int) -> None:
        self.stop = threading.Event()
        self.clients = [TableClient(host, port, client=i) for i in range(clients)]
        self.added = [Counter[int]() for _ in range(clients)]
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i, rows), daemon=True)
                        for i in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, i: int, rows: int) -> None:
        rng = random.Random(i)
        client, added = self.clients[i], self.added[i]
        try:
            while not self.stop.is_set():
                row, delta = rng.randrange(min(rows, 4096)), rng.randrange(1, 100)
                client.add(row, delta)
                added[row] += delta  # acknowledged: it must be in the table
        except Exception as exc:  # reported, and the run fails
            self.errors.append(f"client {i}: {exc}")

    def finish(self) -> Counter[int]:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        total: Counter[int] = Counter()
        for c in self.added:
            total.update(c)
        return total


def verify(client: TableClient, expected: Counter[int]) -> dict[str, Any]:
    """Every acknowledged update is in the table, once: per row and in total."""
    wrong = {row: (client.get(row), want) for row, want in expected.items()
             if client.get(row) != want}
    total = client.total()
    return {"rows_checked": len(expected), "rows_wrong": len(wrong),
            "total": total, "total_expected": sum(expected.values()),
            "lost_or_doubled": total - sum(expected.values())}


def show(report: dict[str, Any], as_json: bool) -> int:
    """Print the report (one JSON object, or a line per field); exit status 0 if verified."""
    if as_json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:22} {v}")
    return 0 if report["verified"] else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("cpr-transfer", "precopy"), default="cpr-transfer")
    p.add_argument("--table-size", default="1G")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=1.0, help="load before and after")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from multifd.commands.demo import parse_size

    rows = parse_size(args.table_size) // 8
    proc, lines, _ = start_service(["--port", "0", "--table-size", args.table_size])
    host, port = address(lines[-1])
    successor = None
    try:
        load = Load(host, port, args.clients, rows)
        time.sleep(args.seconds)
        admin = TableClient(host, port)
        t0 = time.monotonic()
        try:
            answer = admin.request(f"UPGRADE {args.mode}", retry=False)
        except OSError as exc:
            answer = f"{exc} (service exit code {proc.poll()})"
        upgrade_ms = (time.monotonic() - t0) * 1000
        admin.close()
        if not answer.startswith("OK pid="):
            raise SystemExit(f"UPGRADE failed: {answer}")
        successor = int(answer.split("=", 1)[1])
        time.sleep(args.seconds)
        expected = load.finish()
        proc.wait(30)  # the old process exits once it handed over
        check = TableClient(host, port, client=args.clients)
        info = check.info()
        report = {
            "mode": args.mode, "table_size": rows * 8, "clients": args.clients,
            "updates": sum(c.seq for c in load.clients),
            "old_pid": proc.pid, "new_pid": int(info["pid"]),
            "generation": int(info["generation"]), "old_exit_code": proc.returncode,
            "upgrade_request_ms": round(upgrade_ms, 1),
            "client_max_pause_ms": round(max(c.max_pause_s for c in load.clients) * 1000, 1),
            "client_reconnects": sum(c.reconnects - 1 for c in load.clients),
            "client_errors": load.errors,
            **verify(check, expected),
        }
        check.close()
        report["verified"] = (report["rows_wrong"] == 0 and report["lost_or_doubled"] == 0
                              and not load.errors and report["new_pid"] == successor
                              and report["generation"] == 1)
    finally:
        if proc.poll() is None:
            proc.kill()
        if successor is None:  # the UPGRADE answer was lost: ask whoever serves now
            probe = TableClient(host, port, retry_for=2)
            try:
                successor = int(probe.info()["pid"])
            except (OSError, KeyError, ValueError):
                pass
            probe.close()
        if successor is not None and successor != proc.pid:  # our service started it
            try:
                os.kill(successor, signal.SIGTERM)
            except ProcessLookupError:
                pass
    return show(report, args.json)


if __name__ == "__main__":
    sys.exit(main())
