"""Development certificates: a local CA and server certificates it signs.

Operators need HTTPS on a laptop or a test fleet before they have real certificates; this is
`mkcert` in a few functions. ``verge cert dev`` creates a CA once (kept and reused on later
runs, so a browser or curl that trusts ``ca.pem`` keeps trusting new certificates) and one
ECDSA P-256 certificate per host name or IP address. Private keys are written with mode 0600,
every file atomically (temp file + rename).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from verge.files import write_atomic

DEFAULT_DEV_HOSTS: tuple[str, ...] = (
    "demo.verge.test",
    "localhost",
    "127.0.0.1",
    "127.0.0.2",
    "127.0.0.3",
)
CA_DAYS = 3650
LEAF_DAYS = 397  # the most browsers accept for a leaf certificate
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class CertFiles:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class DevCertificates:
    ca: CertFiles
    hosts: dict[str, CertFiles]  # host name or IP -> its certificate and key


def _write_file(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=mode)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signing only (ECDSA needs no key encipherment); a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        encipher_only=False, decipher_only=False,
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host.encode("idna").decode("ascii") if not host.isascii() else host)


def file_stem(host: str) -> str:
    """A file name for a host: ``*.example.com`` -> ``_wildcard.example.com``."""
    return host.replace("*", "_wildcard").replace(":", "_").replace("/", "_")


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey), "dev CA keys are ECDSA"
    return key


def create_ca(cert_file: Path, key_file: Path, name: str | None = None) -> CertFiles:
    """A new self-signed CA (10 years); the key file gets mode 0600."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Verge development"),
            x509.NameAttribute(NameOID.COMMON_NAME, name or f"Verge dev CA {secrets.token_hex(4)}"),
        ]
    )
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_file(Path(key_file), _key_pem(key), 0o600)
    _write_file(Path(cert_file), _cert_pem(cert), 0o644)
    return CertFiles(Path(cert_file), Path(key_file))


def ensure_ca(out_dir: Path) -> CertFiles:
    """``out_dir/ca.pem`` and ``out_dir/ca-key.pem``: reused when both exist, else created."""
    ca = CertFiles(Path(out_dir) / "ca.pem", Path(out_dir) / "ca-key.pem")
    if ca.cert_file.exists() and ca.key_file.exists():
        return ca
    return create_ca(ca.cert_file, ca.key_file)


def issue_cert(
    ca: CertFiles,
    hosts: Sequence[str],
    cert_file: Path,
    key_file: Path,
    days: int = LEAF_DAYS,
    common_name: str | None = None,
) -> CertFiles:
    """A server certificate for ``hosts`` (DNS names, ``*.`` wildcards, IPs) signed by ``ca``."""
    if not hosts:
        raise ValueError("a certificate needs at least one host")
    ca_cert, ca_key = load_cert(ca.cert_file), _load_key(ca.key_file)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_file(Path(key_file), _key_pem(key), 0o600)
    _write_file(Path(cert_file), _cert_pem(cert), 0o644)
    return CertFiles(Path(cert_file), Path(key_file))


def _still_good(files: CertFiles, ca: CertFiles, hosts: Sequence[str]) -> bool:
    """True when an existing certificate is from this CA, for these hosts, and not expiring."""
    if not (files.cert_file.exists() and files.key_file.exists()):
        return False
    try:
        cert, ca_cert = load_cert(files.cert_file), load_cert(ca.cert_file)
        cert.verify_directly_issued_by(ca_cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except Exception:  # unreadable, foreign or malformed: issue a new one
        return False
    wanted = {_general_name(h) for h in hosts}
    return set(sans) == wanted and cert.not_valid_after_utc - _now() > RENEW_BEFORE


def dev_certificates(out_dir: Path, hosts: Sequence[str] = DEFAULT_DEV_HOSTS) -> DevCertificates:
    """The dev CA in ``out_dir`` (reused) and one certificate per host (reused while valid).

    Files: ``ca.pem``, ``ca-key.pem``, and ``<host>.pem`` + ``<host>-key.pem`` per host.
    """
    out_dir = Path(out_dir)
    ca = ensure_ca(out_dir)
    issued: dict[str, CertFiles] = {}
    for host in hosts:
        stem = file_stem(host)
        files = CertFiles(out_dir / f"{stem}.pem", out_dir / f"{stem}-key.pem")
        if not _still_good(files, ca, [host]):
            issue_cert(ca, [host], files.cert_file, files.key_file)
        issued[host] = files
    return DevCertificates(ca, issued)
