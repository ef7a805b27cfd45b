"""Initial schema: tenants, tokens, services, nodes, purges, audit log, stats.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written by hand (types spelled out, no import of the models) so that it keeps creating the
same tables when the models move on; tests/control/test_store.py checks that the models and
the migrated database agree.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    _tenants_and_tokens()
    _services()
    _nodes_and_purges()
    _audit_and_stats()
    counters = op.create_table(
        "counters",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(
        counters, [{"name": "config_version", "value": 1}, {"name": "purge_seq", "value": 0}]
    )


def _tenants_and_tokens() -> None:
    tenants = op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("created_at", TIME, nullable=False),
    )
    # where an admin's services go when no tenant is named (made here, not on first use,
    # so that concurrent first requests cannot race to create it)
    op.bulk_insert(tenants, [{"name": "default", "created_at": datetime.now(UTC)}])
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("tenant_id", sa.Integer(), sa.ForeignKey("tenants.id", ondelete="CASCADE")),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("created_by", sa.String(300), nullable=False),
        sa.Column("revoked_at", TIME),
    )
    op.create_index("ix_tokens_tenant_id", "tokens", ["tenant_id"])


def _services() -> None:
    op.create_table(
        "services",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("tenant_id", sa.Integer(), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
    )
    op.create_index("ix_services_tenant_id", "services", ["tenant_id"])
    op.create_table(
        "service_hosts",
        sa.Column("host", sa.String(255), primary_key=True),
        sa.Column(
            "service_id",
            sa.Integer(),
            sa.ForeignKey("services.id", ondelete="CASCADE"),
            nullable=False,
        ),
    )
    op.create_index("ix_service_hosts_service_id", "service_hosts", ["service_id"])


def _nodes_and_purges() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("url", sa.String(500), nullable=False),
        sa.Column("admin_url", sa.String(500), nullable=False),
        sa.Column("region", sa.String(63)),
        sa.Column("credential_id", sa.String(32), nullable=False, unique=True),
        sa.Column("credential_sha256", sa.String(64), nullable=False),
        sa.Column("joined_at", TIME, nullable=False),
        sa.Column("last_heartbeat", TIME),
        sa.Column("config_version", sa.BigInteger(), nullable=False),
        sa.Column("purge_seq", sa.BigInteger(), nullable=False),
        sa.Column("acked_seq", sa.BigInteger(), nullable=False),
        sa.Column("load", JSON, nullable=False),
        sa.Column("health", JSON, nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "purge_jobs",
        sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("tenant_id", sa.Integer(), sa.ForeignKey("tenants.id", ondelete="SET NULL")),
        sa.Column("service", sa.String(63)),
        sa.Column("targets", JSON, nullable=False),
        sa.Column("soft", sa.Boolean(), nullable=False),
        sa.Column("expected", JSON, nullable=False),
        sa.Column("created_by", sa.String(300), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
    )
    op.create_index("ix_purge_jobs_tenant_id", "purge_jobs", ["tenant_id"])
    op.create_table(
        "purge_acks",
        sa.Column(
            "seq",
            sa.BigInteger(),
            sa.ForeignKey("purge_jobs.seq", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "node_id", sa.Integer(), sa.ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("acked_at", TIME, nullable=False),
    )


def _audit_and_stats() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("at", TIME, nullable=False),
        sa.Column("actor", sa.String(300), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("object", sa.String(300), nullable=False),
        sa.Column("tenant_id", sa.Integer()),
        sa.Column("detail", JSON, nullable=False),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_tenant_id", "audit_log", ["tenant_id"])
    counts = [
        sa.Column(name, sa.BigInteger(), nullable=False)
        for name in (
            "requests",
            "hits",
            "bytes",
            "status_2xx",
            "status_3xx",
            "status_4xx",
            "status_5xx",
        )
    ]
    op.create_table(
        "stats_samples",
        sa.Column(
            "node_id", sa.Integer(), sa.ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("service", sa.String(63), primary_key=True),
        sa.Column("bucket", sa.BigInteger(), primary_key=True),
        sa.Column("tenant_id", sa.Integer()),
        *counts,
        sa.Column("origin_ms_sum", sa.Float(), nullable=False),
        sa.Column("origin_count", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_stats_samples_bucket_service", "stats_samples", ["bucket", "service"])
    op.create_index("ix_stats_samples_tenant_id", "stats_samples", ["tenant_id"])
    op.create_table(
        "stats_batches",
        sa.Column(
            "node_id", sa.Integer(), sa.ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("received_at", TIME, nullable=False),
    )
    op.create_index("ix_stats_batches_received_at", "stats_batches", ["received_at"])


def downgrade() -> None:
    for table in (
        "stats_batches",
        "stats_samples",
        "audit_log",
        "purge_acks",
        "purge_jobs",
        "nodes",
        "service_hosts",
        "services",
        "tokens",
        "tenants",
        "counters",
    ):
        op.drop_table(table)
