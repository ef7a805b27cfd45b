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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from pydantic import ValidationError
from sqlalchemy import Engine, Select, create_engine, delete, event, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from verge import config as vconfig
from verge.cache import keys
from verge.control import auth
from verge.control.auth import Principal
from verge.control.certificates import (
    CertificateError,
    KeySealer,
    SecretUnavailable,
    expiry_warning,
    parse_certificate,
    sealer_for,
    sni_assignment,
    tenant_certificate_names,
)
from verge.control.hostnames import (
    Claim,
    HostIndex,
    Zone,
    ZoneError,
    covers,
    hostname_report,
    normalize_zone,
    san_touches_zones,
    wildcard_clashes,
    zone_for_host,
    zone_owner,
    zones_overlap,
)
from verge.control.models import (
    CONFIG_VERSION,
    KV_SEQ,
    PURGE_SEQ,
    STAT_COUNTERS,
    AuditEntry,
    Counter,
    FunctionVersion,
    Node,
    PurgeAck,
    PurgeJob,
    Service,
    ServiceHost,
    StatsBatch,
    StatsSample,
    Tenant,
    TenantZone,
    TlsCertificate,
    Token,
    utcnow,
)
from verge.control.notify import (
    EVERYTHING,
    ChangeListener,
    announce,
    libpq_dsn,
    new_replica_id,
)

log = logging.getLogger("verge.control.store")

AUTH_CACHE_SECONDS = auth.LOGIN_CACHE_SECONDS

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DEFAULT_TENANT = "default"
"""Where an admin's service goes when the request names no tenant (made by the first migration)."""
STATS_BUCKET = 10
"""Seconds per stored stats bucket."""
PURGE_BATCH = 500
"""Most purges handed to a node in one answer."""
PURGE_TIMEOUT = 60.0
"""Seconds after which a purge counts as done although some nodes have not acknowledged it
(they are still listed as pending, and apply it when they come back)."""
_MIGRATION_LOCK = 0x76657267  # "verg": pg_advisory_xact_lock key while migrating
_NAMES_LOCK = 0x766E616D  # "vnam": held while hosts or zones are claimed (PostgreSQL)
_BOOTSTRAP_LOCK = 0x7661646D  # "vadm": held while the first admin token is made (PostgreSQL)
_TOPIC_OF_COUNTER = {CONFIG_VERSION: "config", PURGE_SEQ: "purges", KV_SEQ: "kv"}
"""Which subscribers a counter's bump wakes (here and, through NOTIFY, on other replicas)."""
_WATCHED_TOPICS = ("config", "purges", "acks", "kv")


# ---------------------------------------------------------------------------------------------
# Errors: each carries the HTTP status the API answers with, and the field it is about
# ---------------------------------------------------------------------------------------------


class StoreError(Exception):
    status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class Invalid(StoreError):
    status = 400


class Forbidden(StoreError):
    status = 403


class NotFound(StoreError):
    status = 404


class Conflict(StoreError):
    status = 409


class PreconditionFailed(StoreError):
    status = 412


class Unprocessable(StoreError):
    status = 422


class Unavailable(StoreError):
    status = 503


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def normalize_url(url: str) -> str:
    """A SQLAlchemy URL: postgresql:// means psycopg 3; a bare path means a SQLite file."""
    if "://" not in url:
        return f"sqlite:///{url}"
    scheme, rest = url.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    return url


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def field_path(loc: Iterable[str | int]) -> str | None:
    """A pydantic error location as the config errors spell it: ``origins[0].url``."""
    return vconfig.format_path(tuple(loc)) or None


def pydantic_error(error: Mapping[str, Any], loc: Sequence[str | int]) -> Invalid:
    """One pydantic error dict as Invalid naming the field at ``loc``."""
    if error["type"] == "missing":
        message = "required but missing"
    elif error["type"] == "extra_forbidden":
        message = "unknown field"
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
    return Invalid(message, field_path(loc))


def validation_error(exc: ValidationError, prefix: Sequence[str | int] = ()) -> Invalid:
    """The first error of a ValidationError, with config conflicts pointing at their field."""
    error = exc.errors()[0]
    return pydantic_error(error, (*prefix, *error["loc"], *(error.get("ctx") or {}).get("at", ())))


def scoped(query: Select, principal: Principal, tenant_column: Any) -> Select:
    """`query` limited to the caller's tenant unless the caller sees every tenant."""
    return query if principal.sees_all else query.where(tenant_column == principal.tenant_id)


def _page(items: list[dict], total: int, limit: int, offset: int) -> dict:
    return {"items": items, "total": total, "limit": limit, "offset": offset}


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


def _sqlite_engine(url: str) -> Engine:
    database = url.split(":///", 1)[1] if ":///" in url else ""
    if database in ("", ":memory:"):
        raise ValueError("an in-memory SQLite store is not supported; give a file: sqlite:///PATH")
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            "foreign_keys=ON",
            "synchronous=NORMAL",
            "busy_timeout=30000",
        ):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        writing = connection.get_execution_options().get("verge_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writing else "BEGIN")

    return engine


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class Store:
    """All control-plane state behind one object; thread-safe (one session per call)."""

    def __init__(
        self, url: str, *, heartbeat_interval: float = 2.0, purge_timeout: float = PURGE_TIMEOUT
    ) -> None:
        self.url = normalize_url(url)
        self.purge_timeout = purge_timeout
        """Seconds until a purge is done even with nodes pending (see PURGE_TIMEOUT)."""
        self.engine = make_engine(self.url)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self.down_after = 3 * heartbeat_interval
        """Seconds without a heartbeat after which a node counts as down."""
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(
            self.engine.execution_options(verge_write=True), expire_on_commit=False
        )
        # The bundle is read in one snapshot: its version and its content always match.
        self._snapshot_reader = (
            sessionmaker(
                self.engine.execution_options(isolation_level="REPEATABLE READ"),
                expire_on_commit=False,
            )
            if self.is_postgres
            else self._reader
        )
        self._listeners: list[Callable[[str], None]] = []
        self._cache_lock = threading.Lock()
        self._sqlite_write_lock = threading.Lock()
        self._logins = auth.LoginCache()
        self._config_cache: tuple[int, vconfig.Config, dict] | None = None
        self._sealer: KeySealer | None = None
        self.replica_id = new_replica_id()
        """Tells this process's change notifications from other replicas' (PostgreSQL)."""
        self._change_listener: ChangeListener | None = None

    def close(self) -> None:
        if self._change_listener is not None:
            self._change_listener.stop()
        self.engine.dispose()

    # -- schema, sessions, notifications ----------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest revision (safe when several replicas start at once)."""
        config = AlembicConfig()
        config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
        with self.engine.execution_options(verge_write=True).begin() as connection:
            if self.is_postgres:
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def listen(self) -> bool:
        """Hear other replicas' changes (PostgreSQL LISTEN); False on SQLite (one process).

        Returns at once; ``hears_others`` says whether the connection is up right now.
        """
        if not self.is_postgres:
            return False
        if self._change_listener is None:
            self._change_listener = ChangeListener(
                libpq_dsn(self.engine.url), self.replica_id, self._heard
            )
            self._change_listener.start()
        return True

    def wait_listening(self, timeout: float) -> bool:
        """Wait until other replicas' changes are heard (False: not within ``timeout``)."""
        listener = self._change_listener
        return listener is not None and listener.wait_live(timeout)

    @property
    def hears_others(self) -> bool:
        """Whether another replica's change reaches this store's subscribers at once."""
        return self._change_listener is not None and self._change_listener.live

    def _heard(self, topic: str) -> None:
        """Another replica committed ``topic`` (or, EVERYTHING, the listener reconnected)."""
        if topic in ("auth", EVERYTHING):
            self._logins.clear()
        for watched in _WATCHED_TOPICS:
            if topic in (watched, EVERYTHING):
                self._emit(watched)

    def _announce(self, session: Session, topic: str) -> None:
        """Tell the other replicas about ``topic`` when this transaction commits."""
        if self.is_postgres:
            announce(session, topic, self.replica_id)

    def _logins_revoked(self, session: Session) -> None:
        """A credential stopped (or changed): forget cached logins here and everywhere."""
        self._logins.clear()
        self._announce(session, "auth")

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call ``listener("config" | "purges" | "acks" | "kv")`` after such a commit (any thread)."""
        self._listeners.append(listener)

    def _emit(self, topic: str) -> None:
        for listener in self._listeners:
            try:
                listener(topic)
            except Exception:  # the change is committed; a broken listener must not undo that
                log.exception("store listener failed for %r", topic)

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with self._reader() as session, session.begin():
            yield session

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        """One write transaction; a unique-key race with another writer becomes a 409.

        On SQLite, this process's writers queue on a lock instead of colliding in SQLite,
        whose busy handler sleeps 10-100 ms between retries (that alone tripled purge latency).
        """
        lock = self._sqlite_write_lock if not self.is_postgres else contextlib.nullcontext()
        try:
            with lock, self._writer() as session, session.begin():
                yield session
        except IntegrityError as exc:
            reason = str(exc.orig).splitlines()[0] if exc.orig else str(exc)
            raise Conflict(f"conflicts with a concurrent change ({reason}); try again") from exc

    def _bump(self, session: Session, name: str) -> int:
        """Increment a counter; the row stays locked until commit (numbers in commit order).

        Other replicas hear of it when the transaction commits (config, purges, kv).
        """
        topic = _TOPIC_OF_COUNTER.get(name)
        if topic is not None:
            self._announce(session, topic)
        return session.execute(
            update(Counter)
            .where(Counter.name == name)
            .values(value=Counter.value + 1)
            .returning(Counter.value)
        ).scalar_one()

    def _counter(self, session: Session, name: str) -> int:
        return session.execute(select(Counter.value).where(Counter.name == name)).scalar_one()

    def _audit(
        self,
        session: Session,
        actor: Principal | str,
        action: str,
        obj: str,
        tenant_id: int | None,
        detail: dict | None = None,
    ) -> None:
        name = actor.actor if isinstance(actor, Principal) else actor
        session.add(
            AuditEntry(
                at=utcnow(),
                actor=name,
                action=action,
                object=obj,
                tenant_id=tenant_id,
                detail=detail or {},
            )
        )

    def _paged(
        self, session: Session, query: Select, limit: int, offset: int, view: Callable[[Any], dict]
    ) -> dict:
        total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
        rows = session.scalars(query.limit(limit).offset(offset)).all()
        return _page([view(row) for row in rows], total or 0, limit, offset)

    def _list_scoped(self, principal: Principal, query: Select, tenant_column: Any, limit: int,
                     offset: int, view: Callable[[Any], dict]) -> dict:
        """One page of `query`, limited to the caller's tenant unless it sees all tenants."""
        with self._reading() as session:
            return self._paged(session, scoped(query, principal, tenant_column), limit, offset,
                               view)

    def _visible_named(self, session: Session, principal: Principal, model: Any, name: str,
                       what: str, lock: bool = False) -> Any:
        """The row of `model` called `name` if the caller's tenant may see it, else NotFound
        (not 403: another tenant's names do not leak)."""
        query = select(model).where(model.name == name)
        if lock:
            query = query.with_for_update(of=model)
        row = session.scalar(query)
        if row is None or not principal.can_see_tenant(row.tenant_id):
            raise NotFound(f"no {what} named {name!r}")
        return row

    # -- tokens and authentication ------------------------------------------------------------

    def authenticate(self, text: str) -> Principal | None:
        """The caller behind a bearer token, or None (unknown, wrong secret, revoked).

        Valid answers are remembered for AUTH_CACHE_SECONDS (auth.LoginCache), forgotten at
        once on any revocation or re-join: this process's, and another replica's as soon as
        its notification arrives. A PostgreSQL store that listens but has lost its LISTEN
        connection caches nothing (it would not hear of revocations).
        """
        cached = self._logins.get(text)
        if cached is not None:
            return cached
        generation = self._logins.generation()
        principal = self._authenticate(text)
        if principal is not None and self._may_cache_logins():
            self._logins.put(text, principal, generation)
        return principal

    def _may_cache_logins(self) -> bool:
        return self._change_listener is None or self._change_listener.live

    def _authenticate(self, text: str) -> Principal | None:
        token_id, secret = auth.parse(text)
        with self._reading() as session:
            node = None
            if auth.is_node_id(token_id):
                node = session.scalar(select(Node).where(Node.credential_id == token_id))
            if node is not None:
                if node.revoked or not auth.matches(secret, node.credential_sha256):
                    return None
                return Principal(token_id, node.name, "node", node_id=node.id)
            token = session.get(Token, token_id)
            if token is None or token.revoked_at is not None:
                return None
            if not auth.matches(secret, token.secret_sha256):
                return None
            tenant = token.tenant.name if token.tenant else None
            return Principal(token.id, token.name, token.role, token.tenant_id, tenant)  # type: ignore[arg-type]

    def ensure_admin_token(self, given: str | None = None) -> str | None:
        """Make sure an admin can log in; returns the token text only when one was generated.

        ``given`` (``--admin-token``) is added as an admin token unless it exists already.
        Without it, a random admin token is made when the store has no active admin token.
        Replicas starting together on one PostgreSQL database take turns (an advisory lock),
        so the given token is added once and at most one random admin token is ever made.
        A unique-key clash anyway (a replica of an older version) is retried once.
        """
        try:
            return self._ensure_admin_token(given)
        except Conflict as exc:
            if "concurrent change" not in exc.message:
                raise
            return self._ensure_admin_token(given)

    def _ensure_admin_token(self, given: str | None) -> str | None:
        with self._writing() as session:
            if self.is_postgres:
                session.execute(text(f"SELECT pg_advisory_xact_lock({_BOOTSTRAP_LOCK})"))
            if given:
                issued = auth.from_text(given)
                existing = session.get(Token, issued.id)
                if existing is None:
                    self._add_token(session, "bootstrap", issued, "admin", "admin", None)
                elif existing.role != "admin" or existing.secret_sha256 != issued.digest:
                    raise Conflict("the given admin token collides with another token")
                elif existing.revoked_at is not None:
                    raise Conflict("the given admin token has been revoked; choose another")
                return None
            active = session.scalar(
                select(func.count())
                .select_from(Token)
                .where(Token.role == "admin", Token.revoked_at.is_(None))
            )
            if active:
                return None
            issued = auth.issue()
            self._add_token(session, "bootstrap", issued, "admin", "admin", None)
            return issued.text

    def _add_token(
        self,
        session: Session,
        actor: Principal | str,
        issued: auth.IssuedToken,
        name: str,
        role: str,
        tenant: Tenant | None,
    ) -> Token:
        created_by = actor.actor if isinstance(actor, Principal) else actor
        token = Token(
            id=issued.id,
            name=name,
            role=role,
            tenant_id=tenant.id if tenant else None,
            secret_sha256=issued.digest,
            created_by=created_by,
            created_at=utcnow(),
        )
        token.tenant = tenant
        session.add(token)
        self._audit(
            session,
            actor,
            "token.create",
            f"token:{issued.id}",
            tenant.id if tenant else None,
            {"name": name, "role": role},
        )
        return token

    def create_token(
        self, principal: Principal, role: str, name: str | None = None, tenant: str | None = None
    ) -> dict:
        if role not in auth.TOKEN_ROLES:
            raise Invalid(
                f"role must be one of {', '.join(auth.TOKEN_ROLES)} (node credentials "
                "come from POST /nodes/join)",
                "role",
            )
        with self._writing() as session:
            tenant_row = self._token_tenant(session, principal, role, tenant)
            issued = auth.issue()
            token = self._add_token(session, principal, issued, name or role, role, tenant_row)
            return {**_token_view(token), "token": issued.text}

    def _token_tenant(
        self, session: Session, principal: Principal, role: str, tenant: str | None
    ) -> Tenant | None:
        """Which tenant a new token belongs to, and whether the caller may make it."""
        if principal.role != "admin":
            if role not in ("tenant_admin", "read_only"):
                raise Forbidden(f"a tenant admin cannot create {role} tokens", "role")
            if tenant not in (None, principal.tenant):
                raise Forbidden("a tenant admin can only create tokens of its tenant", "tenant")
            return session.get(Tenant, principal.tenant_id)
        if role in ("admin", "join"):
            if tenant is not None:
                raise Invalid(f"{role} tokens belong to no tenant", "tenant")
            return None
        if tenant is None:
            if role == "tenant_admin":
                raise Invalid("a tenant_admin token needs a tenant", "tenant")
            return None
        return self._tenant_named(session, tenant)

    def list_tokens(self, principal: Principal, limit: int = 50, offset: int = 0) -> dict:
        query = select(Token).order_by(Token.created_at, Token.id)
        return self._list_scoped(principal, query, Token.tenant_id, limit, offset, _token_view)

    def revoke_token(self, principal: Principal, token_id: str) -> None:
        with self._writing() as session:
            token = session.get(Token, token_id)
            if token is None or not principal.can_see_tenant(token.tenant_id):
                raise NotFound(f"no token with id {token_id!r}")
            if token.revoked_at is not None:
                return
            if token.role == "admin":
                others = session.scalar(
                    select(func.count())
                    .select_from(Token)
                    .where(Token.role == "admin", Token.revoked_at.is_(None), Token.id != token_id)
                )
                if not others:
                    raise Conflict("this is the last admin token; create another one first")
            token.revoked_at = utcnow()
            self._logins_revoked(session)
            self._audit(
                session,
                principal,
                "token.revoke",
                f"token:{token_id}",
                token.tenant_id,
                {"name": token.name, "role": token.role},
            )
        self._logins.clear()  # again: a login looked up meanwhile saw the token unrevoked

    # -- tenants -------------------------------------------------------------------------------

    def create_tenant(self, principal: Principal, name: str, zones: Sequence[str] = ()) -> dict:
        """A new tenant, with the zones (DNS names) its services may claim hosts in."""
        wanted = _normalized_zones(zones)
        with self._writing() as session:
            if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
                raise Conflict(f"a tenant named {name!r} already exists", "name")
            tenant = Tenant(name=name, created_at=utcnow())
            session.add(tenant)
            session.flush()
            self._lock_names(session)
            self._insert_zones(session, tenant, wanted)
            self._audit(
                session, principal, "tenant.create", f"tenant:{name}", tenant.id, {"zones": wanted}
            )
            return _tenant_view(tenant, wanted)

    def list_tenants(self, principal: Principal, limit: int = 50, offset: int = 0) -> dict:
        query = scoped(select(Tenant).order_by(Tenant.name), principal, Tenant.id)
        with self._reading() as session:
            page = self._paged(session, query, limit, offset, lambda tenant: tenant)
            zones = self._zones_by_tenant(session, [tenant.id for tenant in page["items"]])
        page["items"] = [_tenant_view(t, zones.get(t.id, [])) for t in page["items"]]
        return page

    def get_tenant(self, principal: Principal, name: str) -> dict:
        """A tenant and its zones (admins, or the tenant's own tokens)."""
        with self._reading() as session:
            tenant = self._visible_tenant(session, principal, name)
            return _tenant_view(tenant, self._zones_of(session, tenant.id))

    def add_zones(self, principal: Principal, name: str, zones: Sequence[str]) -> dict:
        """Delegate more zones to a tenant (admins). A zone inside or around another tenant's
        zone is refused (409 naming that tenant); one the tenant has already is kept.

        The answer's ``conflicts`` names other tenants' service hosts inside the new zones:
        they keep working until an admin moves or deletes them (see hostnames()).
        """
        wanted = _normalized_zones(zones)
        if not wanted:
            raise Invalid("give at least one zone", "zones")
        with self._writing() as session:
            tenant = self._visible_tenant(session, principal, name)
            self._lock_names(session)
            added = self._insert_zones(session, tenant, wanted)
            self._audit(
                session, principal, "tenant.zone.add", f"tenant:{name}", tenant.id,
                {"zones": added},
            )
            current = self._zones_of(session, tenant.id)
            foreign = [
                f"{c.host} (service {c.service}, tenant {c.tenant}) is inside zone "
                f"{zone_for_host(c.host, added)}"
                for c in self._claims(session)
                if c.tenant_id != tenant.id and zone_for_host(c.host, added) is not None
            ]
            return {**_tenant_view(tenant, current), "conflicts": foreign}

    def remove_zone(self, principal: Principal, name: str, zone: str) -> dict:
        """Take a zone back (admins). The tenant's services keep the hosts they have there
        (listed under ``conflicts`` as outside its zones); it cannot claim new ones."""
        try:
            zone = normalize_zone(zone)
        except ZoneError as exc:
            raise NotFound(str(exc), "zone") from None
        with self._writing() as session:
            tenant = self._visible_tenant(session, principal, name)
            row = session.get(TenantZone, zone)
            if row is None or row.tenant_id != tenant.id:
                raise NotFound(f"tenant {name!r} has no zone {zone!r}", "zone")
            session.delete(row)
            session.flush()
            self._audit(
                session, principal, "tenant.zone.remove", f"tenant:{name}", tenant.id,
                {"zones": [zone]},
            )
            current = self._zones_of(session, tenant.id)
            stranded = [
                f"{c.host} (service {c.service}) is outside every zone of tenant {name}"
                for c in self._claims(session)
                if c.tenant_id == tenant.id and c.host != "*"
                and zone_for_host(c.host, current) is None and zone_for_host(c.host, [zone])
            ]
            return {**_tenant_view(tenant, current), "conflicts": stranded}

    def _visible_tenant(self, session: Session, principal: Principal, name: str) -> Tenant:
        tenant = session.scalar(select(Tenant).where(Tenant.name == name))
        if tenant is None or not principal.can_see_tenant(tenant.id):
            raise NotFound(f"no tenant named {name!r}")
        return tenant

    def _insert_zones(self, session: Session, tenant: Tenant, zones: list[str]) -> list[str]:
        """Add ``zones`` to ``tenant`` (those it has are skipped); the ones added.

        Call with the names lock held: the overlap check must see every committed zone.
        """
        existing = session.execute(
            select(TenantZone.zone, TenantZone.tenant_id, Tenant.name).join(
                Tenant, Tenant.id == TenantZone.tenant_id
            )
        ).all()
        added = []
        for index, zone in enumerate(zones):
            for other, owner_id, owner in existing:
                if owner_id != tenant.id and zones_overlap(zone, other):
                    relation = "is" if zone == other else "overlaps"
                    raise Conflict(
                        f"zone {zone!r} {relation} zone {other!r} of tenant {owner!r}; zones of "
                        "two tenants cannot nest",
                        f"zones[{index}]",
                    )
            if any(other == zone for other, _id, _name in existing):
                continue
            session.add(TenantZone(zone=zone, tenant_id=tenant.id, created_at=utcnow()))
            existing.append((zone, tenant.id, tenant.name))  # type: ignore[arg-type]
            added.append(zone)
        session.flush()
        return added

    def _zones_of(self, session: Session, tenant_id: int) -> list[str]:
        return list(
            session.scalars(
                select(TenantZone.zone)
                .where(TenantZone.tenant_id == tenant_id)
                .order_by(TenantZone.zone)
            ).all()
        )

    def _zones_by_tenant(self, session: Session, tenant_ids: list[int]) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        rows = session.execute(
            select(TenantZone.tenant_id, TenantZone.zone)
            .where(TenantZone.tenant_id.in_(tenant_ids))
            .order_by(TenantZone.zone)
        ).all()
        for tenant_id, zone in rows:
            found.setdefault(tenant_id, []).append(zone)
        return found

    def _all_zones(self, session: Session) -> list[Zone]:
        rows = session.execute(
            select(TenantZone.zone, TenantZone.tenant_id, Tenant.name).join(
                Tenant, Tenant.id == TenantZone.tenant_id
            )
        ).all()
        return [Zone(zone, tenant_id, tenant) for zone, tenant_id, tenant in rows]

    def _claims(self, session: Session) -> list[Claim]:
        """Every service host with its service and tenant."""
        rows = session.execute(
            select(ServiceHost.host, Service.name, Service.tenant_id, Tenant.name)
            .join(Service, ServiceHost.service_id == Service.id)
            .join(Tenant, Tenant.id == Service.tenant_id)
        ).all()
        return [Claim(host, service, tenant_id, tenant) for host, service, tenant_id, tenant in rows]

    def _lock_names(self, session: Session) -> None:
        """Serialise claims of hosts and zones across PostgreSQL replicas (SQLite writers are
        serialised already): the overlap checks read all claims, which no unique key covers."""
        if self.is_postgres:
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _NAMES_LOCK})

    # -- hostnames ------------------------------------------------------------------------------

    def hostnames(
        self, principal: Principal, limit: int = 50, offset: int = 0, conflicts_only: bool = False
    ) -> dict:
        """Every service host -> tenant, service, zone, the wildcards covering it, conflicts.

        Admins (and tenant-less readers) see every host and all ``conflicts``; a tenant's
        token sees its own hosts, the wildcards of its own services and the hosts of its own
        outside its zones.
        """
        with self._reading() as session:
            claims = self._claims(session)
            zones = self._all_zones(session)
            fleet = session.scalar(select(Tenant.id).where(Tenant.name == DEFAULT_TENANT))
        rows = hostname_report(claims, zones, fleet)
        if not principal.sees_all:
            rows = [_own_view(row) for row in rows if row["tenant_id"] == principal.tenant_id]
            zones = [zone for zone in zones if zone.tenant_id == principal.tenant_id]
        conflicts = [
            {"host": row["host"], "service": row["service"], "tenant": row["tenant"], **found}
            for row in rows
            for found in row["conflicts"]
        ]
        if conflicts_only:
            rows = [row for row in rows if row["conflicts"]]
        items = [_hostname_view(row) for row in rows[offset : offset + limit]]
        page = _page(items, len(rows), limit, offset)
        page["conflicts"] = conflicts
        page["zones"] = [{"zone": z.zone, "tenant": z.tenant} for z in sorted(
            zones, key=lambda z: z.zone)]
        return page

    def _tenant_named(self, session: Session, name: str) -> Tenant:
        tenant = session.scalar(select(Tenant).where(Tenant.name == name))
        if tenant is None:
            raise Invalid(f"no tenant named {name!r}", "tenant")
        return tenant

    def _tenant_for_service(
        self, session: Session, principal: Principal, tenant: str | None
    ) -> Tenant:
        """The tenant a service is written to: the caller's own, or any for an admin."""
        if principal.role != "admin":
            if tenant not in (None, principal.tenant):
                raise Forbidden("a tenant token can only use its own tenant", "tenant")
            return session.get_one(Tenant, principal.tenant_id)
        if tenant is not None:
            return self._tenant_named(session, tenant)
        found = session.scalar(select(Tenant).where(Tenant.name == DEFAULT_TENANT))
        if found is None:
            found = Tenant(name=DEFAULT_TENANT, created_at=utcnow())
            session.add(found)
            session.flush()
            self._audit(session, principal, "tenant.create", f"tenant:{DEFAULT_TENANT}", found.id)
        return found

    # -- services ------------------------------------------------------------------------------

    def create_service(
        self, principal: Principal, spec: vconfig.Service, tenant: str | None = None
    ) -> dict:
        _check_spec_rights(principal, spec)
        with self._writing() as session:
            owner = self._tenant_for_service(session, principal, tenant)
            if session.scalar(select(Service.id).where(Service.name == spec.name)) is not None:
                raise Conflict(f"a service named {spec.name!r} already exists", "name")
            self._check_hosts(session, principal, spec, None, owner)
            self._check_default(session, spec, None)
            now = utcnow()
            row = Service(
                name=spec.name,
                tenant=owner,
                spec=spec.model_dump(mode="json"),
                version=1,
                is_default=spec.default,
                created_at=now,
                updated_at=now,
                hosts=[ServiceHost(host=host) for host in spec.hosts],
            )
            session.add(row)
            session.flush()
            config_version = self._bump(session, CONFIG_VERSION)
            self._audit(
                session,
                principal,
                "service.create",
                f"service:{spec.name}",
                owner.id,
                {"version": 1, "config_version": config_version, "hosts": spec.hosts},
            )
            view = _service_view(row)
        self._emit("config")
        return view

    def list_services(self, principal: Principal, limit: int = 50, offset: int = 0) -> dict:
        query = select(Service).order_by(Service.name)
        return self._list_scoped(principal, query, Service.tenant_id, limit, offset,
                                 _service_view)

    def get_service(self, principal: Principal, name: str) -> dict:
        with self._reading() as session:
            return _service_view(self._visible_service(session, principal, name))

    def update_service(
        self,
        principal: Principal,
        name: str,
        spec: vconfig.Service,
        expected_version: int | None,
        tenant: str | None = None,
    ) -> dict:
        """Replace a service's spec; ``expected_version`` (from If-Match) None means any."""
        if spec.name != name:
            raise Invalid(
                f"the body names service {spec.name!r} but the URL {name!r}; "
                "services cannot be renamed",
                "name",
            )
        _check_spec_rights(principal, spec)
        with self._writing() as session:
            row = self._visible_service(session, principal, name, lock=True)
            _check_version(row, expected_version)
            owner = row.tenant
            if tenant is not None and tenant != owner.name:
                owner = self._tenant_for_service(session, principal, tenant)
            view = self._replace_spec(session, principal, row, spec, owner, "service.update")
        self._emit("config")
        return view

    def delete_service(
        self, principal: Principal, name: str, expected_version: int | None = None
    ) -> None:
        with self._writing() as session:
            row = self._visible_service(session, principal, name, lock=True)
            _check_version(row, expected_version)
            tenant_id = row.tenant_id
            session.delete(row)
            session.flush()
            config_version = self._bump(session, CONFIG_VERSION)
            self._audit(
                session,
                principal,
                "service.delete",
                f"service:{name}",
                tenant_id,
                {"config_version": config_version},
            )
        self._emit("config")

    def add_origin(
        self, principal: Principal, name: str, origin: dict, expected_version: int | None = None
    ) -> dict:
        with self._writing() as session:
            row = self._visible_service(session, principal, name, lock=True)
            _check_version(row, expected_version)
            new = _validate_origin(origin)
            if any(_same_origin(existing["url"], new["url"]) for existing in row.spec["origins"]):
                raise Conflict(f"origin {new['url']} is already in service {name!r}", "url")
            spec = _revalidate(row.spec, origins=[*row.spec["origins"], new])
            view = self._replace_spec(
                session, principal, row, spec, row.tenant, "origin.add", {"url": new["url"]}
            )
        self._emit("config")
        return view

    def remove_origin(
        self, principal: Principal, name: str, url: str, expected_version: int | None = None
    ) -> dict:
        with self._writing() as session:
            row = self._visible_service(session, principal, name, lock=True)
            _check_version(row, expected_version)
            kept = [o for o in row.spec["origins"] if not _same_origin(o["url"], url)]
            if len(kept) == len(row.spec["origins"]):
                raise NotFound(f"service {name!r} has no origin {url}", "url")
            if not kept:
                raise Conflict(f"{url} is the only origin of {name!r}; a service needs one", "url")
            spec = _revalidate(row.spec, origins=kept)
            view = self._replace_spec(
                session, principal, row, spec, row.tenant, "origin.remove", {"url": url}
            )
        self._emit("config")
        return view

    def _visible_service(
        self, session: Session, principal: Principal, name: str, lock: bool = False
    ) -> Service:
        return self._visible_named(session, principal, Service, name, "service", lock)

    def _replace_spec(
        self,
        session: Session,
        principal: Principal,
        row: Service,
        spec: vconfig.Service,
        owner: Tenant,
        action: str,
        detail: dict | None = None,
    ) -> dict:
        """Write a new spec (hosts, version, config version, audit) to a locked service row."""
        self._check_hosts(session, principal, spec, row, owner)
        self._check_default(session, spec, row.id)
        wanted = set(spec.hosts)
        for host_row in list(row.hosts):
            if host_row.host not in wanted:
                row.hosts.remove(host_row)
        have = {host_row.host for host_row in row.hosts}
        session.flush()  # removed hosts go before new ones may take them over
        row.hosts.extend(ServiceHost(host=host) for host in spec.hosts if host not in have)
        previous_tenant = row.tenant_id
        row.tenant = owner
        row.spec = spec.model_dump(mode="json")
        row.is_default = spec.default
        row.version += 1
        row.updated_at = utcnow()
        session.flush()
        config_version = self._bump(session, CONFIG_VERSION)
        detail = {**(detail or {}), "version": row.version, "config_version": config_version}
        if previous_tenant != owner.id:
            detail["moved_from_tenant_id"] = previous_tenant
        self._audit(session, principal, action, f"service:{row.name}", owner.id, detail)
        return _service_view(row)

    def _check_hosts(
        self,
        session: Session,
        principal: Principal,
        spec: vconfig.Service,
        row: Service | None,
        owner: Tenant,
    ) -> None:
        """May ``owner`` have ``spec.hosts``? (hostnames.py has the rules.)

        Hosts the service already has in the same tenant are not claimed again (they may
        predate zones; GET /hostnames lists them): only new ones must be inside the tenant's
        zones (tenant tokens) and must not cover, or be covered by, another tenant's
        wildcard (anyone). A host of another service is a 409 for everyone.
        """
        self._lock_names(session)
        kept = {h.host for h in row.hosts} if row is not None and row.tenant_id == owner.id else set()
        new = [(index, host) for index, host in enumerate(spec.hosts) if host not in kept]
        if principal.role != "admin":
            zones = self._zones_of(session, owner.id)
            for index, host in new:
                if zone_for_host(host, zones) is None:
                    raise Forbidden(_outside_zones(host, zones), f"hosts[{index}]")
        others = [c for c in self._claims(session) if row is None or c.service != row.name]
        taken = {claim.host: claim for claim in others}
        for index, host in enumerate(spec.hosts):
            if host in taken:
                where = self._service_named_for(principal, taken[host])
                raise Conflict(f"host {host!r} already belongs to {where}", f"hosts[{index}]")
        for index, host in new:
            clashes = wildcard_clashes(host, owner.id, others)
            if clashes:
                other = clashes[0]
                where = self._service_named_for(principal, other)
                relation = "covers" if covers(host, other.host) else "is covered by"
                raise Conflict(
                    f"host {host!r} {relation} {other.host!r} of {where}: a wildcard cannot "
                    "span hosts of two tenants",
                    f"hosts[{index}]",
                )

    def _service_named_for(self, principal: Principal, claim: Claim) -> str:
        """How an error names another service: by name if the caller may see it."""
        if principal.can_see_tenant(claim.tenant_id):
            return f"service {claim.service!r} (tenant {claim.tenant!r})"
        return "another tenant's service"

    def _check_default(self, session: Session, spec: vconfig.Service, own_id: int | None) -> None:
        if not spec.default:
            return
        query = select(Service.name).where(Service.is_default.is_(True))
        if own_id is not None:
            query = query.where(Service.id != own_id)
        other = session.scalar(query)
        if other is not None:
            raise Conflict(f"service {other!r} is already the default service", "default")

    # -- the config bundle ----------------------------------------------------------------------

    def config_version(self) -> int:
        with self._reading() as session:
            return self._counter(session, CONFIG_VERSION)

    def bundle(self) -> dict:
        """``{"version": V, "digest": "sha256:<hex>", "config": Config JSON}``.

        Every service of every tenant. The version and the content come from one snapshot
        (PostgreSQL: REPEATABLE READ), so every replica's bundle V is the same bundle; the
        digest (sha256 of the canonical config JSON) names that content itself. A bundle that
        cannot be built whole (a certificate key no configured secret opens) is Unavailable,
        never handed out without the part.
        """
        with self._snapshot_reader() as session, session.begin():
            return self._current_config(session, snapshot=True)[2]

    def _current_config(
        self, session: Session, snapshot: bool = False
    ) -> tuple[int, vconfig.Config, dict]:
        """(version, Config, bundle), built once per version.

        Only a build in one snapshot (``bundle()``) is remembered: in another transaction a
        change may commit between reading the version and the content. Outside a snapshot
        (routing a purge) certificates whose keys cannot be opened are left out instead of
        failing: routing needs none.
        """
        version = self._counter(session, CONFIG_VERSION)
        cached = self._config_cache
        if cached is not None and cached[0] == version:
            return cached
        specs = session.scalars(select(Service.spec).order_by(Service.name)).all()
        functions = session.scalars(
            select(FunctionVersion.spec)
            .where(FunctionVersion.active.is_(True))
            .order_by(FunctionVersion.name)
        ).all()
        try:
            tls = self._tls_section(session)
        except Unavailable:
            if snapshot:
                raise
            tls = {}
        data = {"services": list(specs), "tls": tls, "functions": list(functions)}
        config = vconfig.config_from_data(data, "<control-plane bundle>")
        content = config.model_dump(mode="json")
        bundle = {"version": version, "digest": bundle_digest(content), "config": content}
        built = (version, config, bundle)
        if not snapshot:
            return built
        with self._cache_lock:
            if self._config_cache is None or self._config_cache[0] <= version:
                self._config_cache = built
        return built

    # -- TLS certificates -----------------------------------------------------------------------

    def create_certificate(
        self,
        principal: Principal,
        name: str,
        cert_pem: str,
        key_pem: str,
        tenant: str | None = None,
    ) -> dict:
        """Store a checked certificate + sealed key; edges get it with the next bundle."""
        parsed = _parse_certificate(cert_pem, key_pem)
        sealed = self._key_sealer().seal(parsed.key_pem)
        with self._writing() as session:
            owner = self._tenant_for_service(session, principal, tenant)
            if session.scalar(select(TlsCertificate.id).where(TlsCertificate.name == name)):
                raise Conflict(f"a certificate named {name!r} already exists", "name")
            self._check_cert_hosts(session, principal, parsed.hosts, owner)
            now = utcnow()
            row = TlsCertificate(
                **_cert_columns(parsed, sealed),
                name=name,
                tenant=owner,
                version=1,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            self._cert_changed(session, principal, "certificate.create", row)
            view = _certificate_view(row, self._tls_plan(session).get(row.name, []))
        self._emit("config")
        return view

    def list_certificates(self, principal: Principal, limit: int = 50, offset: int = 0) -> dict:
        query = select(TlsCertificate).order_by(TlsCertificate.name)
        with self._reading() as session:
            plan = self._tls_plan(session)
            return self._paged(
                session,
                scoped(query, principal, TlsCertificate.tenant_id),
                limit,
                offset,
                lambda row: _certificate_view(row, plan.get(row.name, [])),
            )

    def get_certificate(self, principal: Principal, name: str) -> dict:
        with self._reading() as session:
            row = self._visible_certificate(session, principal, name)
            return _certificate_view(row, self._tls_plan(session).get(row.name, []))

    def update_certificate(
        self, principal: Principal, name: str, cert_pem: str, key_pem: str
    ) -> dict:
        """Rotate: a new chain and key under the same name (hosts follow the new SAN)."""
        parsed = _parse_certificate(cert_pem, key_pem)
        sealed = self._key_sealer().seal(parsed.key_pem)
        with self._writing() as session:
            row = self._visible_certificate(session, principal, name, lock=True)
            self._check_cert_hosts(session, principal, parsed.hosts, row.tenant)
            for column, value in _cert_columns(parsed, sealed).items():
                setattr(row, column, value)
            row.version += 1
            row.updated_at = utcnow()
            session.flush()
            self._cert_changed(session, principal, "certificate.update", row)
            view = _certificate_view(row, self._tls_plan(session).get(row.name, []))
        self._emit("config")
        return view

    def delete_certificate(self, principal: Principal, name: str) -> None:
        with self._writing() as session:
            row = self._visible_certificate(session, principal, name, lock=True)
            session.delete(row)
            session.flush()
            config_version = self._bump(session, CONFIG_VERSION)
            self._audit(
                session,
                principal,
                "certificate.delete",
                f"certificate:{name}",
                row.tenant_id,
                {"config_version": config_version},
            )
        self._emit("config")

    def _key_sealer(self) -> KeySealer:
        if self._sealer is None:
            try:
                self._sealer = sealer_for(self.url)
            except SecretUnavailable as exc:
                raise Unavailable(str(exc)) from None
        return self._sealer

    def _visible_certificate(
        self, session: Session, principal: Principal, name: str, lock: bool = False
    ) -> TlsCertificate:
        return self._visible_named(session, principal, TlsCertificate, name, "certificate", lock)

    def _check_cert_hosts(
        self, session: Session, principal: Principal, hosts: list[str], owner: Tenant
    ) -> None:
        """Whether ``owner`` may have a certificate for ``hosts`` (its SAN names).

        A tenant's certificate must name a host inside the tenant's zones or of its services
        (else it would never be served: 403 for its token, 422 for an admin), and a tenant's
        token may not name another tenant's host or a name inside another tenant's zone
        (403). The fleet's own certificates (admin, tenant ``default``) name what they like;
        which names edges get is settled per bundle (_tls_plan).
        """
        if principal.role == "admin" and owner.name == DEFAULT_TENANT:
            return
        index = HostIndex.of(self._claims(session))
        zones = self._all_zones(session)
        if principal.role != "admin":
            for san in hosts:
                _check_san_is_not_foreign(san, owner.id, index, zones)
        own_zones = [zone.zone for zone in zones if zone.tenant_id == owner.id]
        for san in hosts:
            claim = index.san_owner(san)
            if san_touches_zones(san, own_zones) or (claim and claim.tenant_id == owner.id):
                return
        inside = f"the zones of tenant {owner.name!r} ({', '.join(own_zones) or 'none'})"
        message = (
            f"the certificate names no host inside {inside} nor of its services "
            f"({', '.join(hosts)}): it would never be served"
        )
        if principal.role == "admin":
            raise Unprocessable(message, "cert_pem")
        raise Forbidden(message, "cert_pem")

    def _cert_changed(
        self, session: Session, principal: Principal, action: str, row: TlsCertificate
    ) -> None:
        config_version = self._bump(session, CONFIG_VERSION)
        detail = {
            "version": row.version,
            "config_version": config_version,
            "hosts": list(row.hosts),
            "fingerprint_sha256": row.fingerprint_sha256,
            "not_after": iso(row.not_after),
        }
        self._audit(session, principal, action, f"certificate:{row.name}", row.tenant_id, detail)

    def _tls_section(self, session: Session) -> dict:
        """The bundle's ``tls``: certificates with their keys opened (node credentials only).

        A key this replica cannot open (no VERGE_SECRET, or not the one that sealed it) makes
        the whole bundle Unavailable: an edge keeps its last good bundle rather than lose a
        certificate.
        """
        rows = session.scalars(select(TlsCertificate).order_by(TlsCertificate.name)).all()
        if not rows:
            return {}
        assigned = self._tls_plan(session, rows)
        entries = []
        for row in rows:
            if row.name not in assigned:
                continue
            try:
                key_pem = self._key_sealer().open(row.key_sealed)
            except (ValueError, StoreError) as exc:
                reason = exc.message if isinstance(exc, StoreError) else str(exc)
                log.error("config bundle %s withheld: certificate %r: %s",
                          self._counter(session, CONFIG_VERSION), row.name, reason)
                raise Unavailable(
                    f"this control-plane replica cannot build the config bundle: the key of "
                    f"certificate {row.name!r} cannot be opened ({reason})"
                ) from None
            entries.append(
                {
                    "name": row.name,
                    "cert_pem": row.cert_pem,
                    "key_pem": key_pem,
                    "hosts": assigned[row.name],
                }
            )
        return {"certificates": entries}

    def _tls_plan(
        self, session: Session, rows: Sequence[TlsCertificate] | None = None
    ) -> dict[str, list[str]]:
        """Certificate name -> the host names edges pick it for by SNI.

        A tenant's certificate only for names its own services serve (its SANs cut down by
        certificates.tenant_certificate_names); the fleet's (tenant ``default``) for all its
        SANs. Where several remain for one name, the certificate of the tenant serving it
        wins (sni_assignment).
        """
        if rows is None:
            rows = session.scalars(select(TlsCertificate).order_by(TlsCertificate.name)).all()
        index = HostIndex.of(self._claims(session))
        certs = []
        for row in rows:
            hosts = list(row.hosts)
            if row.tenant.name != DEFAULT_TENANT:
                hosts = tenant_certificate_names(hosts, row.tenant_id, index)
            certs.append((row.name, row.tenant_id, hosts))
        return sni_assignment(certs, index)

    # -- purges ---------------------------------------------------------------------------------

    def purge_seq(self) -> int:
        with self._reading() as session:
            return self._counter(session, PURGE_SEQ)

    def create_purge(
        self,
        principal: Principal,
        *,
        service: str | None = None,
        urls: Sequence[str] = (),
        prefixes: Sequence[str] = (),
        tags: Sequence[str] = (),
        soft: bool = False,
    ) -> dict:
        """Queue a purge for every edge: ``{"seq": N, "nodes": [names expected to ack]}``.

        Every registered, non-revoked node is expected, up or not: a node that looks down
        (say, the control plane itself was down and heard no heartbeats) may well be serving;
        it stays pending until it acknowledges. A purge of one service carries that
        service's hosts (``scope``) so that edges apply its tags to that service only.
        """
        if not (urls or prefixes or tags):
            raise Invalid("nothing to purge: give urls, prefixes or tags", "urls")
        _check_tags(tags)
        with self._writing() as session:
            scope = self._visible_service(session, principal, service) if service else None
            if scope is None and not principal.sees_all and (prefixes or tags):
                raise Invalid("name the service whose prefixes or tags to purge", "service")
            resolver = _PurgeResolver(
                self._current_config(session)[1],
                principal,
                scope,
                dict(session.execute(select(Service.name, Service.tenant_id)).all()),
            )
            targets = resolver.targets(urls, prefixes, tags)
            seq = self._bump(session, PURGE_SEQ)
            expected = self._registered_node_names(session)
            tenant_id = scope.tenant_id if scope else principal.tenant_id
            session.add(
                PurgeJob(
                    seq=seq,
                    tenant_id=tenant_id,
                    service=service,
                    targets=targets,
                    soft=soft,
                    expected=expected,
                    scope=self._purge_scope(session, scope) if scope else None,
                    created_by=principal.actor,
                    created_at=utcnow(),
                )
            )
            self._audit(
                session,
                principal,
                "purge.create",
                f"purge:{seq}",
                tenant_id,
                {
                    "service": service,
                    "urls": list(urls),
                    "prefixes": list(prefixes),
                    "tags": list(tags),
                    "soft": soft,
                },
            )
        self._emit("purges")
        return {"seq": seq, "nodes": expected}

    def purge_status(self, principal: Principal, seq: int) -> dict:
        """Who has applied purge ``seq``: ``acked`` and ``pending`` node names.

        ``done`` once nobody is pending, or when ``purge_timeout`` seconds have passed
        (``timed_out``); the nodes still pending then (``down`` lists those that look down)
        apply it when they come back, before serving from their cache.
        """
        with self._reading() as session:
            job = session.get(PurgeJob, seq)
            if job is None or not (principal.sees_all or job.tenant_id == principal.tenant_id):
                raise NotFound(f"no purge #{seq}")
            acked = set(
                session.scalars(
                    select(Node.name)
                    .join(PurgeAck, PurgeAck.node_id == Node.id)
                    .where(PurgeAck.seq == seq)
                ).all()
            )
            nodes = {
                node.name: node
                for node in session.scalars(select(Node).where(Node.name.in_(job.expected)))
            }
        now = utcnow()
        pending = sorted(
            name
            for name in job.expected
            if name not in acked and name in nodes and not nodes[name].revoked
        )
        timed_out = bool(pending) and now - job.created_at > timedelta(seconds=self.purge_timeout)
        return {
            "seq": job.seq,
            "acked": sorted(acked),
            "pending": pending,
            "down": [name for name in pending if self._status(nodes[name], now) == "down"],
            "created_at": iso(job.created_at),
            "service": job.service,
            "soft": job.soft,
            "done": not pending or timed_out,
            "timed_out": timed_out,
        }

    def purges_after(self, after: int, limit: int = PURGE_BATCH) -> list[dict]:
        """Purges with seq > after, oldest first (what a node has not applied yet)."""
        with self._reading() as session:
            jobs = session.scalars(
                select(PurgeJob).where(PurgeJob.seq > after).order_by(PurgeJob.seq).limit(limit)
            ).all()
            return [_purge_record(job) for job in jobs]

    def _purge_scope(self, session: Session, service: Service) -> dict:
        """The hosts a purge of ``service`` may touch, as the edges route them.

        ``hosts``: the service's hosts ("*" too when it is the default service); ``except``:
        other services' hosts that take precedence inside them (an exact host or a more
        specific wildcard below one of its wildcards; everything else for "*").
        """
        hosts = sorted(host.host for host in service.hosts)
        if service.is_default and "*" not in hosts:
            hosts.append("*")
        wildcards = [host for host in hosts if host.startswith("*.")]
        everything = "*" in hosts
        others = sorted(
            claim.host
            for claim in self._claims(session)
            if claim.service != service.name
            and (everything or any(covers(w, claim.host) for w in wildcards))
        )
        return {"hosts": hosts, "except": others}

    def ack_purges(self, principal: Principal, seq: int) -> None:
        """The node has applied every purge up to ``seq``."""
        with self._writing() as session:
            node = session.get_one(Node, principal.node_id, with_for_update=True)
            top = min(seq, self._counter(session, PURGE_SEQ))
            if top <= node.acked_seq:
                return
            now = utcnow()
            seqs = session.scalars(
                select(PurgeJob.seq).where(PurgeJob.seq > node.acked_seq, PurgeJob.seq <= top)
            ).all()
            session.add_all(PurgeAck(seq=s, node_id=node.id, acked_at=now) for s in seqs)
            node.acked_seq = top
            self._announce(session, "acks")
        self._emit("acks")

    def ack_count(self) -> int:
        """A number that changes whenever any node acknowledges (for the status long poll)."""
        with self._reading() as session:
            return session.scalar(select(func.count()).select_from(PurgeAck)) or 0

    # -- nodes ----------------------------------------------------------------------------------

    def join_node(
        self, principal: Principal, name: str, url: str, admin_url: str, region: str | None = None
    ) -> dict:
        """Register a node (or re-register it: a new credential replaces the old one)."""
        issued = auth.issue(node=True)
        with self._writing() as session:
            node = session.scalar(select(Node).where(Node.name == name).with_for_update())
            top = self._counter(session, PURGE_SEQ)
            rejoin = node is not None
            if node is None:
                node = Node(
                    name=name,
                    acked_seq=top,
                    purge_seq=0,
                    config_version=0,
                    load={},
                    health={},
                    revoked=False,
                )
                session.add(node)
            node.url, node.admin_url, node.region = url, admin_url, region
            node.credential_id, node.credential_sha256 = issued.id, issued.digest
            self._logins_revoked(session)
            node.joined_at, node.revoked = utcnow(), False
            self._audit(
                session,
                principal,
                "node.join",
                f"node:{name}",
                None,
                {"url": url, "admin_url": admin_url, "region": region, "rejoin": rejoin},
            )
            config_version = self._counter(session, CONFIG_VERSION)
        self._logins.clear()
        return {
            "node": name,
            "credential": issued.text,
            "config_version": config_version,
            "purge_seq": top,
        }

    def heartbeat(
        self,
        principal: Principal,
        *,
        health: dict,
        load: dict,
        config_version: int,
        purge_seq: int,
        whereabouts: dict | None = None,
    ) -> None:
        """Record a heartbeat; `whereabouts` (url, admin_url, region) as the node reports them."""
        with self._writing() as session:
            session.execute(
                update(Node)
                .where(Node.id == principal.node_id)
                .values(
                    last_heartbeat=utcnow(),
                    health=health,
                    load=load,
                    config_version=config_version,
                    purge_seq=purge_seq,
                    **(whereabouts or {}),
                )
            )

    def monitor_targets(self) -> list[tuple[str, str, dict]]:
        """(name, admin URL, stored verdict) of every node the health monitor checks."""
        with self._reading() as session:
            rows = session.execute(
                select(Node.name, Node.admin_url, Node.monitor).where(Node.revoked.is_(False))
            ).all()
        return [(name, admin_url, monitor or {}) for name, admin_url, monitor in rows]

    def record_monitor(self, name: str, verdict: dict) -> None:
        """Store the monitor's verdict for one node (on a change of state, not every check)."""
        with self._writing() as session:
            session.execute(update(Node).where(Node.name == name).values(monitor=verdict))

    def list_nodes(self, limit: int = 50, offset: int = 0) -> dict:
        now = utcnow()
        with self._reading() as session:
            return self._paged(
                session,
                select(Node).order_by(Node.name),
                limit,
                offset,
                lambda node: self._node_view(node, now),
            )

    def revoke_node(self, principal: Principal, name: str) -> None:
        with self._writing() as session:
            node = session.scalar(select(Node).where(Node.name == name))
            if node is None:
                raise NotFound(f"no node named {name!r}")
            if node.revoked:
                return
            node.revoked = True
            self._logins_revoked(session)
            self._audit(session, principal, "node.revoke", f"node:{name}", None)
        self._logins.clear()

    def _status(self, node: Node, now: datetime) -> str:
        if node.revoked:
            return "revoked"
        seen = node.last_heartbeat or node.joined_at
        return "up" if now - seen <= timedelta(seconds=self.down_after) else "down"

    def _registered_node_names(self, session: Session) -> list[str]:
        """Every node that joined and was not revoked (up or down: the store knows them all,
        not just those heard from lately)."""
        return list(
            session.scalars(
                select(Node.name).where(Node.revoked.is_(False)).order_by(Node.name)
            ).all()
        )

    def _node_view(self, node: Node, now: datetime) -> dict:
        return {
            "name": node.name,
            "url": node.url,
            "admin_url": node.admin_url,
            "region": node.region,
            "status": self._status(node, now),
            "last_heartbeat": iso(node.last_heartbeat),
            "joined_at": iso(node.joined_at),
            "config_version": node.config_version,
            "purge_seq": node.purge_seq,
            "load": node.load,
            "health": node.health,
            "monitor": node.monitor,
        }

    # -- audit ----------------------------------------------------------------------------------

    def list_audit(self, principal: Principal, limit: int = 50, offset: int = 0) -> dict:
        query = select(AuditEntry).order_by(AuditEntry.id.desc())
        return self._list_scoped(principal, query, AuditEntry.tenant_id, limit, offset,
                                 _audit_view)

    # -- stats ----------------------------------------------------------------------------------

    def ingest_stats(
        self, principal: Principal, samples: Sequence[dict], idempotency_key: str | None = None
    ) -> dict:
        """Add a node's samples to their buckets; a batch key seen before is ignored."""
        try:
            return self._ingest_stats(principal, samples, idempotency_key)
        except Conflict:  # the same batch, sent twice at once: the other copy counted it
            if idempotency_key and self._batch_seen(principal, idempotency_key):
                return {"accepted": 0, "duplicate": True}
            raise

    def _batch_seen(self, principal: Principal, key: str) -> bool:
        with self._reading() as session:
            return session.get(StatsBatch, (principal.node_id, key)) is not None

    def _ingest_stats(
        self, principal: Principal, samples: Sequence[dict], idempotency_key: str | None
    ) -> dict:
        with self._writing() as session:
            if idempotency_key:
                if session.get(StatsBatch, (principal.node_id, idempotency_key)) is not None:
                    return {"accepted": 0, "duplicate": True}
                session.add(
                    StatsBatch(node_id=principal.node_id, key=idempotency_key, received_at=utcnow())
                )
            tenants = dict(session.execute(select(Service.name, Service.tenant_id)).all())
            buckets = _sum_buckets(samples)
            for (service, bucket), counts in buckets.items():
                self._add_sample(
                    session, principal.node_id, service, bucket, tenants.get(service), counts
                )
        return {"accepted": len(samples), "duplicate": False}

    def _add_sample(
        self,
        session: Session,
        node_id: int | None,
        service: str,
        bucket: int,
        tenant_id: int | None,
        counts: dict[str, float],
    ) -> None:
        dialect = postgresql if self.is_postgres else sqlite
        statement = dialect.insert(StatsSample).values(
            node_id=node_id, service=service, bucket=bucket, tenant_id=tenant_id, **counts
        )
        table = StatsSample.__table__.c
        statement = statement.on_conflict_do_update(
            index_elements=["node_id", "service", "bucket"],
            set_={name: table[name] + statement.excluded[name] for name in STAT_COUNTERS},
        )
        session.execute(statement)

    def query_stats(
        self,
        principal: Principal,
        *,
        service: str | None = None,
        node: str | None = None,
        since: float | None = None,
        until: float | None = None,
        step: int = STATS_BUCKET,
    ) -> dict:
        """Sums per ``step`` seconds over the filter: ``{"series": [{"t", "requests", ...}]}``."""
        now = utcnow().timestamp()
        since = now - 3600 if since is None else since
        step = max(int(step), 1)
        t = (StatsSample.bucket - StatsSample.bucket % step).label("start")
        sums = [func.sum(getattr(StatsSample, name)).label(name) for name in STAT_COUNTERS]
        query = (
            select(t, *sums)
            .where(StatsSample.bucket >= int(since) - int(since) % STATS_BUCKET)
            .group_by(t)
            .order_by(t)
        )
        if until is not None:
            query = query.where(StatsSample.bucket <= until)
        query = scoped(query, principal, StatsSample.tenant_id)
        with self._reading() as session:
            if service is not None:
                self._check_stats_service(session, principal, service)
                query = query.where(StatsSample.service == service)
            if node is not None:
                query = query.join(Node, Node.id == StatsSample.node_id).where(Node.name == node)
            rows = session.execute(query).all()
        return {"series": [_series_point(row) for row in rows], "step": step}

    def _check_stats_service(self, session: Session, principal: Principal, name: str) -> None:
        tenant_id = session.scalar(select(Service.tenant_id).where(Service.name == name))
        if tenant_id is not None and not principal.can_see_tenant(tenant_id):
            raise NotFound(f"no service named {name!r}")

    def prune_stats(self, retention_days: float, now: datetime | None = None) -> int:
        """Delete samples and idempotency keys older than ``retention_days``; rows deleted."""
        cutoff = (now or utcnow()) - timedelta(days=retention_days)
        with self._writing() as session:
            samples = session.execute(
                delete(StatsSample).where(StatsSample.bucket < int(cutoff.timestamp()))
            )
            batches = session.execute(delete(StatsBatch).where(StatsBatch.received_at < cutoff))
            return (samples.rowcount or 0) + (batches.rowcount or 0)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Purge targets: what the edges match (cache keys, key prefixes, tags)
# ---------------------------------------------------------------------------------------------


class _PurgeResolver:
    """Turns purge URLs and prefixes into edge targets, checking the caller owns them.

    URLs become cache keys as the edge's admin API makes them (``keys.key_for_url``, plus the
    variant a matching rule's ``sort_query``/``ignore_query`` produces, plus the prefix that
    covers variants keyed by rule headers).
    """

    def __init__(
        self,
        config: vconfig.Config,
        principal: Principal,
        scope: Service | None,
        tenants: dict[str, int],
    ) -> None:
        self.config, self.principal, self.scope, self.tenants = config, principal, scope, tenants

    def targets(
        self, urls: Sequence[str], prefixes: Sequence[str], tags: Sequence[str]
    ) -> list[list[str]]:
        out: list[list[str]] = []
        for index, url in enumerate(urls):
            for key in self._url_keys(url, f"urls[{index}]"):
                out.append(["url", key])
                out.append(["prefix", key + "\n"])
        for index, prefix in enumerate(prefixes):
            key = keys.key_for_url(prefix)
            self._service_of(key.partition("/")[0], prefix, f"prefixes[{index}]")
            out.append(["prefix", keys.prefix_key(self.config, prefix)])
        out.extend(["tag", tag] for tag in tags)
        return out

    def _url_keys(self, url: str, field: str) -> list[str]:
        self._service_of(keys.key_for_url(url).partition("/")[0], url, field)
        return keys.url_keys(self.config, url)

    def _service_of(self, host: str, url: str, field: str) -> vconfig.Service | None:
        """The service serving ``host``, after checking the caller may purge it."""
        if not host:
            raise Invalid(f"{url!r} has no host; give http://host/path", field)
        service = self.config.service_for_host(host)
        if self.scope is not None:
            if service is None or service.name != self.scope.name:
                raise Invalid(f"{url} is not served by service {self.scope.name!r}", field)
            return service
        if self.principal.sees_all:
            return service
        owner = self.tenants.get(service.name) if service is not None else None
        if service is None or owner != self.principal.tenant_id:
            raise Invalid(f"{url} is not served by any of your services", field)
        return service


# ---------------------------------------------------------------------------------------------
# Views and checks
# ---------------------------------------------------------------------------------------------


def bundle_digest(config_json: dict) -> str:
    """The content identity of a bundle: sha256 of its canonical JSON (sorted keys)."""
    canonical = json.dumps(config_json, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _tenant_view(tenant: Tenant, zones: Sequence[str]) -> dict:
    return {
        "id": tenant.id,
        "name": tenant.name,
        "zones": sorted(zones),
        "created_at": iso(tenant.created_at),
    }


def _normalized_zones(zones: Sequence[str]) -> list[str]:
    """Zones as stored, each checked (400 naming ``zones[i]``), duplicates dropped."""
    found = []
    for index, zone in enumerate(zones):
        try:
            found.append(normalize_zone(zone))
        except ZoneError as exc:
            raise Invalid(str(exc), f"zones[{index}]") from None
    return list(dict.fromkeys(found))


def _outside_zones(host: str, zones: Sequence[str]) -> str:
    if host == "*":
        return "only an admin can serve every host ('*')"
    if not zones:
        return (
            f"host {host!r} is outside your tenant's zones: it has none yet; an admin "
            "delegates them (verge tenant zone add TENANT ZONE)"
        )
    wildcard = " (a wildcard *.NAME needs NAME inside a zone)" if host.startswith("*.") else ""
    return (
        f"host {host!r} is outside your tenant's zones ({', '.join(zones)}){wildcard}; "
        "an admin delegates zones (verge tenant zone add TENANT ZONE)"
    )


def _check_san_is_not_foreign(san: str, tenant_id: int, index: HostIndex,
                              zones: Sequence[Zone]) -> None:
    """A tenant token's certificate may not name another tenant's host or zone (403)."""
    claim = index.san_owner(san)
    if claim is not None and claim.tenant_id != tenant_id:
        raise Forbidden(f"host {san!r} belongs to another tenant's service", "cert_pem")
    inside = zone_owner(san.removeprefix("*."), zones)
    if inside is not None and inside.tenant_id != tenant_id:
        raise Forbidden(f"host {san!r} is inside another tenant's zone", "cert_pem")


def _own_view(row: dict) -> dict:
    """A hostname row as its tenant may see it: nothing about other tenants."""
    tenant_id = row["tenant_id"]
    return {
        **row,
        "covered_by": [w for w in row["covered_by"] if w["tenant_id"] == tenant_id],
        "conflicts": [c for c in row["conflicts"] if c["kind"] == "outside_zones"],
    }


def _hostname_view(row: dict) -> dict:
    covered = [{k: v for k, v in w.items() if k != "tenant_id"} for w in row["covered_by"]]
    view = {k: v for k, v in row.items() if k != "tenant_id"}
    return {**view, "covered_by": covered}


def _token_view(token: Token) -> dict:
    return {
        "id": token.id,
        "name": token.name,
        "role": token.role,
        "tenant": token.tenant.name if token.tenant else None,
        "created_at": iso(token.created_at),
        "created_by": token.created_by,
        "revoked": token.revoked_at is not None,
    }


def _service_view(row: Service) -> dict:
    return {**row.spec, "tenant": row.tenant.name, "version": row.version}


def _certificate_view(row: TlsCertificate, serving: list[str]) -> dict:
    """What the API shows of a certificate: never the key, not even sealed.

    ``hosts`` are its SAN names; ``serving`` the names edges pick it for by SNI (a tenant's
    certificate only for its own services' hosts).
    """
    view = {
        "name": row.name,
        "tenant": row.tenant.name,
        "hosts": list(row.hosts),
        "serving": serving,
        "not_after": iso(row.not_after),
        "fingerprint_sha256": row.fingerprint_sha256,
        "version": row.version,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }
    warning = expiry_warning(row.not_after)
    if warning:
        view["warning"] = warning
    return view


def _parse_certificate(cert_pem: str, key_pem: str):  # noqa: ANN202
    try:
        return parse_certificate(cert_pem, key_pem)
    except CertificateError as exc:
        raise Invalid(exc.message, exc.field) from None


def _cert_columns(parsed: Any, sealed: str) -> dict:
    return {
        "cert_pem": parsed.cert_pem,
        "key_sealed": sealed,
        "hosts": parsed.hosts,
        "not_after": parsed.not_after,
        "fingerprint_sha256": parsed.fingerprint_sha256,
    }


def _purge_record(job: PurgeJob) -> dict:
    """A purge as edges get it; ``scope`` only for a purge of one service."""
    record = {"seq": job.seq, "targets": job.targets, "soft": job.soft}
    if job.scope:
        record["scope"] = job.scope
    return record


def _check_tags(tags: Sequence[str]) -> None:
    """Tags come from response headers, which hold no control characters; edges rely on it."""
    for index, tag in enumerate(tags):
        if any(ord(char) < 0x20 or ord(char) == 0x7F for char in tag):
            raise Invalid("a tag cannot contain control characters", f"tags[{index}]")


def _audit_view(entry: AuditEntry) -> dict:
    return {
        "id": entry.id,
        "at": iso(entry.at),
        "actor": entry.actor,
        "action": entry.action,
        "object": entry.object,
        "detail": entry.detail,
    }


def _series_point(row: Any) -> dict:
    values = row._mapping
    point = {"t": int(values["start"])}
    for name in STAT_COUNTERS[:-2]:
        point[name] = int(values[name] or 0)
    count = int(values["origin_count"] or 0)
    point["origin_ms_avg"] = round(float(values["origin_ms_sum"] or 0) / count, 3) if count else 0.0
    return point


def _sum_buckets(samples: Sequence[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """Samples added up per (service, bucket start)."""
    buckets: dict[tuple[str, int], dict[str, float]] = {}
    for sample in samples:
        t = int(sample["t"])
        key = (sample["service"], t - t % STATS_BUCKET)
        counts = buckets.setdefault(key, dict.fromkeys(STAT_COUNTERS, 0))
        for name in STAT_COUNTERS:
            counts[name] += sample.get(name, 0) or 0
    return buckets


def _check_version(row: Service, expected: int | None) -> None:
    if expected is not None and row.version != expected:
        raise PreconditionFailed(
            f"service {row.name!r} is at version {row.version}, not {expected}: someone changed "
            "it; fetch it again"
        )


def _check_spec_rights(principal: Principal, spec: vconfig.Service) -> None:
    """Tenant tokens may not take traffic meant for everyone (default service, host "*")."""
    if principal.role == "admin":
        return
    if spec.default:
        raise Forbidden("only an admin can make a service the default", "default")
    if "*" in spec.hosts:
        raise Forbidden(
            "only an admin can serve every host ('*')", f"hosts[{spec.hosts.index('*')}]"
        )


def _validate_origin(origin: dict) -> dict:
    try:
        return vconfig.OriginSpec.model_validate(origin).model_dump(mode="json")
    except ValidationError as exc:
        raise validation_error(exc) from None


def _same_origin(a: str, b: str) -> bool:
    """Whether two origin URLs name the same server (http://h and http://h:80 do)."""

    def identity(url: str) -> tuple | str:
        try:
            origin = vconfig.OriginSpec.model_validate(url)
        except ValidationError:
            return url
        return origin.scheme, origin.host, origin.port

    return identity(a) == identity(b)


def _revalidate(spec: dict, **changes: Any) -> vconfig.Service:
    try:
        return vconfig.Service.model_validate({**spec, **changes})
    except ValidationError as exc:
        raise validation_error(exc) from None


__all__ = [
    "DEFAULT_TENANT",
    "Conflict",
    "Forbidden",
    "Invalid",
    "NotFound",
    "PreconditionFailed",
    "Store",
    "StoreError",
    "Unavailable",
    "field_path",
    "iso",
    "normalize_url",
    "pydantic_error",
    "validation_error",
]
