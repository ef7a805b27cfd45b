"""API tokens and who may do what.

A token is ``vrg_<id>_<secret>``: the id finds the row, the secret proves possession. Only
sha256(secret) is stored, so a copy of the database (or a backup) hands out no credentials,
and secrets are compared in constant time. Operator tokens live in the ``tokens`` table; node
credentials (issued by ``POST /nodes/join``) in ``nodes``, told apart by their id: node ids
start with ``n``, generated token ids never do (an ``n...`` id that is no node's is still
looked up among the tokens, for operator-chosen tokens). An operator may also pass any string of their own as
``--admin-token``; its id is then derived from the string itself (``x`` + sha256 prefix).

Roles, widest first: ``admin`` (everything, every tenant), ``tenant_admin`` (its tenant's
services, purges and tokens), ``read_only`` (GET in its tenant, or everywhere when it has no
tenant), ``join`` (only ``POST /nodes/join``) and ``node`` (only ``/nodes/self/*``).
This module is pure: the store looks tokens up, the API asks :class:`Principal` for rights.

Logins are remembered for a second (:class:`LoginCache`): every edge request carries a
credential, and a database read per request was a good part of a global purge's cost. A
revocation anywhere must end that at once: the store clears the cache on every revocation or
re-join, its own and, on PostgreSQL, every other replica's (heard through LISTEN/NOTIFY,
verge.control.notify). A lookup that started before a clear never refills the cache.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Literal, get_args

Role = Literal["admin", "tenant_admin", "read_only", "join", "node"]
ROLES: tuple[str, ...] = get_args(Role)
TOKEN_ROLES: tuple[str, ...] = ("admin", "tenant_admin", "read_only", "join")
"""Roles an operator can create with POST /tokens (node credentials come from joining)."""

PREFIX = "vrg_"
NODE_ID_PREFIX = "n"
_ID_BYTES = 6
_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A freshly made token: ``text`` is shown once; ``id`` and ``digest`` are stored."""

    id: str
    text: str
    digest: str


def digest(secret: str) -> str:
    """The stored form of a secret: sha256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(secret), stored_digest)


def issue(node: bool = False) -> IssuedToken:
    """A new random token (a node credential when ``node``)."""
    token_id = secrets.token_hex(_ID_BYTES)
    if node:
        token_id = NODE_ID_PREFIX + token_id
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    return IssuedToken(token_id, f"{PREFIX}{token_id}_{secret}", digest(secret))


def parse(text: str) -> tuple[str, str]:
    """(id, secret) of a presented token.

    ``vrg_<id>_<secret>`` splits at the first ``_`` after the prefix (ids have none; secrets
    may). Anything else is an operator-chosen token whose id is derived from its text.
    """
    if text.startswith(PREFIX):
        token_id, sep, secret = text[len(PREFIX) :].partition("_")
        if sep and token_id.isalnum() and secret:
            return token_id, secret
    return "x" + hashlib.sha256(text.encode()).hexdigest()[:16], text


def from_text(text: str) -> IssuedToken:
    """The stored form of a token the operator chose (``--admin-token``)."""
    token_id, secret = parse(text)
    return IssuedToken(token_id, text, digest(secret))


def is_node_id(token_id: str) -> bool:
    return token_id.startswith(NODE_ID_PREFIX)


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an operator token or a node credential, with its role and tenant."""

    id: str
    name: str
    role: Role
    tenant_id: int | None = None
    tenant: str | None = None
    node_id: int | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        kind = "node" if self.role == "node" else "token"
        return f"{kind}:{self.name}#{self.id}"

    @property
    def is_operator(self) -> bool:
        """Admin, tenant admin or read-only: may use the operator API at all."""
        return self.role in ("admin", "tenant_admin", "read_only")

    @property
    def can_write(self) -> bool:
        return self.role in ("admin", "tenant_admin")

    @property
    def sees_all(self) -> bool:
        """Not limited to one tenant: admins and tenant-less read-only tokens."""
        return self.is_operator and self.tenant_id is None

    def can_see_tenant(self, tenant_id: int | None) -> bool:
        return self.is_operator and (self.tenant_id is None or self.tenant_id == tenant_id)


LOGIN_CACHE_SECONDS = 1.0
"""How long a successful login is remembered, unless a revocation clears it first."""


class LoginCache:
    """Token text -> Principal for ``ttl`` seconds, cleared by any revocation (thread-safe).

    ``generation()`` is taken before the database lookup and handed to ``put``: when a
    revocation cleared the cache in between, the (possibly stale) answer is not kept.
    """

    def __init__(self, ttl: float = LOGIN_CACHE_SECONDS, max_entries: int = 10_000) -> None:
        self.ttl, self.max_entries = ttl, max_entries
        self._entries: dict[str, tuple[Principal, float]] = {}
        self._generation = 0
        self._lock = threading.Lock()

    def get(self, text: str) -> Principal | None:
        entry = self._entries.get(text)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    def generation(self) -> int:
        return self._generation

    def put(self, text: str, principal: Principal, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[text] = (principal, time.monotonic() + self.ttl)

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()
