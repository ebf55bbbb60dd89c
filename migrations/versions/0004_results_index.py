"""results: the per-query index also orders by query position, so every results page is an index range scan

A page filtered by ``query_id`` is ordered by (query_pos, rank), and several query rows may share one id (meta
pairwise results carry the task id of each query row): with query_pos in the index, the page is read in index
order from its cursor, with no sort, at any depth.

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-29 00:10:00
"""

from __future__ import annotations

from alembic import op

revision = '0004'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index('ix_results_query', table_name='attribution_results')
    op.create_index('ix_results_query', 'attribution_results',
                    ['attribution_id', 'direction', 'query_id', 'query_pos', 'rank'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_results_query', table_name='attribution_results')
    op.create_index('ix_results_query', 'attribution_results', ['attribution_id', 'direction', 'query_id', 'rank'],
                    unique=False)
