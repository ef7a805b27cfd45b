"""TLS certificates managed by the control plane: checking what operators upload, sealing keys.

Checks (:func:`parse_certificate`): the PEM chain parses, the private key parses and belongs
to the first certificate, every certificate was issued by the next one (server certificate
first, then its issuers), the server certificate is valid now and names its hosts in the
subjectAltName (DNS names; browsers ignore the common name). Each failure is an
:class:`~verge.control.store.Invalid` naming ``cert_pem`` or ``key_pem``. Error messages
describe the problem, never the key.

Encryption at rest (:class:`KeySealer`): private keys are stored as Fernet tokens
(AES-128-CBC + HMAC-SHA256 from ``cryptography``, which verge already depends on), never in
clear. Fernet because it is authenticated, versioned and one call each way, so there is no
home-made crypto to get wrong. The secret comes from ``VERGE_SECRET`` (any text; several
comma-separated secrets allow a rotation: the first seals, all open), else from a key file
next to the SQLite database (``<db>.key``, mode 0600, made on first use). PostgreSQL
replicas run on several machines and must agree on the secret, so there ``VERGE_SECRET`` is
required; without it certificate writes answer 503 with the reason. A stolen database alone
then yields no keys; whoever also has the secret (the control plane host) has them, which is
the same trust the edges need anyway. Each secret is stretched to a Fernet key with HKDF.

Which names a certificate is handed to the edges for (:func:`tenant_certificate_names`,
:func:`sni_assignment`): a tenant's certificate only for hosts that tenant's services serve,
whatever its SANs claim, so that one tenant's ``*.example.com`` never answers for another
tenant's ``www.example.com``; the fleet's own (tenant ``default``) for all its SANs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from verge.control.hostnames import HostIndex, usable_names

log = logging.getLogger("verge.control.certificates")

EXPIRY_WARNING = timedelta(days=14)
"""A certificate closer than this to its end gets a ``warning`` in API answers."""
SECRET_ENV = "VERGE_SECRET"


class CertificateError(ValueError):
    """An uploaded certificate or key is unusable; ``field`` is ``cert_pem`` or ``key_pem``."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.message, self.field = message, field


class SecretUnavailable(RuntimeError):
    """No secret to seal keys with (PostgreSQL store without VERGE_SECRET)."""


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedCertificate:
    hosts: list[str]
    not_after: datetime
    fingerprint_sha256: str
    cert_pem: str
    """The chain, re-encoded (server certificate first)."""
    key_pem: str = field(repr=False)
    """The key as unencrypted PKCS#8 PEM; never logged, never returned by the API."""


def parse_certificate(
    cert_pem: str, key_pem: str, now: datetime | None = None
) -> ParsedCertificate:
    """Check an uploaded chain and key; CertificateError naming the field on any problem."""
    chain = _load_chain(cert_pem)
    key = _load_key(key_pem)
    leaf = chain[0]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        if any(_spki(key.public_key()) == _spki(c.public_key()) for c in chain[1:]):
            raise CertificateError(
                "wrong chain order: the server certificate (the one matching the key) must "
                "come first in cert_pem, then each issuer",
                "cert_pem",
            )
        raise CertificateError(
            "the key does not belong to the certificate (the first one in cert_pem)", "key_pem"
        )
    _check_order(chain)
    _check_validity(leaf, now or datetime.now(UTC))
    return ParsedCertificate(
        hosts=_san_hosts(leaf),
        not_after=leaf.not_valid_after_utc,
        fingerprint_sha256=hashlib.sha256(
            leaf.public_bytes(serialization.Encoding.DER)
        ).hexdigest(),
        cert_pem="".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
    )


def expiry_warning(not_after: datetime, now: datetime | None = None) -> str | None:
    """A warning ("expires in N days") when fewer than 14 days are left, else None."""
    left = not_after - (now or datetime.now(UTC))
    if left >= EXPIRY_WARNING:
        return None
    if left.total_seconds() <= 0:
        return "expired: edges still serve it until it is replaced"
    return f"expires in {left.days} days ({not_after.date().isoformat()}): rotate it soon"


def _load_chain(text: str) -> list[x509.Certificate]:
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise CertificateError("no PEM certificate found (-----BEGIN CERTIFICATE-----)", "cert_pem")
    if "PRIVATE KEY-----" in text:
        raise CertificateError("cert_pem contains a private key; send it as key_pem", "cert_pem")
    try:
        chain = x509.load_pem_x509_certificates(text.encode())
    except ValueError as exc:
        raise CertificateError(f"the PEM certificate does not parse: {exc}", "cert_pem") from None
    if not chain:
        raise CertificateError("no PEM certificate found", "cert_pem")
    return chain


def _load_key(text: str):  # noqa: ANN202 (one of several private key types)
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except TypeError:
        raise CertificateError(
            "the key is encrypted with a passphrase; upload it unencrypted", "key_pem"
        ) from None
    except Exception:  # any parse failure; the message must not echo the key
        raise CertificateError(
            "not a PEM private key, or one that does not parse", "key_pem"
        ) from None
    if not hasattr(key, "public_key"):
        raise CertificateError("unsupported private key type", "key_pem")
    return key


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_order(chain: list[x509.Certificate]) -> None:
    for index, (child, issuer) in enumerate(zip(chain, chain[1:], strict=False), start=1):
        try:
            child.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise CertificateError(
                f"certificate {index + 1} in cert_pem did not issue certificate {index}: put the "
                "server certificate first, then each issuer in order",
                "cert_pem",
            ) from None


def _check_validity(leaf: x509.Certificate, now: datetime) -> None:
    if leaf.not_valid_after_utc <= now:
        raise CertificateError(
            f"the certificate expired on {leaf.not_valid_after_utc.isoformat()}", "cert_pem"
        )
    if leaf.not_valid_before_utc > now:
        raise CertificateError(
            f"the certificate is not valid before {leaf.not_valid_before_utc.isoformat()}",
            "cert_pem",
        )


def _san_hosts(leaf: x509.Certificate) -> list[str]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    names = san.get_values_for_type(x509.DNSName) if san is not None else []
    hosts = list(dict.fromkeys(name.strip().rstrip(".").lower() for name in names if name))
    if not hosts:
        raise CertificateError(
            "the certificate names no DNS hosts in its subjectAltName (SNI needs them)",
            "cert_pem",
        )
    return hosts


# ---------------------------------------------------------------------------------------------
# Encryption at rest
# ---------------------------------------------------------------------------------------------


def _fernet(secret: bytes) -> Fernet:
    hkdf = HKDF(hashes.SHA256(), 32, salt=None, info=b"verge control-plane certificate keys")
    return Fernet(base64.urlsafe_b64encode(hkdf.derive(secret)))


class KeySealer:
    """Seal and open private keys; the first secret seals, every one opens (rotation)."""

    def __init__(self, secrets: list[bytes]) -> None:
        if not secrets:
            raise ValueError("at least one secret is needed")
        self._fernet = MultiFernet([_fernet(s) for s in secrets])

    def __repr__(self) -> str:
        return "KeySealer(...)"

    def seal(self, key_pem: str) -> str:
        return self._fernet.encrypt(key_pem.encode()).decode("ascii")

    def open(self, sealed: str) -> str:
        """The key PEM; ValueError when no secret opens it (wrong VERGE_SECRET)."""
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode()
        except InvalidToken:
            raise ValueError(
                "no configured secret opens this key (VERGE_SECRET changed?)"
            ) from None


def sealer_for(database_url: str) -> KeySealer:
    """The sealer for a store: VERGE_SECRET, else a key file next to the SQLite database."""
    configured = os.environ.get(SECRET_ENV, "")
    secrets = [part.strip().encode() for part in configured.split(",") if part.strip()]
    if secrets:
        return KeySealer(secrets)
    if not database_url.startswith("sqlite"):
        raise SecretUnavailable(
            f"set {SECRET_ENV} (the same on every control-plane replica) to store certificate "
            "keys encrypted in PostgreSQL"
        )
    database = Path(database_url.split(":///", 1)[1]).expanduser()
    return KeySealer([_key_file_secret(database.with_name(database.name + ".key"))])


def _key_file_secret(path: Path) -> bytes:
    """The secret in ``path``, made (0600, atomically, first writer wins) when missing."""
    with contextlib.suppress(FileNotFoundError):
        return path.read_bytes().strip()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, Fernet.generate_key())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process made it first: then use theirs
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    log.warning("made %s to encrypt certificate keys at rest; back it up with the database", path)
    return path.read_bytes().strip()


# ---------------------------------------------------------------------------------------------
# Which certificate serves which host name (SNI) in the bundle
# ---------------------------------------------------------------------------------------------


def tenant_certificate_names(sans: Sequence[str], tenant_id: int, index: HostIndex) -> list[str]:
    """The names a tenant's certificate is handed to the edges for: its SANs that the
    tenant's own services serve (wildcards per RFC 6125, see hostnames.usable_names).

    A certificate never reaches an edge for another tenant's host, nor for a name nobody
    serves, whatever its SANs say: uploading ``*.verge.test`` does not take over
    ``demo.verge.test``.
    """
    return usable_names(sans, tenant_id, index)


def sni_assignment(
    certs: list[tuple[str, int, list[str]]], owners: dict[str, int] | HostIndex
) -> dict[str, list[str]]:
    """For (name, tenant, hosts) certificates: name -> the hosts it is picked for.

    When several certificates name one host, the one of the tenant whose service serves the
    host wins (so a certificate cannot take over another tenant's traffic), then the first by
    name. Certificates left with no host are omitted. ``owners`` is service host -> tenant,
    or a HostIndex; the hosts of tenant certificates are already cut down to their own
    (tenant_certificate_names).
    """
    index = owners if isinstance(owners, HostIndex) else HostIndex.of_owners(owners)
    best: dict[str, tuple[int, str]] = {}
    for name, tenant_id, hosts in sorted(certs):
        for host in hosts:
            owner = index.san_owner(host)
            rank = 0 if owner is None or owner.tenant_id == tenant_id else 1
            if host not in best or rank < best[host][0]:
                best[host] = (rank, name)
    assigned: dict[str, list[str]] = {}
    for host, (_rank, name) in best.items():
        assigned.setdefault(name, []).append(host)
    return assigned
