"""TLS interop with QEMU's tls-creds-x509 (7.2, and 10.0 when unpacked), multifd on, both
directions.

QEMU (source, endpoint=client, verify-peer=on) -> `multifd incoming --tls-creds` records
an image; `multifd migrate --tls-creds` replays it into a QEMU destination
(endpoint=server, verify-peer=on: it demands our client certificate). The same
directory, made by tests/security/certs.py, serves both ends. The guest pattern must
arrive intact. Needs qemu-system-x86_64 (QEMU 7.2; QEMU 10.0 from .ci/qemu10), like
tests/qemu.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from multifd.qemu.qemuproc import QemuProcess
from tests.conftest import PATTERN_OFFSET, Q72
from tests.qemu.conftest import PROFILE, Incoming, qemu_binary, run_cli, set_multifd
from tests.security.certs import make_creds

pytestmark = pytest.mark.qemu
PATTERN = Q72 / "pattern-4MiB.bin"


def _vm(name: str, creds: Path, endpoint: str, *, pattern: bool = False,
        incoming: str | None = None, version: str = "7.2") -> QemuProcess:
    qemu_binary(version)
    extra = ["-object", f"tls-creds-x509,id=tls0,dir={creds},endpoint={endpoint},"
                        "verify-peer=on"]
    if pattern:
        extra += ["-device", f"loader,file={PATTERN},addr={PATTERN_OFFSET:#x}"]
    vm = QemuProcess(extra, version=version, name=name, machine="pc", memory_mib=64,
                     incoming=incoming, start_timeout=20, cmd_timeout=10)
    return vm.start()


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_qemu_tls_record_and_replay(tmp_path: Path, version: str) -> None:
    creds = tmp_path / "creds"
    make_creds(creds)
    pattern = PATTERN.read_bytes()
    image = tmp_path / "tls.img"
    # QEMU source -> multifd incoming, over TLS, 2 multifd channels.
    src = _vm("src", creds, "client", pattern=True, version=version)
    try:
        set_multifd(src, 2, "none")
        src.cmd("migrate-set-parameters", **{"tls-creds": "tls0",
                                             "tls-hostname": "localhost"})
        inc = Incoming(f"unix:{tmp_path}/in.sock", image, "--profile", PROFILE[version],
                       "--channels", "2", "--idle-timeout", "20", "--tls-creds", str(creds),
                       "--tls-authz", "multifd-source")
        try:
            src.migrate(inc.uri)
            src.wait_migration(timeout=30)
        except BaseException:
            inc.proc.kill()
            inc.finish(5)
            raise
        summary = inc.result()
        assert summary["pages"]["normal"] >= 768 and summary["channels"] == 2, summary
    finally:
        src.close()
    # multifd migrate -> QEMU destination, over TLS, 2 multifd channels.
    dst = _vm("dst", creds, "server", incoming="defer", version=version)
    try:
        set_multifd(dst, 2, "none")
        dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
        uri = f"unix:{tmp_path}/out.sock"
        dst.migrate_incoming(uri)
        res = run_cli("migrate", str(image), uri, "--profile", PROFILE[version], "--channels",
                      "2", "--json", "--idle-timeout", "20", "--tls-creds", str(creds),
                      "--tls-hostname", "localhost")
        assert res.returncode == 0, (f"multifd migrate failed: {res.stderr}; destination: "
                                     f"{dst.query_migrate()} {dst.log()[-2000:]}")
        dst.wait_migration(timeout=30)
        got = dst.pmemsave(PATTERN_OFFSET, len(pattern))
        assert got == pattern
    finally:
        dst.close()


@dataclass
class Refusal:
    """`multifd migrate` with a client certificate from a stranger CA into QEMU 7.2."""

    returncode: int
    stderr: str
    qemu_log: str
    qemu_status: str  # query-status of the destination once our side gave up
    uri: str  # where the destination listened


@pytest.fixture(scope="module")
def refused_by_qemu72(tmp_path_factory: pytest.TempPathFactory) -> Refusal:
    tmp_path = tmp_path_factory.mktemp("qemu-tls-refusal")
    good, stranger = tmp_path / "good", tmp_path / "stranger"
    ca = make_creds(good)
    make_creds(stranger, ca=ca, client_ca=None)
    from tests.security.certs import make_ca, make_leaf

    cert, key = make_leaf(make_ca("stranger CA"), "intruder", server=False)
    (stranger / "client-cert.pem").write_bytes(cert)
    (stranger / "client-key.pem").write_bytes(key)
    image = tmp_path / "x.img"
    src = _vm("src", good, "client", pattern=True)
    try:
        set_multifd(src, 1, "none")
        src.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": "localhost"})
        inc = Incoming(f"unix:{tmp_path}/in.sock", image, "--profile", "qemu-7.2",
                       "--channels", "1", "--idle-timeout", "20", "--tls-creds", str(good))
        src.migrate(inc.uri)
        src.wait_migration(timeout=30)
        inc.result()
    finally:
        src.close()
    dst = _vm("dst", good, "server", incoming="defer")
    try:
        set_multifd(dst, 1, "none")
        dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
        uri = f"unix:{tmp_path}/out.sock"
        dst.migrate_incoming(uri)
        res = run_cli("migrate", str(image), uri, "--profile", "qemu-7.2", "--channels", "1",
                      "--idle-timeout", "10", "--tls-creds", str(stranger),
                      "--tls-hostname", "localhost")
        return Refusal(res.returncode, res.stderr, dst.log(), dst.status(), uri)
    finally:
        dst.close()


def test_qemu72_refuses_our_client_from_another_ca(refused_by_qemu72: Refusal) -> None:
    """QEMU's verify-peer=on destination refuses a client cert its CA did not sign: it
    says so in its log and keeps waiting (still inmigrate); we exit 1 with one line."""
    r = refused_by_qemu72
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "The certificate hasn't got a known issuer" in r.qemu_log, r.qemu_log[-2000:]
    assert r.qemu_status == "inmigrate"


def test_qemu72_refusal_error_names_tls(refused_by_qemu72: Refusal) -> None:
    """With TLS 1.3 QEMU refuses our certificate after our side of the handshake is done
    and drops the connection without an alert: the one error line says TLS, the channel
    that noticed (main, or multifd channel 0, which QEMU also takes and refuses), and asks
    about the certificate; the multifd hint stays, as other mismatches look the same."""
    r = refused_by_qemu72
    assert r.returncode == 1, r.stderr
    closed = "TLS: the destination closed the connection on"
    rx = (rf"error: ({closed} main channel|multifd channel 0 failed: {closed} multifd "
          rf"channel 0) to {re.escape(r.uri)} after the handshake \(did it refuse our "
          r"certificate\? check tls-creds / tls-authz on the destination\): "
          r"(EOF occurred in violation of protocol \(_ssl\.c:\d+\)|Broken pipe"
          r"|Connection reset by peer) \(check the destination's multifd-channels = 1, "
          r"multifd-compression = none, -uuid = 00000000-0000-0000-0000-000000000000, "
          r"machine type = pc-i440fx-7\.2\)\n")
    assert re.fullmatch(rx, r.stderr), r.stderr
