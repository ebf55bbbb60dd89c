"""per-token query attribution: the query token of each result row, the attribution's flag, a dataset's tokenizer

- ``attribution_results.query_token`` (the scored token's position in its query) and ``query_token_text`` (that
  token decoded, or null): both null for every row that is not from a per-token attribution.
- Two partial indexes, on per-token rows only (rows of other attributions add nothing to them), so that a results
  page filtered by ``query_token`` (with or without ``query_id``) is one index range scan from its cursor
  (query_pos, rank), as the other pages are.
- ``attributions.per_token``; ``datasets.tokenizer_model_id``: the model whose tokenizer made a tokenized text
  dataset (to decode its examples).

Revision ID: 0007
Revises: 0005
Create Date: 2026-11-29 05:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0005"
branch_labels = None
depends_on = None

PER_TOKEN_ROWS = sa.text("query_token IS NOT NULL")


def upgrade() -> None:
    op.add_column("attribution_results", sa.Column("query_token", sa.Integer(), nullable=True))
    op.add_column("attribution_results", sa.Column("query_token_text", sa.String(length=200), nullable=True))
    op.create_index(
        "ix_results_token",
        "attribution_results",
        ["attribution_id", "direction", "query_token", "query_pos", "rank"],
        postgresql_where=PER_TOKEN_ROWS,
        sqlite_where=PER_TOKEN_ROWS,
    )
    op.create_index(
        "ix_results_query_token",
        "attribution_results",
        ["attribution_id", "direction", "query_id", "query_token", "query_pos", "rank"],
        postgresql_where=PER_TOKEN_ROWS,
        sqlite_where=PER_TOKEN_ROWS,
    )
    op.add_column("attributions", sa.Column("per_token", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column("datasets", sa.Column("tokenizer_model_id", sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("tokenizer_model_id")
    with op.batch_alter_table("attributions", schema=None) as batch_op:
        batch_op.drop_column("per_token")
    op.drop_index("ix_results_query_token", table_name="attribution_results")
    op.drop_index("ix_results_token", table_name="attribution_results")
    with op.batch_alter_table("attribution_results", schema=None) as batch_op:
        batch_op.drop_column("query_token_text")
        batch_op.drop_column("query_token")
