"""examples/two_hosts_tls.py: the table service moves to another "host" (a second
process on 127.0.0.1) over TCP with mutual TLS, under client load; the clients follow
MOVED and every acknowledged update arrives exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.security.certs import make_creds

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_two_hosts_tls(tmp_path: Path) -> None:
    make_creds(tmp_path / "tls")
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "two_hosts_tls.py"), "--tls-creds",
         str(tmp_path / "tls"), "--table-size", "16M", "--clients", "3", "--seconds", "0.3",
         "--json"],
        capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["verified"] is True
    assert report["clients_moved"] == 3 and report["generation"] == 1
    assert report["rows_wrong"] == 0 and report["lost_or_doubled"] == 0
    assert report["updates"] > 0 and report["old_exit_code"] == 0


def test_without_tls_the_pickled_state_is_refused(tmp_path: Path) -> None:
    """The trust model: a successor reached over TCP without TLS refuses to unpickle."""
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "table_service.py"), "--incoming", "tcp:127.0.0.1:0",
         "--port", "0", "--table-size", "1M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "unpickle" in err or "pickle" in err.lower()
