"""Test x509 material in QEMU's tls-creds-x509 layout, made with the `cryptography` package.

`make_creds(dir)` writes ca-cert.pem, server-cert.pem/-key.pem and client-cert.pem/-key.pem.
The key usages follow what QEMU's credential sanity checks want (CA: basicConstraints CA,
keyCertSign; server: serverAuth; client: clientAuth; both digitalSignature +
keyEncipherment), so the same directory works for QEMU 7.2 (gnutls) and for us. RSA 2048
for the widest interoperability; the server certificate names localhost, 127.0.0.1, ::1.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class Ca:
    """A CA key + certificate that can sign more leaves (for "other CA" tests)."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str, org: str = "multifd tests") -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(cn: str = "multifd test CA") -> Ca:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return Ca(key, cert)


def make_leaf(ca: Ca, cn: str, *, server: bool, names: tuple[str, ...] = (),
              expired: bool = False) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) for a server (serverAuth + SAN) or client (clientAuth) cert."""
    key = _key()
    now = dt.datetime.now(dt.UTC)
    if expired:
        start, end = now - dt.timedelta(days=30), now - dt.timedelta(days=1)
    else:
        start, end = now - dt.timedelta(days=1), now + dt.timedelta(days=365)
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca.key.public_key()), critical=False)
    )
    if names:
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca.key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def make_creds(directory: Path, *, ca: Ca | None = None, client_ca: Ca | None = None,
               server_cn: str = "localhost", server_names: tuple[str, ...] = SERVER_NAMES,
               client_cn: str = "multifd-source", client_expired: bool = False) -> Ca:
    """Write a full tls-creds-x509 directory; returns the CA (``client_ca`` signs the
    client cert instead, to make a client the destination must not trust)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = ca or make_ca()
    (directory / "ca-cert.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    cert, key = make_leaf(ca, server_cn, server=True, names=server_names)
    (directory / "server-cert.pem").write_bytes(cert)
    (directory / "server-key.pem").write_bytes(key)
    cert, key = make_leaf(client_ca or ca, client_cn, server=False, expired=client_expired)
    (directory / "client-cert.pem").write_bytes(cert)
    (directory / "client-key.pem").write_bytes(key)
    for name in ("server-key.pem", "client-key.pem"):
        (directory / name).chmod(0o600)
    return ca
