"""examples/table_service.py moved to another host, live, over TCP with TLS.

What an operator does on two hosts, run here on one (both "hosts" on 127.0.0.1):

    host B:  python examples/table_service.py --incoming tcp:0.0.0.0:4444 \\
                 --tls-creds /etc/multifd/tls --port 7000
    host A:  python examples/table_service.py --tls-creds /etc/multifd/tls --port 7000
    any:     python examples/table_client.py --host A --port 7000 MIGRATE tcp:B:4444 B:7000

The credentials directory has QEMU's tls-creds-x509 layout (ca-cert.pem, server-cert.pem,
server-key.pem, client-cert.pem, client-key.pem): both sides authenticate each other, and
the successor accepts the service's pickled metadata only because TLS proved who sent
it. Precopy copies the table live (kernel write tracking, no marking); after the
switchover the old service answers ``MOVED B:7000`` and the clients follow.

This script starts both services, keeps clients updating the table, sends MIGRATE,
then checks on B that every acknowledged update is there exactly once.

    python examples/two_hosts_tls.py --tls-creds DIR [--table-size 1G] [--json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_upgrade import Load, address, show, start_service, verify
from table_client import TableClient


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tls-creds", required=True, metavar="DIR")
    p.add_argument("--table-size", default="1G")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=1.0, help="load before and after")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from multifd.commands.demo import parse_size

    rows = parse_size(args.table_size) // 8
    common = ["--table-size", args.table_size, "--tls-creds", args.tls_creds,
              "--port", "0", "--moved-grace", "3"]
    b_proc, b_lines, _ = start_service(
        [*common, "--incoming", "tcp:127.0.0.1:0"], ready="INCOMING")
    a_proc, a_lines, _ = start_service(common)
    incoming, service = b_lines[-1].split()[1], b_lines[-1].split()[2].split("=", 1)[1]
    host, port = address(a_lines[-1])
    try:
        load = Load(host, port, args.clients, rows)
        time.sleep(args.seconds)
        admin = TableClient(host, port)
        t0 = time.monotonic()
        answer = admin.request(f"MIGRATE {incoming} {service}", retry=False)
        migrate_ms = (time.monotonic() - t0) * 1000
        admin.close()
        if not answer.startswith("OK moved"):
            raise SystemExit(f"MIGRATE failed: {answer}")
        time.sleep(args.seconds)
        expected = load.finish()
        b_host, b_port = service.rsplit(":", 1)
        check = TableClient(b_host, int(b_port), client=args.clients)
        info = check.info()
        report = {
            "table_size": rows * 8, "clients": args.clients,
            "updates": sum(c.seq for c in load.clients),
            "old_pid": a_proc.pid, "new_pid": int(info["pid"]),
            "generation": int(info["generation"]),
            "migrate_request_ms": round(migrate_ms, 1),
            "client_max_pause_ms": round(max(c.max_pause_s for c in load.clients) * 1000, 1),
            "clients_moved": sum(c.addr == (b_host, int(b_port)) for c in load.clients),
            "client_errors": load.errors,
            **verify(check, expected),
        }
        check.close()
        a_proc.wait(30)  # the old service exits after its MOVED grace
        report["old_exit_code"] = a_proc.returncode
        report["verified"] = (report["rows_wrong"] == 0 and report["lost_or_doubled"] == 0
                              and not load.errors and report["new_pid"] == b_proc.pid
                              and report["generation"] == 1
                              and report["clients_moved"] == args.clients)
    finally:
        for proc in (a_proc, b_proc):
            if proc.poll() is None:
                proc.kill()
    return show(report, args.json)


if __name__ == "__main__":
    sys.exit(main())
