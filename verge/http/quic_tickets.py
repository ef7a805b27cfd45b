"""HTTP/3 session tickets shared by every worker of an edge node: SQLite, sealed with AES-GCM.

Why: a QUIC (TLS 1.3) session ticket lets a returning client skip the certificate and its
signature (a resumed handshake). With TCP, OpenSSL puts the whole session state inside the
ticket and the workers share only the ticket keys (:mod:`verge.http.tls_tickets`). aioquic
works the other way round: the ticket the client holds is a random label, and the session
itself (above all the resumption secret) stays on the server, handed to
``QuicServer(session_ticket_handler=...)`` and looked up again with
``session_ticket_fetcher``. SO_REUSEPORT sends a client's next connection to any worker, so
the sessions must be where every worker sees them: one SQLite file (WAL) in the node's cache
directory, ``control/quic_tickets.db``.

A resumption secret is as good as a private key for its session, so a row keeps it sealed:
AES-256-GCM under a key derived (HKDF) from the node's shared ticket keys, the ticket label
as associated data. The first key seals new rows, the others still open older ones; when a
key leaves the ring (rotation), its rows can no longer be opened and their clients get a
full handshake, never an error. Without keys a process seals with a random key of its own
(resumption then works only on the worker that issued the ticket).

Tickets are single-use by default: looking one up deletes it (and the resumed handshake
issues a fresh one). That is RFC 8446 §8.1's anti-replay for 0-RTT, which aioquic accepts,
across all workers. Rows expire at the ticket's ``not_valid_after`` but at most
``max_lifetime`` after issue (aioquic announces 24 h; the store forgets sooner so a busy node's
file stays small), and at most ``max_entries`` rows are kept. Every database or crypto
failure means "no ticket": a full handshake, logged once.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sqlite3
import time
from base64 import b64decode, b64encode
from collections.abc import Sequence
from pathlib import Path

from aioquic.tls import CipherSuite, SessionTicket
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from verge.http.tls_tickets import TicketKey

log = logging.getLogger("verge.tls")

NONCE_BYTES = 12
_HKDF_INFO = b"verge quic session ticket store v1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS quic_tickets (
    label BLOB PRIMARY KEY,
    key_name BLOB NOT NULL,
    nonce BLOB NOT NULL,
    sealed BLOB NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS quic_tickets_expires ON quic_tickets (expires);
"""


def _sealing_key(key: TicketKey) -> bytes:
    """An AES-256 key for this store only, derived from a node ticket key (never used raw)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=key.name, info=_HKDF_INFO)
    return hkdf.derive(key.hmac_key + key.aes_key)


def ticket_to_bytes(ticket: SessionTicket) -> bytes:
    """Everything of a ticket but its label, as JSON (what gets sealed)."""
    return json.dumps(
        {
            "age_add": ticket.age_add,
            "cipher_suite": int(ticket.cipher_suite),
            "not_valid_before": ticket.not_valid_before.timestamp(),
            "not_valid_after": ticket.not_valid_after.timestamp(),
            "resumption_secret": b64encode(ticket.resumption_secret).decode(),
            "server_name": ticket.server_name,
            "max_early_data_size": ticket.max_early_data_size,
            "other_extensions": [
                [kind, b64encode(data).decode()] for kind, data in ticket.other_extensions
            ],
        },
        separators=(",", ":"),
    ).encode()


def ticket_from_bytes(label: bytes, data: bytes) -> SessionTicket:
    """The inverse of :func:`ticket_to_bytes`, with the label put back."""
    fields = json.loads(data)

    def when(seconds: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(seconds, dt.UTC)

    return SessionTicket(
        age_add=fields["age_add"],
        cipher_suite=CipherSuite(fields["cipher_suite"]),
        not_valid_after=when(fields["not_valid_after"]),
        not_valid_before=when(fields["not_valid_before"]),
        resumption_secret=b64decode(fields["resumption_secret"]),
        server_name=fields["server_name"],
        ticket=label,
        max_early_data_size=fields["max_early_data_size"],
        other_extensions=[(kind, b64decode(data)) for kind, data in fields["other_extensions"]],
    )


class QuicTicketStore:
    """aioquic server session tickets in a SQLite file that all workers of a node share.

    Pass :meth:`add` as ``session_ticket_handler`` and :meth:`pop` as
    ``session_ticket_fetcher`` (``serve_h3(tickets=store)`` does). Call :meth:`set_keys`
    with the node's ticket keys (the encrypting key first) whenever they rotate.
    """

    PURGE_INTERVAL = 60.0  # seconds between sweeps of expired rows (done on add)
    OPEN_TIMEOUT = 5.0  # creating the schema may wait for other workers doing the same
    BUSY_TIMEOUT_MS = 50  # per operation afterwards: the event loop waits at most this long

    def __init__(
        self,
        path: str | Path,
        keys: Sequence[TicketKey] = (),
        *,
        single_use: bool = True,
        max_lifetime: float = 7200.0,
        max_entries: int = 200_000,
    ) -> None:
        self.path = Path(path)
        self.single_use = single_use
        self.max_lifetime = max_lifetime
        self.max_entries = max_entries
        self._db = self._open(self.path)
        self._last_purge = time.monotonic()
        self._warned = False
        own = TicketKey.generate()  # until node keys arrive: tickets resume on this worker only
        self._sealing: tuple[bytes, AESGCM] = (own.name, AESGCM(_sealing_key(own)))
        self._opening: dict[bytes, AESGCM] = dict([self._sealing])
        self.set_keys(keys)

    # ----- keys ----------------------------------------------------------------------------
    def set_keys(self, keys: Sequence[TicketKey]) -> None:
        """Seal with ``keys[0]``, open rows sealed with any of ``keys``; others are dropped.

        No keys: nothing changes (the keys in use stay).
        """
        if not keys:
            return
        opening = {key.name: AESGCM(_sealing_key(key)) for key in keys}
        self._opening = opening
        self._sealing = (keys[0].name, opening[keys[0].name])

    # ----- the two aioquic callbacks -------------------------------------------------------
    def add(self, ticket: SessionTicket) -> None:
        """Keep a ticket the server just issued (aioquic's ``session_ticket_handler``)."""
        name, aead = self._sealing
        nonce = os.urandom(NONCE_BYTES)
        sealed = aead.encrypt(nonce, ticket_to_bytes(ticket), self._associated(ticket.ticket, name))
        expires = min(ticket.not_valid_after.timestamp(), time.time() + self.max_lifetime)
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO quic_tickets VALUES (?, ?, ?, ?, ?)",
                (ticket.ticket, name, nonce, sealed, expires),
            )
            self._purge_now_and_then()
        except sqlite3.Error as exc:
            self._warn(exc)

    def pop(self, label: bytes) -> SessionTicket | None:
        """The session for a presented ticket label, or None: do a full handshake.

        aioquic's ``session_ticket_fetcher``. Single-use stores delete the row as they read
        it, so a label resumes once, on whichever worker sees it first.
        """
        try:
            row = self._db.execute(self._lookup_sql, (label,)).fetchone()
        except sqlite3.Error as exc:
            self._warn(exc)
            return None
        if row is None:
            return None
        key_name, nonce, sealed, expires = row
        aead = self._opening.get(key_name)
        if aead is None or expires < time.time():
            return None  # its key rotated out, or it expired: a full handshake
        try:
            plain = aead.decrypt(nonce, sealed, self._associated(label, key_name))
            return ticket_from_bytes(label, plain)
        except (InvalidTag, ValueError, KeyError, TypeError) as exc:
            self._warn(exc)
            return None

    # ----- housekeeping --------------------------------------------------------------------
    def purge(self) -> int:
        """Delete expired rows, then the oldest ones beyond ``max_entries``; how many went."""
        self._last_purge = time.monotonic()
        removed = self._db.execute(
            "DELETE FROM quic_tickets WHERE expires < ?", (time.time(),)
        ).rowcount
        (count,) = self._db.execute("SELECT count(*) FROM quic_tickets").fetchone()
        if count > self.max_entries:
            removed += self._db.execute(
                "DELETE FROM quic_tickets WHERE label IN "
                "(SELECT label FROM quic_tickets ORDER BY expires LIMIT ?)",
                (count - self.max_entries,),
            ).rowcount
        return removed

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM quic_tickets").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    # ----- internals -----------------------------------------------------------------------
    @property
    def _lookup_sql(self) -> str:
        columns = "key_name, nonce, sealed, expires"
        if self.single_use:
            return f"DELETE FROM quic_tickets WHERE label = ? RETURNING {columns}"
        return f"SELECT {columns} FROM quic_tickets WHERE label = ?"

    @staticmethod
    def _associated(label: bytes, key_name: bytes) -> bytes:
        return key_name + label

    def _purge_now_and_then(self) -> None:
        if time.monotonic() - self._last_purge >= self.PURGE_INTERVAL:
            self.purge()

    def _open(self, path: Path) -> sqlite3.Connection:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        db = sqlite3.connect(path, isolation_level=None, timeout=self.OPEN_TIMEOUT)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA busy_timeout = {self.BUSY_TIMEOUT_MS}")
        return db

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("HTTP/3 session ticket store %s: %s; full handshakes", self.path, exc)
