"""results: the page key as the primary key, the only index; query rows in their own small table

- ``attribution_results`` loses its surrogate ``id``: (attribution_id, direction, query_pos, rank) -- the unique
  ``ix_results_page`` until now -- is the primary key, and on SQLite the table is ``WITHOUT ROWID`` (its rows live
  in that key's b-tree). ``ix_results_query`` and the two partial per-token indexes go: each inserted row of a full
  ranking paid for three b-trees beside the table, and the filters they served are now resolved through
- ``attribution_queries`` (attribution_id, query_pos) -> query_id, query_token: one row per query row of an
  attribution, filled here from the existing result rows.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

PER_TOKEN_ROWS = sa.text("query_token IS NOT NULL")
KEY = ["attribution_id", "direction", "query_pos", "rank"]
PAYLOAD = ["query_id", "train_id", "score", "task", "split", "query_token", "query_token_text"]


def _result_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("attribution_id", sa.String(length=40), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("query_pos", sa.Integer(), nullable=False),
        sa.Column("query_id", sa.String(length=200), nullable=True),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("train_id", sa.String(length=200), nullable=False),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("task", sa.Integer(), nullable=True),
        sa.Column("split", sa.Integer(), nullable=True),
        sa.Column("query_token", sa.Integer(), nullable=True),
        sa.Column("query_token_text", sa.String(length=200), nullable=True),
    ]


def _drop_secondary_indexes() -> None:
    for name in ("ix_results_query_token", "ix_results_token", "ix_results_query"):
        op.drop_index(name, table_name="attribution_results")


def upgrade() -> None:
    op.create_table(
        "attribution_queries",
        sa.Column("attribution_id", sa.String(length=40), nullable=False),
        sa.Column("query_pos", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("query_id", sa.String(length=200), nullable=True),
        sa.Column("query_token", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("attribution_id", "query_pos", name=op.f("pk_attribution_queries")),
    )
    op.create_index("ix_queries_query_id", "attribution_queries", ["attribution_id", "query_id", "query_pos"])
    op.create_index("ix_queries_query_token", "attribution_queries", ["attribution_id", "query_token", "query_pos"])
    op.execute(
        "INSERT INTO attribution_queries (attribution_id, query_pos, query_id, query_token) "
        "SELECT attribution_id, query_pos, MIN(query_id), MIN(query_token) FROM attribution_results "
        "GROUP BY attribution_id, query_pos"
    )
    _drop_secondary_indexes()
    if op.get_bind().dialect.name == "sqlite":  # WITHOUT ROWID needs a new table
        op.create_table(
            "attribution_results_0008",
            *_result_columns(),
            sa.PrimaryKeyConstraint(*KEY, name=op.f("pk_attribution_results")),
            sqlite_with_rowid=False,
        )
        columns = ", ".join(KEY + PAYLOAD)
        op.execute(f"INSERT INTO attribution_results_0008 ({columns}) SELECT {columns} FROM attribution_results")
        op.drop_table("attribution_results")
        op.rename_table("attribution_results_0008", "attribution_results")
    else:
        op.drop_index("ix_results_page", table_name="attribution_results")
        op.drop_constraint("pk_attribution_results", "attribution_results", type_="primary")
        op.drop_column("attribution_results", "id")
        op.create_primary_key("pk_attribution_results", "attribution_results", KEY)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.create_table(
            "attribution_results_0007",
            sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
            *_result_columns(),
            sa.PrimaryKeyConstraint("id", name=op.f("pk_attribution_results")),
        )
        columns = ", ".join(KEY + PAYLOAD)
        op.execute(
            f"INSERT INTO attribution_results_0007 ({columns}) SELECT {columns} FROM attribution_results "
            f"ORDER BY {', '.join(KEY)}"
        )
        op.drop_table("attribution_results")
        op.rename_table("attribution_results_0007", "attribution_results")
    else:
        op.drop_constraint("pk_attribution_results", "attribution_results", type_="primary")
        op.execute("ALTER TABLE attribution_results ADD COLUMN id BIGSERIAL NOT NULL")  # as 0001 made it
        op.create_primary_key("pk_attribution_results", "attribution_results", ["id"])
    op.create_index("ix_results_page", "attribution_results", KEY, unique=True)
    op.create_index("ix_results_query", "attribution_results", ["attribution_id", "direction", "query_id", *KEY[2:]])
    op.create_index(
        "ix_results_token",
        "attribution_results",
        ["attribution_id", "direction", "query_token", *KEY[2:]],
        postgresql_where=PER_TOKEN_ROWS,
        sqlite_where=PER_TOKEN_ROWS,
    )
    op.create_index(
        "ix_results_query_token",
        "attribution_results",
        ["attribution_id", "direction", "query_id", "query_token", *KEY[2:]],
        postgresql_where=PER_TOKEN_ROWS,
        sqlite_where=PER_TOKEN_ROWS,
    )
    op.drop_index("ix_queries_query_token", table_name="attribution_queries")
    op.drop_index("ix_queries_query_id", table_name="attribution_queries")
    op.drop_table("attribution_queries")
