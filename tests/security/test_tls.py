"""TLS with mutual x509 authentication on the main channel and every multifd channel.

Live migrations between MigrationSource and MigrationDestination in one process (demo
workload, checksum-verified), plus the refusals: a client from another CA, an expired
client, a client not on the tls-authz list, a server the source must not trust, a wrong
tls-hostname, and plaintext on either side. A recording proxy checks that no
migration byte crosses the wire in clear.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from multifd.machine.demo import DemoWorkload, build_demo_machine, expected_checksum
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import MigrationCapabilities, MigrationParameters
from multifd.migration.profile import get_profile
from multifd.migration.source import MigrationSource
from multifd.transport import tls as tls_mod
from multifd.transport.sockets import Listener, recv_exactly_into, sendmsg_all
from multifd.transport.tls import (
    TlsClosedError,
    TlsConfig,
    TlsError,
    TlsSocket,
    accept_tls_channels,
    alert_name,
    authz_allows,
    connect_tls,
    connect_tls_channels,
    parse_authz,
    peer_identity,
    server_context,
)
from multifd.transport.uri import TcpAddress, UnixAddress
from tests.security.certs import make_ca, make_creds

RAM = 8 << 20
STEPS = 2000


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls") / "good"
    make_creds(d)
    return d


@pytest.fixture(scope="module")
def other_ca_client(tmp_path_factory: pytest.TempPathFactory, creds: Path) -> Path:
    """Same CA file as `creds` (so it trusts the server), client cert from a stranger CA."""
    d = tmp_path_factory.mktemp("tls") / "stranger"
    make_creds(d, client_ca=make_ca("stranger CA"))
    shutil.copy(creds / "ca-cert.pem", d / "ca-cert.pem")
    return d


def _pc(multifd: bool, **params: object) -> tuple[MigrationParameters, MigrationCapabilities]:
    p = MigrationParameters()
    p.set({"max-bandwidth": 0, **params})
    c = MigrationCapabilities()
    c.set([{"capability": "multifd", "state": multifd}])
    return p, c


def _migrate(src_params: dict[str, object], dst_params: dict[str, object], *,
             profile: str = "qemu-10", multifd: bool = True, uri: str = "tcp:127.0.0.1:0",
             connect_uri: str | None = None, accept_timeout: float = 10.0,
             ) -> tuple[MigrationSource, MigrationDestination, bool]:
    """Run one live migration; returns (source, destination, verified)."""
    sp, sc = _pc(multifd, **src_params)
    dp, dc = _pc(multifd, **dst_params)
    dst_m = build_demo_machine(RAM, populate=False)
    dst_m.set_incoming()
    dst = MigrationDestination(dst_m, params=dp, caps=dc, profile=get_profile(profile),
                               accept_timeout=accept_timeout)
    bound = dst.listen(uri)
    src_m = build_demo_machine(RAM, total_steps=STEPS)
    src_m.start()
    work = DemoWorkload(src_m, dirty_rate_mib_s=32.0)
    work.run_in_thread()
    src = MigrationSource(src_m, params=sp, caps=sc, profile=get_profile(profile))
    src.start(connect_uri(bound) if callable(connect_uri) else (connect_uri or bound))
    src.wait(30)
    work.stop(10)
    dst.wait(30)
    verified = False
    if str(dst.status.status) == "completed":
        DemoWorkload(dst_m).run_to_completion()
        verified = dst_m.checksum() == expected_checksum(RAM, 1, STEPS)
    src_m.close()
    dst_m.close()
    return src, dst, verified


def _tls(creds: Path, **extra: object) -> dict[str, object]:
    return {"tls-creds": str(creds), **extra}


@pytest.mark.parametrize(("profile", "channels", "compression"),
                         [("qemu-10", 2, "none"), ("qemu-7.2", 3, "zstd")])
def test_tls_multifd_migration_verified(creds: Path, profile: str, channels: int,
                                        compression: str) -> None:
    params = {"multifd-channels": channels, "multifd-compression": compression}
    src, dst, ok = _migrate(_tls(creds, **params),
                            _tls(creds, **params, **{"tls-authz": "multifd-source"}),
                            profile=profile)
    assert str(src.status.status) == "completed", src.error
    assert str(dst.status.status) == "completed", dst.error
    assert ok
    assert dst.receiver is not None and dst.receiver.syncs >= 2


def test_tls_without_multifd(creds: Path) -> None:
    src, _, ok = _migrate(_tls(creds), _tls(creds), multifd=False)
    assert str(src.status.status) == "completed", src.error
    assert ok


def test_tls_over_unix_needs_and_uses_tls_hostname(creds: Path, tmp_path: Path) -> None:
    uri = f"unix:{tmp_path}/m.sock"
    src, _, _ = _migrate(_tls(creds), _tls(creds), uri=uri, accept_timeout=1)
    assert str(src.status.status) == "failed"
    assert "needs tls-hostname" in (src.error or "")
    src, dst, ok = _migrate(_tls(creds, **{"tls-hostname": "localhost"}), _tls(creds), uri=uri)
    assert str(dst.status.status) == "completed", dst.error
    assert ok


@pytest.mark.parametrize("authz", [
    "someone-else",
    "CN=someone-else",
    "C=GB,O=multifd tests,CN=multifd-source;",  # a DN (";"), most specific first: wrong
])
def test_authz_refuses_unlisted_client(creds: Path, authz: str) -> None:
    src, dst, ok = _migrate(_tls(creds), _tls(creds, **{"tls-authz": authz}))
    assert str(dst.status.status) == "failed" and not ok
    assert "not authorized by tls-authz" in (dst.error or "")
    assert "CN=multifd-source,O=multifd tests,C=GB" in (dst.error or "")
    assert str(src.status.status) == "failed"
    # Our destination closes without an alert after the handshake: the source can only
    # say so, on whichever channel noticed first, and ask.
    assert re.search(r"TLS.* the destination closed the connection .*\(did it refuse our "
                     r"certificate(| on the main channel)\? check tls-creds / tls-authz on "
                     r"the destination\)", src.error or ""), src.error


def test_authz_full_dn_and_list(creds: Path) -> None:
    authz = "nobody;CN=multifd-source, O=multifd tests, C=GB"
    src, dst, ok = _migrate(_tls(creds), _tls(creds, **{"tls-authz": authz}))
    assert ok, (src.error, dst.error)


_ALERT_REFUSAL = (r"TLS: the destination refused our certificate on main channel to "
                  r"tcp:127\.0\.0\.1:\d+ \(alert unknown_ca; check tls-creds / tls-authz on "
                  r"the destination\)")


@pytest.mark.parametrize("multifd", [True, False])
def test_client_from_another_ca_refused(creds: Path, other_ca_client: Path,
                                        multifd: bool) -> None:
    src, dst, ok = _migrate(_tls(other_ca_client), _tls(creds), multifd=multifd)
    assert str(dst.status.status) == "failed" and not ok
    assert "TLS handshake on main channel" in (dst.error or "")
    assert "certificate" in (dst.error or "")
    assert str(src.status.status) == "failed"
    # TLS 1.3: the source's handshake is done when the destination refuses; its alert is
    # read and named. With multifd a channel's own handshake may hit the close first.
    if multifd:
        assert re.search(rf"{_ALERT_REFUSAL}|TLS handshake on multifd channel \d+ to "
                         r"tcp:\S+ failed: the destination closed the connection \(did it "
                         r"refuse our certificate on the main channel\? ", src.error or ""
                         ), src.error
    else:
        assert re.fullmatch(_ALERT_REFUSAL, src.error or ""), src.error


def test_expired_client_refused(creds: Path, tmp_path: Path) -> None:
    bad = tmp_path / "expired"
    make_creds(bad, client_expired=True)
    shutil.copy(creds / "ca-cert.pem", bad / "ca-cert.pem")
    # client cert from a different CA key (make_creds made a new CA): use the same CA
    ca = make_creds(tmp_path / "pair")
    make_creds(tmp_path / "pair-expired", ca=ca, client_expired=True)
    _, dst, ok = _migrate(_tls(tmp_path / "pair-expired"), _tls(tmp_path / "pair"))
    assert not ok and str(dst.status.status) == "failed"
    assert "expired" in (dst.error or "")


def test_source_refuses_untrusted_server(creds: Path, tmp_path: Path) -> None:
    rogue = tmp_path / "rogue"
    make_creds(rogue)  # its own CA: the source's ca-cert.pem does not sign it
    src, dst, ok = _migrate(_tls(creds), _tls(rogue))
    assert str(src.status.status) == "failed" and not ok
    assert "certificate verify failed" in (src.error or "")
    assert str(dst.status.status) == "failed"


def test_source_checks_tls_hostname(creds: Path) -> None:
    src, _, ok = _migrate(_tls(creds, **{"tls-hostname": "migration.example"}), _tls(creds),
                          accept_timeout=3)
    assert not ok and str(src.status.status) == "failed"
    assert "migration.example" in (src.error or "")
    src, _, ok = _migrate(_tls(creds, **{"tls-hostname": "localhost"}), _tls(creds))
    assert ok, src.error


def test_plaintext_source_refused_by_tls_destination(creds: Path) -> None:
    src, dst, ok = _migrate({}, _tls(creds))
    assert not ok and str(dst.status.status) == "failed"
    assert "TLS handshake" in (dst.error or "")
    assert str(src.status.status) == "failed"


def test_tls_source_refused_by_plaintext_destination(creds: Path) -> None:
    src, _, ok = _migrate(_tls(creds), {}, accept_timeout=3)
    assert not ok and str(src.status.status) == "failed"
    assert "TLS handshake" in (src.error or "")


def test_missing_credentials_fail_early(tmp_path: Path) -> None:
    p, c = _pc(True, **{"tls-creds": str(tmp_path)})
    m = build_demo_machine(RAM, populate=False)
    try:
        with pytest.raises(TlsError, match=r"lacks ca-cert\.pem"):
            MigrationDestination(m, params=p, caps=c).listen("tcp:127.0.0.1:0")
        p2, _ = _pc(True, **{"tls-creds": str(tmp_path / "nope")})
        with pytest.raises(TlsError, match="is not a directory"):
            MigrationDestination(m, params=p2, caps=c).listen("tcp:127.0.0.1:0")
        with pytest.raises(TlsError, match="tcp: or unix:"):
            MigrationDestination(m, params=p, caps=c).listen(f"file:{tmp_path}/x")
    finally:
        m.close()


class _Recorder:
    """A TCP proxy that records both directions of every connection it forwards."""

    def __init__(self, target: TcpAddress) -> None:
        self.target = target
        self.listener = Listener(TcpAddress("127.0.0.1", 0))
        self.data: list[bytearray] = []
        self._stop = False
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    @property
    def uri(self) -> str:
        return str(self.listener.address)

    def _loop(self) -> None:
        while not self._stop:
            try:
                a = self.listener.accept(0.2)
            except (TimeoutError, OSError):
                continue
            b = socket.create_connection((self.target.host, self.target.port))
            rec = bytearray()
            self.data.append(rec)
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(x, y, rec), daemon=True).start()

    @staticmethod
    def _pipe(x: socket.socket, y: socket.socket, rec: bytearray) -> None:
        try:
            while chunk := x.recv(1 << 16):
                rec += chunk
                y.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (x, y):
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        self.listener.close()


def test_nothing_crosses_the_wire_in_clear(creds: Path) -> None:
    proxies: list[_Recorder] = []

    def via_proxy(bound: str) -> str:
        host, port = bound.removeprefix("tcp:").rsplit(":", 1)
        proxies.append(_Recorder(TcpAddress(host, int(port))))
        return proxies[0].uri

    params = {"multifd-channels": 2}
    src, dst, ok = _migrate(_tls(creds, **params, **{"tls-hostname": "localhost"}),
                            _tls(creds, **params), connect_uri=via_proxy)  # type: ignore[arg-type]
    proxies[0].close()
    assert ok, (src.error, dst.error)
    conns = proxies[0].data
    assert len(conns) == 3 and sum(map(len, conns)) > RAM // 2
    for rec in conns:
        assert rec[:1] == b"\x16"  # a TLS handshake record, not QEVM / MultiFDInit_t
        # Markers of 6+ bytes: a 4-byte one turns up by chance in MiBs of ciphertext
        # (p ~ 2**-32 per offset; it did, once, in CI).
        for clear in (b"QEVM\x00\x00\x00\x03", bytes.fromhex("1122334400000001"),
                      b"pc.ram", b"multifd-python"):
            assert clear not in rec


def test_channel_helpers_order_and_clean_close(creds: Path) -> None:
    tls = TlsConfig(creds, "localhost")
    with Listener(TcpAddress("127.0.0.1", 0)) as lst:
        out: dict[str, object] = {}

        def server() -> None:
            out["res"] = accept_tls_channels(lst, 2, tls, 10)

        t = threading.Thread(target=server)
        t.start()
        main, chans = connect_tls_channels(lst.address, 2, tls, 10)
        # Channel handshakes are deferred to the first write (one thread per channel).
        hs = [threading.Thread(target=c.do_handshake) for c in chans]
        for h in hs:
            h.start()
        for h in (*hs, t):
            h.join(10)
        smain, schans = out["res"]  # type: ignore[misc]
        assert isinstance(smain, TlsSocket) and len(schans) == 2
        # Gather send of many small buffers + scatter receive with MSG_WAITALL.
        bufs = [bytes([i % 256]) * (i * 37 % 5000 + 1) for i in range(300)] + [bytes(200_000)]
        total = sum(map(len, bufs))
        sender = threading.Thread(target=sendmsg_all, args=(chans[1], bufs))
        sender.start()
        got = bytearray(total)
        recv_exactly_into(schans[1], got)
        sender.join(10)
        assert bytes(got) == b"".join(bufs)
        # Channel order is connection order: main first, then 0, 1.
        for i, (c, s) in enumerate(zip([main, *chans], [smain, *schans], strict=True)):
            c.sendall(bytes([i]) * 4)
            assert s.recv(4) == bytes([i]) * 4
        # Clean close: at once - it does not wait for the peer's close_notify (nobody
        # reads smain until it returned, so a close that waited would never return) - and
        # the peer reads EOF (close_notify), not an error.
        closer = threading.Thread(target=main.close)
        closer.start()
        closer.join(10)
        assert not closer.is_alive(), "close() waited for the peer"
        buf = bytearray(8)
        assert smain.recv_into(buf) == 0
        assert smain.recv_into(buf) == 0  # and stays at EOF
        for s in (smain, *schans, *chans):
            ssl.SSLSocket.close(s)  # abrupt: nobody reads the other ends here


def test_after_shutdown_never_plaintext(creds: Path) -> None:
    tls = TlsConfig(creds, "localhost")
    with Listener(TcpAddress("127.0.0.1", 0)) as lst:
        out: dict[str, object] = {}
        t = threading.Thread(target=lambda: out.update(r=accept_tls_channels(lst, 0, tls, 10)))
        t.start()
        main, _ = connect_tls_channels(lst.address, 0, tls, 10)
        t.join(10)
        smain, _ = out["r"]  # type: ignore[misc]
        main.shutdown(socket.SHUT_RDWR)
        with pytest.raises(OSError, match="TLS session closed"):
            main.sendall(b"secret")
        with pytest.raises(OSError, match="TLS session closed"):
            main.sendmsg([b"secret"])
        main.close()
        smain.close()


def test_extra_connection_refused_under_tls(creds: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    tls = TlsConfig(creds, "localhost")
    with Listener(TcpAddress("127.0.0.1", 0)) as lst:
        out: dict[str, object] = {}
        t = threading.Thread(target=lambda: out.update(r=accept_tls_channels(lst, 1, tls, 10)))
        t.start()
        main, chans = connect_tls_channels(lst.address, 1, tls, 10)
        # Queued before the last expected channel's handshake completes, so the accept
        # finds it when it checks for extra connections (and not the listener's close).
        extra = socket.create_connection(("127.0.0.1", lst.address.port))
        chans[0].do_handshake()
        t.join(10)
        smain, schans = out["r"]  # type: ignore[misc]
        lst.close()  # what the destination does once its channels are up
        extra.settimeout(5)
        assert extra.recv(1) == b""  # refused: closed (FIN) without a handshake
        assert ("refusing incoming migration connection: beyond 1 main + 1 multifd channels"
                in caplog.messages), caplog.messages
        for s in (main, *chans, smain, *schans, extra):
            ssl.SSLSocket.close(s) if isinstance(s, TlsSocket) else s.close()


def test_accept_timeout_names_counts(creds: Path) -> None:
    tls = TlsConfig(creds)
    with Listener(TcpAddress("127.0.0.1", 0)) as lst, \
            pytest.raises(TimeoutError, match=r"got 0 after 0\.2 s"):
        accept_tls_channels(lst, 2, tls, 0.2)


def test_silent_client_handshake_times_out(creds: Path) -> None:
    tls = TlsConfig(creds)
    with Listener(TcpAddress("127.0.0.1", 0)) as lst:
        c = socket.create_connection(("127.0.0.1", lst.address.port))
        t0 = time.monotonic()
        with pytest.raises(TlsError, match="timed out"):
            accept_tls_channels(lst, 1, tls, 0.5)
        assert time.monotonic() - t0 < 2
        c.close()


def _serve_once(lst: Listener, ctx: ssl.SSLContext, *, read: int = 0,
                second: bool = False) -> threading.Thread:
    """A destination that completes one server handshake, reads `read` bytes and drops the
    connection without an alert or close_notify (QEMU refusing a certificate), or that
    refuses in the handshake (the context's verification fails: alert); with `second`,
    it also accepts the next connection and drops it before any handshake."""

    def run() -> None:
        raw = lst.accept(10)
        tls = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        try:
            tls.settimeout(10)
            tls.do_handshake()
            buf = bytearray(1 << 16)
            got = 0
            while got < read and (n := tls.recv_into(buf)):
                got += n
            if second:
                lst.accept(10).close()
        except (ssl.SSLError, OSError):
            pass
        finally:
            ssl.SSLSocket.close(tls)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _write_until_error(sock: TlsSocket) -> BaseException:
    chunk = bytes(1 << 16)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            sock.sendall(chunk)
        except OSError as exc:
            return exc
    raise AssertionError("the refused session kept taking data")


def test_close_after_handshake_is_named_tls(creds: Path) -> None:
    """QEMU refuses a TLS 1.3 client certificate after our handshake is done, with no alert:
    the failing write says TLS, the channel, and asks about the certificate."""
    tls = TlsConfig(creds, "localhost")
    with Listener(TcpAddress("127.0.0.1", 0)) as lst:
        addr = lst.address
        t = _serve_once(lst, server_context(creds))
        main = connect_tls(addr, tls, 10)
        err = _write_until_error(main)
        t.join(10)
        main.close()
    assert isinstance(err, TlsClosedError), repr(err)
    assert re.fullmatch(r"TLS: the destination closed the connection on main channel to "
                        rf"{re.escape(str(addr))} after the handshake \(did it refuse "
                        r"our certificate\? check tls-creds / tls-authz on the destination\): "
                        r"(EOF occurred in violation of protocol \(_ssl\.c:\d+\)|Broken pipe"
                        r"|Connection reset by peer)", str(err)), str(err)


def test_alert_after_handshake_is_named(creds: Path, other_ca_client: Path) -> None:
    """An OpenSSL destination refuses the certificate with an alert the source reads only
    after its handshake: the write error names it."""
    tls = TlsConfig(other_ca_client, "localhost")
    with Listener(TcpAddress("127.0.0.1", 0)) as lst:
        addr = lst.address
        t = _serve_once(lst, server_context(creds))
        main = connect_tls(addr, tls, 10)
        err = _write_until_error(main)
        t.join(10)
        main.close()
    assert type(err) is TlsError, repr(err)
    assert str(err) == (f"TLS: the destination refused our certificate on main channel to "
                        f"{addr} (alert unknown_ca; check tls-creds / tls-authz on the "
                        "destination)")


def test_close_mid_stream_is_not_called_a_refusal(creds: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Past what socket buffers could hold, a close is the peer going away mid-stream:
    no certificate guess, the error stays what it was."""
    monkeypatch.setattr(tls_mod, "_REFUSAL_WINDOW", 1 << 20)
    tls = TlsConfig(creds, "localhost")
    with Listener(TcpAddress("127.0.0.1", 0)) as lst:
        addr = lst.address
        t = _serve_once(lst, server_context(creds), read=2 << 20)
        main = connect_tls(addr, tls, 10)
        err = _write_until_error(main)
        t.join(10)
        main.close()
    assert not isinstance(err, TlsError), repr(err)


def test_deferred_channel_handshake_names_channel(creds: Path) -> None:
    """A multifd channel's handshake runs on its first write; a destination that dropped it
    (as ours does after refusing main) is named on that channel, with the guess."""
    tls = TlsConfig(creds, "localhost")
    with Listener(TcpAddress("127.0.0.1", 0)) as lst:
        addr = lst.address
        t = _serve_once(lst, server_context(creds), second=True)
        main, chans = connect_tls_channels(addr, 1, tls, 10)
        t.join(10)
        with pytest.raises(TlsClosedError) as info:
            chans[0].sendmsg([b"x" * 64], [], socket.MSG_DONTWAIT)
        for s in (main, *chans):
            ssl.SSLSocket.close(s)
    assert re.fullmatch(r"TLS handshake on multifd channel 0 to "
                        rf"{re.escape(str(addr))} failed: the destination closed the "
                        r"connection \(did it refuse our certificate on the main channel\? "
                        r"check tls-creds / tls-authz on the destination\): .+",
                        str(info.value)), str(info.value)


def test_alert_name() -> None:
    def err(reason: str | None) -> ssl.SSLError:
        e = ssl.SSLError(1, "x")
        e.reason = reason  # type: ignore[misc]
        return e

    assert alert_name(err("TLSV13_ALERT_CERTIFICATE_REQUIRED")) == "certificate_required"
    assert alert_name(err("SSLV3_ALERT_BAD_CERTIFICATE")) == "bad_certificate"
    assert alert_name(err("TLSV1_ALERT_UNKNOWN_CA")) == "unknown_ca"
    assert alert_name(err("CERTIFICATE_VERIFY_FAILED")) is None
    assert alert_name(err(None)) is None
    assert alert_name(OSError("TLSV1_ALERT_UNKNOWN_CA")) is None


def test_authz_parsing_and_identity() -> None:
    assert parse_authz("a, b,,c") == ("a", "b", "c")
    assert parse_authz("CN=a,O=x;b") == ("CN=a,O=x", "b")
    assert parse_authz(None) == ()
    cert = {"subject": ((("countryName", "GB"),), (("organizationName", "Ex, Ltd"),),
                        (("commonName", "src"),))}
    assert peer_identity(cert) == (("src",), "CN=src,O=Ex\\, Ltd,C=GB")
    assert authz_allows((), cert)
    assert authz_allows(("src",), cert)
    assert authz_allows(("CN=src",), cert)
    assert authz_allows(("CN=src,O=Ex\\, Ltd,C=GB",), cert)
    assert not authz_allows(("SRC",), cert)
    assert not authz_allows(("CN=src,C=GB",), cert)


def test_tls_config_hostname_default() -> None:
    tls = TlsConfig(Path("/nonexistent"))
    assert tls.peer_hostname(TcpAddress("10.0.0.5", 4444)) == "10.0.0.5"
    assert TlsConfig(Path("/x"), "dst.example").peer_hostname(
        TcpAddress("10.0.0.5", 1)) == "dst.example"
    with pytest.raises(TlsError, match="tls-hostname"):
        tls.peer_hostname(UnixAddress("/tmp/x"))
    p = MigrationParameters()
    assert TlsConfig.from_params(p) is None
    p.set({"tls-creds": "/d", "tls-hostname": "h", "tls-authz": "a,b"})
    assert TlsConfig.from_params(p) == TlsConfig(Path("/d"), "h", ("a", "b"))


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "multifd.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_demo_cli_over_tls(creds: Path) -> None:
    """`multifd demo --tls-creds DIR --tls-authz NAME`: verified; an unlisted name fails."""
    base = ("demo", "--ram", "16M", "--steps", "1500", "--json", "--tls-creds", str(creds))
    ok = _cli(*base, "--tls-authz", "multifd-source")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["status"] == "completed" and report["verified"]
    bad = _cli(*base, "--tls-authz", "someone-else")
    assert bad.returncode == 1, bad.stderr
    report = json.loads(bad.stdout)
    assert report["status"] == "failed" and not report["verified"]
    # TLS 1.3 tells the source late, so what it saw first varies (connection refused or
    # reset, an EOF on a channel); the report adds the destination's reason, which is the
    # cause: the authz refusal of our client certificate.
    assert re.search(r"; destination: TLS client on main channel from \('127\.0\.0\.1', "
                     r"\d+\) is not authorized by tls-authz: certificate "
                     r"'CN=multifd-source,O=multifd tests,C=GB' is not in the allow-list$",
                     report["error"]), report["error"]


@pytest.mark.parametrize("command", ["demo", "incoming", "migrate", "serve"])
def test_tls_options_on_every_command(command: str) -> None:
    res = _cli(command, "--help", timeout=30)
    assert res.returncode == 0
    for opt in ("--tls-creds", "--tls-hostname", "--tls-authz"):
        assert opt in res.stdout, (command, opt)


def test_serve_initial_params(creds: Path) -> None:
    from multifd.commands.serve import _initial_params

    ns = argparse.Namespace(tls_creds=str(creds), tls_hostname="h", tls_authz="a,b")
    p = _initial_params(ns)
    assert TlsConfig.from_params(p) == TlsConfig(creds.resolve(), "h", ("a", "b"))
    assert _initial_params(argparse.Namespace(tls_creds="", tls_hostname="",
                                              tls_authz="")) is None
