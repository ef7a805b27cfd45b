"""The control plane's state as SQLAlchemy 2 models: one schema for SQLite and PostgreSQL.

What must hold whatever the API does is enforced here, by the database, so that several
control-plane replicas on one PostgreSQL cannot break it with a race:

* a host belongs to one service (``service_hosts.host`` is the primary key), across tenants;
* a zone is delegated to one tenant (``tenant_zones.zone`` is the primary key);
* ``counters`` holds the global config version and the last purge sequence number. Both are
  bumped with ``UPDATE ... RETURNING`` inside the writing transaction, which locks the row
  until commit: numbers are handed out in commit order without gaps, so a node that has seen
  number N can never miss a change that commits later with a smaller number (a plain
  autoincrement/sequence would allow exactly that);
* a stats batch is counted once per (node, idempotency key).

Times are timezone-aware UTC (:class:`UTCDateTime` also on SQLite, which stores no zone).
The migrations in ``verge/control/migrations`` create exactly these tables; a test compares
the two.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

CONFIG_VERSION = "config_version"
PURGE_SEQ = "purge_seq"
KV_SEQ = "kv_seq"
COUNTERS = (CONFIG_VERSION, PURGE_SEQ, KV_SEQ)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JsonType = JSON().with_variant(JSONB(), "postgresql")
BigId = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JsonType, list[Any]: JsonType}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TenantZone(Base):
    """A DNS zone an admin delegated to a tenant: its services may claim hosts inside it.

    The primary key keeps a zone with one tenant; that zones of two tenants do not nest
    (``a.example.com`` inside ``example.com``) is checked by the store under a lock.
    """

    __tablename__ = "tenant_zones"

    zone: Mapped[str] = mapped_column(String(253), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Token(Base):
    """An operator or join token; only the sha256 of its secret is kept."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[int | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(300))
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant: Mapped[Tenant | None] = relationship(lazy="joined")


class Service(Base):
    """One service: its spec is a validated ``verge.config.Service`` as JSON."""

    __tablename__ = "services"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    spec: Mapped[dict[str, Any]]
    version: Mapped[int] = mapped_column(Integer, default=1)
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    tenant: Mapped[Tenant] = relationship(lazy="joined")
    hosts: Mapped[list[ServiceHost]] = relationship(
        back_populates="service", cascade="all, delete-orphan", passive_deletes=True
    )


class ServiceHost(Base):
    """host -> service; the primary key makes a host unique across all tenants."""

    __tablename__ = "service_hosts"

    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    service_id: Mapped[int] = mapped_column(
        ForeignKey("services.id", ondelete="CASCADE"), index=True
    )

    service: Mapped[Service] = relationship(back_populates="hosts")


class Counter(Base):
    """Global counters (config version, purge sequence), bumped under a row lock."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class Node(Base):
    """An edge node: where it is, what it last reported, and its credential's digest."""

    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    url: Mapped[str] = mapped_column(String(500))
    admin_url: Mapped[str] = mapped_column(String(500))
    region: Mapped[str | None] = mapped_column(String(63))
    credential_id: Mapped[str] = mapped_column(String(32), unique=True)
    credential_sha256: Mapped[str] = mapped_column(String(64))
    joined_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat: Mapped[datetime | None] = mapped_column(default=None)
    config_version: Mapped[int] = mapped_column(BigInteger, default=0)
    """The bundle version the node last reported running."""
    purge_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    """The purge sequence the node last reported having applied."""
    acked_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    """Highest purge acknowledged (acks below it are recorded in purge_acks)."""
    load: Mapped[dict[str, Any]] = mapped_column(default=dict)
    health: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """What the node says of itself in heartbeats (workers alive)."""
    monitor: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    """The health monitor's verdict from outside: state up/down, since, error."""
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class PurgeJob(Base):
    """A purge for every edge; ``seq`` comes from the purge_seq counter (commit order)."""

    __tablename__ = "purge_jobs"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="SET NULL"), index=True
    )
    service: Mapped[str | None] = mapped_column(String(63))
    targets: Mapped[list[Any]]
    """[[kind, value], ...] with kind url|prefix|tag; url values are cache keys."""
    soft: Mapped[bool] = mapped_column(Boolean, default=False)
    expected: Mapped[list[Any]]
    """Names of the registered, non-revoked nodes when the purge was queued."""
    scope: Mapped[dict[str, Any] | None] = mapped_column(JsonType, default=None)
    """For a purge of one service: {"hosts": its hosts, "except": other services' hosts that
    take precedence inside its wildcards}; edges apply tag targets only to those hosts."""
    created_by: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PurgeAck(Base):
    __tablename__ = "purge_acks"

    seq: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("purge_jobs.seq", ondelete="CASCADE"), primary_key=True
    )
    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    acked_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """One change, written in the transaction that made it. No FKs: the log outlives rows."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(300))
    action: Mapped[str] = mapped_column(String(64))
    object: Mapped[str] = mapped_column(String(300))
    tenant_id: Mapped[int | None] = mapped_column(Integer, index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class StatsSample(Base):
    """Counters of one node for one service in one time bucket (sums of what it sent)."""

    __tablename__ = "stats_samples"
    __table_args__ = (Index("ix_stats_samples_bucket_service", "bucket", "service"),)

    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    service: Mapped[str] = mapped_column(String(63), primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    """Start of the bucket, epoch seconds."""
    tenant_id: Mapped[int | None] = mapped_column(Integer, index=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    hits: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    status_2xx: Mapped[int] = mapped_column(BigInteger, default=0)
    status_3xx: Mapped[int] = mapped_column(BigInteger, default=0)
    status_4xx: Mapped[int] = mapped_column(BigInteger, default=0)
    status_5xx: Mapped[int] = mapped_column(BigInteger, default=0)
    origin_ms_sum: Mapped[float] = mapped_column(Float, default=0.0)
    origin_count: Mapped[int] = mapped_column(BigInteger, default=0)


class TlsCertificate(Base):
    """A TLS certificate chain and its key (sealed: see verge.control.certificates)."""

    __tablename__ = "certificates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    cert_pem: Mapped[str] = mapped_column(Text)
    key_sealed: Mapped[str] = mapped_column(Text)
    """The private key PEM as a Fernet token; never in clear, never in an API answer."""
    hosts: Mapped[list[Any]]
    """DNS names from the certificate's subjectAltName."""
    not_after: Mapped[datetime]
    fingerprint_sha256: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class StatsBatch(Base):
    """Idempotency keys of accepted stats uploads (a retried upload is not counted twice)."""

    __tablename__ = "stats_batches"

    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class FunctionVersion(Base):
    """One deployed version of an edge function; the ``active`` one is in the config bundle.

    ``spec`` is a validated ``verge.config.EdgeFunction`` whose module is ``sha256:<hex>``:
    edges fetch the bytes once (``GET /nodes/self/modules/{sha256}``) and keep them.
    """

    __tablename__ = "functions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_functions_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    service: Mapped[str] = mapped_column(String(63))
    version: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]]
    module_sha256: Mapped[str] = mapped_column(String(64), index=True)
    module: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    """The module itself; loaded only when asked for (lists must not read megabytes)."""
    size: Mapped[int] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(300))

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class FunctionLog(Base):
    """What an edge reported of one invocation (failure, stderr) or a failed load."""

    __tablename__ = "function_logs"
    __table_args__ = (Index("ix_function_logs_name_id", "name", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(63))
    node: Mapped[str] = mapped_column(String(63))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    record: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ProtectionEvent(Base):
    """A request an edge refused (deny list, rate limit, WAF, dropped connection): a sample,
    the newest ``verge.control.protection.EVENTS_KEPT`` per service. Goes with its service."""

    __tablename__ = "protection_events"
    __table_args__ = (Index("ix_protection_events_service_id_id", "service_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id", ondelete="CASCADE"))
    node: Mapped[str] = mapped_column(String(63))
    at: Mapped[datetime]
    """When the edge refused the request."""
    client: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(32))
    host: Mapped[str] = mapped_column(String(255))
    target: Mapped[str] = mapped_column(String(512))
    status: Mapped[int] = mapped_column(Integer)
    """The answer's status; 0 when the connection was dropped without one."""
    kind: Mapped[str] = mapped_column(String(16))
    """deny, rate-limit, challenge, waf or drop."""
    detail: Mapped[str] = mapped_column(String(200))
    """The deny reason, the rate-limit rule, the challenge's reason, the WAF's rule ids or
    reason."""


class ProtectionCount(Base):
    """What one node's protect phase counted for one service, per rule, in one time bucket
    (verge.control.protection.ProtectionCounts): a rate-limit rule's allowed, limited (over
    the rate) and blocked requests; the deny lists' and the WAF's refusals. Goes with its
    service."""

    __tablename__ = "protection_counts"
    __table_args__ = (Index("ix_protection_counts_service_id_bucket", "service_id", "bucket"),)

    service_id: Mapped[int] = mapped_column(
        ForeignKey("services.id", ondelete="CASCADE"), primary_key=True
    )
    node_id: Mapped[int] = mapped_column(
        ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    """rate-limit, deny or waf."""
    rule: Mapped[str] = mapped_column(String(63), primary_key=True)
    """The rate-limit rule's name; "" for the deny lists and the WAF."""
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    """Start of the bucket, epoch seconds."""
    allowed: Mapped[int] = mapped_column(BigInteger, default=0)
    limited: Mapped[int] = mapped_column(BigInteger, default=0)
    blocked: Mapped[int] = mapped_column(BigInteger, default=0)


class KvNamespace(Base):
    """An edge KV namespace and the tenant that owns it (made by its first write or grant)."""

    __tablename__ = "kv_namespaces"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class KvEntry(Base):
    """The newest value of one key; ``seq`` (the kv_seq counter, commit order) orders changes.

    A deletion keeps the row as a tombstone (``deleted``) so that edges behind it learn of it.
    """

    __tablename__ = "kv"

    namespace: Mapped[str] = mapped_column(
        ForeignKey("kv_namespaces.name", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(512), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


STAT_COUNTERS = (
    "requests",
    "hits",
    "bytes",
    "status_2xx",
    "status_3xx",
    "status_4xx",
    "status_5xx",
    "origin_ms_sum",
    "origin_count",
)
