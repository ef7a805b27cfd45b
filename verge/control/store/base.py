"""The store's foundation: engine, errors, and the unit of work every aggregate builds on.

Every domain operation of the store (``tenants``, ``tokens``, ``services``, ``certificates``,
``bundle``, ``purges``, ``nodes``, ``stats``, and :mod:`verge.control.functions` and
:mod:`verge.control.protection` beside the package) is written against this public API only:

- ``reading()`` / ``writing()`` / ``snapshot()``: one transaction as a ``Session``. Writes on
  SQLite start with ``BEGIN IMMEDIATE`` and queue on a lock in this process (one writer at a
  time, waiting instead of failing with "database is locked" halfway through); a unique-key
  race with another writer becomes a 409 ``Conflict``. ``snapshot()`` reads the config bundle
  in one snapshot (PostgreSQL: REPEATABLE READ), so its version and content always match.
- ``audit(session, ...)``: the change's audit entry, in the same transaction, so a change and
  its record commit together or not at all.
- ``bump(session, counter)`` / ``counter(session, counter)``: the numbered counters (config
  version, purge and kv sequence); a bump keeps the row locked until commit, so the numbers
  come in commit order.
- ``emit(topic)`` after a commit, ``announce(session, topic)`` inside one: wake this store's
  subscribers, and (PostgreSQL NOTIFY, verge.control.notify) the other replicas'.
- ``logins_revoked(session)`` / ``forget_logins()`` / ``remembered_login()``: the login cache
  that a revoked credential must leave at once, here and on every replica.
- ``paged()``, ``list_scoped()``, ``visible_named()``: tenant scoping done one way
  everywhere: another tenant's row answers "not found", exactly like a missing one.

The errors carry the HTTP status the API answers with and the field they are about.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from pydantic import ValidationError
from sqlalchemy import Engine, Select, create_engine, delete, event, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from verge import config as vconfig
from verge.control import auth
from verge.control.auth import Principal
from verge.control.models import (
    CONFIG_VERSION,
    KV_SEQ,
    PURGE_SEQ,
    AuditEntry,
    Counter,
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

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
DEFAULT_TENANT = "default"
"""Where an admin's service goes when the request names no tenant (made by the first migration)."""
_MIGRATION_LOCK = 0x76657267  # "verg": pg_advisory_xact_lock key while migrating
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


def keep_newest(session: Session, model: Any, which: Any, kept: int) -> None:
    """Delete the rows of ``model`` that match ``which`` but the newest ``kept`` (by id): the
    bounded logs (a function's records, a service's protection events)."""
    oldest_kept = session.scalar(
        select(model.id).where(which).order_by(model.id.desc()).offset(kept - 1).limit(1)
    )
    if oldest_kept is not None:
        session.execute(delete(model).where(which, model.id < oldest_kept))


def page_of(items: list[dict], total: int, limit: int, offset: int) -> dict:
    """One page of a list as the API answers it."""
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
# The unit of work
# ---------------------------------------------------------------------------------------------


class StoreBase:
    """The engine, transactions, counters, audit log and notifications of one store.

    Thread-safe: each call opens its own session. The aggregates (one module each) add
    their operations on top of this class and use nothing else of it.
    """

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url)
        self.is_postgres = self.engine.dialect.name == "postgresql"
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
        self._sqlite_write_lock = threading.Lock()
        self._logins = auth.LoginCache()
        self.replica_id = new_replica_id()
        """Tells this process's change notifications from other replicas' (PostgreSQL)."""
        self._change_listener: ChangeListener | None = None

    def close(self) -> None:
        """Stop hearing other replicas and close the engine's connections."""
        if self._change_listener is not None:
            self._change_listener.stop()
        self.engine.dispose()

    # -- schema -----------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest revision (safe when several replicas start at once)."""
        config = AlembicConfig()
        config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
        with self.engine.execution_options(verge_write=True).begin() as connection:
            if self.is_postgres:
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    # -- transactions -----------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """One read-only transaction."""
        with self._reader() as session, session.begin():
            yield session

    @contextmanager
    def writing(self) -> Iterator[Session]:
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

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        """One read transaction that sees a single snapshot (PostgreSQL: REPEATABLE READ;
        SQLite transactions are snapshots already): for reads whose parts must agree."""
        with self._snapshot_reader() as session, session.begin():
            yield session

    # -- counters and the audit log ---------------------------------------------------------

    def bump(self, session: Session, name: str) -> int:
        """Increment a counter; the row stays locked until commit (numbers in commit order).

        Other replicas hear of it when the transaction commits (config, purges, kv).
        """
        topic = _TOPIC_OF_COUNTER.get(name)
        if topic is not None:
            self.announce(session, topic)
        return session.execute(
            update(Counter)
            .where(Counter.name == name)
            .values(value=Counter.value + 1)
            .returning(Counter.value)
        ).scalar_one()

    def counter(self, session: Session, name: str) -> int:
        """A counter's current value (as this transaction sees it)."""
        return session.execute(select(Counter.value).where(Counter.name == name)).scalar_one()

    def audit(
        self,
        session: Session,
        actor: Principal | str,
        action: str,
        obj: str,
        tenant_id: int | None,
        detail: dict | None = None,
    ) -> None:
        """Record who did what to which object, in the change's own transaction."""
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

    def list_audit(self, principal: Principal, limit: int = 50, offset: int = 0) -> dict:
        query = select(AuditEntry).order_by(AuditEntry.id.desc())
        return self.list_scoped(principal, query, AuditEntry.tenant_id, limit, offset, _audit_view)

    # -- tenant-scoped reads ----------------------------------------------------------------

    def paged(
        self, session: Session, query: Select, limit: int, offset: int, view: Callable[[Any], dict]
    ) -> dict:
        """One page of ``query``'s rows, each through ``view``, with the total (API shape)."""
        total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
        rows = session.scalars(query.limit(limit).offset(offset)).all()
        return page_of([view(row) for row in rows], total or 0, limit, offset)

    def list_scoped(
        self,
        principal: Principal,
        query: Select,
        tenant_column: Any,
        limit: int,
        offset: int,
        view: Callable[[Any], dict],
    ) -> dict:
        """One page of `query`, limited to the caller's tenant unless it sees all tenants."""
        with self.reading() as session:
            return self.paged(session, scoped(query, principal, tenant_column), limit, offset, view)

    def visible_named(
        self,
        session: Session,
        principal: Principal,
        model: Any,
        name: str,
        what: str,
        lock: bool = False,
    ) -> Any:
        """The row of `model` called `name` if the caller's tenant may see it, else NotFound
        (not 403: another tenant's names do not leak)."""
        query = select(model).where(model.name == name)
        if lock:
            query = query.with_for_update(of=model)
        row = session.scalar(query)
        if row is None or not principal.can_see_tenant(row.tenant_id):
            raise NotFound(f"no {what} named {name!r}")
        return row

    # -- notifications ----------------------------------------------------------------------

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call ``listener("config" | "purges" | "acks" | "kv")`` after such a commit (any thread)."""
        self._listeners.append(listener)

    def emit(self, topic: str) -> None:
        """Tell this store's subscribers about ``topic``: call it after the commit, never
        inside the transaction (a listener must not hear of a change that rolls back)."""
        for listener in self._listeners:
            try:
                listener(topic)
            except Exception:  # the change is committed; a broken listener must not undo that
                log.exception("store listener failed for %r", topic)

    def announce(self, session: Session, topic: str) -> None:
        """Tell the other replicas about ``topic`` when this transaction commits."""
        if self.is_postgres:
            announce(session, topic, self.replica_id)

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
                self.emit(watched)

    # -- the login cache --------------------------------------------------------------------

    def remembered_login(
        self, text: str, look_up: Callable[[str], Principal | None]
    ) -> Principal | None:
        """``look_up(text)``, remembered for AUTH_CACHE_SECONDS (auth.LoginCache) while this
        store can hear revocations: a PostgreSQL store that listens but has lost its LISTEN
        connection caches nothing."""
        cached = self._logins.get(text)
        if cached is not None:
            return cached
        generation = self._logins.generation()
        principal = look_up(text)
        if principal is not None and self._may_cache_logins():
            self._logins.put(text, principal, generation)
        return principal

    def _may_cache_logins(self) -> bool:
        return self._change_listener is None or self._change_listener.live

    def logins_revoked(self, session: Session) -> None:
        """A credential stopped (or changed): forget cached logins here and everywhere."""
        self._logins.clear()
        self.announce(session, "auth")

    def forget_logins(self) -> None:
        """Forget cached logins again after the commit: a login looked up meanwhile may have
        seen the credential still valid."""
        self._logins.clear()


def _audit_view(entry: AuditEntry) -> dict:
    return {
        "id": entry.id,
        "at": iso(entry.at),
        "actor": entry.actor,
        "action": entry.action,
        "object": entry.object,
        "detail": entry.detail,
    }
