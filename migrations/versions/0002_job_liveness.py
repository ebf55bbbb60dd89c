"""job liveness: heartbeat, last enqueue time and claiming worker of a job, indexes for the reaper

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 23:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=255), nullable=True))
        batch_op.create_index("ix_jobs_status_heartbeat", ["status", "heartbeat_at"], unique=False)
        batch_op.create_index("ix_jobs_status_enqueued", ["status", "enqueued_at"], unique=False)
    # Jobs left unfinished by the previous version: queued ones count as sent when created, running ones as
    # last alive when started, so the reaper looks after them like any other.
    op.execute("UPDATE jobs SET enqueued_at = created_at WHERE status = 'queued'")
    op.execute("UPDATE jobs SET heartbeat_at = COALESCE(started_at, created_at) WHERE status = 'running'")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_status_enqueued")
        batch_op.drop_index("ix_jobs_status_heartbeat")
        batch_op.drop_column("claimed_by")
        batch_op.drop_column("heartbeat_at")
        batch_op.drop_column("enqueued_at")
