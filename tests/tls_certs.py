"""Certificates for the TLS tests, generated at run time (never committed): a test CA, a server
certificate for localhost / 127.0.0.1, client certificates signed by that CA (for mutual TLS),
and a client certificate from another CA that a server must refuse."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: CertPair
    # Signed by ``ca``: CN "tenant-a", SANs a DNS name and a SPIFFE URI.
    client: CertPair
    # Signed by a CA the server does not trust.
    stranger: CertPair
    stranger_ca: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    cn: str, sans: list[x509.GeneralName], issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], usage: x509.ObjectIdentifier
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(issuer[1], hashes.SHA256())
    )
    return cert, key


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca("framewise test CA")
    server = _leaf(
        "localhost",
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ca,
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client = _leaf(
        "tenant-a",
        [x509.DNSName("client-a.example"), x509.UniformResourceIdentifier("spiffe://framewise.test/tenant/a")],
        ca,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    other_ca = _ca("some other CA")
    stranger = _leaf("intruder", [x509.DNSName("intruder.example")], other_ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(
        ca=_write_cert(ca[0], folder / "ca.pem"),
        server=CertPair(_write_cert(server[0], folder / "server.pem"), _write_key(server[1], folder / "server.key")),
        client=CertPair(_write_cert(client[0], folder / "client.pem"), _write_key(client[1], folder / "client.key")),
        stranger=CertPair(_write_cert(stranger[0], folder / "stranger.pem"), _write_key(stranger[1], folder / "stranger.key")),
        stranger_ca=_write_cert(other_ca[0], folder / "stranger-ca.pem"),
    )
