"""Edge functions (versioned, module bytes kept), their logs, and the edge KV.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIME = sa.DateTime(timezone=True)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    _functions()
    _function_logs()
    _kv()
    counters = sa.table("counters", sa.column("name", sa.String), sa.column("value", sa.BigInteger))
    op.bulk_insert(counters, [{"name": "kv_seq", "value": 0}])


def _functions() -> None:
    op.create_table(
        "functions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("tenant_id", sa.Integer(), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("service", sa.String(63), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("module_sha256", sa.String(64), nullable=False),
        sa.Column("module", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("created_by", sa.String(300), nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_functions_name_version"),
    )
    op.create_index("ix_functions_name", "functions", ["name"])
    op.create_index("ix_functions_tenant_id", "functions", ["tenant_id"])
    op.create_index("ix_functions_module_sha256", "functions", ["module_sha256"])


def _function_logs() -> None:
    op.create_table(
        "function_logs",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("node", sa.String(63), nullable=False),
        sa.Column("at", TIME, nullable=False),
        sa.Column("record", JSON, nullable=False),
    )
    op.create_index("ix_function_logs_name_id", "function_logs", ["name", "id"])


def _kv() -> None:
    op.create_table(
        "kv_namespaces",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("tenant_id", sa.Integer(), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
    )
    op.create_index("ix_kv_namespaces_tenant_id", "kv_namespaces", ["tenant_id"])
    op.create_table(
        "kv",
        sa.Column(
            "namespace",
            sa.String(63),
            sa.ForeignKey("kv_namespaces.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("key", sa.String(512), primary_key=True),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False, unique=True),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
    )


def downgrade() -> None:
    op.execute("DELETE FROM counters WHERE name = 'kv_seq'")
    op.drop_table("kv")
    op.drop_index("ix_kv_namespaces_tenant_id", "kv_namespaces")
    op.drop_table("kv_namespaces")
    op.drop_index("ix_function_logs_name_id", "function_logs")
    op.drop_table("function_logs")
    for index in ("ix_functions_module_sha256", "ix_functions_tenant_id", "ix_functions_name"):
        op.drop_index(index, "functions")
    op.drop_table("functions")
