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
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    "TlsConfig",
    "TlsError",
    "TlsSocket",
    "accept_tls",
    "accept_tls_channels",
    "add_tls_arguments",
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

# RFC 4514 short names, as gnutls prints a distinguished name (and so QEMU's authz sees it).
_DN_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
    "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
}


class TlsError(ConnectionError):
    """TLS set-up failed: missing credentials, handshake, verification or authorization."""


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


class TlsSocket(ssl.SSLSocket):
    """An SSLSocket with the multifd core's socket calls; never plaintext after shutdown."""

    def _write_all(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            try:
                n = self.write(view)
            except ValueError as exc:  # the session is gone (shutdown from another thread)
                raise _closed_error("write") from exc
            view = view[n:]

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
    sock.settimeout(max(0.001, timeout))
    try:
        sock.do_handshake()
    except TimeoutError as exc:
        raise TlsError(f"TLS handshake on {what} timed out after {timeout:g} s") from exc
    except ssl.SSLCertVerificationError as exc:
        raise TlsError(f"TLS handshake on {what} failed: certificate verify failed: "
                       f"{exc.verify_message or exc.reason}") from exc
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"TLS handshake on {what} failed: {exc}") from exc
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
    Handshake and verification errors therefore surface from the first send.
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
            sock = connect(addr, left)
            try:  # handshake deferred to the channel thread's first write (see above)
                chans.append(ctx.wrap_socket(sock, server_side=False,  # type: ignore[arg-type]
                                             server_hostname=tls.peer_hostname(addr),
                                             do_handshake_on_connect=False))
            except BaseException:
                sock.close()
                raise
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


def accept_tls_channels(listener: Listener, n_multifd: int, tls: TlsConfig,
                        timeout: float) -> tuple[TlsSocket, list[TlsSocket]]:
    """First connection is main, the next ``n_multifd`` are multifd (order, not peeking).

    Handshakes run one at a time in accept order, each bounded by what is left of
    ``timeout``. A failed handshake or authorization fails the whole set-up, like QEMU.
    Connections queued beyond the expected count are refused.
    """
    if not 0 <= n_multifd <= 255:
        raise ValueError(f"n_multifd must be between 0 and 255, got {n_multifd}")
    ctx = tls.server()
    deadline = time.monotonic() + timeout
    got: list[TlsSocket] = []
    try:
        for i in range(n_multifd + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"expected 1 main + {n_multifd} multifd channels, got "
                                   f"{len(got)} after {timeout:g} s")
            what = "main channel" if i == 0 else f"multifd connection {i}"
            try:
                got.append(accept_tls(listener, tls, left, ctx, what))
            except TimeoutError:
                raise TimeoutError(f"expected 1 main + {n_multifd} multifd channels, got "
                                   f"{len(got)} after {timeout:g} s") from None
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
