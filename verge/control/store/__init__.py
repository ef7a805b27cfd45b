"""The control-plane store: every read and change the API makes, on SQLite or PostgreSQL.

``Store(url)`` owns the engine. SQLite (the default, one file, WAL) suits a single control
plane; PostgreSQL lets several replicas share one database. Each domain operation is one
transaction that also writes its audit entry, so a change and its record commit together or
not at all. Writes on SQLite start with ``BEGIN IMMEDIATE`` (one writer at a time, waiting
instead of failing with "database is locked" halfway through); on PostgreSQL the rows that
must not change underneath (a service being edited, the counters) are locked ``FOR UPDATE``.

Operations take the calling :class:`~verge.control.auth.Principal` and apply tenant scoping
themselves: a tenant token never sees, changes or purges another tenant's service, and what
it cannot see answers "not found", exactly like what does not exist. Role gates (who may call
an endpoint at all) are the API's job. Results are plain JSON-ready dicts in the API's shapes.

After a commit that changes the config bundle or queues a purge the store calls its
subscribers (``subscribe``) with "config" or "purges", from whatever thread committed; the API
uses that to wake long-polling nodes at once. On PostgreSQL the same transaction also
NOTIFYs the other replicas (verge.control.notify): once ``listen()`` runs, their commits reach
this store's subscribers too, and their revocations clear its login cache.

How the package is cut: ``base`` holds the engine, the errors and the unit of work
(:class:`~verge.control.store.base.StoreBase`: ``reading()``, ``writing()``, ``audit()``,
``bump()``, ``emit()``, ...); each aggregate is one module and one class on top of it:

=================  =============================================  ===========================
module             what                                           builds on
=================  =============================================  ===========================
``names``          zones and host claims, the hostnames report    base
``tenants``        tenants and their zones                        names
``tokens``         API tokens, logins                             tenants
``services``       services and origins                           tenants
``certificates``   TLS certificates, the bundle's ``tls``         tenants
``bundle``         the config version and bundle                  certificates
``nodes``          the node registry                              base
``purges``         purges and acknowledgements                    bundle, services, nodes
``stats``          traffic stats                                  base
=================  =============================================  ===========================

(Functions and the edge KV, verge.control.functions, and protection events,
verge.control.protection, wrap a ``Store`` the same way from outside the package.)

``Store`` is the aggregates composed as mixins rather than a facade holding one object per
aggregate: the API and the tests call ``store.create_service(...)`` on one object, and a
facade would repeat every one of the ~75 signatures as a forwarding method. Mixins keep each
signature in one place, and an aggregate that needs another (a purge checks the service it
names) says so by building on it: its class's bases are its dependencies, read at a glance
and checked by the import order (no cycles). Every aggregate uses only the public API of the
base and of the aggregates it builds on; its private names are its own.
"""

from __future__ import annotations

from verge.control.store.base import (
    AUTH_CACHE_SECONDS,
    DEFAULT_TENANT,
    MIGRATIONS,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    PreconditionFailed,
    StoreBase,
    StoreError,
    Unavailable,
    Unprocessable,
    field_path,
    iso,
    keep_newest,
    make_engine,
    normalize_url,
    page_of,
    pydantic_error,
    scoped,
    validation_error,
)
from verge.control.store.bundle import ConfigBundle, bundle_digest
from verge.control.store.certificates import Certificates
from verge.control.store.names import NameClaims
from verge.control.store.nodes import Nodes
from verge.control.store.purges import PURGE_BATCH, PURGE_TIMEOUT, Purges
from verge.control.store.services import Services
from verge.control.store.stats import STATS_BUCKET, Stats
from verge.control.store.tenants import Tenants
from verge.control.store.tokens import Tokens


class Store(
    Purges,
    ConfigBundle,
    Certificates,
    Services,
    Tokens,
    Tenants,
    NameClaims,
    Nodes,
    Stats,
    StoreBase,
):
    """All control-plane state behind one object; thread-safe (one session per call)."""

    def __init__(
        self, url: str, *, heartbeat_interval: float = 2.0, purge_timeout: float = PURGE_TIMEOUT
    ) -> None:
        super().__init__(url, heartbeat_interval=heartbeat_interval, purge_timeout=purge_timeout)


__all__ = [
    "AUTH_CACHE_SECONDS",
    "DEFAULT_TENANT",
    "MIGRATIONS",
    "PURGE_BATCH",
    "PURGE_TIMEOUT",
    "STATS_BUCKET",
    "Conflict",
    "Forbidden",
    "Invalid",
    "NotFound",
    "PreconditionFailed",
    "Store",
    "StoreBase",
    "StoreError",
    "Unavailable",
    "Unprocessable",
    "bundle_digest",
    "field_path",
    "iso",
    "keep_newest",
    "make_engine",
    "normalize_url",
    "page_of",
    "pydantic_error",
    "scoped",
    "validation_error",
]
