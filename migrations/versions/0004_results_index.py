"""results: pages as index range scans at any depth; rows written in bulk without a per-row foreign-key check

- ``ix_results_query`` also orders by query position: a page filtered by ``query_id`` is ordered by
  (query_pos, rank), and several query rows may share one id (meta pairwise results carry the task id of each
  query row); with query_pos in the index the page is read in index order from its cursor, with no sort.
- The foreign key from ``attribution_results`` to ``attributions`` goes: PostgreSQL checks it with a trigger per
  inserted row, which doubled the time of a full ranking's COPY. Rows are written only by the job of an existing
  attribution, in the transaction that marks that job succeeded, and attributions are never deleted.

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-29 00:10:00
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FOREIGN_KEY = "fk_attribution_results_attribution_id_attributions"


def upgrade() -> None:
    with op.batch_alter_table("attribution_results", schema=None) as batch_op:
        batch_op.drop_constraint(FOREIGN_KEY, type_="foreignkey")
        batch_op.drop_index("ix_results_query")
        batch_op.create_index(
            "ix_results_query", ["attribution_id", "direction", "query_id", "query_pos", "rank"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("attribution_results", schema=None) as batch_op:
        batch_op.drop_index("ix_results_query")
        batch_op.create_index("ix_results_query", ["attribution_id", "direction", "query_id", "rank"], unique=False)
        batch_op.create_foreign_key(FOREIGN_KEY, "attributions", ["attribution_id"], ["id"], ondelete="CASCADE")
