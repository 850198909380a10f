"""TLS for the main and every multifd channel: x509 with mutual authentication (stdlib ssl).

Credentials use QEMU's ``tls-creds-x509`` directory layout (``crypto/tlscredsx509.c``):

    DIR/ca-cert.pem                   CA that signs both ends (required on both ends)
    DIR/ca-crl.pem                    optional revocation list (checked for the peer's cert)
    DIR/server-cert.pem, server-key.pem   destination (TLS server) identity
    DIR/client-cert.pem, client-key.pem   source (TLS client) identity

The destination requires a client certificate signed by the CA (QEMU's ``verify-peer=on``)
and, with ``tls-authz``, one whose name is on the allow-list (`authz_allows`). The source
verifies the destination's certificate against the CA and ``tls-hostname``, defaulting to
the host of the URI like QEMU (a unix: URI needs an explicit ``tls-hostname``). TLS 1.2 is
the floor so QEMU 7.2's gnutls (TLS 1.2/1.3) interoperates.

Every connection is its own TLS session with its own handshake, bounded by a timeout.
TLS connections cannot be peeked, so the destination identifies channels by connection
order whatever the profile (QEMU's fallback, qemu-reference.md §3.1): the first accepted
connection is main, the next N are multifd. The source connects main and finishes its
handshake before opening the multifd channels, which is what both QEMU 7.2 and 10 do.

`TlsSocket` gives the ``socket.socket`` calls the multifd core makes (gather ``sendmsg``,
``recv_into`` with ``MSG_WAITALL``, scatter ``recvmsg_into``) a TLS implementation, so the
core needs no TLS branches. It never falls back to plaintext once the session is gone,
closes with a close_notify (without waiting for the peer's; QEMU 10 terminates cleanly
too), and treats an EOF without close_notify as end of stream, as QEMU 7.2 sources never
send one.

Refusals are named. With TLS 1.3 the server checks the client certificate after the
client's side of the handshake is done, so a refusal reaches the source only as the
failure of a later write (or of connecting the next channel): an alert the peer sent
(``unknown_ca``, ``certificate_required``, ...) is read and named, and an EOF without one
early in the session (QEMU closes without an alert) is reported as a TLS close on that
channel that may be a certificate refusal, never as a bare "EOF occurred in violation of
protocol".
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multifd.transport.channels import SetupWatch
from multifd.transport.sockets import Listener, connect
from multifd.transport.uri import Address, TcpAddress, UnixAddress

__all__ = [
    "CA_CERT",
    "CA_CRL",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "HANDSHAKE_TIMEOUT_S",
    "SERVER_CERT",
    "SERVER_KEY",
    "TlsClosedError",
    "TlsConfig",
    "TlsError",
    "TlsSocket",
    "accept_tls",
    "accept_tls_channels",
    "add_tls_arguments",
    "alert_name",
    "authz_allows",
    "client_context",
    "connect_tls",
    "connect_tls_channels",
    "parse_authz",
    "peer_identity",
    "server_context",
    "tls_argv",
    "tls_params",
    "wrap_client",
    "wrap_server",
]

log = logging.getLogger(__name__)

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

HANDSHAKE_TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 5.0  # a write making no progress this long: dead or stalled peer
_COALESCE = 64 * 1024  # smaller buffers are joined so one SSL_write fills whole records
# A peer that refuses us right after the handshake reads nothing, so no more than the
# socket buffers hold (a few MiB) can have been written before the session fails; an EOF
# later than this is a peer going away mid-stream, not a refusal.
_REFUSAL_WINDOW = 32 << 20

# Alerts a peer sends when it will not accept the certificate we presented (RFC 8446 6.2).
_CERT_ALERTS = frozenset({
    "bad_certificate", "unsupported_certificate", "certificate_revoked",
    "certificate_expired", "certificate_unknown", "unknown_ca", "access_denied",
    "certificate_required",
})

# RFC 4514 short names, as gnutls prints a distinguished name (and so QEMU's authz sees it).
_DN_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
    "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
}


class TlsError(ConnectionError):
    """TLS set-up failed: missing credentials, handshake, verification or authorization."""


class TlsClosedError(TlsError):
    """The peer dropped the session early without an alert: perhaps it refused our
    certificate, perhaps something else (a QEMU destination rejecting a multifd init
    packet looks the same), so callers keep their own hints next to this guess."""


# -- credentials and contexts ------------------------------------------------------------
def _need(creds_dir: Path, *names: str) -> list[Path]:
    if not creds_dir.is_dir():
        raise TlsError(f"tls-creds: {creds_dir} is not a directory")
    paths = [creds_dir / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise TlsError(f"tls-creds: {creds_dir} lacks {', '.join(missing)}")
    return paths


def _base_context(purpose: int, creds_dir: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.sslsocket_class = TlsSocket
    (ca,) = _need(creds_dir, CA_CERT)
    try:
        ctx.load_verify_locations(cafile=str(ca))
        crl = creds_dir / CA_CRL
        if crl.is_file():
            ctx.load_verify_locations(cafile=str(crl))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"tls-creds: cannot load {ca}: {exc}") from exc
    return ctx


def server_context(creds_dir: str | Path) -> ssl.SSLContext:
    """Destination context: our server cert, and a CA-signed client cert is required."""
    d = Path(creds_dir)
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, d)
    cert, key = _need(d, SERVER_CERT, SERVER_KEY)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"tls-creds: cannot load {cert} / {key}: {exc}") from exc
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0  # no resumption: nothing unread is left in the source's socket
    return ctx


def client_context(creds_dir: str | Path) -> ssl.SSLContext:
    """Source context: verify the destination against the CA and name; present our cert."""
    d = Path(creds_dir)
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, d)
    cert, key = _need(d, CLIENT_CERT, CLIENT_KEY)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"tls-creds: cannot load {cert} / {key}: {exc}") from exc
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# -- authorization -----------------------------------------------------------------------
def parse_authz(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """The allow-list from ``tls-authz``: names separated by ``,`` (or ``;`` when an entry
    is a full DN, which contains commas). Empty means "any CA-signed client"."""
    if text is None:
        return ()
    if not isinstance(text, str):
        return tuple(e for t in text for e in parse_authz(t))
    sep = ";" if ";" in text else ","
    return tuple(e.strip() for e in text.split(sep) if e.strip())


def peer_identity(cert: dict[str, Any]) -> tuple[tuple[str, ...], str]:
    """(subject CNs, RFC 4514 DN most-specific first, e.g. ``CN=src,O=Example,C=GB``)."""
    rdns = cert.get("subject", ())
    cns = tuple(v for rdn in rdns for k, v in rdn if k == "commonName")
    parts = []
    for rdn in reversed(rdns):
        parts.append("+".join(f"{_DN_NAMES.get(k, k)}={_escape_dn(v)}" for k, v in rdn))
    return cns, ",".join(parts)


def _escape_dn(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out


def _norm_dn(dn: str) -> str:
    """Drop blanks around RDN separators (``\\,`` inside a value is not a separator)."""
    parts: list[str] = []
    cur: list[str] = []
    escaped = False
    for ch in dn:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            cur.append(ch)
            escaped = True
        elif ch == ",":
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return ",".join(parts)


def authz_allows(allow: Sequence[str], cert: dict[str, Any]) -> bool:
    """True when ``cert`` (``getpeercert()``) matches an allow-list entry.

    An entry without ``=`` (or ``CN=name``) matches the subject common name exactly; an
    entry that is a whole DN (``CN=src,O=Example,C=GB``) matches the subject DN exactly,
    which is the string QEMU's ``authz-list`` (format exact) compares. Empty allows all.
    """
    if not allow:
        return True
    cns, dn = peer_identity(cert)
    for entry in allow:
        if "=" not in entry:
            if entry in cns:
                return True
        elif entry[:3].upper() == "CN=" and "," not in entry:
            if entry[3:] in cns:
                return True
        elif _norm_dn(entry) == dn:
            return True
    return False


# -- the socket ----------------------------------------------------------------------------
def _closed_error(op: str) -> OSError:
    return OSError(errno.ENOTCONN, f"TLS session closed ({op})")


def alert_name(exc: BaseException) -> str | None:
    """The alert the peer sent, from OpenSSL's reason (``TLSV1_ALERT_UNKNOWN_CA`` ->
    ``unknown_ca``), so errors can say what the peer objected to; None if it is no alert."""
    reason = getattr(exc, "reason", None) if isinstance(exc, ssl.SSLError) else None
    if not isinstance(reason, str):
        return None
    head, sep, name = reason.partition("_ALERT_")
    if not sep or not head.startswith(("SSLV3", "TLSV1")) or not name:
        return None
    return name.lower()


def _peer_role(sock: ssl.SSLSocket) -> tuple[str, str]:
    """(the peer's name, the settings to check there): a TLS client here is always the
    migration source, so its peer is the destination, and the other way round."""
    if sock.server_side:
        return "source", "tls-creds / tls-hostname on the source"
    return "destination", "tls-creds / tls-authz on the destination"


def _alert_text(sock: ssl.SSLSocket, alert: str, where: str = "") -> str:
    peer, check = _peer_role(sock)
    if alert in _CERT_ALERTS:
        return f"the {peer} refused our certificate{where} (alert {alert}; check {check})"
    return f"the {peer} sent alert {alert}{where}"


# The ways our I/O learns that the peer ended the session without a close_notify.
_PEER_GONE = (ssl.SSLEOFError, ssl.SSLZeroReturnError, BrokenPipeError, ConnectionResetError)


def _handshake_error(sock: ssl.SSLSocket, exc: BaseException, what: str, *,
                     after_main: bool = False) -> TlsError:
    """One line for a failed handshake, naming the channel and, when the peer sent one,
    the alert (a TLS 1.2 server refuses a client certificate inside the handshake).

    ``after_main``: a multifd channel's deferred handshake, run once main's is done. A
    destination that refused our certificate on main drops the channels queued behind it
    mid-handshake, so their EOF or reset hints at that; on main itself an EOF comes before
    our certificate was even sent, so it hints at nothing.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TlsError(f"TLS handshake on {what} failed: certificate verify failed: "
                        f"{exc.verify_message or exc.reason}")
    alert = alert_name(exc)
    if alert in _CERT_ALERTS:
        return TlsError(f"TLS handshake on {what} failed: {_alert_text(sock, alert)}")
    if after_main and isinstance(exc, _PEER_GONE):
        peer, check = _peer_role(sock)
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return TlsClosedError(
            f"TLS handshake on {what} failed: the {peer} closed the connection (did it "
            f"refuse our certificate on the main channel? check {check}): "
            f"{detail or type(exc).__name__}")
    return TlsError(f"TLS handshake on {what} failed: {exc}")


class TlsSocket(ssl.SSLSocket):
    """An SSLSocket with the multifd core's socket calls; never plaintext after shutdown."""

    _what = "channel"  # which channel, for errors: "main channel to tcp:h:p", ...
    _established = False  # handshake seen complete (skips the check on every write)
    _app_sent = 0  # plaintext bytes written: tells a refusal from a mid-stream close
    _behind_main = False  # a multifd channel: its handshake is deferred, main's is done

    def _write_all(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if not self._established:
            self._finish_handshake()
        while len(view):
            try:
                n = self.write(view)
            except ValueError as exc:  # the session is gone (shutdown from another thread)
                raise _closed_error("write") from exc
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except (ssl.SSLError, *_PEER_GONE) as exc:
                err = self.explain_close(exc)
                if err is None:
                    raise
                raise err from exc
            self._app_sent += n
            view = view[n:]

    def _finish_handshake(self) -> None:
        """Run a deferred handshake (`connect_tls_channels`) before the first write, so
        that its failures name the channel and the alert like the main channel's do."""
        if self._sslobj is None:
            return  # the write raises the "session closed" error
        if self.version() is None:
            try:
                self.do_handshake()
            except (TimeoutError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise  # the caller's stall bound words these
            except (ssl.SSLError, OSError) as exc:
                raise _handshake_error(self, exc, self._what,
                                       after_main=self._behind_main) from exc
        self._established = True

    def _pending_alert(self) -> str | None:
        """The alert the peer sent before it left, if it is already here to read: after a
        TLS 1.3 handshake the refusal of our certificate waits unread behind us (a source
        never reads), and the write that fails only sees the EOF or reset behind it."""
        sslobj = self._sslobj  # another thread may drop it (abort): keep our reference
        if sslobj is None:
            return None
        old = self.gettimeout()
        try:
            self.settimeout(0)
            sslobj.read(1)
        except ssl.SSLError as exc:
            return alert_name(exc)
        except (OSError, ValueError):
            return None
        finally:
            if self._sslobj is not None:
                with contextlib.suppress(OSError):
                    self.settimeout(old)
        return None

    def _peer_closed(self) -> bool:
        """The peer has closed or reset the transport (a raw peek that never blocks)."""
        try:
            return socket.socket.recv(self, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except OSError:
            return False  # no data yet (EAGAIN), or our own socket is gone: not the peer

    def explain_close(self, exc: BaseException) -> TlsError | None:
        """A TLS explanation for ``exc`` (our I/O failed, e.g. a write or connecting the
        next channel) when this established session shows why: an alert the peer sent, or
        an EOF early in the session, which is how QEMU refuses a certificate under TLS 1.3
        (only a guess then: `TlsClosedError`). None: nothing TLS to add, keep ``exc``."""
        if not self._established and self.version() is None:
            return None
        self._established = True
        alert = alert_name(exc) or self._pending_alert()
        peer, check = _peer_role(self)
        if alert is not None:
            text = _alert_text(self, alert, f" on {self._what}")
            if alert not in _CERT_ALERTS:
                text += f": {exc}"
            return TlsError(f"TLS: {text}")
        gone = isinstance(exc, _PEER_GONE)
        if isinstance(exc, ssl.SSLError) and not gone:
            return None  # a local TLS failure: its own text says it
        if self._app_sent > _REFUSAL_WINDOW or not (gone or self._peer_closed()):
            return None  # a close mid-stream, or the session is fine: not about TLS
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        then = ": " if gone else "; then: "  # our own failure, or another that led here
        return TlsClosedError(
            f"TLS: the {peer} closed the connection on {self._what} after the handshake "
            f"(did it refuse our certificate? check {check}){then}"
            f"{detail or type(exc).__name__}")

    def sendall(self, data: Any, flags: int = 0) -> None:
        if flags:
            raise ValueError("flags are not supported on a TLS socket")
        self._write_all(data)

    def sendmsg(self, buffers: Iterable[Any], ancdata: Iterable[Any] = (), flags: int = 0,
                address: Any = None) -> int:
        """Gather-send emulation: large buffers go straight to SSL_write, small ones are
        joined (one copy) so headers and 4 KiB pages do not each become a TLS record."""
        if ancdata or address is not None or flags & ~(socket.MSG_DONTWAIT
                                                       | socket.MSG_NOSIGNAL):
            raise ValueError("ancillary data, flags and addresses are not supported over TLS")
        if not flags & socket.MSG_DONTWAIT:
            return self._gather(buffers)
        # Callers pass MSG_DONTWAIT + poll to bound a stalled peer; a TLS record cannot be
        # half-written and retried elsewhere, so bound each wait for the socket instead.
        old = self.gettimeout()
        self.settimeout(STALL_TIMEOUT_S)
        try:
            return self._gather(buffers)
        except TimeoutError as exc:
            raise TimeoutError(f"peer stalled: no byte accepted for {STALL_TIMEOUT_S:g} s "
                               "(dead or not reading)") from exc
        finally:
            if self._sslobj is not None:
                self.settimeout(old)

    def _gather(self, buffers: Iterable[Any]) -> int:
        total = 0
        pending = bytearray()
        for buf in buffers:
            view = memoryview(buf).cast("B")
            total += len(view)
            if len(view) >= _COALESCE:
                if pending:
                    self._write_all(pending)
                    pending.clear()
                self._write_all(view)
            else:
                pending += view
                if len(pending) >= _COALESCE:
                    self._write_all(pending)
                    pending.clear()
        if pending:
            self._write_all(pending)
        return total

    _eof_seen = False

    def _read_into(self, view: memoryview) -> int:
        if self._eof_seen:
            if self._shutdown_timed_out:
                raise TimeoutError("the peer did not close the TLS session in time")
            return 0
        try:
            n = self.read(len(view), view)
        except ValueError as exc:
            raise _closed_error("read") from exc
        except ssl.SSLZeroReturnError:
            n = 0
        if n == 0 and len(view):
            self._mark_eof()
        return n

    def _mark_eof(self) -> None:
        """The peer ended the stream; later reads return EOF too. No close_notify is sent
        back: the peer does not wait for one (see `close_clean`), and bytes sent to a
        peer that has closed would only turn its clean close into a reset."""
        self._eof_seen = True

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """``MSG_WAITALL`` fills ``nbytes`` (or stops at EOF); other flags are refused."""
        view = memoryview(buffer).cast("B")
        if nbytes:
            view = view[:nbytes]
        if flags & ~socket.MSG_WAITALL:
            raise ValueError("only MSG_WAITALL is supported on a TLS socket")
        if not len(view):
            return 0
        if not flags:
            return self._read_into(view)
        got = 0
        while got < len(view):
            n = self._read_into(view[got:])
            if n == 0:
                break
            got += n
        return got

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """``MSG_PEEK`` looks at the raw (encrypted) transport, so it only tells "data or
        alert pending" (non-empty) from "TCP EOF" (empty); it never yields plaintext."""
        if flags & socket.MSG_PEEK:
            if self.pending():
                return b"\x00"  # decrypted bytes are waiting: not at EOF
            return socket.socket.recv(self, bufsize, flags)
        buf = bytearray(bufsize)
        n = self.recv_into(buf, bufsize, flags)
        return bytes(buf[:n])

    def recvmsg_into(self, buffers: Iterable[Any], ancbufsize: int = 0,
                     flags: int = 0) -> tuple[int, list[Any], int, Any]:
        """Scatter-receive emulation: one read into the first non-empty buffer (callers
        loop until every view is full, as with a real short recvmsg)."""
        if ancbufsize or flags:
            raise ValueError("ancillary data and flags are not supported over TLS")
        for buf in buffers:
            view = memoryview(buf).cast("B")
            if len(view):
                return self._read_into(view), [], 0, None
        return 0, [], 0, None

    _shutdown_timed_out = False

    def shutdown(self, how: int) -> None:
        """``SHUT_WR`` is a TLS half-close: send close_notify, then wait (the socket's
        timeout) for the peer to end too; later reads return EOF, or raise TimeoutError
        when the peer did not end in time. Other modes drop the session at once."""
        if how != socket.SHUT_WR or self._sslobj is None:
            super().shutdown(how)
            return
        try:
            self.unwrap()
        except TimeoutError:
            self._shutdown_timed_out = True
        except (OSError, ValueError):
            pass  # the peer is already gone: that is the end we were waiting for
        self._eof_seen = True

    def close_clean(self) -> None:
        """Send close_notify without waiting for the peer's, then close the socket.

        Non-blocking SSL_shutdown: the first step queues close_notify, the second reads
        whatever records are already here (e.g. TLS 1.3 session tickets, which would
        otherwise sit unread and make close() reset the connection) and stops at
        "want read" instead of waiting for an answer nobody needs.
        """
        if self._sslobj is not None and self.fileno() >= 0:
            try:
                self.setblocking(False)
                self.unwrap()
            except (OSError, ValueError):
                pass  # "want read", or the peer already left: both are fine here
        super().close()

    def close(self) -> None:
        self.close_clean()


# -- wrapping ----------------------------------------------------------------------------
def _handshake(sock: TlsSocket, timeout: float, what: str) -> None:
    sock._what = what
    sock.settimeout(max(0.001, timeout))
    try:
        sock.do_handshake()
    except TimeoutError as exc:
        raise TlsError(f"TLS handshake on {what} timed out after {timeout:g} s") from exc
    except (ssl.SSLError, OSError) as exc:
        raise _handshake_error(sock, exc, what) from exc
    sock._established = True
    sock.settimeout(None)


def wrap_client(sock: socket.socket, ctx: ssl.SSLContext, hostname: str,
                timeout: float = HANDSHAKE_TIMEOUT_S, what: str = "channel") -> TlsSocket:
    """Client side of one session on a connected socket (consumed: closed on failure)."""
    try:
        tls = ctx.wrap_socket(sock, server_side=False, server_hostname=hostname,
                              do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    assert isinstance(tls, TlsSocket)
    try:
        _handshake(tls, timeout, what)
    except BaseException:
        super(TlsSocket, tls).close()
        raise
    return tls


def wrap_server(sock: socket.socket, ctx: ssl.SSLContext, authz: Sequence[str] = (),
                timeout: float = HANDSHAKE_TIMEOUT_S, what: str = "channel") -> TlsSocket:
    """Server side of one session; checks the client certificate against ``authz``."""
    try:
        peer = sock.getpeername()
    except OSError:
        peer = None
    try:
        tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    assert isinstance(tls, TlsSocket)
    src = f"{what} from {peer}" if peer else what
    try:
        _handshake(tls, timeout, src)
        cert = tls.getpeercert()
        if not cert:  # CERT_REQUIRED makes this unreachable; keep the check explicit
            raise TlsError(f"TLS client on {src} presented no certificate")
        if not authz_allows(authz, cert):
            _cns, dn = peer_identity(cert)
            raise TlsError(f"TLS client on {src} is not authorized by tls-authz: "
                           f"certificate {dn!r} is not in the allow-list")
    except BaseException:
        super(TlsSocket, tls).close()
        raise
    return tls


@dataclass(frozen=True)
class TlsConfig:
    """What one end needs: the creds directory, the peer name to verify, the allow-list."""

    creds_dir: Path
    hostname: str = ""
    authz: tuple[str, ...] = ()

    @classmethod
    def from_params(cls, params: Any) -> TlsConfig | None:
        """From MigrationParameters (``tls-creds`` = directory); None when TLS is off."""
        creds = params.get("tls-creds") or ""
        if not creds:
            return None
        return cls(Path(creds), params.get("tls-hostname") or "",
                   parse_authz(params.get("tls-authz") or ""))

    @classmethod
    def from_args(cls, args: Any) -> TlsConfig | None:
        """From `add_tls_arguments` options; None without ``--tls-creds``."""
        p = tls_params(args)
        if not p["tls-creds"]:
            return None
        return cls(Path(p["tls-creds"]), p["tls-hostname"], parse_authz(p["tls-authz"]))

    def peer_hostname(self, addr: Address) -> str:
        """``tls-hostname``, else the URI's host (QEMU's default); unix: needs the former."""
        if self.hostname:
            return self.hostname
        if isinstance(addr, TcpAddress) and addr.host:
            return addr.host
        raise TlsError(f"TLS to {addr} needs tls-hostname (no host name in the URI)")

    def client(self) -> ssl.SSLContext:
        return client_context(self.creds_dir)

    def server(self) -> ssl.SSLContext:
        return server_context(self.creds_dir)


def _check_addr(addr: Any) -> None:
    if not isinstance(addr, TcpAddress | UnixAddress):
        raise TlsError(f"TLS needs a tcp: or unix: URI, not {addr}")


def connect_tls(addr: TcpAddress | UnixAddress, tls: TlsConfig,
                timeout: float = HANDSHAKE_TIMEOUT_S,
                ctx: ssl.SSLContext | None = None, what: str = "main channel") -> TlsSocket:
    """Connect and finish the TLS handshake within ``timeout``."""
    _check_addr(addr)
    ctx = ctx or tls.client()
    hostname = tls.peer_hostname(addr)
    deadline = time.monotonic() + timeout
    sock = connect(addr, timeout)
    return wrap_client(sock, ctx, hostname, max(0.001, deadline - time.monotonic()),
                       f"{what} to {addr}")


def connect_tls_channels(addr: TcpAddress | UnixAddress, n_multifd: int, tls: TlsConfig,
                         timeout: float) -> tuple[TlsSocket, list[TlsSocket]]:
    """Main first (handshake done), then ``n_multifd`` channels, each its own session.

    A channel's handshake runs on its first write, in its own sender thread, right before
    its MultiFDInit_t, as QEMU's sources do: a QEMU 7.2 destination reads each channel's
    init packet in its main loop, blocking the next channel's handshake until it arrives.
    Handshake and verification errors therefore surface from the first send, naming
    "multifd channel N". A channel that cannot connect because the destination refused
    main (and stopped listening) is reported as that refusal (`TlsSocket.explain_close`).
    """
    if not 0 <= n_multifd <= 255:
        raise ValueError(f"n_multifd must be between 0 and 255, got {n_multifd}")
    ctx = tls.client()
    deadline = time.monotonic() + timeout
    main = connect_tls(addr, tls, timeout, ctx)
    chans: list[TlsSocket] = []
    try:
        for i in range(n_multifd):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"connecting multifd channels to {addr}: {i} of "
                                   f"{n_multifd} up after {timeout:g} s")
            try:
                sock = connect(addr, left)
            except OSError as exc:
                err = main.explain_close(exc)
                if err is None:
                    raise
                raise err from exc
            try:  # handshake deferred to the channel thread's first write (see above)
                chan = ctx.wrap_socket(sock, server_side=False,
                                       server_hostname=tls.peer_hostname(addr),
                                       do_handshake_on_connect=False)
            except BaseException:
                sock.close()
                raise
            assert isinstance(chan, TlsSocket)
            chan._what = f"multifd channel {i} to {addr}"
            chan._behind_main = True
            chans.append(chan)
    except BaseException:
        for s in chans:
            super(TlsSocket, s).close()
        super(TlsSocket, main).close()
        raise
    return main, chans


def accept_tls(listener: Listener, tls: TlsConfig, timeout: float,
               ctx: ssl.SSLContext | None = None, what: str = "main channel") -> TlsSocket:
    """Accept one connection and run the server handshake, all within ``timeout``."""
    ctx = ctx or tls.server()
    deadline = time.monotonic() + timeout
    conn = listener.accept(timeout)
    return wrap_server(conn, ctx, tls.authz, max(0.001, deadline - time.monotonic()), what)


def _named(text: str) -> Callable[[], str]:
    return lambda: text


def accept_tls_channels(listener: Listener, n_multifd: int, tls: TlsConfig,
                        timeout: float) -> tuple[TlsSocket, list[TlsSocket]]:
    """First connection is main, the next ``n_multifd`` are multifd (order, not peeking).

    Handshakes run one at a time in accept order, each bounded by what is left of
    ``timeout``. A failed handshake or authorization fails the whole set-up, like QEMU.
    While waiting for the next connection, those already taken are watched
    (`SetupWatch`): one the source resets fails the set-up at once, naming it.
    Connections queued beyond the expected count are refused.
    """
    if not 0 <= n_multifd <= 255:
        raise ValueError(f"n_multifd must be between 0 and 255, got {n_multifd}")
    ctx = tls.server()
    deadline = time.monotonic() + timeout
    got: list[TlsSocket] = []

    def waiting_for() -> str:
        missing = n_multifd + 1 - len(got)  # main is taken first: the rest are multifd
        return f"{missing} more multifd channel{'s' if missing > 1 else ''}"

    watch = SetupWatch(listener, waiting_for)
    try:
        for i in range(n_multifd + 1):
            what = "main channel" if i == 0 else f"multifd connection {i}"
            conn = None
            while conn is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"expected 1 main + {n_multifd} multifd channels, "
                                       f"got {len(got)} after {timeout:g} s")
                if watch.wait(left):  # only the listener is registered besides `got`
                    conn = listener.accept_nowait()
            got.append(wrap_server(conn, ctx, tls.authz,
                                   max(0.001, deadline - time.monotonic()), what))
            watch.take(got[-1], _named("the main channel" if i == 0 else what))
    except BaseException:
        for s in got:
            super(TlsSocket, s).close()
        raise
    while (extra := listener.accept_nowait()) is not None:
        log.error("refusing incoming migration connection: beyond 1 main + %d multifd "
                  "channels", n_multifd)
        extra.close()
    return got[0], got[1:]


# -- command-line options ------------------------------------------------------------------
def add_tls_arguments(parser: Any) -> None:
    """``--tls-creds DIR [--tls-hostname NAME] [--tls-authz NAME,...]`` (QEMU's names)."""
    parser.add_argument("--tls-creds", metavar="DIR", default="",
                        help="TLS on every channel; DIR holds ca-cert.pem, server-cert.pem/"
                             "server-key.pem, client-cert.pem/client-key.pem (QEMU layout)")
    parser.add_argument("--tls-hostname", metavar="NAME", default="",
                        help="name the destination's certificate must carry (default: "
                             "the URI's host)")
    parser.add_argument("--tls-authz", metavar="NAME,...", default="",
                        help="destination: only clients whose certificate CN (or full DN, "
                             "';'-separated) is listed")


def tls_params(args: Any) -> dict[str, str]:
    """The ``tls-*`` migration parameters from parsed `add_tls_arguments` options."""
    creds = getattr(args, "tls_creds", "") or ""
    return {"tls-creds": str(Path(creds).resolve()) if creds else "",
            "tls-hostname": getattr(args, "tls_hostname", "") or "",
            "tls-authz": getattr(args, "tls_authz", "") or ""}


def tls_argv(args: Any) -> list[str]:
    """The same options as argv, to hand to a child process."""
    out: list[str] = []
    for key, value in tls_params(args).items():
        if value:
            out += [f"--{key}", value]
    return out
