"""Zones delegated to tenants (hostname ownership) and the scope of a service's purge.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27

Existing tenants start with no zone: their services keep their hosts (an update may keep
them), but a tenant token can claim new hosts only once an admin delegates zones
(``verge tenant zone add``). ``GET /api/v1/hostnames`` lists hosts outside their tenant's
zones so that an admin can sort them out.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tenant_zones",
        sa.Column("zone", sa.String(253), primary_key=True),
        sa.Column(
            "tenant_id",
            sa.Integer(),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("created_at", TIME, nullable=False),
    )
    op.create_index("ix_tenant_zones_tenant_id", "tenant_zones", ["tenant_id"])
    op.add_column("purge_jobs", sa.Column("scope", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("purge_jobs") as batch:
        batch.drop_column("scope")
    op.drop_index("ix_tenant_zones_tenant_id", "tenant_zones")
    op.drop_table("tenant_zones")
