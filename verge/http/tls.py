"""TLS termination building blocks: safe contexts, SNI certificate selection, origin TLS.

One listener serves many sites, so the certificate is picked per connection from the
ClientHello's server name (SNI). ``TlsStore`` keeps one ``ssl.SSLContext`` per certificate
and hands the listener a single front context whose ``sni_callback`` switches the
connection to the matching one. The front context never changes, so ``reload()`` can rotate
or add certificates under a running server: new handshakes see the new table, connections
already open keep theirs.
The name matching itself (:class:`HostTable`) is shared with HTTP/3, whose certificates are
aioquic key material rather than contexts (:mod:`verge.http.h3server`).

Session tickets are encrypted with the front context's keys (OpenSSL keeps the original
context as the session context), so TLS 1.3 resumption works whichever certificate served.
``set_ticket_keys()`` puts keys shared by all workers of a node on that front context (see
:mod:`verge.http.tls_tickets`), so a ticket from one worker resumes on any other. A
certificate with an ``ocsp_response`` file gets that response stapled (see
:mod:`verge.http.tls_ocsp`).

Certificates that arrive as PEM text (the control plane's bundle) become files first:
``ssl`` only loads chains and keys from files. :class:`InlinePemFiles` writes them, private
(0600 in a 0700 directory), atomically and named by their content's digest, so every worker
and every reload of the same certificate share one pair of files.
"""

from __future__ import annotations

import contextlib
import hashlib
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from verge.files import write_atomic
from verge.http.tls_ocsp import install_ocsp_stapling
from verge.http.tls_tickets import TicketKey, TicketKeyRing, install_ticket_keys

# TLS 1.2 suites: ECDHE key exchange (forward secrecy) with AEAD ciphers only. TLS 1.3 suites
# are all AEAD + (EC)DHE already and are not affected by set_ciphers().
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


@dataclass(frozen=True)
class CertSpec:
    cert_file: str
    key_file: str
    hosts: tuple[str, ...]  # exact names, or "*.example.com" for one label under example.com
    ocsp_response: str | None = None  # DER OCSP response file to staple


class InlinePemFiles:
    """PEM text as private files for ``load_cert_chain``: ``directory/<digest>.crt|.key``.

    The name is a digest of the certificate and key, so writing the same pair again (another
    worker, another reload) finds the files in place; a new pair never overwrites a file a
    context is loading. :meth:`prune` removes pairs no config uses any more.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def files_for(self, cert_pem: str, key_pem: str) -> tuple[str, str]:
        """(cert path, key path) holding these PEMs, written if they are not there yet."""
        digest = hashlib.sha256(f"{cert_pem}\0{key_pem}".encode()).hexdigest()[:40]
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths = []
        for suffix, text in ((".crt", cert_pem), (".key", key_pem)):
            path = self.directory / f"{digest}{suffix}"
            if not path.exists():
                write_atomic(path, text.encode())
            paths.append(str(path))
        return paths[0], paths[1]

    def prune(self, in_use: Iterable[str]) -> int:
        """Delete the files of this directory not in ``in_use``; how many went."""
        keep = {str(Path(p)) for p in in_use}
        removed = 0
        if not self.directory.is_dir():
            return 0
        for path in self.directory.iterdir():
            if path.suffix in (".crt", ".key") and str(path) not in keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed


def _tune(ctx: ssl.SSLContext, alpn: Sequence[str]) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options &= ~ssl.OP_NO_TICKET  # session tickets on: TLS 1.3 (and 1.2) resumption
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _bare_server_context(alpn: Sequence[str]) -> ssl.SSLContext:
    return _tune(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), alpn)


def safe_server_context(
    cert_file: str, key_file: str, alpn: Sequence[str] = ("h2", "http/1.1")
) -> ssl.SSLContext:
    """A server context with one certificate and today's safe defaults.

    TLS 1.2 minimum (SSLv3, TLS 1.0 and 1.1 refused); for TLS 1.2 only ECDHE (forward
    secret) AEAD suites; no TLS compression (CRIME); the server's cipher order wins; session
    tickets on for resumption; ALPN offers ``alpn`` in order of preference.

    OCSP stapling: Python's ``ssl`` has no server-side API for it; :class:`TlsStore` adds
    it with :func:`verge.http.tls_ocsp.install_ocsp_stapling` when a response file is given.
    """
    ctx = _bare_server_context(alpn)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def origin_client_context(ca_file: str | None = None, verify: bool = True) -> ssl.SSLContext:
    """A client context for HTTPS origins.

    ``ca_file`` pins the trust to that CA bundle only (not the system store); without it the
    system CAs are used. ``verify=False`` turns off certificate and host name checks (for an
    origin with a self-signed certificate on a trusted network). TLS 1.2 minimum.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(["http/1.1"])
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def normalise_host(name: str) -> str:
    """Lower case, no trailing dot, IDNA A-labels (as they appear in certificates)."""
    name = name.strip().rstrip(".").lower()
    if not name.isascii():
        name = name.encode("idna").decode("ascii")
    return name


V = TypeVar("V")  # what a HostTable maps names to


@dataclass(frozen=True)
class HostTable(Generic[V]):
    """Certificates by host name: an immutable snapshot, swapped whole on reload, read lock-free.

    The one place that knows how a ClientHello's server name picks a certificate, shared by
    the TCP listener (:class:`TlsStore`, values are ``ssl.SSLContext``) and HTTP/3
    (:mod:`verge.http.h3server`, values are aioquic key material): an exact name first, then
    a ``*.parent`` wildcard for exactly one more label, then the default (None: refuse).
    """

    exact: dict[str, V]
    wildcard: dict[str, V]  # "example.com" for "*.example.com"
    default: V | None

    def lookup(self, server_name: str | None) -> V | None:
        if server_name:
            name = normalise_host(server_name)
            value = self.exact.get(name)
            if value is not None:
                return value
            _, dot, parent = name.partition(".")
            if dot and (value := self.wildcard.get(parent)) is not None:
                return value
        return self.default

    @classmethod
    def build(
        cls, certs: Sequence[CertSpec], default: CertSpec | None, load: Callable[[CertSpec], V]
    ) -> HostTable[V]:
        """A table from specs; ``load`` runs once per distinct certificate (and may raise).

        When two specs name the same host, the first one listed wins.
        """
        loaded: dict[tuple[str, str, str | None], V] = {}

        def value(spec: CertSpec) -> V:
            key = (spec.cert_file, spec.key_file, spec.ocsp_response)
            if key not in loaded:
                loaded[key] = load(spec)
            return loaded[key]

        exact: dict[str, V] = {}
        wildcard: dict[str, V] = {}
        for spec in certs:
            loaded_value = value(spec)
            for host in spec.hosts:
                host = normalise_host(host)
                if host.startswith("*."):
                    wildcard.setdefault(host[2:], loaded_value)
                else:
                    exact.setdefault(host, loaded_value)
        return cls(exact, wildcard, value(default) if default is not None else None)


class TlsStore:
    """SNI-selected server contexts: one ssl.SSLContext per certificate, plus a default."""

    def __init__(
        self,
        certs: Sequence[CertSpec],
        default: CertSpec | None = None,
        alpn: Sequence[str] = ("h2", "http/1.1"),
    ) -> None:
        self.alpn = tuple(alpn)
        self._lock = threading.Lock()
        self._table = self._build(certs, default)
        self._front = _bare_server_context(self.alpn)
        self._front.sni_callback = self._on_server_name
        self._tickets: TicketKeyRing | None = None

    def server_context(self) -> ssl.SSLContext:
        """The context for ``loop.create_server(ssl=...)``; the same object across reloads."""
        return self._front

    def reload(self, certs: Sequence[CertSpec], default: CertSpec | None = None) -> None:
        """Rotate or add certificates: new handshakes use them, open connections are kept.

        Every file is loaded before anything is swapped, so a bad certificate or key raises
        (``ssl.SSLError`` / ``OSError``) and leaves the running table in force.
        """
        table = self._build(certs, default)
        with self._lock:
            self._table = table

    def set_ticket_keys(self, keys: Sequence[TicketKey]) -> bool:
        """Encrypt session tickets with ``keys[0]``, accept tickets from any of ``keys``.

        Call again to rotate. False (logged once) when the keys cannot be installed in this
        process; OpenSSL's own per-process key stays in use then.
        """
        if self._tickets is None:
            self._tickets = install_ticket_keys(self._front, keys)
        else:
            self._tickets.set_keys(keys)
        return self._tickets is not None

    def _build(
        self, certs: Sequence[CertSpec], default: CertSpec | None
    ) -> HostTable[ssl.SSLContext]:
        return HostTable.build(certs, default, self._context)

    def _context(self, spec: CertSpec) -> ssl.SSLContext:
        ctx = safe_server_context(spec.cert_file, spec.key_file, self.alpn)
        if spec.ocsp_response:
            install_ocsp_stapling(ctx, spec.ocsp_response)
        return ctx

    def _on_server_name(
        self, ssl_object: ssl.SSLObject, server_name: str | None, _front: ssl.SSLContext
    ) -> int | None:
        ctx = self._table.lookup(server_name)
        if ctx is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        ssl_object.context = ctx
        return None
