"""Writing result rows in bulk, inside the caller's transaction (the one that also marks the job succeeded).

Ranked rows are stored as chunks (`ResultChunk`): the consecutive ranks of one query row in one direction, at most
`CHUNK_ROWS` of them, their train ids as one JSON array and their scores (tasks, splits) as one packed array. A
full ranking of a million rows is about a thousand chunk rows, written by one Core ``executemany`` on every
database: the write costs the rows' bytes, where a row per ranked unit cost a million b-tree inserts (and their
write-ahead log records on PostgreSQL), most of a full ranking's job time. Then the attribution's query rows
(``attribution_queries``: one per query_pos) by one Core executemany. Nothing here commits: the rows become
visible with the job's final status when the caller's transaction commits, or never, when it rolls back.

Chunks go in the order of the table's primary key (`key_ordered_parts`: direction ``negative`` before
``positive``, then query_pos, then rank), so that each insert lands at the right end of the key's b-tree.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import numpy as np
from pydantic_core import to_json
from sqlalchemy import Table, insert
from sqlalchemy.orm import Session

from service.db.tables import AttributionQuery, ResultChunk
from worker.tasks.rows import DIRECTIONS, ResultColumns

CHUNK_ROWS = 1000  # ranked rows per chunk: a page reads one or two; a full ranking of 5,000 units is 5 per query row
INSERT_BATCH = 200  # chunk rows per executemany batch (a few MiB of parameters)


def write_results(session: Session, attribution_id: str, columns: ResultColumns) -> None:
    """Insert every row of ``columns`` for ``attribution_id`` in ``session``'s transaction."""
    if len(columns) == 0:
        return
    connection = session.connection()
    table = cast(Table, ResultChunk.__table__)
    batch: list[dict[str, Any]] = []
    for chunk in result_chunks(attribution_id, columns):
        batch.append(chunk)
        if len(batch) == INSERT_BATCH:
            connection.execute(insert(table), batch)
            batch = []
    if batch:
        connection.execute(insert(table), batch)
    connection.execute(insert(cast(Table, AttributionQuery.__table__)), query_rows(attribution_id, columns))


def query_rows(attribution_id: str, columns: ResultColumns) -> list[dict[str, Any]]:
    """One row per distinct query_pos of ``columns``: its query_id and query_token (the same on all its rows)."""
    positions, first = np.unique(columns.query_pos, return_index=True)
    query_id = columns.query_id[first].tolist() if columns.query_id is not None else [None] * len(first)
    query_token = columns.query_token[first].tolist() if columns.query_token is not None else [None] * len(first)
    return [
        {"attribution_id": attribution_id, "query_pos": position, "query_id": qid, "query_token": token}
        for position, qid, token in zip(positions.tolist(), query_id, query_token, strict=True)
    ]


def key_ordered_parts(columns: ResultColumns) -> Iterator[tuple[str, ResultColumns]]:
    """The rows of each direction in primary-key order: directions as the databases sort them (byte order of the
    names), each one's rows by (query_pos, rank); rows already in that order (the scoring loops make them so)
    are not sorted again."""
    for direction in sorted(DIRECTIONS):
        part = columns.where(columns.direction == direction)
        if len(part) == 0:
            continue
        position, rank = part.query_pos.astype(np.int64), part.rank.astype(np.int64)
        position_step, rank_step = np.diff(position), np.diff(rank)
        if not bool(((position_step > 0) | ((position_step == 0) & (rank_step > 0))).all()):
            part = part.take(np.lexsort((rank, position)))
        yield direction, part


def chunk_bounds(query_pos: np.ndarray, rank: np.ndarray, size: int = CHUNK_ROWS) -> list[tuple[int, int]]:
    """[start, stop) of each chunk of rows sorted by (query_pos, rank): runs of one query_pos and consecutive
    ranks, cut every ``size`` rows."""
    position, ranks = query_pos.astype(np.int64), rank.astype(np.int64)
    breaks = np.flatnonzero((np.diff(position) != 0) | (np.diff(ranks) != 1)) + 1
    starts = [0, *breaks.tolist()]
    stops = [*breaks.tolist(), len(position)]
    return [
        (at, min(at + size, stop)) for start, stop in zip(starts, stops, strict=True) for at in range(start, stop, size)
    ]


def result_chunks(attribution_id: str, columns: ResultColumns) -> Iterator[dict[str, Any]]:
    """The chunk rows of ``columns``, in primary-key order."""
    for direction, part in key_ordered_parts(columns):
        for start, stop in chunk_bounds(part.query_pos, part.rank):
            yield {
                "attribution_id": attribution_id,
                "direction": direction,
                "query_pos": int(part.query_pos[start]),
                "first_rank": int(part.rank[start]),
                "last_rank": int(part.rank[stop - 1]),
                "query_id": _first(part.query_id, start),
                "query_token": _first(part.query_token, start),
                "query_token_text": _first(part.query_token_text, start),
                "train_ids": to_json(part.train_id[start:stop].tolist()).decode(),
                "scores": np.asarray(part.score[start:stop], dtype="<f8").tobytes(),
                "tasks": _packed_integers(part.task, start, stop),
                "splits": _packed_integers(part.split, start, stop),
            }


def _first(column: np.ndarray | None, index: int) -> Any:
    """A query row's value (the same on all its rows), as a plain Python value."""
    if column is None:
        return None
    value = column[index]
    return value.item() if hasattr(value, "item") else value


def _packed_integers(column: np.ndarray | None, start: int, stop: int) -> bytes | None:
    """The chunk's values as little-endian int64, or None when the rows have none."""
    if column is None:
        return None
    values = column[start:stop]
    if values.dtype == object and all(value is None for value in values):
        return None
    return np.asarray(values, dtype="<i8").tobytes()
