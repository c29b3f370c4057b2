"""Throwaway X.509 material for the TLS tests: a CA, the broker's certificate, client certificates
(good, expired, signed by a stranger), written as PEM files. Built with ``cryptography``."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_USER = "relay-client"  # the client certificate's CN: RabbitMQ's user under EXTERNAL login
SERVER_NAME = "localhost"  # the only name in the broker's certificate: 127.0.0.1 is a wrong host name


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA that signs the broker's and the clients' certificates
    other_ca: Path  # a CA nobody here uses: trusting only it must fail
    server: Pair
    server_expired: Pair
    client: Pair
    client_expired: Pair
    client_unknown_ca: Pair  # signed by other_ca: the broker must refuse it


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class _Authority:
    def __init__(self, cn: str) -> None:
        self.key = _key()
        self.name = _name(cn)
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self, cn: str, *, server: bool, expired: bool = False
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = _key()
        now = dt.datetime.now(dt.UTC)
        start, end = now - dt.timedelta(hours=1), now + dt.timedelta(days=30)
        if expired:  # valid for a day, ending yesterday
            start, end = now - dt.timedelta(days=2), now - dt.timedelta(days=1)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_pair(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pair:
    key_path = directory / f"{stem}.key"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return Pair(_write_cert(directory / f"{stem}.pem", cert), key_path)


def make_tls_files(directory: Path) -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca, stranger = _Authority("revoke-relay test CA"), _Authority("someone else's CA")
    return TlsFiles(
        ca=_write_cert(directory / "ca.pem", ca.cert),
        other_ca=_write_cert(directory / "other-ca.pem", stranger.cert),
        server=_write_pair(directory, "server", *ca.issue(SERVER_NAME, server=True)),
        server_expired=_write_pair(directory, "server-expired", *ca.issue(SERVER_NAME, server=True, expired=True)),
        client=_write_pair(directory, "client", *ca.issue(CLIENT_USER, server=False)),
        client_expired=_write_pair(directory, "client-expired", *ca.issue(CLIENT_USER, server=False, expired=True)),
        client_unknown_ca=_write_pair(directory, "client-stranger", *stranger.issue(CLIENT_USER, server=False)),
    )
