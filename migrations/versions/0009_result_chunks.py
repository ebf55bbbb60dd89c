"""results: ranked rows stored as chunks of consecutive ranks, not a row each

- ``result_chunks`` (attribution_id, direction, query_pos, last_rank) -> first_rank, the query row's query_id /
  query_token / query_token_text, and the chunk's rows as columns: ``train_ids`` a JSON array of text ids,
  ``scores`` little-endian float64, ``tasks`` / ``splits`` little-endian int64 (or null). At most 1,000 rows per
  chunk, each chunk one query row and direction with consecutive ranks.
- ``attribution_results`` goes: its rows are moved into chunks here (and back on downgrade, into the table as 0008
  made it).

A full ranking of a million rows was a million heap rows and a million primary-key entries (and as many
write-ahead log records on PostgreSQL): most of its job time. As chunks it is about a thousand rows.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 17:40:00
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

CHUNK_ROWS = 1000
BATCH = 200
ROW_COLUMNS = [
    "attribution_id",
    "direction",
    "query_pos",
    "rank",
    "query_id",
    "train_id",
    "score",
    "task",
    "split",
    "query_token",
    "query_token_text",
]
CHUNK_COLUMNS = [
    "attribution_id",
    "direction",
    "query_pos",
    "last_rank",
    "first_rank",
    "query_id",
    "query_token",
    "query_token_text",
    "train_ids",
    "scores",
    "tasks",
    "splits",
]


def _row_columns() -> list[sa.Column[Any]]:
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


def _packed(values: Sequence[int | None], kind: str) -> bytes | None:
    if all(value is None for value in values):
        return None
    return struct.pack(f"<{len(values)}{kind}", *values)


def _unpacked(packed: bytes | None, kind: str, count: int) -> list[Any]:
    return [None] * count if packed is None else list(struct.unpack(f"<{count}{kind}", packed))


def _chunk(rows: list[Any]) -> dict[str, Any]:
    first = rows[0]
    return {
        "attribution_id": first.attribution_id,
        "direction": first.direction,
        "query_pos": first.query_pos,
        "first_rank": first.rank,
        "last_rank": rows[-1].rank,
        "query_id": first.query_id,
        "query_token": first.query_token,
        "query_token_text": first.query_token_text,
        "train_ids": json.dumps([row.train_id for row in rows]),
        "scores": _packed([row.score for row in rows], "d"),
        "tasks": _packed([row.task for row in rows], "q"),
        "splits": _packed([row.split for row in rows], "q"),
    }


def _chunks(rows: Iterator[Any]) -> Iterator[dict[str, Any]]:
    """Rows in key order, cut into chunks: one query row and direction, consecutive ranks, at most CHUNK_ROWS."""
    current: list[Any] = []
    for row in rows:
        if current:
            last = current[-1]
            same_run = (last.attribution_id, last.direction, last.query_pos, last.rank + 1) == (
                row.attribution_id,
                row.direction,
                row.query_pos,
                row.rank,
            )
            if not same_run or len(current) == CHUNK_ROWS:
                yield _chunk(current)
                current = []
        current.append(row)
    if current:
        yield _chunk(current)


def _insert_in_batches(table: sa.TableClause, rows: Iterator[dict[str, Any]]) -> None:
    bind = op.get_bind()
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == BATCH:
            bind.execute(table.insert(), batch)
            batch = []
    if batch:
        bind.execute(table.insert(), batch)


def upgrade() -> None:
    op.create_table(
        "result_chunks",
        sa.Column("attribution_id", sa.String(length=40), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("query_pos", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_rank", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("first_rank", sa.Integer(), nullable=False),
        sa.Column("query_id", sa.String(length=200), nullable=True),
        sa.Column("query_token", sa.Integer(), nullable=True),
        sa.Column("query_token_text", sa.String(length=200), nullable=True),
        sa.Column("train_ids", sa.Text(), nullable=False),
        sa.Column("scores", sa.LargeBinary(), nullable=False),
        sa.Column("tasks", sa.LargeBinary(), nullable=True),
        sa.Column("splits", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("attribution_id", "direction", "query_pos", "last_rank", name=op.f("pk_result_chunks")),
    )
    old = sa.table("attribution_results", *(sa.column(name) for name in ROW_COLUMNS))
    new = sa.table("result_chunks", *(sa.column(name) for name in CHUNK_COLUMNS))
    for attribution_id in _attribution_ids(old):  # one attribution's rows in memory at a time
        ordered = (
            sa.select(old)
            .where(old.c.attribution_id == attribution_id)
            .order_by(old.c.direction, old.c.query_pos, old.c.rank)
        )
        chunks = list(_chunks(iter(op.get_bind().execute(ordered))))  # read before writing on the same connection
        _insert_in_batches(new, iter(chunks))
    op.drop_table("attribution_results")


def _attribution_ids(table: sa.TableClause) -> list[str]:
    """The attributions that have rows in ``table`` (a scan of its primary key's first column)."""
    ids = sa.select(table.c.attribution_id).distinct().order_by(table.c.attribution_id)
    return [row[0] for row in op.get_bind().execute(ids)]


def _rows_of(chunk: Any) -> Iterator[dict[str, Any]]:
    count = chunk.last_rank - chunk.first_rank + 1
    columns = zip(
        json.loads(chunk.train_ids),
        _unpacked(chunk.scores, "d", count),
        _unpacked(chunk.tasks, "q", count),
        _unpacked(chunk.splits, "q", count),
        strict=True,
    )
    for offset, (train_id, score, task, split) in enumerate(columns):
        yield {
            "attribution_id": chunk.attribution_id,
            "direction": chunk.direction,
            "query_pos": chunk.query_pos,
            "rank": chunk.first_rank + offset,
            "query_id": chunk.query_id,
            "train_id": train_id,
            "score": score,
            "task": task,
            "split": split,
            "query_token": chunk.query_token,
            "query_token_text": chunk.query_token_text,
        }


def downgrade() -> None:
    op.create_table(
        "attribution_results",
        *_row_columns(),
        sa.PrimaryKeyConstraint(
            "attribution_id", "direction", "query_pos", "rank", name=op.f("pk_attribution_results")
        ),
        sqlite_with_rowid=False,
    )
    chunks = sa.table("result_chunks", *(sa.column(name) for name in CHUNK_COLUMNS))
    old = sa.table("attribution_results", *(sa.column(name) for name in ROW_COLUMNS))
    for attribution_id in _attribution_ids(chunks):  # one attribution's chunks in memory at a time
        stored = list(op.get_bind().execute(sa.select(chunks).where(chunks.c.attribution_id == attribution_id)))
        _insert_in_batches(old, (row for chunk in stored for row in _rows_of(chunk)))
    op.drop_table("result_chunks")
