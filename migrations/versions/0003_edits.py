"""edits: queued edits of an attribution's model (edits are jobs)

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-28 23:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "edits",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("attribution_id", sa.String(length=40), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("remove", sa.JSON(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("diagnostics", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["attribution_id"], ["attributions.id"], name=op.f("fk_edits_attribution_id_attributions")
        ),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_edits_job_id_jobs")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_edits_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_edits")),
        sa.UniqueConstraint("job_id", name=op.f("uq_edits_job_id")),
        sa.UniqueConstraint("model_id", name=op.f("uq_edits_model_id")),
    )
    with op.batch_alter_table("edits", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_edits_tenant_id"), ["tenant_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("edits", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_edits_tenant_id"))
    op.drop_table("edits")
